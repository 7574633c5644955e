"""Many LoRA adapters on one frozen base model, trained together: a `Pack`.

The base model is loaded once; each slot holds one trial's adapter. A packed step concatenates
the slots' micro-batches along the batch dimension, runs every base layer once over all rows,
and adds each slot's low-rank path to its own rows only (mLoRA's layout, arXiv 2312.02515: any
rank, no padding, a layer a slot does not adapt adds nothing to its rows). Nothing in a decoder
mixes the rows of a batch, so a slot's loss, gradients and update are those of its adapter
trained alone; tests/test_packed.py holds them to PEFT's own model with the same `LoraConfig`.

Per slot: its `target_modules`, rank, `lora_alpha` with the plain or RSLoRA scale, dropout with
masks from the slot's own generator, its AdamW with PEFT's LoRA+ groups (A at the learning rate,
B at `learning_rate * loraplus_lr_ratio`) and the warm-up and cosine schedule by its own step
count. PEFT cannot do this itself: its mixed-adapter batches (`adapter_names`) refuse training
mode (huggingface/peft#631), so the adapted layers are this module's own. DoRA (a merged weight
per adapter for its norm), Conv1D layers (GPT-2) and LoRA biases are refused: such a trial
trains in its own process (`resources.packing=processes`).

A slot's checkpoint (`checkpoint`) has a per-process trial's format (trainables/checkpoint.py):
`PeftModel.from_pretrained` loads its adapter as any adapter the search exports.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from rundir.params import TrialParams
from trainables.checkpoint import SLOT, TrialCheckpoint, adapter_config
from trainables.data import IGNORE
from trainables.metrics import Progress
from trainables.optim import SlotWeights, loraplus_adamw, warmup_cosine
from trainables.step import shifted_cross_entropy


class SlotOutOfMemory(RuntimeError):
    """A pass of one slot alone ran out of GPU memory: that trial cannot train beside the base."""

    def __init__(self, slot: int, message: str):
        super().__init__(message)
        self.slot = slot


@dataclass
class _Adapter:
    """One slot's adapter on one layer."""

    A: nn.Parameter  # (r, in_features)
    B: nn.Parameter  # (out_features, r)
    scale: float
    dropout: float
    generator: torch.Generator


class PackedLinear(nn.Module):
    """A frozen `nn.Linear` plus the adapters of the slots that adapt it. The rows each slot owns
    in the current batch come from the pack's router (`Pack.routes`)."""

    def __init__(self, base: nn.Linear, router: Pack):
        super().__init__()
        self.base = base
        object.__setattr__(self, "router", router)  # not a submodule: the pack owns the model
        self.adapters: dict[int, _Adapter] = {}     # by slot; their parameters belong to the slots' optimizers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        for slot, start, end, width in self.router.routes_for(x):
            adapter = self.adapters.get(slot)
            if adapter is None:
                continue
            rows = x[start:end]
            if adapter.dropout and self.training:
                # drawn over the slot's own width, then padded: the pack's width depends on its neighbours
                keep = torch.empty((end - start, width, *rows.shape[2:]), dtype=rows.dtype, device=rows.device)
                keep.bernoulli_(1 - adapter.dropout, generator=adapter.generator)
                keep = nn.functional.pad(keep, (0, 0, 0, rows.shape[1] - width), value=1.0)
                rows = rows * keep / (1 - adapter.dropout)
            # in place on the base output's rows: its backward needs x and the weight, never out
            out[start:end] += nn.functional.linear(nn.functional.linear(rows, adapter.A), adapter.B) * adapter.scale
        return out


@dataclass
class Slot:
    """What one slot trains: the trial's parameters, its adapted layers by module name, its
    optimizer and schedule, and the generator of its dropout masks."""

    params: TrialParams
    layers: dict[str, PackedLinear]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    generator: torch.Generator
    index: int

    def named_weights(self):
        """(PEFT's state-dict key, tensor) of each adapter weight, in the layers' order."""
        for name, layer in self.layers.items():
            adapter = layer.adapters[self.index]
            yield f"base_model.model.{name}.lora_A.weight", adapter.A
            yield f"base_model.model.{name}.lora_B.weight", adapter.B


