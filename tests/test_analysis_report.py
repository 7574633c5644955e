"""analyse() and `python -m analysis.report`: from a run directory to trials.csv, pick.json, the adapter config, plots
and report.md."""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
from peft import LoraConfig

from analysis.config import SelectionConfig
from analysis.pipeline import analyse
from analysis.report import main
from analysis.results import read_run_config
from helpers import add_trial, write_run_config

# importance.png needs 20 configurations (analysis.plots.MIN_CONFIGURATIONS_FOR_IMPORTANCE); make_run has 4
PLOTS = {"metric_vs_rank.png", "train_seconds_vs_rank.png", "cost_vs_metric.png", "learning_curves.png"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_run(run_dir: Path, **selection) -> Path:
    """A run with a known answer: best aaaa0001 (loss 0.50), pick aaaa0002 (0.52 <= 0.50 / 0.95, a quarter of the parameters)."""
    write_run_config(run_dir, **selection)
    add_trial(run_dir, "aaaa0001", eval_loss=0.50, module_set="attention_qv", r=16, train_seconds=160.0)
    add_trial(run_dir, "aaaa0002", eval_loss=0.52, module_set="attention_qv", r=4, train_seconds=40.0)
    add_trial(run_dir, "aaaa0003", eval_loss=0.51, module_set="attention", r=8, train_seconds=80.0)
    add_trial(run_dir, "aaaa0004", eval_loss=0.60, module_set="mlp", r=4, train_seconds=50.0)
    add_trial(run_dir, "aaaa0005", eval_loss=0.30, module_set="attention_qv", r=2, last_step=50)  # better, but stopped early
    add_trial(run_dir, "aaaa0006", module_set="mlp", r=16, last_step=25,
              error="trainables.train.TrialDiverged: loss became nan at step 12")
    add_trial(run_dir, "aaaa0007", module_set="attention", r=4, last_step=None, origin="prior",
              error="torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 MiB.")
    return run_dir


@pytest.fixture(scope="module")
def analysed(tmp_path_factory) -> Path:
    run_dir = make_run(tmp_path_factory.mktemp("analysed") / "run")
    assert analyse(run_dir) == 0
    return run_dir


def read_pick(run_dir: Path) -> dict:
    return json.loads((run_dir / "pick.json").read_text())


def read_trials_csv(run_dir: Path) -> pd.DataFrame:
    return pd.read_csv(run_dir / "trials.csv", keep_default_na=False, na_values=[""])


def test_analyse_writes_every_result_file(analysed):
    for name in ("trials.csv", "pick.json", "adapter/adapter_config.json", "report.md"):
        assert (analysed / name).is_file(), name


def test_the_pick_is_the_cheapest_within_tolerance_not_the_better_early_stopped_trial(analysed):
    picked = read_pick(analysed)

    assert (picked["trial_id"], picked["best_trial_id"], picked["value"], picked["best_value"]) == (
        "aaaa0002", "aaaa0001", 0.52, 0.50)
    assert (picked["metric"], picked["mode"], picked["tolerance"], picked["cost_name"]) == (
        "eval_loss", "min", 0.95, "trainable_params")


def test_pick_json_agrees_with_trials_csv(analysed):
    picked = read_pick(analysed)
    trials = read_trials_csv(analysed).set_index("trial_id")
    row = trials.loc[picked["trial_id"]]
    finished = trials[trials["status"] == "finished"]

    assert (row["eval_loss"], row["trainable_params"], row["step"]) == (picked["value"], picked["cost"], picked["step"])
    assert finished["eval_loss"].min() == picked["best_value"]
    assert json.loads(row["target_modules"]) == picked["lora_config"]["target_modules"]
    assert (row["r"], row["lora_alpha"]) == (picked["lora_config"]["r"], picked["lora_config"]["lora_alpha"])


def test_failed_trials_stay_in_trials_csv_with_their_error(analysed):
    trials = read_trials_csv(analysed).set_index("trial_id")

    assert trials.loc["aaaa0006", ["status", "error"]].tolist() == ["failed", "TrialDiverged: loss became nan at step 12"]
    assert trials.loc["aaaa0007", "status"] == "failed" and pd.isna(trials.loc["aaaa0007", "eval_loss"])
    assert trials.loc["aaaa0005", "status"] == "stopped"


def test_the_adapter_config_is_the_picked_trials_lora_config_on_the_base_model(analysed):
    loaded = LoraConfig.from_pretrained(analysed / "adapter")

    assert (loaded.r, loaded.lora_alpha, loaded.base_model_name_or_path) == (4, 8.0, "/models/tiny")


def test_plots_are_non_empty_png_files(analysed):
    plots = list((analysed / "plots").iterdir())

    assert {p.name for p in plots} == PLOTS
    for plot in plots:
        assert plot.read_bytes().startswith(PNG_SIGNATURE) and plot.stat().st_size > 5_000, plot.name


def test_report_explains_the_pick_against_the_best_trial(analysed):
    report = (analysed / "report.md").read_text()

    assert ("Trial `aaaa0002` reaches eval_loss 0.52 at step 100 against the best 0.5 (trial `aaaa0001`), "
            "within tolerance 0.95") in report
    assert "8,000 parameters instead of 32,000 (75% fewer) in 40 s instead of 160 s (75% less)" in report


def test_report_states_the_space_and_the_budget_spent(analysed):
    report = (analysed / "report.md").read_text()

    assert "| `ranks` | 4, 8, 16 |" in report and "| `learning_rate` | from 0.0001 to 0.001 |" in report
    assert "7 trials: 4 finished all 100 steps, 1 stopped early (by ASHA, or the run was interrupted), 2 failed." in report
    assert "- `aaaa0006` (mlp, r=16): TrialDiverged: loss became nan at step 12" in report
    assert "- `aaaa0007` (attention, r=4): OutOfMemoryError: CUDA out of memory." in report


def test_report_ranks_the_top_trials_and_embeds_every_plot(analysed):
    report = (analysed / "report.md").read_text()

    top = report.split("## Top trials")[1].split("\n## ")[0]
    table_rows = [line for line in top.splitlines() if line.startswith("| `aaaa")]
    assert [row.split("|")[1].strip() for row in table_rows] == ["`aaaa0001`", "`aaaa0003`", "`aaaa0002`", "`aaaa0004`"]
    for name in PLOTS:
        assert f"(plots/{name})" in report


def test_report_snippet_builds_the_picked_lora_config(analysed):
    report = (analysed / "report.md").read_text()
    snippet = report.split("```python\n")[1].split("```")[0]

    namespace = {}
    exec(snippet, namespace)

    picked = read_pick(analysed)["lora_config"]
    assert {key: getattr(namespace["config"], key) for key in ("r", "lora_alpha", "lora_dropout", "use_rslora")} == {
        key: picked[key] for key in ("r", "lora_alpha", "lora_dropout", "use_rslora")}


def test_no_temporary_file_is_left_behind(analysed):
    assert [p for p in analysed.rglob("*") if ".tmp" in p.name or p.name.startswith(".adapter_config")] == []


def test_a_metric_to_maximise_picks_the_cheapest_trial_within_tolerance_of_the_highest(tmp_path):
    run_dir = write_run_config(tmp_path / "run", metric="eval_accuracy", mode="max")
    add_trial(run_dir, "bbbb0001", eval_accuracy=0.90, r=16)
    add_trial(run_dir, "bbbb0002", eval_accuracy=0.80, r=4)  # below 0.95 * 0.90
    add_trial(run_dir, "bbbb0003", eval_accuracy=0.86, r=8)

    assert analyse(run_dir) == 0
    assert (read_pick(run_dir)["trial_id"], read_pick(run_dir)["best_value"]) == ("bbbb0003", 0.90)


def test_the_report_says_how_steps_ran_and_names_trials_whose_compile_failed(tmp_path):
    """A trial whose step failed to compile trains uncompiled and says so in its step_mode; with
    resources.compile on, the report names it (the worker's log has the reason)."""
    run_dir = write_run_config(tmp_path / "run", resources={"compile": True, "gpus_per_trial": 1.0})
    add_trial(run_dir, "eeee0001", eval_loss=0.5, r=16, step_mode="compiled")
    add_trial(run_dir, "eeee0002", eval_loss=0.6, r=4, step_mode="cuda_graph")
    add_trial(run_dir, "eeee0003", eval_loss=0.7, r=8, step_mode="compiled")

    assert analyse(run_dir) == 0
    assert read_trials_csv(run_dir).set_index("trial_id")["step_mode"].to_dict() == {
        "eeee0001": "compiled", "eeee0002": "cuda_graph", "eeee0003": "compiled"}
    report = (run_dir / "report.md").read_text()
    assert "Train steps ran compiled in 2, as a CUDA graph in 1 trials." in report
    assert "resources.compile was on, but 1 trial(s) trained uncompiled" in report and "`eeee0002`" in report

    quiet = write_run_config(tmp_path / "quiet", resources={"compile": False})
    add_trial(quiet, "ffff0001", eval_loss=0.5, step_mode="cuda_graph")
    assert analyse(quiet) == 0
    assert "trained uncompiled" not in (quiet / "report.md").read_text()


def test_packed_trials_whose_pack_compiled_are_not_called_uncompiled_and_one_whose_pack_did_not_is(tmp_path):
    run_dir = write_run_config(tmp_path / "run", resources={"compile": True, "packing": "shared"})
    add_trial(run_dir, "eeee0001", eval_loss=0.5, r=16, step_mode="packed+compiled+cuda_graph")
    add_trial(run_dir, "eeee0002", eval_loss=0.6, r=4, step_mode="packed+compiled+cuda_graph")
    add_trial(run_dir, "eeee0003", eval_loss=0.7, r=8, step_mode="packed+cuda_graph")

    assert analyse(run_dir) == 0
    report = (run_dir / "report.md").read_text()
    assert ("Train steps ran packed in a shared trainer, its loss, AdamW and dropout masks compiled, as a CUDA graph in 2, "
            "packed in a shared trainer as a CUDA graph in 1 trials.") in report
    assert "resources.compile was on, but 1 trial(s) trained uncompiled" in report
    named = report.split("trained uncompiled")[1].split("\n")[0]
    assert "`eeee0003`" in named and "`eeee0001`" not in named and "`eeee0002`" not in named
    assert "in processes of their own" not in report


def test_the_report_says_how_trials_shared_the_machine_and_why_auto_chose_it(tmp_path):
    chosen = write_run_config(tmp_path / "auto", resources={"packing": "shared",
                                                            "packing_reason": "the pack trained 9x faster here"})
    named = write_run_config(tmp_path / "named", resources={"packing": "processes"})
    for run_dir in (chosen, named):
        add_trial(run_dir, "dddd0001", eval_loss=0.5, r=16)
        assert analyse(run_dir) == 0
    assert ("Trials trained together in one shared trainer per GPU, its base model held once "
            "(resources.packing=shared): auto chose it, the pack trained 9x faster here.") in (chosen / "report.md").read_text()
    report = (named / "report.md").read_text()
    assert "Trials trained each in a process of its own (resources.packing=processes)." in report
    assert "auto chose" not in report


def test_importance_plot_is_skipped_with_a_reason_when_too_few_configurations_finished(tmp_path):
    run_dir = write_run_config(tmp_path / "run")
    add_trial(run_dir, "cccc0001", eval_loss=0.5, r=16)
    add_trial(run_dir, "cccc0002", eval_loss=0.6, r=4)

    assert analyse(run_dir) == 0
    assert not (run_dir / "plots" / "importance.png").exists()
    assert ("`plots/importance.png` not drawn: only 2 configuration(s) finished the full budget"
            in (run_dir / "report.md").read_text())


def test_all_trials_failed_exits_1_and_still_writes_the_report_and_trials_csv(tmp_path, capsys):
    run_dir = write_run_config(tmp_path / "run")
    add_trial(run_dir, "dddd0001", last_step=None, error="torch.OutOfMemoryError: CUDA out of memory.")
    add_trial(run_dir, "dddd0002", last_step=25, error="trainables.train.TrialDiverged: loss became nan at step 30")
    (run_dir / "adapter").mkdir()
    for stale in ("pick.json", "adapter/adapter_config.json"):  # left by an earlier analysis
        (run_dir / stale).write_text("{}")

    assert analyse(run_dir) == 1

    assert "No trial reached step 100" in capsys.readouterr().err
    assert read_trials_csv(run_dir)["status"].tolist() == ["failed", "failed"]
    report = (run_dir / "report.md").read_text()
    assert "**No pick.** No trial reached step 100, the full budget (0 finished, 0 stopped, 2 failed)" in report
    assert "OutOfMemoryError: CUDA out of memory." in report
    assert not (run_dir / "pick.json").exists() and not (run_dir / "adapter" / "adapter_config.json").exists()
    assert (run_dir / "picks" / "earlier" / "pick.json").exists()  # moved aside, not deleted


def test_cli_tolerance_one_picks_the_best_trial(tmp_path):
    run_dir = make_run(tmp_path / "run")

    assert main([str(run_dir), "--tolerance", "1"]) == 0
    assert read_pick(run_dir)["trial_id"] == "aaaa0001"


def test_cli_cost_train_seconds_picks_the_fastest_trial_within_tolerance(tmp_path):
    run_dir = make_run(tmp_path / "run")

    assert main([str(run_dir), "--cost", "train_seconds"]) == 0
    assert (read_pick(run_dir)["trial_id"], read_pick(run_dir)["cost"]) == ("aaaa0002", 40.0)


def test_cli_metric_and_mode_switch_to_a_metric_to_maximise(tmp_path):
    run_dir = make_run(tmp_path / "run")

    assert main([str(run_dir), "--metric", "eval_accuracy", "--mode", "max"]) == 0
    assert (read_pick(run_dir)["metric"], read_pick(run_dir)["mode"]) == ("eval_accuracy", "max")


def test_cli_metric_alone_picks_in_that_metrics_own_direction_whatever_mode_the_run_had(tmp_path):
    run_dir = make_run(tmp_path / "run", mode="min")  # a run whose config said mode: min for eval_loss

    assert main([str(run_dir), "--metric", "eval_accuracy"]) == 0
    assert (read_pick(run_dir)["metric"], read_pick(run_dir)["mode"]) == ("eval_accuracy", "max")


def test_cli_takes_the_users_metric_function_the_run_computed(tmp_path):
    run_dir = _run_with_a_metric_function(tmp_path / "run")

    assert main([str(run_dir), "--metric", "mymod:score", "--tolerance", "1"]) == 0
    assert (read_pick(run_dir)["trial_id"], read_pick(run_dir)["mode"]) == ("aaaa0001", "max")


@pytest.mark.parametrize("arguments, message", [
    (["--tolerance", "2"], "--tolerance=2.0 is outside (0, 1]"),
    (["--tolerance", "abc"], "invalid float value"),
    (["--cost", "dollars"], "invalid choice"),
    (["--metric", "eval_accuracy", "--mode", "min"], "Fix: set --mode to 'max' or 'auto'"),
    (["--metric", "mymod:score"], "--metric='mymod:score': this run's trials did not compute it"),
    (["--unknown"], "unrecognized arguments"),
])
def test_cli_exits_2_on_bad_arguments_with_a_message_and_no_traceback(tmp_path, capsys, arguments, message):
    run_dir = make_run(tmp_path / "run")

    assert main([str(run_dir), *arguments]) == 2

    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (run_dir / "trials.csv").exists()


def test_cli_exits_2_on_a_missing_run_directory(tmp_path, capsys):
    assert main([str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("arguments", [["--tolerance", "abc"], ["--unknown"], ["--tolerance", "2"], ["--cost", "dollars"]])
def test_cli_bad_input_is_one_line_that_starts_with_error_as_in_the_search(tmp_path, capsys, arguments):
    run_dir = make_run(tmp_path / "run")
    for args in ([str(run_dir), *arguments], [str(tmp_path / "nowhere")]):
        assert main(args) == 2
        lines = capsys.readouterr().err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), lines


def test_analyse_rejects_invalid_selection_settings(tmp_path):
    with pytest.raises(ValueError, match="selection.cost='dollars'"):
        analyse(make_run(tmp_path / "run"), SelectionConfig(cost="dollars"))


def test_module_entry_point_exits_2_without_a_traceback(tmp_path):
    done = subprocess.run([sys.executable, "-m", "analysis.report", str(tmp_path / "nowhere")],
                          capture_output=True, text=True, cwd=Path(__file__).parents[1])

    assert done.returncode == 2
    assert "does not exist" in done.stderr and "Traceback" not in done.stderr


def test_the_report_states_the_training_and_evaluation_time_spent(analysed):
    trials = read_trials_csv(analysed)
    report = (analysed / "report.md").read_text()
    assert f"Training took {trials.train_seconds.sum():,.0f} trial-seconds" in report
    assert f"evaluation {trials.eval_seconds.sum():,.0f}." in report


def _run_with_a_metric_function(run_dir: Path) -> Path:
    """A run that selected by the user's function mymod:score (max): best aaaa0001 (0.80); aaaa0002
    (0.78 >= 0.95 * 0.80) trains a quarter of its parameters; aaaa0003 is out."""
    write_run_config(run_dir, metric="mymod:score", mode="max")
    run_config = json.loads((run_dir / "run_config.json").read_text())
    run_config["selection"]["trust_metric_code"] = True
    (run_dir / "run_config.json").write_text(json.dumps(run_config))
    for trial_id, r, loss, exact, score in (("aaaa0001", 16, 0.50, 0.75, 0.80), ("aaaa0002", 4, 0.40, 0.5, 0.78),
                                            ("aaaa0003", 2, 0.45, 0.25, 0.60)):
        result = add_trial(run_dir, trial_id, r=r, eval_loss=loss) / "result.json"
        rows = [{**json.loads(line), "eval_exact_match": exact, "mymod:score": score}
                for line in result.read_text().splitlines()]
        result.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return run_dir


def test_a_metric_function_picks_and_the_report_shows_it_beside_loss_accuracy_and_exact_match(tmp_path):
    run_dir = _run_with_a_metric_function(tmp_path / "run")

    assert analyse(run_dir) == 0

    assert (read_pick(run_dir)["trial_id"], read_pick(run_dir)["metric"]) == ("aaaa0002", "mymod:score")
    assert read_trials_csv(run_dir).set_index("trial_id")["mymod:score"].to_dict() == {
        "aaaa0001": 0.80, "aaaa0002": 0.78, "aaaa0003": 0.60}
    report = (run_dir / "report.md").read_text()
    assert ("|  | pick `aaaa0002` | best `aaaa0001` |\n| --- | --- | --- |\n| eval_loss | 0.4 | 0.5 |\n"
            "| eval_accuracy | 0.9 | 0.875 |\n| eval_exact_match | 0.5 | 0.75 |\n| mymod:score (selects) | 0.78 | 0.8 |"
            ) in report
    top = report.split("## Top trials")[1].split("\n## ")[0]
    assert top.index("`aaaa0001`") < top.index("`aaaa0002`") < top.index("`aaaa0003`")  # by the function, not by loss
    assert "| `aaaa0001` | search | attention_qv | 16 | 32 | 0.05 | False | False | 0.0002 | 0.8 | 32,000 |" in top


def test_the_pick_section_leaves_out_a_metric_no_trial_reported(analysed):
    pick_section = (analysed / "report.md").read_text().split("## The pick")[1].split("\n## ")[0]

    assert "|  | pick `aaaa0002` | best `aaaa0001` |" in pick_section and "| eval_loss (selects) | 0.52 | 0.5 |" in pick_section
    assert "eval_exact_match" not in pick_section  # these trials generated no answers


def test_the_pick_section_shows_one_column_when_the_pick_is_the_best(tmp_path):
    run_dir = make_run(tmp_path / "run")
    assert analyse(run_dir, SelectionConfig(tolerance=1)) == 0

    pick_section = (run_dir / "report.md").read_text().split("## The pick")[1].split("\n## ")[0]
    assert "|  | pick `aaaa0001` (also the best) |\n| --- | --- |\n| eval_loss (selects) | 0.5 |" in pick_section


def _retrained(run_dir: Path, parent: str, weights: bytes) -> Path:
    """A retrain of `parent` on all the data, with adapter weights at its last checkpoint."""
    trial_dir = add_trial(run_dir, "eeee0001", experiment="retrain", origin="retrain", parent=parent, eval_loss=0.48)
    adapter = trial_dir / "checkpoint_000003" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_model.safetensors").write_bytes(weights)
    return adapter / "adapter_model.safetensors"


def test_reanalysis_that_changes_the_pick_keeps_the_earlier_pick_and_the_retrained_weights(tmp_path, capsys):
    run_dir = make_run(tmp_path / "run")
    checkpoint = _retrained(run_dir, "aaaa0002", b"retrained weights of aaaa0002")
    assert analyse(run_dir) == 0
    first = json.loads((run_dir / "pick.json").read_text())
    assert first["trial_id"] == "aaaa0002" and first["retrain"]["trial_id"] == "eeee0001"
    assert first["retrain"]["eval_loss"] == 0.48
    assert (run_dir / "adapter" / "adapter_model.safetensors").read_bytes() == b"retrained weights of aaaa0002"

    assert main([str(run_dir), "--tolerance", "1.0"]) == 0  # the best trial, which was not retrained

    assert capsys.readouterr().out.count("Picked trial") == 2  # once per analysis
    second = json.loads((run_dir / "pick.json").read_text())
    assert second["trial_id"] == "aaaa0001" and second["retrain"] is None
    assert not (run_dir / "adapter" / "adapter_model.safetensors").exists()  # not beside another configuration
    earlier = run_dir / first["analysis"]
    assert json.loads((earlier / "pick.json").read_text())["trial_id"] == "aaaa0002"
    assert (earlier / "adapter" / "adapter_model.safetensors").read_bytes() == b"retrained weights of aaaa0002"
    assert checkpoint.read_bytes() == b"retrained weights of aaaa0002"
    report = (run_dir / "report.md").read_text()
    assert "Trial `eeee0001` retrained trial `aaaa0002`'s configuration" in report
    assert "**The pick, trial `aaaa0001`, was not retrained**" in report
    assert (run_dir / second["analysis"] / "report.md").read_text() == report

    assert main([str(run_dir), "--tolerance", "0.95"]) == 0  # back to the retrained pick: its weights come back
    assert (run_dir / "adapter" / "adapter_model.safetensors").read_bytes() == b"retrained weights of aaaa0002"
    assert len(list((run_dir / "picks").iterdir())) == 3


def test_the_report_shows_every_prior_beside_the_pick(tmp_path):
    run_dir = tmp_path / "run"
    write_run_config(run_dir)
    add_trial(run_dir, "aaaa0001", eval_loss=0.50, module_set="mlp", r=8, origin="prior")
    add_trial(run_dir, "aaaa0002", eval_loss=0.55, module_set="mlp", r=32, use_rslora=True, origin="prior")
    add_trial(run_dir, "aaaa0003", module_set="mlp", r=16, last_step=50, origin="prior")
    add_trial(run_dir, "aaaa0004", eval_loss=0.51, module_set="attention_qv", r=4)
    assert analyse(run_dir) == 0
    report = (run_dir / "report.md").read_text()

    section = report.split("## Against the known-good configurations")[1].split("\n## ")[0]
    assert "The search's first 3 trials were the priors; the pick (`aaaa0004`) reached eval_loss 0.51" in section
    assert "| `aaaa0001` | mlp, r=8, alpha 16, lr 0.0002 | 100 | finished | 0.5 | eval_loss 2% lower than the pick's" in section
    assert ("| `aaaa0002` | mlp, r=32, alpha 64, RSLoRA, lr 0.0002 | 100 | finished | 0.55 | "
            "eval_loss 8% more than the pick's") in section
    assert "| `aaaa0003` | mlp, r=16, alpha 32, lr 0.0002 | 50 | stopped |" in section
    assert "stopped at step 50, below its rung's cut" in section


def test_a_pick_that_cannot_be_told_apart_says_so_in_one_sentence_giving_both(tmp_path):
    # bar 0.50 / 0.95 = 0.5263: aaaa0002's mean (0.53) is past it, its interval (0.53 - 1.28 * 0.005) is not
    run_dir = write_run_config(tmp_path / "run")
    add_trial(run_dir, "aaaa0001", eval_loss=0.50, eval_loss_se=0.01, r=16)
    add_trial(run_dir, "aaaa0002", eval_loss=0.53, eval_loss_se=0.005, r=4)
    assert analyse(run_dir) == 0

    picked, report = read_pick(run_dir), (run_dir / "report.md").read_text()
    sentence = ("The pick `aaaa0001` cannot be told apart from the cheaper `aaaa0002` on this eval set: eval_loss "
                "0.5 ± 0.01 at 32,000 trainable_params (1 run) against 0.53 ± 0.005 at 8,000 trainable_params "
                "(1 run); the pick is within the tolerance by its mean, `aaaa0002` by its standard error only.")
    assert (picked["trial_id"], picked["undecided_with"], picked["undecided"]) == ("aaaa0001", "aaaa0002", sentence)
    assert sentence in report.split("## The pick")[1].split("\n## ")[0]


def test_a_decided_pick_says_nothing_of_being_undecided(analysed):
    assert read_pick(analysed)["undecided"] is None and "cannot be told apart" not in (analysed / "report.md").read_text()


def test_pick_json_and_the_report_say_the_comparison_was_paired_over_the_same_eval_rows(tmp_path):
    # aaaa0002 is 0.04 worse than aaaa0001 on every one of the same four rows: 0.54 is past the bar (0.5263)
    # whatever the rows' spread, while its own standard error over those rows alone would keep it in the band
    run_dir = write_run_config(tmp_path / "run")
    rows = [0.2, 0.4, 0.6, 0.8]
    add_trial(run_dir, "aaaa0001", eval_loss=0.50, eval_loss_se=0.129, r=16, eval_row_loss=rows)
    add_trial(run_dir, "aaaa0002", eval_loss=0.54, eval_loss_se=0.129, r=4, eval_row_loss=[row + 0.04 for row in rows])
    assert analyse(run_dir) == 0

    picked, report = read_pick(run_dir), (run_dir / "report.md").read_text()

    assert (picked["trial_id"], picked["undecided_with"]) == ("aaaa0001", None)
    assert (picked["compared"], picked["paired"]) == (1, 1)
    assert "paired with the best over the same eval rows" in picked["rule"]
    assert picked["rule"] in report.split("## The pick")[1]


@pytest.mark.parametrize("priors, shown", [
    ("auto", "| `priors` | auto |"),
    ([{"module_set": "all_linear", "r": 16, "learning_rate": 2e-4}, {"module_set": "mlp", "r": 8}],
     "| `priors` | module_set=all_linear r=16 learning_rate=0.0002, module_set=mlp r=8 |"),
])
def test_the_report_shows_the_priors_setting_as_given_not_letter_by_letter(priors, shown, tmp_path):
    from analysis.render import _searched

    run_config = read_run_config(write_run_config(tmp_path / "run"))
    text = _searched(replace(run_config, search={"ranks": [4, 8], "priors": priors}))
    assert shown in text and "| `ranks` | 4, 8 |" in text


def test_the_pick_line_gives_a_parameter_count_in_whole_numbers(tmp_path, capsys):
    run_dir = write_run_config(tmp_path / "run")
    add_trial(run_dir, "aaaa0001", eval_loss=0.50, trainable_params=9_768_960)
    assert analyse(run_dir) == 0
    # the one trial that finished: nothing else confirms its module set and rank
    assert "trainable_params 9,768,960, uncertain: it rests on one configuration the search found. Report:" in (
        capsys.readouterr().out)


def test_a_pick_resting_on_its_one_configuration_is_called_uncertain_in_pick_json_the_report_and_the_pick_line(
        tmp_path, capsys):
    run_dir = write_run_config(tmp_path / "run")
    add_trial(run_dir, "aaaa0001", eval_loss=0.50, module_set="attention_qv", r=16)
    add_trial(run_dir, "aaaa0002", eval_loss=0.70, module_set="mlp", r=4)  # past the bar 0.50 / 0.95
    assert analyse(run_dir) == 0

    picked, report = read_pick(run_dir), (run_dir / "report.md").read_text()
    sentence = ("**The pick is uncertain**: without its configuration (`aaaa0001`), the same rule picks `aaaa0002`, "
                "mlp r=4 (eval_loss 0.7, 40.0% above the pick's 0.5), past the tolerance.")
    assert picked["trial_id"] == "aaaa0001"
    assert {key: picked["without_pick"][key] for key in ("trial_id", "module_set", "r", "value", "uncertain", "left_out")} == {
        "trial_id": "aaaa0002", "module_set": "mlp", "r": 4, "value": 0.70, "uncertain": True, "left_out": 1}
    assert sentence in report.split("## The pick")[1].split("\n## ")[0]
    assert "uncertain: it rests on one configuration the search found" in capsys.readouterr().out


def test_the_pick_section_says_when_the_picks_learning_rate_or_rank_is_at_the_edge_of_the_space(tmp_path):
    # the space of write_run_config: learning_rate [1e-4, 1e-3], ranks [4, 8, 16]
    edge = write_run_config(tmp_path / "edge")
    add_trial(edge, "aaaa0001", eval_loss=0.50, r=16, learning_rate=9e-4)  # log position 0.95
    add_trial(edge, "aaaa0002", eval_loss=0.70, r=4, learning_rate=3e-4)
    inside = write_run_config(tmp_path / "inside")
    add_trial(inside, "aaaa0001", eval_loss=0.50, r=8, learning_rate=3e-4)  # log position 0.48
    add_trial(inside, "aaaa0002", eval_loss=0.70, r=16, learning_rate=1.1e-4)  # at the edge, but not the pick
    assert analyse(edge) == 0 and analyse(inside) == 0

    section = (edge / "report.md").read_text().split("## The pick")[1].split("\n## ")[0]
    assert ("At the edge of the space: its learning rate 0.0009 lies in the top tenth of `search.learning_rate` "
            "[0.0001, 0.001]") in section
    assert "its rank 16 is the largest of `search.ranks`" in section
    assert "At the edge" not in (inside / "report.md").read_text()


def test_the_report_says_when_the_last_stage_found_the_pick_and_what_it_tried_when_it_did_not(tmp_path):
    found = write_run_config(tmp_path / "found")
    add_trial(found, "cccc0001", eval_loss=0.50, module_set="attention", r=16)
    add_trial(found, "cccc0002", eval_loss=0.70, module_set="mlp", r=16)
    add_trial(found, "cccc0003", eval_loss=0.51, module_set="attention", r=8, origin="cheaper", parent="cccc0001")
    assert analyse(found) == 0
    assert read_pick(found)["trial_id"] == "cccc0003"
    report = (found / "report.md").read_text()
    assert "The search's last stage found it: the nearest cheaper neighbour of `cccc0001` (attention r=16)" in report

    missed = write_run_config(tmp_path / "missed")
    add_trial(missed, "dddd0001", eval_loss=0.50, module_set="attention", r=16)
    add_trial(missed, "dddd0002", eval_loss=0.60, module_set="attention", r=8, origin="cheaper", parent="dddd0001")
    assert analyse(missed) == 0
    assert read_pick(missed)["trial_id"] == "dddd0001"
    assert "tried cheaper neighbours of the pick of its time, and the rule prefers none of them: `dddd0002` " \
           "(attention r=8): eval_loss 0.6." in (missed / "report.md").read_text()
