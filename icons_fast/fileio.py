"""Atomic file writes: the one way every stage writes its outputs.

A file is written to a unique temp file in the same directory, flushed and
fsynced, made world-readable, then renamed onto its final name (and the
directory fsynced), so a crash or a kill never leaves a half-written file
under the final name and concurrent writers never share a temp file.

A write that fails (full disk, read-only or unwritable directory, quota)
removes its temp file and raises :class:`StorageError`, an ``OSError`` with
the same ``errno`` whose one-line message says what happened, names the path
and says what to do. The file under the final name is then untouched: the
old version (or none), never a partial one.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from typing import Any, Callable, Iterator, NoReturn

import numpy as np

_WRITE_CHUNK = 1 << 20  # bytes per os.write in atomic_write_bytes

_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_NOT_WRITABLE = {errno.EROFS, errno.EACCES, errno.EPERM}


class StorageError(OSError):
    """A write failed for a reason of the storage (disk full, read-only, no permission); errno is kept."""


def explain_write_error(err: OSError, path: str) -> OSError:
    """``err`` as a :class:`StorageError` whose message names ``path`` and the fix; other errors unchanged."""
    if isinstance(err, StorageError):
        return err
    where = os.path.dirname(os.path.abspath(path))
    if err.errno in _FULL:
        why = (f"disk full (or quota exceeded) while writing {path}; the partial file was removed. "
               f"Free space on the filesystem of {where} and rerun: finished outputs are kept")
    elif err.errno in _NOT_WRITABLE:
        why = (f"cannot write {path}: the directory {where} is not writable "
               f"({os.strerror(err.errno)}); fix its permissions or choose another output directory")
    else:
        return err
    return StorageError(err.errno, why)


def raise_write_error(err: OSError, path: str) -> NoReturn:
    """Raise ``explain_write_error(err, path)`` (chained to ``err``), or ``err`` itself when it is not a storage error."""
    new = explain_write_error(err, path)
    if new is err:
        raise err
    raise new from err


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


def cache_dir() -> str:
    """``$ICONS_FAST_CACHE`` or ``~/.cache/icons_fast``: the one cache directory of the package
    (built-in models, the demo's stage-1 base, the measured-dispatch choices)."""
    return os.environ.get("ICONS_FAST_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "icons_fast"))


def _temp_next_to(path: str) -> tuple[int, str, str]:
    """``(fd, temp path, directory)`` of a fresh 0644 temp file in ``path``'s directory."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    except OSError as err:
        raise_write_error(err, path)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs are shared read-only data
    except OSError:
        pass
    return fd, tmp, directory


@contextlib.contextmanager
def _replacing(path: str) -> Iterator[int]:
    """Yield the fd of a temp file next to ``path``; the body writes, fsyncs and closes it.

    On success the temp file is renamed onto ``path`` (and the directory
    fsynced); on any failure it is removed, and an ``OSError`` (full disk,
    read-only directory) becomes a ``StorageError`` naming ``path``.
    """
    fd, tmp, directory = _temp_next_to(path)
    try:
        yield fd
        os.replace(tmp, path)
        fsync_dir(directory)
    except OSError as err:
        _discard(tmp)
        raise_write_error(err, path)
    except BaseException:
        _discard(tmp)
        raise


def _discard(tmp: str) -> None:
    try:
        os.unlink(tmp)
    except OSError:
        pass


def atomic_write(path: str, write: Callable[[Any], Any], mode: str = "w") -> str:
    """Call ``write(f)`` on a temp file next to ``path``, then rename it onto ``path``; returns ``path``."""
    with _replacing(path) as fd:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    return path


def atomic_write_bytes(path: str, data: bytes) -> str:
    """Write ``data`` to ``path`` atomically with ``os.write`` in 1 MiB chunks (short writes resumed)."""
    with _replacing(path) as fd:
        try:
            view = memoryview(data)
            pos = 0
            while pos < len(view):
                pos += os.write(fd, view[pos:pos + _WRITE_CHUNK])
            os.fsync(fd)
        finally:
            os.close(fd)
    return path


def atomic_json(path: str, obj: Any, **dump_kwargs) -> str:
    """``json.dump(obj)`` atomically (``indent=2``, ``sort_keys`` as given)."""
    dump_kwargs.setdefault("indent", 2)
    return atomic_write(path, lambda f: json.dump(obj, f, **dump_kwargs))


def move_aside(path: str, label: str, made_from) -> str:
    """Rename ``path`` to ``<path>.<label>-<digest of made_from>`` (``-2``, ``-3``... when taken); return the new name.

    For outputs made from inputs that no longer hold: kept for the user to inspect or
    delete, never mixed with the new ones, never deleted here. ``made_from`` is any
    JSON-able description of those inputs (a fingerprint, a settings dict, None).
    """
    import hashlib

    digest = hashlib.sha256(json.dumps(made_from, sort_keys=True).encode()).hexdigest()[:10]
    aside, n = f"{path}.{label}-{digest}", 1
    while os.path.exists(aside):
        n += 1
        aside = f"{path}.{label}-{digest}-{n}"
    os.replace(path, aside)
    return aside


# real path -> ((inode, size, mtime_ns), hex digest), least recently used first: one entry per file,
# the least recently used dropped past the bound.
_sha256_memo: dict[str, tuple[tuple, str]] = {}
SHA256_MEMO_MAX = 4096


def file_sha256(path: str, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes, read in chunks.

    Remembered per real path with its (inode, size, mtime), so that the stages of one
    process (warmup, featurize, the freshness checks) hash an unchanged pool or
    checkpoint once; a rewritten file is hashed again and replaces its entry, and at
    most ``SHA256_MEMO_MAX`` files are remembered (the least recently used dropped first).
    """
    import hashlib

    st = os.stat(path)
    real, stamp = os.path.realpath(path), (st.st_ino, st.st_size, st.st_mtime_ns)
    hit = _sha256_memo.pop(real, None)
    if hit is not None and hit[0] == stamp:
        _sha256_memo[real] = hit  # now the most recently used
        return hit[1]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    _sha256_memo[real] = (stamp, h.hexdigest())
    while len(_sha256_memo) > SHA256_MEMO_MAX:
        del _sha256_memo[next(iter(_sha256_memo))]
    return h.hexdigest()


def atomic_npy(path: str, arr: np.ndarray) -> str:
    return atomic_write(path, lambda f: np.save(f, arr), mode="wb")
