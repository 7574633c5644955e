"""End to end on the user's own data: with data.train alone, the search scores its trials on rows
held out of that file, never on the built-in task, and the report and the adapter say so."""

from __future__ import annotations

import json

import pytest

from search.run import main

QUESTIONS = [f"What colour is the door of house {i}?" for i in range(20)]


@pytest.fixture(scope="module")
def user_run(tiny_model_dir, local_ray, tmp_path_factory):
    data = tmp_path_factory.mktemp("data") / "doors.jsonl"
    data.write_text("".join(json.dumps({"prompt": q, "completion": ("red", "blue")[i % 2]}) + "\n"
                            for i, q in enumerate(QUESTIONS)))
    output = tmp_path_factory.mktemp("runs")
    code = main([
        "--output", str(output), "--name", "doors",
        "--set", f"model.path={tiny_model_dir}",
        "--set", f"data.train={data}",
        "--set", "search.module_sets=[attention_qv]",
        "--set", "search.ranks=[2]",
        "--set", "budget.num_samples=2",
        "--set", "budget.max_steps=2",
        "--set", "budget.eval_every=1",
        "--set", "budget.grace_period=1",
        "--set", "budget.batch_size=2",
        "--set", "selection.promote=false",
        "--set", "selection.confirm_top_k=0", "--set", "selection.cheaper=0",
    ])
    return code, output / "doors", data


def test_the_eval_rows_are_held_out_of_the_train_file_and_never_the_builtin_task(user_run, tiny_model_dir):
    import datasets
    from transformers import AutoTokenizer

    code, run_dir, data = user_run
    assert code == 0
    info = json.loads((run_dir / "run_config.json").read_text())["data_info"]
    assert (info["eval"]["key"], info["eval"]["source"]) == ("data.train", str(data))
    assert info["eval_rows"] == 2 and info["train_rows"] == 18  # data.eval_fraction 0.1 of 20 rows
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = {split: [tokenizer.decode(ids) for ids in datasets.load_from_disk(str(run_dir / "data" / split))["input_ids"]]
             for split in ("train", "eval")}
    assert all(any(q in text for q in QUESTIONS) for text in texts["train"] + texts["eval"])
    assert (len(texts["train"]), len(texts["eval"])) == (18, 2) and not set(texts["train"]) & set(texts["eval"])

def test_the_report_names_the_train_and_eval_sources(user_run):
    _, run_dir, data = user_run
    report = (run_dir / "report.md").read_text()
    data_section = report.split("## Data")[1].split("\n## ")[0]
    assert f"| train | `data.train`: `{data}` | all rows but the 2 held out for eval | prompt/completion | 18 |" in data_section
    assert f"| eval | `data.train`: `{data}` | 2 of 20 rows held out by data.eval_fraction=0.1, seed 0 |" in data_section
    assert "atlas" not in report


def test_pick_json_names_the_data_the_pick_was_judged_on(user_run):
    _, run_dir, data = user_run
    sources = json.loads((run_dir / "pick.json").read_text())["data"]
    assert (sources["train"]["source"], sources["train"]["rows"]) == (str(data), 18)
    assert (sources["eval"]["source"], sources["eval"]["rows"], sources["eval"]["part"]) == (
        str(data), 2, "2 of 20 rows held out by data.eval_fraction=0.1, seed 0")
    assert sources["train"]["truncated"] == 0 and sources["template"] in ("chat", "plain")


def test_the_adapter_names_the_base_model_as_given(user_run, tiny_model_dir):
    _, run_dir, _ = user_run
    adapter = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(tiny_model_dir)
