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


# ------------------------------------------------------------------ the stages under faults
# A small run (24 pool samples in 6 shards, the tiny model): each test copies a finished warmup,
# injects one fault into featurize, influence or warmup, reruns as the user would, and compares
# the final feature rows, scores and selection with an uninterrupted run's.

POOL, SHARD = 24, 4


def _stage_cfg(tiny_model_dir, data, out):
    from icons_fast.config import Config

    cfg = Config()
    cfg.override({"model.model": tiny_model_dir, "model.lora_r": 4, "model.lora_alpha": 8, "warmup.fraction": 0.25,
                  "warmup.batch_size": 2, "features.proj_dim": 32, "features.batch_size": 4,
                  "features.shard_size": SHARD, "data.max_length": 1024, "select.budget": 5, "out": str(out)})
    cfg.data.train_data, cfg.data.image_folder = data["train"], data["image_folder"]
    cfg.data.targets = {"vqa": data["targets"]["vqa"], "count": data["targets"]["count"]}
    return cfg


def _env():
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        env.pop(k, None)
    return env


@pytest.fixture(scope="module")
def warm(tmp_path_factory, tiny_model_dir):
    """A run directory with config.json, a finished warmup and the target features; no pool features yet.

    The data files are copied into the run's parent so tests may edit them.
    """
    from icons_fast.data import make_replica_data
    from icons_fast.stages.pipeline import featurize_all
    from icons_fast.stages.warmup import run_warmup

    root = tmp_path_factory.mktemp("faults")
    data = make_replica_data(str(root / "data"), n_train=POOL, n_target=2, n_eval=1)
    cfg = _stage_cfg(tiny_model_dir, data, root / "warm")
    cfg.save(cfg.out)
    run_warmup(cfg, cfg.out)
    featurize_all(cfg, cfg.out, splits=["target-vqa", "target-count"])
    return cfg


def _copy_run(warm, dest):
    import shutil

    from icons_fast.config import Config

    shutil.copytree(warm.out, dest)
    cfg = Config.from_dict(warm.to_dict())
    cfg.out = str(dest)
    return cfg


def _cli(cfg, command, *extra):
    return ["--quiet", command, "--config", os.path.join(cfg.out, "config.json"), "--out", cfg.out, *extra]


def _subprocess(cfg, command, *extra):
    return [sys.executable, "-m", "icons_fast", *_cli(cfg, command, *extra)]


def _outcome(cfg):
    """What a run ends with: the pool's feature rows read back, the scores, valid mask and selected indices."""
    from icons_fast.rundir import RunLayout

    layout = RunLayout(cfg.out)
    ckpt = os.path.basename(layout.warmup_checkpoints()[-1])
    rows = layout.feature_store(ckpt, "train").load()
    scores = np.load(os.path.join(cfg.out, "scores", "scores.npy"))
    valid = np.load(os.path.join(cfg.out, "scores", "valid.npy"))
    selected = np.loadtxt(os.path.join(cfg.out, "selection", "indices.txt"), dtype=int)
    return rows, scores, valid, selected


def _assert_same_outcome(got, want):
    (gi, gd, gf, gn), gs, gv, gsel = got
    (wi, wd, wf, wn), ws, wv, wsel = want
    assert np.array_equal(gi, wi) and gd == wd and torch.equal(gf, wf) and np.array_equal(gn, wn)
    assert np.array_equal(gs, ws, equal_nan=True) and np.array_equal(gv, wv)
    assert np.array_equal(gsel, wsel)


def _finish(cfg):
    """featurize (the rest), influence, select through the command line; return the outcome."""
    from icons_fast.cli import main

    for command in ("featurize", "influence", "select"):
        assert main(_cli(cfg, command)) == 0, command
    return _outcome(cfg)


@pytest.fixture(scope="module")
def reference(warm, tmp_path_factory):
    """The uninterrupted run: pool features, scores and selection."""
    cfg = _copy_run(warm, tmp_path_factory.mktemp("reference") / "run")
    out = _finish(cfg)
    assert len(out[0][0]) == POOL and len(out[3]) == 5
    return out


def _entries(cfg):
    return sorted(n for d, _, names in os.walk(os.path.join(cfg.out, "features")) if os.path.basename(d) == "entries"
                  and "train" in d for n in names)


