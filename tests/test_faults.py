"""Fault injection: full disk, read-only directory, a second writer, SIGTERM.

Each test injects one fault at a boundary and checks what the user gets (one
clear error naming the path / the holder, or a clean stop with a distinct exit
code) and that nothing is lost: the rerun after the fault equals a run that
never met it. Feature-store corruption (flipped byte, truncation, deleted file
or entry) is in tests/test_store.py (check / repair).
"""
import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from icons_fast import fileio
from icons_fast.features.store import FeatureStore, normalize_rows, shard_ranges
from icons_fast.runlock import RunLock, RunLocked, acquire, holder
from icons_fast.signals import EXIT_PREEMPTED, GracefulStop, Preempted

K, N = 24, 40
RANGES = shard_ranges(N, 16)
FP = {"model": "tiny", "proj_dim": K}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rows(seed=0):
    g = np.random.default_rng(seed).standard_normal((N, K)) + 0.1
    return normalize_rows(torch.from_numpy(g).float(), "float16")


def _write(store, s, e, f, norms):
    idx = np.arange(s, e)
    return store.write_shard(s, e, idx, [f"id{i}" for i in idx], f[s:e], norms[s:e])


def _leftovers(root):
    return sorted(n for _, _, names in os.walk(root) for n in names if n.endswith(".tmp"))


def _same_rows(a, b):
    (ia, da, fa, na), (ib, db, fb, nb) = a.load(), b.load()
    return np.array_equal(ia, ib) and da == db and torch.equal(fa, fb) and np.array_equal(na, nb)


class _DiskFills:
    """``os.write`` that accepts ``budget`` bytes in all, then fails with ENOSPC (short write first)."""

    def __init__(self, budget):
        self.budget = budget
        self.real = os.write

    def __call__(self, fd, data):
        if self.budget <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = min(len(data), self.budget)
        self.budget -= n
        return self.real(fd, bytes(data[:n]))


# ------------------------------------------------------------------ full disk

@pytest.mark.parametrize("where", ["shard", "entry"])
def test_full_disk_leaves_no_shard_and_rerun_equals_uninterrupted(tmp_path, monkeypatch, where):
    f, norms = _rows()
    store = FeatureStore(tmp_path / "run", FP, K)
    _write(store, *RANGES[0], f, norms)
    shard_bytes = _write(FeatureStore(tmp_path / "probe", FP, K), *RANGES[1], f, norms)["bytes"]
    # the disk fills half-way through the shard file, or just after it (during its entry)
    monkeypatch.setattr(os, "write", _DiskFills(shard_bytes // 2 if where == "shard" else shard_bytes + 10))
    with pytest.raises(fileio.StorageError) as err:
        _write(store, *RANGES[1], f, norms)
    monkeypatch.undo()
    msg = str(err.value)
    assert err.value.errno == errno.ENOSPC and "disk full" in msg and "\n" not in msg
    assert os.path.basename(store.shard_path(*RANGES[1]) if where == "shard" else store.entry_path(*RANGES[1])) in msg
    assert _leftovers(tmp_path / "run") == []
    assert not os.path.exists(store.shard_path(*RANGES[1])) and not os.path.exists(store.entry_path(*RANGES[1]))
    assert store.missing_ranges(RANGES) == RANGES[1:]
    assert store.check(verify=True) == []
    # space freed: the rerun completes and reads back exactly what an uninterrupted run holds
    for r in store.missing_ranges(RANGES):
        _write(store, *r, f, norms)
    ref = FeatureStore(tmp_path / "ref", FP, K)
    for r in RANGES:
        _write(ref, *r, f, norms)
    assert _same_rows(store, ref)


def test_full_disk_at_fsync_keeps_the_old_file(tmp_path, monkeypatch):
    """Some filesystems (NFS) report ENOSPC only at fsync; the old version must survive."""
    path = tmp_path / "scores.json"
    fileio.atomic_json(str(path), {"v": 1})

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError) as err:
        fileio.atomic_json(str(path), {"v": 2})
    monkeypatch.undo()
    assert err.value.errno == errno.ENOSPC and str(path) in str(err.value)
    assert json.loads(path.read_text()) == {"v": 1} and _leftovers(tmp_path) == []
    fileio.atomic_json(str(path), {"v": 2})
    assert json.loads(path.read_text()) == {"v": 2}


def test_other_write_errors_pass_through_unchanged(tmp_path, monkeypatch):
    def broken(fd, data):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "write", broken)
    with pytest.raises(OSError) as err:
        fileio.atomic_write_bytes(str(tmp_path / "x.bin"), b"abc")
    monkeypatch.undo()
    assert err.value.errno == errno.EIO and not isinstance(err.value, fileio.StorageError)
    assert os.listdir(tmp_path) == []


