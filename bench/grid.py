"""The hand-made grid (the Trainer anchor), rerun: six LoRA configurations trained one
after another with the Hugging Face Trainer on the reference task, each scored by our own
evaluation on the same 1,200 eval rows the search uses.

    python bench/grid.py [--configs 0,1,2,3,4,5] [--steps 100]

As the anchor: SmolLM2-135M-Instruct, 100 optimizer steps each, micro-batch 2 x gradient
accumulation 4, lr 2e-4, cosine, 10 warm-up steps, bf16; q,v r8 (alpha 16); q,k,v,o r8
(alpha 16); q,k,v,o r16 RSLoRA (alpha 16); all seven r16 RSLoRA (alpha 16); all seven r32
RSLoRA (alpha 32); all seven r16 DoRA + RSLoRA (alpha 16). A device call is limited to 10
minutes and the grid takes longer, so `--configs` runs a part and the results of earlier
parts are kept in bench/results/grid.json (same device only). Each config's GPU-seconds are
its whole wall time: model load, training and the evaluation. When all six are in,
`grid_gpu_seconds` (their sum) and `grid_eval_loss` (the best) go to summary.json.
`--smoke` runs the plumbing on a CPU (fp32, a few steps, a tiny eval) and writes nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
FACTS = ROOT / "bench" / "data" / "facts"
QV = ["q_proj", "v_proj"]
QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL_SEVEN = QKVO + ["gate_proj", "up_proj", "down_proj"]
GRID = [
    ("q,v r8", dict(r=8, lora_alpha=16, target_modules=QV)),
    ("q,k,v,o r8", dict(r=8, lora_alpha=16, target_modules=QKVO)),
    ("q,k,v,o r16 RSLoRA", dict(r=16, lora_alpha=16, use_rslora=True, target_modules=QKVO)),
    ("all-7 r16 RSLoRA", dict(r=16, lora_alpha=16, use_rslora=True, target_modules=ALL_SEVEN)),
    ("all-7 r32 RSLoRA", dict(r=32, lora_alpha=32, use_rslora=True, target_modules=ALL_SEVEN)),
    ("all-7 r16 DoRA+RSLoRA", dict(r=16, lora_alpha=16, use_rslora=True, use_dora=True, target_modules=ALL_SEVEN)),
]


def anchor_trainer(model, model_path: str, train, steps: int, output_dir: str, cuda: bool, callbacks=()):
    """The anchor's Trainer: micro-batch 2 x accumulation 4, lr 2e-4, cosine, 10 warm-up steps,
    bf16 on GPU; padding with end-of-sequence as our trials do, masked out of the loss."""
    from transformers import (
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
    )

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return Trainer(
        model=model,
        args=TrainingArguments(output_dir=output_dir, per_device_train_batch_size=2, gradient_accumulation_steps=4,
                               learning_rate=2e-4, lr_scheduler_type="cosine", warmup_steps=10, bf16=cuda,
                               use_cpu=not cuda, max_steps=steps, logging_steps=1000, save_strategy="no",
                               report_to=[], eval_strategy="no", seed=0, dataloader_num_workers=0),
        train_dataset=train,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
        callbacks=list(callbacks),
    )


def run_config(name: str, lora: dict, model_path: str, splits: dict, pad_token_id: int, steps: int, cuda: bool) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from trainables.data import load_split
    from trainables.evaluation import EvalBudget, evaluate

    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16 if cuda else torch.float32)
    model = get_peft_model(model.to("cuda" if cuda else "cpu"), LoraConfig(task_type="CAUSAL_LM", **lora))
    with tempfile.TemporaryDirectory() as out:
        trainer = anchor_trainer(model, model_path, splits["train"], steps, out, cuda)
        train_started = time.perf_counter()
        trainer.train()
        train_seconds = time.perf_counter() - train_started
    device = torch.device("cuda" if cuda else "cpu")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    eval_rows = load_split(splits["_dir"], "eval")
    evaluation = evaluate(model, eval_rows, pad_token_id, device, autocast, EvalBudget(8 * 8 * 64, 8 * 8 * 64) if cuda else None)
    wall = time.perf_counter() - started
    return {"config": name, "lora": lora, "steps": steps, "train_seconds": train_seconds, "gpu_seconds": wall,
            **evaluation.metrics(), "trainable_params": model.get_nb_trainable_parameters()[0]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="0,1,2,3,4,5")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    import peft
    import torch
    import transformers
    from transformers import AutoTokenizer

    from search.inputs.data import prepare
    from trainables.config import DataConfig
    from trainables.data import save_splits
    from trainables.model import smollm2_checkpoint

    cuda = torch.cuda.is_available() and not args.smoke
    model_path = str(smollm2_checkpoint())
    data = DataConfig(train=str(FACTS / "facts_train.jsonl"), eval=str(FACTS / "facts_eval.jsonl"),
                      eval_examples=8 if args.smoke else 1200)
    with tempfile.TemporaryDirectory() as data_dir:
        splits, info = prepare(data, AutoTokenizer.from_pretrained(model_path), seed=0)
        save_splits(splits, Path(data_dir) / "data")
        splits["_dir"] = str(Path(data_dir) / "data")
        chosen = [int(x) for x in args.configs.split(",")]
        runs = [run_config(*GRID[i], model_path, splits, info.pad_token_id, 3 if args.smoke else args.steps, cuda)
                for i in chosen]
    for run in runs:
        print(json.dumps(run), flush=True)
    if args.smoke:
        return 0
    device = torch.cuda.get_device_name(0)
    path = RESULTS / "grid.json"
    record = json.loads(path.read_text()) if path.exists() else {}
    if record.get("device") != device or record.get("steps") != args.steps:
        record = {"benchmark": "grid", "device": device, "steps": args.steps, "runs": {}}
    record["runs"].update({run["config"]: run for run in runs})
    record["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    record["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__,
                          "peft": peft.__version__, "python": platform.python_version()}
    done = record["runs"]
    if len(done) == len(GRID):
        record["figures"] = {"grid_gpu_seconds": sum(r["gpu_seconds"] for r in done.values()),
                             "grid_eval_loss": min(r["eval_loss"] for r in done.values())}
        summary_path = RESULTS / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
        summary.update(record["figures"])
        summary_path.write_text(json.dumps(summary, indent=2))
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2))
    print(f"\n{'config':<24}{'params':>11}{'eval loss':>11}{'train s':>9}{'GPU s':>8}")
    for run in done.values():
        print(f"{run['config']:<24}{run['trainable_params']:>11,}{run['eval_loss']:>11.4f}{run['train_seconds']:>9.1f}"
              f"{run['gpu_seconds']:>8.1f}")
    print("figures", json.dumps(record.get("figures", f"{len(done)} of {len(GRID)} configs done")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
