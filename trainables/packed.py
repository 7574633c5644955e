"""Many LoRA adapters on one frozen base model, trained together: a `Pack`.

The base model is loaded once; each of `capacity` slots holds one trial's adapter. A packed step
puts the slots' micro-batches side by side (slot k's rows are the k-th block of the batch), runs
every base layer once over all rows, and adds every slot's low-rank path in a fixed number of
batched operations, whatever the number of slots (Punica's and LoRAFusion's layout rather than a
loop over adapters): each adapted layer holds the slots' A and B stacked, `[capacity, rank, in]`
and B transposed, `[capacity, rank, out]` (a slot's part of either is then contiguous: its
checkpoint leaves the pack in one copy), ranks padded to the layer's largest with zeros that stay
zero (their gradients are exact zeros), and each slot's scale as an entry of a tensor, 0 for a slot
that does not adapt the layer or holds no trial. Nothing in a decoder mixes the rows of a batch,
so a slot's loss, gradients and update are those of its adapter trained alone; tests/test_packed.py
holds them to PEFT's own model with the same `LoraConfig`.

One AdamW update serves all slots (`update`): each slot's learning rate, LoRA+ ratio (PEFT's
LoRA+: B at `learning_rate * loraplus_lr_ratio`), step count and warm-up and cosine schedule are
entries of tensors, so the update is the same operations for one slot or thirty-two. Dropout keeps
each element with the slot's own probability, drawn for all slots at once from a hash of the
slot's seed and step, the layer and the element's place in the slot's own rows: no slot's masks
depend on another's, and a resumed slot draws the masks it would have drawn.

The step runs at capacity: an empty slot's rows are padding, its scale 0 and its learning rate 0,
and a trial that opens, ends or fails writes its slot's entries into the same tensors, so the
step's shapes and operations stay those of the first step. On a GPU (`cuda_graph`) the whole
step, forward, backward and update, is captured once as a CUDA graph and replayed: the batches
are copied into the graph's own input tensors (every slot's rows padded to the widest row of
the trials' data, which the trainer `reserve`s, or else of the batches seen), which slots step
is a mask in a device tensor, and nothing in the step waits for the host. Where one pass of
every slot's rows does not fit in the GPU's memory, the graph holds passes of fewer slots, one
after another, and one update (`step`).
The capture is redone only when the tensors it holds change: a slot first adapts a layer or
brings a rank above the layer's largest (`max_rank` sizes them for the search's largest rank from
the start), a batch is wider than the captured width, or dropout turns on or off for the pack
(neither, where the trainer reserved its rows and dropout).

PEFT cannot do this itself: its mixed-adapter batches (`adapter_names`) refuse training mode
(huggingface/peft#631). DoRA (a merged weight per adapter for its norm), Conv1D layers (GPT-2) and
LoRA biases are refused: such a trial trains in its own process (`resources.packing=processes`).

A slot's checkpoint (`checkpoint`) has a per-process trial's format (trainables/checkpoint.py):
`PeftModel.from_pretrained` loads its adapter, and its optimizer state is the state dict of the
trial's own AdamW with PEFT's LoRA+ groups, so either trainer continues the other's.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import math
from collections.abc import Iterable, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from rundir.params import TrialParams
from trainables.checkpoint import SLOT, TrialCheckpoint, adapter_config
from trainables.data import IGNORE
from trainables.metrics import Progress
from trainables.optim import BETAS, EPS, SlotWeights, loraplus_adamw, schedule_factor, warmup_cosine
from trainables.step import (
    CaptureFailed,
    causal_attention_as_sdpa_chooses,
    cuda_graph,
    first_line,
    output_layer,
    repeated_blocks,
    widest,
)

log = logging.getLogger(__name__)
ANSWER_ROUNDING = 8  # a captured step's answer positions per row: a multiple of this
# What a selection's layers keep of its matrices for its passes without gradients (`Pack.keeps`):
# all of SmolLM2's with 8 slots at rank 32 on every projection (157 MB in bf16)
FROZEN_BYTES = 1 << 28
# Eager passes before the step's capture. One makes all a pass makes lazily: the compile, the
# gradients (cleared again before the capture) and cuBLAS's workspace on the side stream. The
# moments are allocated with the weights and the autocast cache is off, so a second pass makes
# nothing; each costs the first step an eager pass of every layer.
PACK_WARMUP_PASSES = 1


class SlotOutOfMemory(RuntimeError):
    """A pass of one slot alone ran out of GPU memory: that trial cannot train beside the base."""

    def __init__(self, slot: int, message: str):
        super().__init__(message)
        self.slot = slot


class PackedLinear(nn.Module):
    """A frozen `nn.Linear` plus the stacked adapters of the pack's slots on it."""

    def __init__(self, base: nn.Linear, pack: Pack, number: int, rank: int):
        super().__init__()
        self.base = base
        object.__setattr__(self, "pack", pack)  # not a submodule: the pack owns the model
        capacity, device = pack.capacity, pack.device
        # the layer's own key in the dropout hash; a tensor, so that one compiled decoder layer
        # serves every layer (an int would be a guard of its own: a compile per layer)
        self.number = torch.tensor(number, device=device)
        self.scale = torch.zeros(capacity, device=device)  # 0: the slot does not adapt this layer
        self.frozen: dict = {}  # within `Pack.only`: the selection's matrices as its passes without gradients take them
        self._allocate(rank)

    def _allocate(self, rank: int) -> None:
        """The stacked weights and AdamW moments at `rank`, keeping what they held (a new rank is padding)."""
        capacity, device = self.pack.capacity, self.pack.device
        shapes = {"A": (capacity, rank, self.base.in_features), "B": (capacity, rank, self.base.out_features)}
        old = {name: getattr(self, name, None) for name in ("A", "B", "A_avg", "B_avg", "A_avg_sq", "B_avg_sq")}
        for name, old_tensor in old.items():
            new = torch.zeros(shapes[name[0]], device=device)
            if old_tensor is not None:
                new[tuple(slice(0, n) for n in old_tensor.shape)] = old_tensor.detach()
            setattr(self, name, new.requires_grad_(name in ("A", "B")))
        self.max_rank = rank
        self.pack.layout += 1  # a captured step holds the old tensors

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        slots = self.pack.selection
        rows = x.reshape(self.pack.capacity if slots is None else len(slots), -1, *x.shape[1:])  # [slots, rows, ..., in]
        if self.training and self.pack.dropout:
            rows = self.pack.drop(rows, self.number)
        # a selection's passes without gradients (evaluation, and generation's one pass per token)
        # take its slots' matrices as its first pass made them: selected, cast and scaled again at
        # every pass, they were a third of the operations a pass dispatches
        keep = slots is not None and not torch.is_grad_enabled()
        down = self._matrix("down", rows.dtype, keep, lambda: _selected(self.A, slots).transpose(1, 2).to(rows.dtype))
        low = torch.bmm(rows.flatten(1, -2), down)

        def scaled_up() -> torch.Tensor:
            # the scale on B rather than on the product, and the sum in the same kernel: no pass
            # over the layer's output for either, forward or backward
            B, scale = _selected(self.B, slots), _selected(self.scale, slots)
            return (B * scale[:, None, None]).to(low.dtype)

        up = self._matrix("up", low.dtype, keep, scaled_up)
        return torch.baddbmm(out.view(low.shape[0], -1, out.shape[-1]), low, up).view(out.shape)

    def _matrix(self, kind: str, dtype: torch.dtype, keep: bool, make) -> torch.Tensor:
        """`make()`, or with `keep` the one an earlier pass of the selection made, kept while the
        pack's budget for them allows (`Pack.keeps`)."""
        if not keep:
            return make()
        held = self.frozen.get((kind, dtype))
        if held is None:
            held = make()
            if self.pack.keeps(held):
                self.frozen[kind, dtype] = held
        return held