def test_full_disk_while_logging_a_bad_sample(tmp_path, monkeypatch):
    from icons_fast.data import ErrorLog, SampleError

    log = ErrorLog(str(tmp_path))
    assert log.add(SampleError(1, "a", "data", "missing_image: x"))
    real_open = open

    def full(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        if "a" in mode:
            f.write('{"index": 2, "id": "b", "st')  # part of the line reaches the disk, then it fills
            f.close()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return f

    monkeypatch.setattr("builtins.open", full)
    with pytest.raises(fileio.StorageError, match="disk full .*errors.jsonl"):
        log.add(SampleError(2, "b", "data", "corrupt_image: y"))
    monkeypatch.undo()
    assert [e.index for e in log] == [1]  # not recorded in memory either, so the rerun records it
    again = ErrorLog(str(tmp_path))  # reopening drops the cut-short line
    assert again.add(SampleError(2, "b", "data", "corrupt_image: y"))
    assert [e.index for e in ErrorLog.read(str(tmp_path))] == [1, 2]


# ------------------------------------------------------------------ read-only directory

@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_read_only_directory_is_named(tmp_path, monkeypatch, code):
    def refuse(*a, **k):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fileio.tempfile, "mkstemp", refuse)
    with pytest.raises(fileio.StorageError) as err:  # creating a store writes its manifest
        FeatureStore(tmp_path / "feat", FP, K)
    assert "not writable" in str(err.value) and str(tmp_path / "feat") in str(err.value)
    with pytest.raises(fileio.StorageError, match="not writable"):
        fileio.atomic_npy(str(tmp_path / "scores.npy"), np.zeros(3))
    monkeypatch.undo()
    assert not (tmp_path / "scores.npy").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through chmod 0555")
def test_read_only_directory_chmod(tmp_path):
    f, norms = _rows()
    store = FeatureStore(tmp_path, FP, K)
    os.chmod(tmp_path, 0o555)
    try:
        with pytest.raises(fileio.StorageError, match="not writable"):
            _write(store, *RANGES[0], f, norms)
    finally:
        os.chmod(tmp_path, 0o755)
    assert store.missing_ranges(RANGES) == RANGES


# ------------------------------------------------------------------ run-directory writer lock

_HOLDER = textwrap.dedent("""
    import sys
    from icons_fast.runlock import acquire
    lock = acquire(sys.argv[1], sys.argv[2], sys.argv[3])
    print("held", flush=True)
    sys.stdin.read()   # hold until the parent closes stdin
    lock.release()
""")


def _hold(run, token, member="main"):
    p = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run), token, member], cwd=REPO,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def _stop(p):
    p.stdin.close()
    assert p.wait(timeout=30) == 0


def test_second_writer_gets_one_line_naming_the_holder(tmp_path):
    p = _hold(tmp_path, "featurize:cfgA:world=1")
    try:
        with pytest.raises(RunLocked) as err:
            acquire(tmp_path, "featurize:cfgB:world=1")
        msg = str(err.value)
        assert f"pid {p.pid} on host " in msg and "\n" not in msg and str(tmp_path) in msg
        # the same run started twice (same token, same member) is a second writer too
        with pytest.raises(RunLocked, match=f"pid {p.pid}"):
            acquire(tmp_path, "featurize:cfgA:world=1", "main")
        assert holder(tmp_path)["pid"] == p.pid
    finally:
        _stop(p)
    assert holder(tmp_path) is None
    with acquire(tmp_path, "featurize:cfgB:world=1"):  # released: the other run may start now
        assert holder(tmp_path)["token"] == "featurize:cfgB:world=1"


def test_writers_of_one_run_share_the_lock(tmp_path):
    token = "featurize:cfgA:shards=3"
    procs = [_hold(tmp_path, token, f"shard-{i}of3") for i in range(2)]
    try:
        with acquire(tmp_path, token, "shard-2of3") as lock:
            assert lock.held
            again = acquire(tmp_path, token, "shard-2of3")  # re-entrant in one process
            assert again is lock
            again.release()
            assert lock.held
        with pytest.raises(RunLocked, match="another run"):
            RunLock(tmp_path, "warmup:cfgZ", "rank0").acquire()
    finally:
        for p in procs:
            _stop(p)


_RACER = textwrap.dedent("""
    import sys, time
    from icons_fast.runlock import RunLocked, acquire
    time.sleep(max(0.0, float(sys.argv[4]) - time.time()))   # start together
    try:
        lock = acquire(sys.argv[1], sys.argv[2], sys.argv[3])
    except RunLocked:
        print("locked", flush=True)
    else:
        print("held", flush=True)
        sys.stdin.read()   # hold until every racer has answered
        lock.release()
""")


