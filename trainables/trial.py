"""What runs inside one trial: a PEFT fine-tune of the cached base model.

Reads top to bottom: set up (base model from the worker's cache, adapter from the
trial's exact `lora_config`, PEFT's LoRA+ AdamW), train, and every `eval_every` steps
evaluate, checkpoint the adapter and report to Tune. Whatever happens, the adapter is
removed from the cached base model and its memory freed before the worker takes the next
trial (Tune reuses the worker).
"""

from __future__ import annotations

import gc
import tempfile
import time
from pathlib import Path

import torch

from rundir.params import TrialParams
from trainables.checkpoint import PROCESS, TrialCheckpoint, adapter_config
from trainables.config import TrialSetup, let_tune_wait_for_the_last_trial
from trainables.cores import CoreShare, node_cpus
from trainables.data import load_split
from trainables.divergence import eval_diverged, train_diverged
from trainables.evaluation import evaluate, model_eval_budget
from trainables.generate import AnswerMetrics
from trainables.metrics import Progress, trial_report
from trainables.model import forget_base_model, hide_bitsandbytes_unless_needed, load_base_model, return_freed_memory
from trainables.optim import loraplus_adamw, warmup_cosine
from trainables.step import TrainStep


def train_lora(config: dict, setup: TrialSetup) -> None:
    """Train one configuration, `config` being Tune's config of the trial (read once, as a
    `TrialParams`); every `setup.eval_every` steps and at `setup.max_steps`, evaluate, save a
    `TrialCheckpoint` and report a `TrialReport` (rundir/report.py: the loss, accuracy and their
    per-row values, timings and memory) to Tune with it; with `setup.generate_examples`, the
    report has `eval_exact_match` and the user's metric too (trainables/generate.py), at
    `setup.max_steps`, or at every report with `setup.generate_every_round`."""
    called_at = time.time()
    let_tune_wait_for_the_last_trial()
    hide_bitsandbytes_unless_needed(setup.quantization, setup.trust_remote_code)
    import peft  # noqa: F401 - here, so that its import counts in the trial's imports (Progress.imported_at)

    progress = Progress(called_at=called_at, imported_at=time.time())
    params = TrialParams.from_config(config)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    torch.set_num_threads(setup.cpu_threads)
    cores = None if cuda else CoreShare(setup.cpu_threads, node_cpus(setup.cpu_threads))
    try:
        _set_up_and_train(params, setup, device, progress, cores)
    finally:
        if cores is not None:
            cores.close()


def _set_up_and_train(params: TrialParams, setup: TrialSetup, device: torch.device, progress: Progress,
                      cores: CoreShare | None) -> None:
    from peft import LoraConfig, get_peft_model

    cuda = device.type == "cuda"
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
        optimizer = loraplus_adamw(model, params.learning_rate, params.loraplus_lr_ratio, cuda)
        scheduler = warmup_cosine(optimizer, setup.warmup_steps, setup.max_steps)
        restore(model, optimizer, scheduler, params.start_from, progress)
        _train(model, optimizer, scheduler, params, setup, train_rows, eval_rows, answer_metrics, device, progress,
               cores)
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
            return_freed_memory()
            if cuda:
                torch.cuda.empty_cache()


def _train(model, optimizer, scheduler, params: TrialParams, setup: TrialSetup, train_rows, eval_rows,
           answer_metrics: AnswerMetrics | None, device: torch.device, progress: Progress,
           cores: CoreShare | None = None) -> None:
    """Steps from `progress.step` to `setup.max_steps`; every `eval_every` steps and at the last,
    an evaluation (loss, then `answer_metrics` where given), a checkpoint and a report. On CPU,
    `cores` sets the threads of each step and evaluation to the trial's share of its node."""
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
    budget = model_eval_budget(model, train_step.tokens_per_batch, setup.gradient_checkpointing) if cuda else None
    loss_sum, loss_count = torch.zeros((), device=device), 0
    try:
        while progress.step < setup.max_steps:
            started = time.perf_counter()
            if cores is not None:
                cores.apply()
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
            if diverged := train_diverged(train_loss, progress.step):
                raise diverged
            started = time.perf_counter()
            if cores is not None:
                cores.apply()
            evaluation = evaluate(model, eval_rows, setup.pad_token_id, device, autocast, budget)
            if diverged := eval_diverged(evaluation.loss, progress.step):
                raise diverged
            generating = time.perf_counter()
            answering = answer_metrics and (setup.generate_every_round or progress.step == setup.max_steps)
            answered = answer_metrics(model, setup.pad_token_id, device, autocast) if answering else {}
            progress.generate_seconds += time.perf_counter() - generating
            progress.eval_seconds += time.perf_counter() - started
            report = trial_report(progress, evaluation, answered, train_loss, trainable_params, setup.total_params,
                                  cuda, train_step.mode)
            with tempfile.TemporaryDirectory() as checkpoint_dir:
                checkpoint(model, optimizer, scheduler, progress).save(Path(checkpoint_dir))
                tune.report(report.to_dict(), checkpoint=tune.Checkpoint.from_directory(checkpoint_dir))
            loss_sum, loss_count = torch.zeros((), device=device), 0
            progress.busy_from = time.time()
    finally:
        train_step.close()


def checkpoint(model, optimizer, scheduler, progress: Progress) -> TrialCheckpoint:
    """The trial's checkpoint now; its dropout masks come from torch's default generators."""
    from peft import get_peft_model_state_dict

    config = adapter_config(model.peft_config["default"], model.get_base_model().name_or_path)
    return TrialCheckpoint.take(progress, get_peft_model_state_dict(model), config, optimizer, scheduler,
                                [torch.get_rng_state(), *_cuda_rng_states()], PROCESS)


def _cuda_rng_states() -> list[torch.Tensor]:
    return torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []


def restore(model, optimizer, scheduler, start_from: str | None, progress: Progress) -> None:
    """Continue from Tune's checkpoint of this trial (a retry or a resumed run), else from
    `start_from` (a promotion), else leave everything as a fresh trial has it. A checkpoint of a
    shared trainer's slot continues too, its dropout masks drawn afresh."""
    from peft import set_peft_model_state_dict

    from trainables.client import checkpoint_to_continue

    tune_checkpoint = checkpoint_to_continue(start_from)
    if tune_checkpoint is None:
        return
    with tune_checkpoint.as_directory() as directory:
        state = TrialCheckpoint.load(Path(directory))
    set_peft_model_state_dict(model, state.adapter)
    state.restore(optimizer, scheduler, progress)
    if state.dropout_rng_of == PROCESS:  # the masks continue as they would have
        cpu, *cuda = state.dropout_rng
        torch.set_rng_state(cpu)
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
