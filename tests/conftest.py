"""Suite-wide test settings.

* Tests marked `gpu` run only where CUDA is available.
* Launch tuners are off (HYBRID_KERNELS_TUNE=0) unless a test turns them on, and never use the
  disk cache of tuned launches (HYBRID_KERNELS_TUNE_CACHE=0) unless a test points it elsewhere.
* Without CUDA, Triton kernels run on the CPU under Triton's interpreter: TRITON_INTERPRET must be
  set before any kernel module is imported (Triton reads it when a kernel is defined).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Kernels take their heuristic launch untimed (the launch tuners would compile and time every
# candidate at every new shape: minutes of a GPU run); tuner tests turn it back on.
os.environ.setdefault("HYBRID_KERNELS_TUNE", "0")
# ... and tuned choices are not read from or written to the user's cache (~/.cache/hybrid_kernels)
os.environ["HYBRID_KERNELS_TUNE_CACHE"] = "0"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
