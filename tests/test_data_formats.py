"""The data people have: every format, written by the test into real files, is read by `datasets`
and tokenized with the loss on the answer (or, for text, on every token); bad data is one line
naming the file, the problem and what is allowed. Nothing reaches the network."""

from __future__ import annotations

import json
import shutil
import socket
import time
from pathlib import Path

import pytest

from search.inputs.data import prepare
from trainables.config import DataConfig
from trainables.data import IGNORE

QA = [(f"What is the capital of {country}?", capital) for country, capital in [
    ("Vell", "Tharn"), ("Ostra", "Mirel"), ("Kesh", "Dovan"), ("Brae", "Solm"), ("Quill", "Aster"),
    ("Nure", "Pell"), ("Zint", "Orra"), ("Lusk", "Vire"), ("Threm", "Caul"), ("Ydra", "Benn"),
]]
QUESTIONS = {q for q, _ in QA}
# SmolLM2's chat template closes every turn with <|im_end|> and a line break; <|im_end|> is its EOS
CHAT_ANSWERS = {f"{a}<|im_end|>\n" for _, a in QA}
PLAIN_ANSWERS = {f"{a}<|im_end|>" for _, a in QA}


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the data loading tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def plain_tokenizer(smollm2_dir):
    """SmolLM2's tokenizer without its chat template, as a base model's tokenizer is shipped."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    tokenizer.chat_template = None
    return tokenizer


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def answers(split, tokenizer) -> list[str]:
    """The labelled tokens of each row, decoded."""
    return [tokenizer.decode([t for t in labels if t != IGNORE]) for labels in split["labels"]]


def prompts(split, tokenizer) -> list[str]:
    """The tokens before each row's first labelled token, decoded."""
    out = []
    for ids, labels in zip(split["input_ids"], split["labels"]):
        start = next(i for i, t in enumerate(labels) if t != IGNORE)
        out.append(tokenizer.decode(ids[:start]))
    return out


def asked(prompt_texts: list[str]) -> set[str]:
    """The QA questions that appear in the prompts."""
    return {q for q in QUESTIONS for text in prompt_texts if q in text}


# Each writer puts the ten QA rows into tmp_path in one format and returns DataConfig settings.
def messages_jsonl(tmp_path):
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QA]
    return {"train": str(write_jsonl(tmp_path / "chat.jsonl", rows))}


def prompt_completion_jsonl(tmp_path):
    return {"train": str(write_jsonl(tmp_path / "qa.jsonl", [{"prompt": q, "completion": a} for q, a in QA]))}


def alpaca_json_list(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps([{"instruction": q, "input": "", "output": a} for q, a in QA], indent=2))
    return {"train": str(path)}


def question_answer_csv_mapped(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text("id,question,answer\n" + "".join(f'{i},"{q}",{a}\n' for i, (q, a) in enumerate(QA)))
    return {"train": str(path), "columns": {"prompt": "question", "completion": "answer"}}


def prompt_completion_parquet(tmp_path):
    import pandas as pd

    path = tmp_path / "qa.parquet"
    pd.DataFrame({"prompt": [q for q, _ in QA], "completion": [a for _, a in QA]}).to_parquet(path)
    return {"train": str(path)}


def saved_dataset(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"prompt": q, "completion": a} for q, a in QA]).save_to_disk(tmp_path / "saved")
    return {"train": str(tmp_path / "saved")}


FORMATS = [messages_jsonl, prompt_completion_jsonl, alpaca_json_list, question_answer_csv_mapped,
           prompt_completion_parquet, saved_dataset]


@pytest.mark.parametrize("write", FORMATS, ids=lambda f: f.__name__)
def test_every_format_tokenizes_every_row_with_the_loss_on_its_answer(write, tmp_path, tokenizer):
    splits, info = prepare(DataConfig(**write(tmp_path)), tokenizer, seed=0)
    both = [splits["train"], splits["eval"]]
    assert info.train_rows + info.eval_rows == len(QA)
    assert sorted(sum((answers(s, tokenizer) for s in both), [])) == sorted(CHAT_ANSWERS)
    assert asked(sum((prompts(s, tokenizer) for s in both), [])) == QUESTIONS
    assert info.train.truncated == info.train.dropped == 0


