"""`first_step_seconds` of a run: from the command to the first training step of any trial, on a
warm cache (the embedded model converted, the libraries imported once before).

    PYTHONPATH=$PWD python bench/first_step.py [--out FILE] [--facts] [--trainer-ready] [-- search.run arguments]

Starts `python -m search.run` (the default run unless arguments follow `--`) in a process of its
own, so the command's own imports count, and reads the trials' reports as they come: a trial's
first report has `busy_from`, when its setup ended and its first step began. Once one is there
the run is interrupted (Ctrl+C, as a user would): the figure needs nothing later. `phases` says
where the time went on the way (`_phases`). Run it from the root of the tree to measure (with that
tree on PYTHONPATH); bench/search_vs_grid.py reports the same figure for its whole run."""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from analysis.results import read_trial_files  # noqa: E402 - after the path is set
from analysis.timing import first_step_seconds  # noqa: E402

POLL_S, LIMIT_S = 2.0, 1800


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="")
    parser.add_argument("--facts", action="store_true",
                        help="the reference search of bench/search_vs_grid.py (its default settings) instead of the "
                             "default run; arguments after -- follow its own")
    parser.add_argument("--trainer-ready", action="store_true",
                        help="stop once a shared run's trainers are ready (setup_times' trainers_started), before any "
                             "step: on a CPU a shared run's first report takes minutes")
    parser.add_argument("search_args", nargs="*")
    args = parser.parse_args()
    search_args = args.search_args
    if args.facts:  # as a user would type it: every override on the command line
        from bench.search_vs_grid import facts_overrides

        search_args = [x for s in facts_overrides(16, 100, 1200, "auto") for x in ("--set", s)] + search_args
    with tempfile.TemporaryDirectory() as output:
        command = [sys.executable, "-m", "search.run", "--output", output, "--name", "first-step", *search_args]
        started = time.time()
        run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        figure = None
        while figure is None and run.poll() is None and time.time() - started < LIMIT_S:
            time.sleep(POLL_S)
            try:
                figure = (_trainers_ready(Path(output) / "first-step") if args.trainer_ready
                          else first_step_seconds(read_trial_files(Path(output) / "first-step"), started))
            except (OSError, ValueError):  # a report being written: read again at the next poll
                continue
        run.send_signal(signal.SIGINT)
        try:
            run.wait(120)
        except subprocess.TimeoutExpired:
            run.kill()
            run.wait()
        phases = {}
        if figure is not None:  # read once the run has stopped: it adds its trainer's later steps (its pack prepared)
            phases = (_setup_times(Path(output) / "first-step") if args.trainer_ready
                      else _phases(Path(output) / "first-step", started))
    key = "trainers_ready_seconds" if args.trainer_ready else "first_step_seconds"
    record = {"benchmark": "first_step", "command": " ".join(command[1:]), key: figure,
              "phases": phases, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started))}
    print(json.dumps(record, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    return 0 if figure is not None else 1


def _setup_times(run_dir: Path) -> dict:
    """The driver's own record of its setup steps, seconds from its process's start (search.recipe)."""
    from rundir.layout import LOGS, SETUP_TIMES

    return json.loads((run_dir / LOGS / SETUP_TIMES).read_text())


def _trainers_ready(run_dir: Path) -> float | None:
    """Seconds from the command's process's start until a shared run's trainers were ready; None
    before the driver wrote it."""
    return _setup_times(run_dir).get("trainers_started")


def _phases(run_dir: Path, started: float) -> dict:
    """Seconds from the start until each step on the way to the first training step was done: the
    run directory written (the driver's imports, the model and the data prepared), Ray's session
    recorded (Ray started), and for the trial that trained first, its trial code loaded in its
    process, Tune's call of it, its entry (a trial in a process of its own: PEFT imported; a shared
    trial: its ask for a slot), and its first step begun (the model, the data and the adapter set
    up; a shared trial's slot opened once the pack had prepared); and the run's own figure, from
    its process's start, where it records one."""
    from analysis.results import read_run_config
    from analysis.timing import run_clock
    from rundir.layout import LOGS, RAY_SESSION, RUN_CONFIG, SETUP_TIMES

    trials = read_trial_files(run_dir)
    first = min((trial.rows[0] for trial in trials if trial.rows), key=lambda row: row["busy_from"])
    clock = run_clock(trials, read_run_config(run_dir).started_at)
    return {"run_directory_written": (run_dir / RUN_CONFIG).stat().st_mtime - started,
            "ray_started": (run_dir / RAY_SESSION).stat().st_mtime - started,
            "trial_code_loaded": first["worker_started_at"] - started,
            "trial_called": first["called_at"] - started,
            "trial_entered": first["entered_at"] - started,
            "first_step": first["busy_from"] - started,
            "as_the_run_records": clock.first_step_seconds if clock else None,
            "setup_times": _setup_times(run_dir) if (run_dir / LOGS / SETUP_TIMES).exists() else None}


if __name__ == "__main__":
    sys.exit(main())
