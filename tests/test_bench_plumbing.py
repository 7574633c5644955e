"""The GPU benchmarks are not tests, but their plumbing must not rot between device sessions:
each parses its arguments, and the grid (the Trainer anchor plus our evaluation) runs end to
end in its CPU smoke mode on the embedded default."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "bench").glob("*.py")))
def test_every_benchmark_parses_its_arguments(script):
    result = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout


def test_the_grid_runs_end_to_end_in_smoke_mode(smollm2_dir):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "grid.py"), "--smoke", "--configs", "0"],
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = [json.loads(line) for line in result.stdout.splitlines() if line.startswith('{"')]
    assert run["config"] == "q,v r8" and run["trainable_params"] == 460_800  # the anchor's count
    assert 0 < run["eval_loss"] < 20 and 0 <= run["eval_accuracy"] <= 1
