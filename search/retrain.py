"""`python -m search.retrain RUN_DIR`: train a run's pick alone on all its training data, without
searching again, then analyse the run, so that its `adapter/` holds the weights.

The pick is the one `pick.json` names (the latest analysis, `analysis.report` included), trained
as the search's `selection.retrain` trains it (`search.tuning.tuner.retrain`: the trial's recipe,
`budget.max_steps` steps drawn from every training row) with the run's recorded config, on a
local Ray this command starts, or on the cluster `--address` names. Exit codes as `search.run`'s:
0 done, 1 a failure while training, 2 bad input, 130 and 143 stopped (the same command continues).
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

from rundir.cli import ArgumentParser
from rundir.layout import ADAPTER, PICK
from rundir.runconfig import CREATED_BY
from search.config import ConfigError, recorded
from search.output.console import Console, use_console
from search.recipe import SearchRecipe
from search.signals import GracefulStop, run_command

PROGRAM = "search.retrain"


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog=f"python -m {PROGRAM}", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory a search wrote (<output>/<name>)")
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                        help="join a Ray cluster: auto or ray://HOST:PORT (default: $RAY_ADDRESS, else a local Ray)")
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help, or a bad argument said in one line
        return done.code
    stop = GracefulStop(PROGRAM)

    def prepare() -> int | SearchRecipe:
        run_dir = Path(args.run_dir)
        config, picked = pick_to_retrain(run_dir)
        if already_retrained(run_dir, picked):
            print(f"The pick, trial {picked}, is already retrained: PeftModel.from_pretrained(base, "
                  f"\"{run_dir.resolve() / ADAPTER}\") loads its weights.")
            return 0
        use_console(Console.DEFAULT)
        return SearchRecipe(config, args.address, stop, retrain_of=picked)

    return run_command(stop, prepare)


def pick_to_retrain(run_dir: Path):
    """The recorded config of the run at `run_dir` (its selection the one `pick.json` was made
    by) and the trial id of its pick; ConfigError naming RUN_DIR where it is no run this tool
    wrote, has no pick, or already retrained another configuration."""
    from analysis.results import read_retrain_files, read_run_config

    try:
        run_config = read_run_config(run_dir)
    except ValueError as e:
        raise ConfigError(f"RUN_DIR {str(run_dir)!r} is not a run directory: {e} "
                          "Fix: give the directory a search wrote, <output>/<name>") from None
    if run_config.created_by != CREATED_BY:
        raise ConfigError(f"RUN_DIR {str(run_dir)!r}: its run_config.json was not written by this tool")
    try:
        pick = json.loads((run_dir / PICK).read_text())
    except FileNotFoundError:
        raise ConfigError(f"RUN_DIR {str(run_dir)!r} holds no pick ({PICK}): no trial finished the full budget, or "
                          f"the run was never analysed. Fix: python -m analysis.report {run_dir} says which") from None
    picked = pick["trial_id"]
    others = sorted({trial.params.parent for trial in read_retrain_files(run_dir)} - {picked})
    if others:
        raise ConfigError(f"RUN_DIR {str(run_dir)!r} already holds a retrain of trial {others[0]} (its retrain/ "
                          f"directory), and the pick is now trial {picked}; a run keeps one retrain. Fix: move "
                          f"{run_dir / 'retrain'} away (its weights stay in the picks/ analysis that used them), then "
                          "run this again")
    config = recorded(run_config, str(run_dir.parent), run_dir.name)
    selection = replace(config.selection, metric=pick["metric"], mode=pick["mode"], tolerance=pick["tolerance"],
                        cost=pick["cost_name"])
    return replace(config, selection=selection), picked


def already_retrained(run_dir: Path, picked: str) -> bool:
    """Whether the run's adapter/ holds the retrained weights of `picked` (its latest pick.json says so)."""
    retrain = json.loads((run_dir / PICK).read_text())["retrain"]
    return bool(retrain) and retrain["parent"] == picked and bool(retrain["weights"])


if __name__ == "__main__":
    raise SystemExit(main())
