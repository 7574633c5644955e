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


SYSTEM = "Answer with the capital's name alone."


def sharegpt_rows() -> list[dict]:
    return [{"conversations": [{"from": "system", "value": SYSTEM}, {"from": "human", "value": q},
                               {"from": "gpt", "value": a}]} for q, a in QA]


def sharegpt_jsonl(tmp_path):
    return {"train": str(write_jsonl(tmp_path / "sharegpt.jsonl", sharegpt_rows()))}


def sharegpt_json_list(tmp_path):
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(sharegpt_rows(), indent=2))
    return {"train": str(path)}


def sharegpt_mapped_as_messages(tmp_path):
    """The mapping a user tried before ShareGPT was read natively: its from/value turns are read."""
    return {**sharegpt_jsonl(tmp_path), "columns": {"messages": "conversations"}}


def sharegpt_own_role_names(tmp_path):
    rows = [{"conversations": [{"from": "customer", "value": q}, {"from": "bot", "value": a}]} for q, a in QA]
    return {"train": str(write_jsonl(tmp_path / "roles.jsonl", rows)), "roles": {"customer": "user", "bot": "assistant"}}


FORMATS = [messages_jsonl, prompt_completion_jsonl, alpaca_json_list, question_answer_csv_mapped,
           prompt_completion_parquet, saved_dataset, sharegpt_jsonl, sharegpt_json_list, sharegpt_mapped_as_messages,
           sharegpt_own_role_names]


@pytest.mark.parametrize("write", FORMATS, ids=lambda f: f.__name__)
def test_every_format_tokenizes_every_row_with_the_loss_on_its_answer(write, tmp_path, tokenizer):
    splits, info = prepare(DataConfig(**write(tmp_path)), tokenizer, seed=0)
    both = [splits["train"], splits["eval"]]
    assert info.train_rows + info.eval_rows == len(QA)
    assert sorted(sum((answers(s, tokenizer) for s in both), [])) == sorted(CHAT_ANSWERS)
    assert asked(sum((prompts(s, tokenizer) for s in both), [])) == QUESTIONS
    assert info.train.truncated == info.train.dropped == 0


@pytest.mark.parametrize("write", [sharegpt_jsonl, sharegpt_json_list], ids=lambda f: f.__name__)
def test_sharegpt_rows_are_read_natively_with_their_system_turn(write, tmp_path, tokenizer):
    splits, info = prepare(DataConfig(**write(tmp_path)), tokenizer, seed=0)
    assert info.train.format == info.eval.format == "sharegpt"
    for text in prompts(splits["train"], tokenizer) + prompts(splits["eval"], tokenizer):
        assert text.startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\nWhat is the capital of")
        assert "SmolLM" not in text  # the row's own system turn, not the template's default one


MULTI_TURN = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a},
                            {"role": "user", "content": "And its first letter?"}, {"role": "assistant", "content": a[0]}]}
              for q, a in QA]


def answer_runs(split, tokenizer) -> list[list[str]]:
    """Each row's labelled stretches of tokens, decoded."""
    import itertools

    return [[tokenizer.decode([token for token, _ in run])
             for trained, run in itertools.groupby(zip(ids, labels), key=lambda pair: pair[1] != IGNORE) if trained]
            for ids, labels in zip(split["input_ids"], split["labels"])]


@pytest.mark.parametrize(("train_turns", "trained"), [("all", lambda a: [f"{a}<|im_end|>\n", f"{a[0]}<|im_end|>\n"]),
                                                      ("last", lambda a: [f"{a[0]}<|im_end|>\n"])])
def test_every_assistant_turn_of_a_multi_turn_row_carries_loss_unless_train_turns_is_last(train_turns, trained,
                                                                                          tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "multi.jsonl", MULTI_TURN)
    splits, info = prepare(DataConfig(train=str(path), eval=str(path), train_turns=train_turns), tokenizer, seed=0)
    assert info.train_turns == train_turns
    assert sorted(answer_runs(splits["train"], tokenizer)) == sorted(trained(a) for _, a in QA)


def test_plain_template_puts_the_separator_between_every_turn_and_ends_each_answer_with_eos(tmp_path, plain_tokenizer):
    path = write_jsonl(tmp_path / "multi.jsonl", [{"messages": [{"role": "system", "content": SYSTEM}, *row["messages"]]}
                                                 for row in MULTI_TURN])
    splits, _ = prepare(DataConfig(train=str(path), eval=str(path)), plain_tokenizer, seed=0)
    texts = {plain_tokenizer.decode(ids) for ids in splits["train"]["input_ids"]}
    assert texts == {f"{SYSTEM}\n{q}\n{a}<|im_end|>\nAnd its first letter?\n{a[0]}<|im_end|>" for q, a in QA}
    assert sorted(answer_runs(splits["train"], plain_tokenizer)) == sorted([f"{a}<|im_end|>", f"{a[0]}<|im_end|>"]
                                                                           for _, a in QA)
    config = DataConfig(**prompt_completion_jsonl(tmp_path), eval=str(tmp_path / "qa.jsonl"), separator="\nAnswer: ")
    splits, _ = prepare(config, plain_tokenizer, seed=0)
    assert {plain_tokenizer.decode(ids) for ids in splits["train"]["input_ids"]} == {
        f"{q}\nAnswer: {a}<|im_end|>" for q, a in QA}
    assert set(answers(splits["train"], plain_tokenizer)) == PLAIN_ANSWERS


