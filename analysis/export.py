"""Export the picked configuration as PEFT's own `adapter_config.json`."""

import os
import shutil
import tempfile
from pathlib import Path

from peft import LoraConfig

from rundir.files import atomic_path


def export_adapter_config(lora_config: dict, base_model_path: str, out_dir: str | os.PathLike) -> Path:
    """Write `<out_dir>/adapter_config.json` for `LoraConfig(**lora_config)` on `base_model_path`; return its path.

    `lora_config` is used unchanged: it is the dict the trial trained with. The file is PEFT's
    `save_pretrained` output, so `LoraConfig.from_pretrained(out_dir)` loads it; it replaces
    any earlier one atomically, and other files in `out_dir` (adapter weights) are left alone.
    PEFT rejects impossible arguments with its own ValueError.
    """
    config = LoraConfig(**lora_config, base_model_name_or_path=str(base_model_path))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # PEFT writes only into a directory of its own choosing: stage there, then move the file into place
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".adapter_config.") as staging:
        config.save_pretrained(staging)
        with atomic_path(out_dir / "adapter_config.json") as temporary:
            shutil.move(Path(staging) / "adapter_config.json", temporary)
    return out_dir / "adapter_config.json"


WEIGHTS = "adapter_model.safetensors"


def export_retrained_weights(retrain_dir: Path, out_dir: str | os.PathLike) -> Path | None:
    """Copy the adapter weights at the last checkpoint of the retrain trial in `retrain_dir` into
    `out_dir`; return the path, or None when that trial saved none."""
    checkpoints = sorted(retrain_dir.glob("checkpoint_*/adapter/" + WEIGHTS))
    if not checkpoints:
        return None
    target = Path(out_dir) / WEIGHTS
    with atomic_path(target) as temporary:
        shutil.copyfile(checkpoints[-1], temporary)
    return target
