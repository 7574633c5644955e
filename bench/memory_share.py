"""The GPU share `auto` takes from the memory probe, against a share fixed by hand.

    python bench/memory_share.py [--model gemma3-270m|qwen2.5-0.5b] [--samples 16] [--by-hand 0.25]

No weights are downloaded: the model is random-init from the shapes of its `config.json`
(written below), so its logits span the real vocabulary (262,144 tokens for Gemma-3 270M,
151,936 for Qwen2.5-0.5B); its data are tokenized by SmolLM2's tokenizer, whose ids all lie
inside either vocabulary. The task is the reference `facts` set (bench/data/facts/), the budget
search_vs_grid's: 100 steps of 8 sequences, ASHA rungs at 50 and 100.

`--only-probe` runs the probe alone (search/resources/memory.py, no Ray or Optuna needed: it runs on a
GPU machine with torch, transformers and peft only) on the space's heaviest default
configuration, all seven projections at r=32, with and without CUDA graphs.

Otherwise, three runs of `python -m search.run`, each its own process:
1. `--dry-run` with `gpus_per_trial: auto`: prints the probe's line (the footprint, the
   allocator's peak and reserve, what is held outside the allocator, the share);
2. the search with `gpus_per_trial: auto`;
3. the same search with `gpus_per_trial` fixed by hand (`--by-hand`, 0.25 by default: the share
   at which a 262k-vocabulary 270M model's search finished with no trial out of memory).
While each search runs, `nvidia-smi` is read every second for the most memory any one process
held, to set beside the probe's footprint and the trials' `peak_memory_gb`.

Figures (bench/results/memory_share.json, and one line each on stdout):
- `probe`: run_config.json's `resources.memory_probe` of the auto search;
- per search: `wall_seconds`, `gpus_per_trial`, `trials`, `failed`, `out_of_memory` (failed
  runs whose error is CUDA's out-of-memory), `reruns`, `max_peak_memory_gb` and
  `max_peak_allocated_gb` over trials.csv, `max_process_gb_nvidia_smi`, the pick's eval loss.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from search_vs_grid import facts_overrides  # noqa: E402 - after the path is set

RESULTS = ROOT / "bench" / "results"

# Shapes from each model's config.json on the Hugging Face hub (google/gemma-3-270m,
# Qwen/Qwen2.5-0.5B); token ids are SmolLM2's (set in `random_init_model`).
MODELS = {
    "gemma3-270m": {
        "model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"], "vocab_size": 262_144,
        "hidden_size": 640, "intermediate_size": 2048, "num_hidden_layers": 18, "num_attention_heads": 4,
        "num_key_value_heads": 1, "head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 512,
        "max_position_embeddings": 32_768, "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0,
        "rms_norm_eps": 1e-6, "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True,
    },
    "qwen2.5-0.5b": {
        "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "vocab_size": 151_936,
        "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
        "num_key_value_heads": 2, "max_position_embeddings": 32_768, "rope_theta": 1_000_000.0,
        "rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": True,
    },
}


def random_init_model(name: str, directory: Path, tokenizer: bool = True) -> Path:
    """`MODELS[name]`, random-init in bf16, saved to `directory` with SmolLM2's tokenizer (and chat
    template), or without one (`tokenizer` false: the probe alone needs none, nor the SmolLM2 GGUF)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from trainables.model import smollm2_checkpoint

    smollm2 = AutoTokenizer.from_pretrained(smollm2_checkpoint()) if tokenizer else None
    ids = ({"pad_token_id": smollm2.pad_token_id, "bos_token_id": smollm2.bos_token_id, "eos_token_id": smollm2.eos_token_id}
           if smollm2 else {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2})
    shapes = dict(MODELS[name])
    config = AutoConfig.for_model(shapes.pop("model_type"), **shapes, **ids)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(directory)
    if smollm2:
        smollm2.save_pretrained(directory)
    return directory


