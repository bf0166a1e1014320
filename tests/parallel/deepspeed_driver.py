"""Run several training runs in one `torchrun` launch (the tests' way to pay the start-up of
torch and DeepSpeed once): `torchrun --nproc-per-node N deepspeed_driver.py PLAN.json`.

PLAN.json: {"recipe": PATH, "runs": [STEP, ...]} where a STEP is either
    {"run_dir": DIR, "set": ["key=value", ...], "stop_at_step": N or null}
        one `hybrid.train.loop.train` call (resuming DIR when it has a checkpoint), or
    {"copy": [SRC, DST]}
        rank 0 copies a run directory (to resume the same checkpoint twice).

The driver creates the process group itself, so the backends join it and leave it standing
between runs.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys

import torch.distributed as dist

from hybrid.recipe.recipe import load_recipe
from hybrid.train.loop import train


def main(plan_path: str) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with open(plan_path) as f:
        plan = json.load(f)
    dist.init_process_group("gloo")
    for step in plan["runs"]:
        if "copy" in step:
            if dist.get_rank() == 0:
                shutil.copytree(*step["copy"])
            dist.barrier()
            continue
        recipe = load_recipe(plan["recipe"], step.get("set", []))
        train(recipe, run_dir=step["run_dir"], stop_at_step=step.get("stop_at_step"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
