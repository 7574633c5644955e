"""A packed step is each slot's adapter trained alone: held to PEFT's own model with the same
`LoraConfig` and the trial's own optimizer (trainables/trial.py), in float32 on the CPU, on the
tiny random-init Llama (tests/conftest.py)."""

from __future__ import annotations

import gc
import logging
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch

from rundir.params import Origin, TrialParams
from trainables.data import IGNORE
from trainables.evaluation import EvalBudget, evaluate, evaluate_blocks
from trainables.metrics import Progress
from trainables.optim import loraplus_adamw, warmup_cosine
from trainables.packed import Pack, PackedLinear, answers_per_row
from trainables.step import CaptureFailed, answer_loss

WARMUP, MAX_STEPS = 2, 10
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
# every module set, ranks 4-32, alpha ratios 1 and 2, RSLoRA on and off, LoRA+ 1 and 16, four learning rates
CONFIGS = [
    {"target_modules": ["q_proj", "v_proj"], "r": 4, "alpha_ratio": 1, "use_rslora": False, "loraplus": 1.0, "lr": 1e-3},
    {"target_modules": MLP, "r": 8, "alpha_ratio": 2, "use_rslora": True, "loraplus": 16.0, "lr": 5e-3},
    {"target_modules": ATTENTION, "r": 16, "alpha_ratio": 1, "use_rslora": True, "loraplus": 1.0, "lr": 2e-3},
    {"target_modules": ATTENTION + MLP, "r": 32, "alpha_ratio": 2, "use_rslora": False, "loraplus": 16.0, "lr": 3e-4},
]


def params(target_modules, r, alpha_ratio, use_rslora, loraplus, lr, dropout=0.0, seed=0, use_dora=False) -> TrialParams:
    lora_config = {"r": r, "lora_alpha": alpha_ratio * r, "lora_dropout": dropout, "target_modules": target_modules,
                       "use_rslora": use_rslora, "use_dora": use_dora, "task_type": "CAUSAL_LM"}
    return TrialParams(lora_config=lora_config, module_set="+".join(target_modules), alpha_ratio=alpha_ratio,
                       learning_rate=lr, loraplus_lr_ratio=loraplus, seed=seed, origin=Origin.SEARCH)


def base(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.requires_grad_(False)
    model.config.use_cache = False
    return model


def batch(seed: int, rows: int, length: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token rows whose answer is all but the first four tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (rows, length), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100
    return ids, labels


def nonzero_b(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """The adapter with B drawn too: with PEFT's zero B, A's first gradient is zero and the test would not see it."""
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(v.shape, generator=g) * 0.05 if "lora_B" in k else v.clone()) for k, v in state.items()}


class PeftAlone:
    """One configuration as a per-process trial trains it: PEFT's model, PEFT's LoRA+ AdamW, the schedule."""

    def __init__(self, tiny_model_dir, p: TrialParams, state: dict[str, torch.Tensor] | None = None):
        from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
        from peft.utils import get_peft_model_state_dict

        torch.manual_seed(p.seed)
        self.model = get_peft_model(base(tiny_model_dir), LoraConfig(**p.lora_config))
        if state is not None:
            set_peft_model_state_dict(self.model, state)
        self.state = get_peft_model_state_dict(self.model)
        self.optimizer = loraplus_adamw(self.model, p.learning_rate, p.loraplus_lr_ratio, cuda=False)
        self.scheduler = warmup_cosine(self.optimizer, WARMUP, MAX_STEPS)
        self.model.train()

    def step(self, ids, labels) -> tuple[float, dict[str, torch.Tensor]]:
        loss = answer_loss(self.model, ids, labels)
        loss.backward()
        grads = {self._key(n): p.grad.clone() for n, p in self.model.named_parameters() if p.requires_grad}
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item(), grads

    def weights(self) -> dict[str, torch.Tensor]:
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(self.model)

    @staticmethod
    def _key(name: str) -> str:
        return name.replace(".default", "")


def pack_of_configs(model) -> tuple[Pack, list[int]]:
    """A pack of four slots on `model` holding CONFIGS, each with B drawn too (`nonzero_b`)."""
    pack = Pack(model, capacity=4, warmup_steps=WARMUP, max_steps=MAX_STEPS)
    slots = [pack.add(params(**config, seed=n)) for n, config in enumerate(CONFIGS)]
    for i in slots:
        pack.load_adapter_state(i, nonzero_b(pack.adapter_state(i), i))
    return pack, slots


def close(actual: dict, expected: dict, what: str, atol: float = 1e-7) -> None:
    assert sorted(actual) == sorted(expected), what
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, rtol=1e-5, atol=atol, msg=lambda m, key=key: f"{what}: {key}: {m}")


def close_weights(actual: dict, expected: dict, what: str, within: float = 1e-5) -> None:
    """Within 1e-5 of each tensor's largest entry. A rank padded to the pack's largest changes
    the order in which the matmuls sum (float noise of 1e-8 in a gradient), and Adam divides a
    gradient near zero by its own size, so an entry's own relative error says nothing there."""
    assert sorted(actual) == sorted(expected), what
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, rtol=0, atol=within * value.abs().max().item(),
                                   msg=lambda m, key=key: f"{what}: {key}: {m}")


