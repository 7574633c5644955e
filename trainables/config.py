"""The settings a trial consumes, kept beside the trial so a worker unpickles them
without importing the driver. `search.config` composes them with the rest.

Each user-facing dataclass has `problems()`: every human-readable reason it is invalid,
so the loader can report all problems at once.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZATIONS = ("none", "4bit")
BUILTIN_PREFIX = "builtin:"
# data.eval's default: the train source's own eval split, else rows held out of data.train
AUTO_EVAL = "auto"
# auto: chat where the tokenizer has a chat template; plain: prompt tokens, then completion tokens
TEMPLATES = ("auto", "chat", "plain")
# the row fields a data.columns mapping may name, in the formats that use them
ROW_FIELDS = ("messages", "prompt", "completion", "instruction", "input", "output", "text", "conversations")
# the roles of a chat turn, and the role names that ShareGPT data uses for them, mapped as LLaMA-Factory maps them
CHAT_ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
# data.train_turns: the assistant turns of a chat row that carry loss
TRAIN_TURNS = ("all", "last")
# data.eval_examples: every eval row
ALL_EVAL = "all"
# data files by suffix, and the `datasets` builder that reads each
DATA_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
# huggingface_hub's repo id shape: a name, or a namespace and a name
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


# How long Tune waits for a worker's last trial thread to end before it gives the worker the next trial
REUSE_WAIT_S = "30"


def let_tune_wait_for_the_last_trial() -> None:
    """Let Tune wait up to REUSE_WAIT_S for this worker's trial thread to end before reusing the
    worker, unless the user set TUNE_FUNCTION_THREAD_TIMEOUT_S: Ray's 2 s fail the next trial where
    a stopped trial's thread takes longer to unwind, as it can on a loaded machine."""
    # Set in the worker, not by search.environment: Tune reads it here, and a joined cluster's workers lack the driver's environment
    os.environ.setdefault("TUNE_FUNCTION_THREAD_TIMEOUT_S", REUSE_WAIT_S)


def cache_root() -> Path:
    """This machine's cache ($LORA_SEARCH_CACHE, else ~/.cache/lora-search): the converted
    embedded model, data read from a URI, and the working copies of runs kept at a URI."""
    return Path(os.environ.get("LORA_SEARCH_CACHE", Path.home() / ".cache" / "lora-search"))


def looks_local(reference: str) -> bool:
    """Whether a model or data reference names a local path rather than a hub id: it exists,
    starts with '.', '/' or '~', is not shaped like a hub id (one '/' at most), ends in a data
    file suffix, or its first part is an existing directory (`models/tiny-llama` beside a
    `models/` directory). A local reference never reaches the hub, so a typo in it is "does
    not exist" at once rather than a hub lookup."""
    path = Path(reference)
    if path.exists() or reference.startswith((".", "/", "~")) or not _HUB_ID.match(reference):
        return True
    namespace, slash, _ = reference.partition("/")
    return path.suffix.lower() in DATA_FILE_BUILDERS or bool(slash and Path(namespace).is_dir())


def relative_to_cwd(path: Path) -> str:
    """" (relative to <cwd>)" for a relative path, to say where it was looked for; else ""."""
    return "" if path.is_absolute() else f" (relative to {Path.cwd()})"


