"""Launch tuning: pick the fastest of a few launch configurations once per shape, and keep the
choice on disk so later processes on the same GPU model reuse it.

A `LaunchTuner` does for a launcher that may run several kernels what `triton.autotune` does
for one kernel: on a key's first use it times each candidate (`triton.testing.do_bench`,
median) and keeps the fastest. Choices are written to a JSON file per GPU model, Triton and CUDA
version (`tune_cache_path`), keyed by the tuner's name, the kernel source's hash and the shape
key; a stored choice is used only while it is still one of the candidates. So a training run
tunes once, its restarts and the next runs start at once and take the same launches (bitwise
reproducible across processes), and editing the kernels retunes.

Environment:
- HYBRID_KERNELS_TUNE=0: take the first (heuristic) candidate untimed, no cache involved.
- HYBRID_KERNELS_TUNE_CACHE: the cache folder (default `$XDG_CACHE_HOME/hybrid_kernels`, i.e.
  `~/.cache/hybrid_kernels`), or 0 to neither read nor write it (always time afresh).

The cache never fails a run: an unreadable file is reported once and replaced, a folder that
cannot be written is reported once and tuning goes on in memory. Files are replaced atomically
under a lock, so ranks of one node tuning at once merge their choices.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Hashable, Iterator, Sequence
from pathlib import Path

import torch

try:
    import fcntl
except ImportError:  # not on Windows: replacing the file stays atomic, merging may lose a choice
    fcntl = None

log = logging.getLogger("hybrid_kernels")

ENV_TUNE = "HYBRID_KERNELS_TUNE"
ENV_TUNE_CACHE = "HYBRID_KERNELS_TUNE_CACHE"
_WARNED: set[tuple[str, str]] = set()  # cache problems reported (once per process, file, kind)


def tuning_enabled() -> bool:
    """False when HYBRID_KERNELS_TUNE=0: launch tuners take their heuristic launch untimed
    (no start-up timing; the test suite runs so)."""
    return os.environ.get(ENV_TUNE, "1") != "0"


def source_hash(path: str | os.PathLike) -> str:
    """A short hash of a kernel file's text: cached choices are kept per version of it."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def _cache_folder() -> Path | None:
    """HYBRID_KERNELS_TUNE_CACHE, else $XDG_CACHE_HOME/hybrid_kernels (an empty or relative
    XDG_CACHE_HOME counts as unset, as the XDG spec says), else ~/.cache/hybrid_kernels; None
    when turned off or when no home folder can be found."""
    folder = os.environ.get(ENV_TUNE_CACHE, "")
    if folder == "0":
        return None
    if folder:
        return Path(folder).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    try:
        base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"
    except RuntimeError:  # no HOME and no passwd entry (e.g. an arbitrary container uid)
        _warn_once(
            Path("~/.cache"), "home", f"no home folder; set {ENV_TUNE_CACHE} to keep choices"
        )
        return None
    return base / "hybrid_kernels"


def tune_cache_path(device: torch.device) -> Path | None:
    """The tuning cache file for `device`'s GPU model and this Triton / CUDA (or ROCm), or None
    when HYBRID_KERNELS_TUNE_CACHE=0 or no folder can be found."""
    folder = _cache_folder()
    if folder is None:
        return None
    import triton

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    runtime = f"rocm{torch.version.hip}" if torch.version.hip else f"cuda{torch.version.cuda}"
    tag = f"{name}-triton{triton.__version__}-{runtime}"
    return folder / f"tune-{re.sub(r'[^A-Za-z0-9.-]+', '_', tag)}.json"


def _warn_once(path: Path, kind: str, message: str) -> None:
    if (str(path), kind) not in _WARNED:
        _WARNED.add((str(path), kind))
        log.warning("launch tuning cache %s: %s", path, message)


def _read(path: Path) -> dict:
    """The cache's entries ({} when absent; unreadable files are reported and treated as
    empty, to be replaced by the next write)."""
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError):  # (a folder that can't exist: the write says)
        return {}
    except (OSError, ValueError) as err:
        _warn_once(path, "read", f"unreadable ({err}); it will be rewritten")
        return {}
    if not isinstance(data, dict):
        _warn_once(path, "read", "not a JSON object; it will be rewritten")
        return {}
    return data


@contextlib.contextmanager
def _locked(path: Path, wait_s: float = 10.0) -> Iterator[None]:
    """Hold an exclusive lock beside `path` where the OS and file system offer one, waiting at
    most `wait_s` (a hung lock on a network file system must not stop training: past that,
    go on unlocked; the replace stays atomic, at worst a concurrent choice is lost)."""
    with open(path.with_name(path.name + ".lock"), "a") as handle:
        deadline = time.monotonic() + wait_s
        while fcntl is not None:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    _warn_once(path, "lock", f"still locked after {wait_s:.0f} s; writing anyway")
                    break
                time.sleep(0.05)
            except OSError:  # a file system without locks
                break
        yield