def test_a_packed_step_gives_each_slot_the_loss_gradients_and_update_of_peft_training_it_alone(tiny_model_dir):
    model = base(tiny_model_dir)
    vocab = model.config.vocab_size
    pack = Pack(model, capacity=4, warmup_steps=WARMUP, max_steps=MAX_STEPS)
    alone = {}
    for seed, config in enumerate(CONFIGS):
        p = params(**config, seed=seed)
        index = pack.add(p)
        reference = PeftAlone(tiny_model_dir, p)
        state = nonzero_b(reference.state, seed)
        reference = PeftAlone(tiny_model_dir, p, state)
        pack.load_adapter_state(index, state)
        alone[index] = reference
    lengths = [10, 12, 8, 12]  # a pack pads its slots' batches to the longest
    for step in range(2):  # the second step runs on Adam's state and the schedule's next rate
        batches = {i: batch(100 * step + i, 2, lengths[i], vocab) for i in alone}
        losses = pack.step(batches)
        for i, reference in alone.items():
            loss, expected_grads = reference.step(*batches[i])
            assert losses[i].item() == pytest.approx(loss, rel=1e-5), f"slot {i} loss at step {step}"
            close(pack.gradients(i), expected_grads, f"slot {i} gradients at step {step}")
            close_weights(pack.adapter_state(i), reference.weights(), f"slot {i} weights after step {step}")


def test_a_slot_trains_the_same_whatever_the_other_slots_hold_dropout_masks_included(tiny_model_dir):
    vocab = base(tiny_model_dir).config.vocab_size
    mine = params(**CONFIGS[1], dropout=0.2, seed=7)

    def run(neighbour: TrialParams | None, me: TrialParams = mine) -> tuple[list[float], dict]:
        pack = Pack(base(tiny_model_dir), capacity=2, warmup_steps=WARMUP, max_steps=MAX_STEPS)
        slot = pack.add(me)
        other = pack.add(neighbour) if neighbour else None
        losses = []
        for step in range(3):
            batches = {slot: batch(step, 2, 10, vocab)}
            if other is not None:
                batches[other] = batch(50 + step, 3, 12, vocab)
            losses.append(pack.step(batches)[slot].item())
        return losses, pack.adapter_state(slot)

    alone_losses, alone_weights = run(None)
    for neighbour in (params(**CONFIGS[3], dropout=0.5, seed=1), params(**CONFIGS[1], dropout=0.2, seed=7)):
        losses, weights = run(neighbour)
        assert losses == pytest.approx(alone_losses, rel=1e-6)
        # a pack of other row counts sums its matmuls in another order; Adam scales that float noise
        # up for the smallest gradients (3.6e-6 seen): masks that differed move the loss by 1e-3
        close(weights, alone_weights, "weights beside a neighbour", atol=2e-5)
    # the masks are drawn: without dropout the slot trains otherwise (from step 1: B starts at zero)
    undropped, _ = run(None, params(**CONFIGS[1], dropout=0.0, seed=7))
    assert undropped[1:] != pytest.approx(alone_losses[1:], rel=1e-4)


def test_a_slot_whose_loss_is_not_finite_leaves_the_others_unchanged(tiny_model_dir):
    vocab = base(tiny_model_dir).config.vocab_size

    def run(poison: bool):
        pack = Pack(base(tiny_model_dir), capacity=2, warmup_steps=WARMUP, max_steps=MAX_STEPS)
        good, bad = pack.add(params(**CONFIGS[0], seed=1)), pack.add(params(**CONFIGS[3], seed=2))
        if poison:
            with torch.no_grad():
                next(w for _, w in pack.slots[bad].named_weights()).fill_(float("inf"))
        losses = [pack.step({good: batch(s, 2, 10, vocab), bad: batch(9 + s, 2, 10, vocab)}) for s in range(2)]
        return [step[good].item() for step in losses], losses[-1][bad].item(), pack.adapter_state(good)

    losses, bad_loss, weights = run(poison=False)
    poisoned_losses, poisoned_bad_loss, poisoned_weights = run(poison=True)
    assert not torch.isfinite(torch.tensor(poisoned_bad_loss)) and torch.isfinite(torch.tensor(bad_loss))
    assert poisoned_losses == losses
    close(poisoned_weights, weights, "the healthy slot beside a diverged one")


def test_a_freed_slot_adds_nothing_and_takes_the_next_trial(tiny_model_dir):
    model = base(tiny_model_dir)
    ids, _labels = batch(0, 2, 10, model.config.vocab_size)
    with torch.no_grad():
        plain = model(input_ids=ids).logits
    pack = Pack(model, capacity=2, warmup_steps=WARMUP, max_steps=MAX_STEPS)
    first = pack.add(params(**CONFIGS[3]))
    pack.load_adapter_state(first, nonzero_b(pack.adapter_state(first), 0))
    with torch.no_grad(), pack.only(first):
        assert not torch.allclose(model(input_ids=ids).logits, plain)  # the adapter is in the path
    pack.remove(first)
    assert pack.free_slots() == [0, 1]
    with torch.no_grad(), pack.only(first):
        torch.testing.assert_close(model(input_ids=ids).logits, plain, rtol=0, atol=0)
    assert pack.add(params(**CONFIGS[0])) == first


@pytest.mark.parametrize("budget", [None, EvalBudget(60, 60), EvalBudget(1000, 12)])
def test_the_slots_evaluated_in_one_pass_score_as_each_evaluated_alone(tiny_model_dir, budget):
    """The shared trainer evaluates every slot due at a step in one pass of the pack: each block's
    losses and accuracies, row by row, are those of its slot alone (rows of several lengths, a row
    whose answer was cut away, a budget of tokens or of answer positions that splits them into
    batches, or rows per batch)."""
    model = base(tiny_model_dir)
    vocab = model.config.vocab_size
    pack, slots = pack_of_configs(model)
    rows = []
    for k, length in enumerate([7, 12, 9, 15, 12, 6, 10]):
        ids, labels = batch(700 + k, 1, length, vocab)
        rows.append((ids[0].tolist(), labels[0].tolist()))
    rows.append((rows[0][0], [-100] * len(rows[0][0])))  # no answer token left: not a row of the mean
    off, cpu = torch.autocast("cpu", enabled=False), torch.device("cpu")
    chosen = [slots[3], slots[0], slots[2]]  # any slots, in any order
    with pack.only(*chosen):
        together = evaluate_blocks(model, rows, 0, cpu, off, budget, blocks=len(chosen))
    for i, evaluation in zip(chosen, together):
        with pack.only(i):
            alone = evaluate(model, rows, 0, cpu, off, budget)
        assert len(evaluation.row_loss) == len(rows) - 1
        torch.testing.assert_close(torch.tensor(evaluation.row_loss), torch.tensor(alone.row_loss), rtol=1e-5, atol=1e-6)
        assert evaluation.row_accuracy == alone.row_accuracy
        assert evaluation.loss == pytest.approx(alone.loss, rel=1e-5)
        assert evaluation.loss_se == pytest.approx(alone.loss_se, rel=1e-4)
    assert len({round(e.loss, 6) for e in together}) == len(chosen)  # three adapters, three different scores


