"""Draw the report's cost and rank figures from a stored run's `trials.csv` and `pick.json`
alone, for runs whose Tune directory was not kept (the ones under bench/results/).

    python bench/plot_run.py bench/results/h200-2026-12-01-kill-resume
"""

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a directory holding trials.csv and pick.json; the PNGs go there")
    args = parser.parse_args()

    import pandas as pd

    from analysis.config import SelectionConfig
    from analysis.plots import by_rank_figure, cost_figure, module_set_colors, pick_position
    from analysis.select import Pick, finished_trials

    trials = pd.read_csv(args.run / "trials.csv")
    stored = json.loads((args.run / "pick.json").read_text())
    # a pick.json written before a field with a default existed lacks it
    pick = Pick(**{f.name: stored[f.name] for f in dataclasses.fields(Pick) if f.name in stored})
    selection = SelectionConfig(metric=pick.metric, mode=pick.mode, tolerance=pick.tolerance, cost=pick.cost_name)
    finished = finished_trials(trials, selection.metric, selection.cost)
    colors = module_set_colors(trials["module_set"])
    cost_figure(finished, selection, pick).savefig(args.run / "cost_vs_metric.png", dpi=110)
    by_rank_figure(finished, selection.metric, selection.direction, colors,
                   pick_position(pick, trials, "value")).savefig(args.run / "metric_vs_rank.png", dpi=110)


if __name__ == "__main__":
    main()
