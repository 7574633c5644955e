"""The GPU share from a trial's measured footprint, and the share of a trial run again after
running out of memory beside others (search/resources/memory.py)."""

from __future__ import annotations

import pytest
import torch

from search.config import ResourcesConfig
from search.resources.memory import SHARES, larger_share, share_for


@pytest.mark.parametrize("footprint_gb, gpu_gb, margin", [(11.6, 140, 1.0), (2.4, 80, 1.0), (30, 80, 0.5), (5, 24, 0.0),
                                                          (70, 80, 0.2), (100, 80, 1.0)])
def test_the_chosen_share_keeps_the_trials_footprints_with_their_margin_under_the_gpus_memory(footprint_gb, gpu_gb, margin):
    share = share_for(footprint_gb, gpu_gb, margin)
    trials = round(1 / share)
    assert share in SHARES
    if footprint_gb * (1 + margin) <= gpu_gb:  # one fits: the share is the most trials that fit, and no more
        assert trials * footprint_gb * (1 + margin) <= gpu_gb
        assert share == SHARES[0] or 2 * trials * footprint_gb * (1 + margin) > gpu_gb
    else:
        assert share == 1.0


def test_a_large_vocabulary_270m_model_on_an_h200_is_not_packed_eight_to_a_gpu():
    # measured: 8 trials of a 270M model with a 262k vocabulary held 11.6 GB each and two ran out of memory
    assert share_for(11.6, 140, margin=1.0) == 0.25


def test_a_small_model_on_an_80_gb_gpu_is_packed_eight_to_a_gpu():
    assert share_for(2.4, 80, margin=1.0) == 0.125


def test_auto_takes_the_larger_of_the_share_by_parameters_and_the_share_by_measurement():
    auto = ResourcesConfig()
    # what the probe measured on an H200 for SmolLM2 and a 262k-vocabulary 270M model: 8 fit with the margin
    assert auto.gpus(cuda=True, total_params=135e6, gpu_memory_gb=140, footprint_gb=9.4) == 0.125
    assert auto.gpus(cuda=True, total_params=270e6, gpu_memory_gb=140, footprint_gb=13.0) == 0.125
    # what nvidia-smi was seen to hold for that model's trials, before eval batches were capped: 4 fit
    assert auto.gpus(cuda=True, total_params=270e6, gpu_memory_gb=140, footprint_gb=25.7) == 0.25
    assert auto.gpus(cuda=True, total_params=3e9, gpu_memory_gb=140, footprint_gb=2.0) == 0.5  # throughput's rule
    assert auto.gpus(cuda=True, total_params=270e6, gpu_memory_gb=140) == 0.125  # no measurement: by parameters
    assert ResourcesConfig(gpus_per_trial=0.125).gpus(cuda=True, total_params=270e6, gpu_memory_gb=140,
                                                      footprint_gb=11.6) == 0.125  # a share set by hand wins


def test_a_trial_run_again_gets_half_the_neighbours_until_it_has_the_gpu_to_itself():
    assert [larger_share(s) for s in (0.125, 0.25, 0.5, 0.3)] == [0.25, 0.5, 1.0, 0.6]
    assert larger_share(1.0) is None and larger_share(2.0) is None  # alone: the configuration's own failure
    assert larger_share(0.0) is None  # a CPU trial shares no GPU


def test_a_negative_memory_margin_is_refused_with_the_key():
    assert any("resources.memory_margin" in p for p in ResourcesConfig(memory_margin=-0.5).problems())


def test_eval_batches_hold_four_gigabytes_of_answer_logits_and_up_to_eight_train_steps_of_tokens():
    from trainables.evaluation import EVAL_LOGITS_BYTES, eval_budget

    train_tokens = 16 * 512
    large, small = eval_budget(train_tokens, 262_144, 30), eval_budget(train_tokens, 49_152, 30)
    assert large.answers * 262_144 * 2 <= EVAL_LOGITS_BYTES and large.answers < small.answers
    assert small.answers * 49_152 * 2 <= EVAL_LOGITS_BYTES
    # never fewer answers than a train step's tokens, whose logits training holds
    assert eval_budget(64 * 1024, 262_144, 30).answers == 64 * 1024
    # tokens: a train step keeps every layer's activations, an eval pass the one layer it is in
    assert eval_budget(train_tokens, 262_144, 30).tokens == 8 * train_tokens
    assert eval_budget(train_tokens, 262_144, 3).tokens == 3 * train_tokens  # a shallow model: fewer
    # with gradient checkpointing the step keeps one layer's: a batch holds its answers' tokens at most
    assert eval_budget(train_tokens, 49_152, 30, checkpointed=True) == small.__class__(small.answers, small.answers)
    # a shared trainer of 8 slots of 8 x 128 tokens: its step holds 8 batches, its answers' logits one trial's
    assert eval_budget(1024, 49_152, 30, slots=8) == small.__class__(64 * 1024, small.answers)


