"""Writer lock of a run directory: the writers of one run share it, anyone else is refused.

A run directory is written by one *run*: one process, the ranks of one
torchrun launch, or the ``--shard i/n`` jobs of one sharded featurize. Each
writer calls :func:`acquire` (or uses :class:`RunLock` as a context manager)
with

- ``token``: what the writers of one run agree on (e.g. the stage, the config
  fingerprint and the number of ranks/shards), and
- ``member``: this writer's place in the run (rank, shard index), unique
  within the run.

Files (all ``flock``-ed, so a killed holder releases its locks with its
process and a stale lock never needs deleting by hand)::

    RUN/.lock            shared flock held by every writer of the run; json of
                         the run: token, pid/host/start of its first writer
    RUN/.lock.<member>   exclusive flock held by that member; json of its pid/host/start
    RUN/.lock.guard      exclusive flock held for the few microseconds of a join

Joining: under the guard, an exclusive ``flock`` on ``.lock`` that succeeds
means no writer holds the run: this writer writes its token and keeps a
shared lock. If it fails, the run is held: the same token joins with a shared
lock, another token is refused (:class:`RunLocked`, one line naming the pid
and host of a writer that still holds it, found by probing the member files). A member slot already held (two processes claiming
rank 0, or the same ``--shard 1/4`` started twice) is refused the same way.

Locks are per process and re-entrant within it: acquiring the same
``(run, token, member)`` again returns the lock already held. ``flock``
works across hosts on NFSv4 (the kernel maps it to byte-range locks); on a
filesystem without working locks every writer believes it is alone, as
before this module existed.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import socket
import time

log = logging.getLogger(__name__)

LOCK = ".lock"
_MEMBER = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_GUARD_TIMEOUT_S = 60.0  # a join takes microseconds; waiting this long means a stuck filesystem

_held: dict[tuple[str, str, str], "RunLock"] = {}


class RunLocked(RuntimeError):
    """Another writer holds the run directory (one-line message naming its pid and host)."""


def _describe(info: dict) -> str:
    return (f"pid {info.get('pid', '?')} on host {info.get('host', '?')} "
            f"(since {info.get('started', '?')}, token {str(info.get('token', '?'))[:16]})")


def _read_json(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    data = b""
    while chunk := os.read(fd, 65536):
        data += chunk
    try:
        out = json.loads(data.decode() or "{}")
    except (ValueError, UnicodeDecodeError):
        return {}
    return out if isinstance(out, dict) else {}


def _write_json(fd: int, obj: dict) -> None:
    data = json.dumps(obj, sort_keys=True).encode() + b"\n"
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, data)
    os.fsync(fd)


def _try_flock(fd: int, how: int) -> bool:
    try:
        fcntl.flock(fd, how | fcntl.LOCK_NB)
        return True
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise


def _live_members(run_dir: str) -> list[dict]:
    """The json of every member whose ``.lock.<member>`` file is locked now (call under the guard)."""
    out = []
    for name in sorted(os.listdir(run_dir)):
        if not name.startswith(LOCK + ".") or name == LOCK + ".guard":
            continue
        try:
            fd = os.open(os.path.join(run_dir, name), os.O_RDWR)
        except OSError:
            continue
        try:
            if not _try_flock(fd, fcntl.LOCK_EX):  # held: a live member (closing drops a successful probe)
                out.append(_read_json(fd))
        finally:
            os.close(fd)
    return out


@contextlib.contextmanager
def _guard(run_dir: str):
    """Hold ``RUN/.lock.guard`` exclusively: joins (and probes) of one run directory happen one at a time."""
    path = os.path.join(run_dir, LOCK + ".guard")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + _GUARD_TIMEOUT_S
        while not _try_flock(fd, fcntl.LOCK_EX):
            if time.monotonic() > deadline:
                raise RunLocked(f"{path} stayed locked for {_GUARD_TIMEOUT_S:.0f} s; is the filesystem of "
                                f"{run_dir} hung?")
            time.sleep(0.01)
        yield
    finally:
        os.close(fd)  # closing drops the flock


class RunLock:
    """The writer lock of ``run_dir`` for one member of one run (see the module docstring).

    Arguments:
        run_dir: the run directory (created if absent).
        token: string the writers of one run share (e.g. ``"featurize:<config fingerprint>:world=4"``).
        member: this writer's name inside the run (``"rank0"``, ``"shard-1of4"``); ``[A-Za-z0-9._-]``.
    """

    def __init__(self, run_dir: str, token: str, member: str = "main"):
        if not _MEMBER.match(member):
            raise ValueError(f"lock member {member!r} must match {_MEMBER.pattern}")
        self.run_dir = os.path.abspath(os.fspath(run_dir))
        self.token = str(token)
        self.member = member
        self.info = {"pid": os.getpid(), "host": socket.gethostname(), "token": self.token, "member": member,
                     "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self._run_fd: int | None = None
        self._member_fd: int | None = None
        self._depth = 0

    @property
    def path(self) -> str:
        return os.path.join(self.run_dir, LOCK)

    def acquire(self) -> "RunLock":
        """Join the run or raise :class:`RunLocked`; idempotent for a lock already held by this object."""
        if self._depth:
            self._depth += 1
            return self
        os.makedirs(self.run_dir, exist_ok=True)
        with _guard(self.run_dir):
            self._join_run()
            try:
                self._claim_member()
            except BaseException:
                self._release_fd("_run_fd")
                raise
        self._depth = 1
        log.debug("run lock %s held by %s as %s", self.path, self.info["pid"], self.member)
        return self

    def _join_run(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if _try_flock(fd, fcntl.LOCK_EX):  # nobody holds the run: start it
                _write_json(fd, self.info)
                fcntl.flock(fd, fcntl.LOCK_SH)  # not atomic, but every joiner waits on the guard we hold
            else:
                run = _read_json(fd)
                if run.get("token") != self.token:
                    live = _live_members(self.run_dir)
                    holder = {**run, **live[0]} if live else run  # the writer that started may have left
                    more = f" and {len(live) - 1} more writer(s)" if len(live) > 1 else ""
                    raise RunLocked(
                        f"run directory {self.run_dir} is being written by another run: {_describe(holder)}{more}; "
                        f"wait for it to finish, stop it, or use another run directory"
                    )
                fcntl.flock(fd, fcntl.LOCK_SH)
        except BaseException:
            os.close(fd)
            raise
        self._run_fd = fd

    def _claim_member(self) -> None:
        fd = os.open(f"{self.path}.{self.member}", os.O_RDWR | os.O_CREAT, 0o644)
        if not _try_flock(fd, fcntl.LOCK_EX):
            holder = _read_json(fd)
            os.close(fd)
            raise RunLocked(
                f"run directory {self.run_dir}: writer {self.member!r} of this run is already running as "
                f"{_describe(holder)}; wait for it to finish or stop it"
            )
        _write_json(fd, self.info)
        self._member_fd = fd

    def _release_fd(self, name: str) -> None:
        fd = getattr(self, name)
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)
            setattr(self, name, None)

    def release(self) -> None:
        """Leave the run (the last writer to leave frees the directory)."""
        if self._depth == 0:
            return
        self._depth -= 1
        if self._depth:
            return
        self._release_fd("_member_fd")
        self._release_fd("_run_fd")
        _held.pop((self.run_dir, self.token, self.member), None)

    @property
    def held(self) -> bool:
        return self._depth > 0

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def acquire(run_dir: str, token: str, member: str = "main") -> RunLock:
    """The :class:`RunLock` of ``(run_dir, token, member)``, acquired; re-entrant within a process.

    Call ``.release()`` (or use ``with``) once per ``acquire``.
    """
    key = (os.path.abspath(os.fspath(run_dir)), str(token), member)
    lock = _held.get(key)
    if lock is None:
        lock = RunLock(run_dir, token, member)
    lock.acquire()
    _held[key] = lock
    return lock


def holder(run_dir: str) -> dict | None:
    """The json of the run holding ``run_dir`` (pid, host, started, token), or None when nobody holds it."""
    path = os.path.join(os.fspath(run_dir), LOCK)
    if not os.path.exists(path):
        return None
    with _guard(os.fspath(run_dir)):  # a probe between a starter's exclusive and shared lock would mislead it
        fd = os.open(path, os.O_RDWR)
        try:
            if _try_flock(fd, fcntl.LOCK_EX):  # closing the fd drops this probe lock
                return None
            return _read_json(fd)
        finally:
            os.close(fd)