def _out_of_memory(error: BaseException | None) -> bool:
    """Whether `error`, or an error it was raised from (a compiler's wrapping), is running out of GPU memory."""
    while error is not None:
        if isinstance(error, torch.OutOfMemoryError):
            return True
        error = error.__cause__ or error.__context__
    return False


def _selected(tensor: torch.Tensor, slots: torch.Tensor | None) -> torch.Tensor:
    """`tensor`'s entries of the selected slots, all where none are selected."""
    return tensor if slots is None else tensor.index_select(0, slots)


@dataclass
class Slot:
    """What one slot trains: the trial's parameters and the names of the layers it adapts."""

    params: TrialParams
    layers: dict[str, PackedLinear]
    index: int

    def named_weights(self, what: str = ""):
        """(PEFT's state-dict key, the slot's part of the layer's tensor, in PEFT's shape) of each
        adapter weight, in the layers' order: the weights, or with `what` "grad", "avg" or "avg_sq"
        their gradients or AdamW moments. A B is a transposed view (`stored`)."""
        for key, part in self.stored(what):
            yield key, part.T if key.endswith("lora_B.weight") else part

    def stored(self, what: str = ""):
        """`named_weights` as the layers hold them: B as its transpose, `[rank, out]`, so every part
        is contiguous."""
        r = self.params.lora_config["r"]  # every layer's rank of the slot (`Pack.add`), known on the host
        for name, layer in self.layers.items():
            for matrix in ("A", "B"):
                tensor = getattr(layer, matrix)
                if what == "grad":
                    tensor = tensor.grad if tensor.grad is not None else torch.zeros_like(tensor)
                elif what:
                    tensor = getattr(layer, f"{matrix}_{what}")
                yield f"base_model.model.{name}.lora_{matrix}.weight", tensor[self.index, :r]


@dataclass
class Captured:
    """A packed step captured as a CUDA graph, with the tensors it reads and writes: `ids` and
    `labels` (`[capacity * rows, width]`), `stepping` (`[capacity]` bool) and the slots' `losses`.
    `replay` runs it: the graph's replay, or, where no GPU is (tests), the same step run eagerly
    on the same tensors."""

    rows: int
    width: int
    answers: int  # answer positions scored per row (`answer_positions`)
    dropout: bool
    layout: int
    pass_slots: int  # slots a forward and backward pass of the step holds
    ids: torch.Tensor
    labels: torch.Tensor
    stepping: torch.Tensor
    losses: torch.Tensor
    replay: object
    order: tuple = ()  # the slots `stepping` holds
    # what else the graph reads and nothing else holds (a graph keeps no Python object): the
    # passes' slot selections, made before the capture; freed, their memory would be another tensor's
    keep: tuple = ()


@dataclass
class SlotSnapshot:
    """A slot's checkpoint as the pack took it: its weights, then (after its first step) its AdamW
    moments, in one host tensor (`flat`, parts as the layers store them, `Slot.stored`; on a GPU, a
    copy still under way), and `progress` as it stood. `checkpoint()` waits for the copy and makes
    the checkpoint with the trial's optimizer and schedule: a shared trainer calls it in the
    client's call, so that the slots step on meanwhile."""

    keys: list[str]
    shapes: list[torch.Size]
    flat: torch.Tensor              # on the host; on a GPU, filled once `done` has passed
    done: torch.cuda.Event | None  # recorded after the copy into `flat`: its reader waits for it
    steps: int
    params: TrialParams
    fused: bool                     # the optimizer's, as a per-process trial on the same device makes it
    warmup_steps: int
    max_steps: int
    adapter_config: dict
    progress: Progress

    def checkpoint(self) -> TrialCheckpoint:
        if self.done is not None:
            self.done.synchronize()
        sizes = [shape.numel() for shape in self.shapes]
        parts = [part.view(shape) for part, shape in zip(self.flat.split(sizes), self.shapes)]
        n = len(self.keys)
        # in PEFT's shapes: a B transposed back into a tensor of its own; an A's moment copied, as
        # torch.save writes a view's whole storage, which would put all of `flat` in the state
        parts = [part.T.contiguous() if self.keys[i % n].endswith("lora_B.weight") else part.clone() if i >= n
                 else part for i, part in enumerate(parts)]
        optimizer, scheduler, weights = trial_optimizer(self.params, parts[:n], self.fused, self.warmup_steps,
                                                        self.max_steps, self.steps)
        if self.steps:  # torch's AdamW holds no state before its first step
            for param, avg, avg_sq in zip(weights, parts[n:2 * n], parts[2 * n:]):
                optimizer.state[param] = {"step": torch.tensor(float(self.steps)), "exp_avg": avg, "exp_avg_sq": avg_sq}
        return TrialCheckpoint.take(self.progress, dict(zip(self.keys, parts[:n])), self.adapter_config, optimizer,
                                    scheduler, [], SLOT)


