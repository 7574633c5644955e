"""The search against the hand-made grid on the reference task, and where a search's time goes.

    python bench/search_vs_grid.py [--samples 16]

Runs `python -m search.run` on the reference task (the `facts`
knowledge-injection set, copied to bench/data/facts/: 2,400 train rows, 1,200 eval rows,
SmolLM2-135M-Instruct) with the anchor grid's budget per trial, 100 optimizer steps of 8
sequences, the default search space, `--samples` trials, ASHA rungs at 50 and 100 steps, the
promotion and confirmation stages on, every eval on all 1,200 eval rows.

Figures:
- `search_gpu_seconds`: the whole run's wall time on the one GPU (Ray start, data
  preparation, every stage, the report and export included; the embedded model's one-time
  GGUF conversion is done before the clock starts, as it is for the grid), and `search_eval_loss`: the
  pick's eval loss at step 100 (the mean over its seeds), to set beside the grid's.
- `first_step_seconds`: from the command to the first training step of any trial.
- `seconds_to_first_trial_as_good_as_grid`: when some trial first reported, at the full budget,
  an eval loss at most the grid's best (the search held such a configuration from then on; its
  pick comes after the confirmation runs).
- `overhead_share`: the share of the search's wall time in which the GPU was inside a train
  or eval step of some trial: the union of the trials' busy windows (each report gives the
  window since the last one in which the trial only trained and evaluated; the CUDA graph's
  capture counts as training) over the wall time.
- `slot_busy_share`, the stricter figure: the same windows summed, over wall time x
  concurrent slots (1 / gpus_per_trial): how much of every trial slot's time was steps.
The grid itself (six Trainer runs, over 10 GPU-minutes) is `bench/grid.py`; its figures are
read from bench/results/grid.json when it holds all six configs from the same device, else
the ones first measured on one H100 (GRID_README) are recorded beside ours, as such.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from rundir.params import Origin  # noqa: E402 - after the path is set

RESULTS = ROOT / "bench" / "results"
FACTS = ROOT / "bench" / "data" / "facts"
# The grid as first measured on one H100 (Trainer, 100 steps each, not rerun here)
GRID_README = {"grid_eval_loss": 0.4223, "grid_train_seconds_five_configs": 69.2 + 89.3 + 86.8 + 108.8 + 116.5,
               "note": "six configs; DoRA did not finish in 190 s; figures first measured on one H100"}


def grid_reference(device: str) -> dict:
    """The grid's figures to set a search beside: bench/results/grid.json where it was measured on
    `device` (bench/grid.py), else those first measured on one H100 (GRID_README), with their
    `source` and `label`."""
    grid_path = RESULTS / "grid.json"
    grid = json.loads(grid_path.read_text()) if grid_path.exists() else {}
    if grid.get("device") == device and "figures" in grid:
        return {**grid["figures"], "source": "rerun: bench/grid.py, this device", "label": "grid (rerun)"}
    return {"grid_gpu_seconds": GRID_README["grid_train_seconds_five_configs"],
            "grid_eval_loss": GRID_README["grid_eval_loss"], "source": GRID_README["note"],
            "label": "grid (README, not rerun)"}


def facts_overrides(samples: int, max_steps: int, eval_examples: int, gpus_per_trial: str) -> list[str]:
    """search.run's --set values for the reference task at the grid's budget: `samples` trials of
    `max_steps` steps of 8 sequences, ASHA's rungs at half and all of it."""
    return [f"data.train={FACTS / 'facts_train.jsonl'}", f"data.eval={FACTS / 'facts_eval.jsonl'}",
            f"data.eval_examples={eval_examples}", f"budget.num_samples={samples}", f"budget.max_steps={max_steps}",
            f"budget.eval_every={max_steps // 2}", f"budget.grace_period={max_steps // 2}",
            "budget.batch_size=8", f"budget.warmup_steps={min(10, max_steps // 2)}",
            f"resources.gpus_per_trial={gpus_per_trial}", "task.kind=domain"]


