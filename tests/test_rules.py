"""Selection rules against plain numpy: exact budget, ties, invalid samples, TracIn scores, select --rule."""
import json
import os

import numpy as np
import pytest
import torch

from icons_fast.select.influence import tracin_scores, tracin_scores_ref
from icons_fast.select.rules import RULES, combine_scores, select_by_rule, top_budget

SCORE_RULES = ["less", "tracin", "mean", "max", "rank", "znorm"]


# --------------------------------------------------------------------------- plain references


def _rank_ref(col: np.ndarray) -> np.ndarray:
    """Average 0-based rank / (n - 1) by brute-force comparison (n x n)."""
    less = (col[None, :] < col[:, None]).sum(axis=1)
    equal = (col[None, :] == col[:, None]).sum(axis=1)
    return (less + (equal - 1) / 2.0) / (len(col) - 1)


def combine_ref(s: np.ndarray, how: str, valid: np.ndarray) -> dict[int, float]:
    """{valid index: selection score} with explicit loops over tasks."""
    idx = np.flatnonzero(valid)
    sv = s[idx].astype(np.float64)
    n_t = s.shape[1]
    if how == "mean":
        val = sum(sv[:, t] for t in range(n_t)) / n_t
    elif how == "max":
        val = np.array([max(row) for row in sv])
    elif how == "rank":
        val = sum(_rank_ref(sv[:, t]) for t in range(n_t)) / n_t
    else:  # znorm
        cols = []
        for t in range(n_t):
            c = sv[:, t]
            sd = np.sqrt(((c - c.mean()) ** 2).mean())
            cols.append((c - c.mean()) / sd if sd > 0 else np.zeros_like(c))
        val = sum(cols) / n_t
    return dict(zip(idx.tolist(), val.tolist()))


def top_ref(score: dict[int, float], count: int) -> list[int]:
    return sorted(sorted(score, key=lambda i: (-score[i], i))[:count])


RULE_COMBINE = {"less": "max", "tracin": "mean", "mean": "mean", "max": "max", "rank": "rank", "znorm": "znorm"}


def _case(seed: int, n: int = 53, t: int = 4, ties: bool = False):
    rng = np.random.default_rng(seed)
    s = rng.integers(0, 4, size=(n, t)).astype(np.float64) if ties else rng.normal(size=(n, t))
    valid = rng.random(n) > 0.25
    s[~valid] = np.where(rng.random((int((~valid).sum()), t)) > 0.5, np.nan, 1e9)  # poison invalid rows
    return s, valid


# --------------------------------------------------------------------------- score rules


@pytest.mark.parametrize("rule", SCORE_RULES)
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("budget", [0.3, 7, 1])
def test_score_rules_match_numpy(rule, ties, budget):
    s, valid = _case(hash((rule, ties)) % 1000, ties=ties)
    n_valid = int(valid.sum())
    count = int(budget * n_valid) if isinstance(budget, float) else budget
    got = select_by_rule(rule, s, ["a", "b", "c", "d"], budget, valid=valid)
    want = top_ref(combine_ref(s, RULE_COMBINE[rule], valid), count)
    assert got.dtype == np.int64 and got.tolist() == want
    assert len(got) == count and valid[got].all() and np.all(np.diff(got) > 0)


def test_ties_at_the_cut_go_to_the_lower_index():
    s = np.array([[1.0], [2.0], [2.0], [2.0], [0.5], [2.0]])
    idx, info = top_budget(s[:, 0], 3, return_info=True)
    assert idx.tolist() == [1, 2, 3]
    assert info["cut_score"] == 2.0 and info["tied_at_cut"] == 4 and info["taken_at_cut"] == 3


@pytest.mark.parametrize("how", ["mean", "max", "rank", "znorm"])
def test_combine_scores_matches_numpy_and_marks_invalid(how):
    s, valid = _case(7)
    got = combine_scores(s, how, valid)
    ref = combine_ref(s, how, valid)
    assert np.isnan(got[~valid]).all()
    np.testing.assert_allclose([got[i] for i in ref], list(ref.values()), rtol=1e-12, atol=1e-12)


def test_znorm_constant_task_contributes_zero():
    rng = np.random.default_rng(3)
    s = np.column_stack([rng.normal(size=11), np.full(11, 0.25)])
    z = combine_scores(s, "znorm")
    col = s[:, 0]
    np.testing.assert_allclose(z, (col - col.mean()) / col.std() / 2, rtol=1e-12)


def test_less_rule_is_max_over_tasks_and_one_task_is_plain_top_k():
    rng = np.random.default_rng(5)
    s = rng.normal(size=(31, 1))
    got = select_by_rule("less", s, ["only"], 5)
    assert got.tolist() == sorted(np.argsort(-s[:, 0])[:5].tolist())


# --------------------------------------------------------------------------- icons and random


