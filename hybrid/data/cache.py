"""Content-keyed cache directories, built atomically and safely under concurrent builders.

An entry is a directory `ROOT/NAME-KEY/` holding whatever the builder wrote plus `meta.json`.
It is built in a private temporary directory and renamed into place (an atomic step on POSIX),
so readers see either nothing or a complete entry. Builders on one machine also take an
advisory file lock, so when several ranks start together one builds and the others wait and
reuse it; where locking is unavailable (some network file systems) they all build and the first
rename wins.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
META_FILE = "meta.json"


def cache_key(parts: Any) -> str:
    """A short stable hash of JSON-serialisable `parts`."""
    text = json.dumps({"format": CACHE_FORMAT, "parts": parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


def read_meta(entry: Path) -> dict[str, Any]:
    return json.loads((entry / META_FILE).read_text())


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: rely on the atomic rename alone
        yield
        return
    with open(path, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        except OSError:  # e.g. a file system without locks
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def cached_entry(
    root: str | os.PathLike,
    name: str,
    key: str,
    build: Callable[[Path], dict[str, Any]],
) -> Path:
    """The directory `root/name-key`, calling `build(tmp_dir) -> meta` first if it is missing.

    `build` writes its files into `tmp_dir` and returns the metadata to store in `meta.json`.
    """
    root = Path(root).expanduser()
    entry = root / f"{name}-{key}"
    if (entry / META_FILE).is_file():
        return entry
    root.mkdir(parents=True, exist_ok=True)
    with _file_lock(root / f".{name}-{key}.lock"):
        if (entry / META_FILE).is_file():  # another process built it while we waited
            return entry
        tmp = root / f".tmp-{name}-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            meta = build(tmp)
            (tmp / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True))
            _publish(tmp, entry)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return entry


def _publish(tmp: Path, entry: Path) -> None:
    if entry.exists() and not (entry / META_FILE).is_file():
        shutil.rmtree(entry, ignore_errors=True)  # debris of an interrupted older layout
    try:
        os.rename(tmp, entry)
    except OSError:
        if not (entry / META_FILE).is_file():
            raise
        log.info("cache entry %s was built concurrently; using that one", entry)


__all__ = ["cache_key", "cached_entry", "read_meta"]
