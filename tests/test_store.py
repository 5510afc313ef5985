"""FeatureStore: round trip keyed by index, streaming, resume, fingerprints, checksums, concurrency."""
import json
import multiprocessing as mp
import os
import shutil

import numpy as np
import pytest
import torch

from icons_fast.features.store import (
    CorruptShard,
    FeatureStore,
    FingerprintMismatch,
    OverlappingShards,
    normalize_rows,
    normalize_rows_ref,
    shard_name,
    shard_ranges,
)

K = 37  # odd feature width
N = 53  # odd pool size
RANGES = shard_ranges(N, 16)  # [0,16) [16,32) [32,48) [48,53)
BAD = {3, 17, 18, 50}  # samples that failed featurisation: absent from their shards
FP = {"model": "tiny-llava", "lora_r": 8, "checkpoint": "ckpt-100", "seed": 7, "proj_dim": K, "mode": "adam"}


def make_pool(seed=0):
    """Random non-zero raw features g[N, K] (float64) and ids for every sample."""
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((N, K)) * rng.uniform(0.5, 3.0, size=(N, 1))
    ids = [f"sample-{i:04d}-{rng.integers(1e6)}" for i in range(N)]
    return g, ids


def write_range(store, g, ids, start, end, rng=None):
    """Featurise [start, end) minus BAD, rows handed over in a shuffled order."""
    idx = np.array([i for i in range(start, end) if i not in BAD], dtype=np.int64)
    if rng is not None:
        idx = rng.permutation(idx)
    f, norms = normalize_rows(torch.from_numpy(g[idx]).float(), store.dtype)
    return store.write_shard(start, end, idx, [ids[i] for i in idx], f, norms)


def expected_rows(g, ids, dtype):
    """Reference: present indices, their ids, f = g/||g|| (float64 numpy) cast once to dtype, norms."""
    idx = np.array([i for i in range(N) if i not in BAD], dtype=np.int64)
    f64, n64 = normalize_rows_ref(g[idx].astype(np.float32))
    return idx, [ids[i] for i in idx], f64, n64


@pytest.mark.parametrize("dtype,tol", [("float16", 1e-3), ("bfloat16", 8e-3), ("float32", 1e-6)])
def test_round_trip_out_of_order(tmp_path, dtype, tol):
    g, ids = make_pool(1)
    store = FeatureStore(tmp_path / "train", FP, K, dtype)
    rng = np.random.default_rng(2)
    for s, e in [RANGES[2], RANGES[0], RANGES[3], RANGES[1]]:
        write_range(store, g, ids, s, e, rng)

    idx, got_ids, feats, norms = FeatureStore(tmp_path / "train", FP, K, dtype).load()
    ref_idx, ref_ids, ref_f, ref_n = expected_rows(g, ids, dtype)
    np.testing.assert_array_equal(idx, ref_idx)
    assert got_ids == ref_ids
    assert feats.dtype == getattr(torch, dtype) and feats.shape == (len(ref_idx), K)
    np.testing.assert_allclose(feats.double().numpy(), ref_f, atol=tol, rtol=0)
    assert norms.dtype == np.float32
    np.testing.assert_allclose(norms, ref_n, rtol=1e-6)
    # exactly what was written, bit for bit, row i <-> sample idx[i]
    exact, _ = normalize_rows(torch.from_numpy(g[ref_idx]).float(), dtype)
    assert torch.equal(feats, exact)
    mask = store.coverage(N)
    np.testing.assert_array_equal(np.nonzero(mask)[0], ref_idx)
    with pytest.raises(ValueError, match="beyond n_total"):
        store.coverage(N - 1)


@pytest.mark.parametrize("block", [1, 5, 7, 16, 17, 1000])
def test_iter_blocks_equals_load(tmp_path, block):
    g, ids = make_pool(3)
    store = FeatureStore(tmp_path, FP, K, "bfloat16")
    for s, e in reversed(RANGES):
        write_range(store, g, ids, s, e)
    idx, got_ids, feats, norms = store.load()
    blocks = list(store.iter_blocks(block))
    assert all(len(b[0]) == block for b in blocks[:-1]) and 0 < len(blocks[-1][0]) <= block
    for b in blocks:
        assert len(b[1]) == len(b[0]) == b[2].shape[0] == len(b[3])
    np.testing.assert_array_equal(np.concatenate([b[0] for b in blocks]), idx)
    assert [s for b in blocks for s in b[1]] == got_ids
    assert torch.equal(torch.cat([b[2] for b in blocks]), feats)
    np.testing.assert_array_equal(np.concatenate([b[3] for b in blocks]), norms)