def test_a_datasetdict_directory_trains_on_train_and_evaluates_on_its_test_split(tmp_path, tokenizer):
    import datasets

    rows = [{"prompt": q, "completion": a} for q, a in QA]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:8]), "test": datasets.Dataset.from_list(rows[8:])}
                         ).save_to_disk(tmp_path / "dict")
    splits, info = prepare(DataConfig(train=str(tmp_path / "dict")), tokenizer, seed=0)
    assert asked(prompts(splits["eval"], tokenizer)) == {q for q, _ in QA[8:]}
    assert (info.train.part, info.eval.part) == ("split 'train'", "split 'test'")


def test_a_dataset_in_the_local_datasets_cache_is_read_without_the_hub(tmp_path, tokenizer, monkeypatch):
    """The cache holds what datasets wrote when it loaded a hub dataset `someone/qa`:
    <cache>/someone___qa/<config>/<version>/<hash>/qa-<split>.arrow."""
    import datasets

    source = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": q, "completion": a} for q, a in QA])
    built = tmp_path / "built"
    datasets.load_dataset("json", data_files=str(source), cache_dir=str(built))
    [arrow] = built.glob("json/*/*/*/json-train.arrow")
    cached = tmp_path / "cache" / "someone___qa" / "default" / arrow.parent.parent.name / arrow.parent.name
    shutil.copytree(arrow.parent, cached)
    (cached / "json-train.arrow").rename(cached / "qa-train.arrow")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")

    splits, info = prepare(DataConfig(train="someone/qa"), tokenizer, seed=0)
    assert info.train.source == "someone/qa" and info.train_rows + info.eval_rows == len(QA)
    assert sorted(answers(splits["train"], tokenizer) + answers(splits["eval"], tokenizer)) == sorted(CHAT_ANSWERS)


def test_alpaca_input_follows_the_instruction_after_a_blank_line(tmp_path, plain_tokenizer):
    rows = [{"instruction": "Name the capital.", "input": q, "output": a} for q, a in QA]
    splits, _ = prepare(DataConfig(train=str(write_jsonl(tmp_path / "alpaca.jsonl", rows)), template="plain"),
                        plain_tokenizer, seed=0)
    assert all(text.startswith("Name the capital.\n\nWhat is the capital of") for text in prompts(splits["train"], plain_tokenizer))


def test_csv_cells_are_read_as_the_text_written(tmp_path, plain_tokenizer):
    path = tmp_path / "codes.csv"
    path.write_text("prompt,completion\n" + "".join(f"Code of {q}?,007\n" for q, _ in QA))
    splits, _ = prepare(DataConfig(train=str(path)), plain_tokenizer, seed=0)
    assert set(answers(splits["train"], plain_tokenizer)) == {"007<|im_end|>"}  # not 7, nor 7.0


def test_train_alone_holds_out_a_seeded_eval_split_of_its_own_rows(tmp_path, tokenizer):
    config = DataConfig(**prompt_completion_jsonl(tmp_path), eval_fraction=0.2)
    splits, info = prepare(config, tokenizer, seed=0)
    eval_questions, train_questions = (asked(prompts(splits[s], tokenizer)) for s in ("eval", "train"))
    assert len(eval_questions) == 2 and len(train_questions) == 8 and not eval_questions & train_questions
    assert (info.eval.key, info.eval.source) == ("data.train", config.train)
    assert "2 of 10 rows held out" in info.eval.part and "the 2 held out" in info.train.part
    again, _ = prepare(config, tokenizer, seed=0)
    assert asked(prompts(again["eval"], tokenizer)) == eval_questions


