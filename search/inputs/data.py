"""Data: read and every row's turns checked by the driver before a local Ray starts (`read`),
then tokenized once while it starts (`prepare`); trials read it from disk (`trainables.data`).

Sources (`data.train`, `data.eval`): a builtin task (`builtin:atlas`); a .jsonl, .json, .csv,
.parquet or .txt file; a `datasets.save_to_disk` directory; or a dataset id in the local
`datasets` cache. `datasets` reads them all; a reference that looks local never reaches the hub,
and nothing is downloaded.

Row formats, after `data.columns` has given the data's own columns the row fields' names: chat
`messages` (turns of `role`/`content`); ShareGPT `conversations` (turns of `from`/`value`, the
role names read as LLaMA-Factory reads them, more through `data.roles`); `prompt`/`completion`;
Alpaca `instruction`/`input`/`output` (the prompt is the instruction, then the input after a
blank line where there is one); and `text` (a .txt file's lines), where the loss is on every
token. In the others the loss is on the answers' tokens only (every assistant turn, or the last
with `data.train_turns=last`; the completion; the output); everything else is labelled -100. A
row whose answer is empty is dropped and counted unless `data.keep_empty_answers`.

Templates: `chat` renders a row with the tokenizer's chat template; `plain` takes each turn's
text in order, `data.separator` between one turn and the next, an answer ending in EOS.

The driver writes `train`, `search_train` and `eval` with `datasets.save_to_disk`; a trial
memory-maps them, so nothing is pickled into trials and nothing is tokenized twice.
"""

from __future__ import annotations

import csv
import functools
import itertools
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from rundir.runconfig import DataInfo, SourceInfo
from search.inputs import atlas
from trainables.config import (
    ALL_EVAL,
    AUTO_EVAL,
    BUILTIN_PREFIX,
    DATA_FILE_BUILDERS,
    SHAREGPT_ROLES,
    DataConfig,
    looks_local,
    relative_to_cwd,
)
from trainables.data import IGNORE

BUILTIN_TASKS = {"atlas": atlas.rows}
# Each format by the row fields that identify it, tried in this order.
FORMATS = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "prompt/completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "text": ("text",),
}
# A source's own eval split, by name, in order of preference ("eval": a builtin task's).
EVAL_SPLITS = ("validation", "test", "eval")
ALLOWED_SOURCES = ("'builtin:atlas', a .jsonl, .json, .csv, .parquet or .txt file, a datasets.save_to_disk "
                   "directory, or a dataset id in the local datasets cache")
ALLOWED_ROWS = ("chat 'messages' or ShareGPT 'conversations'; 'prompt' and 'completion'; Alpaca 'instruction', "
                "'output' (and 'input'); or 'text'")


@dataclass(frozen=True)
class Rows:
    """Raw rows of one source, their fields named as this module reads them."""

    key: str                     # the config key that named the source: data.train or data.eval
    source: str                  # the source as the config gives it
    part: str                    # which of its rows: "all rows", "split 'validation'", "held out: ..."
    data: Any                    # a datasets.Dataset
    format: str                  # a key of FORMATS
    where: Callable[[int], str]  # names row i of `data` for a message: "qa.jsonl line 7"
    turns: tuple = ()            # row i as chat turns (`_turns`), once `with_turns` has read and checked them

    def subset(self, indices: list[int], part: str) -> Rows:
        return replace(self, part=part, data=self.data.select(indices), where=lambda i: self.where(indices[i]))

    def with_turns(self, roles: dict[str, str]) -> Rows:
        """These rows with every row's turns read and checked (ValueError naming the first bad row)."""
        return replace(self, turns=tuple(_turns(row, self, i, roles) for i, row in enumerate(self.data)))


