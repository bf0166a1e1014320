"""Atomic, resumable training checkpoints for the single-node trainer.

Layout of one run::

    RUN_DIR/checkpoints/
        latest                 text file naming the current step directory ("step-00000100")
        step-00000100/
            model.safetensors  model weights on CPU; tied tensors stored once, aliases in metadata
            train_state.pt     optimizer, scheduler, RNG, data position...; loads with
                               torch.load(path, weights_only=True)
            recipe.yaml        the resolved recipe
            meta.json          format, step, file sizes, and the caller's `meta` fields
        .tmp-*                 a save in progress, or what a killed save left; the next save
                               removes these and loading never looks at them

Crash safety. A save writes every file into a fresh `.tmp-*` directory (files and directory
fsynced), renames it to its final name (fsync `checkpoints/`), then replaces `latest` (temporary
file, fsync, os.replace, fsync). A step directory thus only ever appears complete, and a process
killed at any moment leaves `latest` naming either the previous or the new checkpoint. Saving a
step that already exists swaps the two directories with one atomic exchange (Linux
renameat2(RENAME_EXCHANGE)); where the filesystem cannot exchange, the old directory is moved
aside first and a warning says that this one save is not crash-atomic. Old checkpoints beyond
`keep` are pruned only after `latest` names the new one, by moving each to a `.tmp-*` name
before deleting it, and the directory `latest` names is never pruned.

Only one process may save into a run directory at a time (rank 0 of the trainer). An engine
that writes its own sharded files from every rank (DeepSpeed) gets the temporary directory from
`begin_save` on rank 0, writes into it from all ranks, and rank 0 then passes it to
`save_checkpoint(tmp_dir=...)`: the extra files are fsynced, their sizes recorded in meta.json
(and checked on load), and they are installed with the rest by the same rename.

For tests, the environment variable HYBRID_CKPT_TEST_PAUSE=PHASE[@STEP][:SECONDS] (PHASE one of
`PAUSE_PHASES`) makes a save (only the save of STEP, when given) print a line to stderr at that
phase and sleep SECONDS, or stop there until killed when no SECONDS are given, so that a test
can kill the process at a known point.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import functools
import json
import logging
import os
import re
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hybrid.recipe.schema import ConfigError

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
LATEST = "latest"
MODEL_FILE = "model.safetensors"
TRAIN_STATE_FILE = "train_state.pt"
RECIPE_FILE = "recipe.yaml"
META_FILE = "meta.json"
FILES = (MODEL_FILE, TRAIN_STATE_FILE, RECIPE_FILE, META_FILE)
TMP_PREFIX = ".tmp-"
FORMAT = "hybrid-checkpoint"
FORMAT_VERSION = 1

PAUSE_ENV = "HYBRID_CKPT_TEST_PAUSE"
PAUSE_PHASES = (
    "mid_tmp_write",  # model.safetensors written into the temporary directory, the rest not yet
    "after_tmp_write",  # temporary directory complete and fsynced, not renamed
    "after_rename",  # step directory in place (or exchanged), `latest` untouched
    "before_latest",  # new `latest` written to a temporary file, not yet replaced
    "after_latest",  # `latest` names the new checkpoint, nothing pruned yet
    "mid_prune",  # an old checkpoint moved to a .tmp- name, not yet deleted
)

_STEP_RE = re.compile(r"step-(\d{8,})")
_PAUSE_RE = re.compile(r"(?P<phase>\w+)(?:@(?P<step>\d+))?(?::(?P<seconds>\d+(?:\.\d*)?))?")
_META_RESERVED = ("format", "format_version", "step", "saved_at", "files")
_ALIASES_KEY = "hybrid.aliases"
_KEYS_KEY = "hybrid.keys"


class CheckpointError(ConfigError):
    """A checkpoint that cannot be found or read; the message names the path and the problem.

    A ConfigError (so a ValueError): the CLI prints it as one line.
    """


@dataclasses.dataclass
class Checkpoint:
    """A loaded checkpoint. `model_state` tensors are on CPU; tied keys share one tensor."""

    path: Path
    step: int
    model_state: dict[str, torch.Tensor]
    train_state: dict[str, Any]
    recipe: dict[str, Any]
    meta: dict[str, Any]


def step_dir_name(step: int) -> str:
    """The directory name of a step: 100 -> 'step-00000100'."""
    return f"step-{step:08d}"


def _parse_step(name: str) -> int | None:
    match = _STEP_RE.fullmatch(name)
    return int(match.group(1)) if match else None


# ----------------------------------------------------------------------------- saving


def save_checkpoint(
    run_dir: Path,
    step: int,
    *,
    model_state: Mapping[str, torch.Tensor],
    train_state: Mapping[str, Any],
    recipe: Mapping[str, Any],
    keep: int = 3,
    meta: Mapping[str, Any] | None = None,
    tmp_dir: Path | None = None,
) -> Path:
    """Write a checkpoint atomically, point `latest` at it, prune all but the last `keep` (0: keep
    every checkpoint; the one `latest` names is always kept).

    `tmp_dir`: a directory from `begin_save(run_dir, step)` that may already hold other files
    (an engine's shards); they become part of the checkpoint.

    `train_state` may hold only tensors, dicts, lists, tuples, ints, floats, strs, bools and None
    (tensors are moved to CPU); `meta` must be JSON-serialisable and must not use the keys
    format, format_version, step, saved_at or files. Returns the step directory.
    """
    pause = _pause_hook(step)
    payload = _prepare(step, keep, model_state, train_state, recipe, meta)
    ckpt_dir = Path(run_dir) / CHECKPOINTS_DIR
    name = step_dir_name(step)
    if tmp_dir is None:
        tmp = begin_save(run_dir, step)
    else:
        tmp = Path(tmp_dir)
        if tmp.parent != ckpt_dir or not tmp.name.startswith(f"{TMP_PREFIX}{name}-"):
            raise ValueError(f"tmp_dir {tmp} was not made by begin_save({run_dir}, {step})")
    _write_files(tmp, step, payload, pause)
    pause("after_tmp_write")

    final = ckpt_dir / name
    displaced = _install(tmp, final)
    _fsync_path(ckpt_dir)
    pause("after_rename")
    _write_latest(ckpt_dir, name, pause)
    pause("after_latest")
    if displaced is not None:
        shutil.rmtree(displaced)
    _prune(ckpt_dir, keep, name, pause)
    log.info("saved checkpoint %s", final)
    return final


def begin_save(run_dir: Path, step: int) -> Path:
    """Create the temporary directory of a save of `step` (removing what killed saves left)."""
    ckpt_dir = Path(run_dir) / CHECKPOINTS_DIR
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale(ckpt_dir)
    tmp = ckpt_dir / f"{TMP_PREFIX}{step_dir_name(step)}-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    return tmp


@dataclasses.dataclass
class _Payload:
    tensors: dict[str, torch.Tensor]
    aliases: dict[str, str]
    keys: list[str]
    train_state: dict[str, Any]
    recipe_text: str
    meta: dict[str, Any]


def _prepare(
    step: int,
    keep: int,
    model_state: Mapping[str, torch.Tensor],
    train_state: Mapping[str, Any],
    recipe: Mapping[str, Any],
    meta: Mapping[str, Any] | None,
) -> _Payload:
    """Check the arguments and convert everything before a byte is written."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
        raise ValueError(f"keep must be an int >= 0 (0: keep all), got {keep!r}")
    tensors, aliases = _pack_model_state(model_state)
    state = _to_cpu_checked(train_state, "train_state", {})
    if not isinstance(recipe, Mapping):
        raise TypeError(f"recipe must be a mapping (the recipe as plain data), got {type(recipe)}")
    try:
        recipe_text = yaml.safe_dump(dict(recipe), sort_keys=False)
    except yaml.YAMLError as err:
        raise TypeError(f"recipe has a value with no YAML form: {_one_line(err)}") from err
    user = dict(meta or {})
    clash = [k for k in _META_RESERVED if k in user]
    if clash:
        raise ValueError(f"meta must not set {clash}: these are written by save_checkpoint")
    json.dumps(user)  # TypeError now, before anything is written
    return _Payload(tensors, aliases, list(model_state), state, recipe_text, user)


def _write_files(tmp: Path, step: int, payload: _Payload, pause: Callable[[str], None]) -> None:
    """Write and fsync the four files, meta.json (with the others' sizes) last."""
    metadata = {"format": "pt", _ALIASES_KEY: json.dumps(payload.aliases)}
    metadata[_KEYS_KEY] = json.dumps(payload.keys)
    save_file(payload.tensors, str(tmp / MODEL_FILE), metadata=metadata)
    _fsync_path(tmp / MODEL_FILE)
    pause("mid_tmp_write")
    with open(tmp / TRAIN_STATE_FILE, "wb") as f:
        torch.save(payload.train_state, f)
        f.flush()
        os.fsync(f.fileno())
    _write_text(tmp / RECIPE_FILE, payload.recipe_text)
    files = {n: (tmp / n).stat().st_size for n in (MODEL_FILE, TRAIN_STATE_FILE, RECIPE_FILE)}
    for path in sorted(tmp.rglob("*")):  # files an engine wrote into tmp_dir
        name = path.relative_to(tmp).as_posix()
        if path.is_file() and name not in FILES:
            _fsync_path(path)
            files[name] = path.stat().st_size
    for path in sorted(p for p in tmp.rglob("*") if p.is_dir()):
        _fsync_path(path)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "step": step}
    meta.update(saved_at=datetime.now(timezone.utc).isoformat(timespec="seconds"), files=files)
    _write_text(tmp / META_FILE, json.dumps({**meta, **payload.meta}, indent=2) + "\n")
    _fsync_path(tmp)


