"""Seconds per eager train step of the embedded default on the CPU: logits over every position
against the answer positions only (`trainables.step.answer_logits`), with one torch thread and
with two, and with two threads in each of two processes at once (what `trainables.cores`
avoids). The default's data, SmolLM2-135M in float32, all_linear r32 RSLoRA, batches of 8 as
the search's steps; the loss of each variant is printed beside its time (they agree).

    PYTHONPATH=$PWD python bench/cpu_step.py [--steps 6] [--out bench/results/cpu_step.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def measure(threads: int, answer_only: bool, steps: int) -> dict:
    """One variant in this process: the mean seconds of `steps` forward and backward passes."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from search.config import load
    from search.inputs.prepare import prepare_data
    from trainables.data import batch_indices, collate
    from trainables.model import smollm2_checkpoint
    from trainables.step import answer_loss

    torch.set_num_threads(threads)
    config = load(ROOT / "configs" / "default.yaml")
    path = smollm2_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(path)
    splits, _ = prepare_data(config, tokenizer)
    train = list(zip(splits["search_train"]["input_ids"], splits["search_train"]["labels"]))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=32, lora_alpha=32, target_modules="all-linear", use_rslora=True))
    batches = [collate([train[i] for i in batch_indices(len(train), config.budget.batch_size, 0, k)],
                       tokenizer.pad_token_id, torch.device("cpu")) for k in range(steps + 1)]
    answer_loss(model, batches[0]["input_ids"], batches[0]["labels"], answer_only=answer_only).backward()  # warm-up
    started = time.perf_counter()
    for batch in batches[1:]:
        loss = answer_loss(model, batch["input_ids"], batch["labels"], answer_only=answer_only)
        loss.backward()
    return {"threads": threads, "answer_only": answer_only, "step_seconds": (time.perf_counter() - started) / steps,
            "last_loss": loss.item()}


def in_processes(threads: int, answer_only: bool, steps: int, processes: int) -> list[dict]:
    """The variant in `processes` processes started together."""
    command = [sys.executable, __file__, "--one", f"{threads},{int(answer_only)}", "--steps", str(steps)]
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(processes)]
    return [json.loads(run.communicate()[0].strip().splitlines()[-1]) for run in runs]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "cpu_step.json"))
    parser.add_argument("--one", default="", help=argparse.SUPPRESS)  # threads,answer_only: one variant, as JSON
    args = parser.parse_args()
    if args.one:
        threads, answer_only = (int(x) for x in args.one.split(","))
        print(json.dumps(measure(threads, bool(answer_only), args.steps)))
        return 0
    results = []
    for threads, answer_only, processes in ((1, False, 1), (1, True, 1), (2, True, 1), (1, True, 2), (2, True, 2)):
        for run in in_processes(threads, answer_only, args.steps, processes):
            results.append({**run, "processes_at_once": processes})
            print(f"{processes} process(es) at once, {threads} thread(s) each, "
                  f"{'answer positions' if answer_only else 'every position'}: {run['step_seconds']:.2f} s a step, "
                  f"loss {run['last_loss']:.7f}")
    Path(args.out).write_text(json.dumps({"steps": args.steps, "results": results}, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