def _one_error_line(err: str) -> str:
    """The command's one ``icons-fast: ...`` line (progress bars aside), checked to be the only one, no traceback."""
    lines = [line for line in err.splitlines() if line.startswith("icons-fast: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_flipped_byte_influence_names_the_repair_and_featurize_verify_fixes_it(warm, reference, tmp_path, capsys,
                                                                              caplog):
    """Fault 1: a same-size corruption of a feature shard. influence stops with one line naming the shard
    and the exact repairing command; plain featurize does not see it (sizes only); featurize --verify
    removes and recomputes exactly that shard; the run then ends as an uninterrupted one."""
    import logging

    from icons_fast.cli import main

    cfg = _copy_run(warm, tmp_path / "run")
    assert main(_cli(cfg, "featurize")) == 0
    ckpt = os.path.basename(sorted(os.listdir(os.path.join(cfg.out, "features")))[0])
    shard = os.path.join(cfg.out, "features", ckpt, "train", "shard-000000008-000000012.safetensors")
    with open(shard, "r+b") as f:
        f.seek(-7, os.SEEK_END)  # inside the feature data: the file still parses, only its checksum fails
        b = f.read(1)
        f.seek(-7, os.SEEK_END)
        f.write(bytes([b[0] ^ 0x10]))
    capsys.readouterr()
    assert main(_cli(cfg, "influence")) == 1
    line = _one_error_line(capsys.readouterr().err)
    repair = (f"icons-fast featurize --config {os.path.join(cfg.out, 'config.json')} --out {cfg.out} "
              f"--split train --verify")
    assert line.startswith("icons-fast: error: shard ") and shard in line and "[8, 12)" in line
    assert f"`{repair}`" in line
    assert main(_cli(cfg, "featurize", "--split", "train")) == 0  # the fast check trusts a same-size file
    assert main(_cli(cfg, "influence")) == 1
    capsys.readouterr()
    with caplog.at_level(logging.WARNING, logger="icons_fast"):
        assert main(repair.split()[1:]) == 0
    removed = [r.getMessage() for r in caplog.records if "removed shard" in r.getMessage()]
    assert len(removed) == 1 and "shard-000000008-000000012" in removed[0] and "bad_checksum" in removed[0]
    _assert_same_outcome(_finish(cfg), reference)


def test_pool_edited_after_featurize_is_refused_not_up_to_date(warm, reference, tmp_path, capsys):
    """Fault 2a: a record inserted at the top of the pool after featurize. influence and select refuse,
    naming the pool file and the fix, instead of reporting the scores up to date."""
    import shutil

    from icons_fast.cli import main
    from icons_fast.config import Config
    from icons_fast.stages.influence import StaleInputs, run_influence
    from icons_fast.stages.select import run_select

    cfg = _copy_run(warm, tmp_path / "run")
    pool = str(tmp_path / "pool.json")
    shutil.copy(cfg.data.train_data, pool)
    cfg.data.train_data = pool
    cfg.save(cfg.out)
    _finish(cfg)  # same content under another path: nothing is stale
    other = Config.from_dict(cfg.to_dict())
    other.features.proj_dim = 64  # a flag not repeated: a setting, not a file, differs
    with pytest.raises(StaleInputs, match=r"proj_dim was 32, this config says 64.*--config "):
        run_influence(other, other.out)
    records = json.load(open(pool))
    json.dump([dict(records[-1], id="inserted")] + records, open(pool, "w"))
    for stage in (run_influence, run_select):
        with pytest.raises(StaleInputs) as err:
            stage(cfg, cfg.out)
        msg = str(err.value)
        assert f"the file {pool} changed after these features were made" in msg and "features of train" in msg
        assert "icons-fast run" in msg and "up to date" not in msg
    capsys.readouterr()
    assert main(_cli(cfg, "influence")) == 1
    assert "changed after these features were made" in _one_error_line(capsys.readouterr().err)


def test_target_file_edited_is_refused_then_recomputed(warm, reference, tmp_path, capsys):
    """Fault 2b: a target file edited after its features were made: refused with the split and the
    command; following the fix recomputes that target only, and the scores of the other task are kept."""
    import glob
    import shutil

    from icons_fast.cli import main
    from icons_fast.stages.influence import StaleInputs, load_scores, run_influence

    cfg = _copy_run(warm, tmp_path / "run")
    target = str(tmp_path / "vqa.json")
    shutil.copy(cfg.data.targets["vqa"], target)
    cfg.data.targets = {**cfg.data.targets, "vqa": target}
    cfg.save(cfg.out)
    _finish(cfg)
    records = json.load(open(target))
    json.dump(records[:1], open(target, "w"))  # one target sample fewer
    with pytest.raises(StaleInputs) as err:
        run_influence(cfg, cfg.out)
    msg = str(err.value)
    assert f"the file {target} changed" in msg and "target-vqa" in msg and "--split target-vqa" in msg
    for d in glob.glob(os.path.join(cfg.out, "features", "*", "target-vqa")):
        shutil.rmtree(d)
    assert main(_cli(cfg, "featurize", "--split", "target-vqa")) == 0
    assert main(_cli(cfg, "influence")) == 0 and main(_cli(cfg, "select")) == 0
    _, scores, _, _ = _outcome(cfg)
    ref_scores = reference[1]
    column = {name: i for i, name in enumerate(load_scores(cfg.out)[1])}
    assert np.array_equal(scores[:, column["count"]], ref_scores[:, column["count"]])  # count: untouched
    assert not np.array_equal(scores[:, column["vqa"]], ref_scores[:, column["vqa"]])  # vqa: the edited file


def test_second_featurize_on_a_run_gets_one_line_naming_the_holder(warm, reference, tmp_path, capsys):
    """Fault 3: an unrelated second writer while featurize runs (two processes). It gets one line naming
    the holder's pid and host and exit 1; the first one is not disturbed and ends as an uninterrupted run."""
    import socket

    from icons_fast.cli import main
    from icons_fast.runlock import holder

    cfg = _copy_run(warm, tmp_path / "run")
    first = subprocess.Popen(_subprocess(cfg, "featurize", "--split", "train"), env=_env(), cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while (holder(cfg.out) or {}).get("pid") != first.pid:
            assert first.poll() is None and time.time() < deadline, "featurize did not take the lock"
            time.sleep(0.02)
        first.send_signal(signal.SIGSTOP)  # hold it there, lock taken, whatever the machine's load
        capsys.readouterr()
        for argv in (_cli(cfg, "featurize", "--batch-size", "2"), _cli(cfg, "warmup", "--lr", "1e-3"),
                     _cli(cfg, "influence")):
            assert main(argv) == 1, argv
            line = _one_error_line(capsys.readouterr().err)
            assert f"pid {first.pid} on host {socket.gethostname()}" in line and "another run" in line
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=300) == 0, first.stderr.read()
    _assert_same_outcome(_finish(cfg), reference)


def test_sigterm_mid_featurize_exits_75_and_the_rerun_resumes(warm, reference, tmp_path):
    """Fault 4: SIGTERM (preemption) while featurize runs: the shard in flight is finished and written,
    exit code 75 with one line; the rerun does the rest and the run ends as an uninterrupted one."""
    cfg = _copy_run(warm, tmp_path / "run")
    proc = subprocess.Popen(_subprocess(cfg, "featurize", "--split", "train"), env=_env(), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while not _entries(cfg):
        assert proc.poll() is None and time.time() < deadline, "featurize ended before it could be stopped"
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == EXIT_PREEMPTED == 75, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("icons-fast: preempted: featurize stopped by SIGTERM after shard [")
    assert "rerun the same command to resume" in last
    done = _entries(cfg)
    assert 1 <= len(done) < POOL // SHARD and _leftovers(cfg.out) == []
    _assert_same_outcome(_finish(cfg), reference)


def test_sigterm_mid_warmup_finishes_the_step_and_the_rerun_restarts_it(warm, tmp_path, monkeypatch, capsys):
    """Fault 4b: SIGTERM during warmup: the step in flight finishes, exit 75 with one line saying that
    warmup restarts; no finished warmup is recorded; the rerun trains it whole, equal to an uninterrupted one."""
    from safetensors.torch import load_file

    from icons_fast.cli import main
    from icons_fast.rundir import RunLayout
    from icons_fast.train import loop

    def adapter(cfg):
        ckpt = RunLayout(cfg.out).warmup_checkpoints()[-1]
        return load_file(os.path.join(ckpt, "adapter", "adapter_model.safetensors"))

    cfg = _copy_run(warm, tmp_path / "run")
    os.remove(RunLayout(cfg.out).warmup_done)
    real, calls = loop.batch_loss, []

    def loss_then_term(*a, **k):
        calls.append(1)
        if len(calls) == 2:  # SIGTERM arrives during the second step
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)

    monkeypatch.setattr(loop, "batch_loss", loss_then_term)
    capsys.readouterr()
    assert main(_cli(cfg, "warmup")) == EXIT_PREEMPTED
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith("icons-fast: preempted: warmup stopped by SIGTERM after step 2 of 3")
    assert "restarts it from step 0" in line and len(calls) == 2
    assert not os.path.exists(RunLayout(cfg.out).warmup_done)
    monkeypatch.undo()
    assert main(_cli(cfg, "warmup")) == 0
    want, got = adapter(warm), adapter(cfg)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_full_disk_mid_featurize_is_one_line_and_the_rerun_equals_uninterrupted(warm, reference, tmp_path,
                                                                                monkeypatch, capsys):
    """Fault 5: the disk fills half-way through the third pool shard. One line, exit 1; no temp file, no
    partial shard accepted; after space is freed the rerun completes and equals an uninterrupted run."""
    from icons_fast.cli import main
    from icons_fast.features.store import FeatureStore

    cfg = _copy_run(warm, tmp_path / "run")
    real_write, shards = os.write, []

    def write(fd, data):
        path = os.readlink(f"/proc/self/fd/{fd}")
        name = os.path.basename(path)
        if name.startswith(".shard-") and ".safetensors." in name and "/train/" in path:  # a pool shard's temp file
            if name not in shards:
                shards.append(name)
            if len(shards) == 3:  # the third shard file: half of it fits, then the disk is full
                if not getattr(write, "half", False):
                    write.half = True
                    return real_write(fd, bytes(data[: len(data) // 2]))
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    capsys.readouterr()
    assert main(_cli(cfg, "featurize", "--split", "train")) == 1
    monkeypatch.undo()
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith("icons-fast: error: disk full") and "shard-000000008-000000012.safetensors" in line
    assert "[Errno" not in line and "Free space" in line
    from icons_fast.rundir import RunLayout

    ckpt = os.path.basename(RunLayout(cfg.out).warmup_checkpoints()[-1])
    store = FeatureStore.open(os.path.join(cfg.out, "features", ckpt, "train"))
    assert _leftovers(cfg.out) == [] and store.check(verify=True) == []
    assert [(e["start"], e["end"]) for e in store.entries()] == [(0, 4), (4, 8)]
    assert not os.path.exists(store.shard_path(8, 12))
    _assert_same_outcome(_finish(cfg), reference)


def test_file_sha256_is_remembered_until_the_file_changes(tmp_path, monkeypatch):
    """One read per unchanged file; a rewrite (new mtime) or a replacement (new inode, same size and mtime) rehashes."""
    import hashlib

    monkeypatch.setattr(fileio, "_sha256_memo", {})
    path = tmp_path / "pool.json"
    path.write_bytes(b"aaaa")
    reads = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda p, *a, **k: (reads.append(str(p)), real_open(p, *a, **k))[1])
    assert fileio.file_sha256(str(path)) == hashlib.sha256(b"aaaa").hexdigest()
    assert fileio.file_sha256(str(path)) == hashlib.sha256(b"aaaa").hexdigest()
    assert reads.count(str(path)) == 1
    stat = path.stat()
    path.write_bytes(b"bbbb")  # same size; force a new mtime so the test does not depend on timer granularity
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert fileio.file_sha256(str(path)) == hashlib.sha256(b"bbbb").hexdigest()
    other = tmp_path / "other.json"
    other.write_bytes(b"cccc")
    st = path.stat()
    os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(other, path)  # same size and mtime, another inode
    assert fileio.file_sha256(str(path)) == hashlib.sha256(b"cccc").hexdigest()
    assert reads.count(str(path)) == 3
    assert list(fileio._sha256_memo) == [os.path.realpath(path)]  # its entry replaced, not one per version


def test_file_sha256_remembers_a_bounded_number_of_files_least_recently_used_out(tmp_path, monkeypatch):
    monkeypatch.setattr(fileio, "_sha256_memo", {})
    monkeypatch.setattr(fileio, "SHA256_MEMO_MAX", 3)
    paths = []
    for i in range(5):
        paths.append(tmp_path / f"f{i}")
        paths[-1].write_bytes(bytes([i]))
        fileio.file_sha256(str(paths[-1]))
        if i == 2:
            fileio.file_sha256(str(paths[0]))  # used again: kept over f1
    assert list(fileio._sha256_memo) == [os.path.realpath(p) for p in (paths[0], paths[3], paths[4])]
