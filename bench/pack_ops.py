"""A packed step on the CPU: the aten operations it dispatches and its time at K slots, and the
batched LoRA product three ways (torch.bmm, torch.einsum, torch.nn.functional.grouped_mm).

    PYTHONPATH=$PWD python bench/pack_ops.py [--slots 1,2,4,8,16] [--out bench/results/pack_ops_cpu.json]

Run from the root of the tree whose `trainables/packed.py` is measured (another checkout's, for a
before and after: `Pack.step` is the same call in both). The model is a random-init Llama of
SmolLM2's layer shapes cut to 2 layers (hidden 576, 9 heads), each slot 2 x 32 tokens, in float32
on one thread; the slots mix ranks 8-32, alpha ratios and RSLoRA (bench/shared_packing.py's)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROWS, TOKENS, REPEATS = 2, 32, 3


def tiny_smollm2():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=2, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=4096, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    model.requires_grad_(False)
    return model


def packed_step(slots: int) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from bench.shared_packing import rows, trial_params
    from trainables.packed import Pack

    model = tiny_smollm2()
    pack = Pack(model, slots, warmup_steps=2, max_steps=100)
    indices = [pack.add(trial_params(k)) for k in range(slots)]
    batches = {}
    for i in indices:
        ids = torch.tensor([r[0] for r in rows(ROWS, TOKENS, model.config.vocab_size, i)])
        batches[i] = (ids, ids)
    pack.step(batches)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        pack.step(batches)
    ops = sum(1 for event in prof.events() if event.name.startswith("aten::"))
    started = time.perf_counter()
    for _ in range(REPEATS):
        pack.step(batches)
    step_ms = 1000 * (time.perf_counter() - started) / REPEATS
    return {"slots": slots, "aten_ops_per_step": ops, "step_ms": round(step_ms, 1),
            "tokens_per_second": round(slots * ROWS * TOKENS / (step_ms / 1000), 1)}


def lora_products(slots: int = 8, tokens: int = 512, features: int = 576, rank: int = 32) -> dict:
    """Forward and backward of the two LoRA products of one layer for `slots` slots, milliseconds."""
    import torch

    x = torch.randn(slots, tokens, features)
    A = torch.randn(slots, rank, features, requires_grad=True)
    B = torch.randn(slots, features, rank, requires_grad=True)
    ways = {
        "bmm": lambda: torch.bmm(torch.bmm(x, A.transpose(1, 2)), B.transpose(1, 2)),
        "einsum": lambda: torch.einsum("ktr,kor->kto", torch.einsum("kti,kri->ktr", x, A), B),
        "grouped_mm": lambda: torch.nn.functional.grouped_mm(torch.nn.functional.grouped_mm(x, A.transpose(1, 2)),
                                                             B.transpose(1, 2)),
    }
    out, best = {}, {}
    for name, product in ways.items():
        try:
            product().sum().backward()
        except RuntimeError as error:
            out[name] = f"fails: {str(error).splitlines()[0]}"
    timed = [name for name in ways if name not in out]
    for _ in range(7):  # interleaved, the fastest round of each: the machine is shared
        for name in timed:
            started = time.perf_counter()
            for _ in range(5):
                ways[name]().sum().backward()
            best[name] = min(best.get(name, float("inf")), 200 * (time.perf_counter() - started))
    return out | {name: round(ms, 2) for name, ms in best.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slots", default="1,2,4,8,16")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    result = {"torch": torch.__version__, "rows": ROWS, "tokens": TOKENS,
              "steps": [packed_step(int(k)) for k in args.slots.split(",")],
              "lora_product_ms_fwd_bwd_k8_512x576_r32": lora_products()}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
