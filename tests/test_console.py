"""What a person sees on the console of `python -m search.run`: by default a line per trial
event and a status line; with --quiet the result and the failures; never Ray's, Optuna's or
the libraries' own output, which goes to the run's logs/. Ctrl+C and SIGTERM end every phase
with one line and the shell's exit code, and neither they nor a resume show Ray's own hints."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_STEPS = 4
# Ray's, Tune's, Optuna's and the libraries' own output, as each printed it on this console.
CHATTER = ("╭", "│", "╰", "─", "Number of trials", "Tuner.restore", "Trial status:", "A new study created",
           "params={", "Token authentication", "Started a local Ray instance", "Failed to fetch metrics",
           "View detailed results", "it/s]", "%|", "Traceback")
CLOCK = re.compile(r"^\[\d+:\d\d\] ")
STATUS = re.compile(r"^\[\d+:\d\d\] (\d+)/(\d+) trials done, (\d+) running; ")


def _args(tiny_model_dir, output: Path, name: str, *more: str) -> list[str]:
    # with tests/faults.py installed, every mlp trial diverges: the first prior does, the second does not
    sets = [f"model.path={tiny_model_dir}", "search.module_sets=[attention_qv,mlp]", "search.ranks=[2,4]",
            "search.priors=[{module_set: mlp, r: 2}, {module_set: attention_qv, r: 2}]",
            "budget.num_samples=4", f"budget.max_steps={MAX_STEPS}", "budget.eval_every=2", "budget.grace_period=2",
            "budget.batch_size=2", "data.eval_examples=4", *more]
    return ["--output", str(output), "--name", name, *[x for s in sets for x in ("--set", s)]]


def _cli(args: list[str], faults: bool = False) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if faults:  # the runtime env a `ray job submit` gives: ray.init inside the run applies it to every worker
        env["RAY_JOB_CONFIG_JSON_ENV_VAR"] = json.dumps({"runtime_env": {
            "worker_process_setup_hook": "tests.faults.install", "env_vars": {"PYTHONPATH": str(ROOT)}}})
    return subprocess.Popen([sys.executable, "-m", "search.run", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _run(args: list[str], faults: bool = False) -> tuple[int, str, str]:
    process = _cli(args, faults)
    out, err = process.communicate(timeout=600)
    return process.returncode, out, err


@pytest.fixture(scope="module")
def default_run(tiny_model_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("console")
    code, out, err = _run(_args(tiny_model_dir, output, "plain"), faults=True)
    assert code == 0, out[-2000:] + err[-3000:]
    return out, err, output / "plain"


@pytest.fixture(scope="module")
def quiet_run(tiny_model_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("console")
    code, out, err = _run(["--quiet", *_args(tiny_model_dir, output, "quiet")], faults=True)
    assert code == 0, out[-2000:] + err[-3000:]
    return out, err, output / "quiet"


def test_a_configuration_in_short_names_module_set_rank_alpha_and_learning_rate_then_what_applies():
    from rundir.params import TrialParams
    from search.output.trial_lines import describe

    plain = TrialParams(lora_config={"r": 16, "lora_alpha": 32, "lora_dropout": 0.0}, module_set="all_linear",
                        alpha_ratio=2.0, learning_rate=0.00213, loraplus_lr_ratio=1.0, seed=0)
    assert describe(plain) == "all_linear r16 a32 lr 2.1e-3"
    lora = {"r": 4, "lora_alpha": 2.0, "lora_dropout": 0.05, "use_rslora": True, "use_dora": True}
    every = TrialParams(lora_config=lora, module_set="q_proj+v_proj", alpha_ratio=0.5, learning_rate=1e-4,
                        loraplus_lr_ratio=16.0, seed=0)
    assert describe(every) == "q_proj+v_proj r4 a2 lr 1.0e-4 dropout 0.05 rslora dora lora+ 16"


def test_times_read_as_a_person_writes_them_and_time_left_waits_for_a_trial_to_end():
    from search.output.console import clock
    from search.output.trial_lines import duration, time_left_s

    assert [clock(s) for s in (5, 65, 3725)] == ["0:05", "1:05", "1:02:05"]
    assert [duration(s) for s in (45, 185, 7830)] == ["45s", "3m 05s", "2h 10m"]
    assert time_left_s(ended=0, remaining=8, seconds=60) is None
    assert time_left_s(ended=2, remaining=6, seconds=60) == 180


def test_the_status_line_names_the_best_configuration_the_report_names_not_a_lucky_confirmation(tmp_path):
    from ray.tune.experiment import Trial

    from analysis.config import SelectionConfig
    from analysis.pipeline import analyse
    from helpers import add_trial, write_run_config
    from search.output.trial_lines import best_configuration, status_text

    # aaaa0002 confirms aaaa0001 with another seed and is the best run (0.44), but the configuration's
    # mean is 0.47, and the report's best is aaaa0001 with that mean (aaaa0003: 0.48)
    run_dir = write_run_config(tmp_path / "run")
    trial_dirs = [add_trial(run_dir, "aaaa0001", eval_loss=0.50, r=16),
                  add_trial(run_dir, "aaaa0002", eval_loss=0.44, r=16, origin="confirm", parent="aaaa0001", seed=1),
                  add_trial(run_dir, "aaaa0003", eval_loss=0.48, r=4)]
    assert analyse(run_dir) == 0
    picked = json.loads((run_dir / "pick.json").read_text())
    tune_trials = []
    for trial_dir in trial_dirs:  # as Tune holds them while the search runs: the config and the last report
        last = json.loads((trial_dir / "result.json").read_text().splitlines()[-1])
        trial = Trial("train_lora", config=json.loads((trial_dir / "params.json").read_text()),
                      trial_id=last["trial_id"], stub=True)
        trial.update_last_result(last)
        trial.set_status(Trial.TERMINATED)
        tune_trials.append(trial)

    best = best_configuration(tune_trials, SelectionConfig(), max_steps=100)

    assert (best.trial_id, best.value, best.runs) == (picked["best_trial_id"], pytest.approx(picked["best_value"]), 2)
    line = status_text(3, 3, 0, "eval_loss", best, None)
    assert f"best eval_loss {picked['best_value']:.4g} (trial {picked['best_trial_id']}: " in line
    assert line.endswith(", mean of 2 runs)")


def _trials(run_dir: Path) -> pd.DataFrame:
    return pd.read_csv(run_dir / "trials.csv", dtype={"trial_id": str})


def test_every_trial_has_a_start_line_with_its_configuration_and_an_end_line_that_says_how_it_ended(default_run):
    out, _, run_dir = default_run
    lines = out.splitlines()
    trials = _trials(run_dir)
    assert (trials.status == "failed").any() and (trials.status == "finished").any()
    for trial in trials.itertuples():
        short = f"{trial.module_set} r{trial.r} a{trial.lora_alpha:g} lr "
        assert [line for line in lines if f"trial {trial.trial_id} started: {short}" in line], (trial.trial_id, out)
        if trial.status == "failed":
            ended = f"trial {trial.trial_id} failed"
        elif trial.status == "stopped":
            ended = f"trial {trial.trial_id} stopped by ASHA at step {trial.step:.0f}: eval_loss "
        else:
            ended = f"trial {trial.trial_id} finished at step {MAX_STEPS}: eval_loss "
        assert len([line for line in lines if ended in line]) == 1, (ended, out)


def test_a_failed_trial_s_line_gives_its_one_line_reason(default_run):
    out, _, run_dir = default_run
    failed = _trials(run_dir).query("status == 'failed'")
    assert len(failed) >= 1 and (failed.module_set == "mlp").all()
    for trial_id in failed.trial_id:
        failed = rf"\] trial {trial_id} failed (at step \d+|before its first report): TrialDiverged: .*nan"
        assert re.search(failed, out), out


def test_the_status_line_counts_the_trials_and_names_the_best_at_the_full_budget(default_run):
    out, _, run_dir = default_run
    trials = _trials(run_dir)
    statuses = [STATUS.match(line) for line in out.splitlines() if STATUS.match(line)]
    assert len(statuses) >= 2
    done, planned, running = map(int, statuses[-1].groups())
    assert done == planned == len(trials) and running == 0
    # the best configuration as the report names it: runs of one configuration count by their mean
    picked = json.loads((run_dir / "pick.json").read_text())
    best = trials.set_index("trial_id").loc[picked["best_trial_id"]]
    last = statuses[-1].string
    assert (f"best eval_loss {picked['best_value']:.4g} (trial {picked['best_trial_id']}: {best.module_set} r{best.r} "
            in last)


def test_the_default_console_has_no_library_output_and_at_most_three_lines_per_trial(default_run):
    out, err, run_dir = default_run
    console = out + err
    for chatter in CHATTER:
        assert chatter not in console, chatter
    assert len(console.splitlines()) <= 3 * len(_trials(run_dir)) + 10, console
    assert console.count("Picked trial ") == 1


def test_the_libraries_own_output_is_in_the_runs_logs(default_run):
    out, _, run_dir = default_run
    logs = run_dir / "logs"
    assert f"what Ray, Optuna, datasets and transformers log goes to {logs}/" in out
    assert "Started a local Ray instance" in (logs / "ray.log").read_text()
    assert "A new study created" in (logs / "optuna.log").read_text()


def test_quiet_prints_the_result_and_each_failed_trial_only(quiet_run):
    out, err, run_dir = quiet_run
    trials = _trials(run_dir)
    lines = (out + err).splitlines()
    failed = [line for line in lines if re.match(r"^\[\d+:\d\d\] trial \w+ failed ", line)]
    assert len(failed) == (trials.status == "failed").sum() >= 1
    # the result: the pick, the run's wall time with its estimates, and how to train the pick alone
    result = [line for line in lines if line.startswith(("Picked trial ", "Wall time: ", "Train the pick alone "))]
    assert [line.split(":")[0].split(" trial ")[0] for line in result] == [
        "Picked", "Wall time", "Train the pick alone on all the training data"]
    assert sorted(lines) == sorted(failed + result), out + err


@pytest.mark.parametrize("sent, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_while_the_model_is_prepared_exits_with_one_line_and_nothing_written(
        tiny_model_dir, tmp_path, sent, code):
    args = _args(tiny_model_dir, tmp_path, "early")
    process = _cli(args)
    deadline = time.monotonic() + 120
    while not _has_loaded(process.pid, "libtorch") and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)  # the run imports torch to read the model's config, while its Ray starts
    process.send_signal(sent)
    out, err = process.communicate(timeout=60)
    assert process.returncode == code, err[-3000:]
    assert out == ""
    command = shlex.join(["python", "-m", "search.run", *args])
    assert err.splitlines() == [f"stopped by {sent.name}: nothing was written. Start again with: {command}"]
    assert not (tmp_path / "early").exists()


def test_ctrl_c_during_the_search_says_one_line_and_neither_it_nor_the_resume_shows_ray_s_hints(
        tiny_model_dir, tmp_path):
    args = _args(tiny_model_dir, tmp_path, "interrupted", "budget.max_steps=20", "search.module_sets=[attention_qv]",
                 "search.priors=none")
    process = _cli(args)
    out = []
    for line in process.stdout:  # interrupted as the first trials start, before they report
        out.append(line)
        if " started: " in line:
            break
    process.send_signal(signal.SIGINT)
    rest, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-3000:]
    console = "".join(out) + rest + err
    for chatter in CHATTER:
        assert chatter not in console, chatter
    assert err.splitlines()[-1].startswith(
        f"stopped by SIGINT: the run so far is saved in {tmp_path / 'interrupted'} (finished trials, and unfinished "
        f"ones at their last checkpoint). Resume with: python -m search.run ")
    assert len(err.splitlines()) == 1

    code, out, err = _run(["--resume", *args])
    assert code == 0, out[-2000:] + err[-3000:]
    for chatter in CHATTER:
        assert chatter not in out + err, chatter
    assert "Picked trial " in out


def _has_loaded(pid: int, library: str) -> bool:
    try:
        return library in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def test_a_grid_s_status_line_plans_every_point_with_every_seed_from_the_start(capsys):
    from ray.tune.experiment import Trial

    from search.config import load
    from search.output.trial_lines import status_reporter

    config = load(None, ["search.algorithm=grid", "search.module_sets=[mlp,all_linear]", "search.ranks=[4,16]",
                         "search.alpha_ratios=[1.0]", "search.use_rslora=[false]",
                         "search.grid.learning_rates=[7.7e-4,3.0e-3]", "budget.landscape_seeds=2"])
    reporter = status_reporter(config, -1)
    # a point's second seed runs as a confirmation of it: already in the plan of 2 x 2 x 2 points x 2 seeds
    trials = [Trial("t", config={"origin": origin}, trial_id=trial_id, stub=True)
              for trial_id, origin in (("a", "search"), ("b", "confirm"))]
    reporter.report(trials, done=False)
    assert "0/16 trials done" in capsys.readouterr().out
    tpe = status_reporter(load(None, ["budget.num_samples=8", "selection.cheaper=0"]), -1)
    tpe.report(trials, done=False)
    assert "0/9 trials done" in capsys.readouterr().out  # the search's 8, and the confirmation seen


def _stub_trials(origins: list[str], ended: int) -> list:
    from ray.tune.experiment import Trial

    from helpers import shared_trial

    trials = [Trial("t", config={**shared_trial(), "origin": origin}, trial_id=f"t{n}", stub=True)
              for n, origin in enumerate(origins)]
    for trial in trials[:ended]:
        trial.set_status(Trial.TERMINATED)
    return trials


def test_a_searchs_status_line_counts_the_stage_trials_its_selection_asks_for_before_they_start(capsys):
    from search.config import load
    from search.output.trial_lines import status_reporter

    config = load(None, ["budget.num_samples=4", "selection.confirm_top_k=2", "selection.confirm_seeds=2",
                         "selection.cheaper=1"])
    reporter = status_reporter(config, -1)
    # 4 proposed, 2 leaders x 2 seeds and 1 cheaper neighbour expected: the time left counts 5 trials more, not 1
    reporter.report(_stub_trials(["search"] * 4, ended=3), done=False)
    line = capsys.readouterr().out
    assert "3/9 trials done" in line
    assert "left" in line
    # more stage trials than expected: counted as they come
    many = ["search"] * 4 + ["confirm"] * 4 + ["cheaper", "confirm"]
    reporter.report(_stub_trials(many, ended=4), done=False)
    assert "4/10 trials done" in capsys.readouterr().out


def test_a_searchs_last_status_line_counts_the_stage_trials_that_came(capsys):
    from search.config import load
    from search.output.trial_lines import status_reporter

    reporter = status_reporter(load(None, ["budget.num_samples=4"]), -1)  # 1 confirmation and 1 neighbour expected
    trials = _stub_trials(["search"] * 4 + ["confirm"], ended=5)  # the pick had no cheaper neighbour
    reporter.report(trials, done=False)
    assert "5/6 trials done" in capsys.readouterr().out
    assert reporter.should_report(trials, done=True)  # nothing ended since, and yet the plan changed
    reporter.report(trials, done=True)
    line = capsys.readouterr().out
    assert "5/5 trials done, 0 running" in line
    assert "left" not in line
    assert not reporter.should_report(trials, done=True)
    stopped = status_reporter(load(None, ["budget.num_samples=4"]), -1)
    trials = _stub_trials(["search"] * 3, ended=2)
    stopped.report(trials, done=False)
    capsys.readouterr()
    trials[2].set_status(trials[2].TERMINATED)  # Ctrl+C: the running trial ends, one proposal never came
    stopped.report(trials, done=False)
    assert "3/6 trials done, 0 running" in capsys.readouterr().out
    assert not stopped.should_report(trials, done=True)  # no line at the end claims the plan was done
