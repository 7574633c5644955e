"""Data: loaded and tokenized once by the driver, read by every trial from disk.

Rows are chat `messages` or `prompt`/`completion` pairs; the loss is on the answer
tokens only (the last assistant turn, or the completion), everything else is labelled
-100. The driver writes `train`, `eval` with `datasets.save_to_disk`; a trial memory-maps
them, so nothing is pickled into trials and nothing is tokenized twice.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rundir.files import atomic_dir, is_uri, local_copy
from trainables import atlas
from trainables.config import BUILTIN_PREFIX, DataConfig, cache_root

IGNORE = -100
BUILTIN_TASKS = {"atlas": atlas.rows}
_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def load_rows(source: str, split: str, key: str):
    """A `datasets.Dataset` of raw rows. `key` names the config field, for messages."""
    import datasets

    if source.startswith(BUILTIN_PREFIX):
        name = source[len(BUILTIN_PREFIX):]
        if name not in BUILTIN_TASKS:
            raise ValueError(f"{key} is {source!r}; builtin tasks: {', '.join(BUILTIN_PREFIX + n for n in BUILTIN_TASKS)}")
        return datasets.Dataset.from_list(BUILTIN_TASKS[name](split))
    path = Path(source)
    if path.suffix in _FORMATS:
        if not path.is_file():
            raise ValueError(f"{key} is {source!r}, which does not exist. Fix: give an existing JSONL, Parquet or CSV file")
        if path.stat().st_size == 0:
            raise ValueError(f"{key} is {source!r}, an empty file; it needs rows with 'messages' or 'prompt' and 'completion'")
        try:
            return datasets.load_dataset(_FORMATS[path.suffix], data_files=str(path), split="train")
        except Exception as e:  # datasets raises many types for a malformed file
            raise ValueError(f"{key}: {source!r} could not be read as {_FORMATS[path.suffix]} ({type(e).__name__}: {e})") from None
    try:
        return datasets.load_dataset(source, split=split)
    except Exception as e:
        raise ValueError(
            f"{key} is {source!r}: not a builtin task, not a .jsonl/.parquet/.csv file, and not a dataset "
            f"in the local cache ({type(e).__name__}). Fix: point {key} at a local file"
        ) from None


def _to_messages(row: dict) -> list[dict] | None:
    if row.get("messages"):
        return row["messages"]
    if row.get("prompt") is not None and row.get("completion") is not None:
        return [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]
    return None


def tokenize_rows(dataset, tokenizer, max_length: int, key: str) -> dict[str, list]:
    """input_ids and labels per row; labels keep only the final answer's tokens."""
    columns = set(dataset.column_names)
    if "messages" not in columns and not {"prompt", "completion"} <= columns:
        raise ValueError(
            f"{key} has columns {sorted(columns)}; allowed: 'messages' (chat turns) or 'prompt' and 'completion'"
        )
    if len(dataset) == 0:
        raise ValueError(f"{key} holds no rows")
    input_ids, labels = [], []
    for i, row in enumerate(dataset):
        messages = _to_messages(row)
        if not messages or messages[-1].get("role") != "assistant":
            raise ValueError(f"{key} row {i} does not end with an assistant answer; every row needs one to train on")
        prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        full_ids = tokenizer(full, add_special_tokens=False)["input_ids"][:max_length]
        answer_start = min(len(prompt_ids), len(full_ids))
        row_labels = [IGNORE] * answer_start + full_ids[answer_start:]
        if answer_start >= len(full_ids) - 1:
            raise ValueError(
                f"{key} row {i}: the prompt fills data.max_length={max_length} tokens, leaving no answer to train on. "
                f"Fix: raise data.max_length"
            )
        input_ids.append(full_ids)
        labels.append(row_labels)
    return {"input_ids": input_ids, "labels": labels}


def prepare(cfg: DataConfig, tokenizer_path: str, seed: int) -> tuple[dict, dict]:
    """Tokenize train and eval once, in memory (nothing is written until the whole input
    is known to be good); keep `search_fraction` of train and `eval_examples` of eval,
    chosen by `seed`. Returns the splits and counts for the run's record."""
    import datasets
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    if tokenizer.chat_template is None:
        raise ValueError(f"model.path {tokenizer_path!r} has no chat template; a chat model's tokenizer is needed")
    splits = {}
    for split, source, key in (("train", cfg.train, "data.train"), ("eval", cfg.eval, "data.eval")):
        rows = load_rows(source, split, key)
        splits[split] = datasets.Dataset.from_dict(tokenize_rows(rows, tokenizer, cfg.max_length, key))
    full_train = len(splits["train"])
    keep = max(1, round(cfg.search_fraction * full_train))
    splits["search_train"] = splits["train"].shuffle(seed=seed).select(range(keep))
    splits["eval"] = splits["eval"].shuffle(seed=seed).select(range(min(cfg.eval_examples, len(splits["eval"]))))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    info = {"train_rows": full_train, "search_train_rows": keep, "eval_rows": len(splits["eval"]), "pad_token_id": pad}
    return splits, info


def save_splits(splits: dict, out_dir: Path) -> None:
    with atomic_dir(out_dir) as partial:
        for name, split in splits.items():
            split.save_to_disk(str(partial / name))


_loaded: dict = {}


def load_split(data_dir: str, name: str) -> list[tuple[list[int], list[int]]]:
    """A tokenized split as (input_ids, labels) pairs, read once per worker process;
    `data_dir` is a directory or a storage URI (downloaded once per node)."""
    key = (data_dir, name)
    if key not in _loaded:
        import datasets

        split = datasets.load_from_disk(str(_local_data_dir(data_dir) / name))
        _loaded[key] = list(zip(split["input_ids"], split["labels"]))
    return _loaded[key]


def _local_data_dir(data_dir: str) -> Path:
    """`data_dir` itself, or for a URI (`s3://...`, a run kept in object storage) its copy
    in this node's cache, downloaded once."""
    if not is_uri(data_dir):
        return Path(data_dir)
    return local_copy(data_dir, cache_root() / "data")


def collate(examples, pad_id: int, device) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padding is masked out of attention and loss."""
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (x, y) in enumerate(examples):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> list[int]:
    """The example indices of optimizer step `step` (0-based): a fresh seeded permutation
    per epoch, so the data order depends only on the seed and the step (a resumed trial
    sees exactly the batches it would have seen)."""
    per_epoch = max(1, n // batch_size)
    epoch, k = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    if n < batch_size:
        return [order[i % n].item() for i in range(batch_size)]
    return order[k * batch_size : (k + 1) * batch_size].tolist()