def test_resume_semantics(tmp_path):
    g, ids = make_pool(4)
    store = FeatureStore(tmp_path, FP, K)
    (s0, e0), (s1, e1), (s2, e2), (s3, e3) = RANGES
    write_range(store, g, ids, s0, e0)  # finished
    write_range(store, g, ids, s1, e1)
    os.unlink(store.entry_path(s1, e1))  # crash after the shard rename, before its entry
    tmp = os.path.join(tmp_path, "." + shard_name(s2, e2) + ".safetensors.abc123.tmp")
    with open(tmp, "wb") as f:  # crash mid-write: only a temp file
        f.write(b"partial")
    write_range(store, g, ids, s3, e3)
    with open(store.shard_path(s3, e3), "r+b") as f:  # truncated after the fact: wrong size
        f.truncate(100)

    assert store.is_done(s0, e0)
    assert not store.is_done(s1, e1) and not store.is_done(s2, e2) and not store.is_done(s3, e3)
    assert store.missing_ranges(RANGES) == [(s1, e1), (s2, e2), (s3, e3)]
    assert [e["start"] for e in store.entries()] == [s0, s3]  # the orphan shard file does not exist
    with pytest.raises(ValueError, match="already written"):
        write_range(store, g, ids, s0, e0)

    for s, e in store.missing_ranges(RANGES):  # the rerun
        write_range(store, g, ids, s, e)
    assert store.missing_ranges(RANGES) == []
    idx, got_ids, feats, _ = store.load()
    ref_idx, ref_ids, ref_f, _ = expected_rows(g, ids, "float16")
    np.testing.assert_array_equal(idx, ref_idx)
    assert got_ids == ref_ids
    np.testing.assert_allclose(feats.double().numpy(), ref_f, atol=1e-3)


def test_overwrite_replaces_rows(tmp_path):
    g, ids = make_pool(5)
    store = FeatureStore(tmp_path, FP, K, "float32")
    write_range(store, g, ids, 0, 16)
    g2 = -g  # different data for the same range
    idx = np.array([1, 2, 9], dtype=np.int64)
    f, n = normalize_rows(torch.from_numpy(g2[idx]).float(), "float32")
    store.write_shard(0, 16, idx, [ids[i] for i in idx], f, n, overwrite=True)
    got_idx, got_ids, feats, _ = store.load()
    np.testing.assert_array_equal(got_idx, idx)
    assert torch.equal(feats, f)


def test_fingerprint_mismatch_names_keys(tmp_path):
    FeatureStore(tmp_path, FP, K, "float16")
    FeatureStore(tmp_path, dict(FP), K, "fp16")  # same settings reopen fine (alias dtype)
    other = dict(FP, checkpoint="ckpt-200", seed=8)
    with pytest.raises(FingerprintMismatch) as err:
        FeatureStore(tmp_path, other, K, "float16")
    msg = str(err.value)
    assert "checkpoint" in msg and "ckpt-100" in msg and "ckpt-200" in msg
    assert "  seed: stored=7 requested=8" in msg and "  model:" not in msg
    assert "new output dir" in msg and "delete" in msg
    with pytest.raises(FingerprintMismatch, match="dtype"):
        FeatureStore(tmp_path, FP, K, "bfloat16")
    extra = dict(FP, lora_dropout=0.05)
    with pytest.raises(FingerprintMismatch, match="lora_dropout.*<absent>"):
        FeatureStore(tmp_path, extra, K)
    assert isinstance(FingerprintMismatch("x"), ValueError)


@pytest.mark.parametrize("where", [0.02, 0.5, 0.99])  # header, middle, end of the file
def test_corrupt_shard_detected(tmp_path, where):
    g, ids = make_pool(6)
    store = FeatureStore(tmp_path, FP, K)
    for s, e in RANGES:
        write_range(store, g, ids, s, e)
    path = store.shard_path(*RANGES[1])
    size = os.path.getsize(path)
    pos = int(where * size)
    with open(path, "r+b") as f:  # flip one bit of one byte
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ 0x01]))
    assert store.is_done(*RANGES[1])  # same size: resume does not hash, reads do
    for read in (lambda: store.load(), lambda: list(store.iter_blocks(7))):
        with pytest.raises(CorruptShard) as err:
            read()
        assert os.path.basename(path) in str(err.value)
        assert "featurize with --verify" in str(err.value)
        assert err.value.path == path and (err.value.start, err.value.end) == RANGES[1]


def _worker(root, rank, world, seed):
    g, ids = make_pool(seed)
    store = FeatureStore(root, FP, K, "float16")
    for j, (s, e) in enumerate(RANGES):
        if j % world == rank:
            write_range(store, g, ids, s, e)