@dataclass
class ModelConfig:
    path: str = field(default="smollm2", metadata={"help": "'smollm2' (embedded default), a local directory, or a hub id already in the local cache"})
    tokenizer: str = field(default="", metadata={"help": "a tokenizer directory or cached hub id, for a model saved without one; empty: model.path's own"})
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
    train: str = field(default="builtin:atlas", metadata={"help": "'builtin:atlas'; a .jsonl, .json, .csv, .parquet or .txt file; a datasets.save_to_disk directory; or a dataset id in the local datasets cache"})
    eval: str = field(default=AUTO_EVAL, metadata={"help": "auto: data.train's own eval split (validation, test), else data.eval_fraction of its rows held out; or the same forms as train"})
    eval_fraction: float = field(default=0.1, metadata={"help": "with data.eval auto and no eval split in data.train: the share of its rows held out for eval (at least 1 row), chosen by seed"})
    columns: dict[str, str] = field(default_factory=dict, metadata={"help": "the data's column names for the row fields it lacks, e.g. {prompt: question, completion: answer}"})
    roles: dict[str, str] = field(default_factory=dict, metadata={"help": "chat rows: the data's own role names, each mapped to system, user or assistant, e.g. {bot: assistant}; ShareGPT's human and gpt are known"})
    template: str = field(default="auto", metadata={"help": "chat: the tokenizer's chat template; plain: each turn's text, data.separator between, answers end in EOS; auto: chat where the tokenizer has one"})
    separator: str = field(default="\n", metadata={"help": "plain template: the text between one turn and the next (between a prompt and its completion too); an answer's EOS comes before it"})
    train_turns: str = field(default="all", metadata={"help": "the assistant turns of a chat row that carry loss: all (as TRL's assistant-only loss) or last (the final answer; earlier turns are context)"})
    keep_empty_answers: bool = field(default=False, metadata={"help": "false: a row whose trained answers are all empty is dropped and counted (an empty earlier turn carries no loss); true: train on them"})
    max_length: int = field(default=128, metadata={"help": "tokens per example; longer examples are truncated"})
    search_fraction: float = field(default=1.0, metadata={"help": "share of the training data that search trials use; a retrain of the pick uses all"})
    eval_examples: int | str = field(default=32, metadata={"help": "eval rows scored at each eval round, chosen by a shuffle seeded by seed (the same ones every round and trial); all: every eval row"})
    eval_generate_examples: int = field(default=32, metadata={"help": "of those, the ones whose answers are generated (greedy) for eval_exact_match at the full budget; 0: off"})

    def problems(self) -> list[str]:
        out = []
        if self.max_length < 8:
            out.append(f"data.max_length is {self.max_length}; allowed: an integer >= 8")
        if not 0 < self.search_fraction <= 1:
            out.append(f"data.search_fraction is {self.search_fraction}; allowed: a number in (0, 1]")
        if self.eval_examples != ALL_EVAL and not (isinstance(self.eval_examples, int) and self.eval_examples >= 1):
            out.append(f"data.eval_examples is {self.eval_examples!r}; allowed: an integer >= 1, or {ALL_EVAL} (every eval row)")
        if self.train_turns not in TRAIN_TURNS:
            out.append(f"data.train_turns is {self.train_turns!r}; allowed: {', '.join(TRAIN_TURNS)}")
        bad_roles = {name: role for name, role in self.roles.items() if role not in CHAT_ROLES or not name}
        if bad_roles:
            out.append(f"data.roles maps {bad_roles}; allowed: the data's role names, each mapped to "
                       f"{', '.join(CHAT_ROLES)}, e.g. {{bot: assistant, customer: user}}")
        if self.eval_generate_examples < 0:
            out.append(f"data.eval_generate_examples is {self.eval_generate_examples}; allowed: an integer >= 0 (0: off)")
        if not 0 < self.eval_fraction < 1:
            out.append(f"data.eval_fraction is {self.eval_fraction}; allowed: a number in (0, 1)")
        if self.template not in TEMPLATES:
            out.append(f"data.template is {self.template!r}; allowed: {', '.join(TEMPLATES)}")
        unknown = sorted(set(self.columns) - set(ROW_FIELDS))
        if unknown:
            out.append(f"data.columns names {unknown}; allowed keys: {', '.join(ROW_FIELDS)} (the row fields), "
                       f"each mapped to a column of the data, e.g. {{prompt: question, completion: answer}}")
        for key in ("train", "eval"):
            value = getattr(self, key)
            if not value:
                out.append(f"data.{key} is empty; allowed: 'builtin:atlas', a local file or save_to_disk directory, "
                           f"or a cached hub dataset id" + (", or auto" if key == "eval" else ""))
        return out


@dataclass(frozen=True)
class BaseSpec:
    """What loading a trial's base model reads (`TrialSetup.base`): known before the run's data,
    so that a shared trainer's process can load its model while the driver prepares the rest
    (trainables/host.py)."""

    model_path: str
    dtype: str
    quantization: str
    trust_remote_code: bool
    gradient_checkpointing: bool
    cpu_threads: int


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
    max_rank: int = 1        # the space's largest rank: a shared trainer sizes its stacked adapters for it once
    dropout: bool = False    # some trial may have LoRA dropout: a shared trainer draws its masks from the start
    # the target_modules of the space's module sets that a shared trainer packs: it makes their
    # layers and captures its step before the first trial opens (Pack.prepare)
    module_sets: tuple[tuple[str, ...], ...] = ()
    cuda_graphs: bool = True  # capture each trial's train step as a CUDA graph on GPU (trainables/step.py)
    compile: bool = False  # on GPU, torch.compile the train step instead (trainables/step.py)
    compile_layers: bool = False  # a shared trainer's compiled step compiles the decoder layers too (Pack.compile_layers)
    generate_examples: int = 0  # eval rows whose answers are generated (trainables/generate.py); 0: none
    # Generating answers costs several times a loss evaluation (on an H200, 256 rows took 2.4x the
    # search's training time, bench/results/h200-2026-12-01-generate256/), so it runs at every eval round
    # only when the selecting metric needs it (ASHA decides on it), else once, at the full budget,
    # where the pick compares trials.
    generate_every_round: bool = False
    tokenizer: str = ""         # decodes those answers: a reference as model_path is, resolved on the trial's node; "": model_path's
    metric_function: str = ""   # the user's `module:function` that selection.metric names, reported under that name; "": none
    # the widest row of the training splits and the most positions a row scores (trainables.step.widest),
    # as the driver counted them: a shared trainer prepares its capture for them before it reads the
    # splits itself; (0, 0): not counted (a resumed run), it reads them first
    widest_rows: tuple[int, int] = (0, 0)

    @property
    def base(self) -> BaseSpec:
        return BaseSpec(self.model_path, self.dtype, self.quantization, self.trust_remote_code,
                        self.gradient_checkpointing, self.cpu_threads)
