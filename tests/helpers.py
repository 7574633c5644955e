"""Helpers that several test modules share: hand-made trial tables and run directories (in the
layout Ray 2.60 was seen to write), the command line run in a fresh interpreter, and the processes
a test's Ray left running, and stand-ins for CUDA's streams and graphs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from analysis.config import SelectionConfig
from analysis.results import COLUMNS, curves_table, lora_configs, read_run_config, read_trial_files, trials_table
from rundir.params import Origin, TrialParams

ROOT = Path(__file__).resolve().parent.parent

# Hand-made trial tables and run directories: the full budget, the eval rounds, the module sets.
MAX_STEPS = 100
EVAL_EVERY = 25
MODULE_SETS = {"attention_qv": ["q_proj", "v_proj"], "attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
               "mlp": ["gate_proj", "up_proj", "down_proj"]}


def load_trials(run_dir) -> pd.DataFrame:
    """The trial table of the run at `run_dir`, as the analysis builds it from the run's files."""
    run_config = read_run_config(run_dir)
    return trials_table(read_trial_files(run_dir), run_config.budget.max_steps,
                        SelectionConfig.recorded(run_config.selection).metric)


def load_curves(run_dir) -> pd.DataFrame:
    """Every reported step of every trial of the run at `run_dir`, as the analysis reads them."""
    return curves_table(read_trial_files(run_dir), SelectionConfig.recorded(read_run_config(run_dir).selection).metric)


def load_lora_configs(run_dir) -> dict[str, dict]:
    """The `LoraConfig` arguments of each trial of the run at `run_dir`, by trial id."""
    return lora_configs(read_trial_files(run_dir))


def table(*trials: dict) -> pd.DataFrame:
    """A trial table (trials_table's columns): each dict overrides a finished trial's defaults; ids t0, t1, ..."""
    default = {
        "status": "finished", "origin": "search", "module_set": "attention_qv", "target_modules": '["q_proj", "v_proj"]',
        "r": 8, "alpha_ratio": 2.0, "lora_alpha": 16, "lora_dropout": 0.05, "use_rslora": False, "use_dora": False,
        "learning_rate": 2e-4, "loraplus_lr_ratio": 1.0, "seed": 0, "step": MAX_STEPS, "eval_loss": 1.0,
        "eval_accuracy": 0.5, "train_loss": 1.0, "trainable_params": 1000, "trainable_pct": 0.1, "train_seconds": 10.0,
        "tokens_per_second": 100.0, "peak_memory_gb": 1.0, "error": "",
    }
    rows = [{"trial_id": f"t{n}", **default, **trial} for n, trial in enumerate(trials)]
    return pd.DataFrame.from_records(rows, columns=list(COLUMNS))


def configs(trials: pd.DataFrame) -> dict[str, dict]:
    return {trial_id: {"r": int(r), "lora_alpha": 2 * int(r)} for trial_id, r in zip(trials["trial_id"], trials["r"])}


RAY_TRACEBACK = """Failure # 1 (occurred at 2026-11-23_09-37-09)
\x1b[36mray::ImplicitFunc.train()\x1b[39m (pid=3123, ip=192.0.2.2, actor_id=09b7da19, repr=train_lora)
           ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^
  File "/venv/lib/python3.11/site-packages/ray/tune/trainable/function_trainable.py", line 249, in _trainable_func
    output = fn()
             ^^^^
  File "/work/main/trainables/train.py", line 88, in train_lora
    raise TrialDiverged(f"loss became nan at step {step}")
ERROR_LINE
"""


def ray_traceback(error_line: str) -> str:
    """error.txt as Ray writes it for a trial that raised, ending in `error_line`."""
    return RAY_TRACEBACK.replace("ERROR_LINE", error_line)


