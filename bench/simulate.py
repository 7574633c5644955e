"""The product's own search replayed on a landscape many times (search/tuning/simulate.py): how
often its pick is right, what it costs, and the same for the baselines on the same table.

    python bench/simulate.py --landscape bench/landscapes/NAME [--seeds 100] [--policy search ...]
                             [--set KEY=VALUE ...] [--eval-rows N] [--out bench/results/simulate_NAME.json]

Policies (each the embedded default on the landscape's space, then its own overrides, then
`--set`'s, which apply to every policy):
- search: the defaults as they are;
- random_asha: Optuna's random sampler, no priors, with ASHA and the stages;
- tpe_no_priors: TPE without the priors;
- tpe_no_asha: TPE with ASHA's grace period at the full budget (it stops nothing);
- hand_grid: the seed ablation's six configurations (bench/grid.py) snapped to the grid, one seed each.
For each: the share of searches whose pick's true value (its mean over the table's seeds) is
within the tolerance of the true best, the share that picked the true pick (the rule on the
table's means) or one at most twice its cost within the tolerance, the median and 90th
percentile of the excess over the true best and of the cost over the true pick's, and the
simulated GPU-seconds, beside the hand grid's and the whole landscape's. With --eval-rows N,
every policy's trials are scored on N of the landscape's eval rows, the same N for every trial of
one simulated search (as a run with data.eval_examples N), while the truth stays the landscape's
values over all its rows. Exit 2 with one `error:` line for a landscape or a setting that cannot
be used.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.grid import GRID  # noqa: E402

POLICIES = {
    "search": [],
    "random_asha": ["search.algorithm=random", "search.priors=none"],
    "tpe_no_priors": ["search.priors=none"],
    "tpe_no_asha": [],  # the grace period at the landscape's full budget, set below
    "hand_grid": [],
}
MODULE_SETS = {"q_proj,v_proj": "attention_qv", "q_proj,k_proj,v_proj,o_proj": "attention",
               "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj": "all_linear"}
HAND_GRID_LR = 2e-4  # bench/grid.py's anchor_trainer; PEFT's default lora_dropout, 0.0


def hand_grid_points() -> list[dict]:
    """bench/grid.py's six configurations in the space's keys."""
    return [{"module_set": MODULE_SETS[",".join(lora["target_modules"])], "r": lora["r"],
             "alpha_ratio": lora["lora_alpha"] / lora["r"], "lora_dropout": 0.0,
             "use_rslora": lora.get("use_rslora", False), "use_dora": lora.get("use_dora", False),
             "learning_rate": HAND_GRID_LR} for _, lora in GRID]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/simulate.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--landscape", required=True, help="a landscape directory (docs/landscape.md)")
    parser.add_argument("--seeds", type=int, default=100, help="simulated searches per policy (seeds 0 to N-1)")
    parser.add_argument("--policy", action="append", choices=list(POLICIES), help="policies to run (default: all)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override applied to every policy, as python -m search.run --set")
    parser.add_argument("--eval-rows", type=int, metavar="N",
                        help="score every trial on N of the landscape's eval rows, drawn once per simulated search "
                             "(default: all rows, the landscape's values as they are)")
    parser.add_argument("--out", help="write the figures as JSON here")
    arguments = parser.parse_args(argv)

    import numpy as np

    from analysis.landscape import load
    from search.config import ConfigError
    from search.tuning.simulate import Truth, eval_subset, hand_grid, policy_config, simulate, summary

    try:
        if arguments.seeds < 1:
            raise ValueError(f"--seeds is {arguments.seeds}; allowed: an integer >= 1")
        landscape = load(arguments.landscape)
        overrides = {name: [*own, *([f"budget.grace_period={landscape.header.max_steps}"] if name == "tpe_no_asha" else []),
                            *arguments.set] for name, own in POLICIES.items() if name in (arguments.policy or POLICIES)}
        configs = {name: policy_config(landscape, sets) for name, sets in overrides.items()}
        base = policy_config(landscape, arguments.set)
        if arguments.eval_rows is not None:  # refused before any search runs
            eval_subset(landscape, base.selection.metric, arguments.eval_rows, np.random.default_rng(0))
    except (ValueError, ConfigError) as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    truth = Truth.of(landscape, base)
    # a module set the landscape did not measure cannot be looked up: that configuration is left out, and said
    grid_points = [point for point in hand_grid_points() if point["module_set"] in landscape.header.grid["module_set"]]
    left_out = [point for point in hand_grid_points() if point not in grid_points]
    hand_seconds = float(np.mean([hand_grid(landscape, base, grid_points, np.random.default_rng(seed),
                                            arguments.eval_rows).gpu_seconds for seed in range(arguments.seeds)]))
    whole = sum(landscape.seconds(point, seed) for point, seed in landscape.curves)
    out = {"landscape": str(arguments.landscape), "seeds": arguments.seeds, "overrides": arguments.set,
           "eval_rows": arguments.eval_rows,
           "true_pick": truth.pick.label(), "true_pick_value": truth.values[truth.pick], "true_best": truth.best,
           "hand_grid_gpu_seconds": hand_seconds,
           "hand_grid_left_out": left_out, "landscape_gpu_seconds": whole, "policies": {}}
    for name, config in configs.items():
        started = time.perf_counter()
        if name == "hand_grid":
            searches = [hand_grid(landscape, config, grid_points, np.random.default_rng(seed), arguments.eval_rows)
                        for seed in range(arguments.seeds)]
        else:
            searches = simulate(landscape, config, arguments.seeds, arguments.eval_rows)
        figures = {"overrides": overrides[name], **summary(searches, truth, landscape),
                   "cpu_seconds": round(time.perf_counter() - started, 1)}
        out["policies"][name] = figures
        print(f"{name:14s} within tolerance {figures['within_tolerance']:.0%}, pick or <=2x its cost "
              f"{figures['pick_or_at_most_2x_cost']:.0%}, excess median {figures['excess_median']:.1%} "
              f"p90 {figures['excess_p90']:.1%}, cost ratio median {figures['cost_ratio_median']:.2f} "
              f"p90 {figures['cost_ratio_p90']:.2f}, GPU-s median {figures['gpu_seconds_median']:.0f} "
              f"(hand grid {hand_seconds:.0f}, landscape {whole:.0f}); {figures['cpu_seconds']} s")
    if arguments.out:
        Path(arguments.out).parent.mkdir(parents=True, exist_ok=True)
        Path(arguments.out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
