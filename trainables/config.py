"""The settings a trial consumes, kept beside the trial so a worker unpickles them
without importing the driver. `search.config` composes them with the rest.

Each user-facing dataclass has `problems()`: every human-readable reason it is invalid,
so the loader can report all problems at once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZATIONS = ("none", "4bit")
BUILTIN_PREFIX = "builtin:"


def cache_root() -> Path:
    """This machine's cache ($LORA_SEARCH_CACHE, else ~/.cache/lora-search): the converted
    embedded model, data read from a URI, and the working copies of runs kept at a URI."""
    return Path(os.environ.get("LORA_SEARCH_CACHE", Path.home() / ".cache" / "lora-search"))


@dataclass
class ModelConfig:
    path: str = field(default="smollm2", metadata={"help": "'smollm2' (embedded default), a local directory, or a hub id already in the local cache"})
    dtype: str = field(default="auto", metadata={"help": "auto: bfloat16 on GPU, float32 on CPU"})
    quantization: str = field(default="none", metadata={"help": "none, or 4bit (bitsandbytes NF4, CUDA only)"})
    trust_remote_code: bool = field(default=False, metadata={"help": "run the model repository's own code; off unless you trust it"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in the backward pass: less memory for large models, about a third more compute; steps then run eagerly"})

    def problems(self) -> list[str]:
        out = []
        if not self.path:
            out.append("model.path is empty; allowed: 'smollm2', a local directory, or a cached hub id")
        if self.dtype not in DTYPES:
            out.append(f"model.dtype is {self.dtype!r}; allowed: {', '.join(DTYPES)}")
        if self.quantization not in QUANTIZATIONS:
            out.append(f"model.quantization is {self.quantization!r}; allowed: {', '.join(QUANTIZATIONS)}")
        return out


@dataclass
class DataConfig:
    train: str = field(default="builtin:atlas", metadata={"help": "'builtin:atlas', a local JSONL/Parquet/CSV file, or a cached hub dataset id"})
    eval: str = field(default="builtin:atlas", metadata={"help": "same forms as train; with a builtin task, its held-out split"})
    max_length: int = field(default=128, metadata={"help": "tokens per example; longer examples are truncated"})
    search_fraction: float = field(default=1.0, metadata={"help": "share of the training data that search trials use; a retrain of the pick uses all"})
    eval_examples: int = field(default=32, metadata={"help": "eval examples scored at each eval round (the same ones every round and trial)"})

    def problems(self) -> list[str]:
        out = []
        if self.max_length < 8:
            out.append(f"data.max_length is {self.max_length}; allowed: an integer >= 8")
        if not 0 < self.search_fraction <= 1:
            out.append(f"data.search_fraction is {self.search_fraction}; allowed: a number in (0, 1]")
        if self.eval_examples < 1:
            out.append(f"data.eval_examples is {self.eval_examples}; allowed: an integer >= 1")
        for key in ("train", "eval"):
            value = getattr(self, key)
            if not value:
                out.append(f"data.{key} is empty; allowed: 'builtin:atlas', a local file, or a cached hub dataset id")
        return out


@dataclass(frozen=True)
class TrialSetup:
    """Everything a trial needs besides its sampled parameters; handed to Tune once
    through `tune.with_parameters`, so it travels by object reference, not per trial."""

    model_path: str          # 'smollm2', a hub id in each node's cache, or a directory every node sees
    dtype: str               # resolved: float32, bfloat16 or float16
    quantization: str
    trust_remote_code: bool
    data_dir: str            # tokenized train/eval splits written by the driver (datasets.save_to_disk)
    max_steps: int
    eval_every: int
    batch_size: int
    cpu_threads: int
    warmup_steps: int
    total_params: int        # the base model's parameter count, for trainable_pct
    pad_token_id: int
    gradient_checkpointing: bool = False
    cuda_graphs: bool = True  # capture each trial's train step as a CUDA graph on GPU (trainables/step.py)
    compile: bool = False  # on GPU, torch.compile the train step instead (trainables/step.py)
