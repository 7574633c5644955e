"""How much of a GPU one trial gets, from what a trial measurably holds there (issue 19).

A trial's process holds more than its tensors: the allocator's cache, CUDA-graph pools, the
CUDA context, and eval batches whose logits span the vocabulary. On an H200, 270M-parameter
trials with a 262k-token vocabulary reported an allocator peak of 11.3-11.6 GB while
`nvidia-smi` saw their processes hold 6.7 to 25.7 GB, and eight to a GPU ran out of memory.
So `gpus_per_trial: auto` is sized from one trial's measured footprint (`probe`), and a
trial that runs out of memory beside others runs again with a larger share (`larger_share`).
"""

from __future__ import annotations

SHARES = (0.125, 0.25, 0.5, 1.0)  # 8, 4, 2 or 1 trials to a GPU, as the rule by parameter count packs


def share_for(footprint_gb: float, gpu_gb: float, margin: float) -> float:
    """The smallest share 1/n (n = 8, 4, 2, 1) for which n trials, each holding `footprint_gb`
    grown by `margin` (a fraction of it: what the probe's single step does not see), fit in
    `gpu_gb`: n * footprint_gb * (1 + margin) <= gpu_gb. 1.0 when not even one fits (a trial
    then has the GPU to itself, and may still run out of memory)."""
    for share in SHARES:
        if footprint_gb * (1 + margin) / share <= gpu_gb:
            return share
    return 1.0


def larger_share(share: float) -> float | None:
    """The share for a trial that ran out of memory at `share`: twice it (half the neighbours),
    at most the whole GPU; None when it already had a GPU to itself (or ran without one), so the
    failure is the configuration's own."""
    if share <= 0 or share >= 1:
        return None
    return min(1.0, 2 * share)