def aten_ops(run) -> list[str]:
    """The aten operations that `run()` dispatches, by name."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    return [event.name for event in prof.events() if event.name.startswith("aten::")]


@pytest.mark.parametrize("autocast", [False, True])
def test_a_selections_passes_without_gradients_reuse_its_matrices_and_score_as_made_anew(tiny_model_dir, autocast):
    """Evaluation and generation pass the rows of a selection (`Pack.only`) through the model
    without gradients, generation once per token: the slots' matrices are taken from the stacks
    once, not at every pass, and the logits are those the training path's operations give
    (bitwise, in fp32 and under bf16 autocast); a selection made after a slot's weights changed
    sees the new ones."""
    model = base(tiny_model_dir)
    pack, slots = pack_of_configs(model)
    ids, _ = batch(5, 3, 9, model.config.vocab_size)
    chosen = [slots[3], slots[1]]
    cast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)

    def logits(grad: bool) -> torch.Tensor:
        with torch.set_grad_enabled(grad), cast:
            return model(input_ids=ids.repeat(len(chosen), 1)).logits.detach()

    with pack.only(*chosen):
        made_anew = logits(grad=True)
        first = aten_ops(lambda: logits(grad=False))
        out = {}
        second = aten_ops(lambda: out.update(logits=logits(grad=False)))
    assert torch.equal(out["logits"], made_anew)
    layers = sum(1 for m in model.modules() if isinstance(m, PackedLinear))
    assert first.count("aten::index_select") - second.count("aten::index_select") == 3 * layers  # A, B, scale
    assert len(second) <= len(first) - 4 * layers, (len(first), len(second))
    changed = nonzero_b(pack.adapter_state(chosen[0]), 99)
    pack.load_adapter_state(chosen[0], changed)
    with pack.only(*chosen):
        again = logits(grad=False)
        assert torch.equal(again, logits(grad=True))
    assert not torch.equal(again, made_anew)


def test_a_selection_keeps_its_matrices_within_the_packs_budget_and_scores_the_same_beyond_it(tiny_model_dir,
                                                                                              monkeypatch):
    """Kept matrices are held together for the whole selection, so they stay within FROZEN_BYTES
    (a large model's would take gigabytes): past it a layer makes its matrices at each pass
    again, with the same logits, and a new selection starts its budget afresh."""
    import trainables.packed as packed

    model = base(tiny_model_dir)
    pack, slots = pack_of_configs(model)
    ids, _ = batch(6, 2, 8, model.config.vocab_size)
    layers = [m for m in model.modules() if isinstance(m, PackedLinear)]
    with pack.only(*slots), torch.no_grad():
        everything = model(input_ids=ids.repeat(len(slots), 1)).logits
        kept = pack.frozen_bytes
    assert kept > 0 and all(len(layer.frozen) == 0 for layer in layers)  # given up with the selection
    monkeypatch.setattr(packed, "FROZEN_BYTES", kept // 3)
    with pack.only(*slots), torch.no_grad():
        first = model(input_ids=ids.repeat(len(slots), 1)).logits
        assert 0 < pack.frozen_bytes <= kept // 3
        assert 0 < sum(len(layer.frozen) for layer in layers) < 2 * len(layers)
        assert torch.equal(model(input_ids=ids.repeat(len(slots), 1)).logits, first)
    assert pack.frozen_bytes == 0
    assert torch.equal(first, everything)


def test_a_slots_checkpoint_reads_the_pack_in_as_many_operations_for_4_layers_as_for_14(tiny_model_dir):
    """A report's checkpoint is taken while every slot of the pack waits, and each read of a GPU's
    tensors waits for the GPU's queue: a slot's weights and AdamW moments leave the pack's tensors
    in one copy, and its rank is the trial's, known on the host, whether the slot adapts 4 layers
    or 14. What the checkpoint holds is what the pack holds."""
    from torch.utils._python_dispatch import TorchDispatchMode

    model = base(tiny_model_dir)
    pack, slots = pack_of_configs(model)
    pack.step({i: batch(i, 2, 8, model.config.vocab_size) for i in slots})
    layers = [module for module in model.modules() if isinstance(module, PackedLinear)]
    stacks = {getattr(layer, name).untyped_storage().data_ptr() for layer in layers
              for name in ("A", "B", "A_avg", "B_avg", "A_avg_sq", "B_avg_sq")}

    class PackReads(TorchDispatchMode):
        """The operations that read one of the pack's stacked tensors, but for views: each is a
        launch of the stepping thread's while every slot waits."""

        def __init__(self):
            super().__init__()
            self.reads = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            inputs = [t for arg in [*args, *(kwargs or {}).values()] for t in (arg if isinstance(arg, (list, tuple)) else [arg])
                      if isinstance(t, torch.Tensor)]
            reads = any(t.untyped_storage().data_ptr() in stacks for t in inputs)
            if reads and not func.is_view:
                self.reads.append(func.name())
            return func(*args, **(kwargs or {}))

    progress = Progress(called_at=0.0, imported_at=0.0, busy_from=0.0, step=1)
    reads = {}
    for slot in (slots[0], slots[3]):  # q_proj and v_proj; every projection
        with PackReads() as mode:
            checkpoint = pack.checkpoint(slot, progress, "tiny")
        reads[len(pack.slots[slot].layers)] = mode.reads
        ops = aten_ops(lambda slot=slot: pack.checkpoint(slot, progress, "tiny"))
        reads[len(pack.slots[slot].layers)].append(ops.count("aten::_local_scalar_dense"))
        weights = dict(pack.slots[slot].named_weights())
        close(checkpoint.adapter, {key: weight.detach() for key, weight in weights.items()}, "adapter", atol=0)
        state = list(checkpoint.optimizer["state"].values())
        assert len(state) == len(weights)
        for moment, name in (("exp_avg", "avg"), ("exp_avg_sq", "avg_sq")):
            held = [entry[moment] for entry in state]
            assert all(torch.equal(a, b) for a, b in zip(held, (m for _, m in pack.slots[slot].named_weights(name))))
    assert set(reads) == {4, 14} and reads[4] == reads[14] and reads[4][:-1] == ["aten::cat"], reads


def test_an_adapter_trained_in_a_pack_loads_in_peft_and_scores_what_its_trial_reported(tiny_model_dir, tmp_path):
    from peft import PeftModel

    model = base(tiny_model_dir)
    vocab = model.config.vocab_size
    pack = Pack(model, capacity=2, warmup_steps=WARMUP, max_steps=MAX_STEPS)
    slots = [pack.add(params(**CONFIGS[1], seed=3)), pack.add(params(**CONFIGS[2], seed=4))]
    for step in range(4):
        pack.step({i: batch(10 * step + i, 4, 12, vocab) for i in slots})
    rows = [(batch(500 + k, 1, 12, vocab)[0][0].tolist(), batch(500 + k, 1, 12, vocab)[1][0].tolist()) for k in range(6)]
    off = torch.autocast("cpu", enabled=False)
    for i in slots:
        with pack.only(i):
            reported = evaluate(model, rows, 0, torch.device("cpu"), off)
        directory = tmp_path / f"slot{i}"
        pack.checkpoint(i, Progress(called_at=0.0, imported_at=0.0), str(tiny_model_dir)).save(directory)
        loaded = PeftModel.from_pretrained(base(tiny_model_dir), directory / "adapter")
        assert loaded.peft_config["default"].r == pack.slots[i].params.lora_config["r"]
        exported = evaluate(loaded, rows, 0, torch.device("cpu"), off)
        assert exported.loss == pytest.approx(reported.loss, rel=1e-4)


def test_a_dora_or_full_pack_is_refused_naming_what_to_do(tiny_model_dir):
    pack = Pack(base(tiny_model_dir), capacity=1, warmup_steps=WARMUP, max_steps=MAX_STEPS)
    with pytest.raises(ValueError, match="DoRA.*resources.packing=processes"):
        pack.add(params(**CONFIGS[0], use_dora=True))
    pack.add(params(**CONFIGS[0]))
    with pytest.raises(ValueError, match="all 1 slots"):
        pack.add(params(**CONFIGS[1]))


def test_a_pass_that_runs_out_of_memory_is_split_and_trains_the_same_with_a_fake_gpu_error(tiny_model_dir, monkeypatch):
    """The out-of-memory error is raised by a stand-in (there is no GPU here) for passes of more than two slots."""
    vocab = base(tiny_model_dir).config.vocab_size

    def run(limit: int | None):
        pack = Pack(base(tiny_model_dir), capacity=4, warmup_steps=WARMUP, max_steps=MAX_STEPS)
        slots = [pack.add(params(**config, seed=i)) for i, config in enumerate(CONFIGS)]
        if limit:
            real = pack._pass

            def limited(batches, autocast):
                if len(batches) > limit:
                    raise torch.OutOfMemoryError("CUDA out of memory (stand-in)")
                return real(batches, autocast)

            monkeypatch.setattr(pack, "_pass", limited)
        losses = [pack.step({i: batch(10 * s + i, 2, 10, vocab) for i in slots}) for s in range(2)]
        return pack, {i: [step[i].item() for step in losses] for i in slots}, {i: pack.adapter_state(i) for i in slots}

    _, losses, weights = run(None)
    split, split_losses, split_weights = run(2)
    assert split.pass_slots == 2
    for i in losses:
        assert split_losses[i] == pytest.approx(losses[i], rel=1e-6)
        close(split_weights[i], weights[i], f"slot {i} after split passes")


def mixed(k: int, dropout: float) -> TrialParams:
    """The k-th of a pack mixing every module set, ranks 4-32, RSLoRA on and off, LoRA+ 1 and 16
    and a learning rate of its own."""
    config = CONFIGS[k % len(CONFIGS)]
    return params(**{**config, "lr": config["lr"] * (1 + k)}, dropout=dropout, seed=k)


def full_pack(tiny_model_dir, trials: list[TrialParams], max_rank: int = 1) -> tuple[Pack, torch.Tensor, torch.Tensor]:
    """A pack at capacity holding `trials`, and a batch of 2 x 10 tokens for each slot."""
    pack = Pack(base(tiny_model_dir), capacity=len(trials), warmup_steps=WARMUP, max_steps=MAX_STEPS, max_rank=max_rank)
    for p in trials:
        pack.add(p)
    rows = [batch(k, 2, 10, pack.model.config.vocab_size) for k in range(len(trials))]
    return pack, torch.cat([ids for ids, _ in rows]), torch.cat([labels for _, labels in rows])


def dispatched_ops(pack: Pack, ids: torch.Tensor, labels: torch.Tensor) -> int:
    """The aten operations that one training step of every slot dispatches: forward, backward, update."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        pack.losses(ids, labels, answers=answers_per_row(labels)).sum().backward()
        pack.update(torch.ones(pack.capacity, dtype=torch.bool))
    return sum(1 for event in prof.events() if event.name.startswith("aten::"))


def test_a_packed_step_of_sixteen_mixed_slots_dispatches_the_operations_of_one_slot(tiny_model_dir):
    one = dispatched_ops(*full_pack(tiny_model_dir, [params(ATTENTION + MLP, 32, 2, True, 16.0, 1e-3, dropout=0.1)]))
    sixteen = dispatched_ops(*full_pack(tiny_model_dir, [mixed(k, dropout=0.1 * (k % 2)) for k in range(16)]))
    assert sixteen <= 1.1 * one, (one, sixteen)


def test_a_packed_step_compiles_whole_with_no_graph_break_and_trains_as_the_eager_one(tiny_model_dir):
    """fullgraph=True fails at any graph break: nothing in the forward, backward or update needs
    the host. The "aot_eager" backend traces forward and backward as inductor would, without a C compiler."""
    trials = [mixed(k, dropout=0.1 * (k % 2)) for k in range(4)]
    results = []
    for compiled in (False, True):
        pack, ids, labels = full_pack(tiny_model_dir, trials, max_rank=32)
        for i in pack.slots:
            pack.load_adapter_state(i, nonzero_b(pack.adapter_state(i), i))
        losses, update = pack.losses, pack.update
        if compiled:
            losses = torch.compile(losses, fullgraph=True, backend="aot_eager")
            update = torch.compile(update, fullgraph=True, backend="aot_eager")
        steps = []
        for _ in range(2):
            pack.model.zero_grad(set_to_none=True)
            for layer in pack._layers.values():
                layer.A.grad = layer.B.grad = None
            step = losses(ids, labels, answers=answers_per_row(labels))
            step.sum().backward()
            update(torch.ones(pack.capacity, dtype=torch.bool))
            steps.append(step.detach())
        results.append((steps, {i: pack.adapter_state(i) for i in pack.slots}))
    (eager_losses, eager_weights), (compiled_losses, compiled_weights) = results
    for eager, compiled in zip(eager_losses, compiled_losses):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    for i in eager_weights:
        close_weights(compiled_weights[i], eager_weights[i], f"slot {i} compiled")


def test_the_output_layer_of_a_packed_step_computes_logits_at_the_answer_positions_only(tiny_model_dir):
    """Each row's logits at as many positions as the row with most answer tokens has, not at
    all of its positions; the step's losses are those over every position's logits. A slot that
    adapts the output layer itself turns this off for the pack, with the same losses."""
    pack, ids, labels = full_pack(tiny_model_dir, [mixed(k, dropout=0.0) for k in range(4)])
    labels[:, :6] = -100  # answers: the last 4 of each row's 10 tokens
    head = pack.model.get_output_embeddings().base
    seen = []
    handle = head.register_forward_hook(lambda module, args, out: seen.append(tuple(args[0].shape[:2])))
    try:
        with torch.no_grad():
            answered = pack.losses(ids, labels, answers=answers_per_row(labels))
            full = pack.losses(ids, labels)
    finally:
        handle.remove()
    assert answers_per_row(labels) == 4 and seen == [(ids.shape[0], 4), (ids.shape[0], ids.shape[1])]
    torch.testing.assert_close(answered, full, rtol=1e-5, atol=1e-6)
    pack.remove(0)
    pack.add(params(["lm_head"], 4, 1, False, 1.0, 1e-3))
    with torch.no_grad():
        torch.testing.assert_close(pack.losses(ids, labels, answers=answers_per_row(labels))[1:], full[1:],
                                   rtol=1e-5, atol=1e-6)
    assert isinstance(pack.model.get_output_embeddings().base, torch.nn.Linear)  # the adapted layer, not AnswerHead


def test_trials_that_open_and_end_write_their_slots_entries_into_the_tensors_the_step_already_uses(tiny_model_dir):
    pack, ids, labels = full_pack(tiny_model_dir, [mixed(3, 0.1), mixed(0, 0.0), mixed(1, 0.2)], max_rank=32)
    vocab = pack.model.config.vocab_size

    def tensors() -> dict[str, int]:
        out = {f"{name}.{t}": getattr(layer, t).data_ptr() for name, layer in pack._layers.items()
               for t in ("A", "B", "A_avg", "B_avg", "A_avg_sq", "B_avg_sq", "scale")}
        return out | {t: getattr(pack, t).data_ptr() for t in ("learning_rate", "loraplus_ratio", "steps", "keep", "seed")}

    before = tensors()
    pack.step({i: batch(i, 2, 10, vocab) for i in pack.slots})
    pack.remove(1)
    for layer in pack._layers.values():  # an ended trial leaves an empty slot's entries: nothing in its place
        assert not layer.A[1].any() and not layer.B_avg_sq[1].any() and layer.scale[1] == 0
    assert pack.learning_rate[1] == 0 and pack.steps[1] == 0
    assert pack.add(mixed(2, 0.1)) == 1
    pack.step({i: batch(10 + i, 2, 10, vocab) for i in pack.slots})
    pack.remove(2)
    pack.step({i: batch(20 + i, 2, 10, vocab) for i in pack.slots})  # at capacity, an empty slot masked
    assert tensors() == before
    assert pack.steps.tolist() == [3, 2, 0]


def test_dropout_keeps_each_slots_share_and_its_masks_depend_on_its_own_seed_and_step(tiny_model_dir):
    pack = Pack(base(tiny_model_dir), capacity=3, warmup_steps=WARMUP, max_steps=MAX_STEPS)
    for seed, dropout in ((5, 0.1), (5, 0.3), (6, 0.3)):
        pack.add(params(**CONFIGS[0], dropout=dropout, seed=seed))
    ones = torch.ones(3, 8, 64, 256)
    kept = pack.dropped(ones, layer=0) != 0
    for slot, keep in enumerate((0.9, 0.7, 0.7)):
        assert kept[slot].float().mean().item() == pytest.approx(keep, abs=0.01)
    torch.testing.assert_close(pack.dropped(ones, layer=0)[1], ones[1] * kept[1] / 0.7)  # scaled as nn.Dropout
    assert (kept[2] != kept[1]).any()                        # another seed
    assert (pack.dropped(ones, layer=1)[1] != 0).ne(kept[1]).any()  # another layer
    pack.steps[1] += 1
    assert (pack.dropped(ones, layer=0)[1] != 0).ne(kept[1]).any()  # the next step
    pack.steps[1] -= 1
    with pack.only(1):  # the slot's masks wherever its rows are
        assert torch.equal(pack.dropped(ones[:1], layer=0)[0] != 0, kept[1])


@pytest.mark.parametrize("backend", [None, "aot_eager", "aot_eager+layers"])
def test_the_captured_step_replayed_without_a_gpu_trains_as_the_eager_step_and_is_captured_once(tiny_model_dir, backend):
    """The CUDA graph's path with the graph faked (no GPU here): the step runs over the captured
    step's static tensors, eagerly, or with `backend` through torch.compile ("aot_eager" traces
    forward, backward and update as inductor does, without a C compiler). Slots open, end and step
    unevenly; a slot's rows narrower than the captured width are padding. The capture is redone
    only for a new layer's tensors."""
    trials = [mixed(3, 0.1), mixed(0, 0.0), mixed(1, 0.2)]
    vocab = None
    runs = []
    for captured in (False, True):
        pack, _, _ = full_pack(tiny_model_dir, trials, max_rank=32)
        pack.cuda_graph = captured  # on the CPU, a pack only takes the graph's path when told to
        pack.compile_backend = backend.split("+")[0] if captured and backend else None
        pack.compile_layers = bool(backend and backend.endswith("+layers"))  # the decoder layers compiled too
        vocab = pack.model.config.vocab_size
        for i in pack.slots:
            pack.load_adapter_state(i, nonzero_b(pack.adapter_state(i), i))
        losses, captures = [], []
        plan = [({0: 10, 1: 10, 2: 10}, None), ({0: 8, 2: 10}, None), ({0: 10, 2: 6}, ("remove", 1)),
                ({0: 10, 1: 10, 2: 10}, ("add", mixed(2, 0.1))), ({1: 10, 2: 10}, None)]
        for step, (widths, change) in enumerate(plan):
            if change and change[0] == "remove":
                pack.remove(change[1])
            elif change:
                assert pack.add(change[1]) == 1
            result = pack.step({i: batch(100 * step + i, 2, w, vocab) for i, w in widths.items()})
            assert sorted(result) == sorted(widths)
            losses.append({i: float(v) for i, v in result.items()})
            captures.append(id(pack.captured))
        runs.append((losses, {i: pack.adapter_state(i) for i in pack.slots}, pack.steps.tolist(), captures))
    (eager_losses, eager_weights, eager_steps, _), (graph_losses, graph_weights, graph_steps, captures) = runs
    for eager, graph in zip(eager_losses, graph_losses):
        assert graph == pytest.approx(eager, rel=1e-5)
    assert graph_steps == eager_steps == [4, 2, 5]  # slot 1 ended after its first step; its new trial stepped twice
    # compiled, the decomposed ops round otherwise, and AdamW turns a gradient's noise near zero into
    # a step of its learning rate's size: 1e-3 of the largest weight, below one step's 1e-3 learning rate
    for i in eager_weights:
        close_weights(graph_weights[i], eager_weights[i], f"slot {i} captured", 1e-5 if backend is None else 1e-3)
    assert len(set(captures)) == 1, "slots opening, ending and narrower batches must not capture the step again"
    # a slot that adapts a layer no slot adapted before makes new tensors: the step is captured again
    pack.remove(0)
    pack.add(params(["lm_head"], 4, 1, False, 1.0, 1e-3))
    pack.step({0: batch(7, 2, 10, vocab)})
    assert id(pack.captured) != captures[-1]


