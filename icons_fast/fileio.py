"""Atomic file writes: the one way every stage writes its outputs.

A file is written to a unique temp file in the same directory, flushed and
fsynced, made world-readable, then renamed onto its final name (and the
directory fsynced), so a crash or a kill never leaves a half-written file
under the final name and concurrent writers never share a temp file.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Callable

import numpy as np


def fsync_dir(path: str) -> None:
    """Make a rename inside ``path`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, write: Callable[[Any], Any], mode: str = "w") -> str:
    """Call ``write(f)`` on a temp file next to ``path``, then rename it onto ``path``; returns ``path``."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs are shared read-only data
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(directory)
    return path


def atomic_write_bytes(path: str, data: bytes) -> str:
    return atomic_write(path, lambda f: f.write(data), mode="wb")


def atomic_json(path: str, obj: Any, **dump_kwargs) -> str:
    """``json.dump(obj)`` atomically (``indent=2``, ``sort_keys`` as given)."""
    dump_kwargs.setdefault("indent", 2)
    return atomic_write(path, lambda f: json.dump(obj, f, **dump_kwargs))


def file_sha256(path: str, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_npy(path: str, arr: np.ndarray) -> str:
    return atomic_write(path, lambda f: np.save(f, arr), mode="wb")