def _vote_ref(s: np.ndarray, count: int) -> list[int]:
    """ICONS vote by hand on distinct scores: threshold, votes, then most votes, mean rank, index."""
    p = 100.0 * count / s.shape[0]
    thr = [np.percentile(s[:, t], 100 - p) for t in range(s.shape[1])]
    votes = [sum(int(s[i, t] >= thr[t]) for t in range(s.shape[1])) for i in range(s.shape[0])]
    mean_rank = sum(_rank_ref(s[:, t]) for t in range(s.shape[1])) / s.shape[1]
    order = sorted(range(s.shape[0]), key=lambda i: (-votes[i], -mean_rank[i], i))
    return sorted(order[:count])


def test_icons_rule_matches_a_hand_vote():
    s = np.random.default_rng(11).normal(size=(47, 5))
    got, info = select_by_rule("icons", s, list("abcde"), 9, return_info=True)
    assert got.tolist() == _vote_ref(s, 9)
    assert info["rule"] == "icons" and info["budget"] == 9 and "vote_histogram" in info


def test_random_rule_seeded_valid_and_exact():
    s, valid = _case(2, n=200)
    count = int(0.2 * valid.sum())
    a = select_by_rule("random", s, None, 0.2, valid=valid, seed=4)
    b = select_by_rule("random", s, None, 0.2, valid=valid, seed=4)
    c = select_by_rule("random", s, None, 0.2, valid=valid, seed=5)
    assert a.tolist() == b.tolist() and a.tolist() != c.tolist()
    assert len(a) == count == len(set(a.tolist())) and valid[a].all()
    # every valid sample can be drawn: over many seeds the union covers the valid pool
    union = set()
    for seed in range(60):
        union |= set(select_by_rule("random", s, None, 0.2, valid=valid, seed=seed).tolist())
    assert union == set(np.flatnonzero(valid).tolist())


def test_registry_and_errors():
    assert set(RULES) == {"icons", "less", "tracin", "mean", "max", "rank", "znorm", "random"}
    s = np.random.default_rng(0).normal(size=(10, 2))
    with pytest.raises(ValueError, match="unknown selection rule"):
        select_by_rule("nope", s, ["a", "b"], 3)
    with pytest.raises(ValueError, match="task names"):
        select_by_rule("mean", s, ["a"], 3)
    bad = s.copy()
    bad[4, 1] = np.nan
    with pytest.raises(ValueError, match="sample 4"):
        select_by_rule("mean", bad, ["a", "b"], 3)
    with pytest.raises(ValueError, match="between 1 and"):
        select_by_rule("max", s, ["a", "b"], 11)


# --------------------------------------------------------------------------- TracIn scores


def _raw(rng, n, k, scale):
    return rng.normal(size=(n, k)) * rng.uniform(0.2, scale, size=(n, 1))


def _unit(p):
    n = np.linalg.norm(p, axis=1)
    return p / n[:, None], n


def test_tracin_scores_equal_raw_inner_products():
    """sum_c w_c mean_v <p_c(i), p_c(v)> from raw vectors, max over subtasks, against unit rows + norms."""
    rng = np.random.default_rng(8)
    n, k, lrs = 29, 13, [3e-4, 1e-4]
    raw_train = [_raw(rng, n, k, 5.0) for _ in lrs]
    raw_t = [{"vqa": _raw(rng, 6, k, 3.0), "mme": {"a": _raw(rng, 3, k, 2.0), "b": _raw(rng, 5, k, 4.0)}} for _ in lrs]
    w = np.array(lrs) / sum(lrs)
    want_vqa = sum(w[c] * (raw_train[c] @ raw_t[c]["vqa"].T).mean(axis=1) for c in range(2))
    want_mme = np.maximum(*[sum(w[c] * (raw_train[c] @ raw_t[c]["mme"][s].T).mean(axis=1) for c in range(2))
                            for s in ("a", "b")])
    feats, norms = zip(*[_unit(p) for p in raw_train])
    targets = [{"vqa": _unit(t["vqa"]), "mme": {s: _unit(t["mme"][s]) for s in ("a", "b")}} for t in raw_t]
    got, names = tracin_scores([torch.tensor(f) for f in feats], list(norms), targets, lrs, block_size=8)
    assert names == ["vqa", "mme"]
    want = np.column_stack([want_vqa, want_mme])
    # computed in float32 like every influence score: fp32 rounding of k-term sums
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_tracin_scores_match_ref_on_stored_dtypes(dtype):
    rng = np.random.default_rng(9)
    f, n = _unit(_raw(rng, 41, 17, 4.0))
    tf, tn = _unit(_raw(rng, 7, 17, 2.0))
    train = torch.tensor(f).to(dtype)
    targets = {"t1": (torch.tensor(tf).to(dtype), tn), "t2": (torch.tensor(tf[:3]).to(dtype), tn[:3] * 2)}
    got, _ = tracin_scores(train, n.astype(np.float32), targets, block_size=16)
    ref, _ = tracin_scores_ref(train, n.astype(np.float32), targets)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())  # float32 against float64