@pytest.mark.parametrize("same_run", [True, False])
def test_simultaneous_starts(tmp_path, same_run):
    """Started at the same instant: the writers of one run all join; of unrelated runs exactly one wins."""
    t0 = str(time.time() + 2.0)
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, str(tmp_path), "run" if same_run else f"run{i}",
                               f"rank{i}", t0], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for i in range(5)]
    outs = sorted(p.stdout.readline().strip() for p in procs)
    for p in procs:
        p.stdin.close()
        assert p.wait(timeout=30) == 0
    assert outs == (["held"] * 5 if same_run else ["held"] + ["locked"] * 4)


def test_refusal_names_a_writer_still_running(tmp_path):
    """The writer that started the run left; the message names one that still holds it."""
    token = "featurize:cfgA:shards=2"
    first, second = _hold(tmp_path, token, "shard-0of2"), _hold(tmp_path, token, "shard-1of2")
    try:
        _stop(first)
        with pytest.raises(RunLocked) as err:
            acquire(tmp_path, "warmup:cfgB")
        assert f"pid {second.pid} on host" in str(err.value) and f"pid {first.pid}" not in str(err.value)
    finally:
        _stop(second)


def test_killed_holder_leaves_no_stale_lock(tmp_path):
    p = _hold(tmp_path, "featurize:cfgA:world=1")
    p.kill()
    p.wait(timeout=30)
    assert holder(tmp_path) is None  # flock died with the process: nothing to delete by hand
    with acquire(tmp_path, "featurize:cfgB:world=1"):
        pass


# ------------------------------------------------------------------ SIGTERM

_LOOP = textwrap.dedent("""
    import os, sys, time
    from icons_fast.fileio import atomic_write_bytes
    from icons_fast.signals import GracefulStop, Preempted
    out = sys.argv[1]
    try:
        with GracefulStop() as stop:
            for i in range(8):
                path = os.path.join(out, f"shard-{i}.bin")
                if os.path.exists(path):
                    continue          # resume: finished shards are kept
                time.sleep(0.3)       # the work of one shard
                atomic_write_bytes(path, bytes([i]) * 1000)
                stop.check(f"after shard {i}")
                print("wrote", i, flush=True)  # after the check: a SIGTERM sent on this line lands in shard i+1
    except Preempted as exc:
        print("preempted:", exc, flush=True)
        sys.exit(exc.exit_code)
""")


def _loop(out):
    return subprocess.Popen([sys.executable, "-c", _LOOP, str(out)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_sigterm_finishes_the_shard_in_flight_and_exits_75(tmp_path):
    p = _loop(tmp_path)
    assert p.stdout.readline().split() == ["wrote", "0"]
    p.send_signal(signal.SIGTERM)  # lands while shard 1 is being computed
    rest = p.stdout.read()
    assert p.wait(timeout=30) == EXIT_PREEMPTED == 75, rest
    assert "preempted: stopped by SIGTERM after shard" in rest and "rerun" in rest
    done = sorted(os.listdir(tmp_path))
    assert 2 <= len(done) < 8 and _leftovers(tmp_path) == []  # the shard in flight was finished, then it stopped
    assert all(open(tmp_path / n, "rb").read() == bytes([int(n[6])]) * 1000 for n in done)
    # the rerun resumes and ends where an uninterrupted run ends
    p = _loop(tmp_path)
    out = p.stdout.read()
    assert p.wait(timeout=60) == 0 and out.count("wrote") == 8 - len(done)  # resumed: only the rest
    ref = tmp_path / "ref"
    ref.mkdir()
    p = _loop(ref)
    p.stdout.read()
    assert p.wait(timeout=60) == 0
    assert all((tmp_path / n).read_bytes() == (ref / n).read_bytes() for n in os.listdir(ref))


def test_second_sigterm_stops_at_once(tmp_path):
    p = _loop(tmp_path)
    assert p.stdout.readline().startswith("wrote")
    p.send_signal(signal.SIGTERM)
    assert "received SIGTERM" in p.stderr.readline()  # the first was handled (two pending signals merge)
    p.send_signal(signal.SIGTERM)
    p.stdout.read()
    assert p.wait(timeout=30) == -signal.SIGTERM


def test_graceful_stop_restores_the_handler_and_checks():
    before = signal.getsignal(signal.SIGTERM)
    with GracefulStop() as stop:
        stop.check()  # nothing requested: no-op
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert stop.requested
        with pytest.raises(Preempted) as err:
            stop.check("after step 3")
        assert err.value.exit_code == EXIT_PREEMPTED and "after step 3" in str(err.value)
    assert signal.getsignal(signal.SIGTERM) is before
