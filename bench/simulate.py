"""The product's own search replayed on a landscape many times (search/tuning/simulate.py): how
often its pick is right, what it costs, and the same for the baselines on the same table.

    python bench/simulate.py --landscape bench/landscapes/NAME [--seeds 100] [--policy search ...]
                             [--set KEY=VALUE ...] [--eval-rows N] [--out bench/results/simulate_NAME.json]
    python bench/simulate.py --landscape bench/landscapes/NAME --sweep budget.num_samples=8,12,16,24 [...]

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
values over all its rows.

--sweep KEY=V1,V2,... runs the policies (default: search, random_asha and hand_grid) once for each
value, KEY a config key as --set takes it (set after the policy's own overrides) or eval_rows (as
--eval-rows), and writes the JSON (--out, default bench/results/sweep_<landscape>_<key>.json) and
beside it a PNG of how often the pick is right against the simulated GPU-seconds, a line per
policy with a point per value. Exit 2 with one `error:` line for a landscape or a setting that
cannot be used, before any search is simulated.
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
    "tpe_no_asha": [],  # the grace period at the landscape's full budget (policy_overrides)
    "hand_grid": [],
}
SWEPT_POLICIES = ("search", "random_asha", "hand_grid")
EVAL_ROWS = "eval_rows"  # the sweep's key for --eval-rows
MODULE_SETS = {"q_proj,v_proj": "attention_qv", "q_proj,k_proj,v_proj,o_proj": "attention",
               "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj": "all_linear"}
HAND_GRID_LR = 2e-4  # bench/grid.py's anchor_trainer; PEFT's default lora_dropout, 0.0
LABELS = {"search": "the search (defaults)", "random_asha": "random with ASHA", "tpe_no_priors": "TPE without priors",
          "tpe_no_asha": "TPE without ASHA", "hand_grid": "hand grid (bench/grid.py)"}
# What the figure draws for each policy, by the JSON's key: the two shares, one panel each.
RIGHT = {"within_tolerance": "pick within the tolerance of the true best",
         "pick_or_at_most_2x_cost": "true pick, or within the tolerance at most twice its cost"}


def hand_grid_points() -> list[dict]:
    """bench/grid.py's six configurations in the space's keys."""
    return [{"module_set": MODULE_SETS[",".join(lora["target_modules"])], "r": lora["r"],
             "alpha_ratio": lora["lora_alpha"] / lora["r"], "lora_dropout": 0.0,
             "use_rslora": lora.get("use_rslora", False), "use_dora": lora.get("use_dora", False),
             "learning_rate": HAND_GRID_LR} for _, lora in GRID]


def sweep_values(text: str) -> tuple[str, list[str]]:
    """`KEY=V1,V2,...` as the key and its values; a comma inside brackets belongs to its value
    (`search.ranks=[4,8],[16,32]`). ValueError naming the text unless it has a key and two values."""
    key, _, values = text.partition("=")
    parts, depth, current = [], 0, ""
    for character in values:
        depth += {"[": 1, "{": 1, "]": -1, "}": -1}.get(character, 0)
        if character == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += character
    parts.append(current)
    parts = [part.strip() for part in parts]
    if not key.strip() or len(parts) < 2 or not all(parts):
        raise ValueError(f"--sweep is {text!r}; allowed: KEY=V1,V2,... with a config key (as --set takes it) or "
                         f"{EVAL_ROWS}, and at least two values")
    return key.strip(), parts


def policy_overrides(landscape, name: str, sets: list[str]) -> list[str]:
    """The `--set` overrides of policy `name`: its own, then `sets`."""
    grace = [f"budget.grace_period={landscape.header.max_steps}"] if name == "tpe_no_asha" else []
    return [*POLICIES[name], *grace, *sets]


def run_policies(landscape, names: list[str], sets: list[str], seeds: int, eval_rows: int | None) -> dict:
    """Each policy of `names` simulated `seeds` times with `sets` after its own overrides, each
    trial scored on `eval_rows` of the eval rows (None: all); the figures, as the JSON holds them."""
    import numpy as np

    from search.tuning.simulate import Truth, hand_grid, policy_config, simulate, summary

    overrides = {name: policy_overrides(landscape, name, sets) for name in names}
    configs = {name: policy_config(landscape, overrides[name]) for name in names}
    base = policy_config(landscape, sets)
    truth = Truth.of(landscape, base)
    # a module set the landscape did not measure cannot be looked up: that configuration is left out, and said
    grid_points = [point for point in hand_grid_points() if point["module_set"] in landscape.header.grid["module_set"]]
    left_out = [point for point in hand_grid_points() if point not in grid_points]
    hand_seconds = float(np.mean([hand_grid(landscape, base, grid_points, np.random.default_rng(seed),
                                            eval_rows).gpu_seconds for seed in range(seeds)]))
    whole = sum(landscape.seconds(point, seed) for point, seed in landscape.curves)
    out = {"true_pick": truth.pick.label(), "true_pick_value": truth.values[truth.pick], "true_best": truth.best,
           "hand_grid_gpu_seconds": hand_seconds, "hand_grid_left_out": left_out, "landscape_gpu_seconds": whole,
           "policies": {}}
    for name, config in configs.items():
        started = time.perf_counter()
        if name == "hand_grid":
            searches = [hand_grid(landscape, config, grid_points, np.random.default_rng(seed), eval_rows)
                        for seed in range(seeds)]
        else:
            searches = simulate(landscape, config, seeds, eval_rows)
        figures = {"overrides": overrides[name], **summary(searches, truth, landscape),
                   "cpu_seconds": round(time.perf_counter() - started, 1)}
        out["policies"][name] = figures
        print(f"{name:14s} within tolerance {figures['within_tolerance']:.0%}, pick or <=2x its cost "
              f"{figures['pick_or_at_most_2x_cost']:.0%}, excess median {figures['excess_median']:.1%} "
              f"p90 {figures['excess_p90']:.1%}, cost ratio median {figures['cost_ratio_median']:.2f} "
              f"p90 {figures['cost_ratio_p90']:.2f}, GPU-s median {figures['gpu_seconds_median']:.0f} "
              f"(hand grid {hand_seconds:.0f}, landscape {whole:.0f}), wall s median {figures['wall_seconds_median']:.0f} "
              f"p90 {figures['wall_seconds_p90']:.0f}; uncertain {figures['uncertain']:.0%}, within "
              f"tolerance when uncertain {_share(figures['within_tolerance_if_uncertain'])}, when not "
              f"{_share(figures['within_tolerance_if_certain'])}; {figures['cpu_seconds']} s", flush=True)
    return out


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def sweep_lines(runs: list[dict], values: list[str]) -> dict:
    """The figure's data from a sweep's runs (one per value, `run_policies`' figures): for each
    policy, the swept values and, at each, its median simulated GPU-seconds and its shares right."""
    return {name: {"values": values, "gpu_seconds_median": [run["policies"][name]["gpu_seconds_median"] for run in runs],
                   **{share: [run["policies"][name][share] for run in runs] for share in RIGHT}}
            for name in runs[0]["policies"]}


def sweep_figure(lines: dict, key: str, landscape_name: str, seeds: int):
    """How often the pick is right against the simulated GPU-seconds per search: a panel per share
    (`RIGHT`), a line per policy through its swept values, each point labelled with its value; the
    hand grid as points alone (a swept key that is not its own leaves them on one spot)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import ScalarFormatter

    figure = Figure(figsize=(12, 5), layout="constrained")
    for axes, (share, title) in zip(figure.subplots(1, 2), RIGHT.items()):
        for name, line in lines.items():
            alone = name == "hand_grid"
            x, y = line["gpu_seconds_median"], [100 * value for value in line[share]]
            axes.plot(x, y, marker="*" if alone else "o", markersize=12 if alone else 6,
                      linestyle="none" if alone else "-", label=LABELS[name])
            if not alone:
                for value, x_value, y_value in zip(line["values"], x, y):
                    axes.annotate(value, (x_value, y_value), textcoords="offset points", xytext=(4, 4), fontsize=8)
        axes.set_title(title)
        axes.set_xlabel("simulated GPU-seconds per search (median)")
        axes.set_ylabel("searches whose pick is right (%)")
        axes.set_ylim(-5, 105)
        for axis in (axes.xaxis, axes.yaxis):
            formatter = ScalarFormatter(useOffset=False)
            formatter.set_scientific(False)
            axis.set_major_formatter(formatter)
        axes.grid(alpha=0.3)
        axes.legend()
    figure.suptitle(f"{landscape_name}: {seeds} simulated searches per point, {key} swept (labels)")
    return figure


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/simulate.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--landscape", required=True, help="a landscape directory (docs/landscape.md)")
    parser.add_argument("--seeds", type=int, default=100, help="simulated searches per policy (seeds 0 to N-1)")
    parser.add_argument("--policy", action="append", choices=list(POLICIES),
                        help=f"policies to run (default: all; with --sweep {', '.join(SWEPT_POLICIES)})")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override applied to every policy, as python -m search.run --set")
    parser.add_argument("--eval-rows", type=int, metavar="N",
                        help="score every trial on N of the landscape's eval rows, drawn once per simulated search "
                             "(default: all rows, the landscape's values as they are)")
    parser.add_argument("--sweep", metavar="KEY=V1,V2,...",
                        help=f"run the policies once per value of a config key (or {EVAL_ROWS}) and draw the PNG")
    parser.add_argument("--out", help="write the figures as JSON here (with --sweep, the PNG beside it)")
    arguments = parser.parse_args(argv)

    import numpy as np

    from analysis.landscape import load
    from search.tuning.simulate import eval_subset, policy_config

    # every setting is checked before any search is simulated
    try:
        if arguments.seeds < 1:
            raise ValueError(f"--seeds is {arguments.seeds}; allowed: an integer >= 1")
        landscape = load(arguments.landscape)
        names = arguments.policy or list(SWEPT_POLICIES if arguments.sweep else POLICIES)
        names = list(dict.fromkeys(names))
        key, values = sweep_values(arguments.sweep) if arguments.sweep else (None, [None])
        if key == EVAL_ROWS and arguments.eval_rows is not None:
            raise ValueError(f"--sweep {EVAL_ROWS}=... and --eval-rows are both given; allowed: one of them")
        settings = []  # (--set overrides, eval rows) per value
        for value in values:
            if key == EVAL_ROWS:
                try:
                    rows = int(value)
                except ValueError:
                    raise ValueError(f"--sweep {EVAL_ROWS} value {value!r}; allowed: integers") from None
                settings.append((arguments.set, rows))
            else:
                settings.append(([*arguments.set, *([f"{key}={value}"] if key else [])], arguments.eval_rows))
        for sets, rows in settings:
            for name in names:
                policy_config(landscape, policy_overrides(landscape, name, sets))
            if rows is not None:
                eval_subset(landscape, policy_config(landscape, sets).selection.metric, rows, np.random.default_rng(0))
    except ValueError as error:  # a LandscapeError, a ConfigError or a setting above
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    runs = []
    for value, (sets, rows) in zip(values, settings):
        if key:
            print(f"{key}={value}", flush=True)
        runs.append(run_policies(landscape, names, sets, arguments.seeds, rows))
    header = {"landscape": str(arguments.landscape), "seeds": arguments.seeds, "overrides": arguments.set,
              "eval_rows": arguments.eval_rows}
    if not key:
        if arguments.out:
            Path(arguments.out).parent.mkdir(parents=True, exist_ok=True)
            Path(arguments.out).write_text(json.dumps(header | runs[0], indent=2) + "\n")
        return 0
    name = Path(arguments.landscape).resolve().name
    out = Path(arguments.out or ROOT / "bench" / "results" / f"sweep_{name}_{key}.json")
    lines = sweep_lines(runs, values)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(header | {"sweep": {"key": key, "values": values}, "lines": lines,
                                        "runs": [{key: value} | run for value, run in zip(values, runs)]},
                              indent=2) + "\n")
    sweep_figure(lines, key, name, arguments.seeds).savefig(out.with_suffix(".png"), dpi=110)
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