def test_a_capture_that_runs_out_of_memory_is_made_in_passes_of_fewer_slots_and_trains_the_same_with_a_fake_gpu_error(
        tiny_model_dir, monkeypatch, caplog):
    """The out-of-memory error is raised by a stand-in (there is no GPU here) for a pass of more than
    two of the four slots, as the capture's warm-up meets it: the step is captured again in two
    passes of two, trains each slot as the capture of one pass does, dropout's masks included,
    and is not captured again at the next steps."""
    captured_in_passes(tiny_model_dir, monkeypatch, caplog, backend=None)


def test_a_capture_with_compiled_layers_that_runs_out_of_memory_is_made_in_passes_and_trains_the_same_with_a_fake_gpu_error(
        tiny_model_dir, monkeypatch, caplog):
    """As above with the decoder layers compiled ("aot_eager" traces as inductor does): each pass's
    layers take their slots' matrices by the pass's selection, inside the compiled code."""
    captured_in_passes(tiny_model_dir, monkeypatch, caplog, backend="aot_eager")


def captured_in_passes(tiny_model_dir, monkeypatch, caplog, backend: str | None) -> None:
    trials = [mixed(k, dropout=0.1 * (k % 2)) for k in range(4)]

    selections = []  # the slot selections the step's passes read, as weak references

    def run(limit: int | None):
        pack, _, _ = full_pack(tiny_model_dir, trials, max_rank=32)
        pack.cuda_graph = True  # on the CPU, a pack only takes the graph's path when told to
        pack.compile_backend = backend
        pack.compile_layers = backend is not None
        for i in pack.slots:
            pack.load_adapter_state(i, nonzero_b(pack.adapter_state(i), i))
        if limit:
            real = pack.losses

            def limited(*args, **kwargs):
                if pack.selection is not None:
                    selections.append(weakref.ref(pack.selection))
                selected = pack.capacity if pack.selection is None else len(pack.selection)
                if selected > limit:
                    raise torch.OutOfMemoryError("CUDA out of memory (stand-in)")
                return real(*args, **kwargs)

            monkeypatch.setattr(pack, "losses", limited)
        vocab = pack.model.config.vocab_size
        losses, captures = [], []
        for step in range(3):
            widths = {0: 10, 1: 8, 2: 10, 3: 6} if step != 1 else {0: 10, 2: 10}
            result = pack.step({i: batch(100 * step + i, 2, w, vocab) for i, w in widths.items()})
            losses.append({i: float(v) for i, v in result.items()})
            captures.append(id(pack.captured))
        return pack, losses, {i: pack.adapter_state(i) for i in pack.slots}, captures

    whole, whole_losses, whole_weights, _ = run(None)
    caplog.set_level(logging.WARNING, logger="trainables.packed")
    split, split_losses, split_weights, captures = run(2)
    assert (whole.captured.pass_slots, split.captured.pass_slots, split.pass_slots) == (4, 2, 2)
    assert split.cuda_graph and split._layers_compiled == (backend is not None), "the capture must not give up its graph"
    assert len(set(captures)) == 1, "the capture in passes of two must serve every later step"
    assert [r.getMessage() for r in caplog.records if "ran out of GPU memory" in r.getMessage()] == [
        "the packed step ran out of GPU memory before its capture with 4 slots a pass (CUDA out of memory (stand-in)); "
        "the pack captures it with 2 a pass"]
    # a CUDA graph holds no Python object: with the replay standing for the graph's, what the capture
    # read and nothing else holds must still be alive (the passes' slot selections, made before it)
    assert len({id(ref()) for ref in selections}) == 2, "two passes of two slots, each read by its selection"
    split.captured.replay = lambda: None
    gc.collect()
    assert all(ref() is not None for ref in selections), "a selection the graph reads was freed"
    for whole_step, split_step in zip(whole_losses, split_losses):
        assert split_step == pytest.approx(whole_step, rel=1e-5)
    for i in whole_weights:
        close_weights(split_weights[i], whole_weights[i], f"slot {i} in passes of two", 1e-5 if backend is None else 1e-3)
    assert split.steps.tolist() == [3, 2, 3, 2]