def union_seconds(windows: list[tuple[float, float]]) -> float:
    """Seconds covered by at least one of the (start, end) windows."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(windows):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def reports_by_trial(run_dir: Path) -> dict[str, list[dict]]:
    """Every report of every trial of every experiment of the run ("experiment/trial_x"), as
    the analysis reads them."""
    from analysis.results import read_trial_files

    return {f"{trial.directory.parent.name}/{trial.directory.name}": trial.rows for trial in read_trial_files(run_dir)}


def time_account(reports: dict[str, list[dict]], started: float, ended: float) -> dict:
    """Where the wall time went, from the trials' own clocks: before the first trial began
    its setup (Ray start, data preparation, worker start), the trials' setups (base model,
    data, adapter: entered_at to the first busy window), how many worker processes were
    started, and for each stage (the search, promotions, confirmations, a retrain: the
    trials' origin) the span from its first trial's entry to its last report."""
    first = {k: r[0] for k, r in reports.items() if r and "entered_at" in r[0]}
    if not first:
        return {}
    stages: dict[str, list[str]] = {}
    for key, report in first.items():
        origin = report.get("config", {}).get("origin", key.split("/")[0])
        stages.setdefault(Origin.SEARCH.value if origin == Origin.PRIOR.value else origin, []).append(key)
    spans = {}
    for name, keys in stages.items():
        entered = min(first[k]["entered_at"] for k in keys)
        spans[name] = {"from_start": entered - started, "seconds": max(reports[k][-1]["busy_to"] for k in keys) - entered}
    workers = sorted({r["worker_started_at"] for r in first.values()})
    return {
        "before_first_trial": min(r["entered_at"] for r in first.values()) - started,
        "trial_setup_seconds": sum(r["busy_from"] - r["entered_at"] for r in first.values()),
        # the PEFT import a trial's first call pays in a new worker (0 in a reused one)
        "trial_import_seconds": sum(r["entered_at"] - r.get("called_at", r["entered_at"]) for r in first.values()),
        "worker_processes": len(workers),
        "stages": spans,
        "after_last_report": ended - max(r[-1]["busy_to"] for r in reports.values() if r),
    }


def timeline(reports: dict[str, list[dict]], started: float) -> list[dict]:
    """Each trial's clock readings, in seconds from the start, in the order the trials were
    called: when its worker loaded the trial code, Tune called it, PEFT was imported, its
    first step began and its last report was made."""
    rows = []
    for key, trial in reports.items():
        if trial and "entered_at" in trial[0]:
            first = trial[0]
            rows.append({"trial": key, "origin": first.get("config", {}).get("origin"),
                         **{name: round(first[name] - started, 2) for name in
                            ("worker_started_at", "called_at", "entered_at", "busy_from") if name in first},
                         "last_report": round(trial[-1]["busy_to"] - started, 2)})
    return sorted(rows, key=lambda row: row.get("called_at", row["entered_at"]))


DRIVER_STEPS = (("search.inputs.prepare", "prepare_model"), ("search.inputs.data", "prepare"),
                ("search.cluster.connect", "connect"), ("search.tuning.tuner", "fit_or_restore"),
                ("analysis.pipeline", "analyse"))


def clock_driver_steps(marks: list[tuple[str, float, float]]) -> None:
    """Wrap the driver's steps (model check, tokenizing, Ray start, the Tuner, the analysis) so
    each call appends (name, start, end) in epoch seconds to `marks`: where the time before
    the first trial and after the last one goes. search.run imports them at call time, so
    the wrapped functions are the ones it calls."""
    import functools
    import importlib

    for module_name, name in DRIVER_STEPS:
        module = importlib.import_module(module_name)
        function = getattr(module, name)

        def clocked(*args, _function=function, _name=name, **kwargs):
            began = time.time()
            try:
                return _function(*args, **kwargs)
            finally:
                marks.append((_name, began, time.time()))

        setattr(module, name, functools.wraps(function)(clocked))


def first_full_budget_result_at_least_as_good(reports: dict[str, list[dict]], max_steps: int, target: float,
                                               started: float) -> float | None:
    """Seconds from the start until some trial first reported an eval loss at most `target` at
    the full budget: when the search held a configuration as good as the grid's best (the pick
    itself comes later, after the confirmation runs). None if no trial did."""
    times = [r["busy_to"] - started for trial in reports.values() for r in trial
             if r.get("step") == max_steps and r.get("eval_loss", float("inf")) <= target and "busy_to" in r]
    return min(times) if times else None


def busy_windows(reports: dict[str, list[dict]]) -> list[tuple[float, float]]:
    """Every trial's busy windows, from every report."""
    return [(r["busy_from"], r["busy_to"]) for trial_reports in reports.values() for r in trial_reports
            if "busy_from" in r]


