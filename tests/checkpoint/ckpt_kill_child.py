"""Child process of the SIGKILL tests in test_checkpoint.py (a helper, not a test module).

    python ckpt_kill_child.py RUN_DIR MODE NUMEL

MODE `steps`: saves step 1, prints READY, then saves steps 2, 3, ... (keep=2, so old ones are
pruned). MODE `resave`: saves step 1 version 0, prints READY, then saves step 1 again as
versions 1, 2, ... (each save replaces the existing step directory). Every state is a pure
function of (step, version), `make_state`, so the test can check a loaded checkpoint exactly.

The pause hook is read from CHILD_PAUSE and put into HYBRID_CKPT_TEST_PAUSE only after READY, so
the first save is never paused. Prints "START step version" before and "SAVED step version"
after each save.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from hybrid.checkpoint.store import PAUSE_ENV, save_checkpoint


def make_state(step: int, version: int, numel: int) -> dict:
    """Model state (tied pair, non-contiguous view, ~8 * numel bytes), train state, recipe, meta."""
    tag = step * 1000 + version
    tied = torch.arange(64, dtype=torch.float32).reshape(8, 8) + tag
    model_state = {
        "embed.weight": tied,
        "lm_head.weight": tied,
        "layers.0.big": torch.full((numel,), float(tag)),
        "layers.1.ramp": torch.arange(numel // 2, dtype=torch.float64) * 0.5 + tag,
        "layers.2.view": (torch.arange(48, dtype=torch.int32).reshape(6, 8) + tag).t()[::2],
    }
    train_state = {
        "step": step,
        "version": version,
        "optimizer": {"state": {0: {"exp_avg": torch.full((1000,), -float(tag))}}},
        "data": {"consumed_samples": step * 16 + version, "per_source": [step, version]},
    }
    recipe = {"name": "kill-test", "tag": tag, "train": {"steps": step}}
    return {
        "model_state": model_state,
        "train_state": train_state,
        "recipe": recipe,
        "meta": {"tag": tag},
    }


def main() -> None:
    run_dir, mode, numel = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    pause = os.environ.pop("CHILD_PAUSE", "")
    os.environ.pop(PAUSE_ENV, None)
    save_checkpoint(run_dir, 1, keep=2, **make_state(1, 0, numel))
    print("SAVED 1 0", flush=True)
    print("READY", flush=True)
    if pause:
        os.environ[PAUSE_ENV] = pause
    for i in range(1, 1000):
        step, version = (1 + i, 0) if mode == "steps" else (1, i)
        print(f"START {step} {version}", flush=True)
        save_checkpoint(run_dir, step, keep=2, **make_state(step, version, numel))
        print(f"SAVED {step} {version}", flush=True)


if __name__ == "__main__":
    main()