def _write(path: Path, entry: str, config: dict, configs: Sequence[dict]) -> dict:
    """Store `entry: config` in the cache file (read, merge, atomically replace, under a lock)
    unless another process stored a choice among `configs` first: then return that one, so
    that processes tuning at once (ranks of a node) all keep the first stored choice."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(path):
            data = _read(path)
            if data.get(entry) in configs:
                return configs[configs.index(data[entry])]
            data[entry] = config
            # a fresh temporary name; mode 0666 less the umask (mkstemp's 0600 would hide the
            # cache from other users of a shared folder)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(data, f, indent=1, sort_keys=True)
                os.replace(tmp, path)
            except BaseException:
                os.unlink(tmp)
                raise
    except OSError as err:
        _warn_once(path, "write", f"not written ({err}); choices stay in this process only")
    return config


def _storable(config: dict) -> bool:
    """Whether `config` comes back equal from JSON (tuples and non-string keys do not)."""
    try:
        return json.loads(json.dumps(config)) == config
    except (TypeError, ValueError):
        return False


def _on(device: torch.device) -> contextlib.AbstractContextManager:
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


class LaunchTuner:
    """Picks, once per key, the fastest of a few launch configurations (dicts of plain values)
    of a launcher. The candidates must depend on nothing but the key (so that a stored choice
    means the same in every process). The first configuration is the untimed choice where
    timing is impossible, pointless or turned off: one candidate, a non-CUDA device, a CUDA
    graph being captured (a stored choice is still used), or HYBRID_KERNELS_TUNE=0. `source`
    is the kernel file whose hash versions the disk cache. Each choice is logged once."""

    def __init__(self, name: str, source: str | os.PathLike | None = None) -> None:
        self.name = name
        self._version = source_hash(source) if source is not None else ""
        self._best: dict[Hashable, dict] = {}

    def choose(self, key: Hashable, configs: Sequence[dict] | Callable[[], Sequence[dict]],
               run: Callable[[dict], object], device: torch.device) -> dict:  # fmt: skip
        """The fastest of `configs` (or of what a callable returns: built only on a key's first
        use) for `key` on `device`, from this process's choices, else from the disk cache,
        else by timing `run(config)` for each. A candidate other than the first that runs out
        of GPU memory or does not fit this GPU (shared memory, registers) is skipped and
        logged; the first must run. A choice made while a candidate ran out of memory (which
        may pass another time) is not stored on disk."""
        mem_key = (str(device), key)
        if mem_key in self._best:
            return self._best[mem_key]
        if callable(configs):
            configs = configs()
        if len(configs) == 1 or not self._timeable(device):
            return configs[0]
        path = tune_cache_path(device)
        entry = f"{self.name} | {self._version} | {key!r}"
        stored = _read(path).get(entry) if path is not None else None
        if stored in configs:
            best = configs[configs.index(stored)]
            log.info("%s %r: %s (tuned before: %s)", self.name, key, best or "the default", path)
        elif self._capturing(device):  # no timing inside a CUDA graph capture
            return configs[0]
        else:
            best, out_of_memory = self._tune(key, configs, run, device)
            if path is not None and not out_of_memory and _storable(best):
                best = _write(path, entry, best, configs)
        self._best[mem_key] = best
        return best

    def _timeable(self, device: torch.device) -> bool:
        return device.type == "cuda" and tuning_enabled()

    def _capturing(self, device: torch.device) -> bool:
        with _on(device):
            return torch.cuda.is_current_stream_capturing()

    def _tune(self, key: Hashable, configs: Sequence[dict], run: Callable[[dict], object],
              device: torch.device) -> tuple[dict, bool]:  # fmt: skip
        """(the fastest config, whether a candidate was skipped for running out of memory)."""
        log.info("%s %r: compiling and timing %d launches (once per shape and GPU model)",
                 self.name, key, len(configs))  # fmt: skip
        with _on(device):  # time where the kernels run
            got = [self._time(run, c, required=i == 0) for i, c in enumerate(configs)]
        times = [float("inf") if t is None else t for t in got]
        best = min(range(len(configs)), key=times.__getitem__)
        log.info("%s %r: chose %s (%.3f ms; the first candidate %.3f ms)", self.name, key,
                 configs[best] or "the default", times[best], times[0])  # fmt: skip
        every = "; ".join(f"{c or 'default'} {t:.3f} ms" for c, t in zip(configs, times))
        log.debug("%s %r: every candidate: %s", self.name, key, every)
        return configs[best], None in got

    def _time(self, run: Callable[[dict], object], config: dict, required: bool) -> float | None:
        """do_bench's median ms; inf for a candidate that does not fit this GPU, None for one
        that ran out of memory (both skipped; the first must run)."""
        from triton.runtime import errors
        from triton.testing import do_bench

        unfit = (torch.OutOfMemoryError, errors.OutOfResources, errors.PTXASError)
        try:
            return do_bench(lambda: run(config), warmup=2, rep=10, return_mode="median")
        except unfit as err:
            if required:
                raise
            log.info("%s: skipped %s (%s)", self.name, config, type(err).__name__)
            oom = isinstance(err, torch.OutOfMemoryError)
        torch.cuda.empty_cache()  # (after the handler: its traceback held the tensors)
        return None if oom else float("inf")


__all__ = ["ENV_TUNE", "ENV_TUNE_CACHE", "LaunchTuner", "source_hash", "tune_cache_path",
           "tuning_enabled"]  # fmt: skip
