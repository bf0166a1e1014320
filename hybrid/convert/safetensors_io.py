"""Hugging Face weight files: `model.safetensors`, or shards `model-0000i-of-0000n.safetensors`
with `model.safetensors.index.json` ({"metadata": {"total_size": bytes}, "weight_map":
{name: file}}) once the weights exceed the shard size, as `save_pretrained` writes them."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm import tqdm

from hybrid.recipe.schema import ConfigError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
DEFAULT_MAX_SHARD = "5GB"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20}
_UNITS["GIB"] = 2**30
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000 (KB/MB/GB decimal, KiB/MiB/GiB binary, or plain bytes)."""
    match = _SIZE.match(str(text))
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _UNITS or float(match.group(1)) <= 0:
        raise ConfigError(f"--max-shard-size {text!r}: expected a size such as 5GB, 500MB, 2GiB")
    return int(float(match.group(1)) * _UNITS[unit])


def _independent(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Contiguous CPU tensors, none sharing storage with another (safetensors' requirement)."""
    seen: set[int] = set()
    out = {}
    for key, t in state.items():
        t = t.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel():
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


def _plan(state: Mapping[str, Tensor], max_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for key, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


def write_safetensors(
    state: Mapping[str, Tensor], out_dir: Path, max_shard_bytes: int
) -> list[str]:
    """Write `state` into `out_dir` (sharded above `max_shard_bytes`); returns the file names."""
    tensors = _independent(state)
    shards = _plan(tensors, max_shard_bytes)
    if len(shards) == 1:
        save_file(tensors, str(out_dir / SINGLE), metadata={"format": "pt"})
        return [SINGLE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, keys in tqdm(list(zip(names, shards)), desc="writing shards", unit="shard"):
        save_file({k: tensors[k] for k in keys}, str(out_dir / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return [*names, INDEX]


def read_safetensors(hf_dir: Path) -> dict[str, Tensor]:
    """Every tensor of an HF model directory (single file or index + shards), on CPU."""
    if (hf_dir / INDEX).is_file():
        try:
            weight_map = json.loads((hf_dir / INDEX).read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as err:
            raise ConfigError(f"{hf_dir / INDEX}: unreadable index ({err})") from None
        files = sorted(set(weight_map.values()))
    elif (hf_dir / SINGLE).is_file():
        files = [SINGLE]
    else:
        raise ConfigError(
            f"{hf_dir}: no {SINGLE} or {INDEX} (only safetensors weights are read; convert "
            "pytorch_model.bin with transformers' save_pretrained first)"
        )
    out: dict[str, Tensor] = {}
    for name in tqdm(files, desc="reading weights", unit="file", disable=len(files) == 1):
        path = hf_dir / name
        if not path.is_file():
            raise ConfigError(f"{path}: missing (named by {INDEX})")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                    out[key] = f.get_tensor(key)
        except (OSError, RuntimeError, ValueError) as err:  # safetensors' own error types
            raise ConfigError(f"{path}: unreadable ({str(err).splitlines()[0]})") from None
    return out


def cast_state(state: Mapping[str, Tensor], dtype: torch.dtype | None, keep_fp32: tuple[str, ...]):
    """Floating tensors cast to `dtype` (None: unchanged), except names ending in `keep_fp32`."""
    if dtype is None:
        return dict(state)
    cache: dict[int, Tensor] = {}  # tied tensors stay one tensor
    out = {}
    for key, t in state.items():
        if not t.is_floating_point() or key.endswith(keep_fp32):
            out[key] = t.float() if t.is_floating_point() else t
            continue
        if id(t) not in cache:
            cache[id(t)] = t.to(dtype)
        out[key] = cache[id(t)]
    return out