class Pack:
    """`model` (a causal LM, frozen, on its device) with up to `capacity` adapter slots.

    `add` fills a free slot with a trial's adapter, `remove` frees it at once; `step` trains the
    slots given a batch each, together; `only(slot)` makes the model one slot's adapted model
    for every row (evaluation, generation)."""

    def __init__(self, model: nn.Module, capacity: int, warmup_steps: int, max_steps: int):
        self.model, self.capacity = model, capacity
        self.warmup_steps, self.max_steps = warmup_steps, max_steps
        self.slots: dict[int, Slot] = {}
        self.routes: list[tuple[int, int, int, int]] = []
        self.single: int | None = None
        self.device = next(model.parameters()).device
        self.pass_slots = capacity  # slots per forward/backward pass: halved after running out of memory
        self._layers: dict[str, PackedLinear] = {}
        unpack(model)  # a process's cached base model may still hold an earlier pack's layers


    # -- routing ---------------------------------------------------------------------------
    def routes_for(self, x: torch.Tensor) -> list[tuple[int, int, int, int]]:
        """(slot, first row, end row, the slot's own sequence width) for each slot in `x`."""
        return [(self.single, 0, x.shape[0], x.shape[1])] if self.single is not None else self.routes

    @contextmanager
    def only(self, slot: int):
        """Every row through `slot`'s adapter alone: the model is that trial's adapted model."""
        self.single = slot
        try:
            yield self.model
        finally:
            self.single = None

    # -- slots -----------------------------------------------------------------------------
    def free_slots(self) -> list[int]:
        return [i for i in range(self.capacity) if i not in self.slots]

    def add(self, params: TrialParams) -> int:
        """Fill a free slot with `params`' adapter (A drawn as PEFT draws it, B zero, from a
        generator seeded with the trial's seed), optimizer and schedule; its index. ValueError
        for what the pack cannot train, or when no slot is free."""
        from peft import LoraConfig
        from peft.tuners.tuners_utils import check_target_module_exists

        config = LoraConfig(**params.lora_config)
        problem = _unsupported(config)
        if problem:
            raise ValueError(f"{problem}; such a trial trains in its own process: set resources.packing=processes")
        free = self.free_slots()
        if not free:
            raise ValueError(f"all {self.capacity} slots of the pack are taken")
        index = free[0]
        wrapped = {id(layer.base) for layer in self._layers.values()}  # seen as their PackedLinear
        targets = [(name, module) for name, module in self.model.named_modules()
                   if name and id(module) not in wrapped and check_target_module_exists(config, name)]
        if not targets:
            raise ValueError(f"target_modules {config.target_modules} names no layer of the model")
        wrong = [name for name, module in targets if not isinstance(module, (nn.Linear, PackedLinear))]
        if wrong:
            raise ValueError(f"the shared trainer adapts torch.nn.Linear layers only; {wrong[0]} is "
                             f"{type(_plain(self.model, wrong[0])).__name__}: set resources.packing=processes")
        generator = torch.Generator(device=self.device).manual_seed(params.seed)
        init = torch.Generator().manual_seed(params.seed)  # on the CPU: the same weights on any device
        scale = config.lora_alpha / (math.sqrt(config.r) if config.use_rslora else config.r)
        layers: dict[str, PackedLinear] = {}
        for name, _ in targets:
            layer = self._wrap(name)
            base = layer.base
            A = torch.empty(config.r, base.in_features, dtype=torch.float32)
            nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=init)
            A = nn.Parameter(A.to(self.device))
            B = nn.Parameter(torch.zeros(base.out_features, config.r, dtype=torch.float32, device=self.device))
            layer.adapters[index] = _Adapter(A, B, scale, config.lora_dropout, generator)
            layers[name] = layer
        weights = SlotWeights([(layer.adapters[index].A, layer.adapters[index].B) for layer in layers.values()])
        optimizer = loraplus_adamw(weights, params.learning_rate, params.loraplus_lr_ratio, self.device.type == "cuda")
        scheduler = warmup_cosine(optimizer, self.warmup_steps, self.max_steps)
        self.slots[index] = Slot(params, layers, optimizer, scheduler, generator, index)
        return index

    def remove(self, index: int) -> None:
        """Free slot `index` (its adapter, optimizer state and gradients) at once."""
        slot = self.slots.pop(index, None)
        if slot is None:
            return
        for layer in slot.layers.values():
            layer.adapters.pop(index, None)

    def _wrap(self, name: str) -> PackedLinear:
        """The packed layer at `name`, put in place of the model's Linear the first time a slot adapts it."""
        if name in self._layers:
            return self._layers[name]
        parent_name, _, child = name.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        layer = PackedLinear(getattr(parent, child), self)
        setattr(parent, child, layer)
        self._layers[name] = layer
        return layer

    def trainable_params(self, index: int) -> int:
        return sum(p.numel() for _, p in self.slots[index].named_weights())

    # -- training --------------------------------------------------------------------------
    def step(self, batches: dict[int, tuple[torch.Tensor, torch.Tensor]], autocast=None) -> dict[int, torch.Tensor]:
        """One optimizer step for each slot in `batches` (slot -> (input_ids, labels), right-padded,
        on the pack's device): its loss, left on the device (a NaN or infinite one is the caller's
        to act on; it touched nothing but its own slot's rows and weights). Slots go through the
        model `pass_slots` at a time; a pass that runs out of GPU memory is split in two and run
        again, down to one slot a pass (the gradients of each slot are its own either way); a
        slot that does not fit alone raises SlotOutOfMemory, and no slot steps."""
        order = sorted(batches)
        losses: dict[int, torch.Tensor] = {}
        start = 0
        while start < len(order):
            chunk = order[start:start + self.pass_slots]
            try:
                losses.update(self._pass({i: batches[i] for i in chunk}, autocast))
            except torch.OutOfMemoryError as error:
                if len(chunk) == 1:
                    self._zero_grad(order)  # no slot steps: the passes before this one are dropped too
                    raise SlotOutOfMemory(chunk[0], str(error)) from error
                self._zero_grad(chunk)
                self.pass_slots = max(1, len(chunk) // 2)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            start += len(chunk)
        for i in order:
            slot = self.slots[i]
            slot.optimizer.step()
            slot.scheduler.step()
        self._zero_grad(order)
        return losses

    def _pass(self, batches: dict[int, tuple[torch.Tensor, torch.Tensor]], autocast) -> dict[int, torch.Tensor]:
        width = max(ids.shape[1] for ids, _ in batches.values())
        ids, labels, self.routes, row = [], [], [], 0
        for i, (slot_ids, slot_labels) in batches.items():
            extra = width - slot_ids.shape[1]
            # any id pads: it sits after every real token (causal attention) and carries no label
            ids.append(nn.functional.pad(slot_ids, (0, extra), value=0))
            labels.append(nn.functional.pad(slot_labels, (0, extra), value=IGNORE))
            self.routes.append((i, row, row + slot_ids.shape[0], slot_ids.shape[1]))
            row += slot_ids.shape[0]
        try:
            with autocast or torch.autocast(self.device.type, enabled=False):
                logits = self.model(input_ids=torch.cat(ids)).logits
            labels = torch.cat(labels)
            losses = {i: shifted_cross_entropy(logits[start:end], labels[start:end]) for i, start, end, _ in self.routes}
        finally:
            self.routes = []
        # each slot's gradients are those of its own loss: no parameter is shared between slots
        torch.stack([loss for loss in losses.values()]).sum().backward()
        return {i: loss.detach() for i, loss in losses.items()}

    def _zero_grad(self, indices) -> None:
        for i in indices:
            self.slots[i].optimizer.zero_grad(set_to_none=True)

    # -- state -----------------------------------------------------------------------------
    def adapter_state(self, index: int) -> dict[str, torch.Tensor]:
        """The slot's adapter as PEFT's state dict (keys without the adapter name), on the CPU."""
        return {key: weight.detach().to("cpu", copy=True).contiguous()
                for key, weight in self.slots[index].named_weights()}

    def load_adapter_state(self, index: int, state: dict[str, torch.Tensor]) -> None:
        weights = dict(self.slots[index].named_weights())
        missing = sorted(set(weights) - set(state))
        if missing:
            raise ValueError(f"the checkpoint's adapter lacks {missing[0]} (and {len(missing) - 1} more)")
        with torch.no_grad():
            for key, weight in weights.items():
                weight.copy_(state[key])

    def checkpoint(self, index: int, progress: Progress, base_model_name_or_path: str) -> TrialCheckpoint:
        """The slot's checkpoint at `progress`, its adapter as PEFT saves one on the base model."""
        slot = self.slots[index]
        from peft import LoraConfig

        return TrialCheckpoint.take(progress, self.adapter_state(index),
                                    adapter_config(LoraConfig(**slot.params.lora_config), base_model_name_or_path),
                                    slot.optimizer, slot.scheduler, [slot.generator.get_state()], SLOT)

    def restore(self, index: int, checkpoint: TrialCheckpoint, progress: Progress) -> None:
        """Continue the slot and `progress` from `checkpoint`, of a slot or of a per-process trial
        (whose dropout generators a slot has not: its masks are drawn afresh)."""
        self.load_adapter_state(index, checkpoint.adapter)
        slot = self.slots[index]
        checkpoint.restore(slot.optimizer, slot.scheduler, progress)
        if checkpoint.dropout_rng_of == SLOT:
            slot.generator.set_state(checkpoint.dropout_rng[0])


def unpack(model: nn.Module) -> None:
    """Put every packed layer's own Linear back in its place: the model as it was loaded."""
    packed = [(name, module) for name, module in model.named_modules() if isinstance(module, PackedLinear)]
    for name, module in packed:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, module.base)


def _unsupported(config) -> str | None:
    if config.use_dora:
        return "DoRA needs its own merged weight per adapter for its norm, which a shared base cannot hold"
    if config.fan_in_fan_out:
        return "Conv1D layers (fan_in_fan_out, GPT-2) are not packed"
    if config.bias != "none":
        return f"lora bias {config.bias!r} is not packed"
    return None


def _plain(model: nn.Module, name: str) -> nn.Module:
    module = model.get_submodule(name)
    return module.base if isinstance(module, PackedLinear) else module
