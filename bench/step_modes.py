"""The trial's train step on one GPU, eager against CUDA graph, on two models:

    python bench/step_modes.py [--out bench/results/step_modes.json]

1. SmolLM2-135M shapes (random init, bf16), 8 sequences of 64 tokens (loss on the last 32),
   the trial's own step (`trainables.step.TrainStep`) and fused AdamW: plain LoRA (q,v r8;
   all seven projections r16 RSLoRA) and DoRA (all seven r16), each eager and as a CUDA graph.
   The graph's capture time is measured and reported beside its step time: it is paid once
   per trial. Gives `dora_step_time_ratio` (DoRA over plain LoRA, same rank and modules).
2. A Llama-shaped 1.1B model (TinyLlama's shapes: hidden 2048, 22 layers, MLP 5632, vocab
   32000), all seven projections r16, at batches that fill the GPU: `mfu_1b`, counting
   4 x (non-embedding parameters) FLOPs per token (forward, and backward to the inputs only:
   the base is frozen) plus 12 x layers x sequence x hidden for attention, against the GPU's
   dense bf16 peak.
3. The same 1.1B model's peak memory for one training step at 8 x 512 tokens, bf16 base
   against bitsandbytes NF4 (QLoRA): `bf16_peak_memory_gb`, `qlora_peak_memory_gb`.

Each part is recorded as it finishes (a failure is recorded with its error, never
skipped). Prints a short table last; writes the JSON and updates bench/results/summary.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
from bench.grid import ALL_SEVEN  # noqa: E402 - after the path is set

# dense bf16 tensor-core peak (no sparsity), from NVIDIA's data sheets
DEVICE = "cuda"  # a CPU smoke run of the script's plumbing sets "cpu"
PEAK_BF16 = {"H100 80GB HBM3": 989.4e12, "H100 PCIe": 756.0e12, "H200": 989.4e12, "H100 NVL": 835.0e12}


def peak_flops(name: str) -> float:
    for key, value in PEAK_BF16.items():
        if key in name:
            return value
    raise ValueError(f"no bf16 peak known for {name!r}")


def smollm2_config():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                       num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=8192,
                       rope_theta=100000.0, pad_token_id=2)


def llama_1b_config():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                       num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False,
                       max_position_embeddings=4096, pad_token_id=0)


def rows(n: int, length: int, vocab: int, answer_from: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        out.append((ids, [-100] * answer_from + ids[answer_from:]))
    return out


def adapted(model_config, lora_kwargs: dict, base=None):
    """(device, model): `base`, or a random-init bf16 model of `model_config` built on the
    device, frozen, with a PEFT adapter of `lora_kwargs`, in train mode (seeded)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    device = torch.device(DEVICE, 0) if DEVICE == "cuda" else torch.device(DEVICE)
    torch.manual_seed(0)
    if base is None:
        with device:
            base = AutoModelForCausalLM.from_config(model_config, dtype=torch.bfloat16)
    base.requires_grad_(False)
    base.config.use_cache = False
    model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", **lora_kwargs))
    model.train()
    return device, model


def time_steps(model_config, lora_kwargs: dict, batch: int, length: int, cuda_graph: bool, steps: int,
               base=None, compiled: bool = False) -> dict:
    """One trial's steps: build the adapter, capture (or not), time `steps` optimizer steps
    after 3 untimed ones. Returns ms per step, capture seconds, the 3 untimed steps' seconds
    (a compiled step compiles in them), tokens/s, peak memory. `compiled`: the trial's
    compiled step (`resources.compile`: torch.compile, inductor) instead of eager or graph."""
    import torch

    from trainables.step import TrainStep

    device, model = adapted(model_config, lora_kwargs, base)
    data = rows(max(64, 4 * batch), length, model_config.vocab_size, length // 2)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    step = TrainStep(model, data, batch, seed=0, max_steps=3 + steps, pad_token_id=0, device=device,
                     cuda_graph=cuda_graph, compiled="inductor" if compiled else None)
    torch.cuda.synchronize()
    capture = time.perf_counter() - started
    try:
        started = time.perf_counter()
        for k in range(3):
            step(k)
            optimizer.step()
        torch.cuda.synchronize()
        warmup = time.perf_counter() - started
        started = time.perf_counter()
        tokens = 0
        for k in range(3, 3 + steps):
            loss, _ = step(k)
            optimizer.step()
            tokens += batch * length
        torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        loss = float(loss)
    finally:
        step.close()
        mode = step.mode
        del optimizer, step
        model.unload()
    return {"mode": mode, "ms_per_step": 1000 * seconds / steps, "capture_seconds": capture,
            "warmup_seconds": warmup,
            "tokens_per_second": tokens / seconds, "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30,
            "loss": loss, "batch": batch, "length": length, "steps": steps}