def load_source(source: str, key: str, columns: dict[str, str]) -> dict[str, Rows]:
    """The rows of `source` by split name: a file is one split, "" (its rows); a builtin task
    has 'train' and 'eval'; a saved or cached dataset has its own. ValueError, naming `key`,
    the source and what is allowed, for a source that does not exist, cannot be read, or holds
    rows of no known format."""
    import datasets

    datasets.disable_progress_bars()
    if source.startswith(BUILTIN_PREFIX):
        name = source[len(BUILTIN_PREFIX):]
        if name not in BUILTIN_TASKS:
            raise ValueError(f"{key} is {source!r}; builtin tasks: {', '.join(BUILTIN_PREFIX + n for n in BUILTIN_TASKS)}")
        return {split: _rows(key, source, split, datasets.Dataset.from_list(BUILTIN_TASKS[name](split)), columns)
                for split in ("train", "eval")}
    if not looks_local(source):
        return _splits(key, source, _from_hub_cache(source, key), columns)
    path = Path(source).expanduser()
    if not path.exists():
        raise ValueError(f"{key} is {source!r}, which does not exist{relative_to_cwd(path)}. "
                         f"Fix: give an existing file or directory; allowed: {ALLOWED_SOURCES}")
    if path.is_dir():
        try:
            saved = datasets.load_from_disk(str(path))
        except FileNotFoundError:
            raise ValueError(f"{key} is {source!r}, a directory that datasets.save_to_disk did not write (it holds no "
                             f"dataset_dict.json or state.json). Fix: point {key} at the data file inside it, or at a "
                             f"save_to_disk directory") from None
        return _splits(key, source, saved, columns)
    data, where = _read_file(path, key)
    return {"": _rows(key, source, "", data, columns, where)}


def _splits(key: str, source: str, loaded, columns: dict[str, str]) -> dict[str, Rows]:
    """A Dataset as one split, or a DatasetDict's splits."""
    import datasets

    if isinstance(loaded, datasets.Dataset):
        return {"": _rows(key, source, "", loaded, columns)}
    return {name: _rows(key, source, name, split, columns) for name, split in loaded.items()}


def _from_hub_cache(name: str, key: str):
    """The dataset `name` from the local `datasets` cache, without asking the hub."""
    import datasets

    # datasets reads HF_HUB_OFFLINE once, when it is imported: set for this call, it makes
    # load_dataset go straight to the cache instead of retrying the hub for half a minute
    offline = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = True
    try:
        with _quiet_datasets():
            return datasets.load_dataset(name)
    except Exception as e:  # datasets raises many types for a dataset it cannot find or read
        raise ValueError(
            f"{key} is {name!r}: no such local path, and not a dataset in the local datasets cache "
            f"({datasets.config.HF_DATASETS_CACHE}; {type(e).__name__}). Fix: give a local file or directory, or load "
            f"it once where the hub is reachable (datasets.load_dataset({name!r})); allowed: {ALLOWED_SOURCES}"
        ) from None
    finally:
        datasets.config.HF_HUB_OFFLINE = offline


def _read_file(path: Path, key: str) -> tuple[Any, Callable[[int], str]]:
    """A data file's rows through its `datasets` builder (every CSV cell as text, as written:
    '007' stays '007'; a .txt file's blank lines left out), and the function that names a row
    by the file's line where lines are rows."""
    import datasets

    builder = DATA_FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise ValueError(f"{key} is {str(path)!r}, a {path.suffix or 'suffix-less'} file; allowed: "
                         f"{ALLOWED_SOURCES}. Fix: save the data in one of these forms")
    if path.stat().st_size == 0:
        raise ValueError(f"{key} is {str(path)!r}, an empty file; it needs rows of {ALLOWED_ROWS}")
    options = {}
    if builder == "csv":
        options["features"] = datasets.Features({name: datasets.Value("string") for name in _csv_header(path)})
    try:
        with _quiet_datasets():
            data = datasets.load_dataset(builder, data_files=str(path), split="train", **options)
    except Exception as e:  # datasets raises many types for a malformed file
        nothing = _no_rows(path, builder)
        if nothing:
            raise ValueError(f"{key} is {str(path)!r}, a {builder} file that holds no rows ({nothing}); it needs rows "
                             f"of {ALLOWED_ROWS}. Fix: add the rows, or point {key} at the file that holds them") from None
        problem = _json_problem(path) if builder == "json" else None
        fix = ("correct that line" if problem else
               f"check that it is valid {builder}, or give it the suffix of its format ({', '.join(DATA_FILE_BUILDERS)})")
        raise ValueError(f"{key} is {str(path)!r}, which could not be read as {builder}: {problem or _innermost(e)}. "
                         f"Fix: {fix}") from None
    if builder == "text":
        lines = [i + 1 for i, text in enumerate(data["text"]) if text.strip()]
        return data.select([line - 1 for line in lines]), lambda i: f"{path} line {lines[i]}"
    # the line numbers are only counted when a message needs one
    if builder == "csv":
        csv_lines = functools.cache(lambda: _csv_record_lines(path))
        return data, lambda i: f"{path} line {csv_lines()[i]}"
    if builder == "json" and not _is_json_list(path):
        json_lines = functools.cache(lambda: _json_lines(path))
        return data, lambda i: f"{path} line {json_lines()[i]}"
    return data, lambda i: f"{path} row {i + 1}"