def test_two_processes_write_disjoint_ranges(tmp_path):
    root = str(tmp_path / "shared")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(root, r, 2, 9)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    store = FeatureStore(root, FP, K)
    assert store.missing_ranges(RANGES) == []
    manifest = store.finalize()
    assert [e["start"] for e in manifest["entries"]] == [s for s, _ in RANGES]
    assert manifest["rows"] == N - len(BAD)
    with open(os.path.join(root, "manifest.json")) as f:
        assert json.load(f)["fingerprint"] == FP
    g, ids = make_pool(9)
    idx, got_ids, feats, _ = FeatureStore(root, FP, K).load()
    ref_idx, ref_ids, ref_f, _ = expected_rows(g, ids, "float16")
    np.testing.assert_array_equal(idx, ref_idx)
    assert got_ids == ref_ids
    np.testing.assert_allclose(feats.double().numpy(), ref_f, atol=1e-3)


def test_two_stores_interleaved_one_dir(tmp_path):
    g, ids = make_pool(10)
    a, b = FeatureStore(tmp_path, FP, K), FeatureStore(tmp_path, FP, K)
    write_range(a, g, ids, *RANGES[3])
    write_range(b, g, ids, *RANGES[0])
    a.finalize()  # finalize with only part done; entries() must not depend on it
    write_range(a, g, ids, *RANGES[1])
    write_range(b, g, ids, *RANGES[2])
    assert a.missing_ranges(RANGES) == [] and b.missing_ranges(RANGES) == []
    np.testing.assert_array_equal(a.load()[0], expected_rows(g, ids, "float16")[0])


def test_duplicate_and_overlap_detection(tmp_path):
    g, ids = make_pool(11)
    store = FeatureStore(tmp_path / "a", FP, K)
    f, n = normalize_rows(torch.from_numpy(g[[4, 5, 4]]).float())
    with pytest.raises(OverlappingShards, match="sample index 4 appears twice"):
        store.write_shard(0, 10, np.array([4, 5, 4]), ["x", "y", "z"], f, n)
    write_range(store, g, ids, 0, 16)
    with pytest.raises(OverlappingShards, match="overlap"):  # refused at write time
        write_range(store, g, ids, 10, 20)
    # Two writers given overlapping ranges race past the write-time check: simulate by
    # producing [10, 20) elsewhere and moving its shard + entry into the directory.
    other = FeatureStore(tmp_path / "b", FP, K)
    write_range(other, g, ids, 10, 20)
    shutil.copy(other.shard_path(10, 20), store.shard_path(10, 20))
    shutil.copy(other.entry_path(10, 20), store.entry_path(10, 20))
    for read in (store.load, lambda: list(store.iter_blocks(4)), lambda: store.coverage(N), store.finalize):
        with pytest.raises(OverlappingShards) as err:
            read()
        assert shard_name(0, 16) in str(err.value) and shard_name(10, 20) in str(err.value)


def test_write_validation(tmp_path):
    g, ids = make_pool(12)
    store = FeatureStore(tmp_path, FP, K)
    f, n = normalize_rows(torch.from_numpy(g[[2, 20]]).float())
    with pytest.raises(ValueError, match="sample 20.*outside"):
        store.write_shard(0, 16, np.array([2, 20]), ["a", "b"], f, n)
    bad = f.clone()
    bad[1, 3] = float("nan")
    with pytest.raises(ValueError, match="sample 5 .*id 'b'"):
        store.write_shard(0, 16, np.array([2, 5]), ["a", "b"], bad, n)
    with pytest.raises(ValueError, match="expected 2 ids"):
        store.write_shard(0, 16, np.array([2, 5]), ["a"], f, n)
    with pytest.raises(ValueError, match="proj_dim"):
        FeatureStore(tmp_path / "x", dict(FP, proj_dim=K + 1), K)
    assert store.entries() == []


def test_empty_shard_all_bad(tmp_path):
    store = FeatureStore(tmp_path, FP, K)
    store.write_shard(0, 4, np.zeros(0, np.int64), [], np.zeros((0, K), np.float16), np.zeros(0, np.float32))
    assert store.is_done(0, 4)
    assert not store.coverage(4).any()
    idx, got_ids, feats, norms = store.load()
    assert idx.size == 0 and got_ids == [] and feats.shape == (0, K) and norms.size == 0
    assert list(store.iter_blocks(3)) == []


def test_normalize_rows_matches_reference():
    rng = np.random.default_rng(13)
    g = rng.standard_normal((19, 23)) * rng.uniform(0.1, 10, size=(19, 1))
    for dtype, tol in (("float32", 1e-6), ("float16", 1e-3), ("bfloat16", 8e-3)):
        f, norms = normalize_rows(torch.from_numpy(g).float(), dtype)
        ref_f, ref_n = normalize_rows_ref(g)
        assert f.dtype == getattr(torch, dtype) and norms.dtype == np.float32
        np.testing.assert_allclose(f.double().numpy(), ref_f, atol=tol)
        np.testing.assert_allclose(norms, ref_n, rtol=1e-6)
    for poison in (0.0, float("inf"), float("nan")):
        bad = torch.from_numpy(g).float()
        bad[11] = poison
        with pytest.raises(ValueError, match="row 11 "):
            normalize_rows(bad)


