"""The trial's optimizer is PEFT's LoRA+ AdamW, and its checkpoint continues a trial as if it had
never stopped. Tiny random-init Llama (tests/conftest.py), on the CPU."""

from __future__ import annotations

import zlib

import pytest
import torch

from trainables.metrics import Progress
from trainables.optim import loraplus_adamw, warmup_cosine
from trainables.trial import checkpoint, restore

LR, RATIO = 1e-3, 16.0


def adapted(tiny_model_dir, use_dora: bool):
    """A fresh LoRA (or DoRA) adapter on the tiny Llama, the same on every call."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    return get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                           use_dora=use_dora))


def lr_by_name(model, optimizer) -> dict[str, float]:
    names = {id(p): name for name, p in model.named_parameters()}
    return {names[id(p)]: group["lr"] for group in optimizer.param_groups for p in group["params"]}


def step_with_gradients(model, optimizer, k: int) -> None:
    """One optimizer step from gradients that depend only on the parameter's name and k."""
    for name, p in model.named_parameters():
        if p.requires_grad:
            g = torch.Generator().manual_seed(zlib.crc32(f"{name} {k}".encode()))
            p.grad = torch.randn(p.shape, generator=g)
    optimizer.step()


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_the_optimizer_has_the_parameter_groups_of_peft_loraplus(tiny_model_dir, use_dora):
    from peft.optimizers import create_loraplus_optimizer

    model = adapted(tiny_model_dir, use_dora)
    names = {id(p): name for name, p in model.named_parameters()}
    ours = loraplus_adamw(model, LR, RATIO, cuda=False)
    peft = create_loraplus_optimizer(model, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=RATIO)
    assert [([names[id(p)] for p in g["params"]], g["lr"], g["weight_decay"]) for g in ours.param_groups] == \
           [([names[id(p)] for p in g["params"]], g["lr"], g["weight_decay"]) for g in peft.param_groups]


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_loraplus_trains_b_and_doras_magnitudes_ratio_times_faster_than_a(tiny_model_dir, use_dora):
    """PEFT's rule: lora_B and every one-dimensional parameter (DoRA's magnitude vectors) at
    B's rate; lora_A at the learning rate."""
    model = adapted(tiny_model_dir, use_dora)
    rates = lr_by_name(model, loraplus_adamw(model, LR, RATIO, cuda=False))
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert sorted(rates) == sorted(trainable)  # each trainable parameter in exactly one group
    magnitudes = [name for name in trainable if "lora_magnitude_vector" in name]
    assert len(magnitudes) == (6 if use_dora else 0)  # 3 adapted layers x 2 decoder layers
    for name in trainable:
        fast = "lora_B" in name or "lora_magnitude_vector" in name
        assert rates[name] == pytest.approx(LR * RATIO if fast else LR), name


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_a_loraplus_ratio_of_one_steps_exactly_as_plain_adamw(tiny_model_dir, use_dora):
    ours, plain = adapted(tiny_model_dir, use_dora), adapted(tiny_model_dir, use_dora)
    ours_optimizer = loraplus_adamw(ours, LR, 1.0, cuda=False)
    plain_optimizer = torch.optim.AdamW([p for p in plain.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    for k in range(3):
        step_with_gradients(ours, ours_optimizer, k)
        step_with_gradients(plain, plain_optimizer, k)
    trained = dict(plain.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p, trained[name], rtol=0, atol=0, msg=name)


@pytest.mark.filterwarnings("ignore:`get_checkpoint` is meant to only be called:UserWarning")  # no Tune session here
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_a_trial_restored_from_its_checkpoint_takes_the_step_it_would_have_taken(tiny_model_dir, tmp_path, use_dora):
    """Adapter, optimizer state (both LoRA+ rates), learning-rate schedule and counters all continue."""

    def trial():
        model = adapted(tiny_model_dir, use_dora)
        optimizer = loraplus_adamw(model, LR, RATIO, cuda=False)
        return model, optimizer, warmup_cosine(optimizer, 2, 10)

    model, optimizer, scheduler = trial()
    for k in range(3):
        step_with_gradients(model, optimizer, k)
        scheduler.step()
    checkpoint(model, optimizer, scheduler,
               Progress(called_at=1.0, imported_at=2.0, step=3, train_seconds=1.5, eval_seconds=0.5,
                        generate_seconds=0.25, tokens=321)).save(tmp_path)
    for k in (3, 4):
        step_with_gradients(model, optimizer, k)
        scheduler.step()

    restored, restored_optimizer, restored_scheduler = trial()
    progress = Progress(called_at=10.0, imported_at=11.0)
    restore(restored, restored_optimizer, restored_scheduler, str(tmp_path), progress)
    assert progress == Progress(called_at=10.0, imported_at=11.0, step=3, train_seconds=1.5, eval_seconds=0.5,
                                generate_seconds=0.25, tokens=321)  # this call's clock readings, the checkpoint's counters
    for k in (3, 4):
        step_with_gradients(restored, restored_optimizer, k)
        restored_scheduler.step()
    uninterrupted = dict(model.named_parameters())
    for name, p in restored.named_parameters():
        torch.testing.assert_close(p, uninterrupted[name], msg=name)


def test_a_report_gives_the_timings_under_the_names_the_benchmarks_read():
    progress = Progress(called_at=1.0, imported_at=2.0, busy_from=3.0, step=4, train_seconds=2.0, eval_seconds=0.5,
                        generate_seconds=0.25, tokens=100)
    metrics = progress.metrics()
    assert metrics["busy_to"] >= 3.0
    assert {k: v for k, v in metrics.items() if k not in ("busy_to", "worker_started_at")} == {
        "step": 4, "train_seconds": 2.0, "tokens_per_second": 50.0, "eval_seconds": 0.5, "eval_generate_seconds": 0.25,
        "busy_from": 3.0, "called_at": 1.0, "entered_at": 2.0}
