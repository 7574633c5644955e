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


def test_the_report_and_the_console_give_the_wall_time_and_estimates_for_twice_and_four_times_the_trials(
        tmp_path, capsys):
    run_dir = write_run_config(tmp_path / "run", started_at=970.0)  # budget.num_samples 8
    # (called at, seconds per step): the search's trials span [1000, 1100], [1000, 1050], [1100, 1200];
    # the promoted one [1200, 1250]. Wall time 250 s, trials 300 s together: 1.2 at a time;
    # the 3 proposed ones 250 s. x2: 250 + 250 / 1.2 = 458 s; x4: 250 + 3 * 250 / 1.2 = 875 s.
    # The first two trials' first steps begin after a setup of 1 s: 1001 - 970 = 31 s after the command.
    add_trial(run_dir, "aaaa0001", r=16, eval_loss=0.5, clock=(1000.0, 1.0))
    add_trial(run_dir, "aaaa0002", r=4, eval_loss=0.6, clock=(1000.0, 0.5))
    add_trial(run_dir, "aaaa0003", r=8, eval_loss=0.7, clock=(1100.0, 1.0), module_set="attention")
    add_trial(run_dir, "aaaa0004", r=4, eval_loss=0.65, clock=(1200.0, 0.5), origin="promoted", parent="aaaa0002",
              module_set="mlp")

    assert analyse(run_dir) == 0

    report = (run_dir / "report.md").read_text()
    assert "The search's trials ran for 4 min of wall-clock time" in report
    assert "1.2 trials at a time" in report
    assert "`budget.num_samples=16` (x2) about 8 min; `budget.num_samples=32` (x4) about 15 min" in report
    assert "Wall time: the trials ran for 4 min; with budget.num_samples x2 about 8 min, x4 about 15 min" in (
        capsys.readouterr().out)
    assert "The first training step began 31.0 s after the command started (`first_step_seconds`" in report
    wall_time = json.loads((run_dir / "pick.json").read_text())["wall_time"]
    assert wall_time["first_step_seconds"] == 31.0 and wall_time["wall_seconds"] == 250.0


def test_a_run_that_did_not_record_its_start_has_no_first_step_figure(tmp_path):
    run_dir = write_run_config(tmp_path / "run")
    add_trial(run_dir, "aaaa0001", clock=(1000.0, 1.0))

    assert analyse(run_dir) == 0

    assert "first_step_seconds" not in (run_dir / "report.md").read_text()
    assert json.loads((run_dir / "pick.json").read_text())["wall_time"]["first_step_seconds"] is None


def test_use_it_gives_the_picks_whole_recipe_a_training_example_and_the_command_that_trains_it_alone(tmp_path,
                                                                                                      capsys):
    run_dir = write_run_config(tmp_path / "run")
    add_trial(run_dir, "aaaa0001", r=16, eval_loss=0.50, learning_rate=3e-4, seed=7)

    assert analyse(run_dir) == 0

    use = (run_dir / "report.md").read_text().split("## Use it", 1)[1]
    for line in ("| learning rate | 0.0003 |", "| LoRA+ ratio (`loraplus_lr_ratio`) | 1 |",
                 "| optimizer | AdamW, one step per batch |", "| schedule | linear warm-up, then cosine decay |",
                 "| batch size (`budget.batch_size`) | 8 sequences |", "| steps (`budget.max_steps`) | 100 |",
                 "| warm-up (`budget.warmup_steps`) | 4 steps |",
                 "| template | plain, loss on every assistant turn (`data.train_turns=all`) |",
                 "| `data.max_length` | 128 tokens |", "| seed | 7 |",
                 "| training rows | 400 in the search; a retrain draws from all 400 |"):
        assert line in use
    assert "```\nquestion?\n[[answer]]\n```" in use  # run_config.json's data_info.example
    command = f"python -m search.retrain {run_dir.resolve()}"
    adapter = run_dir.resolve() / "adapter"
    assert f"```\n{command}\n```" in use
    assert f'PeftModel.from_pretrained(base, "{adapter}")' in use
    assert f"{command} (weights to {adapter})" in capsys.readouterr().out


def test_a_retrain_is_described_by_its_steps_and_batch_not_as_all_the_rows(tmp_path):
    run_dir = write_run_config(tmp_path / "run")  # 400 train rows, batch size 8
    add_trial(run_dir, "aaaa0001", r=16, eval_loss=0.50)
    add_trial(run_dir, "bbbb0001", r=16, eval_loss=0.45, experiment="retrain", origin="retrain", parent="aaaa0001")

    assert analyse(run_dir) == 0

    report = (run_dir / "report.md").read_text()
    assert ("retrained trial `aaaa0001`'s configuration for 100 steps of 8 sequences on the 400 training rows "
            "(2 passes over them)") in report
    assert "on all 400" not in report


def test_the_reports_data_section_says_how_many_eval_rows_each_round_scored_of_how_many_and_how_chosen(tmp_path):
    run_dir = write_run_config(tmp_path / "run")
    config = json.loads((run_dir / "run_config.json").read_text())
    config["data_info"].update(eval_rows=32, eval_rows_kept=3000)  # a 3,000-row eval set, 32 scored
    (run_dir / "run_config.json").write_text(json.dumps(config))
    add_trial(run_dir, "aaaa0001", r=16, eval_loss=0.50)

    assert analyse(run_dir) == 0

    data = (run_dir / "report.md").read_text().split("## Data", 1)[1]
    assert ("32 of 3,000 eval rows scored at each round (data.eval_examples), chosen by a shuffle seeded by seed=0"
            in data)
