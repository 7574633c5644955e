"""The training step of a trial: forward and backward of one batch, eagerly or as a CUDA
graph on GPU (`resources.cuda_graphs`, on by default: bench/step_modes.py measured it).

At these model sizes a step is bound by kernel launches from Python (PEFT and the model's
modules launch thousands of kernels a step for SmolLM2 with all seven projections adapted),
not by the GPU. Replaying the step's forward and backward as one captured CUDA graph
removes that cost without compiling anything: capture is a few eager passes, once per
trial, for any configuration, DoRA included. `torch.compile` is the other way: measured at
90-110 s to compile the whole model per set of shapes (bench/results/step_modes_compile.json), more than
a whole trial of a search trains; for large models it also fuses the elementwise work that
bounds their steps (1.1B Llama on an H100: 464 ms a step against 650 eager), so long trials
of large models can ask for it (`resources.compile`). It compiles one decoder layer, not the
model: every layer runs the same code on the same shapes, so the one compiled layer serves
them all (two variants: the first layer's input needs no gradient), and the compile takes a
layer's time, not the model's.

What a graph needs, and how it is kept exact:
- Static shapes: every batch is right-padded to the train split's longest example. No
  attention mask is passed: attention is causal and the padding sits after every real
  token, so no real token attends to it; the loss ignores it (answer tokens only).
- Static memory: the batch is gathered on the GPU into the graph's own input tensors, and
  the backward refills the same `.grad` tensors on every replay, so gradients are never
  zeroed or set to None between steps; the (fused, eager) optimizer reads them in place.
- No host synchronisation inside the step: the loss stays on the GPU until a report.
The warm-up passes before capture run forward and backward only, never the optimizer:
the trial's weights are untouched by them.
If capture fails (a model whose forward synchronises with the host, an unsupported kernel),
the trial runs the same step eagerly, says so in the worker's log, and reports
`step_mode: eager`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

import torch

from trainables.data import IGNORE, batch_indices, collate

T = TypeVar("T")
WARMUP_PASSES = 3  # eager passes on a side stream before capture (cuBLAS, autocast, allocator)
# A capture forbids unsafe CUDA calls in its own thread only: a shared trainer's clients read
# their checkpoints off the GPU in threads of their own while its stepping thread captures, and
# the default ("global") would fail both the capture and the client's read.
CAPTURE_ERROR_MODE = "thread_local"
log = logging.getLogger(__name__)


def answer_loss(model, input_ids: torch.Tensor, labels: torch.Tensor, token_loss=None,
                answer_only: bool = False) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens (labels != IGNORE), next-token shifted: the
    same value as the model's own loss with `labels`, without its host-side checks.
    `token_loss`: the function of (logits, labels) that computes it (a compiled one).
    `answer_only`: the output layer computes logits at the answer positions only
    (`answer_logits`); the number of those differs per batch, so not in a captured or
    compiled step, whose shapes are fixed."""
    if answer_only:
        targets = labels[:, 1:]
        return torch.nn.functional.cross_entropy(
            answer_logits(model, input_ids, next_is_answer(labels)).float(), targets[targets != IGNORE])
    return (token_loss or shifted_cross_entropy)(model(input_ids=input_ids).logits, labels)


def scored_positions(labels) -> int:
    """How many positions of one row's `labels` (a list) score a token: those `next_is_answer`
    keeps. Counted in C (list.count): a large training set's rows are read once, before a search."""
    return max(0, len(labels) - 1 - list(labels[1:]).count(IGNORE))


def widest(rows: Iterable[tuple[Sequence[int], Sequence[int]]]) -> tuple[int, int]:
    """The most tokens of any row of `rows` (input ids and labels), and the most positions any
    row scores (`scored_positions`): what a packed step's capture is sized for (`Pack.reserve`)."""
    width = answers = 0
    for ids, labels in rows:
        width, answers = max(width, len(ids)), max(answers, scored_positions(labels))
    return width, answers