def test_a_pack_told_its_rows_captures_its_step_once_as_batches_widen(tiny_model_dir):
    """A pack sized by the batches it has seen captures its step again for each wider batch, or
    one with more answer tokens, as in a search's first steps; told the rows its trials draw from
    (`reserve`, as the shared trainer does with its data) it captures once, and steps as the pack
    that captured as it went."""
    trials = [mixed(3, 0.0), mixed(0, 0.0)]
    widths = [6, 8, 12, 9]  # the batches widen: 12 is the data's widest row
    runs = []
    for reserved in (False, True):
        pack, _, _ = full_pack(tiny_model_dir, trials, max_rank=32)
        pack.cuda_graph = True  # on the CPU, a pack only takes the graph's path when told to
        vocab = pack.model.config.vocab_size
        for i in pack.slots:
            pack.load_adapter_state(i, nonzero_b(pack.adapter_state(i), i))
        steps = [{i: batch(10 * step + i, 2, width, vocab) for i in pack.slots} for step, width in enumerate(widths)]
        if reserved:
            pack.reserve((ids.tolist(), labels.tolist()) for step in steps for ids, labels in step.values()
                         for ids, labels in zip(ids, labels))
        losses, captures = [], []
        for step in steps:
            losses.append({i: float(v) for i, v in pack.step(step).items()})
            captures.append(id(pack.captured))
        runs.append((losses, captures, {i: pack.adapter_state(i) for i in pack.slots}))
    (grown_losses, grown, grown_weights), (reserved_losses, once, reserved_weights) = runs
    assert len(set(grown)) > 1  # without the reservation a wider batch captures again
    assert len(set(once)) == 1
    for a, b in zip(grown_losses, reserved_losses):
        assert b == pytest.approx(a, rel=1e-5)
    # wider padding sums the matmuls in another order; after four steps AdamW has turned that
    # rounding, in a gradient near zero, into a fraction of a step of its learning rate
    for i in grown_weights:
        close_weights(reserved_weights[i], grown_weights[i], f"slot {i} reserved", 1e-4)


