"""What runs inside one trial: a PEFT fine-tune of the cached base model.

Reads top to bottom: set up (base model from the worker's cache, adapter from the
trial's exact `lora_config`, PEFT's LoRA+ AdamW), train, and every `eval_every` steps
evaluate, checkpoint the adapter and report to Tune. Whatever happens, the adapter is
removed from the cached base model and its memory freed before the worker takes the next
trial (Tune reuses the worker).
"""

from __future__ import annotations

import gc
import math
import resource
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rundir.params import TrialParams
from trainables.config import TrialSetup, let_tune_wait_for_the_last_trial
from trainables.data import IGNORE, collate, load_split
from trainables.generate import AnswerMetrics, standard_error
from trainables.model import forget_base_model, hide_bitsandbytes_unless_needed, load_base_model
from trainables.step import TrainStep

EVAL_BATCH = 16  # rows per eval batch on CPU; on GPU a token budget decides:
# A batch's bf16 logits span the vocabulary, so the budget is what keeps them within
# EVAL_LOGITS_BYTES: a 262k-token vocabulary gets 2048 tokens a batch, a 49k one 10922 (8x a
# short train batch's tokens were 16k-token batches of 8.6 GB of logits with a 262k vocabulary,
# and as much again in float32 for the answer positions: issue 19's trials held up to 25.7 GB).
# Never fewer than a train batch's tokens, whose logits training holds anyway. Eval keeps no
# activations for a backward pass, so past the logits a batch holds less than a train step.
EVAL_LOGITS_BYTES = 1 << 30


def eval_token_budget(train_tokens_per_batch: int, vocab_size: int) -> int:
    """Padded tokens per eval batch on GPU: as many as keep the batch's bf16 logits within
    EVAL_LOGITS_BYTES, and at least a train batch's."""
    return max(train_tokens_per_batch, EVAL_LOGITS_BYTES // (2 * vocab_size))


WORKER_STARTED = time.time()  # when this worker process first loaded the trial code (a reused worker keeps it)


class TrialDiverged(RuntimeError):
    """The loss became NaN or infinite: the trial ends as failed, never as a result."""


@dataclass
class Progress:
    """Where a trial stands. The counters continue from a checkpoint; the clock readings (epoch
    seconds) are this call's, for bench/search_vs_grid.py's account of where a search's time goes."""

    called_at: float          # when Tune called the trial function
    imported_at: float        # when it had imported PEFT; its setup runs from here to the first busy_from
    busy_from: float = 0.0    # since when it has done nothing but train and evaluate (restarts at each report)
    step: int = 0             # optimizer steps taken
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    generate_seconds: float = 0.0  # the part of eval_seconds spent generating answers
    tokens: int = 0           # real (unpadded) tokens trained on

    def metrics(self) -> dict:
        """The report's keys that come from here; `busy_to` is now."""
        return {
            "step": self.step,
            "train_seconds": self.train_seconds,
            "tokens_per_second": self.tokens / self.train_seconds,
            "eval_seconds": self.eval_seconds,
            "eval_generate_seconds": self.generate_seconds,
            "busy_from": self.busy_from,
            "busy_to": time.time(),
            "called_at": self.called_at,
            "entered_at": self.imported_at,
            "worker_started_at": WORKER_STARTED,
        }


def train_lora(config: dict, setup: TrialSetup) -> None:
    """Train one configuration, `config` being Tune's config of the trial (read once, as a
    `TrialParams`); report `step, eval_loss, eval_accuracy, train_loss, trainable_params,
    trainable_pct, train_seconds, tokens_per_second, peak_memory_gb, peak_allocated_gb` (and the timings of
    `Progress.metrics`) to Tune every `setup.eval_every` steps and at `setup.max_steps`; with
    `setup.generate_examples`, also `eval_exact_match` and the user's metric under its name
    (trainables/generate.py), at `setup.max_steps`, or at every report with
    `setup.generate_every_round`. `eval_loss_se`, `eval_accuracy_se` and `eval_exact_match_se` are
    their standard errors over the eval rows, and `eval_row_loss`, `eval_row_accuracy` and
    `eval_row_exact_match` their per-row values, in the eval split's order (`Evaluation`)."""
    called_at = time.time()
    let_tune_wait_for_the_last_trial()
    hide_bitsandbytes_unless_needed(setup.quantization, setup.trust_remote_code)
    from peft import LoraConfig, get_peft_model

    progress = Progress(called_at=called_at, imported_at=time.time())
    params = TrialParams.from_config(config)
    torch.set_num_threads(setup.cpu_threads)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.init()  # resetting the statistics needs CUDA started; without bitsandbytes no import starts it
        for index in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(index)
    base = load_base_model(setup.model_path, setup.dtype, setup.quantization, setup.trust_remote_code, device,
                           setup.gradient_checkpointing)
    train_rows = load_split(setup.data_dir, "train" if params.full_data else "search_train")
    eval_rows = load_split(setup.data_dir, "eval")
    answer_metrics = AnswerMetrics.for_trial(eval_rows, setup)

    torch.manual_seed(params.seed)
    model = get_peft_model(base, LoraConfig(**params.lora_config))
    optimizer = scheduler = None
    try:
        optimizer = _optimizer(model, params.learning_rate, params.loraplus_lr_ratio, cuda)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(setup.warmup_steps, setup.max_steps))
        _restore(model, optimizer, scheduler, params.start_from, progress)
        _train(model, optimizer, scheduler, params, setup, train_rows, eval_rows, answer_metrics, device, progress)
    finally:
        del optimizer, scheduler
        try:
            model.unload()
        except Exception:
            forget_base_model()
            raise
        finally:
            del model
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()