def test_tracin_with_unit_norms_is_the_mean_cosine_influence():
    from icons_fast.select.influence import task_influence

    rng = np.random.default_rng(12)
    f, _ = _unit(_raw(rng, 23, 11, 1.0))
    tf, _ = _unit(_raw(rng, 5, 11, 1.0))
    got, _ = tracin_scores(torch.tensor(f), np.ones(23), {"t": (torch.tensor(tf), np.ones(5))})
    cos, _ = task_influence(torch.tensor(f), {"t": torch.tensor(tf)})
    np.testing.assert_allclose(got, cos.double().numpy(), rtol=1e-5, atol=1e-6)


def test_tracin_checks_shapes():
    f = torch.randn(5, 4)
    with pytest.raises(ValueError, match="do not match"):
        tracin_scores(f, np.ones(4), {"t": (torch.randn(2, 4), np.ones(2))})
    with pytest.raises(TypeError, match="pair"):
        tracin_scores(f, np.ones(5), {"t": torch.randn(2, 4)})


# --------------------------------------------------------------------------- run directory: select --rule


def _fake_run(root: str, n: int = 30, k: int = 12, lrs=(2e-4, 5e-5)):
    """A run directory with warmup states, feature stores (2 checkpoints, 2 tasks) and the pool json."""
    from icons_fast.features.store import FeatureStore

    rng = np.random.default_rng(21)
    pool = [{"id": f"s{i}", "conversations": [{"from": "human", "value": str(i)}]} for i in range(n)]
    with open(os.path.join(root, "pool.json"), "w") as f:
        json.dump(pool, f)
    missing = 17  # one bad sample, absent from every checkpoint
    raw = {}
    for c, lr in enumerate(lrs):
        step = 10 * (c + 1)
        name = f"checkpoint-{step}"
        os.makedirs(os.path.join(root, "warmup", name))
        with open(os.path.join(root, "warmup", name, "state.json"), "w") as f:
            json.dump({"lr": lr, "step": step}, f)
        for split, m in (("train", n), ("target-a", 4), ("target-b", 6)):
            p = _raw(rng, m, k, 6.0)
            idx = np.array([i for i in range(m) if not (split == "train" and i == missing)])
            feats, norms = _unit(p[idx])
            fp = {"n_samples": m, "checkpoint_step": step, "mode": "adam" if split == "train" else "sgd"}
            store = FeatureStore(os.path.join(root, "features", name, split), fp, k, dtype="float16")
            store.write_shard(0, m, idx, [f"s{i}" if split == "train" else f"{split}{i}" for i in idx],
                              torch.tensor(feats), norms.astype(np.float32))
            raw[(c, split)] = (idx, p)
    from icons_fast.rundir import RunLayout

    with open(RunLayout(root).warmup_done, "w") as f:  # the finished warmup lists its checkpoints
        json.dump({"fingerprint": "test", "checkpoints": [f"checkpoint-{10 * (c + 1)}" for c in range(len(lrs))]}, f)
    from icons_fast.data import ErrorLog
    from icons_fast.data.errors import SampleError

    ErrorLog(os.path.join(root, "errors", "train.jsonl")).add(
        SampleError(missing, f"s{missing}", "featurize", "zero_gradient: made up for the test"))
    return raw, [lr / sum(lrs) for lr in lrs], missing


def test_select_rule_from_the_command_line(tmp_path):
    from icons_fast.cli import main

    root = str(tmp_path)
    raw, w, missing = _fake_run(root)
    common = ["--out", root, "--train-data", os.path.join(root, "pool.json"), "--target", "a=a.json",
              "--target", "b=b.json", "--budget", "7"]
    assert main(["influence"] + common) == 0
    assert main(["select"] + common + ["--rule", "tracin"]) == 0
    out = os.path.join(root, "selection", "rule-tracin")
    chosen = np.loadtxt(os.path.join(out, "indices.txt"), dtype=np.int64)
    scores = np.load(os.path.join(out, "scores.npy"))
    # TracIn by hand from the raw projections (the stores hold fp16 unit rows, hence the tolerance)
    train_idx = raw[(0, "train")][0]
    want = np.full((30, 2), np.nan)
    for t, split in enumerate(("target-a", "target-b")):
        want[train_idx, t] = sum(w[c] * (raw[(c, "train")][1][train_idx] @ raw[(c, split)][1].T).mean(axis=1)
                                 for c in range(2))
    np.testing.assert_allclose(scores, want, rtol=2e-3, atol=2e-3 * np.nanmax(np.abs(want)))
    assert np.isnan(scores[missing]).all() and missing not in chosen.tolist()
    mean = scores.mean(axis=1)  # NaN only on the missing row, which is not ranked
    assert chosen.tolist() == sorted(sorted(train_idx.tolist(), key=lambda i: (-mean[i], i))[:7])
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["rule"] == "tracin" and summary["n_selected"] == 7
    # the other rules run from the same scores; the default vote stays in selection/
    for rule in ("less", "znorm", "random"):
        assert main(["select"] + common + ["--rule", rule]) == 0
        got = np.loadtxt(os.path.join(root, "selection", f"rule-{rule}", "indices.txt"), dtype=np.int64)
        assert len(got) == 7 and missing not in got.tolist()
    assert main(["select"] + common) == 0
    assert os.path.exists(os.path.join(root, "selection", "votes.npy"))