def test_a_pack_prepared_for_the_spaces_module_sets_opens_every_trial_into_one_capture_made_before_any(tiny_model_dir):
    """Trials of four module sets open one after another. A pack that makes each trial's layers as
    it opens captures its step again for each set it has not seen; one prepared for the space's
    sets (`prepare`, as the shared trainer does before its first trial) captures once, before
    any trial, and its slots step as the other pack's to the last digit: a layer no slot adapts
    adds zeros."""
    sets = [config["target_modules"] for config in CONFIGS]
    runs = []
    for prepared in (False, True):
        pack = Pack(base(tiny_model_dir), capacity=4, warmup_steps=WARMUP, max_steps=MAX_STEPS, max_rank=32)
        pack.cuda_graph = True  # on the CPU, a pack only takes the graph's path when told to
        vocab = pack.model.config.vocab_size
        pack.reserve([([1] * 10, [IGNORE] * 4 + [1] * 6)])
        if prepared:
            pack.prepare(sets, rows=2)
            assert pack.captured is not None and pack.slots == {}
        losses, captures = [], [pack.captured]  # held, so that no two captures share an id
        for step in range(4):
            assert pack.add(mixed(step, 0.0)) == step
            result = pack.step({i: batch(10 * step + i, 2, 10, vocab) for i in pack.slots})
            losses.append({i: float(v) for i, v in result.items()})
            captures.append(pack.captured)
        runs.append((losses, captures, {i: pack.adapter_state(i) for i in pack.slots}))
    (grown_losses, grown, grown_weights), (prepared_losses, once, prepared_weights) = runs
    # each trial that adapts layers no earlier one did captures again: the fourth adapts the first three's
    assert len({id(c) for c in grown[1:]}) == 3
    assert len({id(c) for c in once}) == 1
    assert prepared_losses == grown_losses
    for i in grown_weights:
        close_weights(prepared_weights[i], grown_weights[i], f"slot {i} prepared", 0.0)