def answers_against_the_prior(trials, pick: dict) -> dict:
    """Exact match of the pick's generated answers beside the rule-of-thumb first trial's (at the
    step each reached: ASHA may have stopped the prior early), where the trials report it."""
    if "eval_exact_match" not in trials or not pick:
        return {}
    picked = trials[trials.trial_id == pick["trial_id"]].iloc[0]
    prior = trials[trials.origin == Origin.PRIOR.value]
    out = {"search_pick_exact_match": picked.eval_exact_match, "search_pick_eval_loss_own_run": picked.eval_loss}
    if not prior.empty:
        out |= {"prior_exact_match": prior.iloc[0].eval_exact_match, "prior_eval_loss": prior.iloc[0].eval_loss,
                "prior_step": int(prior.iloc[0].step), "prior_status": prior.iloc[0].status}
    return out


def _rounded(value):
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return round(value, 1) if isinstance(value, float) else value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--gpus-per-trial", default="auto", help="resources.gpus_per_trial (auto: by model size)")
    parser.add_argument("--eval-examples", type=int, default=1200)
    parser.add_argument("--max-steps", type=int, default=100, help="per trial (100: the grid's budget); eval at half and end")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="more overrides for the search, as search.run's --set (after the benchmark's own)")
    args = parser.parse_args()
    import pandas as pd
    import peft
    import ray
    import torch
    import transformers

    from search.run import main as search

    sets = facts_overrides(args.samples, args.max_steps, args.eval_examples, args.gpus_per_trial) + args.set
    from analysis.results import read_trial_files
    from analysis.timing import first_step_seconds
    from trainables.model import smollm2_checkpoint

    # The grid loads the converted checkpoint of the embedded default: so does the timed search.
    # Its one-time conversion (on a fresh machine) is recorded on its own, not charged to either.
    converting = time.perf_counter()
    smollm2_checkpoint()
    conversion_seconds = time.perf_counter() - converting
    marks: list[tuple[str, float, float]] = []
    clock_driver_steps(marks)
    with tempfile.TemporaryDirectory() as output:
        started, started_epoch = time.perf_counter(), time.time()
        code = search(["--output", output, "--name", "facts", *[x for s in sets for x in ("--set", s)]])
        wall = time.perf_counter() - started
        ended_epoch = time.time()
        run_dir = Path(output) / "facts"
        trials = pd.read_csv(run_dir / "trials.csv")
        pick = json.loads((run_dir / "pick.json").read_text()) if (run_dir / "pick.json").exists() else {}
        config = json.loads((run_dir / "run_config.json").read_text())
        reports = reports_by_trial(run_dir)
        windows = busy_windows(reports)
        account = time_account(reports, started_epoch, ended_epoch)
        account["driver_steps"] = [{"step": name, "from": round(began - started_epoch, 2), "to": round(end - started_epoch, 2)}
                                   for name, began, end in marks]
        # the driver's own record of its setup steps, in seconds from its process's start (search.recipe)
        from rundir.layout import LOGS, SETUP_TIMES, TRAINER_TIME

        setup_times = run_dir / LOGS / SETUP_TIMES
        account["setup_times"] = json.loads(setup_times.read_text()) if setup_times.exists() else None
        # a shared run's trainers: the seconds each pack spent on steps, evaluations, answers, checkpoints, opening
        trainer_time = run_dir / LOGS / TRAINER_TIME
        account["trainer_time"] = json.loads(trainer_time.read_text()) if trainer_time.exists() else None
        trial_clocks = timeline(reports, started_epoch)
        report = (run_dir / "report.md").read_text() if (run_dir / "report.md").exists() else ""
        first_step = first_step_seconds(read_trial_files(run_dir), started_epoch)  # the run directory goes with the block
    inside = sum(end - start for start, end in windows)
    busy = union_seconds(windows)
    import os

    # trials that can run at once: GPU shares, or on a CPU-only machine one per core
    gpus_per_trial = config["resources"]["gpus_per_trial"]  # as resolved (auto: by model size)
    slots = max(1, round(1 / gpus_per_trial)) if gpus_per_trial else os.cpu_count() or 1
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    grid_figures = grid_reference(device)
    first_as_good = first_full_budget_result_at_least_as_good(reports, args.max_steps, grid_figures["grid_eval_loss"],
                                                              started_epoch)
    figures = {
        "search_gpu_seconds": wall,
        "first_step_seconds": first_step,
        "search_eval_loss": pick.get("value", pick.get("metric_value")),
        "overhead_share": busy / wall,
        # the same from the first step on: how busy the search kept the GPU once its workers were up
        "overhead_share_after_first_step": busy / (ended_epoch - min(start for start, _ in windows)) if windows else None,
        "slot_busy_share": inside / (wall * slots),
        "seconds_to_first_trial_as_good_as_grid": first_as_good,
        **answers_against_the_prior(trials, pick),
    }
    record = {
        "benchmark": "search_vs_grid",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                     "ray": ray.__version__, "python": platform.python_version()},
        "exit_code": code, "wall_seconds": wall, "trials": trials.to_dict(orient="records"), "pick": pick,
        "model_conversion_seconds_before_timing": conversion_seconds, "inside_steps_seconds": inside, "busy_seconds": busy,
        "time_account": account, "timeline": trial_clocks, "slots": slots, "gpus_per_trial": gpus_per_trial,
        "step_modes": trials.step_mode.dropna().tolist(), "grid": grid_figures,
        "overrides": args.set, "figures": figures, "report": report,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "search_vs_grid.json").write_text(json.dumps(record, indent=2, default=str))
    summary_path = RESULTS / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    summary.update(figures)
    summary_path.write_text(json.dumps(summary, indent=2))
    counts = trials.groupby(["origin", "status"]).size().to_dict()
    print(f"\ntrials by origin and status: {counts}")
    print(f"{'':<34}{'GPU-seconds':>12}{'eval loss':>11}")
    print(f"{grid_figures['label']:<34}{grid_figures['grid_gpu_seconds']:>12,.0f}"
          f"{grid_figures['grid_eval_loss']:>11.4f}")
    print(f"{'search (this run)':<34}{wall:>12,.0f}{figures['search_eval_loss'] or float('nan'):>11.4f}")
    if first_as_good is not None:
        print(f"a trial at the full budget first matched the grid's best after {first_as_good:.0f} s")
    if "search_pick_exact_match" in figures:
        print(f"exact match: pick {figures['search_pick_exact_match']:.3f}, rule-of-thumb prior "
              f"{figures.get('prior_exact_match', float('nan')):.3f} (step {figures.get('prior_step')}, "
              f"{figures.get('prior_status')})")
    print("where the time went (s):", json.dumps(_rounded(account)))
    print(f"overhead_share {figures['overhead_share']:.2f} (some trial inside a step {busy:.0f} s of {wall:.0f} s); "
          f"slot_busy_share {figures['slot_busy_share']:.2f} (steps {inside:.0f} s over {wall:.0f} s x {slots} slots)")
    if figures["overhead_share_after_first_step"] is not None:
        print(f"from the first step on: overhead_share {figures['overhead_share_after_first_step']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