def test_int8_store_round_trip_within_quantisation_error(tmp_path):
    """int8 stores keep a per-row scale; reads give float32 within half a step of the written rows."""
    from icons_fast.features.store import normalize_rows, quantize_int8

    g = torch.randn(23, 37, generator=torch.Generator().manual_seed(5)) * 3
    f, norms = normalize_rows(g, "int8")
    assert f.dtype == torch.float32
    store = FeatureStore(str(tmp_path / "s"), {"model": "m"}, 37, dtype="int8")
    idx = np.arange(23, dtype=np.int64)
    store.write_shard(0, 10, idx[:10], [f"s{i}" for i in range(10)], f[:10], norms[:10])
    store.write_shard(10, 25, idx[10:], [f"s{i}" for i in range(10, 23)], f[10:], norms[10:])
    got_idx, ids, feats, got_norms = store.load()
    assert feats.dtype == torch.float32 and np.array_equal(got_idx, idx)
    _, scale = quantize_int8(f)
    err = (feats - f).abs().amax(dim=1)
    assert torch.all(err <= scale / 2 + 1e-7)
    assert float(err.max()) > 0  # it really is quantised
    blocks = list(store.iter_blocks(7))
    assert torch.equal(torch.cat([b[2] for b in blocks]), feats)
    np.testing.assert_array_equal(got_norms, norms)


# ------------------------------------------------------------------ self-repair

def _flip_byte(path, pos):
    with open(path, "r+b") as f:
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ 0xFF]))


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


FAULTS = {  # fault -> (inject(store, range), problem the check reports, found by the fast check?)
    "flipped_byte": (lambda st, r: _flip_byte(st.shard_path(*r), os.path.getsize(st.shard_path(*r)) // 2),
                     "bad_checksum", False),
    "truncated": (lambda st, r: _truncate(st.shard_path(*r)), "wrong_size", True),
    "deleted_file": (lambda st, r: os.unlink(st.shard_path(*r)), "missing_file", True),
    "deleted_entry": (lambda st, r: os.unlink(st.entry_path(*r)), "orphan_file", True),
    "garbled_entry": (lambda st, r: open(st.entry_path(*r), "w").write("{not json"), "bad_entry", True),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_check_and_repair_find_exactly_the_broken_shard(tmp_path, fault):
    inject, problem, fast = FAULTS[fault]
    g, ids = make_pool(8)
    store = FeatureStore(tmp_path, FP, K)
    for s, e in RANGES:
        write_range(store, g, ids, s, e)
    assert store.check() == [] and store.check(verify=True) == []
    broken = RANGES[2]
    inject(store, broken)
    found = store.check(verify=True)
    assert [(p.start, p.end, p.problem) for p in found] == [(*broken, problem)]
    assert ([(p.start, p.end) for p in store.check()] == [broken]) is fast  # the fast check sees size, not bits
    others = [r for r in RANGES if r != broken]
    assert store.check(verify=True, ranges=others) == [] and store.repair(verify=True, ranges=others) == []
    assert store.repair(verify=True) == found
    assert not os.path.exists(store.shard_path(*broken)) and not os.path.exists(store.entry_path(*broken))
    assert store.missing_ranges(RANGES) == [broken]
    assert store.check(verify=True) == []
    # the rerun recomputes that range only and reads back exactly the uninterrupted rows
    write_range(store, g, ids, *broken)
    ref = FeatureStore(tmp_path / "ref", FP, K)
    for s, e in RANGES:
        write_range(ref, g, ids, s, e)
    got, want = store.load(), ref.load()
    assert np.array_equal(got[0], want[0]) and got[1] == want[1]
    assert torch.equal(got[2], want[2]) and np.array_equal(got[3], want[3])


def test_fast_check_reads_entries_without_byte_size(tmp_path):
    """Entries written before ``bytes`` was recorded: still read, fast check asks only for the file."""
    g, ids = make_pool(9)
    store = FeatureStore(tmp_path, FP, K)
    for s, e in RANGES:
        write_range(store, g, ids, s, e)
    for s, e in RANGES:
        path = store.entry_path(s, e)
        entry = json.load(open(path))
        del entry["bytes"]
        json.dump(entry, open(path, "w"))
    assert store.missing_ranges(RANGES) == [] and store.check() == []
    assert len(store.load()[0]) == N - len(BAD)
    _flip_byte(store.shard_path(*RANGES[0]), 100)
    assert [p.problem for p in store.check(verify=True)] == ["bad_checksum"]
    os.unlink(store.shard_path(*RANGES[1]))
    assert store.missing_ranges(RANGES) == [RANGES[1]]
    with pytest.raises(CorruptShard, match="--verify"):
        store.finalize()
