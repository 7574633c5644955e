"""The GPU benchmarks are not tests, but their plumbing must not rot between device sessions:
each parses its arguments, and the grid (the Trainer anchor plus our evaluation) runs end to
end in its CPU smoke mode on the embedded default."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "bench").glob("*.py")))
def test_every_benchmark_parses_its_arguments(script):
    result = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout


def test_the_grid_runs_end_to_end_in_smoke_mode(smollm2_dir):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "grid.py"), "--smoke", "--configs", "0"],
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = [json.loads(line) for line in result.stdout.splitlines() if line.startswith('{"')]
    assert run["config"] == "q,v r8" and run["trainable_params"] == 460_800  # the anchor's count
    assert 0 < run["eval_loss"] < 20 and 0 <= run["eval_accuracy"] <= 1


def test_the_tokenizing_benchmark_times_every_row_of_the_data_it_is_given(tmp_path, smollm2_dir):
    out = tmp_path / "tokenize.json"
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "tokenize_data.py"), "--repeats", "1", "--out", str(out),
                             "seed=0"], capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["rows"] == {"train": 480, "eval": 240}  # the embedded default's atlas, as its dry run counts it
    assert len(record["seconds"]) == 1 and record["seconds"][0] > 0


def test_the_packing_benchmark_on_random_shapes_runs_without_ray_optuna_datasets_or_pandas(tmp_path):
    """What its docstring promises: a lent GPU machine, which lacks these, runs it with nothing staged."""
    script = (
        "import sys\n"
        "for name in ('ray', 'optuna', 'datasets', 'pandas'):\n"
        "    sys.modules[name] = None  # an import of any of them raises ImportError\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from pathlib import Path\n"
        "import bench.shared_packing as bench\n"
        f"bench.RESULTS = Path({str(tmp_path)!r})\n"
        "sys.argv = ['shared_packing.py', '--random', '--slots', '1', '--steps', '1', '--modes', 'eager',"
        " '--rows', '1', '--tokens', '8']\n"
        "bench.main()\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    (written,) = tmp_path.glob("shared_packing_*.json")
    figures = json.loads(written.read_text())
    assert figures["alone"]["tokens_per_second"] > 0 and [p["slots"] for p in figures["packed"]] == [1]


def test_the_search_benchmark_counts_overlapping_busy_windows_once_and_accounts_for_setup():
    sys.path.insert(0, str(ROOT))
    from bench.search_vs_grid import first_full_budget_result_at_least_as_good, time_account, timeline, union_seconds

    assert union_seconds([(0, 10), (5, 12), (20, 25), (21, 22)]) == 17  # 0-12 and 20-25
    assert union_seconds([]) == 0
    reports = {  # the prior and a search trial on two workers, then a confirmation on a new worker
        "tune/trial_a": [{"entered_at": 110, "worker_started_at": 105, "busy_from": 114, "busy_to": 120,
                          "config": {"origin": "prior"}},
                         {"entered_at": 110, "worker_started_at": 105, "busy_from": 121, "busy_to": 130,
                          "config": {"origin": "prior"}}],
        "tune/trial_b": [{"entered_at": 112, "worker_started_at": 106, "busy_from": 113, "busy_to": 125,
                          "config": {"origin": "search"}}],
        "tune/trial_c": [{"entered_at": 150, "worker_started_at": 140, "busy_from": 152, "busy_to": 160,
                          "config": {"origin": "confirm"}}],
    }
    reports["tune/trial_c"][0]["called_at"] = 147  # a new worker: Tune called it, then PEFT was imported
    account = time_account(reports, started=100, ended=165)
    assert account["trial_import_seconds"] == 3
    clocks = timeline(reports, started=100)
    assert [(c["trial"], c["origin"]) for c in clocks] == [("tune/trial_a", "prior"), ("tune/trial_b", "search"),
                                                          ("tune/trial_c", "confirm")]
    assert clocks[2] == {"trial": "tune/trial_c", "origin": "confirm", "worker_started_at": 40, "called_at": 47,
                         "entered_at": 50, "busy_from": 52, "last_report": 60}
    assert account["before_first_trial"] == 10 and account["trial_setup_seconds"] == 4 + 1 + 2
    assert account["worker_processes"] == 3 and account["after_last_report"] == 5
    assert account["stages"] == {"search": {"from_start": 10, "seconds": 20}, "confirm": {"from_start": 50, "seconds": 10}}
    for trial, losses in (("tune/trial_a", (0.5, 0.41)), ("tune/trial_b", (0.39,)), ("tune/trial_c", (0.38,))):
        for report, loss in zip(reports[trial], losses):
            report.update(step=100 if report is reports[trial][-1] else 50, eval_loss=loss)
    # trial_a: 0.41 at step 100 (t=130); trial_b: 0.39 at step 100 (t=125); the 0.5 at step 50 never counts
    assert first_full_budget_result_at_least_as_good(reports, 100, 0.42, started=100) == 25
    assert first_full_budget_result_at_least_as_good(reports, 100, 0.385, started=100) == 60  # only confirm's
    assert first_full_budget_result_at_least_as_good(reports, 100, 0.3, started=100) is None


def test_mfu_1b_is_the_trial_in_the_mode_the_defaults_give_it_compile_time_included():
    """`mfu_1b` follows resources.compile: auto: for a 1B+ model's 1,000-step trial it is the
    compiled step's MFU discounted by its compile time; for a model auto would not compile,
    the best uncompiled step."""
    sys.path.insert(0, str(ROOT))
    from bench.step_modes import MFU_TRIAL_STEPS, figures_of

    def record(total_params):
        return {"small": {}, "memory": {}, "1b_again": {}, "1b": {
            "total_params": total_params,
            "mfu": {"b32x1024/eager": 0.24, "b16x1024/graph": 0.2, "b32x1024/compiled": 0.4},
            "b32x1024/compiled": {"ms_per_step": 400.0, "warmup_seconds": 40.0}}}

    compiled = figures_of(record(1.1e9))
    trial_seconds = MFU_TRIAL_STEPS * 0.4
    assert compiled["mfu_1b"] == pytest.approx(0.4 * trial_seconds / (trial_seconds + 40))
    assert compiled["mfu_1b_uncompiled"] == 0.24 and compiled["compile_seconds_1b"] == 40
    assert compiled["mfu_1b_compiled_trial_100_steps"] == pytest.approx(0.4 * 40 / 80)  # half the trial compiling
    assert figures_of(record(0.9e9))["mfu_1b"] == 0.24  # auto leaves it uncompiled


def test_the_search_benchmark_sets_the_picks_exact_match_beside_the_rule_of_thumb_trials():
    import pandas as pd

    sys.path.insert(0, str(ROOT))
    from bench.search_vs_grid import answers_against_the_prior

    trials = pd.DataFrame([
        {"trial_id": "a", "origin": "prior", "status": "stopped", "step": 50, "eval_loss": 0.6, "eval_exact_match": 0.25},
        {"trial_id": "b", "origin": "search", "status": "finished", "step": 100, "eval_loss": 0.4, "eval_exact_match": 0.5},
    ])
    figures = answers_against_the_prior(trials, {"trial_id": "b"})
    assert (figures["search_pick_exact_match"], figures["prior_exact_match"], figures["prior_step"],
            figures["prior_status"]) == (0.5, 0.25, 50, "stopped")
    assert answers_against_the_prior(trials.drop(columns="eval_exact_match"), {"trial_id": "b"}) == {}


def test_pick_stability_counts_the_picks_that_share_a_module_set_and_rank_and_the_uncertain_ones():
    sys.path.insert(0, str(ROOT))
    from bench.pick_stability import PRIORS_HEADING, stability

    def run(modules, r, value, uncertain, priors=True):
        return {"pick": {"lora_config": {"target_modules": modules, "r": r}, "value": value,
                         "without_pick": {"uncertain": uncertain}},
                "report": f"# run\n\n{PRIORS_HEADING if priors else ''}\n"}

    figures = stability([run(["v_proj", "q_proj"], 16, 0.40, False), run(["q_proj", "v_proj"], 16, 0.41, True),
                         run(["down_proj"], 8, 0.43, True)], grid_eval_loss=0.424)
    assert figures["stability_same_cell"] == 2  # the module sets are the same whatever their order
    assert figures["stability_cells"] == {"q_proj,v_proj r16": 2, "down_proj r8": 1}
    assert figures["stability_picks_at_most_grid"] is False  # 0.43 > 0.424
    assert (figures["stability_priors_shown"], figures["stability_uncertain"]) == (True, 2)
    failed = stability([run(["q_proj"], 8, 0.40, False), {"pick": {}, "report": ""}], grid_eval_loss=0.424)
    assert (failed["stability_picks_at_most_grid"], failed["stability_priors_shown"], failed["stability_same_cell"]) == (
        False, False, 1)  # a search without a pick fails the bar


def test_the_driver_steps_the_search_benchmark_clocks_exist():
    import importlib

    from bench.search_vs_grid import DRIVER_STEPS

    missing = [f"{module}.{name}" for module, name in DRIVER_STEPS
               if not hasattr(importlib.import_module(module), name)]
    assert missing == []
