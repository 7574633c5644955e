"""Workers of a local Ray import torch, transformers and PEFT as they start (Ray's
preload_python_modules), so trials do not wait for those imports; what they must not do
is start CUDA before Ray gives them a GPU."""

from __future__ import annotations

import sys
import types

import pytest

from search.cluster import local_cpus, worker_preload
from trainables.trial import _check_cuda_untouched_by_preload


def test_preloaded_workers_hide_bitsandbytes_and_leave_cuda_alone(local_ray):
    """What a preloaded worker holds before any trial: PEFT imported, bitsandbytes hidden
    (it starts CUDA as it is imported, before Ray has given the worker its GPU)."""
    import ray

    @ray.remote(num_cpus=1)
    class Worker:  # an actor, as Tune's trials are
        def inspect(self):
            import importlib.util

            preload = sys.modules.get("trainables.preload")
            return (preload is not None, "peft" in sys.modules, importlib.util.find_spec("bitsandbytes"),
                    preload is not None and preload.CUDA_INITIALISED)

    worker = Worker.remote()
    try:
        assert ray.get(worker.inspect.remote()) == (True, True, None, False)
    finally:
        ray.kill(worker)


def test_worker_preload_leaves_peft_to_the_trial_for_4bit_and_can_be_turned_off(monkeypatch):
    assert worker_preload("none") == ["trainables.preload"]
    assert worker_preload("4bit") == ["trainables.trial"]  # PEFT would import bitsandbytes
    monkeypatch.setenv("LORA_SEARCH_PRELOAD", "0")
    assert worker_preload("none") == []


def test_a_trial_refuses_a_worker_whose_cuda_started_before_ray_gave_it_a_gpu(monkeypatch):
    """It would see every GPU of the node and train on the first, whichever Ray gave it."""
    monkeypatch.setitem(sys.modules, "trainables.preload", types.SimpleNamespace(CUDA_INITIALISED=True))
    with pytest.raises(RuntimeError, match="LORA_SEARCH_PRELOAD=0"):
        _check_cuda_untouched_by_preload()
    monkeypatch.setitem(sys.modules, "trainables.preload", types.SimpleNamespace(CUDA_INITIALISED=False))
    _check_cuda_untouched_by_preload()


def test_a_local_ray_on_gpus_declares_only_the_cpus_its_gpu_slots_use(monkeypatch):
    """Ray starts one preloading worker per declared CPU; beyond the GPU slots they only slow the others."""
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert local_cpus(0.125, 1, 1) == 8
    assert local_cpus(0.125, 1, 4) == 16  # never more than the machine has
    assert local_cpus(0.5, 2, 1) == 4
    assert local_cpus(1.0, 1, 2) == 2
    assert local_cpus(0.0, 1, 0) is None  # CPU trials: every CPU is a slot