def next_is_answer(labels: torch.Tensor) -> torch.Tensor:
    """The positions whose logits score a token: those whose next token is an answer token."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE
    return keep


def answer_logits(model, input_ids: torch.Tensor, keep: torch.Tensor, kept: torch.Tensor | None = None) -> torch.Tensor:
    """The model's logits at the positions `keep` (rows x tokens, bool), row by row: (kept,
    vocabulary). The output layer sees only those positions' hidden states, through a hook on
    the model's output embeddings, and the model's own forward does what follows it (a logit
    softcap or scale), so the values are the full forward's. Answers are a third of the
    embedded default's tokens, and its CPU step takes 2.81 s instead of 3.28
    (bench/results/cpu_step.json); on a large vocabulary the full logits are also the step's
    largest tensor. A model whose forward does not call its output embeddings as a module (the
    hook never runs) gives its full logits, selected here. `kept`, where the caller knows them on
    the host, are `keep`'s positions in the flattened rows: selecting them then waits for nothing,
    where a mask's selection waits for the GPU to have run every layer before it."""
    head = output_layer(model)

    def select(values: torch.Tensor) -> torch.Tensor:
        return values[keep] if kept is None else values.flatten(0, 1).index_select(0, kept)

    def rows_kept(module, args):
        return (select(args[0]), *args[1:]) if args and args[0].shape[:2] == keep.shape else None

    handle = head.register_forward_pre_hook(rows_kept) if head is not None else None
    try:
        logits = model(input_ids=input_ids).logits
    finally:
        if handle is not None:
            handle.remove()
    return logits if logits.dim() == 2 else select(logits)


def _sdpa_mask_causal_by_sdpa(*args, **kwargs):
    """transformers' sdpa mask, except None where a row needs the causal mask only (no padding
    mask, no window, no cache): sdpa's own `is_causal` then, whose flash kernel takes no mask.
    transformers answers so itself, except while a CUDA graph is being captured, which it takes
    for tracing: there it builds the mask, so a captured step ran another attention than its
    warm-up (and torch.compile, seeing a mask where it compiled without one, compiled again under
    the capture, which fails it).

    Under a capture transformers also keeps the check of its position ids for several sequences
    packed in one row (`find_packed_sequence_indices`), which outside one reads them and finds
    none: it then hands over the causal function joined with that check, and forbids the skip.
    The train steps' rows never pack sequences (each is one example from position 0,
    right-padded), so in the processes that register this (`causal_attention_as_sdpa_chooses`),
    for a model whose every layer attends to all earlier tokens (`_full_causal`), any mask
    function over whole rows is the causal mask. A model with windows or chunks, whose masks
    transformers may also build by joining functions, keeps transformers' own."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    offsets = (kwargs.get("q_offset", 0), kwargs.get("kv_offset", 0))
    # transformers before 5 names the queries by `cache_position` instead of `q_length`
    positions = kwargs.get("cache_position")
    queries = kwargs.get("q_length", positions.shape[0] if positions is not None else None)
    plain = kwargs.get("mask_function") is causal_mask_function and kwargs.get("allow_is_causal_skip", True)
    # a bidirectional mask (`create_bidirectional_mask`, the only caller that names this) is never causal
    joined_causal = "allow_is_bidirectional_skip" not in kwargs and _full_causal(kwargs.get("config"))
    if (kwargs.get("attention_mask") is None and kwargs.get("local_size") is None and (plain or joined_causal)
            and all(isinstance(n, int) and n == 0 for n in offsets) and queries == kwargs.get("kv_length")):
        return None
    return sdpa_mask(*args, **kwargs)


def _full_causal(config) -> bool:
    """Whether every layer of the model `config` describes attends to all earlier tokens: a causal
    model without sliding windows or chunks. False without a config."""
    if config is None or not getattr(config, "is_causal", True):
        return False
    types = getattr(config, "layer_types", None)
    if types:
        return set(types) == {"full_attention"}
    return not getattr(config, "sliding_window", None) and not getattr(config, "attention_chunk_size", None)


def causal_attention_as_sdpa_chooses() -> None:
    """sdpa's mask in this process as transformers chooses it outside a capture, inside one too
    (`_sdpa_mask_causal_by_sdpa`), through its public registry of mask functions. Only sdpa's:
    eager and flash attention build their masks otherwise. Called by the train steps only: it
    declares that the rows this process's model sees without a mask are whole sequences."""
    from transformers.masking_utils import AttentionMaskInterface

    AttentionMaskInterface.register("sdpa", _sdpa_mask_causal_by_sdpa)


def output_layer(model) -> torch.nn.Module | None:
    """The (base) model's output embeddings as a module, or None for a model that names none."""
    base = _base(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    return head if isinstance(head, torch.nn.Module) else None


def shifted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE
    )


def repeated_blocks(model) -> dict[str, torch.nn.Module]:
    """The model's decoder layers by their names in the base model: the modules of the classes
    transformers keeps whole when it splits a model across devices (`_no_split_modules`, e.g.
    LlamaDecoderLayer). Empty for a model that names none."""
    base = _base(model)
    names = set(getattr(base, "_no_split_modules", None) or ())
    return {name: m for name, m in base.named_modules() if type(m).__name__ in names}


