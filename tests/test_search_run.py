"""End to end: real Ray Tune, real Optuna, real PEFT, on a tiny model and on the default."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from helpers import load_trials, trial_reports
from search.run import main

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, local_ray, tmp_path_factory):
    output = tmp_path_factory.mktemp("runs")
    code = main([
        "--output", str(output), "--name", "tiny",
        "--set", f"model.path={tiny_model_dir}",
        "--set", "search.module_sets=[attention_qv,mlp,all_linear]",
        "--set", "search.ranks=[2,4,8]",
        "--set", "search.learning_rate=[1e-3,2e-2]",
        "--set", "budget.num_samples=9",
        "--set", "budget.max_steps=12",
        "--set", "budget.eval_every=3",
        "--set", "budget.grace_period=3",
        "--set", "budget.reduction_factor=3",
        "--set", "budget.batch_size=4",
        "--set", "data.eval_examples=8",
        "--set", "selection.retrain=true",
        "--set", "selection.confirm_top_k=2",  # two leaders, so that the confirmations' choice among them is seen
    ])
    return code, output / "tiny"


def test_search_finishes_and_writes_the_four_outputs(tiny_run):
    code, run_dir = tiny_run
    assert code == 0
    for name in ("trials.csv", "pick.json", "adapter/adapter_config.json", "report.md"):
        assert (run_dir / name).is_file(), name


def test_the_run_config_records_the_resources_as_resolved(tiny_run):
    """auto settings are stored as they were decided for this run (a resume, a report and a
    reader of the run see what the trials did): on this CPU, no GPU share and no compiling."""
    _, run_dir = tiny_run
    resources = json.loads((run_dir / "run_config.json").read_text())["resources"]
    assert resources["gpus_per_trial"] == 0.0 and resources["compile"] is False


def test_the_driver_records_when_each_step_of_its_setup_ended_before_the_first_training_step(tiny_run):
    _, run_dir = tiny_run
    times = json.loads((run_dir / "logs" / "setup_times.json").read_text())
    steps = ["setup_began", "model_prepared", "resources_planned", "device_checked", "data_read", "data_prepared",
             "run_directory_written", "ray_started", "tuner_starting"]
    assert list(times) == steps
    assert list(times.values()) == sorted(times.values()) and times["setup_began"] > 0
    started_at = json.loads((run_dir / "run_config.json").read_text())["started_at"]
    first_step = min(row["busy_from"] for rows in trial_reports(run_dir).values() for row in rows)
    assert times["tuner_starting"] < first_step - started_at


def test_asha_stops_some_trials_before_the_full_budget(tiny_run):
    _, run_dir = tiny_run
    trials = pd.read_csv(run_dir / "trials.csv")
    trials = trials[trials.origin.isin(["search", "prior"])]
    assert len(trials) == 9
    stopped = trials[trials.status == "stopped"]
    assert len(stopped) >= 1 and (stopped.step < 12).all()
    assert (trials[trials.status == "finished"].step == 12).all()


def test_stopped_trials_within_tolerance_are_promoted_from_their_checkpoint(tiny_run):
    _, run_dir = tiny_run
    trials = pd.read_csv(run_dir / "trials.csv").set_index("trial_id")
    promoted = trials[trials.origin == "promoted"]
    assert len(promoted) >= 1
    for trial_id, row in promoted.iterrows():
        parent = trials.loc[row.parent]
        assert parent.status == "stopped" and row.status == "finished" and row.step == 12
        assert (parent.r, parent.learning_rate, parent.module_set) == (row.r, row.learning_rate, row.module_set)
        result_lines = (run_dir / "tune" / f"trial_{trial_id}" / "result.json").read_text().splitlines()
        steps = [json.loads(line)["step"] for line in result_lines]
        assert steps[0] > parent.step  # continued from the parent's checkpoint, not from scratch


def test_promotions_and_confirmations_run_in_the_searchs_tuner_on_its_workers(tiny_run):
    _, run_dir = tiny_run
    assert not (run_dir / "promote").exists() and not (run_dir / "confirm").exists()
    workers = {}
    for result_file in (run_dir / "tune").glob("trial_*/result.json"):
        rows = [json.loads(line) for line in result_file.read_text().splitlines()]
        workers[rows[0]["trial_id"]] = (rows[0]["config"]["origin"], rows[0]["worker_started_at"])
    search_workers = {started for origin, started in workers.values() if origin in ("search", "prior")}
    stage_workers = {started for origin, started in workers.values() if origin in ("promoted", "confirm")}
    assert stage_workers and stage_workers <= search_workers  # no new worker process (model loaded again) for a stage


def test_leading_candidates_are_confirmed_with_other_seeds_and_picked_on_the_mean(tiny_run):
    _, run_dir = tiny_run
    trials = pd.read_csv(run_dir / "trials.csv").set_index("trial_id")
    confirm = trials[trials.origin == "confirm"]
    # the two leading configurations at the end were confirmed (a trial that led earlier may be too)
    from analysis.candidates import confirmation_candidates
    from analysis.select import Comparison
    from helpers import load_trials

    table = load_trials(run_dir)
    leaders = confirmation_candidates(table[table.origin != "confirm"],
                                      Comparison("eval_loss", "min", 0.95, "trainable_params", 12), 2)
    assert len(leaders) == 2 and set(leaders) <= set(confirm.parent)
    for _, row in confirm.iterrows():
        assert trials.loc[row.parent].status == "finished" and row.seed != trials.loc[row.parent].seed
        assert row.status == "finished" and row.step == 12  # ASHA never stops a confirmation
    pick = json.loads((run_dir / "pick.json").read_text())
    if pick["seeds"] > 1:
        runs = trials[(trials.index == pick["trial_id"]) | (trials.parent == pick["trial_id"]) & (trials.origin == "confirm")]
        assert pick["value"] == pytest.approx(runs.eval_loss.mean())


def test_retrained_pick_exports_loadable_adapter_weights(tiny_run, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, run_dir = tiny_run
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), run_dir / "adapter")
    lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # trained: B starts at zero


def test_every_trial_reports_the_contract_metrics(tiny_run):
    _, run_dir = tiny_run
    trials = pd.read_csv(run_dir / "trials.csv")
    ok = trials[trials.status != "failed"]
    for column in ("eval_loss", "eval_accuracy", "train_loss", "trainable_params", "trainable_pct",
                   "train_seconds", "tokens_per_second", "peak_memory_gb"):
        assert ok[column].notna().all() and (ok[column] >= 0).all(), column
    assert (ok.lora_alpha == ok.alpha_ratio * ok.r).all()


def test_every_finished_trial_reports_its_per_row_eval_losses_and_the_pick_pairs_them(tiny_run):
    _, run_dir = tiny_run
    finished = load_trials(run_dir).query("status == 'finished'")  # result.json's last reports
    for row in finished.itertuples():
        assert len(row.eval_row_loss) == 8, row.trial_id  # data.eval_examples
        assert statistics.stdev(row.eval_row_loss) / 8 ** 0.5 == pytest.approx(row.eval_loss_se, rel=1e-4)
    picked = json.loads((run_dir / "pick.json").read_text())
    assert picked["compared"] >= 1 and picked["paired"] == picked["compared"]  # every configuration paired with the best


def test_exported_config_is_the_picked_trials_and_applies_to_the_base_model(tiny_run, tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    _, run_dir = tiny_run
    pick = json.loads((run_dir / "pick.json").read_text())
    trials = pd.read_csv(run_dir / "trials.csv").set_index("trial_id")
    row = trials.loc[pick["trial_id"]]
    assert row.status == "finished"
    exported = LoraConfig.from_pretrained(run_dir / "adapter")
    assert exported.lora_alpha == row.alpha_ratio * row.r and exported.r == row.r
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    layer_suffixes = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    assert set(exported.target_modules) <= layer_suffixes
    peft_model = get_peft_model(model, exported)
    assert peft_model.get_nb_trainable_parameters()[0] == row.trainable_params


def test_default_config_runs_with_a_tiny_budget(local_ray, tmp_path):
    code = main(["--output", str(tmp_path), "--name", "default-tiny",
                 "--set", "budget.num_samples=2", "--set", "budget.max_steps=2", "--set", "budget.eval_every=1",
                 "--set", "budget.grace_period=1", "--set", "budget.warmup_steps=1", "--set", "data.eval_examples=4"])
    assert code == 0
    trials = pd.read_csv(tmp_path / "default-tiny" / "trials.csv")
    assert (trials.status != "failed").all()
    assert trials.origin.isin(["search", "prior"]).sum() == 2
    # the default generates the eval answers at the full budget only (loss selects, so ASHA's rungs need no
    # answers): every trial that finished reports exact match and what generating cost, no earlier report
    # does, and the pick section shows the pick's exact match beside its loss
    finished = trials[trials.status == "finished"]
    assert len(finished) and finished.eval_exact_match.between(0, 1).all() and (finished.eval_generate_seconds > 0).all()
    reports = [json.loads(line) for path in (tmp_path / "default-tiny" / "tune").glob("trial_*/result.json")
               for line in path.read_text().splitlines()]
    assert {"eval_exact_match" in r for r in reports if r["step"] < 2} == {False}
    pick = json.loads((tmp_path / "default-tiny" / "pick.json").read_text())["trial_id"]
    row = trials.set_index("trial_id").loc[pick]
    pick_section = (tmp_path / "default-tiny" / "report.md").read_text().split("## The pick")[1].split("\n## ")[0]
    assert f"| eval_loss (selects) | {row.eval_loss:.4g} |" in pick_section
    assert f"| eval_exact_match | {row.eval_exact_match:.4g} |" in pick_section


def test_a_user_metric_function_is_run_by_every_trial_on_its_answers_and_picks(tiny_model_dir, tmp_path):
    """Its own Ray (started from the directory that holds the module, which Ray puts on the trials'
    path): each eval round of each trial calls the function once, with the generated answers and
    the references of the same eval rows, and its value, in a column of its own, makes the pick.
    Being a whole command, it also shows the run's time to its first training step, counted from
    the command's start."""
    from helpers import load_curves
    from search.inputs.atlas import rows

    (tmp_path / "mymetric.py").write_text(
        "import json, pathlib\n\n\ndef score(generations, references):\n"
        "    with open(pathlib.Path(__file__).with_name('calls.jsonl'), 'a') as calls:\n"
        "        calls.write(json.dumps([generations, references]) + '\\n')\n"
        "    return 1.0 + sum(map(len, generations))\n")
    started = time.time()
    result = _cli("--output", str(tmp_path / "runs"), "--name", "mine", "--set", f"model.path={tiny_model_dir}",
                  "--set", "search.module_sets=[attention_qv]", "--set", "search.ranks=[2,4]",
                  "--set", "budget.num_samples=2", "--set", "budget.max_steps=2", "--set", "budget.eval_every=1",
                  "--set", "budget.grace_period=1", "--set", "budget.warmup_steps=1", "--set", "data.eval_examples=4",
                  "--set", "selection.confirm_top_k=0", "--set", "selection.cheaper=0",
                  "--set", "selection.metric=mymetric:score",
                  "--set", "selection.trust_metric_code=true", "--set", "selection.mode=max", cwd=tmp_path)
    command_seconds = time.time() - started
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("selection.trust_metric_code is true: every trial imports and runs mymetric:score\n")
    assert ("eval rows scored at each round (data.eval_examples=4), chosen by a shuffle seeded by seed=0: the same rows "
            "at every round and in every trial") in result.stdout

    run_dir = tmp_path / "runs" / "mine"
    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    assert len(calls) == len(load_curves(run_dir))  # one call per report
    atlas_answers = {row["messages"][-1]["content"] for row in rows("eval")}
    for generations, references in calls:
        assert references == calls[0][1] and len(references) == 4 and set(references) <= atlas_answers
        assert len(generations) == 4 and all(isinstance(text, str) for text in generations)
    pick = json.loads((run_dir / "pick.json").read_text())
    trials = pd.read_csv(run_dir / "trials.csv").set_index("trial_id")
    assert (pick["metric"], pick["mode"]) == ("mymetric:score", "max")
    assert pick["value"] == trials.loc[pick["trial_id"], "mymetric:score"] >= 1.0
    first_step = pick["wall_time"]["first_step_seconds"]
    assert 0 < first_step < command_seconds
    assert f"The first training step began {first_step:,.1f} s after the command started" in (
        (run_dir / "report.md").read_text())


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "search.run", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.parametrize("args, expected", [
    (["--set", "search.ranks=[0]"], "search.ranks contains 0"),
    (["--set", "search.module_sets=[[q_proj,qproj]]"], "qproj"),
    (["--set", "search.ranks=[1024]"], "exceed the smallest dimension"),
    (["--set", "data.train=missing.jsonl"], "does not exist"),
    (["--set", "model.quantization=4bit"], "no CUDA GPU"),
    (["--set", "resources.gpus_per_trial=1"], "has 0 GPU"),
    (["--config", "nowhere.yaml"], "cannot read it"),
])
def test_bad_input_exits_2_with_a_message_and_writes_nothing(tmp_path, args, expected, capsys, monkeypatch):
    """On the embedded default's model (tests/test_bad_input.py holds the rest on the tiny one)."""
    monkeypatch.chdir(tmp_path)  # relative paths are the user's working directory's
    code = main([*args, "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert expected in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_bad_input_on_the_command_line_exits_the_process_with_2_and_no_traceback(tmp_path):
    result = _cli("--set", "search.ranks=[1024]", "--output", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "exceed the smallest dimension" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_an_existing_run_directory_is_refused_and_left_untouched(tmp_path):
    run_dir = tmp_path / "out" / "default"
    run_dir.mkdir(parents=True)
    (run_dir / "keep.txt").write_text("mine")
    result = _cli("--output", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 2 and "already exists" in result.stderr
    assert [p.name for p in run_dir.iterdir()] == ["keep.txt"]


def test_ray_auth_token_is_readable_by_its_owner_only(local_ray):
    import stat

    token = Path.home() / ".ray" / "auth_token"
    assert token.exists()
    assert token.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO) == 0


def test_dry_run_works_from_a_config_json_alone_with_exact_counts(tmp_path, capsys, monkeypatch):
    import search.cluster.connect

    monkeypatch.setattr(search.cluster.connect, "connect", lambda *a, **k: pytest.fail("dry run started Ray"))
    model_dir = tmp_path / "llama-2-7b-shape"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 11008,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000}))
    code = main(["--dry-run", "--set", f"model.path={model_dir}", "--set", "search.module_sets=[attention_qv,all_linear]",
                 "--set", "search.ranks=[4,16]", "--output", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 0
    assert "2,097,152" in out            # q and v at r=4: 32 layers x 2 x 4 x (4096 + 4096)
    assert "39,976,960" in out           # all seven at r=16: 32 x 16 x (4 x 8192 + 3 x 15104)
    assert not (tmp_path / "out").exists()


def test_pick_agrees_with_trials_csv_under_the_stated_rule_and_plots_are_real_pngs(tiny_run):
    _, run_dir = tiny_run
    pick = json.loads((run_dir / "pick.json").read_text())
    trials = pd.read_csv(run_dir / "trials.csv")
    done = trials[(trials.status == "finished") & (trials.step == 12)].copy()
    by_id = trials.set_index("trial_id")

    def root(trial_id):  # a cheaper neighbour names the pick it came from, but is a configuration of its own
        while isinstance(by_id.loc[trial_id].parent, str) and by_id.loc[trial_id].origin != "cheaper":
            trial_id = by_id.loc[trial_id].parent
        return trial_id

    done["root"] = done.trial_id.map(root)
    means = done.groupby("root").agg(loss=("eval_loss", "mean"), params=("trainable_params", "first"))
    bar = means.loss.min() / pick["tolerance"]
    within = means[means.loss <= bar + 1e-12]
    assert pick["value"] == pytest.approx(means.loc[root(pick["trial_id"])].loss)
    assert pick["value"] <= bar + 1e-12 and pick["cost"] == within.params.min()
    plots = sorted((run_dir / "plots").glob("*.png"))
    assert len(plots) >= 4
    for png in plots:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5_000
