"""Imported by every worker of a local Ray as it starts, before it takes a trial.

`search.cluster.connect` names this module in Ray's `preload_python_modules`. Ray starts
as many idle workers as the node has CPUs when the driver connects, and Tune's trial actors
take those idle workers, so torch, transformers and PEFT are imported while the driver
sets up Tune instead of after each trial has started (on the H100 host of the benchmarks,
24 s in each of 8 workers importing at once, before any trial could take a step).

Nothing here may initialise CUDA: Ray sets CUDA_VISIBLE_DEVICES when it hands a worker its
trial, and a process whose CUDA driver started before then sees every GPU of the node and
would train on the first. So `torch.cuda.is_available()` is made to ask NVML, and
bitsandbytes, which queries every device as it is imported (and which PEFT imports when it
is installed), is hidden: `search.cluster.worker_preload` names this module only for
searches without 4-bit quantization, which never use it. `CUDA_INITIALISED` says whether
CUDA was initialised all the same (a later library version might); a trial on CUDA refuses
to run in such a worker (`trainables.trial._check_cuda_untouched_by_preload`).
"""

from __future__ import annotations

import os
import sys
import time

PRELOAD_STARTED = time.time()
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
sys.modules.setdefault("bitsandbytes", None)  # `import bitsandbytes` fails; find_spec answers None

import peft  # noqa: E402,F401 - the point of this module
from peft import LoraConfig, get_peft_model  # noqa: E402,F401
from transformers import AutoModelForCausalLM  # noqa: E402,F401

import trainables.trial  # noqa: E402,F401


def cuda_initialised() -> bool:
    """Whether this process has initialised the CUDA driver (cuInit), which fixes the devices
    it sees. Importing torch may load the driver library without initialising it; before
    cuInit every driver call answers CUDA_ERROR_NOT_INITIALIZED, and asking starts nothing."""
    import ctypes

    try:
        driver = ctypes.CDLL("libcuda.so.1", mode=os.RTLD_NOLOAD)  # only if already loaded
    except OSError:
        return False
    count = ctypes.c_int()
    return driver.cuDeviceGetCount(ctypes.byref(count)) == 0  # CUDA_SUCCESS; 3 is CUDA_ERROR_NOT_INITIALIZED


CUDA_INITIALISED = cuda_initialised()
PRELOAD_SECONDS = time.time() - PRELOAD_STARTED