def trial_optimizer(params: TrialParams, weights: list[torch.Tensor], fused: bool, warmup_steps: int, max_steps: int,
                    steps: int):
    """A slot's trial's own AdamW (PEFT's LoRA+ groups) and schedule at `steps`, over parameters
    made of `weights` (PEFT's shapes, in `Slot.named_weights`' order), which only name its state's
    entries: it is never stepped. The optimizer of the checkpoints of both trainers."""
    held = [nn.Parameter(w.detach()) for w in weights]
    optimizer = loraplus_adamw(SlotWeights(list(zip(held[::2], held[1::2]))), params.learning_rate,
                               params.loraplus_lr_ratio, fused)
    return optimizer, warmup_cosine(optimizer, warmup_steps, max_steps, steps), held


class Pack:
    """`model` (a causal LM, frozen, on its device) with `capacity` adapter slots.

    `add` fills a free slot with a trial's adapter, `remove` frees it at once; `step` trains the
    slots given a batch each, together; `only(slot)` makes the model one slot's adapted model
    for every row (evaluation, generation)."""

    def __init__(self, model: nn.Module, capacity: int, warmup_steps: int, max_steps: int, max_rank: int = 1,
                 cuda_graph: bool = False, compile_backend: str | None = None):
        self.model, self.capacity = model, capacity
        self.warmup_steps, self.max_steps, self.max_rank = warmup_steps, max_steps, max_rank
        self.slots: dict[int, Slot] = {}
        self.device = next(model.parameters()).device
        self.selection: torch.Tensor | None = None  # the slots whose rows a pass holds; None: all, in order
        self.frozen_bytes = 0  # what the layers keep for the selection's passes (`keeps`)
        self.pass_slots = capacity  # slots per forward/backward pass: fewer after running out of memory
        self._layers: dict[str, PackedLinear] = {}
        self.layout = 0  # bumped when a layer's tensors are made: a captured step must be captured again
        self.cuda_graph = cuda_graph and self.device.type == "cuda"
        if self.cuda_graph:
            causal_attention_as_sdpa_chooses()
        self.captured: Captured | None = None
        # the widest row and most answer tokens a row of the pack's trials holds, where the trainer
        # knows its data (`reserve`): the first capture is then the last one the batches need
        self.reserved_width = self.reserved_answers = 0
        self.reserved_dropout = False  # the masks drawn whatever the slots' dropout (`reserve`)
        # the captured step's parts through torch.compile (backend "inductor" on a GPU; `_compile`
        # says which and why)
        self.compile_backend = compile_backend
        # with a backend, the decoder layers too (`_compile`; resources.pack_compile_layers): faster
        # steps for about 10 s more compiling, which a short search does not win back
        self.compile_layers = False
        self._compiled: tuple | None = None
        self._layers_compiled = False
        self.drop = self.dropped  # compiled with the step (`_compile`)
        unpack(model)  # a process's cached base model may still hold an earlier pack's layers
        # the output layer of a training step sees only the answer positions (`AnswerHead`)
        self.answer_positions: torch.Tensor | None = None
        head = output_layer(model)
        if head is not None:
            model.set_output_embeddings(AnswerHead(head, self))
        # each slot's entries: what `add` writes and `remove` clears; float64 for the few numbers
        # of a slot, as the Python floats of torch's own AdamW and schedule are
        self.learning_rate = torch.zeros(capacity, dtype=torch.float64, device=self.device)
        self.loraplus_ratio = torch.zeros(capacity, dtype=torch.float64, device=self.device)
        self.steps = torch.zeros(capacity, dtype=torch.long, device=self.device)  # optimizer steps taken
        self.keep = torch.ones(capacity, device=self.device)  # 1 - lora_dropout
        self.seed = torch.zeros(capacity, dtype=torch.long, device=self.device)
        self.dropout = False  # any slot's dropout above 0, or reserved: the masks are drawn only then

    # -- slots -----------------------------------------------------------------------------
    @contextmanager
    def only(self, *slots: int):
        """With one slot, every row through its adapter alone: the model is that trial's adapted
        model. With several, the rows are as many blocks, block n through the n-th slot's adapter
        (`trainables.evaluation.evaluate_blocks`)."""
        self.selection = torch.tensor(slots, device=self.device)
        try:
            yield self.model
        finally:
            self.selection = None
            for layer in self._layers.values():  # the next selection, or the same slots trained since, take them anew
                layer.frozen = {}
            self.frozen_bytes = 0

    def keeps(self, matrix: torch.Tensor) -> bool:
        """Whether a layer keeps `matrix` for the selection's next passes: while all it keeps
        stays within FROZEN_BYTES. They are held together, where one pass held one layer's at a
        time: for Llama-3-8B's shapes, 16 slots at rank 32 on every projection would hold 2.7 GB."""
        size = matrix.numel() * matrix.element_size()
        if self.frozen_bytes + size > FROZEN_BYTES:
            return False
        self.frozen_bytes += size
        return True

    def free_slots(self) -> list[int]:
        return [i for i in range(self.capacity) if i not in self.slots]

    def add(self, params: TrialParams) -> int:
        """Fill a free slot with `params`' adapter (A drawn as PEFT draws it, B zero, from a
        generator seeded with the trial's seed), learning rate and schedule; its index. ValueError
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
        head = output_layer(self.model)
        if isinstance(head, AnswerHead) and any(check_target_module_exists(config, name)
                                                for name, module in self.model.named_modules() if module is head):
            # a slot that adapts the output layer: its logits at every position from now on, so that
            # its LoRA sees the hidden states (and dropout masks) it would alone; the logits are then
            # selected (`losses`)
            self.model.set_output_embeddings(head.base)
            self.layout += 1
        targets = self._targets(config)
        if not targets:
            raise ValueError(f"target_modules {config.target_modules} names no layer of the model")
        wrong = [name for name, module in targets if not isinstance(module, (nn.Linear, PackedLinear))]
        if wrong:
            raise ValueError(f"the shared trainer adapts torch.nn.Linear layers only; {wrong[0]} is "
                             f"{type(_plain(self.model, wrong[0])).__name__}: set resources.packing=processes")
        init = torch.Generator().manual_seed(params.seed)  # on the CPU: the same weights on any device
        scale = config.lora_alpha / (math.sqrt(config.r) if config.use_rslora else config.r)
        layers: dict[str, PackedLinear] = {}
        with torch.no_grad():
            for name, _ in targets:
                layer = self._wrap(name, config.r)
                A = torch.empty(config.r, layer.base.in_features, dtype=torch.float32)
                nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=init)
                layer.A[index, :config.r] = A.to(self.device)
                layer.scale[index] = scale
                layers[name] = layer
            self.learning_rate[index], self.loraplus_ratio[index] = params.learning_rate, params.loraplus_lr_ratio
            self.steps[index], self.seed[index] = 0, params.seed
            self.keep[index] = 1 - config.lora_dropout
        self.slots[index] = Slot(params, layers, index)
        self._dropout_follows_the_slots()
        return index

    def remove(self, index: int) -> None:
        """Free slot `index` at once: its entries back to an empty slot's (zero weights, moments,
        scale and learning rate), in place."""
        if self.slots.pop(index, None) is None:
            return
        with torch.no_grad():
            for layer in self._layers.values():
                for name in ("A", "B", "A_avg", "B_avg", "A_avg_sq", "B_avg_sq"):
                    getattr(layer, name)[index] = 0
                layer.scale[index] = 0
            self.learning_rate[index], self.loraplus_ratio[index], self.steps[index] = 0, 0, 0
            self.keep[index] = 1
        self._dropout_follows_the_slots()

    def prepare(self, module_sets: Iterable[Sequence[str]], rows: int, autocast=None) -> None:
        """Before any slot opens: wrap every layer that a trial of one of `module_sets` (the
        space's target_modules lists) adapts, at the pack's `max_rank`, and with `cuda_graph`
        capture the step for `rows` rows a slot as wide as `reserve` said. Slots then open into
        that capture. Otherwise the first trial captures (and compiles) the step, and each
        trial that adapts layers no earlier one did makes new tensors, captured again, while
        the trials that came with it wait. A set that names the output layer is left to `add`,
        which changes the step's head for it. A capture that fails here is tried again, and
        given up as `step` says, at the first step."""
        from peft import LoraConfig

        for targets in module_sets:
            for name, module in self._targets(LoraConfig(target_modules=list(targets))):
                if isinstance(module, (nn.Linear, PackedLinear)):  # another layer: `add` refuses its trials
                    self._wrap(name, self.max_rank)
        if not self.cuda_graph or not self.reserved_width:
            return
        again = True
        while again:
            try:
                self._captured_for(rows, self.reserved_width, self.reserved_answers, autocast)
                return
            except Exception as error:  # noqa: BLE001 - the pack steps eagerly where it gives up; the log says why
                again = self._capture_failed(error)
            self._release_memory()  # out of the handler, whose traceback holds the failed capture's tensors

    def _targets(self, config) -> list[tuple[str, nn.Module]]:
        """The layers a trial of `config` (a PEFT `LoraConfig`) adapts, by name; a packed layer as its
        PackedLinear, not as the Linear inside it."""
        from peft.tuners.tuners_utils import check_target_module_exists

        wrapped = {id(layer.base) for layer in self._layers.values()}
        return [(name, module) for name, module in self.model.named_modules()
                if name and id(module) not in wrapped and check_target_module_exists(config, name)]

    def _dropout_follows_the_slots(self) -> None:
        """`dropout` from the slots' keep probabilities, or on where it was reserved."""
        self.dropout = self.reserved_dropout or bool((self.keep < 1).any())

    def _wrap(self, name: str, rank: int) -> PackedLinear:
        """The packed layer at `name` with room for `rank`, put in place of the model's Linear the
        first time a slot adapts it."""
        layer = self._layers.get(name)
        if layer is None:
            parent_name, _, child = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            layer = PackedLinear(getattr(parent, child), self, len(self._layers), max(rank, self.max_rank))
            setattr(parent, child, layer)
            self._layers[name] = layer
        elif rank > layer.max_rank:
            layer._allocate(rank)
        return layer

    def trainable_params(self, index: int) -> int:
        return sum(p.numel() for _, p in self.slots[index].named_weights())

    # -- training --------------------------------------------------------------------------
    @property
    def step_mode(self) -> str:
        mode = "cuda_graph" if self.cuda_graph else "eager"
        return f"compiled+{mode}" if self.compile_backend and self.cuda_graph else mode

    def reserve(self, rows: Iterable[tuple[Sequence[int], Sequence[int]]], dropout: bool = False) -> None:
        """Capture the step wide enough for every row of `rows` (input ids and labels: all the rows
        the pack's trials will draw batches from) from its first capture, and with `dropout` (some
        trial may have LoRA dropout) with the dropout masks drawn from it. A capture sized by the
        batches seen so far is redone each time a wider batch, or one with more answer tokens, comes,
        which happens many times in a search's first steps, and again when dropout turns on or off;
        with the decoder layers compiled, each capture compiles them again too. Padding rows to the
        widest costs a step little where the captured step is bound by its launches, and its compute
        is already the widest batch's; a slot without dropout keeps every element of the masks."""
        self.reserve_widths(*widest(rows), dropout=dropout)

    def reserve_widths(self, width: int, answers: int, dropout: bool = False) -> None:
        """`reserve` for rows whose widest is `width` tokens and whose most scored positions are
        `answers` (`widest`), as whoever tokenized them counted them."""
        self.reserved_dropout = self.reserved_dropout or dropout
        self._dropout_follows_the_slots()
        self.reserved_width = max(self.reserved_width, width)
        self.reserved_answers = max(self.reserved_answers, answers)

    def step(self, batches: dict[int, tuple[torch.Tensor, torch.Tensor]], autocast=None) -> dict[int, torch.Tensor]:
        """One optimizer step for each slot in `batches` (slot -> (input_ids, labels), right-padded,
        on the host or the pack's device): its loss, left on the device (a NaN or infinite one is the caller's
        to act on; it touched nothing but its own slot's rows and weights). All slots go through
        the model in one pass, the empty ones as padding; a pass that runs out of GPU memory is
        split in two and run again, down to one slot a pass (the gradients of each slot are its
        own either way); a slot that does not fit alone raises SlotOutOfMemory, and no slot steps.
        With `cuda_graph`, the captured step instead (see the module's docstring); a capture whose
        warm-up runs out of memory is made again with half the slots a pass, down to one (its
        passes then run one after another inside the graph, each freeing its activations for the
        next), one that cannot compile the decoder layers is made again with them uncompiled, and
        a capture that fails otherwise, or in the capture itself, leaves the pack stepping eagerly
        from then on (`_capture_failed`); the log says so each time."""
        while self.cuda_graph:
            try:
                return self._replay(batches, autocast)
            except Exception as error:  # noqa: BLE001 - the eager step computes the same; the log says why
                self._capture_failed(error)
            self._release_memory()  # out of the handler, whose traceback holds the failed capture's tensors
        self._zero_grad()
        order = sorted(batches)
        chunks = [list(range(self.capacity))] if self.pass_slots >= self.capacity else None
        losses: dict[int, torch.Tensor] = {}
        start = 0
        while True:
            if chunks is None:
                chunks = [order[i:i + self.pass_slots] for i in range(0, len(order), self.pass_slots)]
            if start == len(chunks):
                break
            chunk = chunks[start]
            try:
                losses.update(self._pass({i: batches.get(i) for i in chunk}, autocast))
                start += 1
                continue
            except torch.OutOfMemoryError as error:
                if len(chunk) == 1:
                    self._zero_grad()  # no slot steps: the passes before this one are dropped too
                    raise SlotOutOfMemory(chunk[0], str(error)) from error
                self._zero_grad()
                losses, start, chunks = {}, 0, None
                self.pass_slots = max(1, min(len(chunk), len(order)) // 2)
            self._release_memory()  # out of the handler, whose traceback holds the failed pass's activations
        stepping = torch.zeros(self.capacity, dtype=torch.bool)
        stepping[order] = True
        self.update(stepping.to(self.device))
        return {i: losses[i] for i in order}

    def _replay(self, batches: dict[int, tuple[torch.Tensor, torch.Tensor]], autocast) -> dict[int, torch.Tensor]:
        """The step as the captured graph's replay, capturing it first where none fits."""
        given = list(batches.values())
        rows = max(ids.shape[0] for ids, _ in given)
        width = max(self.reserved_width, *(ids.shape[1] for ids, _ in given))
        answers = max(self.reserved_answers, *(answers_per_row(labels) for _, labels in given))
        captured = self._captured_for(rows, width, answers, autocast)
        ids, labels = gathered({i: batches.get(i) for i in range(self.capacity)}, rows, captured.width)
        captured.ids.copy_(_pinned(ids), non_blocking=True)
        captured.labels.copy_(_pinned(labels), non_blocking=True)
        order = tuple(sorted(batches))
        if order != captured.order:
            stepping = torch.zeros(self.capacity, dtype=torch.bool)
            stepping[list(order)] = True
            captured.stepping.copy_(_pinned(stepping), non_blocking=True)
            captured.order = order
        captured.replay()
        losses = captured.losses.clone()  # the next replay overwrites the graph's own
        return {i: losses[i] for i in order}

    def _capture_failed(self, error: Exception) -> bool:
        """After a capture that raised `error`, what the pack does next, which the log says: True
        where it captures again. Where the warm-up before the capture ran out of GPU memory with
        more than one slot a pass, it captures with half the slots a pass; where it could not
        compile the decoder layers into the step, it captures them uncompiled. Otherwise, and
        after any error of the capture itself (CaptureFailed), it steps eagerly from then on: a
        capture that failed can leave its memory pool held (pytorch/pytorch#190348), and a later
        graph of the process is not worth its risk."""
        self.captured = None
        if isinstance(error, CaptureFailed):
            log.warning("the packed step's capture failed (%s: %s); the pack steps eagerly",
                        type(error.__cause__ or error).__name__, first_line(error))
            self.cuda_graph = False
            return False
        if self.pass_slots > 1 and _out_of_memory(error):
            before = min(self.pass_slots, self.capacity)
            self.pass_slots = max(1, before // 2)
            log.warning("the packed step ran out of GPU memory before its capture with %d slots a pass (%s); the "
                        "pack captures it with %d a pass", before, first_line(error), self.pass_slots)
            return True
        if self._layers_compiled:
            log.warning("the decoder layers could not be compiled into the captured step (%s: %s); the pack "
                        "captures them uncompiled", type(error).__name__, first_line(error))
            self.compile_layers, self._compiled, self._layers_compiled = False, None, False
            return True
        log.warning("the packed step could not be captured as a CUDA graph (%s: %s); the pack steps eagerly",
                    type(error).__name__, first_line(error))
        self.cuda_graph = False
        return False

    def _release_memory(self) -> None:
        """After a failed pass or capture: its tensors freed, and the allocator's unused blocks
        given back to the GPU. A failed capture's tensors can sit in reference cycles (its frames
        and closures) that only the collector frees, and the next try needs that memory."""
        if self.device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()

    def _captured_for(self, rows: int, width: int, answers: int, autocast) -> Captured:
        """The capture that steps `rows` rows a slot of up to `width` tokens and `answers` answer
        positions each: the one held where it fits, else a new one."""
        # rounded up: a step with a few more answer tokens than the last fits the same capture (and compile)
        answers = -(-answers // ANSWER_ROUNDING) * ANSWER_ROUNDING
        captured = self.captured
        if (captured is None or rows != captured.rows or width > captured.width or answers > captured.answers
                or self.dropout != captured.dropout or self.layout != captured.layout
                or min(self.pass_slots, self.capacity) != captured.pass_slots):
            self.captured = None  # its memory goes back to the allocator before the next capture takes its own
            captured = self.captured = self._capture(rows, max(width, captured.width if captured else 0),
                                                     max(answers, captured.answers if captured else 0), autocast)
        return captured

    def _capture(self, rows: int, width: int, answers: int, autocast) -> Captured:
        """The whole step, forward, backward and update, over static tensors, `answers` answer
        positions scored per row; captured as a CUDA graph on a GPU. The warm-up passes (forward
        and backward of padding only) touch no weight."""
        ids = torch.zeros(self.capacity * rows, width, dtype=torch.long, device=self.device)
        labels = torch.full_like(ids, IGNORE)
        stepping = torch.zeros(self.capacity, dtype=torch.bool, device=self.device)
        # no autocast cache under capture (torch.cuda.graph's own rule): casts are redone at every replay
        context = (torch.autocast("cuda", dtype=autocast.fast_dtype, cache_enabled=False)
                   if autocast is not None and self.device.type == "cuda" else autocast or nullcontext())

        if self._compiled is None:
            self._compiled = self._compile() if self.compile_backend else (self.losses, self.update)
        losses_of, update = self._compiled
        # the slots' passes, `pass_slots` each, on their own rows: inside the graph one pass's
        # activations are freed before the next pass allocates its own, as in an eager step
        per_pass = min(self.pass_slots, self.capacity)
        passes = [(None if per_pass == self.capacity
                   else torch.arange(first, min(first + per_pass, self.capacity), device=self.device),
                   slice(first * rows, min(first + per_pass, self.capacity) * rows))
                  for first in range(0, self.capacity, per_pass)]
        selections = tuple(selection for selection, _ in passes if selection is not None)

        def forward_backward() -> torch.Tensor:
            losses = []
            for selection, block in passes:
                self.selection = selection
                try:
                    with context:
                        part = losses_of(ids[block], labels[block], answers=answers)
                finally:
                    self.selection = None
                part.sum().backward()
                losses.append(part.detach())
            return torch.cat(losses) if len(losses) > 1 else losses[0]

        def step() -> torch.Tensor:
            losses = forward_backward()
            update(stepping)
            return losses

        def step_compiled_before() -> torch.Tensor:
            # the warm-up compiled every part for these shapes: a guard that fails under the
            # capture raises here, naming itself, instead of compiling inside the capture
            with torch.compiler.set_stance("fail_on_recompile"):
                return step()

        def warmup() -> None:  # padding only, and no slot steps: no weight or moment moves
            forward_backward()
            update(torch.zeros_like(stepping))  # compiled here, if at all: nothing compiles under the capture

        captured_step = step_compiled_before if self.compile_backend else step
        if self.device.type != "cuda":
            # no graph without a GPU (tests): the warm-up, then the same step on the same tensors
            # at every replay, eagerly, held to compiling nothing after the warm-up as a capture is
            losses = torch.zeros(self.capacity, device=self.device)
            for _ in range(PACK_WARMUP_PASSES):
                warmup()

            def replay() -> None:
                self._zero_grad()
                losses.copy_(captured_step())

            return Captured(rows, width, answers, self.dropout, self.layout, per_pass, ids, labels, stepping, losses,
                            replay, keep=selections)

        graph, losses = cuda_graph(warmup, captured_step, self._zero_grad, PACK_WARMUP_PASSES)
        return Captured(rows, width, answers, self.dropout, self.layout, per_pass, ids, labels, stepping, losses,
                        graph.replay, keep=selections)

    def _compile(self) -> tuple:
        """The step's forward and update through torch.compile by the parts that repeat, each a
        few seconds' compile: the loss over the logits (the float logits and their softmax are
        never held whole: 5.6 GB at K=8 against 8.3), AdamW on one stacked tensor (one kernel
        for its passes), and, with `compile_layers`, one decoder layer's code for every layer
        (its norms, rotary and activation fused: the eager layers' elementwise kernels took
        most of a K=32 step on an H200, bench/results/h200-2026-12-06-pack/). Compiled whole,
        the model took 409 s on an H100's host. The compiled layers stand in the model only
        for the captured forward; evaluation runs the layers themselves. On an H100 the pack
        trains at 5.69x one trial alone with 8 slots and 8.05x with 64 with them, 3.90x and
        5.06x without (bench/results/h100-2026-12-06-sitting3/). A run compiles them wherever it
        compiles its step (resources.pack_compile_layers: auto): once inductor's cache holds them the
        reference search takes 37-38 s against 42-46 s (bench/results/h100-2026-12-07-sitting13/)."""
        backend = self.compile_backend
        tail = torch.compile(slot_losses, backend=backend, dynamic=False)
        adamw = torch.compile(adamw_, backend=backend, dynamic=False)
        # the dropout hash in one kernel: uncompiled, its int64 passes over every adapted layer's
        # input tripled a K=32 step with the layers eager (H100, bench/results/h100-2026-12-06-pack/)
        self.drop = torch.compile(self.dropped, backend=backend, dynamic=False)
        losses_of, update = partial(self.losses, tail=tail), partial(self.update, adamw=adamw)
        layers = repeated_blocks(self.model) if self.compile_layers else {}
        self._layers_compiled = bool(layers)
        if not layers:
            return losses_of, update
        compiled = {name: torch.compile(layer, backend=backend, dynamic=False) for name, layer in layers.items()}

        def with_compiled_layers(*args, **kwargs) -> torch.Tensor:
            for name, layer in compiled.items():
                self.model.set_submodule(name, layer)
            try:
                return losses_of(*args, **kwargs)
            finally:
                for name, layer in layers.items():
                    self.model.set_submodule(name, layer)

        return with_compiled_layers, update

    def _pass(self, batches: dict[int, tuple[torch.Tensor, torch.Tensor] | None], autocast) -> dict[int, torch.Tensor]:
        """Forward and backward of the slots of `batches` (in their order), whose rows are padded
        to one count and one width: a slot without a batch (None) gives padding rows only."""
        given = [b for b in batches.values() if b is not None]
        ids, labels = gathered(batches, max(ids.shape[0] for ids, _ in given), max(ids.shape[1] for ids, _ in given))
        answers = answers_per_row(labels)
        ids, labels = _pinned(ids).to(self.device, non_blocking=True), _pinned(labels).to(self.device, non_blocking=True)
        slots = list(batches)
        self.selection = None if slots == list(range(self.capacity)) else torch.tensor(slots, device=self.device)
        try:
            losses = self.losses(ids, labels, autocast, answers=answers)
        finally:
            self.selection = None
        # each slot's gradients are those of its own loss: no parameter is shared between slots
        losses.sum().backward()
        return {i: losses[n].detach() for n, i in enumerate(slots) if batches[i] is not None}

    def losses(self, ids: torch.Tensor, labels: torch.Tensor, autocast=None, tail=None,
               answers: int | None = None) -> torch.Tensor:
        """Each slot's mean token loss over its own block of rows (`[slots]`; 0 for a block
        without labels): the forward of a packed step, the same operations for any pack. With
        `answers` (at least the answer tokens of any row: `answers_per_row`), the output layer
        computes logits at that many positions per row (`answer_positions`), the same number in
        every step, so a captured or compiled step keeps its shapes; without, at every position."""
        positions, targets = (None, labels[:, 1:]) if answers is None else answer_positions(labels, answers)
        self.answer_positions = positions
        try:
            with autocast or torch.autocast(self.device.type, enabled=False):
                logits = self.model(input_ids=ids).logits
        finally:
            self.answer_positions = None
        if positions is None:
            logits = logits[:, :-1]
        elif logits.shape[1] != positions.shape[1]:  # a model whose forward never called its output layer's module
            logits = rows_at(logits[:, :-1], positions)
        slots = self.capacity if self.selection is None else self.selection.shape[0]
        return (tail or slot_losses)(logits, targets, slots)

    def update(self, stepping: torch.Tensor, adamw=None) -> None:
        """One AdamW step (PEFT's LoRA+ groups, the warm-up and cosine schedule) of every slot in
        `stepping` (`[capacity]` bool), as torch's AdamW with the trial's own groups takes it (its
        operations, in its order); the other slots keep their weights and moments: their moments'
        decay is 1 and their step size 0. Padding stays zero without a mask: its gradients are
        exact zeros (the padded rows of A and of B's transpose meet only zeros), and so are its moments."""
        beta1, beta2 = BETAS
        on = stepping.double()
        taken = self.steps + stepping.long()
        rate = self.learning_rate * schedule_factor(self.steps.double(), self.warmup_steps, self.max_steps)
        step_size = -on * rate / (1 - beta1 ** taken.clamp(min=1).double())

        def per_slot(values: torch.Tensor) -> torch.Tensor:
            return values.float()[:, None, None]

        average = per_slot((1 - beta1) * on)                       # lerp's weight: 0 keeps a moment as it is
        decay, squares = per_slot(1 - (1 - beta2) * on), per_slot((1 - beta2) * on)
        correction = per_slot((1 - beta2 ** taken.clamp(min=1).double()).sqrt())
        sizes = {"A": per_slot(step_size), "B": per_slot(step_size * self.loraplus_ratio)}
        with torch.no_grad():
            for layer in self._layers.values():
                for matrix in ("A", "B"):
                    weight = getattr(layer, matrix)
                    if weight.grad is not None:
                        (adamw or adamw_)(weight, weight.grad, getattr(layer, f"{matrix}_avg"),
                                          getattr(layer, f"{matrix}_avg_sq"), average, decay, squares, correction,
                                          sizes[matrix])
        self.steps.copy_(taken)

    def dropped(self, rows: torch.Tensor, layer: int) -> torch.Tensor:
        """`rows` (`[slots, rows, tokens, in]`, the selected slots') with each element kept with
        its slot's probability and scaled as `nn.Dropout` does: the masks are a hash of the slot's
        seed and step, `layer` and the element's row, token and feature, so they depend on nothing
        of another slot's, nor on the padding."""
        slots = self.selection if self.selection is not None else slice(None)
        keep, seed, step = self.keep[slots], self.seed[slots], self.steps[slots]
        place = [torch.arange(n, device=rows.device) for n in rows.shape[1:]]
        key = _mix(seed * 1_000_003 + step * 8191 + layer)
        key = _mix(key[:, None] ^ place[0][None, :])[:, :, None] ^ place[1][None, None, :]  # [slots, rows, tokens]
        draw = _mix(_mix(key)[..., None] ^ _mix(place[2] + 0x5bd1e995))
        kept = _kept(draw, keep[:, None, None, None])
        return rows * kept / keep[:, None, None, None].to(rows.dtype)

    def _zero_grad(self) -> None:
        for layer in self._layers.values():
            layer.A.grad, layer.B.grad = None, None

    # -- state -----------------------------------------------------------------------------
    def adapter_state(self, index: int) -> dict[str, torch.Tensor]:
        """The slot's adapter as PEFT's state dict (keys without the adapter name), on the CPU."""
        return {key: weight.detach().to("cpu", copy=True).contiguous()
                for key, weight in self.slots[index].named_weights()}

    def gradients(self, index: int) -> dict[str, torch.Tensor]:
        """The slot's gradients of the last step, by PEFT's key, on the CPU."""
        return {key: grad.to("cpu", copy=True) for key, grad in self.slots[index].named_weights("grad")}

    def load_adapter_state(self, index: int, state: dict[str, torch.Tensor]) -> None:
        weights = dict(self.slots[index].named_weights())
        missing = sorted(set(weights) - set(state))
        if missing:
            raise ValueError(f"the checkpoint's adapter lacks {missing[0]} (and {len(missing) - 1} more)")
        with torch.no_grad():
            for key, weight in weights.items():
                weight.copy_(state[key])

    def checkpoint(self, index: int, progress: Progress, base_model_name_or_path: str) -> TrialCheckpoint:
        """The slot's checkpoint at `progress`, its adapter as PEFT saves one on the base model.
        Its dropout needs no generator state: the masks are a function of the trial's seed and step."""
        return self.snapshot(index, progress, base_model_name_or_path).checkpoint()

    def snapshot(self, index: int, progress: Progress, base_model_name_or_path: str) -> SlotSnapshot:
        """The slot's checkpoint as far as the pack must take it: its weights and AdamW moments
        gathered on the device in one operation (every part is contiguous: `Slot.stored`) and
        copied to the host behind the step's work, waited for by `SlotSnapshot.checkpoint`, which
        also makes the trial's optimizer, not here."""
        from peft import LoraConfig

        slot = self.slots[index]
        steps = int(self.steps[index])  # a report's evaluation read its losses: the GPU's queue is empty here
        keys, weights = zip(*slot.stored())
        moments = [m for _, m in slot.stored("avg")] + [m for _, m in slot.stored("avg_sq")] if steps else []
        parts = list(weights) + moments
        flat = torch.cat([part.detach().view(-1) for part in parts])
        done = None
        if flat.is_cuda:
            # copied to page-locked host memory behind the step's work, without waiting for it: a
            # snapshot held on the device until its client read it would be GPU memory that the
            # pack's plan never counted (an 8B model's all-projection slot at rank 32: 0.96 GB)
            on_device, flat = flat, torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
            flat.copy_(on_device, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        return SlotSnapshot(list(keys), [part.shape for part in parts], flat, done, steps, slot.params,
                            self.device.type == "cuda", self.warmup_steps, self.max_steps,
                            adapter_config(LoraConfig(**slot.params.lora_config), base_model_name_or_path),
                            dataclasses.replace(progress))

    def restore(self, index: int, checkpoint: TrialCheckpoint, progress: Progress) -> None:
        """Continue the slot and `progress` from `checkpoint`, of a slot or of a per-process trial
        (whose dropout generators a slot has not: its masks are drawn from its seed and step)."""
        self.load_adapter_state(index, checkpoint.adapter)
        slot = self.slots[index]
        optimizer, scheduler, params = trial_optimizer(slot.params, [w for _, w in slot.named_weights()],
                                                       self.device.type == "cuda", self.warmup_steps, self.max_steps,
                                                       int(self.steps[index]))
        checkpoint.restore(optimizer, scheduler, progress)
        with torch.no_grad():
            for param, (_, avg), (_, avg_sq) in zip(params, slot.named_weights("avg"), slot.named_weights("avg_sq")):
                state = optimizer.state.get(param)
                if state:
                    avg.copy_(state["exp_avg"])
                    avg_sq.copy_(state["exp_avg_sq"])
            self.steps[index] = scheduler.last_epoch


def unpack(model: nn.Module) -> None:
    """Put every packed layer's own Linear back in its place: the model as it was loaded."""
    packed = [(name, module) for name, module in model.named_modules() if isinstance(module, PackedLinear)]
    for name, module in packed:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, module.base)
    head = output_layer(model)
    if isinstance(head, AnswerHead):
        model.set_output_embeddings(head.base)


def gathered(batches: dict[int, tuple[torch.Tensor, torch.Tensor] | None], rows: int, width: int):
    """The batches' input ids and labels as one batch, each slot's block `rows` rows of `width`
    tokens (on the batches' device); a slot without a batch (None) gives padding rows only."""
    given = next(b for b in batches.values() if b is not None)
    ids, labels = [], []
    for batch in batches.values():
        slot_ids, slot_labels = batch if batch is not None else given
        # any id pads: it sits after every real token (causal attention) and carries no label
        pad = (0, width - slot_ids.shape[1], 0, rows - slot_ids.shape[0])
        ids.append(nn.functional.pad(slot_ids, pad, value=0))
        labels.append(nn.functional.pad(slot_labels if batch is not None else torch.full_like(slot_labels, IGNORE),
                                        pad, value=IGNORE))
    return torch.cat(ids), torch.cat(labels)


def _pinned(tensor: torch.Tensor) -> torch.Tensor:
    """A host tensor in page-locked memory, where a GPU is: its copy to the GPU then waits for
    nothing, not even for the step before to end (a copy from pageable memory may)."""
    return tensor.pin_memory() if tensor.device.type == "cpu" and torch.cuda.is_available() else tensor


def slot_losses(logits: torch.Tensor, targets: torch.Tensor, slots: int) -> torch.Tensor:
    """Each of `slots` blocks of rows' mean loss over its labelled tokens (0 where none is):
    `logits[r, j]` scores `targets[r, j]` (IGNORE: not scored)."""
    targets = targets.reshape(slots, -1)
    tokens = nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                                         ignore_index=IGNORE, reduction="none").view(slots, -1)
    return tokens.sum(1) / (targets != IGNORE).sum(1).clamp(min=1)


def answers_per_row(labels: torch.Tensor) -> int:
    """The most answer tokens any row of `labels` (a host tensor) has past its first token: the
    positions per row `answer_positions` must keep; at least 1."""
    return max(1, int((labels[:, 1:] != IGNORE).sum(1).max()))


def answer_positions(labels: torch.Tensor, answers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`[rows, answers]`: each row's positions whose next token is an answer token, in order, then
    other positions to fill; and the tokens they predict (IGNORE for the fillers). A sort, not a
    selection: the shapes do not depend on the data, and nothing waits for the host."""
    targets = labels[:, 1:]
    width = targets.shape[1]
    order = torch.arange(width, device=labels.device)
    key = torch.where(targets != IGNORE, order, order + width)  # answers first, each part in order
    positions = key.argsort(dim=1)[:, :min(answers, width)]
    return positions, targets.gather(1, positions)


def rows_at(values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """`values[r, positions[r, j]]` for each row r: `[rows, positions, ...]` from `[rows, tokens, ...]`."""
    return values.gather(1, positions[..., None].expand(-1, -1, values.shape[-1]))


class AnswerHead(nn.Module):
    """The model's output layer, given only the hidden states at `pack.answer_positions` when a
    training step has set them, so that the logits (a pack's largest tensors: rows x positions x
    vocabulary) are computed at the answer positions only; the model's own forward still does
    what follows the layer (a softcap). At every position otherwise (evaluation, generation)."""

    def __init__(self, base: nn.Module, pack: Pack):
        super().__init__()
        self.base = base
        self.pack = [pack]  # in a list: not a submodule, not part of the model's state

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        positions = self.pack[0].answer_positions
        if positions is None:
            return self.base(hidden)
        return self.base(rows_at(hidden, positions))


def adamw_(weight, grad, avg, avg_sq, average, decay, squares, correction, size) -> None:
    """One AdamW step of a stacked tensor in place, in torch's AdamW's operations and order; the
    factors are per slot (`[capacity, 1, 1]`), so a slot not stepping keeps its weights and moments."""
    avg.lerp_(grad, average)
    avg_sq.mul_(decay).addcmul_(grad * squares, grad)
    denom = (avg_sq.sqrt() / correction).add_(EPS)
    weight.addcmul_(avg / denom, size)


def _kept(draw: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Whether each element with hash `draw` (in [0, 2**32)) is kept at probability `keep`: its top
    24 bits as a float32 in [0, 1), which float32 holds exactly. The whole hash as a float32 rounds
    its top values up to 1.0, which a slot without dropout (keep 1) would then drop."""
    return ((draw >> 8).to(torch.float32) * 2.0 ** -24) < keep


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (lowbias32's shifts, multipliers below 2**31 so that int64 never
    overflows) of each element of `x`, an int64 tensor; values in [0, 2**32)."""
    x = x & 0xFFFFFFFF
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & 0xFFFFFFFF
    x = ((x ^ (x >> 15)) * 0x2C1B3C6D) & 0xFFFFFFFF
    return x ^ (x >> 16)


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


def warm_inductor() -> float:
    """Compile and train a tiny function with inductor on the CPU, in this process: the seconds it
    took. Inductor's one-time setup in a process (its lowerings and operators registered, dynamo's
    and AOT autograd's own start) is part of the first compile whatever its device: a small
    function's compile from inductor's cache took 3.9-4.1 s without it and 0.8-1.0 s after it on
    the 2-core CPU (bench/results/warm_inductor_cpu.json). A shared trainer's process does it while
    it waits for the driver's go (trainables/host.py), so that the pack's preparing, the first
    step's last wait (bench/results/h100-2026-12-07-sitting15/), does not.
    The function is a matrix product alone, forward and backward, which inductor hands to ATen:
    no kernel of its own, so no C++ compile on the CPU, which a GPU's step never needs and which an
    empty cache makes slow (a fused CPU kernel's warm-up took 46 s on an H100's host,
    bench/results/h100-2026-12-07-sitting16/)."""
    import time

    started = time.perf_counter()
    weight = torch.ones(4, 4, requires_grad=True)
    product = torch.compile(lambda x: x @ weight, backend="inductor", dynamic=False)(torch.ones(2, 4))
    product.backward(torch.ones_like(product))
    return time.perf_counter() - started