def graph_matches_eager(model_config, lora_kwargs: dict, batch: int, length: int) -> dict:
    """The same batch's loss and adapter gradients, eager, replayed from the captured graph and
    compiled (`resources.compile`, inductor; no dropout, so all compute the same function): the
    largest relative gradient difference of each against eager, and of eager and compiled
    against the same step in fp32 (the same weights, no autocast). The graph replays the eager
    kernels (expected: identical); the compiled step fuses them, so its bf16 rounding differs
    from eager's: the fp32 reference says whether it is any less accurate."""
    import torch

    from trainables.step import TrainStep

    device, model = adapted(model_config, lora_kwargs | {"init_lora_weights": False})  # B != 0: every tensor gets gradients
    data = rows(4 * batch, length, model_config.vocab_size, length // 2)

    def gradients() -> dict:
        return {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}

    def largest_difference(grads: dict, reference: dict) -> float:
        return max(float((grads[n] - g).norm() / g.norm().clamp_min(1e-12)) for n, g in reference.items())

    out = {}
    for graph, compiled in ((False, None), (True, None), (False, "inductor")):
        step = TrainStep(model, data, batch, seed=0, max_steps=2, pad_token_id=0, device=device, cuda_graph=graph,
                         compiled=compiled)
        loss, _ = step(1)  # not the batch captured on: the replay must read the new inputs
        out[step.mode] = (float(loss), gradients())
        step.close()
    model.float()  # the reference: the bf16 weights, exactly, in fp32, and no autocast
    step = TrainStep(model, data, batch, seed=0, max_steps=2, pad_token_id=0, device=device, cuda_graph=False)
    step.autocast = torch.autocast(device.type, enabled=False)
    reference_loss, _ = step(1)
    reference = gradients()
    step.close()

    eager_loss, eager = out["eager"]
    result = {"eager_loss": eager_loss, "tensors": len(eager), "fp32_loss": float(reference_loss)}
    for mode, name in (("cuda_graph", "graph"), ("compiled", "compiled")):
        if mode in out:
            loss, grads = out[mode]
            result[f"{name}_loss"] = loss
            result[f"{name}_max_relative_grad_difference"] = largest_difference(grads, eager)
    for mode in ("eager", "compiled"):
        if mode in out:
            result[f"{mode}_vs_fp32_max_relative_grad_difference"] = largest_difference(out[mode][1], reference)
    result["max_relative_grad_difference"] = result.get("graph_max_relative_grad_difference")
    return result


MFU_TRIAL_STEPS = 1000  # the trial `mfu_1b` is for: 32M tokens at 32 x 1024, a modest LoRA fine-tune


def figures_of(record: dict) -> dict:
    """The benchmark's figures from its measurements (rerun on a saved JSON: python -c
    "import json, bench.step_modes as b; print(b.figures_of(json.load(open('bench/results/step_modes.json'))))").
    `mfu_1b` is a whole trial of MFU_TRIAL_STEPS steps in the step mode the defaults give it
    (`resources.compile: auto`: compiled for a model this size and a trial this long), its
    compile time included; `mfu_1b_uncompiled` the best of the graph and eager steps."""
    from search.config import ResourcesConfig

    figures = {}
    small_runs = record["small"]
    graphed = {k for k, v in small_runs.items() if v.get("mode") == "cuda_graph"}
    if {"all7_r16_dora/graph", "all7_r16/graph"} <= graphed:
        figures["dora_step_time_ratio"] = (small_runs["all7_r16_dora/graph"]["ms_per_step"]
                                           / small_runs["all7_r16/graph"]["ms_per_step"])
    if "all7_r16_dora/eager" in small_runs and "all7_r16/eager" in small_runs:
        figures["dora_step_time_ratio_eager"] = (small_runs["all7_r16_dora/eager"]["ms_per_step"]
                                                 / small_runs["all7_r16/eager"]["ms_per_step"])
    if "all7_r16/graph" in graphed and "all7_r16/eager" in small_runs:
        figures["graph_step_speedup"] = small_runs["all7_r16/eager"]["ms_per_step"] / small_runs["all7_r16/graph"]["ms_per_step"]
    if record["1b"].get("mfu"):
        # the default step modes (graph or eager: capture under 3 s, nothing to amortise)
        default_modes = [v for k, v in record["1b"]["mfu"].items() if not k.endswith("/compiled")]
        if default_modes:
            figures["mfu_1b_uncompiled"] = figures["mfu_1b"] = max(default_modes)
        compiled = {k: v for k, v in record["1b"]["mfu"].items() if k.endswith("/compiled")}
        if compiled:  # resources.compile: the steps after compiling, and a whole trial with its compile time
            key = max(compiled, key=compiled.get)
            run = record["1b"][key]
            figures["mfu_1b_compiled_steps"] = compiled[key]
            figures["compile_seconds_1b"] = run["warmup_seconds"]
            if key in record.get("1b_again", {}):
                figures["compile_seconds_1b_same_config_again"] = record["1b_again"][key]["warmup_seconds"]
            for steps in (100, 200, 300, 1000, 2000):
                seconds = steps * run["ms_per_step"] / 1000
                figures[f"mfu_1b_compiled_trial_{steps}_steps"] = compiled[key] * seconds / (seconds + run["warmup_seconds"])
            if ResourcesConfig().compiled(1.0, record["1b"]["total_params"], MFU_TRIAL_STEPS, True):
                figures["mfu_1b"] = figures[f"mfu_1b_compiled_trial_{MFU_TRIAL_STEPS}_steps"]
                figures["mfu_1b_trial"] = f"{MFU_TRIAL_STEPS} steps, compiled (resources.compile: auto), compile time included"
    for key, name in (("bf16", "bf16_peak_memory_gb"), ("qlora_nf4", "qlora_peak_memory_gb")):
        if key in record["memory"]:
            figures[name] = record["memory"][key]["peak_memory_gb"]
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(RESULTS / "step_modes.json"))
    parser.add_argument("--parts", default="check,small,1b,compile,memory")
    args = parser.parse_args()
    import peft
    import torch
    import transformers

    device_name = torch.cuda.get_device_name(0)
    record = {"benchmark": "step_modes", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": device_name, "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                                                 "peft": peft.__version__, "python": platform.python_version()},
              "check": {}, "small": {}, "1b": {}, "1b_again": {}, "memory": {}, "errors": {}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        out.write_text(json.dumps(record, indent=2))

    def attempt(part: str, key: str, fn):
        try:
            record[part][key] = fn()
            print(part, key, json.dumps(record[part][key]), flush=True)
        except Exception:  # noqa: BLE001 - recorded, and the benchmark goes on
            record["errors"][f"{part}/{key}"] = traceback.format_exc()[-3000:]
            print(part, key, "FAILED", traceback.format_exc()[-1500:], flush=True)
        torch.cuda.empty_cache()
        save()

    parts = args.parts.split(",")
    small = smollm2_config()
    configs = {
        "qv_r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.05),
        "all7_r16": dict(r=16, lora_alpha=16, use_rslora=True, target_modules=ALL_SEVEN, lora_dropout=0.05),
        "all7_r16_dora": dict(r=16, lora_alpha=16, use_rslora=True, use_dora=True, target_modules=ALL_SEVEN,
                              lora_dropout=0.05),
    }
    if "check" in parts:
        for name in ("qv_r8", "all7_r16", "all7_r16_dora"):
            attempt("check", name, lambda: graph_matches_eager(small, configs[name] | {"lora_dropout": 0.0}, 8, 64))
    if "small" in parts:
        for name, lora in configs.items():
            for graph in (False, True):
                attempt("small", f"{name}/{'graph' if graph else 'eager'}",
                        lambda: time_steps(small, lora, 8, 64, graph, steps=50))
    big = llama_1b_config()
    if "1b" in parts or "compile" in parts:
        base = None
        try:
            with torch.device(DEVICE):  # random init on the GPU: seconds, not a minute on the host
                base = transformers.AutoModelForCausalLM.from_config(big, dtype=torch.bfloat16)
        except Exception:  # noqa: BLE001
            record["errors"]["1b/build"] = traceback.format_exc()[-3000:]
        if base is not None:
            lora = configs["all7_r16"] | {"lora_dropout": 0.0}
            for batch, length in ((8, 512), (16, 1024), (32, 1024)) if "1b" in parts else ():
                for graph in (True, False):
                    attempt("1b", f"b{batch}x{length}/{'graph' if graph else 'eager'}",
                            lambda: time_steps(big, lora, batch, length, graph, steps=10, base=base))
            if "compile" in parts:  # the trial's compiled step (resources.compile), its compile time apart
                for batch, length in ((32, 1024),):
                    attempt("1b", f"b{batch}x{length}/compiled",
                            lambda: time_steps(big, lora, batch, length, False, steps=10, base=base, compiled=True))
                    # a second trial of the same configuration (another seed, a confirmation): inductor's
                    # on-disk caches hold its kernels; dynamo traces again (the first trial reset it)
                    attempt("1b_again", f"b{batch}x{length}/compiled",
                            lambda: time_steps(big, lora, batch, length, False, steps=10, base=base, compiled=True))
            params = sum(p.numel() for n, p in base.named_parameters() if "embed_tokens" not in n)
            record["1b"]["total_params"] = sum(p.numel() for p in base.parameters())  # what resources.compile: auto reads
            del base
            torch.cuda.empty_cache()
            record["1b"]["non_embedding_params"] = params
            flops_per_token = {f"{b}x{s}": 4 * params + 12 * big.num_hidden_layers * s * big.hidden_size
                               for b, s in ((8, 512), (16, 1024), (32, 1024))}
            peak = peak_flops(device_name)
            mfus = {}
            for key, value in record["1b"].items():
                if isinstance(value, dict) and "tokens_per_second" in value:
                    shape = key.split("/")[0][1:]
                    mfus[key] = value["tokens_per_second"] * flops_per_token[shape] / peak
            record["1b"]["mfu"] = mfus
            record["1b"]["peak_bf16_flops"] = peak
            save()
    if "memory" in parts:
        lora = configs["all7_r16"] | {"lora_dropout": 0.0}
        attempt("memory", "bf16", lambda: time_steps(big, lora, 8, 512, True, steps=5))

        def qlora():
            from transformers import AutoModelForCausalLM, BitsAndBytesConfig

            with tempfile.TemporaryDirectory() as path:
                torch.manual_seed(0)
                with torch.device(DEVICE):
                    AutoModelForCausalLM.from_config(big, dtype=torch.bfloat16).save_pretrained(path)
                torch.cuda.reset_peak_memory_stats()
                base = AutoModelForCausalLM.from_pretrained(
                    path, device_map={"": 0}, quantization_config=BitsAndBytesConfig(
                        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16))
            return time_steps(big, lora, 8, 512, True, steps=5, base=base)

        attempt("memory", "qlora_nf4", qlora)

    figures = figures_of(record)
    record["figures"] = figures
    save()
    summary_path = RESULTS / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    summary.update({k: v for k, v in figures.items() if k in (
        "dora_step_time_ratio", "mfu_1b", "mfu_1b_trial", "mfu_1b_uncompiled", "mfu_1b_compiled_steps", "compile_seconds_1b",
        "bf16_peak_memory_gb", "qlora_peak_memory_gb")})
    summary_path.write_text(json.dumps(summary, indent=2))

    print(f"\n{'run':<28}{'mode':>11}{'ms/step':>10}{'capture s':>11}{'tokens/s':>12}{'peak GB':>9}")
    for part in ("small", "1b", "1b_again", "memory"):
        for key, value in record[part].items():
            if isinstance(value, dict) and "ms_per_step" in value:
                print(f"{part + ' ' + key:<28}{value['mode']:>11}{value['ms_per_step']:>10.1f}"
                      f"{value['capture_seconds']:>11.2f}{value['tokens_per_second']:>12,.0f}{value['peak_memory_gb']:>9.2f}")
    print("figures", json.dumps(figures))
    print("errors", list(record["errors"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