@contextmanager
def _quiet_datasets():
    """datasets logs its own account of a file it cannot read, or of a cached dataset it falls
    back to; the ValueError raised here says it once, in the CLI's one paragraph."""
    import datasets

    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)


def _innermost(error: BaseException) -> str:
    """The root cause's message: datasets wraps the reader's own error, which names the problem."""
    while error.__cause__ or error.__context__:
        error = error.__cause__ or error.__context__
    return f"{type(error).__name__}: {error}"


def _no_rows(path: Path, builder: str) -> str | None:
    """What a CSV or JSON file that holds no rows holds instead, in words; None where it holds rows
    or is not one of these."""
    if builder == "csv":
        return None if _csv_record_lines(path) else f"only its header: {', '.join(_csv_header(path))}"
    if builder != "json":
        return None
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        return "only blank lines"
    try:
        return "an empty JSON list" if json.loads(text) == [] else None
    except json.JSONDecodeError:
        return None


def _json_problem(path: Path) -> str | None:
    """Where a JSON Lines file, or a JSON document, stops being valid JSON, in words, by line;
    None where the JSON itself is valid."""
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.splitlines()
    first = next((line for line in lines if line.strip()), "")
    try:
        json.loads(first)
        one_value_per_line = True
    except json.JSONDecodeError:
        one_value_per_line = False  # a document spread over lines, such as an indented list
    if not one_value_per_line:
        try:
            json.loads(text)
        except json.JSONDecodeError as e:
            return f"line {e.lineno} is not valid JSON ({e.msg}, column {e.colno})"
        return None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            return f"line {number} is not valid JSON ({e.msg}, column {e.colno}); each line must be one JSON object"
        if not isinstance(value, dict):
            return f"line {number} is a JSON {type(value).__name__}, not an object of fields"
    return None


def _is_json_list(path: Path) -> bool:
    """Whether a JSON file holds one list of rows rather than one row per line."""
    with path.open(encoding="utf-8", errors="replace") as f:
        return f.read(4096).lstrip().startswith("[")


def _json_lines(path: Path) -> list[int]:
    """The line number of each row of a JSON Lines file: its non-blank lines."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return [number for number, line in enumerate(lines, start=1) if line.strip()]


def _csv_header(path: Path) -> list[str]:
    with path.open(newline="", encoding="utf-8", errors="replace") as f:
        return next(csv.reader(f), [])


def _csv_record_lines(path: Path) -> list[int]:
    """The line on which each data row of a CSV file starts (a quoted cell may hold line breaks)."""
    starts = []
    with path.open(newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.reader(f)
        next(reader, None)  # the header
        end = reader.line_num
        for record in reader:
            if record:  # pandas skips blank lines
                starts.append(end + 1)
            end = reader.line_num
    return starts


def _rows(key: str, source: str, split: str, data, columns: dict[str, str],
          where: Callable[[int], str] | None = None) -> Rows:
    """`data` with `columns`' renames applied, and its format; ValueError for a mapped column the
    data lacks, or rows of no known format."""
    named = f"{key} {source!r}" + (f" (split {split!r})" if split else "")
    present = set(data.column_names)
    missing = {field: column for field, column in columns.items() if column not in present}
    if missing:
        raise ValueError(f"data.columns maps {missing}, but {named} has no such column; its columns: "
                         f"{sorted(present)}. Fix: map each row field to one of them")
    renames = {column: field for field, column in columns.items() if column != field}
    data = data.remove_columns([c for c in present & set(renames.values()) if c not in renames])
    data = data.rename_columns(renames)
    fields = set(data.column_names)
    format_ = next((name for name, needed in FORMATS.items() if set(needed) <= fields), None)
    if format_ is None:
        raise ValueError(f"{named} has columns {sorted(present)}; allowed: {ALLOWED_ROWS}. Fix: rename them, or map "
                         f"them with data.columns, e.g. --set 'data.columns={{prompt: question, completion: answer}}'")
    if len(data) == 0:
        raise ValueError(f"{named} holds no rows")
    part = f"split {split!r}" if split else "all rows"
    named_rows = f"{source} split {split!r}" if split else source
    return Rows(key, source, part, data, format_, where or (lambda i: f"{named_rows} row {i + 1}"))


def train_part(splits: dict[str, Rows]) -> Rows:
    """The rows to train on: the 'train' split, or the one split there is."""
    if "train" in splits:
        return splits["train"]
    return _only(splits, "train")


def eval_part(splits: dict[str, Rows]) -> Rows:
    """The rows to evaluate on: the first of EVAL_SPLITS there is, or the one split there is."""
    return own_eval_part(splits) or _only(splits, "eval")


def own_eval_part(splits: dict[str, Rows]) -> Rows | None:
    """A source's own eval split (EVAL_SPLITS), if it has one beside others."""
    return next((splits[name] for name in EVAL_SPLITS if name in splits and len(splits) > 1), None)


