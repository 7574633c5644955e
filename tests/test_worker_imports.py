"""What a new trial worker imports before its first step: bitsandbytes only where the search
quantizes. Each case runs in a fresh interpreter (a worker's imports happen once per process),
with a stand-in `bitsandbytes` on the path that leaves a mark when something imports it, so
the tests mean the same with or without the real package installed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

TRAIN_A_LORA = """
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from peft import LoraConfig, get_peft_model
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, vocab_size=64))
model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj", "down_proj"]))
ids = torch.tensor([[1, 5, 9, 3]])
model(input_ids=ids, labels=ids).loss.backward()
assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
"""


def _worker(tmp_path: Path, before_peft: str, then: str = "import peft") -> tuple[subprocess.CompletedProcess, bool]:
    """Run `before_peft` then `then` in a new interpreter; also say whether it imported bitsandbytes."""
    fake = tmp_path / "site" / "bitsandbytes"
    fake.mkdir(parents=True, exist_ok=True)
    (fake / "__init__.py").write_text("import os\nopen(os.environ['FAKE_BNB_MARKER'], 'w').close()\n"
                                      "raise ImportError('stand-in bitsandbytes')\n")
    marker = tmp_path / "bitsandbytes-was-imported"
    marker.unlink(missing_ok=True)
    env = {**os.environ, "FAKE_BNB_MARKER": str(marker),
           "PYTHONPATH": os.pathsep.join([str(fake.parent), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    code = f"{before_peft}\n{then}\n"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    return done, marker.exists()


def test_peft_imports_bitsandbytes_when_nothing_hides_it(tmp_path):
    """The premise: a worker that imports PEFT pays for bitsandbytes wherever it is installed."""
    done, imported = _worker(tmp_path, "")
    assert done.returncode == 0, done.stderr
    assert imported


def test_a_worker_of_an_unquantized_search_never_imports_bitsandbytes_and_trains_a_lora(tmp_path):
    hide = ("from trainables.model import hide_bitsandbytes_unless_needed\n"
            "assert hide_bitsandbytes_unless_needed('none', False)")
    done, imported = _worker(tmp_path, hide, TRAIN_A_LORA)
    assert done.returncode == 0, done.stderr
    assert not imported


@pytest.mark.parametrize("quantization, trust_remote_code, imported_first", [
    ("4bit", False, ""),  # QLoRA needs it
    ("none", True, ""),  # a model's own code may import it unguarded
    ("none", False, "import transformers"),  # transformers may already have decided it is there
])
def test_bitsandbytes_stays_importable_where_it_may_be_needed(tmp_path, quantization, trust_remote_code, imported_first):
    hide = (f"{imported_first}\nfrom trainables.model import hide_bitsandbytes_unless_needed\n"
            f"assert not hide_bitsandbytes_unless_needed({quantization!r}, {trust_remote_code})")
    done, imported = _worker(tmp_path, hide)
    assert done.returncode == 0, done.stderr
    assert imported
