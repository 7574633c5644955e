"""What a shared trainer's process gains by making inductor's one-time setup while it waits for the
driver's go (`trainables.packed.warm_inductor`), measured on this machine's CPU as a stand-in for the
pack's first compile: in fresh processes, alternated, the seconds to compile and train a small
function (a Linear, SiLU, a mean: forward and backward through inductor) after the warm-up and
without it, each from inductor's cache (a first round fills it and is left out; its warm-up, from an
empty cache of the bench's own, is `warm_up_empty_cache_seconds`).

    PYTHONPATH=$PWD python bench/warm_inductor.py [--rounds 3] [--out FILE]

The pack's own preparing on a GPU, with and without the warm-up: `bench/start_profile.py [--warm]`."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHILD = """
import json, sys, time
import torch
from trainables.packed import warm_inductor
warmed = warm_inductor() if sys.argv[1] == "warm" else None
linear = torch.nn.Linear(16, 16)
started = time.perf_counter()
step = torch.compile(lambda x: torch.nn.functional.silu(linear(x)).pow(2).mean(), backend="inductor", dynamic=False)
step(torch.randn(8, 16)).backward()
print(json.dumps({"warm_up_seconds": warmed, "compile_seconds": time.perf_counter() - started}))
"""


def run(mode: str, cache: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "TORCHINDUCTOR_CACHE_DIR": cache})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        first = run("warm", cache)  # from an empty cache, which it fills; then the function's own compile
        run("cold", cache)
        rounds = [{mode: run(mode, cache) for mode in ("warm", "cold")} for _ in range(args.rounds)]
    record = {"benchmark": "warm_inductor", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "warm_up_empty_cache_seconds": first["warm_up_seconds"],
              "compile_after_warm_up_seconds": [r["warm"]["compile_seconds"] for r in rounds],
              "warm_up_seconds": [r["warm"]["warm_up_seconds"] for r in rounds],
              "compile_without_seconds": [r["cold"]["compile_seconds"] for r in rounds]}
    print(json.dumps(record, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
