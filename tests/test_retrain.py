"""`python -m search.retrain RUN_DIR`: the pick of a finished run trained alone on all its training
data, without searching again, its weights where the report and the console say."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from helpers import add_trial, write_run_config
from search.retrain import main

ROOT = Path(__file__).resolve().parent.parent


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def test_a_directory_that_is_no_run_is_exit_2_with_one_line_naming_it(tmp_path, capsys):
    assert main([str(tmp_path / "nothing")]) == 2
    assert str(tmp_path / "nothing") in _one_error_line(capsys)


def test_a_run_with_no_pick_is_exit_2_with_one_line_that_says_how_to_see_why(tmp_path, capsys):
    run_dir = write_run_config(tmp_path / "run")
    add_trial(run_dir, "aaaa0001", last_step=50)  # stopped early: nothing to pick

    assert main([str(run_dir)]) == 2
    line = _one_error_line(capsys)
    assert "holds no pick" in line and f"python -m analysis.report {run_dir}" in line
    assert not (run_dir / "retrain").exists()


def test_a_run_that_retrained_another_configuration_is_exit_2_and_keeps_that_retrain(tmp_path, capsys):
    run_dir = write_run_config(tmp_path / "run")
    add_trial(run_dir, "aaaa0001", r=16, eval_loss=0.50)
    add_trial(run_dir, "bbbb0001", experiment="retrain", origin="retrain", parent="aaaa0009")
    (run_dir / "pick.json").write_text(json.dumps({"trial_id": "aaaa0001", "retrain": None}))

    assert main([str(run_dir)]) == 2
    assert "retrain of trial aaaa0009" in _one_error_line(capsys)
    assert (run_dir / "retrain" / "trial_bbbb0001" / "params.json").is_file()


def test_a_tiny_search_then_the_retrain_command_gives_weights_that_load_from_the_printed_path(
        tiny_model_dir, tmp_path, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    started_in = tmp_path / "project"
    started_in.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    sets = [f"model.path={tiny_model_dir}", "search.module_sets=[attention_qv,mlp]", "search.ranks=[2,4]",
            "budget.num_samples=2", "budget.max_steps=6", "budget.eval_every=3", "budget.grace_period=3",
            "budget.batch_size=4", "data.eval_examples=8", "selection.promote=false", "selection.confirm_seeds=0"]
    search = subprocess.run([sys.executable, "-m", "search.run", "--output", "runs", "--name", "tiny",
                             *[x for s in sets for x in ("--set", s)]],
                            cwd=started_in, env=env, capture_output=True, text=True, timeout=600)
    assert search.returncode == 0, search.stderr
    run_dir = started_in / "runs" / "tiny"
    command = re.search(r"Train the pick alone on all the training data: (python -m search\.retrain \S+)", search.stdout)
    assert command and command.group(1) in (run_dir / "report.md").read_text()

    retrain = subprocess.run([sys.executable, "-m", "search.retrain", "runs/tiny"], cwd=started_in, env=env,
                             capture_output=True, text=True, timeout=600)

    assert retrain.returncode == 0, retrain.stderr
    path = re.search(r'Weights: PeftModel\.from_pretrained\(base, "([^"]+)"\)', retrain.stdout).group(1)
    assert f'PeftModel.from_pretrained(base, "{path}")' in (run_dir / "report.md").read_text()
    report = (run_dir / "report.md").read_text()
    assert re.search(r"configuration for 6 steps of 4 sequences on the \d+ training rows", report)
    monkeypatch.chdir(tmp_path)  # another directory than the one the commands ran in
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), path)
    lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # trained: B starts at zero
