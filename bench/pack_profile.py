"""Where a packed step's time goes on the GPU (SmolLM2, K = 1 and 8 slots): forward, backward
and optimizer timed with syncs, the base model's forward alone, and torch.profiler's top ops by
self CPU and by CUDA time. Then a report's checkpoint, which the pack holds every slot for (0.09 s
in the reference search on an H100, `trainer_time.json`): its snapshot (`Pack.snapshot`), the
checkpoint made of it and its files, and the ops of one snapshot. Then a report's evaluation and
answer round for 1, K/2 and K slots at once, the evaluation at its budget and at four times it, with
the memory each takes (`report_passes`): the searches' own accounts cannot
compare them, as two searches make different passes. Last, the ops of one slot's evaluation.

    python bench/pack_profile.py [--slots 1,8]     (on the GPU machine, after device.sh's setup)

Results: bench/results/h200-2026-12-01-shared/pack_profile.txt."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ROWS, TOKENS, REPEATS = 8, 64, 5
# a report's passes (`report_passes`): the reference task's eval split, 1,200 rows of a short question and its
# answer, and the 32 of them that a trial at the full budget answers
EVAL_ROWS, PROMPT, ANSWER, ANSWER_PROMPTS = 1200, 24, 12, 32


class RandomSmolLM2:  # bench.shared_packing.load's arguments: SmolLM2's shapes, random weights
    llama8b = False
    random = True  # SmolLM2's shapes, random weights: no model files on the machine
    model = "smollm2"


def _timed(sync_then) -> float:
    import torch

    torch.cuda.synchronize()
    started = time.perf_counter()
    sync_then()
    torch.cuda.synchronize()
    return time.perf_counter() - started


def phases(pack, batches: dict, autocast) -> dict[str, float]:
    """Milliseconds of each phase of a step, as Pack.step runs them at capacity, averaged."""
    import torch

    from trainables.packed import answers_per_row

    order = sorted(batches)
    ids = torch.cat([batches[i][0] for i in order])
    labels = torch.cat([batches[i][1] for i in order])
    stepping = torch.ones(pack.capacity, dtype=torch.bool, device=ids.device)
    answers = answers_per_row(labels.cpu())  # as Pack.step passes it: logits at the answer positions only
    totals = {"forward+loss": 0.0, "backward": 0.0, "optimizer": 0.0}
    for _ in range(REPEATS):
        out = {}

        def forward():
            out["loss"] = pack.losses(ids, labels, autocast, answers=answers).sum()

        totals["forward+loss"] += _timed(forward)
        totals["backward"] += _timed(lambda: out["loss"].backward())
        totals["optimizer"] += _timed(lambda: pack.update(stepping))
    return {name: round(1000 * seconds / REPEATS, 1) for name, seconds in totals.items()}


def checkpoint_phases(pack, indices: list[int]) -> dict[str, float]:
    """Milliseconds a slot's checkpoint takes, as the shared trainer takes one with each report,
    averaged over the slots: the stepping thread's snapshot (`Pack.snapshot`), on the host alone
    (what the other slots wait for) and until its copy has reached the host; then, as the client's
    call does it, the checkpoint made of it (`SlotSnapshot.checkpoint`) and its files."""
    import torch

    from trainables.metrics import Progress

    progress = Progress(called_at=0.0, imported_at=0.0, busy_from=0.0, step=3)
    host, synced, made, written = 0.0, 0.0, 0.0, 0.0
    for i in indices:
        out = {}
        torch.cuda.synchronize()
        started = time.perf_counter()
        out["snapshot"] = pack.snapshot(i, progress, "smollm2")
        host += time.perf_counter() - started
        torch.cuda.synchronize()
        synced += time.perf_counter() - started
        made += _timed(lambda: out.update(checkpoint=out["snapshot"].checkpoint()))
        written += _timed(lambda: out["checkpoint"].to_files())
    return {name: round(1000 * seconds / len(indices), 1) for name, seconds in
            (("snapshot_host", host), ("snapshot_synced", synced), ("checkpoint", made), ("files", written))}


def evaluation_inputs(pack):
    """The eval rows of the reference task's shape (EVAL_ROWS prompts of PROMPT tokens, answers of
    ANSWER) and the eval budget of the pack, as its trainer sets it for ROWS rows a slot."""
    from bench.shared_packing import rows
    from trainables.evaluation import model_eval_budget

    eval_rows = rows(EVAL_ROWS, PROMPT + ANSWER, pack.model.config.vocab_size, 7, scored=ANSWER)
    return eval_rows, model_eval_budget(pack.model, ROWS * (PROMPT + ANSWER), slots=pack.capacity)


def report_passes(pack, indices: list[int], autocast) -> dict[str, dict[int, float]]:
    """Milliseconds of a report's passes as the shared trainer makes them for n of the pack's slots
    at once (`Pack.only`): an evaluation of EVAL_ROWS rows of the reference task's shape (prompts of
    PROMPT tokens, answers of ANSWER), and an answer round of ANSWER_PROMPTS prompts, per token
    generated (a random model's answers never end early), by the answer round's own decoding (trainables/decode.py)
    and by transformers' `generate`."""
    import torch

    from trainables.decode import greedy_tokens
    from trainables.evaluation import EvalBudget, evaluate_blocks

    device = pack.device
    eval_rows, budget = evaluation_inputs(pack)
    prompts = torch.tensor([ids[:PROMPT] for ids, _ in eval_rows[:ANSWER_PROMPTS]], device=device)
    # the budget four times as large: fewer, larger passes, and the memory they take
    larger = EvalBudget(tokens=4 * budget.tokens, answers=4 * budget.answers)
    out = {"evaluation": {}, "evaluation_peak_gb": {}, "evaluation_4x_budget": {}, "evaluation_4x_peak_gb": {},
           "per_token": {}, "per_token_generate": {}}
    for n in sorted({1, max(1, len(indices) // 2), len(indices)}):
        with pack.only(*indices[:n]) as model:
            for key, chosen in (("evaluation", budget), ("evaluation_4x_budget", larger)):
                torch.cuda.reset_peak_memory_stats()
                out[key][n] = round(1000 * _timed(lambda n=n, chosen=chosen: evaluate_blocks(
                    model, eval_rows, 0, device, autocast, chosen, blocks=n)), 1)
                peak = "evaluation_peak_gb" if chosen is budget else "evaluation_4x_peak_gb"
                out[peak][n] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            ids, mask = prompts.repeat(n, 1), torch.ones_like(prompts).repeat(n, 1)
            with autocast:
                seconds = _timed(lambda ids=ids, mask=mask: model.generate(
                    input_ids=ids, attention_mask=mask, do_sample=False, num_beams=1, max_new_tokens=ANSWER + 4,
                    min_new_tokens=ANSWER + 4, pad_token_id=0, use_cache=True))
            out["per_token_generate"][n] = round(1000 * seconds / (ANSWER + 4), 1)
            # the answer round's own decoding (trainables/decode.py), its step captured
            seconds = _timed(lambda ids=ids, mask=mask: greedy_tokens(model, ids, mask, ANSWER + 4, [], 0, autocast))
            out["per_token"][n] = round(1000 * seconds / (ANSWER + 4), 1)
    return out


def evaluation_profile(pack, index: int, autocast) -> str:
    """torch.profiler's top ops of one slot's evaluation at its budget, by self CPU and by CUDA
    time: whether its passes wait on the host's launches or on the GPU."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from trainables.evaluation import evaluate_blocks

    eval_rows, budget = evaluation_inputs(pack)
    with pack.only(index) as model:
        evaluate_blocks(model, eval_rows, 0, pack.device, autocast, budget)  # its matrices kept, as after a first pass
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiled:
            evaluate_blocks(model, eval_rows, 0, pack.device, autocast, budget)
            torch.cuda.synchronize()
    averages = profiled.key_averages()
    return (averages.table(sort_by="self_cpu_time_total", row_limit=12) + "\n"
            + averages.table(sort_by="cuda_time_total", row_limit=10))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slots", default="1,8", help="pack sizes to profile, comma-separated")
    args = parser.parse_args()
    import torch
    from torch.profiler import ProfilerActivity, profile

    from bench.shared_packing import load as load_model
    from bench.shared_packing import rows, trial_params
    from trainables.metrics import Progress
    from trainables.packed import Pack, unpack

    device = torch.device("cuda", 0)
    model = load_model(RandomSmolLM2, device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    for slots in (int(k) for k in args.slots.split(",")):
        pack = Pack(model, slots, warmup_steps=2, max_steps=100)
        indices = [pack.add(trial_params(k)) for k in range(slots)]
        batches = {}
        for i in indices:
            ids = torch.tensor([r[0] for r in rows(ROWS, TOKENS, model.config.vocab_size, i)], device=device)
            batches[i] = (ids, ids)
        torch.cuda.reset_peak_memory_stats()
        for _ in range(3):
            pack.step(batches, autocast)
        torch.cuda.synchronize()
        print(f"K={slots} memory GB: allocated {torch.cuda.memory_allocated() / 2**30:.2f}, peak allocated "
              f"{torch.cuda.max_memory_allocated() / 2**30:.2f}, reserved {torch.cuda.memory_reserved() / 2**30:.2f}",
              flush=True)
        print(f"K={slots} phases ms: {phases(pack, batches, autocast)}", flush=True)
        ids = torch.cat([batches[i][0] for i in indices])
        with torch.no_grad(), autocast:
            seconds = _timed(lambda: [pack.model(input_ids=ids) for _ in range(REPEATS)]) / REPEATS
        print(f"K={slots} base forward alone (no adapter rows, no grad): {1000 * seconds:.1f} ms", flush=True)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiled:
            for _ in range(3):
                pack.step(batches, autocast)
            torch.cuda.synchronize()
        print(profiled.key_averages().table(sort_by="self_cpu_time_total", row_limit=18), flush=True)
        print(profiled.key_averages().table(sort_by="cuda_time_total", row_limit=10), flush=True)
        print(f"K={slots} checkpoint ms: {checkpoint_phases(pack, indices)}", flush=True)
        progress = Progress(called_at=0.0, imported_at=0.0, busy_from=0.0, step=3)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiled:
            pack.snapshot(indices[0], progress, "smollm2")
            torch.cuda.synchronize()
        print(profiled.key_averages().table(sort_by="self_cpu_time_total", row_limit=12), flush=True)
        print(f"K={slots} report passes ms, by slots served at once: {report_passes(pack, indices, autocast)}",
              flush=True)
        print(f"K={slots} one slot's evaluation:\n{evaluation_profile(pack, indices[0], autocast)}", flush=True)
        for i in indices:
            pack.remove(i)
        unpack(model)


if __name__ == "__main__":
    main()
