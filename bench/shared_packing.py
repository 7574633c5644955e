"""Packed trials on one shared base against one trial alone, on one device (GPU, or the CPU).

    python bench/shared_packing.py [--slots 1,2,4,8,16,32] [--steps 20] [--model smollm2] [--rows 8 --tokens 64]
    python bench/shared_packing.py --random    # SmolLM2-135M's shapes, random init: no model files needed
    python bench/shared_packing.py --llama8b   # Llama-3-8B shapes, random init, bf16, 4 x 512 tokens a trial

With --random or --llama8b it needs torch, transformers and PEFT only (no Ray, Optuna, datasets or
pandas), so a lent GPU machine runs it with nothing staged.

1. One trial as a per-process trial trains it (trainables/trial.py's PEFT model and LoRA+ AdamW,
   trainables/step.py's step: a CUDA graph on GPU, eager on the CPU): training tokens/s.
2. The shared trainer's pack (trainables/packed.py) at K slots, each a different configuration of
   all_linear r16 (rank and alpha vary by slot, as a search's do): aggregate training tokens/s and
   peak memory, its step eager and (on a GPU) captured as a CUDA graph; `shared_packing_speedup`
   is the best K's over (1). On a GPU, first a check: four slots' losses and weights after five
   steps, captured against eager, from the same start.
3. With --llama8b: how many trials fit on the device as processes (one trial's peak memory into
   the device's) and shared (K grows until a step runs out of memory), and their tokens/s.

Every figure is timed after 3 warm-up steps, with the device synchronised. Writes
bench/results/shared_packing[_8b]_<device>.json and updates bench/results/summary.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
from bench.grid import ALL_SEVEN  # noqa: E402 - after the path is set
from rundir.params import Origin, TrialParams  # noqa: E402

WARMUP = 3


def trial_params(k: int, r: int = 16) -> TrialParams:
    """Slot k's configuration: all seven projections, ranks 8-32 and alpha ratios 1-2 by slot."""
    rank = (8, 16, 32)[k % 3] if k else r
    lora = {"r": rank, "lora_alpha": rank * (1 + k % 2), "lora_dropout": 0.0, "target_modules": ALL_SEVEN,
            "use_rslora": bool(k % 2), "use_dora": False, "task_type": "CAUSAL_LM"}
    return TrialParams(lora_config=lora, module_set="all_linear", alpha_ratio=1 + k % 2, learning_rate=2e-4,
                       loraplus_lr_ratio=1.0, seed=k, origin=Origin.SEARCH)


