"""Which way of running the packed step is fastest on a GPU, side by side: the loss and AdamW
compiled with the model eager (`tail`), the decoder layers compiled too (`layers`, what a pack
with `resources.compile` does), both captured as a CUDA graph, and the layers compiled without
the capture (`layers_uncaptured`). SmolLM2-135M's shapes, random init, 8 x 64 tokens a slot;
with `--dropout`, every slot's LoRA dropout that (the search's space has dropout, and its masks
are a hash over every adapted layer's input).

    TORCH_LOGS=recompiles python bench/pack_variants.py [--slots 8,32] [--variants tail,layers,layers_uncaptured]
        [--dropout 0.05] [--lax]

A capture that fails falls back as the shared trainer's does, and the row says to which mode."""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.pack_profile import RandomSmolLM2  # noqa: E402 - after the path is set
from bench.shared_packing import WARMUP, alone, bf16, load, new_pack, peak_gb, reset_peak, sync  # noqa: E402

ROWS, TOKENS = 8, 64


def run(model, device, variant: str, slots: int, steps: int, dropout: float) -> str:
    import torch

    from trainables.packed import answers_per_row, gathered, unpack

    reset_peak(device)
    torch.compiler.reset()  # each row compiles afresh, within torch.compile's limit of recompiles
    pack, batches = new_pack(model, device, slots, steps, ROWS, TOKENS, variant != "layers_uncaptured", compiled=True,
                             dropout=dropout)
    pack.compile_layers = variant != "tail"
    autocast = bf16(device)
    if variant == "layers_uncaptured":
        losses_of, update = pack._compile()
        stepping = torch.ones(pack.capacity, dtype=torch.bool, device=device)

        def one_step():
            ids, labels = gathered(batches, ROWS, TOKENS)
            answers = answers_per_row(labels)
            with autocast or nullcontext():
                losses = losses_of(ids.to(device, non_blocking=True), labels.to(device, non_blocking=True),
                                   answers=answers)
            losses.sum().backward()
            update(stepping)
            pack._zero_grad()
            return losses
    else:
        def one_step():
            return torch.stack(list(pack.step(batches, autocast).values()))

    started = time.perf_counter()
    for _ in range(WARMUP):
        one_step()
    sync(device)
    first = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(steps):
        losses = one_step()
    sync(device)
    seconds = time.perf_counter() - started
    mode = "compiled, uncaptured" if variant == "layers_uncaptured" else pack.step_mode
    layers = "layers compiled" if pack._layers_compiled else "layers eager"
    line = (f"{variant} K={slots} dropout {dropout}: {steps * slots * ROWS * TOKENS / seconds:,.0f} tokens/s, "
            f"{1000 * seconds / steps:.1f} ms a step, {mode}, {layers}, first {WARMUP} steps {first:.1f} s, "
            f"last mean loss {losses.float().mean().item():.5f}, peak {peak_gb(device):.2f} GB")
    pack.captured = None
    unpack(model)
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slots", default="8,32")
    parser.add_argument("--variants", default="tail,layers,layers_uncaptured")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--lax", action="store_true", help="let the capture compile (it then fails) to see why it would")
    args = parser.parse_args()
    import torch

    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if args.lax:  # the capture may compile, so that TORCH_LOGS=recompiles names the guard that made it
        torch.compiler.set_stance = lambda *a, **k: nullcontext()
    model = load(RandomSmolLM2, device)
    base = alone(model, device, args.steps, ROWS, TOKENS)
    print(f"one trial alone: {base['tokens_per_second']:,.0f} tokens/s ({base['step_mode']})", flush=True)
    for variant in args.variants.split(","):
        for slots in (int(k) for k in args.slots.split(",")):
            try:
                print(run(model, device, variant, slots, args.steps, args.dropout), flush=True)
            except Exception as error:  # noqa: BLE001 - a variant that fails is a row of the table
                print(f"{variant} K={slots}: failed: {type(error).__name__}: {str(error)[:400]}", flush=True)


if __name__ == "__main__":
    main()
