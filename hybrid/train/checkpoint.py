"""Atomic training checkpoints.

Layout: RUN_DIR/checkpoints/step-00000100/{model.safetensors, train_state.pt, recipe.yaml,
meta.json} and RUN_DIR/checkpoints/latest (a text file naming the current step directory).

A save writes everything into `checkpoints/.tmp-*`, fsyncs each file and the directory, renames
it to its final name, fsyncs `checkpoints/`, then replaces `latest` (write temp + os.replace +
fsync). A process killed at any moment leaves the previous `latest` intact and loadable; stale
`.tmp-*` directories are removed by the next save. Older checkpoints beyond `keep` are deleted
only after `latest` names the new one. Weights are in safetensors (tensors sharing storage, e.g.
tied embeddings, are stored once with an alias table in the metadata); the rest loads with
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from hybrid.recipe.schema import ConfigError

LATEST = "latest"
FILES = ("model.safetensors", "train_state.pt", "recipe.yaml", "meta.json")
_PAUSE_ENV = "HYBRID_CKPT_TEST_PAUSE"  # test hook "phase@step:seconds": sleep in that save


class CheckpointError(ConfigError):
    """A checkpoint that is missing, incomplete or unreadable."""


@dataclass
class Checkpoint:
    path: Path
    step: int
    model_state: dict[str, Tensor]
    train_state: dict
    recipe: dict
    meta: dict


def _pause(phase: str, step: int) -> None:
    where, _, seconds = os.environ.get(_PAUSE_ENV, "").partition(":")
    if where == f"{phase}@{step}":
        time.sleep(float(seconds or 5))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _dedupe(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """One tensor per storage; aliases maps a dropped key to the kept key."""
    kept: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for key, t in state.items():
        t = t.detach().cpu()
        ident = (
            (
                t.untyped_storage().data_ptr(),
                t.storage_offset(),
                tuple(t.shape),
                tuple(t.stride()),
                t.dtype,
            )
            if t.numel()
            else None
        )
        if ident is not None and ident in seen:
            aliases[key] = seen[ident]
            continue
        if ident is not None:
            seen[ident] = key
        kept[key] = t.contiguous().clone() if not t.is_contiguous() else t
    # safetensors also rejects distinct tensors that overlap in one storage: give each its own
    by_storage: dict[int, int] = {}
    for t in kept.values():
        if t.numel():
            ptr = t.untyped_storage().data_ptr()
            by_storage[ptr] = by_storage.get(ptr, 0) + 1
    for key, t in kept.items():
        if t.numel() and by_storage[t.untyped_storage().data_ptr()] > 1:
            kept[key] = t.clone()
    return kept, aliases


def _write_dir(
    tmp: Path, step: int, model_state: dict, train_state: dict, recipe: dict, meta: dict
) -> None:
    tensors, aliases = _dedupe(model_state)
    save_file(
        tensors,
        str(tmp / "model.safetensors"),
        metadata={"format": "pt", "aliases": json.dumps(aliases)},
    )
    torch.save(train_state, tmp / "train_state.pt")
    (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    info = {"step": step, "time": time.time(), "format": 1, **meta}
    (tmp / "meta.json").write_text(json.dumps(info, indent=2))
    for name in FILES:
        _fsync_file(tmp / name)
    _fsync_dir(tmp)


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def _write_latest(ckpt_dir: Path, name: str) -> None:
    tmp = ckpt_dir / f".{LATEST}.tmp-{os.getpid()}"
    tmp.write_text(name + "\n")
    _fsync_file(tmp)
    os.replace(tmp, ckpt_dir / LATEST)
    _fsync_dir(ckpt_dir)


def save_checkpoint(
    run_dir: Path,
    step: int,
    *,
    model_state: dict[str, Tensor],
    train_state: dict,
    recipe: dict,
    keep: int = 3,
    meta: dict | None = None,
) -> Path:
    """Atomically write checkpoint `step` and point `latest` at it (see module docstring)."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale(ckpt_dir)
    tmp = ckpt_dir / f".tmp-{step_dir_name(step)}-{os.getpid()}"
    tmp.mkdir()
    _write_dir(tmp, step, model_state, train_state, recipe, meta or {})
    _pause("after_tmp_write", step)
    final = ckpt_dir / step_dir_name(step)
    if final.exists():  # same step saved again: move the old one aside first
        old = ckpt_dir / f".tmp-old-{step_dir_name(step)}-{os.getpid()}"
        if _read_latest_name(ckpt_dir) == final.name:
            _write_latest_prev(ckpt_dir, final.name)
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_dir(ckpt_dir)
    _pause("before_latest", step)
    _write_latest(ckpt_dir, final.name)
    _pause("after_latest", step)
    _prune(ckpt_dir, keep, final.name)
    _remove_stale(ckpt_dir)
    return final