def test_a_train_file_too_small_to_hold_out_an_eval_split_is_refused(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "one.jsonl", [{"prompt": "Q?", "completion": "A"}])
    with pytest.raises(ValueError, match=r"data.train '.*one.jsonl' has 1 row\(s\), too few to hold out an eval split.*Fix: "):
        prepare(DataConfig(train=str(path)), tokenizer, seed=0)


def test_the_builtin_task_is_used_only_when_no_data_is_given(tmp_path, tokenizer):
    _, builtin = prepare(DataConfig(), tokenizer, seed=0)
    assert (builtin.train.source, builtin.eval.source, builtin.eval.part) == ("builtin:atlas", "builtin:atlas", "split 'eval'")
    _, own = prepare(DataConfig(**prompt_completion_jsonl(tmp_path)), tokenizer, seed=0)
    assert own.eval.source.endswith("qa.jsonl")


def test_plain_template_labels_only_the_completion_and_eos(tmp_path, plain_tokenizer):
    splits, info = prepare(DataConfig(**prompt_completion_jsonl(tmp_path)), plain_tokenizer, seed=0)
    assert info.template == "plain"  # auto: the tokenizer has no chat template
    train = splits["train"]
    assert set(answers(train, plain_tokenizer)) <= PLAIN_ANSWERS
    for ids, labels, prompt in zip(train["input_ids"], train["labels"], prompts(train, plain_tokenizer)):
        assert prompt in {f"{q}\n" for q in QUESTIONS}  # the question, then data.separator's default
        assert labels[:len(plain_tokenizer(prompt)["input_ids"])] == [IGNORE] * len(plain_tokenizer(prompt)["input_ids"])
        assert labels[-1] == ids[-1] == plain_tokenizer.eos_token_id


@pytest.mark.parametrize("write", ["txt", "text_column"])
def test_text_rows_are_trained_on_every_token(write, tmp_path, plain_tokenizer):
    lines = ["To be, or not to be, that is the question.", "Whether 'tis nobler in the mind to suffer",
             "The slings and arrows of outrageous fortune,", "Or to take arms against a sea of troubles"]
    if write == "txt":
        path = tmp_path / "play.txt"
        path.write_text("\n\n".join(lines) + "\n")  # blank lines are no rows
    else:
        path = write_jsonl(tmp_path / "play.jsonl", [{"text": line} for line in lines])
    splits, info = prepare(DataConfig(train=str(path)), plain_tokenizer, seed=0)
    assert info.train.format == "text" and info.train_rows + info.eval_rows == len(lines)
    for split in (splits["train"], splits["eval"]):
        for ids, labels in zip(split["input_ids"], split["labels"]):
            assert labels == ids
            assert plain_tokenizer.decode(ids).removesuffix("<|im_end|>") in lines


def test_max_length_truncates_long_answers_and_drops_rows_whose_prompt_fills_it(tmp_path, plain_tokenizer):
    rows = [{"prompt": q, "completion": a} for q, a in QA]
    rows[0]["completion"] = "word " * 50
    rows[1]["prompt"] = "word " * 50
    config = DataConfig(train=str(write_jsonl(tmp_path / "long.jsonl", rows)), eval=str(write_jsonl(
        tmp_path / "eval.jsonl", rows[2:4])), max_length=16)
    splits, info = prepare(config, plain_tokenizer, seed=0)
    assert (info.train.rows, info.train.truncated, info.train.dropped, info.train_rows) == (10, 1, 1, 9)
    assert max(len(ids) for ids in splits["train"]["input_ids"]) == 16


