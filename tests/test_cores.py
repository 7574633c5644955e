"""A CPU trial's threads follow the trials running on its node: all the node's CPUs alone,
its share beside others, never fewer than its own; a trial that died without leaving stops
counting. Torch computes the same step with one thread or two, so the share never changes a
trial's values."""

from __future__ import annotations

import copy
import subprocess
import sys

import torch

from trainables.cores import CoreShare, node_cpus


def _other_trial(folder):
    """A live process registered as a trial, as another trial's process would be."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    (folder / str(process.pid)).touch()
    return process


def test_a_trial_alone_takes_the_nodes_cpus_and_beside_others_its_share_never_below_its_own(tmp_path):
    before = torch.get_num_threads()
    share = CoreShare(own_cpus=1, node_cpus=4, folder=tmp_path)
    others = []
    try:
        assert share.apply() == 4 and torch.get_num_threads() == 4
        others.append(_other_trial(tmp_path))
        assert share.apply() == 2 and torch.get_num_threads() == 2
        others += [_other_trial(tmp_path) for _ in range(4)]
        assert share.threads() == 1  # 4 CPUs, 6 trials: its own one
        assert CoreShare(own_cpus=2, node_cpus=4, folder=tmp_path).threads() == 2
    finally:
        for process in others:
            process.kill()
            process.wait()
    assert share.apply() == 4  # the killed ones no longer count
    share.close()
    assert not (tmp_path / str(share.entry.name)).exists() and torch.get_num_threads() == 1
    torch.set_num_threads(before)


def test_an_entry_of_a_process_that_no_longer_exists_is_removed_and_not_counted(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (tmp_path / str(gone.pid)).touch()
    (tmp_path / "notes.txt").write_text("not a trial")
    share = CoreShare(own_cpus=1, node_cpus=2, folder=tmp_path)
    try:
        assert share.threads() == 2
        assert not (tmp_path / str(gone.pid)).exists() and (tmp_path / "notes.txt").exists()
    finally:
        share.close()


def test_the_node_cpus_are_those_ray_counts_on_the_node(local_ray):
    import ray

    assert node_cpus(default=99) == int(ray.cluster_resources()["CPU"])


def test_node_cpus_outside_ray_is_the_given_default():
    out = subprocess.run([sys.executable, "-c", "from trainables.cores import node_cpus; print(node_cpus(default=3))"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "3"


def test_a_step_with_two_threads_computes_what_it_does_with_one():
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainables.step import answer_loss

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                         num_attention_heads=4, vocab_size=1000))
    ids = torch.randint(3, 1000, (8, 48), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :24] = -100
    before = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            copied = copy.deepcopy(model)
            loss = answer_loss(copied, ids, labels, answer_only=True)
            loss.backward()
            results.append((loss.detach(), [p.grad.clone() for p in copied.parameters()]))
    finally:
        torch.set_num_threads(before)
    (one, one_grads), (two, two_grads) = results
    assert torch.equal(one, two)
    assert all(torch.equal(a, b) for a, b in zip(one_grads, two_grads))