def _optimizer(model, learning_rate: float, loraplus_lr_ratio: float, cuda: bool) -> torch.optim.Optimizer:
    """AdamW with PEFT's LoRA+ groups: `lora_B` and every one-dimensional parameter (DoRA's
    magnitudes) at `learning_rate * loraplus_lr_ratio`, the rest (`lora_A`) at `learning_rate`.
    PEFT's group for LoRA on embeddings, at a fixed rate of its own, stays empty: the search
    adapts only Linear and Conv1D layers (search/inputs/modules.py)."""
    from peft.optimizers import create_loraplus_optimizer

    # on CPU, the multi-tensor kernels: torch chooses them by itself on GPU only
    return create_loraplus_optimizer(model, torch.optim.AdamW, lr=learning_rate, loraplus_lr_ratio=loraplus_lr_ratio,
                                     weight_decay=0.0, fused=cuda, foreach=None if cuda else True)


def _schedule(warmup_steps: int, max_steps: int):
    """Linear warm-up, then cosine decay to 10% at max_steps: the same for every trial,
    so trials compared at a rung saw the same schedule."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        fraction = (step - warmup_steps) / max(1, max_steps - warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, fraction)))

    return factor


def _train(model, optimizer, scheduler, params: TrialParams, setup: TrialSetup, train_rows, eval_rows,
           answer_metrics: AnswerMetrics | None, device: torch.device, progress: Progress) -> None:
    """Steps from `progress.step` to `setup.max_steps`; every `eval_every` steps and at the last,
    an evaluation (loss, then `answer_metrics` where given), a checkpoint and a report."""
    from ray import tune

    cuda = device.type == "cuda"
    trainable_params = model.get_nb_trainable_parameters()[0]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    model.train()
    progress.busy_from = time.time()
    started = time.perf_counter()
    train_step = TrainStep(model, train_rows, setup.batch_size, params.seed, setup.max_steps, setup.pad_token_id,
                           device, cuda_graph=setup.cuda_graphs,
                           compiled="inductor" if setup.compile and cuda else None)
    progress.train_seconds += time.perf_counter() - started  # the capture counts as training time
    vocab_size = model.config.get_text_config().vocab_size
    eval_budget = eval_token_budget(train_step.tokens_per_batch, vocab_size) if cuda else 0
    loss_sum, loss_count = torch.zeros((), device=device), 0
    try:
        while progress.step < setup.max_steps:
            started = time.perf_counter()
            loss, batch_tokens = train_step(progress.step)
            optimizer.step()
            scheduler.step()
            loss_sum += loss
            loss_count += 1
            progress.step += 1
            progress.tokens += batch_tokens
            if progress.step % setup.eval_every and progress.step != setup.max_steps:
                progress.train_seconds += time.perf_counter() - started
                continue
            train_loss = (loss_sum / loss_count).item()  # the one host sync between reports
            progress.train_seconds += time.perf_counter() - started
            if not math.isfinite(train_loss):
                raise TrialDiverged(f"train loss became {train_loss} by step {progress.step}")
            started = time.perf_counter()
            evaluation = evaluate(model, eval_rows, setup.pad_token_id, device, autocast, eval_budget)
            if not math.isfinite(evaluation.loss):
                raise TrialDiverged(f"eval loss became {evaluation.loss} at step {progress.step}")
            generating = time.perf_counter()
            answering = answer_metrics and (setup.generate_every_round or progress.step == setup.max_steps)
            answered = answer_metrics(model, setup.pad_token_id, device, autocast) if answering else {}
            progress.generate_seconds += time.perf_counter() - generating
            progress.eval_seconds += time.perf_counter() - started
            metrics = {**evaluation.metrics(), **answered, "train_loss": train_loss,
                       "trainable_params": trainable_params,
                       "trainable_pct": 100.0 * trainable_params / setup.total_params,
                       "peak_memory_gb": process_peak_gb(cuda),
                       "peak_allocated_gb": allocated_peak_gb(cuda), "step_mode": train_step.mode, **progress.metrics()}
            with tempfile.TemporaryDirectory() as checkpoint_dir:
                _save(Path(checkpoint_dir), model, optimizer, scheduler, progress)
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(checkpoint_dir))
            loss_sum, loss_count = torch.zeros((), device=device), 0
            progress.busy_from = time.time()
    finally:
        train_step.close()


@dataclass(frozen=True)
class Evaluation:
    """A trial's evaluation: `loss` and `accuracy` are means over all answer tokens (every token
    weighs the same, whatever row it is in); their standard errors (`loss_se`, `accuracy_se`)
    are those of the mean over rows of each row's own mean (`generate.standard_error`): the rows
    are the sample, and tokens of one row are not independent of each other. Where rows have
    similar answer lengths the two means agree; the standard error is of the per-row one.

    `row_loss` and `row_accuracy` are those per-row means, one per eval row that has an answer
    token, in the order of the rows evaluated (the eval split's): every trial of a run scores the
    same rows, and which rows lack an answer token depends on the data alone, so two trials'
    lists pair row by row (the pick's paired comparison, analysis/select.py)."""

    loss: float
    accuracy: float
    loss_se: float
    accuracy_se: float
    row_loss: list[float]
    row_accuracy: list[float]

    def metrics(self) -> dict[str, float | list[float]]:
        return {"eval_loss": self.loss, "eval_loss_se": self.loss_se,
                "eval_accuracy": self.accuracy, "eval_accuracy_se": self.accuracy_se,
                "eval_row_loss": rounded(self.row_loss), "eval_row_accuracy": rounded(self.row_accuracy)}


def rounded(values: list[float]) -> list[float]:
    """`values` to 9 significant digits: the token losses are computed in float32 (about 7), and
    result.json keeps a list per eval round, which float64's 17 digits would make almost twice
    as long."""
    return [float(f"{value:.9g}") for value in values]


@torch.no_grad()
def evaluate(model, rows, pad_token_id: int, device, autocast, token_budget: int = 0) -> Evaluation:
    """Loss and accuracy over the answer tokens of `rows` (teacher forcing), with standard errors
    over the rows (`Evaluation`). Batches hold up to `token_budget`
    padded tokens (on GPU: a small model's eval is then a few launches), or without one
    (CPU) EVAL_BATCH rows. Rows are right-padded and no attention mask is passed, as in
    training (causal attention: no real token sees the padding after it). The sums stay on
    the device and are read once at the end (selecting the answer positions still waits for
    each batch's logits)."""
    model.eval()
    row_losses, row_correct, row_counts = [], [], []  # per row: summed loss, correct tokens, answer tokens
    order = sorted(range(len(rows)), key=lambda index: len(rows[index][0]))  # similar lengths together: less padding
    rows = [rows[index] for index in order]
    start = 0
    while start < len(rows):
        end = min(len(rows), start + EVAL_BATCH)
        if token_budget:  # as many rows as fit: (rows) x (the longest's length)
            end = start + 1
            while end < len(rows) and (end - start + 1) * len(rows[end][0]) <= token_budget:
                end += 1
        chunk = rows[start:end]
        start = end
        batch = collate(chunk, pad_token_id, torch.device("cpu"))
        ids, labels = (batch[k].to(device, non_blocking=True) for k in ("input_ids", "labels"))
        with autocast:
            logits = model(input_ids=ids).logits
        labels = labels[:, 1:]
        keep = labels != IGNORE
        answer_logits, answer_labels = logits[:, :-1][keep].float(), labels[keep]  # answer positions only
        row_of_token = keep.nonzero()[:, 0]
        token_losses = torch.nn.functional.cross_entropy(answer_logits, answer_labels, reduction="none").double()
        token_correct = (answer_logits.argmax(-1) == answer_labels).long()
        row_losses.append(torch.zeros(len(chunk), device=device, dtype=torch.float64).index_add_(0, row_of_token, token_losses))
        row_correct.append(torch.zeros(len(chunk), device=device, dtype=torch.long).index_add_(0, row_of_token, token_correct))
        row_counts.append(keep.sum(1))
    model.train()
    rows_order = torch.argsort(torch.tensor(order))  # from the batches' order back to the rows' own
    losses, correct, counts = (torch.cat(parts).cpu()[rows_order] for parts in (row_losses, row_correct, row_counts))
    answered = counts > 0  # a row whose answer was truncated away has no token to score
    count = int(counts.sum())
    row_loss = (losses[answered] / counts[answered]).tolist()
    row_accuracy = (correct[answered] / counts[answered]).tolist()
    return Evaluation(
        loss=losses.sum().item() / count,
        accuracy=correct.sum().item() / count,
        loss_se=standard_error(row_loss),
        accuracy_se=standard_error(row_accuracy),
        row_loss=row_loss,
        row_accuracy=row_accuracy,
    )


def process_peak_gb(cuda: bool) -> float:
    """GPU: the most this trial's process held on its GPUs, as `nvidia-smi` counts a process (a
    cluster is sized from it): the allocator's peak reserve plus what the process holds outside
    the allocator (`outside_allocator`). CPU: the worker process's peak resident set."""
    if cuda:
        # a trial given several GPUs (device_map="auto") counts them all
        reserved = sum(torch.cuda.max_memory_reserved(i) for i in range(torch.cuda.device_count()))
        return (reserved + outside_allocator()[0]) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def allocated_peak_gb(cuda: bool) -> float:
    """GPU: the allocator's own peak, the tensors alone, over the trial's GPUs. CPU: as
    `process_peak_gb` (no allocator keeps a peak there)."""
    if cuda:
        return sum(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())) / 2**30
    return process_peak_gb(cuda)


# The CUDA context, which only NVML sees (it exists before the allocator's first byte): an
# estimate per GPU where pynvml is not installed; bench/memory_share.py prints NVML's figure.
CONTEXT_BYTES = 600 * 2**20


def outside_allocator() -> tuple[int, str]:
    """Bytes this process holds on its GPUs outside PyTorch's allocator (the CUDA context,
    cuBLAS's and CUDA graphs' own memory) and where the figure comes from: "nvml" (the
    process's memory as `nvidia-smi` lists it, less the allocator's reserve now), or
    "estimate" (CONTEXT_BYTES per GPU it used) where pynvml is not installed."""
    import os

    devices = [i for i in range(torch.cuda.device_count()) if torch.cuda.max_memory_reserved(i)]  # those it used
    try:
        import pynvml
    except ImportError:
        return CONTEXT_BYTES * len(devices), "estimate"
    pynvml.nvmlInit()
    try:
        held = sum(process.usedGpuMemory or 0 for index in range(pynvml.nvmlDeviceGetCount())
                   for process in pynvml.nvmlDeviceGetComputeRunningProcesses(pynvml.nvmlDeviceGetHandleByIndex(index))
                   if process.pid == os.getpid())
    finally:
        pynvml.nvmlShutdown()
    return max(0, held - sum(torch.cuda.memory_reserved(i) for i in devices)), "nvml"


def _save(directory: Path, model, optimizer, scheduler, progress: Progress) -> None:
    """Adapter (a loadable PEFT adapter directory: config and safetensors), optimizer state
    and the progress counters only: never the base model."""
    model.save_pretrained(directory / "adapter")
    torch.save({
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "step": progress.step,
        "train_seconds": progress.train_seconds,
        "eval_seconds": progress.eval_seconds,
        "generate_seconds": progress.generate_seconds,
        "tokens": progress.tokens,
        "rng": torch.get_rng_state(),  # dropout masks continue as they would have
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }, directory / "trainer_state.pt")


def _restore(model, optimizer, scheduler, start_from: str | None, progress: Progress) -> None:
    """Continue from Tune's checkpoint of this trial (a retry or a resumed run), else from
    `start_from` (a stopped trial promoted to the full budget), else leave everything as a
    fresh trial has it. Sets `progress`'s counters to the checkpoint's."""
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights

    from trainables.client import checkpoint_to_continue

    checkpoint = checkpoint_to_continue(start_from)
    if checkpoint is None:
        return
    with checkpoint.as_directory() as directory:
        set_peft_model_state_dict(model, load_peft_weights(str(Path(directory) / "adapter"), device="cpu"))
        state = torch.load(Path(directory) / "trainer_state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    if state["cuda_rng"]:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    progress.step, progress.tokens = state["step"], state["tokens"]
    progress.train_seconds, progress.eval_seconds = state["train_seconds"], state["eval_seconds"]
    progress.generate_seconds = state["generate_seconds"]