def write_run_config(run_dir: Path, *, max_steps: int = MAX_STEPS, base_model_path: str = "/models/tiny",
                     metric: str = "eval_loss", mode: str = "min", tolerance: float = 0.95,
                     cost: str = "trainable_params", resources: dict | None = None,
                     started_at: float | None = None) -> Path:
    """Write `<run_dir>/run_config.json` as the driver does (`resources` overrides a CPU run's; `started_at`
    the command's start, None where it was not recorded); return `run_dir`."""
    run_dir.mkdir(parents=True, exist_ok=True)
    split = {"source": "builtin:arithmetic", "format": "prompt_completion", "truncated": 0, "dropped": 0, "empty": 0}
    config = {
        "name": "demo", "seed": 0, "output": "runs",
        "model": {"path": base_model_path},
        "data": {"task": "arithmetic"},
        "task": {"kind": "domain"},
        "search": {"module_sets": list(MODULE_SETS), "ranks": [4, 8, 16], "alpha_ratios": [1.0, 2.0],
                   "dropout": [0.0, 0.1], "use_rslora": [False, True], "use_dora": [False],
                   "learning_rate": [1e-4, 1e-3], "loraplus_lr_ratio": [1.0]},
        "budget": {"num_samples": 8, "max_steps": max_steps, "eval_every": EVAL_EVERY, "grace_period": 25,
                   "reduction_factor": 2, "batch_size": 8, "warmup_steps": 4, "landscape_seeds": 2},
        "resources": {"gpus_per_trial": 0.0, "cpus_per_trial": 1, "max_concurrent_trials": 0, "max_failures": 0,
                      "memory_margin": 0.25, "cuda_graphs": True, "compile": False, "packing": "processes", "packing_reason": "",
                      "pack_slots": 8, "pack_compile_layers": False, "memory_probe": None, **(resources or {})},
        "selection": {"metric": metric, "mode": mode, "tolerance": tolerance, "cost": cost},
        "tracking": {},
        "base_model": {"path": base_model_path, "name": base_model_path, "origin": "a local directory",
                       "total_params": 1_000_000},
        "data_info": {"template": "plain", "max_length": 128,
                      "train": {"key": "data.train", "part": "split 'train'", "rows": 400, **split},
                      "eval": {"key": "data.train", "part": "split 'eval'", "rows": 100, **split},
                      "train_rows": 400, "search_train_rows": 400, "eval_rows": 100, "pad_token_id": 0,
                      "train_turns": "all", "eval_rows_kept": 100, "eval_chosen_by": "a shuffle seeded by seed=0",
                      "example": "question?\n[[answer]]"},
        "module_sets": {name: {"target_modules": names, "layers": 4, "note": None} for name, names in MODULE_SETS.items()},
        "created_by": "lora-search",
        "training": {"optimizer": "AdamW, one step per batch", "schedule": "linear warm-up, then cosine decay"},
        "started_at": started_at,
    }
    (run_dir / "run_config.json").write_text(json.dumps(config, indent=2))
    return run_dir