class FakeVocabModel(torch.nn.Module):
    """A model whose logits are small on CPU, but that tells the eval its vocabulary is 262k."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Embedding(64, 8)
        self.config = type("Config", (), {"get_text_config": lambda self: type("Text", (), {"vocab_size": 262_144})()})()
        self.batches = []

    def forward(self, input_ids):
        self.batches.append(tuple(input_ids.shape))
        return type("Output", (), {"logits": self.head(input_ids)})()


def test_eval_batches_of_a_262k_vocabulary_model_stay_within_the_budget_of_tokens_and_answers():
    from trainables.evaluation import EVAL_LOGITS_BYTES, eval_budget, evaluate

    model = FakeVocabModel()
    budget = eval_budget(16 * 256, model.config.get_text_config().vocab_size, 30)
    rows = [([1] * 100, [-100] * 50 + [2] * 50)] * 300  # 30,000 tokens, 50 scored positions a row
    evaluate(model, rows, 0, torch.device("cpu"), torch.autocast("cpu", enabled=False), budget)
    assert len(model.batches) > 1
    assert all(b * t <= budget.tokens and b * 50 * 262_144 * 2 <= EVAL_LOGITS_BYTES for b, t in model.batches)
    # the logits bind here, not the tokens: 4 GiB of bf16 logits over 262,144 tokens is 8,192 positions, 163 rows
    assert max(b for b, _ in model.batches) == 163


def test_a_pack_evaluates_its_slots_together_in_as_many_passes_as_one_trial_evaluates_itself():
    from trainables.evaluation import eval_budget, evaluate, evaluate_blocks

    off, cpu = torch.autocast("cpu", enabled=False), torch.device("cpu")
    rows = [([1] * 100, [-100] * 95 + [2] * 5)] * 300
    alone, pack = FakeVocabModel(), FakeVocabModel()
    evaluate(alone, rows, 0, cpu, off, eval_budget(16 * 64, 262_144, 30))
    evaluate_blocks(pack, rows, 0, cpu, off, eval_budget(16 * 64, 262_144, 30, slots=4), blocks=4)
    assert len(pack.batches) == len(alone.batches) > 1
    assert [b for b, _ in pack.batches] == [4 * b for b, _ in alone.batches]


def test_the_probe_trains_the_spaces_heaviest_configuration():
    from search.resources.memory import heaviest_lora_config
    from search.tuning.space import ResolvedModules

    resolved = {name: ResolvedModules(name, names, False, [f"layers.{i}.{n}" for i in range(4) for n in names], None)
                for name, names in {"attention_qv": ["q_proj", "v_proj"],
                                    "all_linear": ["down_proj", "k_proj", "o_proj", "q_proj", "v_proj"]}.items()}
    lora = heaviest_lora_config(resolved, [4, 32, 8], [False, True], [0.0, 0.1])
    assert lora["r"] == 32 and lora["target_modules"] == resolved["all_linear"].target_modules
    assert lora["use_dora"] and lora["lora_dropout"] == 0.1


def test_the_report_gives_the_share_and_the_probe_it_came_from():
    from analysis.render import _share
    from rundir.runconfig import MemoryProbe, Resources

    probe = MemoryProbe(footprint_gb=12.99, reserved_gb=6.0, allocated_gb=5.74, context_gb=0.5, source="nvml",
                        gpu_gb=139.8, margin=1.0, share=0.25, seconds=20.0, lora_config={"r": 32})

    def resources(gpus_per_trial: float, memory_probe: MemoryProbe | None = None) -> Resources:
        return Resources(gpus_per_trial=gpus_per_trial, cpus_per_trial=1, max_concurrent_trials=0, max_failures=0,
                         memory_margin=1.0, cuda_graphs=True, compile=False, pack_slots=8, memory_probe=memory_probe)

    line = _share(resources(0.25, probe))
    assert "0.25 of a GPU" in line and "13.0 GB" in line and "140 GB" in line and "counted 2 times" in line
    assert _share(resources(0.5)) == " Trials had 0.5 of a GPU each."
    assert _share(resources(0.0)) == ""  # CPU trials share no GPU


def test_a_probe_of_the_same_model_configuration_and_gpu_is_read_from_the_cache_fake_gpu(tmp_path, monkeypatch):
    """The measurement needs a GPU, so a fake stands in for it; the cache around it is real."""
    import search.resources.memory as memory
    from search.resources.memory import ProbeSpec, probe

    measured = []

    def fake_measure(spec):
        measured.append(spec)
        return {"footprint_gb": 9.4, "reserved_gb": 8.6, "allocated_gb": 5.5, "context_gb": 0.8, "source": "nvml",
                "gpu_gb": 140.0}

    monkeypatch.setattr(memory, "_measure_in_a_fresh_process", fake_measure)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    spec = ProbeSpec(str(model), "bfloat16", "none", False, False, {"r": 32, "target_modules": ["q_proj"]}, 8, 128,
                     True, False)
    cache = tmp_path / "probes"

    first = probe(spec, cache, "NVIDIA H200")
    again = probe(spec, cache, "NVIDIA H200")
    other_gpu = probe(spec, cache, "NVIDIA H100 80GB HBM3")
    (model / "config.json").write_text('{"vocab_size": 262144}')  # another model in the same directory
    other_model = probe(spec, cache, "NVIDIA H200")

    assert len(measured) == 3
    assert (first["cached"], again["cached"], other_gpu["cached"], other_model["cached"]) == (False, True, False, False)
    assert again["footprint_gb"] == first["footprint_gb"] and again["seconds"] == 0.0


def test_the_float32_loss_taken_in_chunks_equals_the_loss_of_every_answer_at_once(monkeypatch):
    import trainables.evaluation as evaluation

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(37, 50, generator=generator).to(torch.bfloat16)
    labels = torch.randint(0, 50, (37,), generator=generator)
    labels[3] = logits[3].float().argmax()  # one right answer at least
    whole = torch.nn.functional.cross_entropy(logits.float(), labels, reduction="none")
    monkeypatch.setattr(evaluation, "EVAL_LOSS_CHUNK_BYTES", 4 * 50 * 8)  # 8 positions a chunk: 5 chunks
    losses, correct = evaluation.answer_losses(logits, labels)
    assert losses.dtype == torch.float64 and torch.equal(losses, whole.double())
    assert torch.equal(correct, (logits.float().argmax(-1) == labels).long()) and correct[3] == 1


def test_an_evaluation_with_its_loss_in_chunks_gives_what_it_gives_in_one(monkeypatch, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    import trainables.evaluation as evaluation

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    generator = torch.Generator().manual_seed(1)
    rows = []
    for length in (9, 14, 14, 21, 30):
        ids = torch.randint(3, 100, (length,), generator=generator).tolist()
        rows.append((ids, [-100] * (length // 2) + ids[length // 2:]))
    off, cpu = torch.autocast("cpu", enabled=False), torch.device("cpu")
    budget = evaluation.EvalBudget(1000, 1000)
    once = evaluation.evaluate(model, rows, 0, cpu, off, budget)
    monkeypatch.setattr(evaluation, "EVAL_LOSS_CHUNK_BYTES", 4 * model.config.vocab_size * 3)  # 3 positions a chunk
    chunked = evaluation.evaluate(model, rows, 0, cpu, off, budget)
    assert chunked == once and len(once.row_loss) == 5


def test_a_gpu_trainers_eval_passes_grow_to_half_the_room_its_evaluations_show():
    from trainables.evaluation import EvalBudget, EvalRoom

    rule, room = EvalBudget(tokens=30_000, answers=40_000), EvalRoom()
    assert room.budget(rule) is rule and room.budget(None) is None  # nothing learnt yet
    # a pass of 30,000 tokens held 3 GB beyond what was allocated: 100 kB a token; 40 GB free
    room.learn(largest=30_000, transient=3 * 10**9, room=40 * 10**9)
    assert room.budget(rule) == EvalBudget(tokens=200_000, answers=40_000)  # 20 GB at 100 kB a token
    room.learn(largest=200_000, transient=3 * 10**9, room=40 * 10**9)  # cheaper a token than it seemed
    assert room.budget(rule).tokens == 1_333_333
    room.learn(largest=30_000, transient=3 * 10**9, room=4 * 10**9)  # little room left: the rule's own tokens
    assert room.budget(rule) is rule
    room.learn(largest=30_000, transient=0, room=4 * 10**9)  # a pass that held nothing teaches nothing
    assert room.budget(rule) is rule
