"""What a shared trainer's stepping thread pays for the checkpoint files its clients' calls make
in the same process (`SlotSnapshot.checkpoint` and `to_files`, in `next_report`): on the CPU, a
slot's snapshot (`Pack.snapshot`, the stepping thread's share of a report) timed alone and beside
a thread that makes a checkpoint's files over and over, at Python's default switch interval and at
a fiftieth of it. SmolLM2's shapes with random weights, a slot on every projection at rank 8.

On an H100 a snapshot took 23 ms alone and 91-113 ms a report in the reference search
(bench/results/h100-2026-12-07-sitting11/); this says how much of that such threads explain.

    python bench/trainer_threads.py

Results: bench/results/cpu-2026-12-07-trainer-threads/."""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REPEATS = 5


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    import torch

    from bench.pack_profile import RandomSmolLM2
    from bench.shared_packing import load, rows, trial_params
    from trainables.metrics import Progress
    from trainables.packed import Pack

    torch.set_num_threads(1)  # one core for the torch ops of each thread: the interpreter's lock is what they share
    model = load(RandomSmolLM2, torch.device("cpu"))
    pack = Pack(model, 2, warmup_steps=2, max_steps=100, max_rank=16)
    index = pack.add(trial_params(0, r=8))
    ids = torch.tensor([row[0] for row in rows(1, 8, model.config.vocab_size, 0)])
    pack.step({index: (ids, ids)}, torch.autocast("cpu", enabled=False))
    progress = Progress(called_at=0.0, imported_at=0.0, busy_from=0.0, step=1)
    snapshot = pack.snapshot(index, progress, "smollm2")

    def snapshots() -> float:
        started = time.perf_counter()
        for _ in range(REPEATS):
            pack.snapshot(index, progress, "smollm2")
        return 1000 * (time.perf_counter() - started) / REPEATS

    def files(stop: threading.Event, made: list) -> None:
        while not stop.is_set():
            snapshot.checkpoint().to_files()
            made.append(time.perf_counter())

    default = sys.getswitchinterval()
    for interval in (default, default / 50):
        sys.setswitchinterval(interval)
        alone = min(snapshots() for _ in range(3))
        stop, made = threading.Event(), []
        beside = threading.Thread(target=files, args=(stop, made))
        beside.start()
        time.sleep(0.3)
        started, before = time.perf_counter(), len(made)
        shared = min(snapshots() for _ in range(3))
        per_file = 1000 * (time.perf_counter() - started) / max(1, len(made) - before)
        stop.set()
        beside.join()
        print(f"switch interval {1000 * interval:g} ms: a snapshot {alone:.1f} ms alone, {shared:.1f} ms beside a thread "
              f"making checkpoint files ({per_file:.0f} ms a checkpoint meanwhile)", flush=True)
    sys.setswitchinterval(default)


if __name__ == "__main__":
    main()