def test_a_slot_without_dropout_keeps_every_element_whatever_its_hash_and_one_with_keeps_its_share():
    """A slot without dropout shares the pack's dropout with slots that have it, at keep 1: every
    element must be kept, the hashes nearest 2**32 too (as a float32 they round to 1.0, which is
    not below 1). A slot's share of kept elements over evenly spread hashes is its keep."""
    from trainables.packed import _kept

    top = torch.tensor([2**32 - 1, 2**32 - 2**7, 2**32 - 2**8, 0], dtype=torch.int64)
    assert _kept(top, torch.tensor(1.0)).all()
    spread = torch.arange(0, 2**32, 2**16, dtype=torch.int64)  # 65,536 evenly spread hashes
    for keep in (0.5, 0.9, 0.95):
        assert _kept(spread, torch.tensor(keep)).float().mean().item() == pytest.approx(keep, abs=1e-4)


def test_a_pack_that_reserved_dropout_captures_once_as_slots_with_and_without_it_come_and_go(tiny_model_dir):
    """Dropout turning on or off for the pack captured its step again (and with compiled layers,
    compiled them again): as a slot with dropout joined one without, and again when it left.
    Reserved (`reserve(..., dropout=True)`, as the shared trainer does for a space with dropout),
    the masks are drawn from the first capture, the slot without dropout keeps every element,
    and its losses are those of the pack that captured as it went, to the last digit."""
    runs = []
    for reserved in (False, True):
        pack = Pack(base(tiny_model_dir), capacity=2, warmup_steps=WARMUP, max_steps=MAX_STEPS, max_rank=32)
        pack.cuda_graph = True  # on the CPU, a pack only takes the graph's path when told to
        vocab = pack.model.config.vocab_size
        assert pack.add(mixed(3, 0.0)) == 0
        if reserved:
            pack.reserve([], dropout=True)
        losses, captures = [], []
        for step, change in enumerate([None, ("add", mixed(0, 0.1)), ("remove", 1), None]):
            if change and change[0] == "add":
                assert pack.add(change[1]) == 1
            elif change:
                pack.remove(change[1])
            result = pack.step({i: batch(10 * step + i, 2, 10, vocab) for i in pack.slots})
            losses.append(float(result[0]))
            captures.append(id(pack.captured))
        runs.append((losses, captures))
    (grown_losses, grown), (reserved_losses, once) = runs
    assert len(set(grown)) > 1  # without the reservation, dropout turning on captures again
    assert len(set(once)) == 1
    assert reserved_losses == grown_losses


