"""Capture and restore every RNG a run uses, in a form `torch.load(weights_only=True)` accepts.

The state is a dict of plain values and tensors::

    python  (version, 625 ints, gauss_next)    random.getstate(), as it is
    numpy   {bit_generator, keys (int64 tensor of 624), pos, has_gauss, cached_gaussian}
    torch   uint8 tensor                       torch.get_rng_state()
    cuda    list of uint8 tensors, one per visible device (only when CUDA is available)

Restoring it makes the next draws of `random`, `numpy.random` (the global legacy generator),
`torch` and every CUDA device identical to the draws that followed the capture.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)


def capture_rng_state() -> dict[str, Any]:
    """The state of python `random`, numpy's global generator, torch CPU and all CUDA devices."""
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": str(name),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore what `capture_rng_state` returned (possibly after a torch.save/torch.load).

    CUDA states are restored for the devices both the state and this process have; a mismatch
    in the number of devices is logged as a warning.
    """
    missing = [k for k in ("python", "numpy", "torch") if k not in state]
    if missing:
        raise ValueError(f"RNG state lacks {missing}; expected what capture_rng_state() returns")
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(x) for x in internal), gauss))
    n = state["numpy"]
    keys = n["keys"].cpu().numpy().astype(np.uint32)
    np.random.set_state(
        (
            n.get("bit_generator", "MT19937"),
            keys,
            int(n["pos"]),
            int(n["has_gauss"]),
            float(n["cached_gaussian"]),
        )
    )
    torch.set_rng_state(state["torch"].cpu())
    _restore_cuda(state.get("cuda"))


def _restore_cuda(saved: list[torch.Tensor] | None) -> None:
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if saved is None:
        if available:
            log.warning("the RNG state has no CUDA part: CUDA generators keep their current state")
        return
    if len(saved) != available:
        log.warning(
            "the RNG state has CUDA generators for %d devices, this process sees %d: "
            "restoring the first %d",
            len(saved),
            available,
            min(len(saved), available),
        )
    for device, rng in enumerate(saved[:available]):
        torch.cuda.set_rng_state(rng.cpu(), device)
