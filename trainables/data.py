"""The tokenized data as a trial reads it: the splits the driver wrote (`search.inputs.data`), one
format written and read here, memory-mapped once per worker process, batched in a seeded order."""

from __future__ import annotations

from pathlib import Path

import torch

from rundir.files import atomic_dir, is_uri, local_copy
from trainables.config import cache_root

IGNORE = -100  # the label of a token without loss: PyTorch's cross-entropy ignore_index


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