def add_trial(run_dir: Path, trial_id: str, *, last_step: int | None = MAX_STEPS, eval_loss: float = 1.0,
              eval_accuracy: float | None = None, trainable_params: int | None = None,
              train_seconds: float | None = None, error: str | None = None, error_text: str | None = None,
              experiment: str = "tune", dir_name: str | None = None, module_set: str = "attention_qv", r: int = 8,
              alpha_ratio: float = 2.0, lora_dropout: float = 0.05, use_rslora: bool = False,
              learning_rate: float = 2e-4, origin: str = "search", parent: str | None = None,
              seed: int = 0, step_mode: str | None = None, eval_loss_se: float | None = None,
              eval_row_loss: list[float] | None = None, eval_exact_match: float | None = None,
              clock: tuple[float, float] | None = None) -> Path:
    """Write one trial directory the way Ray does; return it.

    Reports every EVAL_EVERY steps up to `last_step` (None: no report at all); the last report
    carries `eval_loss` (earlier ones are worse), each with `eval_loss_se` and the per-row losses
    `eval_row_loss` where given, and `eval_exact_match` at every report where given. `clock`
    (start, seconds per step) gives each report the trial's clock readings: called at start, its
    first step at start + 1 s (its setup), reporting step n at start + n * seconds per step, each
    later report busy since the one before. `error` is the last line of a Ray traceback
    in error.txt; `error_text` the whole file. `experiment` is the stage's experiment directory,
    `dir_name` the trial directory's name (default: the driver's `trial_<id>`). Defaults: trainable params r * 1,000 per module,
    train_seconds a tenth of a second per step and rank.
    """
    trial_dir = run_dir / experiment / (dir_name or f"trial_{trial_id}")
    trial_dir.mkdir(parents=True)
    targets = MODULE_SETS[module_set]
    lora_config = {"r": r, "lora_alpha": alpha_ratio * r, "lora_dropout": lora_dropout, "target_modules": targets,
                   "use_rslora": use_rslora, "use_dora": False, "fan_in_fan_out": False, "bias": "none",
                   "task_type": "CAUSAL_LM"}
    # as Tune stores it: the trial contract, and the values Optuna sampled, which Ray merges in
    params = {"r": r, "use_rslora": use_rslora, "use_dora": False, "lora_dropout": lora_dropout,
              **TrialParams(lora_config=lora_config, module_set=module_set, alpha_ratio=alpha_ratio,
                            learning_rate=learning_rate, loraplus_lr_ratio=1.0, seed=seed, origin=Origin(origin),
                            parent=parent).to_config()}
    (trial_dir / "params.json").write_text(json.dumps(params, indent=2))
    trainable_params = trainable_params if trainable_params is not None else r * 1_000 * len(targets)
    rows = []
    for step in range(EVAL_EVERY, (last_step or 0) + 1, EVAL_EVERY):
        loss = eval_loss + (last_step - step) / 100
        rows.append({
            "step": step, "eval_loss": loss,
            "eval_accuracy": eval_accuracy if eval_accuracy is not None else 1 - loss / 4,
            "train_loss": loss * 0.9, "trainable_params": trainable_params,
            "trainable_pct": 100 * trainable_params / 1_000_000,
            "train_seconds": train_seconds if train_seconds is not None else 0.1 * step * r,
            "eval_seconds": 0.2 * step,
            "tokens_per_second": 1000.0, "peak_memory_gb": 0.5 + r / 100,
            **({"step_mode": step_mode} if step_mode else {}),
            **({"eval_loss_se": eval_loss_se} if eval_loss_se is not None else {}),
            **({"eval_row_loss": eval_row_loss} if eval_row_loss is not None else {}),
            **({"eval_exact_match": eval_exact_match} if eval_exact_match is not None else {}),
            **({"called_at": clock[0],
                "busy_from": clock[0] + (step - EVAL_EVERY) * clock[1] + (1.0 if step == EVAL_EVERY else 0.0),
                "busy_to": clock[0] + step * clock[1]} if clock else {}),
            # What Ray adds to every reported row:
            "timestamp": 1795426629, "checkpoint_dir_name": None, "done": False, "training_iteration": step // EVAL_EVERY,
            "trial_id": trial_id, "date": "2026-11-23_09-37-09", "time_this_iter_s": 0.1, "time_total_s": 0.1 * step,
            "pid": 3122, "hostname": "vm", "node_ip": "192.0.2.2", "config": params,
            "time_since_restore": 0.1 * step, "iterations_since_restore": step // EVAL_EVERY,
        })
    if rows:
        (trial_dir / "result.json").write_text("".join(json.dumps(row) + "\n" for row in rows))
    if error is not None or error_text is not None:
        (trial_dir / "error.txt").write_text(error_text or ray_traceback(error))
    return trial_dir


# The command line, in a fresh interpreter.
HEAVY = {"torch", "ray", "transformers", "peft", "optuna", "datasets", "pandas"}


