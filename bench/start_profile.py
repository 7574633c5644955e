"""Where a shared trainer's start goes on the GPU, in one fresh process, as SharedTrainer's
constructor and `_prepare` run it: the imports (torch, transformers, PEFT), the GPU's context,
the base model loaded, then `Pack.prepare` for the reference space's four module sets under
cProfile. In the reference search these are 1.6 s, 4.5 s and 4.7 s of its 15.8 s to the first
step (bench/results/h100-2026-12-06-sitting8/).

    python bench/start_profile.py [--model PATH] [--slots 8] [--no-layers]   (on the GPU machine, after device.sh's setup)

PATH defaults to the embedded default as the search converted it (LORA_SEARCH_CACHE). Prints the
seconds of each part and the profile's top functions by cumulative and by own time."""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from trainables.config import cache_root  # noqa: E402 - after the path is set

# the reference search's space (bench/search_vs_grid.py): attention_qv, attention, mlp, all_linear
MODULE_SETS = (("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj"),
               ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
ROWS, WIDTH, ANSWER = 8, 64, 16


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(cache_root()
                                               / "smollm2-135m-instruct"))
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--warm", action="store_true",
                        help="make inductor's one-time setup before the model's load (trainables.packed.warm_inductor), "
                             "as a shared trainer's process does while it waits for the driver's go")
    parser.add_argument("--layers", action=argparse.BooleanOptionalAction, default=True,
                        help="compile the decoder layers into the step, as resources.pack_compile_layers auto does on a GPU")
    args = parser.parse_args()
    began = time.perf_counter()
    marks: list[tuple[str, float]] = []

    def mark(name: str) -> None:
        marks.append((name, time.perf_counter()))
        print(f"{name}: {marks[-1][1] - (marks[-2][1] if len(marks) > 1 else began):.2f} s", flush=True)

    import torch
    mark("import torch")
    from trainables.model import hide_bitsandbytes_unless_needed
    hide_bitsandbytes_unless_needed("none", False)  # as SharedTrainer does
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM  # noqa: F401
    mark("import transformers")
    import peft  # noqa: F401
    mark("import peft")
    from trainables.model import load_base_model
    from trainables.packed import Pack, warm_inductor
    mark("import trainables")
    if args.warm:
        warm_inductor()
        mark("inductor warmed")
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")  # cpu: a check of the script
    torch.zeros(1, device=device)
    mark("GPU context")
    profile = cProfile.Profile()
    profile.enable()
    base = load_base_model(args.model, "bfloat16", "none", False, device)
    profile.disable()
    mark("base model loaded")
    pack = Pack(base, args.slots, 10, 100, 32, cuda_graph=True, compile_backend="inductor")
    pack.compile_layers = args.layers
    ids = list(range(100, 100 + WIDTH))
    pack.reserve([(ids, [-100] * (WIDTH - ANSWER) + ids[-ANSWER:])], dropout=True)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    mark("pack made")
    profile.enable()
    pack.prepare(MODULE_SETS, ROWS, autocast)
    if device.type == "cuda":
        torch.cuda.synchronize()
    profile.disable()
    mark("prepared")
    print(f"captured: {pack.captured is not None}; step mode {pack.step_mode}")
    for part in ("cumulative", "tottime"):
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats(part).print_stats(45)
        print(f"\n== load and prepare, by {part} ==\n" + "\n".join(text.getvalue().splitlines()[6:]))
    print(f"\nwhole: {time.perf_counter() - began:.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