class ProcessMemory:
    """The most GPU memory any one process held, by `nvidia-smi`, read every second while open."""

    def __init__(self):
        self.max_mib, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _poll(self):
        if shutil.which("nvidia-smi") is None:
            return
        while not self._stop.wait(1.0):
            out = subprocess.run(["nvidia-smi", "--query-compute-apps=used_memory", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True).stdout
            self.max_mib = max([self.max_mib, *(int(x) for x in out.split() if x.isdigit())])


def search(model_dir: Path, output: Path, name: str, gpus_per_trial: str, samples: int, extra: list[str],
           dry_run: bool = False) -> dict:
    """One `python -m search.run` of the facts task on `model_dir`; its figures."""
    sets = facts_overrides(samples, 100, 1200, gpus_per_trial) + [f"model.path={model_dir}"] + extra
    command = [sys.executable, "-m", "search.run", "--output", str(output), "--name", name,
               *[x for s in sets for x in ("--set", s)], *(["--dry-run"] if dry_run else [])]
    started = time.perf_counter()
    with ProcessMemory() as memory:
        python_path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": python_path})
    wall = time.perf_counter() - started
    print(done.stdout[-4000:], done.stderr[-4000:] if done.returncode else "", sep="\n", flush=True)
    figures = {"exit_code": done.returncode, "wall_seconds": round(wall, 1),
               "max_process_gb_nvidia_smi": round(memory.max_mib / 1024, 2)}
    if dry_run:
        probe_line = next((line for line in done.stdout.splitlines() if line.startswith("memory probe")), None)
        return {**figures, "probe_line": probe_line}
    import pandas as pd

    run_dir = output / name
    trials = pd.read_csv(run_dir / "trials.csv")
    config = json.loads((run_dir / "run_config.json").read_text())
    pick = json.loads((run_dir / "pick.json").read_text()) if (run_dir / "pick.json").exists() else {}
    failed = trials[trials.status == "failed"]
    return {
        **figures,
        "gpus_per_trial": config["resources"]["gpus_per_trial"],
        "probe": config["resources"].get("memory_probe"),
        "trials": len(trials),
        "failed": len(failed),
        "out_of_memory": int(failed.error.fillna("").astype(str).str.contains("OutOfMemoryError|CUDA out of memory").sum()),
        "reruns": int((trials.origin == "rerun").sum()),
        "max_peak_memory_gb": round(float(trials.peak_memory_gb.max()), 2),
        "max_peak_allocated_gb": round(float(trials.peak_allocated_gb.max()), 2),
        "pick_trial": pick.get("trial_id"), "pick_value": pick.get("value"),
    }


def probe_only(model_dir: Path, batch_size: int = 8, max_length: int = 128) -> dict:
    """The probe of search/resources/memory.py on `model_dir`, at search_vs_grid's batch and the default
    max_length, all seven projections at r=32 (the default space's heaviest), with CUDA graphs
    as trials use them, and eager."""
    from search.resources.memory import ProbeSpec, probe, share_for
    from search.tuning.space import ResolvedModules, lora_config

    names = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    lora = lora_config(ResolvedModules("all_linear", names, False, [], None), 32, 2.0, 0.1, False, False)
    out = {}
    for mode, graphs in (("cuda_graph", True), ("eager", False)):
        measured = probe(ProbeSpec(str(model_dir), "bfloat16", "none", False, False, lora, batch_size, max_length,
                                   graphs, False))
        out[mode] = {**{k: round(v, 2) if isinstance(v, float) else v for k, v in measured.items()},
                     "share_at_margin_1": share_for(measured["footprint_gb"], measured["gpu_gb"], 1.0)}
        print(f"PROBE {mode}: {json.dumps(out[mode])}", flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="gemma3-270m")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--by-hand", default="0.25", help="the share fixed by hand for the second search")
    parser.add_argument("--only-probe", action="store_true",
                        help="the probe alone (no Ray, Optuna or SmolLM2 GGUF needed), no searches")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more overrides, as search.run's --set")
    parser.add_argument("--searches", default="auto,by_hand", help="which searches to run, comma-separated: auto, by_hand "
                        "(the probe's dry run comes with auto)")
    args = parser.parse_args()
    searches = args.searches.split(",")
    import torch

    record = {"benchmark": "memory_share", "model": args.model, "shapes": MODELS[args.model],
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "overrides": args.set}
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = random_init_model(args.model, Path(scratch, "model"), tokenizer=not args.only_probe)
        if args.only_probe:
            record["probe"] = probe_only(model_dir)
        else:
            if "auto" in searches:
                record["dry_run"] = search(model_dir, Path(scratch, "runs"), "probe", "auto", args.samples, args.set,
                                           dry_run=True)
                print(f"PROBE: {record['dry_run']['probe_line']} (dry run {record['dry_run']['wall_seconds']} s)", flush=True)
            for label, share in (("auto", "auto"), ("by_hand", args.by_hand)):
                if label not in searches:
                    continue
                record[label] = search(model_dir, Path(scratch, "runs"), label, share, args.samples, args.set)
                figures = {k: v for k, v in record[label].items() if k != "probe"}
                print(f"SEARCH {label}: {json.dumps(figures)}", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "memory_share_probe.json" if args.only_probe else f"memory_share_{'_'.join(searches)}.json"
    (RESULTS / name).write_text(json.dumps(record, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