def _only(splits: dict[str, Rows], purpose: str) -> Rows:
    if len(splits) == 1:
        return next(iter(splits.values()))
    rows = next(iter(splits.values()))
    wanted = "'train'" if purpose == "train" else " or ".join(repr(s) for s in EVAL_SPLITS)
    raise ValueError(f"{rows.key} is {rows.source!r}, a dataset with splits {sorted(splits)} and none named {wanted} "
                     f"to {purpose} on. Fix: save the split you mean on its own and give its directory")


def hold_out(rows: Rows, fraction: float, seed: int) -> tuple[Rows, Rows]:
    """`rows` split in two, chosen by `seed`: the rest, and round(fraction * rows) held out for
    eval (at least 1; the rest at least 1). ValueError when `rows` has too few rows."""
    n = len(rows.data)
    held = max(1, round(fraction * n))
    if n - held < 1:
        raise ValueError(f"{rows.key} {rows.source!r} has {n} row(s), too few to hold out an eval split "
                         f"(data.eval_fraction={fraction:g} holds out {held}, and at least 1 must be left to train on). "
                         f"Fix: give more rows, or eval data of its own with data.eval")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    evaluate, train = sorted(order[:held]), sorted(order[held:])
    return (rows.subset(train, f"{rows.part} but the {held} held out for eval"),
            rows.subset(evaluate, f"{held} of {n} rows held out by data.eval_fraction={fraction:g}, seed {seed}"))


def resolve_template(template: str, tokenizer) -> str:
    """chat or plain: `template` as set, auto being chat where the tokenizer has a chat template."""
    has_template = bool(tokenizer.chat_template)
    if template == "auto":
        return "chat" if has_template else "plain"
    if template == "chat" and not has_template:
        raise ValueError(f"data.template is 'chat' but the tokenizer {tokenizer.name_or_path!r} has no chat template. "
                         f"Fix: --set data.template=plain (or auto), or set model.tokenizer to a tokenizer that has one")
    return template


def tokenize(rows: Rows, tokenizer, template: str, cfg: DataConfig) -> tuple[dict[str, list], SourceInfo]:
    """input_ids and labels per row of `rows` (`read`'s, their turns checked), cut at
    data.max_length tokens; labels keep the tokens of the answers the row trains (`trained_turns`;
    every token of a text row), -100 elsewhere. A row whose trained answers are all empty is
    dropped and counted unless data.keep_empty_answers; a row with no label left after the first
    token (nothing to train on) is dropped and counted. ValueError naming the source when every
    row is dropped."""
    kept, empty = [], 0
    for i, turns in enumerate(rows.turns):
        if not trained_turns(turns, cfg.train_turns, keep_empty=False):
            empty += 1
            if not cfg.keep_empty_answers:
                continue
        trained = trained_turns(turns, cfg.train_turns, cfg.keep_empty_answers)
        kept.append(_plain_pieces(turns, trained, cfg.separator) if rows.format == "text" or template == "plain"
                    else _chat_pieces(turns, trained, tokenizer, rows.where(i)))
    input_ids, labels, truncated, dropped = [], [], 0, 0
    for ids, row_labels in _tokens(kept, tokenizer):
        if not any(label != IGNORE for label in row_labels[1:cfg.max_length]):
            dropped += 1
            continue
        truncated += len(ids) > cfg.max_length
        input_ids.append(ids[:cfg.max_length])
        labels.append(row_labels[:cfg.max_length])
    if not input_ids:
        raise ValueError(f"{rows.key} {rows.source!r} ({rows.part}): none of its {len(rows.data)} rows has a token to "
                         f"train on within data.max_length={cfg.max_length} ({empty} with an empty answer, {dropped} "
                         f"whose prompt fills it). Fix: raise data.max_length, or fill in the answers")
    info = SourceInfo(rows.key, rows.source, rows.part, rows.format, len(rows.data), truncated, dropped, empty)
    return {"input_ids": input_ids, "labels": labels}, info


