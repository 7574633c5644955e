"""A trial's optimizer and learning-rate schedule, the same in both trainers: AdamW with PEFT's
LoRA+ groups, and linear warm-up then cosine decay.

The groups come from PEFT (`create_loraplus_optimizer`) in both: for a per-process trial over
its PEFT model, for a shared trainer's slot over `SlotWeights`, whose parameter names carry
PEFT's `lora_A` and `lora_B`. So the two optimizers' state dicts have the same groups in the
same order, and a checkpoint of either trainer continues in the other.
"""

from __future__ import annotations

import math

import torch
from torch import nn

BETAS, EPS = (0.9, 0.999), 1e-8  # torch's AdamW defaults, named for the shared trainer's own update
# What `loraplus_adamw` and `warmup_cosine` do, in words: the run records them (run_config.json's
# `training`) for the report's recipe of the pick.
OPTIMIZER = ("AdamW (weight decay 0, torch's default betas and eps) with PEFT's LoRA+ groups: lora_B at "
             "loraplus_lr_ratio times the learning rate, lora_A at the learning rate; one optimizer step per batch "
             "of budget.batch_size sequences, no gradient accumulation")
SCHEDULE = ("linear warm-up over budget.warmup_steps, then cosine decay to 10% of the learning rate at "
            "budget.max_steps")


def loraplus_adamw(model: nn.Module, learning_rate: float, loraplus_lr_ratio: float, cuda: bool) -> torch.optim.Optimizer:
    """AdamW with PEFT's LoRA+ groups: `lora_B` and every one-dimensional parameter (DoRA's
    magnitudes) at `learning_rate * loraplus_lr_ratio`, the rest (`lora_A`) at `learning_rate`.
    PEFT's group for LoRA on embeddings, at a fixed rate of its own, stays empty: the search
    adapts only Linear and Conv1D layers (search/inputs/modules.py)."""
    from peft.optimizers import create_loraplus_optimizer

    # on CPU, the multi-tensor kernels: torch chooses them by itself on GPU only
    return create_loraplus_optimizer(model, torch.optim.AdamW, lr=learning_rate, loraplus_lr_ratio=loraplus_lr_ratio,
                                     betas=BETAS, eps=EPS, weight_decay=0.0, fused=cuda, foreach=None if cuda else True)


class SlotWeights(nn.Module):
    """A shared trainer's slot's adapter weights under names that carry PEFT's (`lora_A_<i>`,
    `lora_B_<i>`), layer by layer in the model's order: what `loraplus_adamw` groups as it groups a
    PEFT model's. One module, not one a layer: a checkpoint makes one, and 200 modules' construction
    was a quarter of its Python."""

    def __init__(self, pairs: list[tuple[nn.Parameter, nn.Parameter]]):
        super().__init__()
        for i, (A, B) in enumerate(pairs):
            self.register_parameter(f"lora_A_{i}", A)
            self.register_parameter(f"lora_B_{i}", B)


def schedule_factor(step: torch.Tensor, warmup_steps: int, max_steps: int) -> torch.Tensor:
    """The learning rate's factor after `step` scheduler steps (a float64 tensor, elementwise):
    linear warm-up, then cosine decay to 10% at max_steps. The same for every trial, so trials
    compared at a rung saw the same schedule; the shared trainer takes it for all its slots at once."""
    fraction = ((step - warmup_steps) / max(1, max_steps - warmup_steps)).clamp(max=1.0)
    decay = 0.1 + 0.9 * 0.5 * (1 + torch.cos(math.pi * fraction))
    return torch.where(step < warmup_steps, (step + 1) / warmup_steps, decay)


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, max_steps: int,
                  steps_taken: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """`schedule_factor` as the optimizer's schedule, `steps_taken` steps into it."""
    if steps_taken:  # torch's schedulers start part-way only from each group's recorded initial rate
        for group in optimizer.param_groups:
            group["initial_lr"] = group["lr"]
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: schedule_factor(torch.tensor(step, dtype=torch.float64), warmup_steps, max_steps).item(),
        last_epoch=steps_taken - 1)
