"""FAISS target indexes (icons_fast.select.faiss_index) against brute-force numpy/torch top-m."""
import os

import numpy as np
import pytest
import torch

faiss = pytest.importorskip("faiss")

from icons_fast.select.faiss_index import (  # noqa: E402
    build_target_index,
    gpu_available,
    index_vectors,
    load_index,
    save_index,
    top_targets_for_train,
    top_train_for_targets,
)

K = 24


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True)


def make_data(n=203, m=31, seed=0):
    """Random train / target features; a few train rows duplicated so some scores tie exactly."""
    g = torch.Generator().manual_seed(seed)
    train = torch.randn(n, K, generator=g) * (1 + torch.rand(n, 1, generator=g))  # non-unit norms
    train[10] = train[3]
    train[n - 5] = train[3] * 2.5  # same direction: same cosine
    train[n - 9] = train[20]
    targets = torch.randn(m, K, generator=g)
    return train.half(), targets


def check_topm(scores, ids, full, m):
    """``full`` [Q, D] float64 brute-force scores. Returned ids must be distinct, their true
    scores must match the returned scores, and the score lists must equal the brute-force
    top-m: ids may differ from an arbitrary brute-force order only between tied scores."""
    mm = min(m, full.shape[1])
    assert scores.shape == ids.shape == (full.shape[0], mm)
    want = full.sort(dim=1, descending=True).values[:, :mm]
    true_of_ids = full.gather(1, ids)
    assert torch.allclose(scores.double(), true_of_ids, atol=2e-6)
    assert torch.allclose(true_of_ids, want, atol=2e-6)
    for row in ids:
        assert len(set(row.tolist())) == mm
    # Swaps only between (numerically) tied scores: where ids differ from the stable
    # brute-force order, the true scores must be equal up to fp32 rounding.
    ref_ids = full.argsort(dim=1, descending=True, stable=True)[:, :mm]
    diff = ids != ref_ids
    assert torch.allclose(true_of_ids[diff], full.gather(1, ref_ids)[diff], atol=2e-6)


def brute(train, targets):
    """[N, M] float64 cosine scores."""
    return unit(train.double()) @ unit(targets.double()).T


def test_index_holds_normalised_fp32_targets():
    _, targets = make_data()
    index = build_target_index(targets, use_gpu=False)
    assert isinstance(index, faiss.IndexFlatIP) and index.ntotal == targets.shape[0] and index.d == K
    vec = index_vectors(index)
    assert vec.dtype == torch.float32 and vec.shape == targets.shape
    assert torch.allclose(vec, unit(targets), atol=1e-6)


def test_save_load_round_trip(tmp_path):
    train, targets = make_data(seed=1)
    index = build_target_index(targets, use_gpu=False)
    path = tmp_path / "sub" / "task.faiss"
    save_index(index, path)
    assert sorted(os.listdir(path.parent)) == ["task.faiss"]  # no temp file left behind
    loaded = load_index(path, use_gpu=False)
    assert torch.equal(index_vectors(loaded), index_vectors(index))
    s1, i1 = top_targets_for_train(train, index, 5)
    s2, i2 = top_targets_for_train(train, loaded, 5)
    assert torch.equal(s1, s2) and torch.equal(i1, i2)
    save_index(index, path)  # overwrite in place
    with pytest.raises(FileNotFoundError, match="no FAISS index"):
        load_index(tmp_path / "missing.faiss")


@pytest.mark.parametrize("cap", [None, 16])
def test_top_train_for_targets_matches_brute_force(cap):
    train, targets = make_data(seed=2)
    index = build_target_index(targets, use_gpu=False)
    blocks = [train[:50], train[50:127], train[127:]]  # uneven blocks: ids must continue across them
    for m in (1, 7, 40):  # 40 > cap=16: the sharded k-selection path
        scores, ids = top_train_for_targets(iter(blocks), index, m, kselect_cap=cap)
        check_topm(scores, ids, brute(train, targets).T, m)
    scores2, ids2 = top_train_for_targets(train, index, 7, block_rows=33, kselect_cap=cap)
    check_topm(scores2, ids2, brute(train, targets).T, 7)


@pytest.mark.parametrize("cap", [None, 5])
def test_top_targets_for_train_matches_brute_force(cap):
    train, targets = make_data(seed=3)
    index = build_target_index(targets, use_gpu=False)
    full = brute(train, targets)
    for m in (1, 9, 100):  # 100 > M: all targets, sorted
        scores, ids = top_targets_for_train(train, index, m, kselect_cap=cap)
        check_topm(scores, ids, full, m)


def test_retrieval_input_errors():
    train, targets = make_data()
    index = build_target_index(targets, use_gpu=False)
    with pytest.raises(ValueError, match="m must be"):
        top_targets_for_train(train, index, 0)
    with pytest.raises(ValueError, match="dimension"):
        top_targets_for_train(train[:, :5], index, 3)
    with pytest.raises(ValueError, match="dimension"):
        top_train_for_targets([train[:, :5]], index, 3)
    with pytest.raises(ValueError, match="no train rows"):
        top_train_for_targets([], index, 3)
    with pytest.raises(ValueError, match="2-D"):
        build_target_index(targets[0])


def test_index_vectors_feed_the_influence_op():
    """The influence op reads its target side from the index: same scores as brute force."""
    from icons_fast.ops.segment_reduce import segment_reduce

    train, targets = make_data(n=37, m=12, seed=4)
    tv = index_vectors(build_target_index(targets, use_gpu=False))
    got = segment_reduce(unit(train.float()).half(), tv, [0, 1, 5, 12], "max")
    full = unit(unit(train.float()).half().double()) @ unit(targets.double()).T
    want = torch.stack([full[:, lo:hi].max(1).values for lo, hi in [(0, 1), (1, 5), (5, 12)]], 1)
    assert torch.allclose(got.double(), want, atol=1e-3)  # fp16 train rows: rounding of the unit rows


@pytest.mark.cuda
def test_gpu_index_fp16_storage_matches_cpu(tmp_path):
    if not gpu_available():
        pytest.skip("faiss has no GPU support here")
    train, targets = make_data(seed=5)
    gpu = build_target_index(targets)
    assert "Gpu" in type(gpu).__name__
    scores, ids = top_targets_for_train(train, gpu, 7)
    full = brute(train, targets)
    # fp16 storage: scores within fp16 rounding of the brute force.
    assert torch.allclose(scores.double(), full.gather(1, ids), atol=2e-3)
    save_index(gpu, tmp_path / "g.faiss")
    assert np.allclose(index_vectors(load_index(tmp_path / "g.faiss", use_gpu=False)).numpy(), unit(targets).numpy(), atol=1e-3)