@dataclass(frozen=True)
class _Piece:
    """A row's text to tokenize apart from the rest: trained or not, with the tokenizer's own
    special tokens (a BOS where it adds one) where it opens a plain row, and an EOS after it
    where it is a plain row's answer."""

    text: str
    train: bool
    special: bool = False
    eos: bool = False


def _tokens(rows: list[list[_Piece]], tokenizer) -> Iterator[tuple[list[int], list[int]]]:
    """Each row's input_ids and labels, its pieces tokenized apart but every row's in one call:
    a fast tokenizer encodes a batch in its own threads, where a call per piece paid the
    tokenizer's overhead per piece (a third of tokenizing `facts`' 3,600 rows on 2 cores)."""
    texts = {special: [piece.text for row in rows for piece in row if piece.text and piece.special is special]
             for special in (False, True)}
    encoded = {special: iter(tokenizer(batch, add_special_tokens=special, return_attention_mask=False)["input_ids"]
                             if batch else []) for special, batch in texts.items()}
    eos, opening = _eos(tokenizer), tokenizer("", add_special_tokens=True)["input_ids"]
    for row in rows:
        ids, labels = [], []
        for piece in row:
            if piece.text:
                part = next(encoded[piece.special])
            else:  # no text, and only the special tokens where it opens a plain row
                part = opening if piece.special else []
            part = part + (eos if piece.eos else [])
            ids += part
            labels += part if piece.train else [IGNORE] * len(part)
        yield ids, labels


def trained_turns(turns: list[dict], train_turns: str, keep_empty: bool) -> list[int]:
    """The indices of the assistant turns that carry loss: every one, or the last (`train_turns`),
    less those without text unless `keep_empty`."""
    answers = [k for k, turn in enumerate(turns) if turn["role"] == "assistant"]
    chosen = answers if train_turns == "all" else answers[-1:]
    return [k for k in chosen if keep_empty or turns[k]["content"].strip()]


_EXPECTED_TURNS = "a list of turns, each {'role': ..., 'content': ...} or ShareGPT's {'from': ..., 'value': ...}"
_TURN_KEYS = (("role", "content"), ("from", "value"))


