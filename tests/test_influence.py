"""task_influence against the float64 brute force (task_influence_ref) and a hand-written numpy check."""
import numpy as np
import pytest
import torch

from icons_fast.select import influence
from icons_fast.select.influence import stream_task_influence, task_influence, task_influence_ref

AGGREGATES = ["mean", "max", "topm:3"]
N, K = 37, 19


def _feats(n, k, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g) + 0.3  # never zero; the offset makes cosines non-trivial
    return x.to(dtype)


def _targets(seed, sizes=(1, 5, 8), dtype=torch.float32):
    return {f"task{j}_{m}": _feats(m, K, seed * 100 + j, dtype) for j, m in enumerate(sizes)}


def _check(got, ref, atol=1e-5):
    assert got.dtype == torch.float32
    assert got.shape == ref.shape
    torch.testing.assert_close(got.double(), ref, atol=atol, rtol=0)


@pytest.mark.parametrize("aggregate", AGGREGATES)
@pytest.mark.parametrize("sizes", [(1, 5, 8), (5,), (1,)])
def test_matches_float64_brute_force(aggregate, sizes):
    train, targets = _feats(N, K, 1), _targets(2, sizes)
    got, names = task_influence(train, targets, aggregate, block_size=8)
    ref, ref_names = task_influence_ref(train, targets, aggregate)
    assert names == ref_names == list(targets)
    _check(got, ref)


@pytest.mark.parametrize("aggregate", AGGREGATES)
def test_numpy_spot_check(aggregate):
    """An independent numpy computation of a few entries (guards the reference itself)."""
    train, targets = _feats(N, K, 3), _targets(4)
    got, _ = task_influence(train, targets, aggregate)
    a = train.double().numpy()
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    for t, v in enumerate(targets.values()):
        b = v.double().numpy()
        b /= np.linalg.norm(b, axis=1, keepdims=True)
        for i in (0, 17, N - 1):
            sims = [float(np.dot(a[i], b[j])) for j in range(b.shape[0])]
            if aggregate == "mean":
                want = sum(sims) / len(sims)
            elif aggregate == "max":
                want = max(sims)
            else:
                top = sorted(sims, reverse=True)[:3]
                want = sum(top) / len(top)
            assert abs(float(got[i, t]) - want) < 1e-5


@pytest.mark.parametrize("aggregate", AGGREGATES)
def test_subtasks_take_max_over_subtask_aggregates(aggregate):
    targets = {
        "mme": {f"sub{s}": _feats(m, K, 50 + s) for s, m in enumerate((3, 1, 6, 4))},
        "plain": _feats(7, K, 60),
    }
    train = _feats(N, K, 5)
    got, names = task_influence(train, targets, aggregate, block_size=10)
    ref, _ = task_influence_ref(train, targets, aggregate)
    assert names == ["mme", "plain"]
    _check(got, ref)
    # and the subtask max by hand: each subtask alone as its own task
    per_sub, _ = task_influence(train, targets["mme"], aggregate)
    torch.testing.assert_close(got[:, 0], per_sub.max(dim=1).values, atol=1e-6, rtol=0)