def rows(count: int, tokens: int, vocab: int, seed: int, scored: int = 0):
    """`count` random sequences and their labels: every token, or with `scored` its last that many
    only, as a prompt and its answer."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(3, vocab, (tokens,), generator=g).tolist()
        out.append((ids, [-100] * (tokens - scored) + ids[tokens - scored:] if scored else ids))
    return out


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def alone(model, device, steps: int, batch: int, tokens: int, scored: int = 0) -> dict:
    """One trial as its own process trains it."""
    import torch
    from peft import LoraConfig, get_peft_model

    from trainables.optim import loraplus_adamw
    from trainables.step import TrainStep

    params = trial_params(0)
    torch.manual_seed(0)
    peft = get_peft_model(model, LoraConfig(**params.lora_config))
    optimizer = loraplus_adamw(peft, params.learning_rate, 1.0, device.type == "cuda")
    data = rows(batch * 4, tokens, model.config.vocab_size, 0, scored)
    step = TrainStep(peft, data, batch, 0, steps + WARMUP, 0, device, cuda_graph=True)
    for k in range(WARMUP):
        step(k)
        optimizer.step()
    sync(device)
    started = time.perf_counter()
    for k in range(WARMUP, WARMUP + steps):
        step(k)
        optimizer.step()
    sync(device)
    seconds = time.perf_counter() - started
    step.close()
    del optimizer
    peft.unload()
    return {"tokens_per_second": steps * batch * tokens / seconds, "step_mode": step.mode,
            "peak_memory_gb": peak_gb(device)}


def new_pack(model, device, slots: int, steps: int, batch: int, tokens: int, graph: bool, compiled: bool = False,
             scored: int = 0, dropout: float = 0.0, layers: bool = False):
    """A pack of `slots` trials, each with LoRA dropout `dropout`, and each one's batch (on the
    host, as the shared trainer gives them); with `layers`, its decoder layers compiled too."""
    import dataclasses

    import torch

    from trainables.packed import Pack

    pack = Pack(model, slots, warmup_steps=2, max_steps=steps + WARMUP, max_rank=32, cuda_graph=graph,
                compile_backend="inductor" if compiled else None)
    pack.compile_layers = layers
    configs = (trial_params(k) for k in range(slots))
    indices = [pack.add(dataclasses.replace(p, lora_config={**p.lora_config, "lora_dropout": dropout}))
               for p in configs]
    data = {i: rows(batch, tokens, model.config.vocab_size, i, scored) for i in indices}
    batches = {i: (torch.tensor([r[0] for r in data[i]]), torch.tensor([r[1] for r in data[i]])) for i in indices}
    return pack, batches


def packed(model, device, slots: int, steps: int, batch: int, tokens: int, graph: bool, compiled: bool = False,
           scored: int = 0, layers: bool = False) -> dict:
    """`slots` trials in one pack, each with its own batch each step."""
    from trainables.packed import unpack

    reset_peak(device)
    pack, batches = new_pack(model, device, slots, steps, batch, tokens, graph, compiled, scored, layers=layers)
    autocast = bf16(device)
    started = time.perf_counter()
    for _ in range(WARMUP):
        pack.step(batches, autocast)
    sync(device)
    first_steps = time.perf_counter() - started  # the capture, and the compile where there is one
    started = time.perf_counter()
    for _ in range(steps):
        pack.step(batches, autocast)
    sync(device)
    seconds = time.perf_counter() - started
    result = {"slots": slots, "step_mode": pack.step_mode, "tokens_per_second": steps * slots * batch * tokens / seconds,
              "step_ms": 1000 * seconds / steps, "pass_slots": pack.pass_slots,
              "warmup_seconds": first_steps, "peak_memory_gb": peak_gb(device)}
    pack.captured = None
    unpack(model)
    if compiled:
        import torch

        torch.compiler.reset()  # each pack size compiles anew: no guard of an earlier size to fail first
    return result


def bf16(device):
    import torch

    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None


def graph_check(model, device, batch: int, tokens: int, steps: int = 5) -> dict:
    """Four slots trained `steps` steps eagerly and captured, from the same start: the largest
    differences of their losses and weights."""
    from trainables.packed import unpack

    runs = []
    for graph in (False, True):
        pack, batches = new_pack(model, device, 4, steps, batch, tokens, graph)
        losses = [pack.step(batches, bf16(device)) for _ in range(steps)]
        runs.append(([float(step[i]) for step in losses for i in sorted(step)], {i: pack.adapter_state(i) for i in pack.slots},
                     pack.step_mode))
        pack.captured = None
        unpack(model)
    (eager_losses, eager_weights, _), (graph_losses, graph_weights, mode) = runs
    loss_diff = max(abs(a - b) for a, b in zip(eager_losses, graph_losses))
    weight_diff = max(float((graph_weights[i][k] - w).abs().max()) for i in eager_weights for k, w in eager_weights[i].items())
    return {"step_mode": mode, "steps": steps, "largest_loss_difference": loss_diff,
            "largest_weight_difference": weight_diff, "eager_losses": eager_losses, "graph_losses": graph_losses}


def peak_gb(device) -> float:
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_reserved() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def reset_peak(device) -> None:
    import gc

    import torch

    gc.collect()  # a pack and its layers refer to each other: only the collector frees the last one's tensors
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def load(args, device):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from trainables.model import local_model_dir

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.llama8b or args.random:
        # the config.json shapes of Llama-3-8B or SmolLM2-135M; random weights: a step costs the same
        shapes = (dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)
                  if args.llama8b else
                  dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                       num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
                       tie_word_embeddings=True))
        config = AutoConfig.for_model("llama", **shapes)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(local_model_dir(args.model), dtype=dtype).to(device)
    model.requires_grad_(False)
    model.config.use_cache = False
    return model


def main() -> None:
    import torch

    parser = argparse.ArgumentParser()
    parser.add_argument("--slots", default="1,2,4,8,16,32")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--rows", type=int, default=None, help="sequences per trial and step (8; 4 with --llama8b)")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per sequence (64; 512 with --llama8b)")
    parser.add_argument("--llama8b", action="store_true")
    parser.add_argument("--random", action="store_true", help="SmolLM2-135M's shapes with random weights")
    parser.add_argument("--scored", type=int, default=0, help="tokens scored per sequence, its last ones, as an "
                        "answer after its prompt; 0: every token (the summary's figures); another value writes its own file")
    parser.add_argument("--modes", default="eager,cuda_graph,compiled",
                        help="the pack's step modes to time (cuda_graph; compiled: torch.compile, then captured; "
                             "compiled_layers: its decoder layers compiled too; GPU only)")
    args = parser.parse_args()
    batch = args.rows or (4 if args.llama8b else 8)
    tokens = args.tokens or (512 if args.llama8b else 64)
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    model = load(args, device)
    reset_peak(device)
    single = alone(model, device, args.steps, batch, tokens, args.scored)
    print(f"one trial alone: {single['tokens_per_second']:,.0f} tokens/s ({single['step_mode']}), "
          f"{single['peak_memory_gb']:.2f} GB", flush=True)
    check = None
    modes = [m for m in args.modes.split(",") if m == "eager" or device.type == "cuda"]
    if "cuda_graph" in modes and not args.llama8b:
        check = graph_check(model, device, batch, tokens)
        print(f"captured against eager, 4 slots, {check['steps']} steps ({check['step_mode']}): largest loss difference "
              f"{check['largest_loss_difference']:.3g}, largest weight difference {check['largest_weight_difference']:.3g}",
              flush=True)
    curves = {}
    for mode in modes:
        curve = curves[mode] = []
        for slots in [int(s) for s in args.slots.split(",")]:
            try:
                point = packed(model, device, slots, args.steps, batch, tokens, graph=mode != "eager",
                               compiled=mode.startswith("compiled"), scored=args.scored,
                               layers=mode == "compiled_layers")
            except Exception as error:  # noqa: BLE001 - a pack that does not fit ends the curve, and says why
                print(f"{mode} K={slots}: {type(error).__name__}: {str(error)[:200]}", flush=True)
                reset_peak(device)
                break
            curve.append(point)
            speedup = point["tokens_per_second"] / single["tokens_per_second"]
            print(f"{mode} K={slots}: {point['tokens_per_second']:,.0f} tokens/s ({speedup:.2f}x, {point['step_mode']}), "
                  f"{point['step_ms']:.1f} ms a step, {point['peak_memory_gb']:.2f} GB, pass of {point['pass_slots']}, "
                  f"first {WARMUP} steps {point['warmup_seconds']:.1f} s",
                  flush=True)
    curve = max(curves.values(), key=lambda c: max((p["tokens_per_second"] for p in c), default=0))
    best = max(curve, key=lambda p: p["tokens_per_second"]) if curve else None
    name = "gpu" if device.type == "cuda" else "cpu"
    result = {
        "date": datetime.date.today().isoformat(),
        "device": (torch.cuda.get_device_name(0) if device.type == "cuda"
                   else f"{platform.processor() or 'cpu'}, {torch.get_num_threads()} threads"),
        "torch": torch.__version__, "model": "llama-3-8b shapes, random" if args.llama8b else args.model,
        "rows_per_trial": batch, "tokens_per_row": tokens, "scored_per_row": args.scored or tokens, "steps": args.steps,
        "alone": single, "packed": curve, "curves": curves, "graph_check": check,
        "best_mode": best["step_mode"] if best else None,
        "shared_packing_speedup": best["tokens_per_second"] / single["tokens_per_second"] if best else None,
        "best_slots": best["slots"] if best else None,
    }
    if args.llama8b:
        total = torch.cuda.get_device_properties(0).total_memory / 2**30 if device.type == "cuda" else None
        result["processes_that_fit"] = int(total // single["peak_memory_gb"]) if total else None
        result["shared_slots_that_fit"] = curve[-1]["slots"] if curve else 0
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"shared_packing{'_8b' if args.llama8b else ''}{f'_scored{args.scored}' if args.scored else ''}_{name}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    if device.type == "cuda" and not args.scored:  # the summary holds the GPU figures the issue names
        summary_path = RESULTS / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
        if args.llama8b:
            summary["shared_8b_trials"] = {k: result[k] for k in ("processes_that_fit", "shared_slots_that_fit")}
            at16 = next((p for p in curve if p["slots"] == 16), None)
            summary["shared_8b_k16_over_alone"] = at16["tokens_per_second"] / single["tokens_per_second"] if at16 else None
        else:
            summary["shared_packing_speedup"] = result["shared_packing_speedup"]
            summary["shared_packing_memory_gb"] = next((p["peak_memory_gb"] for p in curve if p["slots"] == 8), None)
        summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