def _turns(row: dict, rows: Rows, i: int, roles: dict[str, str]) -> list[dict]:
    """The row as chat turns {'role': system, user or assistant, 'content': text}; a text row is
    one assistant turn, the text to train on."""
    if rows.format == "text":
        return [{"role": "assistant", "content": str(row["text"] or "")}]
    if rows.format in ("messages", "sharegpt"):
        return _chat_turns(row, rows, i, {**SHAREGPT_ROLES, **roles})
    if rows.format == "prompt/completion":
        prompt, answer = _text(row, "prompt", rows, i), _text(row, "completion", rows, i)
    else:
        instruction, answer = _text(row, "instruction", rows, i), _text(row, "output", rows, i)
        extra = row.get("input")
        prompt = f"{instruction}\n\n{extra}" if extra else instruction
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def _chat_turns(row: dict, rows: Rows, i: int, roles: dict[str, str]) -> list[dict]:
    """A messages or conversations row's turns, each read by 'role'/'content' or ShareGPT's
    'from'/'value', its role name mapped by `roles`; the last must be an assistant answer."""
    field = FORMATS[rows.format][0]
    where = f"{rows.key}: {rows.where(i)}"
    turns = row[field]
    if not isinstance(turns, list) or not turns:
        found = "nothing" if turns is None else "no turns" if turns == [] else f"a {type(turns).__name__}"
        raise ValueError(f"{where} has {found} for {field!r}; expected {_EXPECTED_TURNS}. Fix: correct the row, "
                         f"or remove it")
    out = []
    for n, turn in enumerate(turns, start=1):
        keys = next(((r, c) for r, c in _TURN_KEYS if isinstance(turn, dict) and turn.get(r) is not None), None)
        if keys is None:
            found = (f"the keys {sorted(k for k, v in turn.items() if v is not None)}" if isinstance(turn, dict)
                     else f"a {type(turn).__name__}")
            raise ValueError(f"{where} turn {n} has {found}; expected {_EXPECTED_TURNS}. Fix: rename the keys, or "
                             f"remove the row")
        role_key, text_key = keys
        name = turn[role_key]
        if not isinstance(name, str) or name not in roles:
            raise ValueError(f"{where} turn {n} has {role_key} {name!r}; expected one of {', '.join(roles)}. Fix: map "
                             f"it to system, user or assistant with data.roles, e.g. --set 'data.roles={{{name}: "
                             f"assistant}}'")
        text = turn[text_key]
        if not isinstance(text, str):
            found = "nothing" if text is None else f"a {type(text).__name__}"
            raise ValueError(f"{where} turn {n} ({role_key} {name!r}) has {found} for {text_key!r}; expected its "
                             f"text. Fix: fill it in, or remove the row")
        out.append({"role": roles[name], "content": text})
    if out[-1]["role"] != "assistant":
        last = turns[-1]
        raise ValueError(f"{where} ends with turn {len(out)}, {keys[0]} {last[keys[0]]!r} ({out[-1]['role']}); "
                         f"expected an assistant answer last, to train on. Fix: add the answer as the last turn, "
                         f"or remove the row")
    return out


def _text(row: dict, field: str, rows: Rows, i: int) -> str:
    value = row[field]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # a number in a JSON file is the text it reads as
    if not isinstance(value, str):
        found = "nothing" if value is None else f"a {type(value).__name__}"
        raise ValueError(f"{rows.key}: {rows.where(i)} has {found} for {field!r}; every {rows.format} row needs "
                         f"text there. Fix: fill it in, or remove the row")
    return value


def _plain_pieces(turns: list[dict], trained: list[int], separator: str) -> list[_Piece]:
    """Each turn's text in order, `separator` between one turn and the next, an answer ending in
    EOS (before the separator); labels on the `trained` answers and their EOS. Each turn is
    tokenized apart, so an answer starts on a token boundary, the first with the tokenizer's own
    special tokens (a BOS where it adds one)."""
    pieces = []
    for k, turn in enumerate(turns):
        answer = turn["role"] == "assistant"
        # the separator after an answer's EOS opens the next turn, which is never an answer's own text
        after_answer = separator if k and turns[k - 1]["role"] == "assistant" else ""
        text = turn["content"] if answer else after_answer + turn["content"] + separator
        pieces.append(_Piece(text, k in trained, special=not pieces, eos=answer))
    return pieces


def _chat_pieces(turns: list[dict], trained: list[int], tokenizer, where: str) -> list[_Piece]:
    """The row rendered by the tokenizer's chat template; labels on each `trained` answer, from
    where its rendering departs from the prompt that asks for it (the generation prompt) to the
    end of its turn. Trained and untrained text are tokenized apart, as a prompt is at inference."""
    def render(messages: list[dict], prompt: bool = False) -> str:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=False)

    try:
        full = render(turns)
        spans = [(render(turns[:k], prompt=True), render(turns[:k + 1]) if k + 1 < len(turns) else full, k)
                 for k in trained]
    except Exception as e:  # the template is the model's own Jinja code, which raises what it likes
        raise ValueError(f"{where}: the tokenizer's chat template refused the row ({type(e).__name__}: {e})") from None
    pieces, done = [], 0
    for asked, answered, k in spans:
        if not full.startswith(answered):
            raise ValueError(f"{where}: the tokenizer's chat template renders the turns up to assistant turn {k + 1} "
                             f"differently once later turns follow, so that turn's tokens cannot be told apart. "
                             f"Fix: --set data.train_turns=last, or data.template=plain")
        start = max(done, len(os.path.commonprefix([asked, answered])))
        pieces += [_Piece(full[done:start], False), _Piece(full[start:len(answered)], True)]
        done = len(answered)
    pieces.append(_Piece(full[done:], False))
    return pieces