def _base(model) -> torch.nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class CompiledBlocks:
    """torch.compile on each decoder layer (one compiled code serves them all), and on the
    loss. The compiled layers (torch.compile's wrappers of them) stand in the model only during
    the train step's forward; eval runs the layers themselves, eagerly (other shapes, no
    gradients, and it would compile again for them). A model without named decoder layers is
    compiled whole."""

    def __init__(self, model, backend: str):
        self.blocks = repeated_blocks(model)
        self.whole = None if self.blocks else torch.compile(model, backend=backend)
        self.compiled = {name: torch.compile(block, backend=backend) for name, block in self.blocks.items()}
        self.token_loss = torch.compile(shifted_cross_entropy, backend=backend)

    def loss(self, model, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        base = _base(model)
        for name, compiled in self.compiled.items():
            base.set_submodule(name, compiled)
        try:
            return answer_loss(self.whole or model, input_ids, labels, self.token_loss)
        finally:
            for name, block in self.blocks.items():
                base.set_submodule(name, block)


def keep_input_dtype(model) -> None:
    """Stop PEFT casting each adapted layer's input to the adapter's dtype. PEFT keeps the
    adapter in float32 and casts the bf16 input up for every adapted layer; under bf16
    autocast the adapter's matmul casts it straight back: two copies of the activations per
    adapted layer and step (seven a layer with all projections adapted), and one more held
    for the backward pass. Without the cast the matmul sees the same bf16 values (bf16 ->
    float32 -> bf16 is exact), so the loss and gradients are unchanged (tests/test_step.py).
    DoRA layers (a PEFT "variant") keep the cast: part of their computation uses the float32
    input, and turning it off was seen to change the loss. Only for bf16 autocast: on CPU the
    trial runs in float32 and there is nothing to cast."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer) and not getattr(module, "lora_variant", None):
            module.cast_input_dtype_enabled = False


def spans_devices(model) -> bool:
    """Whether the model's parameters sit on more than one device (a trial given several GPUs,
    `device_map="auto"`). A CUDA graph records the work of one device's stream: captured on
    the first GPU, the layers on the others would not replay. Such a model steps eagerly."""
    return len({p.device for p in model.parameters()}) > 1


class TrainStep:
    """`step(k)` runs forward and backward on optimizer step k's batch (the batch depends
    on the seed and k only); the caller steps the optimizer and never zeroes gradients.
    `mode` is "cuda_graph", "compiled" or "eager".

    `compiled` (a torch.compile backend, "inductor" in trials; `resources.compile`): the
    forward and backward go through torch.compile (`CompiledBlocks`) instead of a graph,
    every batch padded to the split's longest example so one compilation serves every step:
    for long trials of large models, where it fuses what PEFT and the model's norms and
    activations do in many small kernels (bench/results/step_modes.json). It compiles in the
    first step; if that fails (a model dynamo cannot trace, a backend error; not running out
    of memory, which the uncompiled step would too), the trial goes on with the step it would
    have had without compiling, says so in the worker's log and reports that step mode."""

    def __init__(self, model, rows: list[tuple[list[int], list[int]]], batch_size: int, seed: int, max_steps: int,
                 pad_token_id: int, device: torch.device, cuda_graph: bool, compiled=None):
        self.model, self.device = model, device
        self.compiled = CompiledBlocks(model, compiled) if compiled else None
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.ids, self.labels, self.lengths = _padded(rows, pad_token_id, device)
        self.tokens_per_batch = batch_size * self.ids.shape[1]  # padded tokens a step holds in memory
        # every step's batch, chosen up front and copied to the device once: a copy per step
        # from pageable memory would wait for the GPU to drain its queue
        self.schedule = torch.tensor([batch_indices(len(rows), batch_size, seed, k) for k in range(max_steps)])
        self.device_schedule = self.schedule.to(device)
        cuda = device.type == "cuda"
        if cuda:
            keep_input_dtype(model)
        # no weight cache: a graph must re-read the (trained) LoRA weights on every replay
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False) if cuda \
            else torch.autocast("cpu", enabled=False)
        self.graph = None
        self.graph_wanted = cuda_graph and cuda and not spans_devices(model)
        self.compiled_once = False
        self.mode = "compiled" if compiled else "eager"
        if not compiled:
            self._try_graph()

    def _try_graph(self) -> None:
        if not self.graph_wanted:
            return
        causal_attention_as_sdpa_chooses()
        try:
            self._capture()
            self.mode = "cuda_graph"
        except Exception as error:  # noqa: BLE001 - any capture failure means: run eagerly
            self.graph = None
            self._clear_grads()
            log.warning("CUDA graph capture failed (%s: %s); this trial runs its steps eagerly",
                        type(error).__name__, first_line(error))

    def __call__(self, step: int) -> tuple[torch.Tensor, int]:
        """(loss on the GPU, real unpadded tokens in the batch) of optimizer step `step`."""
        if self.compiled is not None and not self.compiled_once:
            try:
                result = self._step(step)
                self.compiled_once = True
                return result
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as error:  # noqa: BLE001 - the step without compiling computes the same
                log.warning("compiling the train step failed (%s: %s); this trial runs without compiling",
                            type(error).__name__, first_line(error))
                self._drop_compiled()
                self._clear_grads()
                self.mode = "eager"
                self._try_graph()
        return self._step(step)

    def _step(self, step: int) -> tuple[torch.Tensor, int]:
        lengths = self.lengths[self.schedule[step]]
        index = self.device_schedule[step]
        if self.graph is None:
            width = self.ids.shape[1] if self.mode == "compiled" else int(lengths.max())
            self._clear_grads()
            ids, labels = self.ids[index, :width].long(), self.labels[index, :width].long()
            with self.autocast:
                loss = self.compiled.loss(self.model, ids, labels) if self.compiled \
                    else answer_loss(self.model, ids, labels, answer_only=True)
            loss.backward()
            return loss.detach(), int(lengths.sum())
        self.static_ids.copy_(self.ids[index])
        self.static_labels.copy_(self.labels[index])
        self.graph.replay()
        return self.static_loss, int(lengths.sum())

    def _capture(self) -> None:
        first = self.device_schedule[0]
        self.static_ids, self.static_labels = self.ids[first].long(), self.labels[first].long()

        def step() -> torch.Tensor:
            with self.autocast:
                loss = answer_loss(self.model, self.static_ids, self.static_labels)
            loss.backward()
            return loss.detach()

        self.graph, self.static_loss = cuda_graph(step, step, self._clear_grads)

    def close(self) -> None:
        """Free the graph's memory, the compiled step and the gradients that live in them."""
        self.graph = None
        self._drop_compiled()
        self._clear_grads()

    def _clear_grads(self) -> None:
        for p in self.params:
            p.grad = None

    def _drop_compiled(self) -> None:
        if self.compiled is not None:
            self.compiled = None
            torch.compiler.reset()  # the next trial's adapter is new modules: it compiles again anyway