def _pack_model_state(
    model_state: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """CPU, contiguous tensors with each storage once, plus {alias key: stored key}.

    Keys that are the same view of one storage (tied weights) are stored once and recorded as
    aliases. Different views of one storage (a slice of another entry, a transpose) are stored
    as independent copies: safetensors cannot express the overlap.
    """
    if not isinstance(model_state, Mapping):
        raise TypeError(f"model_state must be a mapping of str to Tensor, got {type(model_state)}")
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    views: dict[tuple, str] = {}
    storages: dict[tuple, list[str]] = {}
    for key, value in model_state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise TypeError(f"model_state[{key!r}]: expected str -> Tensor, got {type(value)}")
        t = value.detach()
        if t.device.type == "meta":
            raise TypeError(f"model_state[{key!r}] is on the meta device (no data)")
        if t.numel() == 0:  # fresh, so it shares no storage with anything
            tensors[key] = torch.empty(t.shape, dtype=t.dtype)
            continue
        ptr = (str(t.device), t.untyped_storage().data_ptr())
        view = (*ptr, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if view in views:
            aliases[key] = views[view]
            continue
        views[view] = key
        storages.setdefault(ptr, []).append(key)
        tensors[key] = t
    for keys in storages.values():
        if len(keys) > 1:
            for key in keys:
                tensors[key] = tensors[key].clone(memory_format=torch.contiguous_format)
    return {k: t.cpu().contiguous() for k, t in tensors.items()}, aliases


def _to_cpu_checked(obj: Any, where: str, memo: dict[int, torch.Tensor]) -> Any:
    """A copy of `obj` with tensors on CPU; TypeError for anything weights_only cannot load."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, torch.Tensor):
        if id(obj) not in memo:
            memo[id(obj)] = obj.detach().cpu()
        return memo[id(obj)]
    if isinstance(obj, Mapping):
        out = {}
        for key, value in obj.items():
            if key is not None and not isinstance(key, (bool, int, float, str)):
                raise TypeError(f"{where}: key {key!r} is not a str, int, float or bool")
            out[key] = _to_cpu_checked(value, f"{where}[{key!r}]", memo)
        return out
    if isinstance(obj, (list, tuple)):
        items = [_to_cpu_checked(v, f"{where}[{i}]", memo) for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    raise TypeError(
        f"{where}: {type(obj).__module__}.{type(obj).__qualname__} cannot be loaded with "
        "torch.load(weights_only=True); use tensors, dicts, lists, tuples, ints, floats, strs, "
        "bools or None"
    )


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_path(path: Path) -> None:
    """fsync a file or a directory (a no-op where directories cannot be opened: Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if path.is_dir():
            return
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_latest(ckpt_dir: Path, name: str, pause: Callable[[str], None]) -> None:
    tmp = ckpt_dir / f"{TMP_PREFIX}{LATEST}-{uuid.uuid4().hex[:12]}"
    _write_text(tmp, name + "\n")
    pause("before_latest")
    os.replace(tmp, ckpt_dir / LATEST)
    _fsync_path(ckpt_dir)


def _install(tmp: Path, final: Path) -> Path | None:
    """Move `tmp` to `final`; when `final` exists, return where its old content now lies."""
    if not final.exists():
        os.rename(tmp, final)
        return None
    if _exchange(tmp, final):
        return tmp
    log.warning(
        "%s: this filesystem cannot exchange directories atomically; replacing an existing "
        "checkpoint, a crash in the next moment would leave `latest` naming a missing directory",
        final,
    )
    old = final.parent / f"{TMP_PREFIX}replaced-{final.name}-{uuid.uuid4().hex[:12]}"
    os.rename(final, old)
    os.rename(tmp, final)
    return old


@functools.lru_cache(maxsize=1)
def _renameat2() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    fn = _renameat2()
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _remove_stale(ckpt_dir: Path) -> None:
    for entry in ckpt_dir.iterdir():
        if not entry.name.startswith(TMP_PREFIX):
            continue
        log.info("removing %s, left by an interrupted save", entry)
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _prune(ckpt_dir: Path, keep: int, current: str, pause: Callable[[str], None]) -> None:
    if keep == 0:
        return
    doomed = [p for p in list_checkpoints(ckpt_dir.parent)[:-keep] if p.name != current]
    for path in doomed:
        grave = ckpt_dir / f"{TMP_PREFIX}delete-{path.name}-{uuid.uuid4().hex[:12]}"
        os.rename(path, grave)
        pause("mid_prune")
        shutil.rmtree(grave)
        log.info("removed old checkpoint %s", path)
    if doomed:
        _fsync_path(ckpt_dir)


def _pause_hook(step: int) -> Callable[[str], None]:
    """The test hook of this save: a function of the phase (see the module docstring)."""
    text = os.environ.get(PAUSE_ENV, "").strip()
    match = _PAUSE_RE.fullmatch(text)
    if text and (match is None or match["phase"] not in PAUSE_PHASES):
        raise ValueError(
            f"{PAUSE_ENV}={text!r}: expected PHASE[@STEP][:SECONDS], PHASE one of "
            f"{list(PAUSE_PHASES)}"
        )
    wanted = match["phase"] if match else None
    at_step = int(match["step"]) if match and match["step"] else None
    delay = float(match["seconds"]) if match and match["seconds"] else None

    def pause(phase: str) -> None:
        if phase != wanted or at_step not in (None, step):
            return
        print(f"{PAUSE_ENV}: step {step} paused at {phase}", file=sys.stderr, flush=True)
        if delay is not None:
            time.sleep(delay)
            return
        while True:
            time.sleep(3600)

    return pause


# ----------------------------------------------------------------------------- finding, loading


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Step directories under RUN_DIR/checkpoints, sorted by step (ignores .tmp-* entries)."""
    ckpt_dir = Path(run_dir) / CHECKPOINTS_DIR
    if not ckpt_dir.is_dir():
        return []
    found = [(s, p) for p in ckpt_dir.iterdir() if (s := _parse_step(p.name)) is not None]
    return [p for s, p in sorted(found) if p.is_dir()]


def find_latest(run_dir: Path) -> Path | None:
    """The step directory `latest` names, or None when the run has no checkpoint.

    Raises CheckpointError when `latest` is unreadable or names a missing or incomplete
    directory.
    """
    ckpt_dir = Path(run_dir) / CHECKPOINTS_DIR
    latest = ckpt_dir / LATEST
    if not latest.exists():
        found = list_checkpoints(run_dir)
        if not found:
            return None
        # Only a kill between the first save's rename and its `latest` leaves this state.
        log.warning("%s is missing; using the newest step directory %s", latest, found[-1])
        return _check_complete(found[-1])
    try:
        name = latest.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{latest}: unreadable ({_one_line(err)})") from err
    if _parse_step(name) is None:
        raise CheckpointError(f"{latest}: names {name!r}, not a step-NNNNNNNN directory")
    step_dir = ckpt_dir / name
    if not step_dir.is_dir():
        raise CheckpointError(f"{latest}: names {name}, but {step_dir} does not exist")
    return _check_complete(step_dir)


def _check_complete(step_dir: Path) -> Path:
    missing = [n for n in FILES if not (step_dir / n).is_file()]
    if missing:
        raise CheckpointError(f"{step_dir}: incomplete checkpoint, missing {', '.join(missing)}")
    return step_dir


def load_checkpoint(path: Path) -> Checkpoint:
    """Load a step directory, or the checkpoint `latest` names when `path` is a run directory.

    Tensors are loaded on CPU; train_state.pt is read with weights_only=True.
    """
    step_dir = _resolve(Path(path))
    _check_complete(step_dir)
    meta = _read_meta(step_dir)
    model_state = _read_model(step_dir / MODEL_FILE)
    train_state = _read(
        step_dir / TRAIN_STATE_FILE, lambda p: torch.load(p, map_location="cpu", weights_only=True)
    )
    recipe = _read(step_dir / RECIPE_FILE, lambda p: yaml.safe_load(p.read_text(encoding="utf-8")))
    return Checkpoint(step_dir, meta["step"], model_state, train_state, recipe, meta)


def _resolve(path: Path) -> Path:
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint or run directory")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (expected a step or run directory)")
    if (path / META_FILE).exists() or _parse_step(path.name) is not None:
        return path
    for run_dir in (path, path.parent):  # a run directory, or its checkpoints/ directory
        if run_dir / CHECKPOINTS_DIR == path or (run_dir / CHECKPOINTS_DIR).is_dir():
            found = find_latest(run_dir)
            if found is None:
                raise CheckpointError(f"{run_dir / CHECKPOINTS_DIR}: no checkpoint saved yet")
            return found
    raise CheckpointError(
        f"{path}: not a checkpoint (no {META_FILE}) and not a run directory (no {CHECKPOINTS_DIR}/)"
    )


def _read(path: Path, reader: Callable[[Path], Any]) -> dict[str, Any]:
    """`reader(path)`, which must give a dict; any failure becomes a one-line CheckpointError."""
    try:
        value = reader(path)
    except Exception as err:  # each reader raises its own kinds (pickle, YAML, JSON, OS errors)
        raise CheckpointError(f"{path}: unreadable ({_one_line(err)})") from err
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a mapping, got {type(value).__name__}")
    return value


def _read_meta(step_dir: Path) -> dict[str, Any]:
    path = step_dir / META_FILE
    meta = _read(path, lambda p: json.loads(p.read_text(encoding="utf-8")))
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} meta file")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format_version {meta.get('format_version')!r}, this code reads "
            f"{FORMAT_VERSION}"
        )
    step = meta.get("step")
    if not isinstance(step, int) or (_parse_step(step_dir.name) not in (None, step)):
        raise CheckpointError(f"{path}: step {step!r} does not match the directory name")
    files = meta.get("files")
    if not isinstance(files, dict):
        raise CheckpointError(f"{path}: no 'files' table")
    for name in (MODEL_FILE, TRAIN_STATE_FILE, RECIPE_FILE, *files):
        path = step_dir / name
        actual, size = path.stat().st_size if path.is_file() else None, files.get(name)
        if actual is None:
            raise CheckpointError(f"{path}: missing, though {META_FILE} lists it")
        if actual != size:
            raise CheckpointError(
                f"{path}: {actual} bytes, {META_FILE} records {size} (truncated or altered)"
            )
    return meta


def _read_model(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        stored = load_file(str(path), device="cpu")
        aliases = json.loads(metadata.get(_ALIASES_KEY, "{}"))
        keys = json.loads(metadata.get(_KEYS_KEY, "null")) or list(stored) + list(aliases)
    except Exception as err:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: unreadable ({_one_line(err)})") from err
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        source = aliases.get(key, key)
        if source not in stored:
            raise CheckpointError(f"{path}: tensor {source!r} (for {key!r}) is missing")
        out[key] = stored[source]
    return out


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    first = text[0] if text else type(err).__name__
    return first if len(first) <= 200 else first[:197] + "..."