def test_rows_with_an_empty_answer_are_dropped_and_counted_unless_kept(tmp_path, tokenizer):
    rows = [{"prompt": q, "completion": a} for q, a in QA] + [{"prompt": "Q1?", "completion": ""},
                                                              {"prompt": "Q2?", "completion": "  "}]
    path = write_jsonl(tmp_path / "empty.jsonl", rows)
    splits, info = prepare(DataConfig(train=str(path), eval=str(path)), tokenizer, seed=0)
    assert (info.train.rows, info.train.empty, info.train.dropped, info.train_rows) == (12, 2, 0, 10)
    assert sorted(answers(splits["train"], tokenizer)) == sorted(CHAT_ANSWERS)
    kept, info = prepare(DataConfig(train=str(path), eval=str(path), keep_empty_answers=True), tokenizer, seed=0)
    assert (info.train.empty, info.train_rows) == (2, 12)
    assert sorted(answers(kept["train"], tokenizer)) == sorted(CHAT_ANSWERS | {"<|im_end|>\n", "  <|im_end|>\n"})


def test_an_empty_earlier_answer_carries_no_loss_while_the_rows_other_answers_do(tmp_path, tokenizer):
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": ""},
                          {"role": "user", "content": "Well?"}, {"role": "assistant", "content": a}]} for q, a in QA]
    path = write_jsonl(tmp_path / "gap.jsonl", rows)
    splits, info = prepare(DataConfig(train=str(path), eval=str(path)), tokenizer, seed=0)
    assert (info.train.empty, info.train_rows) == (0, len(QA))
    assert sorted(answer_runs(splits["train"], tokenizer)) == sorted([f"{a}<|im_end|>\n"] for _, a in QA)