class CaptureFailed(RuntimeError):
    """The capture itself raised, after its warm-up ran (the error it raised is the cause)."""


def cuda_graph(warmup: Callable[[], object], step: Callable[[], T], clear_grads: Callable[[], None],
               passes: int = WARMUP_PASSES) -> tuple[torch.cuda.CUDAGraph, T]:
    """`step` captured as a CUDA graph, as `torch.cuda.graph` asks: `warmup` run `passes` times
    on a side stream first, then the gradients cleared so that the captured backward allocates
    them from the graph's pool. The graph, and what `step` returned (its static outputs). What
    the warm-up raises is raised as it is; what the capture raises, as CaptureFailed. A graph
    holds no Python object: every tensor it reads that it did not allocate itself must be kept by
    the caller for as long as the graph is replayed."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(passes):
            warmup()
    torch.cuda.current_stream().wait_stream(side)
    clear_grads()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, capture_error_mode=CAPTURE_ERROR_MODE):
            out = step()
    except Exception as error:
        raise CaptureFailed(first_line(error)) from error
    return graph, out


def first_line(error: BaseException) -> str:
    """The error's first line; with the next one where the first only introduces it (dynamo's
    "backend='inductor' raised:" before the backend's own error)."""
    lines = [text.strip() for text in str(error).splitlines() if text.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):
        return f"{lines[0]} {lines[1]}"
    return lines[0] if lines else ""


_padded_cache: dict = {}


def _padded(rows: list[tuple[list[int], list[int]]], pad_token_id: int, device: torch.device):
    """All rows right-padded to the longest (rounded up to a multiple of 8), as int32 on the
    device (half the memory of int64; a batch is widened when gathered), and their lengths
    on the host. Kept for the worker's next trial: the rows are the same objects (load_split
    reads a split once per worker)."""
    key = (id(rows), len(rows), pad_token_id, str(device))
    if _padded_cache.get("key") == key:
        return _padded_cache["value"]
    batch = collate(rows, pad_token_id, torch.device("cpu"))
    extra = -batch["input_ids"].shape[1] % 8
    ids = torch.nn.functional.pad(batch["input_ids"], (0, extra), value=pad_token_id).to(torch.int32)
    labels = torch.nn.functional.pad(batch["labels"], (0, extra), value=IGNORE).to(torch.int32)
    value = (ids.to(device), labels.to(device), batch["attention_mask"].sum(dim=1))
    _padded_cache.clear()
    _padded_cache.update(key=key, value=value, rows=rows)  # holding rows keeps id(rows) from being reused
    return value