def _eos(tokenizer) -> list[int]:
    return [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]


def marked(ids: list[int], labels: list[int], tokenizer) -> str:
    """An example as the model sees it, decoded, its trained tokens between [[ and ]]."""
    runs = itertools.groupby(zip(ids, labels), key=lambda pair: pair[1] != IGNORE)
    return "".join((f"[[{text}]]" if train else text)
                   for train, run in runs for text in [tokenizer.decode([token for token, _ in run])])


def read(cfg: DataConfig, seed: int) -> tuple[Rows, Rows]:
    """The rows to train on and to evaluate on, read, and every row's turns checked (`with_turns`),
    not yet tokenized: no tokenizer is needed, so the driver finds bad rows before it starts
    anything. Eval is data.eval, else data.train's own eval split, else data.eval_fraction of
    data.train held out by `seed`. ValueError for bad data, naming the key, the source and the row."""
    train_splits = load_source(cfg.train, "data.train", cfg.columns)
    train = train_part(train_splits)
    if cfg.eval != AUTO_EVAL:
        evaluate = eval_part(load_source(cfg.eval, "data.eval", cfg.columns))
    else:
        own = own_eval_part(train_splits)
        train, evaluate = (train, own) if own else hold_out(train, cfg.eval_fraction, seed)
    return train.with_turns(cfg.roles), evaluate.with_turns(cfg.roles)


def prepare(cfg: DataConfig, tokenizer, seed: int, rows: tuple[Rows, Rows] | None = None) -> tuple[dict, DataInfo]:
    """Tokenize train and eval (`rows`, as `read` gave them, or read here) once, in memory
    (nothing is written until the whole input is known to be good). Keeps `search_fraction` of
    train and `eval_examples` of eval (all: every row), chosen by `seed`. Returns the splits and
    what they hold. ValueError for bad data, naming the key, the source and the row."""
    import datasets

    train, evaluate = rows or read(cfg, seed)
    template = resolve_template(cfg.template, tokenizer)
    (train_columns, train_info), (eval_columns, eval_info) = (
        tokenize(rows, tokenizer, template, cfg) for rows in (train, evaluate))
    splits = {"train": datasets.Dataset.from_dict(train_columns), "eval": datasets.Dataset.from_dict(eval_columns)}
    full_train = len(splits["train"])
    keep = max(1, round(cfg.search_fraction * full_train))
    splits["search_train"] = splits["train"].shuffle(seed=seed).select(range(keep))
    kept = len(splits["eval"])
    scored = kept if cfg.eval_examples == ALL_EVAL else min(cfg.eval_examples, kept)
    splits["eval"] = splits["eval"].shuffle(seed=seed).select(range(scored))
    chosen_by = ("taking every row" if scored == kept
                 else f"a shuffle seeded by seed={seed}: the same rows at every round and in every trial")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    info = DataInfo(template=template, max_length=cfg.max_length, train=train_info, eval=eval_info,
                    train_rows=full_train, search_train_rows=keep, eval_rows=scored, pad_token_id=pad,
                    train_turns=cfg.train_turns, eval_rows_kept=kept, eval_chosen_by=chosen_by,
                    example=marked(train_columns["input_ids"][0], train_columns["labels"][0], tokenizer))
    return splits, info


def eval_sample_line(info: DataInfo, eval_examples: int | str) -> str:
    """How many eval rows every round scores, of how many, set by what, and chosen how."""
    return f"Eval: {info.eval_sample(eval_examples)}"


def template_fallback_line(info: DataInfo, cfg: DataConfig) -> str | None:
    """A line where data.template=auto fell back to the plain template (the tokenizer has no chat
    template), which a person prompting the adapter must know; None otherwise."""
    if cfg.template != "auto" or info.template != "plain" or info.train.format == "text":
        return None
    return (f"Template: plain, as data.template=auto chose for a tokenizer without a chat template: turns joined by "
            f"data.separator={cfg.separator!r}; prompt the adapter the same way, or set data.template=chat with "
            f"model.tokenizer that has a chat template")
