"""The CLI answers `--help`, `--print-config` and bad input at once: none of them imports
torch, Ray, transformers or PEFT (3 s on a 2-core CPU), and every key is documented."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from helpers import run_cli
from search.config import Config, ConfigError, leaves, load

ROOT = Path(__file__).resolve().parent.parent


def test_help_lists_every_key_with_its_default_and_help_without_heavy_imports():
    code, out, _, heavy = run_cli("--help")
    assert code == 0
    assert heavy == set()
    for key, f, _ in leaves(Config()):
        assert f"  {key} = " in out, f"--help does not list {key}"
        assert f.metadata["help"] in out, f"--help does not give the help of {key}"
    assert "  budget.max_steps = 30\n" in out
    assert "--print-config" in out


def test_every_key_has_a_one_line_help():
    for key, f, _ in leaves(Config()):
        text = f.metadata.get("help", "")
        assert text.strip(), f"{key} has no help"
        assert "\n" not in text and len(text) <= 150, f"{key}'s help is longer than one line: {text!r}"


@pytest.mark.parametrize("args, named", [
    (["--set", "search.ranks=[0,8]"], "search.ranks contains 0"),
    (["--set", "selection.tolerance=1.5"], "selection.tolerance=1.5"),
    (["--set", "budget.max_stepz=3"], "unknown key budget.max_stepz"),
    (["--set", "budget.num_samples"], "--set 'budget.num_samples' is not KEY=VALUE"),
    (["--name", "../escape"], "name is '../escape'"),
])
def test_a_bad_config_exits_2_with_one_paragraph_and_no_heavy_imports(args, named):
    code, out, err, heavy = run_cli(*args)
    assert code == 2
    assert heavy == set()
    assert out == ""
    assert err.startswith("error: ") and named in err
    assert "Traceback" not in err and "\n\n" not in err.strip()


def test_a_metric_function_without_trust_metric_code_exits_2_naming_both_keys_without_heavy_imports():
    code, out, err, heavy = run_cli("--set", "selection.metric=mymod:score", "--set", "selection.mode=max")
    assert (code, heavy, out) == (2, set(), "")
    assert "selection.metric='mymod:score'" in err and "selection.trust_metric_code" in err
    assert "Traceback" not in err


def test_a_trusted_metric_function_is_announced_first_and_one_that_cannot_be_imported_exits_2(tmp_path):
    (tmp_path / "mymetric.py").write_text("def score(generations, references):\n    return 1.0\n")
    trusted = ("--set", "selection.trust_metric_code=true", "--set", "selection.mode=max")

    code, out, err, _ = run_cli("--set", "selection.metric=mymetric:score", *trusted, "--dry-run", cwd=tmp_path)
    assert code == 0, err
    assert out.splitlines()[0] == "selection.trust_metric_code is true: every trial imports and runs mymetric:score"

    code, out, err, _ = run_cli("--set", "selection.metric=nosuchmodule:score", *trusted, cwd=tmp_path)
    assert (code, out) == (2, "")
    assert "module 'nosuchmodule' cannot be imported" in err and "Fix:" in err and "Traceback" not in err


@pytest.mark.parametrize("metric", ["eval_exact_match", "mymod:score"])
def test_a_metric_from_generated_answers_with_generation_off_is_a_config_error(metric):
    with pytest.raises(ConfigError, match=rf"selection.metric='{metric}' .* data.eval_generate_examples is 0"):
        load(None, [f"selection.metric={metric}", "selection.mode=max", "selection.trust_metric_code=true",
                    "data.eval_generate_examples=0"])


def test_a_missing_config_file_exits_2_without_heavy_imports(tmp_path):
    code, _, err, heavy = run_cli("--config", str(tmp_path / "absent.yaml"))
    assert (code, heavy) == (2, set())
    assert "absent.yaml" in err and "Fix:" in err


def test_print_config_gives_yaml_that_loads_back_to_the_same_config(tmp_path):
    sets = ["search.ranks=[8,16]", "search.module_sets=[mlp,[q_proj,v_proj]]",
            "search.learning_rate=[1e-5,1e-3]", "resources.gpus_per_trial=0.5"]
    code, out, _, heavy = run_cli(*[a for item in sets for a in ("--set", item)],
                               "--name", "2024", "--output", "no", "--print-config")
    assert (code, heavy) == (0, set())
    saved = tmp_path / "resolved.yaml"
    saved.write_text(out)
    resolved = load(saved)
    assert resolved == load(None, sets + ['name="2024"', 'output="no"'])
    assert (resolved.name, resolved.output) == ("2024", "no")  # strings, though YAML reads 2024 and no otherwise


def test_print_config_writes_auto_where_the_user_wrote_auto_so_a_later_metric_brings_its_own_direction(tmp_path):
    code, out, _, _ = run_cli("--print-config")
    assert code == 0
    assert "  mode: auto" in out.split("\nselection:\n")[1]
    saved = tmp_path / "saved.yaml"
    saved.write_text(out)
    changed = load(saved, ["selection.metric=eval_accuracy"])  # refused while the file said mode: min
    assert (changed.selection.mode, changed.selection.direction) == ("auto", "max")


def test_print_config_of_a_config_file_keeps_its_values(tmp_path):
    example = ROOT / "configs" / "examples" / "llama3-8b-qlora.yaml"
    code, out, _, _ = run_cli("--config", str(example), "--print-config")
    assert code == 0
    saved = tmp_path / "resolved.yaml"
    saved.write_text(out)
    assert load(saved) == load(example)


def test_a_failed_search_says_why_in_one_line_keeps_the_whole_error_in_the_logs_and_how_to_resume(tmp_path, capsys,
                                                                                                 monkeypatch):
    """A search that fails as a whole (here, the words of Ray's memory monitor, which Tune raises as
    the search's own failure) leaves one error: line naming the cause, the file with all of it,
    what is saved and the command that resumes it."""
    from rundir.location import RunLocation
    from search.recipe import failed
    from search.signals import GracefulStop

    monkeypatch.setattr(sys, "argv", ["search.run", "--name", "run"])
    location = RunLocation(tmp_path / "run")
    error = RuntimeError("Caught unexpected exception: 1 worker(s) were killed due to the node running low on "
                         "memory.\nMemory on the node was 22.05GB used / 23.54GB limit\nTop 10 memory users: ...")
    stop = GracefulStop()
    stop.again = "--resume"  # as setup sets it once a run directory exists
    failed(error, location, stop)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: the search failed: RuntimeError: Caught unexpected exception: ")
    assert "run fewer trials at once (resources.max_concurrent_trials)" in err
    log = tmp_path / "run" / "logs" / "failure.log"
    assert f"(the whole error: {log})" in err and "Top 10 memory users" in log.read_text()
    assert err.rstrip().endswith("resume with: python -m search.run --name run --resume")

    retrain = GracefulStop()
    retrain.again = ""  # a retrain continues with the same command
    failed(ValueError("one line"), RunLocation(tmp_path / "other"), retrain)
    err = capsys.readouterr().err
    assert "whole error" not in err and "memory" not in err
    assert err.rstrip().endswith("run again with: python -m search.run --name run")