def run_cli(*args: str, cwd: Path = ROOT) -> tuple[int, str, str, set[str]]:
    """Run `python -m search.run ARGS` in a fresh interpreter: its exit code, stdout, stderr
    without the import timings, and the heavy packages it imported (from `-X importtime`)."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "search.run", *args],
                          cwd=cwd, capture_output=True, text=True, timeout=120)
    timings = [line for line in done.stderr.splitlines() if line.startswith("import time:")]
    stderr = "\n".join(line for line in done.stderr.splitlines() if not line.startswith("import time:"))
    imported = {line.rsplit("|", 1)[1].strip().split(".")[0] for line in timings[1:]}  # [0] is the header
    return done.returncode, done.stdout, stderr, imported & HEAVY


def start_cli(args: list[str], **popen) -> subprocess.Popen:
    """Start `python -m search.run ARGS` with this checkout on the path; stdout and stderr together."""
    return subprocess.Popen([sys.executable, "-m", "search.run", *args], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


# The search that the kill and resume tests interrupt.
INTERRUPTED_TRIALS = 6


def interrupted_search_args(tiny_model_dir, output: Path, name: str) -> list[str]:
    """One trial at a time and no dropout, so an interrupted run can be compared exactly."""
    sets = [f"model.path={tiny_model_dir}", "search.module_sets=[attention_qv,mlp,all_linear]", "search.ranks=[2,4,8]",
            "search.learning_rate=[1e-3,2e-2]", "search.dropout=[0.0,0.0]", f"budget.num_samples={INTERRUPTED_TRIALS}",
            "budget.max_steps=12", "budget.eval_every=3", "budget.grace_period=3", "budget.reduction_factor=3",
            "budget.batch_size=4", "data.eval_examples=8", "resources.max_concurrent_trials=1"]
    return ["--output", str(output), "--name", name, *[x for s in sets for x in ("--set", s)]]


# The driver, SIGKILLed the moment a trial's superseded checkpoint is deleted (Tune deletes none:
# search/tuning/checkpoints.py does, through the run's storage filesystem), with the rest of that trial's
# superseded checkpoints, and every other trial's, still there.
KILLED_AS_TUNE_DELETES_A_CHECKPOINT = """
import os, runpy, signal, sys
from rundir.atomicfs import RunStorage
delete_dir = RunStorage.delete_dir
def delete_then_die(self, path):
    delete_dir(self, path)
    if os.path.basename(path).startswith("checkpoint_"):
        os.kill(os.getpid(), signal.SIGKILL)
RunStorage.delete_dir = delete_then_die
sys.argv[0] = "search.run"
runpy.run_module("search.run", run_name="__main__")
"""


# The driver, with one of Tune's two state files held back from storage once a second trial has a
# directory there (`searcher`: the searcher's state; `trials`: the experiment state with the trials),
# SIGKILLed once three trials have a checkpoint: storage then holds a searcher behind Tune's trials,
# or ahead of them, as a kill between the two files' uploads leaves it.
KILLED_WITH_STATE_FILES_FROM_DIFFERENT_SAVES = """
import glob, os, runpy, signal, sys
import pyarrow as pa
from rundir.atomicfs import RunStorage
held = {"searcher": "search_gen_state-", "trials": "experiment_state-"}[sys.argv.pop(1)]
open_output_stream = RunStorage.open_output_stream
def held_back_then_killed(self, path, metadata):
    experiment = os.path.dirname(path)
    if len({os.path.dirname(c) for c in glob.glob(os.path.join(experiment, "trial_*", "checkpoint_*"))}) >= 3:
        os.kill(os.getpid(), signal.SIGKILL)
    if os.path.basename(path).startswith(held) and len(glob.glob(os.path.join(experiment, "trial_*"))) >= 2:
        return pa.BufferOutputStream()  # this save of the file never reaches storage
    return open_output_stream(self, path, metadata)
