"""Three whole searches on the reference task with seeds 0, 1 and 2: is the pick the same?

    python bench/pick_stability.py [--seeds 0 1 2] [--samples 16]

Each seed runs `python -m search.run` on `facts` at the grid's budget, exactly as
bench/search_vs_grid.py does (`facts_overrides`), with `--set seed=K`: the sampler, the data order
and every trial's seed change, the eval rows do not. Issue 20's bar, per search and over the three:
- `stability_picks_at_most_grid`: every pick's eval loss is at most the grid's best;
- `stability_same_cell`: how many of the picks share the most common module set and rank (at least 2 of 3);
- `stability_priors_shown`: every report shows the known-good configurations beside the pick;
- `stability_uncertain`: how many reports call their pick uncertain (`without_pick`, analysis/select.py).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.search_vs_grid import RESULTS, facts_overrides, grid_reference  # noqa: E402 - after the path is set

PRIORS_HEADING = "## Against the known-good configurations"


def stability(runs: list[dict], grid_eval_loss: float) -> dict:
    """The figures over `runs` (one dict per seed: `pick` as pick.json holds it, or {} for none, and
    `report`, report.md's text)."""
    picks = [run["pick"] for run in runs]
    cells = Counter(_cell(pick) for pick in picks if pick)
    return {
        "stability_seeds": len(runs),
        "stability_picks_at_most_grid": bool(picks) and all(pick and pick["value"] <= grid_eval_loss for pick in picks),
        "stability_same_cell": cells.most_common(1)[0][1] if cells else 0,
        "stability_cells": {f"{module_set} r{r}": count for (module_set, r), count in cells.items()},
        "stability_priors_shown": bool(runs) and all(PRIORS_HEADING in run["report"] for run in runs),
        "stability_uncertain": sum(bool(pick and pick["without_pick"]["uncertain"]) for pick in picks),
    }


def _cell(pick: dict) -> tuple[str, int]:
    """The pick's module set (its sorted target modules) and rank, from its LoraConfig."""
    config = pick["lora_config"]
    return ",".join(sorted(config["target_modules"])), int(config["r"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--gpus-per-trial", default="auto", help="resources.gpus_per_trial (auto: by model size)")
    parser.add_argument("--eval-examples", type=int, default=1200)
    parser.add_argument("--max-steps", type=int, default=100, help="per trial (100: the grid's budget)")
    args = parser.parse_args()
    import torch

    from search.run import main as search
    from trainables.model import smollm2_checkpoint

    smollm2_checkpoint()  # the one-time conversion on a fresh machine is not a search's time
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    grid_eval_loss = grid_reference(device)["grid_eval_loss"]
    runs = []
    for seed in args.seeds:
        sets = facts_overrides(args.samples, args.max_steps, args.eval_examples, args.gpus_per_trial) + [f"seed={seed}"]
        with tempfile.TemporaryDirectory() as output:
            started = time.perf_counter()
            code = search(["--output", output, "--name", f"seed{seed}", *[x for s in sets for x in ("--set", s)]])
            run_dir = Path(output) / f"seed{seed}"
            pick_path, report_path = run_dir / "pick.json", run_dir / "report.md"
            runs.append({"seed": seed, "exit_code": code, "wall_seconds": time.perf_counter() - started,
                         "pick": json.loads(pick_path.read_text()) if pick_path.exists() else {},
                         "report": report_path.read_text() if report_path.exists() else ""})
        pick = runs[-1]["pick"]
        print(f"seed {seed}: exit {code}, {runs[-1]['wall_seconds']:.0f} s, pick "
              + (f"{_cell(pick)} at {pick['value']:.4f}, uncertain {pick['without_pick']['uncertain']}" if pick else "none"))
    figures = stability(runs, grid_eval_loss)
    record = {"benchmark": "pick_stability",
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": device,
              "grid_eval_loss": grid_eval_loss, "runs": runs, "figures": figures}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "pick_stability.json").write_text(json.dumps(record, indent=2, default=str))
    summary_path = RESULTS / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    summary.update({key: value for key, value in figures.items() if key != "stability_cells"})
    summary_path.write_text(json.dumps(summary, indent=2))
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