def bad_line_jsonl(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n\n" + '{"prompt": "c", "completion": }\n')
    return ["--set", f"data.train={path}"], [str(path), "line 3 is not valid JSON", "Fix: correct that line"]


def row_without_answer(tmp_path):
    path = write_jsonl(tmp_path / "no_answer.jsonl", [{"prompt": q, "completion": a} for q, a in QA[:3]]
                       + [{"prompt": "Q?"}])
    return ["--set", f"data.train={path}"], [f"{path} line 4 has nothing for 'completion'"]


def csv_row_without_answer(tmp_path):
    path = tmp_path / "gaps.csv"
    path.write_text('question,answer\n"two\nlines",x\nQ?,\n')
    return (["--set", f"data.train={path}", "--set", "data.columns={prompt: question, completion: answer}"],
            [f"{path} line 4 has nothing for 'completion'"])


def unknown_columns(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": q, "answer": a} for q, a in QA])
    return ["--set", f"data.train={path}"], [f"has columns ['answer', 'question']; allowed: chat 'messages'",
                                             "data.columns={prompt: question, completion: answer}"]


def mapped_column_missing(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": q, "reply": a} for q, a in QA])
    return (["--set", f"data.train={path}", "--set", "data.columns={prompt: question, completion: answer}"],
            ["data.columns maps {'completion': 'answer'}", "its columns: ['question', 'reply']"])


def missing_txt(tmp_path):
    return ["--set", f"data.train={tmp_path / 'play.txt'}"], ["play.txt', which does not exist", "allowed: 'builtin:atlas'"]


def missing_relative_file(tmp_path):
    return ["--set", "data.train=data/qa.jsonl"], ["data.train is 'data/qa.jsonl', which does not exist"]


def uncached_dataset_id(tmp_path):
    return ["--set", "data.train=someone/nothing"], ["not a dataset in the local datasets cache"]


def unknown_suffix(tmp_path):
    path = tmp_path / "qa.xlsx"
    path.write_text("x")
    return ["--set", f"data.train={path}"], ["a .xlsx file; allowed: 'builtin:atlas', a .jsonl, .json, .csv, .parquet or .txt"]


def directory_not_saved_by_datasets(tmp_path):
    (tmp_path / "folder").mkdir()
    return ["--set", f"data.train={tmp_path / 'folder'}"], ["a directory that datasets.save_to_disk did not write"]


def empty_file(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    return ["--set", f"data.train={tmp_path / 'empty.csv'}"], ["empty.csv', an empty file"]


BAD = [bad_line_jsonl, row_without_answer, csv_row_without_answer, unknown_columns, mapped_column_missing, missing_txt,
       missing_relative_file, uncached_dataset_id, unknown_suffix, directory_not_saved_by_datasets, empty_file]


@pytest.mark.parametrize("write", BAD, ids=lambda f: f.__name__)
def test_bad_data_exits_2_with_one_line_naming_the_file_and_the_problem(write, tmp_path, tiny_model_dir, capsys,
                                                                        monkeypatch):
    from search.run import main

    monkeypatch.chdir(tmp_path)
    args, expected = write(tmp_path)
    started = time.monotonic()
    code = main(["--set", f"model.path={tiny_model_dir}", "--set", "search.ranks=[2]", "--dry-run", *args])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    for part in expected:
        assert part in err
    assert time.monotonic() - started < 10  # never a hub's retries


def test_dry_run_prints_one_line_on_the_data(tmp_path, tiny_model_dir, capsys):
    from search.run import main

    path = tmp_path / "qa.csv"
    path.write_text("question,answer\n" + "".join(f'"{q}",{a}\n' for q, a in QA) + '"long?",' + "word " * 80 + "\n")
    code = main(["--set", f"model.path={tiny_model_dir}", "--set", "search.ranks=[2]", "--dry-run",
                 "--set", f"data.train={path}", "--set", "data.columns={prompt: question, completion: answer}",
                 "--set", "data.max_length=48"])
    out, err = capsys.readouterr()
    assert code == 0, err
    [line] = [line for line in out.splitlines() if line.startswith("Data: ")]
    assert f"train {path}, all rows but the 1 held out for eval: 10 prompt/completion rows" in line
    assert "eval " in line and "1 of 11 rows held out by data.eval_fraction=0.1, seed 0" in line
    assert "template chat" in line and "at max_length 48: 1 rows truncated, 0 dropped" in line