RunStorage.open_output_stream = held_back_then_killed
sys.argv[0] = "search.run"
runpy.run_module("search.run", run_name="__main__")
"""


def trial_reports(run_dir: Path) -> dict[str, list[dict]]:
    """Each trial's reports, by trial id, from Tune's result.json in the search and the retrain."""
    out = {}
    for result in [*run_dir.glob("tune/trial_*/result.json"), *run_dir.glob("retrain/trial_*/result.json")]:
        if rows := [json.loads(line) for line in result.read_text().splitlines()]:
            out[rows[0]["trial_id"]] = rows
    return out


def assert_steps_in_order(trial_id: str, rows: list[dict], rel: float = 0.0) -> None:
    """Each step once, in order, except where a kill fell between a report and Tune's next save of
    its state (every second, `TUNE_GLOBAL_CHECKPOINT_S`): the resume trains again from the
    checkpoint that state names and reports those steps again, each repeat equal to the first in
    its losses within `rel` (the analysis keeps one row a step). A trial of its own process repeats
    them to the last digit (`rel` 0); a shared trainer's repeat may sit in a pack of other
    companions, whose padding sums the matmuls in another order (tests/test_packed.py bounds that)."""
    first: dict[int, dict] = {}
    for row in rows:
        earlier = first.setdefault(row["step"], row)
        if earlier is not row:
            for key in ("eval_loss", "train_loss", "eval_row_loss"):
                assert row[key] == pytest.approx(earlier[key], rel=rel, abs=0), (
                    f"{trial_id} reported step {row['step']} again with another {key}: {row[key]} after {earlier[key]}")
    steps = list(first)
    assert steps == sorted(steps), f"{trial_id} reported its steps out of order: {[row['step'] for row in rows]}"


# Ray's processes.
# Ray turns a 127.0.0.1 address into the machine's own IP before connecting, which the
# loopback-only nodes do not listen on; this keeps the driver on loopback too.
LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


# Every Ray process keeps its log files open in its session directory (worker command lines are
# rewritten to `ray::IDLE`, and workers have process groups of their own), so open files, not
# names or groups, tell a test's Ray processes apart.
def processes_in_session(session: str) -> list[int]:
    """PIDs with a file open inside a directory named `session`: the Ray session's processes."""
    pids = []
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            if any(session in Path(os.readlink(fd)).parts for fd in fd_dir.iterdir()):
                pids.append(int(fd_dir.parent.name))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return pids


def processes_using(*paths: Path) -> list[int]:
    """PIDs with a file open under one of `paths`."""
    prefixes = tuple(map(str, paths))
    pids = []
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            if any(os.readlink(fd).startswith(prefixes) for fd in fd_dir.iterdir()):
                pids.append(int(fd_dir.parent.name))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return pids


# The shared trainer's trials.
def shared_trial(lr: float = 1e-3, r: int = 4, seed: int = 0, modules=("q_proj", "v_proj")) -> dict:
    """A trial's config as Tune hands it to a shared trainer (LoRA+ ratio 4)."""
    lora_config = {"r": r, "lora_alpha": 2 * r, "lora_dropout": 0.1, "target_modules": list(modules), "use_rslora": False,
                   "use_dora": False, "task_type": "CAUSAL_LM"}
    return TrialParams(lora_config=lora_config, module_set="+".join(modules), alpha_ratio=2.0, learning_rate=lr,
                       loraplus_lr_ratio=4.0, seed=seed, origin=Origin.SEARCH).to_config()


def fake_cuda(monkeypatch, calls: list[str], refuse_capture: bool = False) -> type:
    """Stand-ins for CUDA's streams and graph (no GPU here) in torch.cuda, each recording what it
    is asked in `calls`: a capture that `refuse_capture`s raises as CUDA does when the captured
    work reads the device. The graph class, whose instances the capture recipe returns."""
    from contextlib import contextmanager

    import torch

    class Stream:
        def __init__(self, name="side"):
            self.name = name

        def wait_stream(self, other):
            calls.append(f"{self.name} waits for {other.name}")

    class Graph:
        def replay(self):
            calls.append("replay")

    @contextmanager
    def on(stream):
        calls.append(f"on {stream.name}")
        yield
        calls.append(f"off {stream.name}")

    @contextmanager
    def capturing(graph, capture_error_mode="global"):
        calls.append(f"capture begins, {capture_error_mode}")
        yield
        if refuse_capture:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
        calls.append("capture ends")

    main = Stream("main")
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: main)
    monkeypatch.setattr(torch.cuda, "stream", on)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", capturing)
    return Graph
