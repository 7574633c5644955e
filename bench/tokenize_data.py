"""Seconds the driver takes to tokenize a run's data (`search.inputs.data.prepare`: both splits,
after `read`), which a new run's first step waits for: on a GPU the shared trainer may take the
GPU only once the data is known to be good. The reference task's data by default.

    PYTHONPATH=$PWD python bench/tokenize_data.py [--repeats 5] [--out FILE] [-- key=value ...]

Each repeat tokenizes the rows read once; the first, which compiles the chat template and warms
the tokenizer, is reported apart."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
FACTS = [f"data.train={ROOT}/bench/data/facts/facts_train.jsonl", f"data.eval={ROOT}/bench/data/facts/facts_eval.jsonl"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="")
    parser.add_argument("overrides", nargs="*", help="config overrides (the reference task's data when none)")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from search.config import load
    from search.inputs.data import prepare, read
    from trainables.model import smollm2_checkpoint

    config = load(None, args.overrides or FACTS)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_checkpoint())
    rows = read(config.data, config.seed)
    seconds = []
    for _ in range(args.repeats + 1):
        started = time.perf_counter()
        _, info = prepare(config.data, tokenizer, config.seed, rows)
        seconds.append(time.perf_counter() - started)
    record = {"benchmark": "tokenize_data", "overrides": args.overrides or FACTS,
              "rows": {"train": info.train.rows, "eval": info.eval.rows}, "first_seconds": round(seconds[0], 3),
              "seconds": [round(s, 3) for s in seconds[1:]], "median_seconds": round(statistics.median(seconds[1:]), 3)}
    print(json.dumps(record, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
