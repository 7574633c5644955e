"""The report a user acts on: the run's wall time and what a larger search would take, the
pick's whole training recipe, a training example as the model saw it, the command that
trains the pick alone, and a metric that cannot tell the trials apart named as such."""

import json

from analysis.pipeline import analyse
from helpers import add_trial, write_run_config


def test_a_metric_that_ties_every_finished_trial_is_named_unable_to_decide_and_no_nan_is_written(tmp_path, capsys):
    run_dir = write_run_config(tmp_path / "run", metric="eval_exact_match", mode="max")
    add_trial(run_dir, "aaaa0001", r=16, eval_exact_match=0.0)
    add_trial(run_dir, "aaaa0002", r=4, eval_exact_match=0.0)
    add_trial(run_dir, "aaaa0003", r=8, module_set="attention", eval_exact_match=0.0)

    assert analyse(run_dir) == 0

    report = (run_dir / "report.md").read_text()
    pick_line = capsys.readouterr().out
    assert "nan" not in report.lower()
    assert "cannot tell" in report and "eval_exact_match" in report
    assert "cannot tell" in pick_line
    assert json.loads((run_dir / "pick.json").read_text())["tie"]