@pytest.mark.parametrize("aggregate", AGGREGATES)
def test_checkpoints_with_weights(aggregate):
    weights = [2e-4, 1.1e-4, 0.3e-4]  # learning rates; renormalised inside
    trains = [_feats(N, K, 10 + c) for c in range(3)]
    targets = [
        {"a": _feats(5, K, 20 + c), "b": {"x": _feats(2, K, 30 + c), "y": _feats(8, K, 40 + c)}} for c in range(3)
    ]
    got, names = task_influence(trains, targets, aggregate, checkpoint_weights=weights, block_size=16)
    ref, _ = task_influence_ref(trains, targets, aggregate, checkpoint_weights=weights)
    assert names == ["a", "b"]
    _check(got, ref)
    # renormalisation: scaling all weights changes nothing; uniform differs from weighted
    scaled, _ = task_influence(trains, targets, aggregate, checkpoint_weights=[w * 1e4 for w in weights])
    torch.testing.assert_close(scaled, got, atol=1e-6, rtol=0)
    uniform, _ = task_influence(trains, targets, aggregate)
    ref_u, _ = task_influence_ref(trains, targets, aggregate, checkpoint_weights=[1, 1, 1])
    _check(uniform, ref_u)
    assert not torch.allclose(uniform, got, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("aggregate", AGGREGATES)
def test_low_precision_inputs(dtype, aggregate):
    train32, targets32 = _feats(N, K, 7), _targets(8)
    train = train32.to(dtype)
    targets = {t: v.to(dtype) for t, v in targets32.items()}
    got, _ = task_influence(train, targets, aggregate, block_size=9)
    assert got.dtype == torch.float32
    # computed in float32 from the rounded values: fp32 accuracy against fp64 on the same values
    ref_same, _ = task_influence_ref(train.double(), {t: v.double() for t, v in targets.items()}, aggregate)
    _check(got, ref_same)
    # against the unrounded features: the input rounding error of the dtype
    ref_orig, _ = task_influence_ref(train32, targets32, aggregate)
    tol = 4e-3 if dtype == torch.float16 else 3e-2
    _check(got, ref_orig, atol=tol)


@pytest.mark.parametrize("aggregate", AGGREGATES)
def test_block_size_does_not_change_results(aggregate):
    train, targets = _feats(N, K, 11), _targets(12)
    base, _ = task_influence(train, targets, aggregate, block_size=N)
    for bs in (1, 4, 10, 36, 1000):
        got, _ = task_influence(train, targets, aggregate, block_size=bs)
        torch.testing.assert_close(got, base, atol=1e-6, rtol=0)


def test_topm_edge_cases_match_max_and_mean():
    train, targets = _feats(N, K, 13), _targets(14)
    top1, _ = task_influence(train, targets, "topm:1")
    mx, _ = task_influence(train, targets, "max")
    torch.testing.assert_close(top1, mx, atol=1e-6, rtol=0)
    top_all, _ = task_influence(train, targets, "topm:100")  # m above every task size: mean of all
    mean, _ = task_influence(train, targets, "mean")
    torch.testing.assert_close(top_all, mean, atol=1e-5, rtol=0)


@pytest.mark.parametrize("aggregate", AGGREGATES)
def test_stream_matches_in_memory(aggregate):
    trains = [_feats(N, K, 15), _feats(N, K, 16)]
    targets = [_targets(17), _targets(18)]
    want, names = task_influence(trains, targets, aggregate, checkpoint_weights=[3, 1])
    order = np.random.default_rng(0).permutation(N)
    cuts = [0, 5, 6, 20, N]

    def blocks():
        for a, b in zip(cuts[:-1], cuts[1:]):
            rows = order[a:b]
            yield rows.astype(np.int64), [t[torch.from_numpy(rows)] for t in trains]

    scores, rows, got_names = stream_task_influence(blocks(), targets, aggregate, checkpoint_weights=[3, 1])
    assert got_names == names
    assert scores.dtype == np.float32 and scores.shape == (N, len(names))
    np.testing.assert_array_equal(rows, order)
    np.testing.assert_allclose(scores, want.numpy()[order], atol=1e-6, rtol=0)


def test_one_code_path_through_reduce_block(monkeypatch):
    """Both entry points go through the module-level `_reduce_block` hook, once per checkpoint per block."""
    calls = []
    original = influence._reduce_block

    def counting(*args):
        calls.append(args[0].shape[0])
        return original(*args)

    monkeypatch.setattr(influence, "_reduce_block", counting)
    trains = [_feats(N, K, 19), _feats(N, K, 20)]
    targets = [_targets(21), _targets(22)]
    task_influence(trains, targets, "max", block_size=10)
    assert calls == [10, 10, 10, 10, 10, 10, 7, 7]
    calls.clear()
    stream_task_influence([(np.arange(N), trains)], targets, "mean")
    assert calls == [N, N]


def test_mean_uses_target_means():
    """For "mean" the prepared targets are one mean vector per subtask (the k x T product)."""
    prep = influence.prepare_targets(_targets(23), 1, "mean")
    assert prep.target_cat[0].shape == (3, K)
    assert prep.segments[0] == [(0, 1), (1, 2), (2, 3)]
    prep = influence.prepare_targets(_targets(23), 1, "max")
    assert prep.segments[0] == [(0, 1), (1, 6), (6, 14)]


def test_zero_rows_raise_naming_the_row():
    train, targets = _feats(N, K, 24), _targets(25)
    bad = train.clone()
    bad[17] = 0
    with pytest.raises(ValueError, match="row 17"):
        task_influence(bad, targets, "mean", block_size=5)
    with pytest.raises(ValueError, match="row 117"):  # the stream names the global row index
        stream_task_influence([(np.arange(100, 100 + N), [bad])], targets)
    bad_t = dict(targets)
    bad_t["task2_8"] = targets["task2_8"].clone()
    bad_t["task2_8"][3] = 0
    with pytest.raises(ValueError, match=r"task2_8.*row 3"):
        task_influence(train, bad_t, "max")


def test_bad_arguments_raise():
    train, targets = _feats(N, K, 26), _targets(27)
    with pytest.raises(ValueError, match="aggregate"):
        task_influence(train, targets, "median")
    with pytest.raises(ValueError, match="aggregate"):
        task_influence(train, targets, "topm:0")
    with pytest.raises(ValueError, match="list of target dicts"):
        task_influence([train, train], targets)
    with pytest.raises(ValueError, match="2 checkpoints"):
        task_influence([train, train], [targets])
    with pytest.raises(ValueError, match="checkpoint_weights"):
        task_influence([train, train], [targets, targets], checkpoint_weights=[1.0])
    with pytest.raises(ValueError, match="checkpoint_weights"):
        task_influence(train, targets, checkpoint_weights=[0.0])
    with pytest.raises(ValueError, match="k=19"):
        task_influence(train, {"a": _feats(3, K, 1), "b": _feats(3, K + 1, 2)})
    with pytest.raises(ValueError, match="shape"):
        task_influence(_feats(N, K + 2, 1), targets)


@pytest.mark.parametrize("aggregate", ["max", "topm:3"])
def test_native_backend_equals_torch_reference(aggregate):
    """task_influence dispatches max / top-m to the C++ op; it must agree with the torch path."""
    from icons_fast.ops.backend import has_cpu_ext

    if not has_cpu_ext():
        pytest.skip("icons_fast._C is not built")
    g = torch.Generator().manual_seed(11)
    train = torch.randn(53, 21, generator=g).half()
    targets = {"a": torch.randn(5, 21, generator=g), "b": {"x": torch.randn(2, 21, generator=g),
                                                           "y": torch.randn(7, 21, generator=g)}}
    ours, names = task_influence(train, targets, aggregate=aggregate, backend="cpp", block_size=16)
    ref, names_ref = task_influence(train, targets, aggregate=aggregate, backend="torch", block_size=16)
    assert names == names_ref
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("aggregate", AGGREGATES)
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_unnormalised_mode_matches_raw_brute_force(aggregate, backend):
    """normalise=False (the TracIn mode) takes rows as given, through the same op: numpy on raw rows."""
    trains = [_feats(N, K, 21) * 3.0, _feats(N, K, 22) * 0.5]
    targets = [{"a": _feats(4, K, 23) * 2.0, "b": {"s1": _feats(3, K, 24), "s2": _feats(6, K, 25) * 4.0}},
               {"a": _feats(4, K, 26), "b": {"s1": _feats(3, K, 27) * 0.1, "s2": _feats(6, K, 28)}}]
    lrs = [2e-4, 6e-5]
    got, names = task_influence(trains, targets, aggregate, lrs, block_size=8, backend=backend, normalise=False)
    w = np.array(lrs) / sum(lrs)

    def agg(x, v):
        sims = x.double().numpy() @ v.double().numpy().T
        if aggregate == "mean":
            return sims.mean(axis=1)
        if aggregate == "max":
            return sims.max(axis=1)
        return np.sort(sims, axis=1)[:, ::-1][:, :3].mean(axis=1)

    want_a = sum(w[c] * agg(trains[c], targets[c]["a"]) for c in range(2))
    want_b = np.maximum(*[sum(w[c] * agg(trains[c], targets[c]["b"][s]) for c in range(2)) for s in ("s1", "s2")])
    want = np.column_stack([want_a, want_b])
    assert names == ["a", "b"]
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    ref, _ = task_influence_ref(trains, targets, aggregate, lrs, normalise=False)
    np.testing.assert_allclose(ref.numpy(), want, rtol=1e-12, atol=1e-12)
    cos, _ = task_influence(trains, targets, aggregate, lrs)  # the default mode really normalises
    assert np.abs(cos.numpy()).max() <= 1 + 1e-5 < np.abs(got.numpy()).max()


def test_unnormalised_mode_names_a_non_finite_row():
    train = _feats(N, K, 31)
    train[9, 2] = float("inf")
    with pytest.raises(ValueError, match="row 9"):
        task_influence(train, {"t": _feats(3, K, 32)}, normalise=False)
    zero = _feats(N, K, 33)
    zero[4] = 0.0  # a zero raw row scores 0 instead of failing the normalisation
    got, _ = task_influence(zero, {"t": _feats(3, K, 34)}, normalise=False)
    assert float(got[4, 0]) == 0.0