def test_inductors_warm_up_makes_no_cpu_kernel_of_its_own_so_an_empty_cache_costs_it_no_cpp_compile(tmp_path):
    """The shared trainer's process warms inductor on the CPU while it waits for the driver's go; a
    GPU's step never compiles C++, so the warm-up must not either (with an empty cache a fused CPU
    kernel's compile made it 46 s on an H100's host). Run with a cache of its own, it must have
    compiled through inductor (its graph in the cache) and left no C++ source or library there."""
    cache = tmp_path / "inductor"
    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-c", "from trainables.packed import warm_inductor; warm_inductor()"], check=True,
                   cwd=root, env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache), "PYTHONPATH": str(root)})
    assert any((cache / "fxgraph").rglob("*")), "the warm-up compiled nothing through inductor"
    assert sorted(p.name for p in cache.rglob("*") if p.suffix in (".cpp", ".so")) == []


def test_a_capture_that_fails_in_the_capture_itself_leaves_the_pack_eager_without_another_capture(tiny_model_dir,
                                                                                                     caplog):
    """Running out of memory in the warm-up before a capture halves the slots a pass and captures
    again; the same error raised by the capture itself (CaptureFailed: no GPU here, the error is
    made by hand) leaves the pack stepping eagerly, its passes as they were: a failed capture can
    leave its memory pool held, and another graph of the process is not worth its risk."""
    pack, _, _ = full_pack(tiny_model_dir, [mixed(k, dropout=0.0) for k in range(4)])
    pack.cuda_graph = True
    oom = torch.OutOfMemoryError("CUDA out of memory (stand-in)")
    assert pack._capture_failed(oom) is True and (pack.pass_slots, pack.cuda_graph) == (2, True)
    try:
        raise CaptureFailed("CUDA out of memory (stand-in)") from oom
    except CaptureFailed as failed:
        assert pack._capture_failed(failed) is False
    assert (pack.pass_slots, pack.cuda_graph) == (2, False)
    assert "the packed step's capture failed (OutOfMemoryError: CUDA out of memory (stand-in)); the pack steps " \
           "eagerly" in caplog.text