def test_a_plain_row_opens_with_the_tokenizers_bos_once_and_every_turn_starts_on_a_token_boundary(tmp_path, smollm2_dir):
    """A base model's tokenizer that adds a BOS: the BOS opens each row once (its first turn
    tokenized with the special tokens, the rest without), an empty first turn included."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    tokenizer.chat_template = None
    bos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(single="<|endoftext|> $A",
                                                                    special_tokens=[("<|endoftext|>", bos)])
    assert tokenizer("Paris")["input_ids"][0] == bos  # the tokenizer adds it
    rows = [{"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
            for question, answer in [("Capital of France?", "Paris"), ("", "Lyon")] * 4]
    splits, _ = prepare(DataConfig(train=str(write_jsonl(tmp_path / "bos.jsonl", rows)), template="plain",
                                   eval_fraction=0.25), tokenizer, seed=0)

    def alone(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    eos = tokenizer.eos_token_id
    expected = {(bos, *alone("Capital of France?\n"), *alone("Paris"), eos): [*alone("Paris"), eos],
                (bos, *alone("\n"), *alone("Lyon"), eos): [*alone("Lyon"), eos]}
    rows = {tuple(ids): labels for ids, labels in zip(splits["train"]["input_ids"], splits["train"]["labels"])}
    assert rows.keys() == expected.keys()
    for ids, answer in expected.items():
        assert rows[ids] == [IGNORE] * (len(ids) - len(answer)) + answer


def test_eval_examples_scores_a_seeded_sample_of_a_large_eval_file_or_all_of_it(tmp_path, plain_tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", [{"prompt": q, "completion": a} for q, a in QA])
    evaluate = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": f"Code of item {i}?", "completion": f"C{i}"}
                                                    for i in range(3000)])
    config = DataConfig(train=str(train), eval=str(evaluate))
    sample, info = prepare(config, plain_tokenizer, seed=0)
    assert (info.eval_rows, info.eval_rows_kept) == (32, 3000)
    assert info.eval_chosen_by == "a shuffle seeded by seed=0: the same rows at every round and in every trial"
    again, _ = prepare(config, plain_tokenizer, seed=0)
    other, _ = prepare(config, plain_tokenizer, seed=1)
    assert again["eval"]["input_ids"] == sample["eval"]["input_ids"] != other["eval"]["input_ids"]
    every, info = prepare(DataConfig(train=str(train), eval=str(evaluate), eval_examples="all"), plain_tokenizer, seed=0)
    assert (info.eval_rows, info.eval_rows_kept, info.eval_chosen_by) == (3000, 3000, "taking every row")
    assert len(every["eval"]) == 3000


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
    assert all(text.startswith("Name the capital.\n\nWhat is the capital of")
               for text in prompts(splits["train"], plain_tokenizer))


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
    return ["--set", f"data.train={path}"], ["has columns ['answer', 'question']; allowed: chat 'messages'",
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


def header_only_csv(tmp_path):
    (tmp_path / "header.csv").write_text("prompt,completion\n")
    return ["--set", f"data.train={tmp_path / 'header.csv'}"], [
        "header.csv', a csv file that holds no rows (only its header: prompt, completion)", "Fix: add the rows"]


def empty_json_list(tmp_path):
    (tmp_path / "rows.json").write_text("[]\n")
    return ["--set", f"data.train={tmp_path / 'rows.json'}"], ["rows.json', a json file that holds no rows (an empty JSON list)"]


def sharegpt_unknown_role(tmp_path):
    rows = [{"conversations": [{"from": "customer", "value": q}, {"from": "bot", "value": a}]} for q, a in QA]
    path = write_jsonl(tmp_path / "roles.jsonl", rows)
    return ["--set", f"data.train={path}"], [
        f"{path} line 1 turn 1 has from 'customer'; expected one of system, human, user, gpt, assistant",
        "Fix: map it to system, user or assistant with data.roles, e.g. --set 'data.roles={customer: assistant}'"]


def sharegpt_ending_with_the_question(tmp_path):
    rows = sharegpt_rows()
    rows[2]["conversations"] = rows[2]["conversations"][:2]
    path = write_jsonl(tmp_path / "open.jsonl", rows)
    return ["--set", f"data.train={path}"], [
        f"{path} line 3 ends with turn 2, from 'human' (user); expected an assistant answer last"]


def sharegpt_turn_with_other_keys(tmp_path):
    rows = sharegpt_rows()
    rows[1] = {"conversations": [{"speaker": "human", "text": "Q?"}]}
    path = write_jsonl(tmp_path / "keys.jsonl", rows)
    return ["--set", f"data.train={path}"], [
        (f"{path} line 2 turn 1 has the keys ['speaker', 'text']; expected a list of turns, each {{'role': ..., "
         f"'content': ...}} or ShareGPT's {{'from': ..., 'value': ...}}")]


BAD = [bad_line_jsonl, row_without_answer, csv_row_without_answer, unknown_columns, mapped_column_missing, missing_txt,
       missing_relative_file, uncached_dataset_id, unknown_suffix, directory_not_saved_by_datasets, empty_file,
       header_only_csv, empty_json_list, sharegpt_unknown_role, sharegpt_ending_with_the_question,
       sharegpt_turn_with_other_keys]


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


def test_dry_run_says_which_turns_train_what_is_dropped_and_prints_a_rendered_example(tmp_path, tiny_model_dir, capsys):
    from search.run import main

    sharegpt_names = {"user": "human", "assistant": "gpt"}
    rows = [{"conversations": [{"from": "system", "value": SYSTEM}] + [
        {"from": sharegpt_names[turn["role"]], "value": turn["content"]} for turn in row["messages"]]} for row in MULTI_TURN]
    train = write_jsonl(tmp_path / "train.jsonl", rows + [{"conversations": [{"from": "human", "value": "Q?"},
                                                                             {"from": "gpt", "value": ""}]}])
    evaluate = write_jsonl(tmp_path / "eval.jsonl", rows * 300)
    code = main(["--set", f"model.path={tiny_model_dir}", "--set", "search.ranks=[2]", "--dry-run",
                 "--set", f"data.train={train}", "--set", f"data.eval={evaluate}"])
    out, err = capsys.readouterr()
    assert code == 0, err
    [line] = [line for line in out.splitlines() if line.startswith("Data: ")]
    assert "template chat, loss on every assistant turn (data.train_turns=all)" in line
    assert "1 rows with an empty answer dropped (data.keep_empty_answers=false)" in line
    assert ("Eval: 32 of 3,000 eval rows scored at each round (data.eval_examples=32), chosen by a shuffle seeded by "
            "seed=0: the same rows at every round and in every trial") in out.splitlines()
    q, a = QA[0]
    assert ("Example: the first training row as the model sees it, its trained tokens between [[ and ]]:\n"
            f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"
            f"[[{a}<|im_end|>\n]]<|im_start|>user\nAnd its first letter?<|im_end|>\n<|im_start|>assistant\n"
            f"[[{a[0]}<|im_end|>\n]]\n(end of the example)\n") in out