def _write_latest_prev(ckpt_dir: Path, current: str) -> None:
    """Before replacing the directory `latest` names, point `latest` at another complete one."""
    others = [p for p in list_checkpoints(ckpt_dir.parent) if p.name != current]
    if others:
        _write_latest(ckpt_dir, others[-1].name)


def _remove_stale(ckpt_dir: Path) -> None:
    for p in ckpt_dir.glob(".tmp-*"):
        ours = p.name.endswith(f"-{os.getpid()}")
        if p.is_dir() and (not ours or p.name.startswith(".tmp-old-")):
            shutil.rmtree(p, ignore_errors=True)


def _prune(ckpt_dir: Path, keep: int, current: str) -> None:
    ckpts = list_checkpoints(ckpt_dir.parent)
    for p in ckpts[: max(0, len(ckpts) - keep)]:
        if p.name != current:
            shutil.rmtree(p, ignore_errors=True)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete step directories of a run, oldest first."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    if not ckpt_dir.is_dir():
        return []
    dirs = [p for p in ckpt_dir.glob("step-*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(dirs, key=lambda p: int(p.name[5:]))


def _read_latest_name(ckpt_dir: Path) -> str | None:
    try:
        return (ckpt_dir / LATEST).read_text().strip() or None
    except FileNotFoundError:
        return None


def find_latest(run_dir: Path) -> Path | None:
    """The checkpoint `latest` names; None if the run has none."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    name = _read_latest_name(ckpt_dir)
    if name is None:
        if list_checkpoints(run_dir):
            raise CheckpointError(f"{ckpt_dir}: step directories but no 'latest' file")
        return None
    path = ckpt_dir / name
    _check_complete(path)
    return path


def _check_complete(path: Path) -> None:
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory not found")
    missing = [f for f in FILES if not (path / f).is_file()]
    if missing:
        raise CheckpointError(f"{path}: incomplete checkpoint, missing {', '.join(missing)}")


def _load_model_state(path: Path) -> dict[str, Tensor]:
    with safe_open(str(path), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    for alias, key in aliases.items():
        state[alias] = state[key]
    return state


def load_checkpoint(path: Path) -> Checkpoint:
    """Load a step directory, or the latest checkpoint of a run directory."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint or run directory")
    if (path / "checkpoints").is_dir():
        latest = find_latest(path)
        if latest is None:
            raise CheckpointError(f"{path}: run directory has no checkpoint")
        path = latest
    _check_complete(path)
    try:
        model_state = _load_model_state(path / "model.safetensors")
        train_state = torch.load(path / "train_state.pt", weights_only=True, map_location="cpu")
        recipe = yaml.safe_load((path / "recipe.yaml").read_text())
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, RuntimeError, ValueError, yaml.YAMLError) as err:
        raise CheckpointError(f"{path}: unreadable checkpoint ({err})") from None
    return Checkpoint(
        path=path,
        step=int(meta["step"]),
        model_state=model_state,
        train_state=train_state,
        recipe=recipe,
        meta=meta,
    )
