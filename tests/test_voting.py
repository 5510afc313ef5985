"""Consensus voting against plain-numpy loop references, including heavy ties and invalid samples."""
import numpy as np
import pytest
import torch

from icons_fast.select.voting import (
    consensus_select,
    percentile_ranks,
    specialist_select,
    vote_counts,
)


def _scores(n, t, seed, integer=False):
    rng = np.random.default_rng(seed)
    if integer:  # many exact ties
        return rng.integers(0, 4, size=(n, t)).astype(np.float32)
    return rng.standard_normal((n, t)).astype(np.float32)


def _votes_loop(scores, top_percent, valid):
    """One sample, one task at a time."""
    n, t = scores.shape
    votes = [0] * n
    for j in range(t):
        col = [scores[i, j] for i in range(n) if valid[i]]
        thr = np.percentile(np.array(col, dtype=scores.dtype), 100 - top_percent)
        for i in range(n):
            if valid[i] and scores[i, j] >= thr:
                votes[i] += 1
    return np.array(votes)


def _ranks_loop(scores, valid):
    """Average rank of ties / (n - 1) by counting, one entry at a time."""
    n, t = scores.shape
    idx = [i for i in range(n) if valid[i]]
    out = np.full((n, t), np.nan)
    for j in range(t):
        col = scores[idx, j]
        for i in idx:
            less = int((col < scores[i, j]).sum())
            equal = int((col == scores[i, j]).sum())
            out[i, j] = (less + (equal - 1) / 2) / (len(idx) - 1)
    return out


@pytest.mark.parametrize("integer", [False, True])
@pytest.mark.parametrize("n,t,top", [(101, 5, 20.0), (37, 1, 33.3), (250, 10, 7.5), (64, 3, 100.0)])
def test_vote_counts_match_loop(n, t, top, integer):
    s = _scores(n, t, n + t, integer)
    valid = np.ones(n, dtype=bool)
    np.testing.assert_array_equal(vote_counts(s, top), _votes_loop(s, top, valid))
    valid[np.random.default_rng(1).choice(n, n // 5, replace=False)] = False
    s_bad = s.copy()
    s_bad[~valid] = 1e9  # an invalid sample's score must not matter (it would win every vote)
    got = vote_counts(s_bad, top, valid)
    np.testing.assert_array_equal(got, _votes_loop(s_bad, top, valid))
    assert (got[~valid] == 0).all()
    # torch input, 1-D input for one task
    np.testing.assert_array_equal(vote_counts(torch.from_numpy(s), top), vote_counts(s, top))
    np.testing.assert_array_equal(vote_counts(s[:, 0], top), vote_counts(s[:, :1], top))


@pytest.mark.parametrize("integer", [False, True])
def test_percentile_ranks_match_loop(integer):
    s = _scores(53, 4, 2, integer)
    valid = np.ones(53, dtype=bool)
    valid[[0, 7, 30]] = False
    got = percentile_ranks(s, valid)
    want = _ranks_loop(s, valid)
    np.testing.assert_allclose(got, want, atol=1e-12, equal_nan=True)
    assert np.nanmin(got) >= 0 and np.nanmax(got) <= 1
    np.testing.assert_allclose(percentile_ranks(s, valid, rows=[5, 3, 9]), want[[5, 3, 9]], atol=1e-12)


def _check_selection(s, sel, budget, valid, top_percent):
    votes = vote_counts(s, top_percent, valid)
    assert sel.shape == (budget,)
    assert (np.diff(sel) > 0).all()  # ascending, unique
    assert valid[sel].all()
    cut = votes[sel].min()
    above = np.flatnonzero(valid & (votes > cut))
    assert set(above) <= set(sel.tolist())  # everything above the cut is in
    return votes, cut


def _select_loop(s, count, top_percent, valid, tie_break, seed=0):
    """Reference: sort (votes desc, tie key) with Python's sort over valid samples."""
    votes = _votes_loop(s, top_percent, valid)
    idx = [i for i in range(len(votes)) if valid[i]]
    if tie_break == "index":
        key = {i: i for i in idx}
        idx.sort(key=lambda i: (-votes[i], key[i]))
        return np.array(sorted(idx[:count]))
    ranks = _ranks_loop(s, valid).mean(axis=1)
    idx.sort(key=lambda i: (-votes[i], -ranks[i], i))
    return np.array(sorted(idx[:count]))


@pytest.mark.parametrize("tie_break", ["mean_rank", "index"])
@pytest.mark.parametrize("integer", [False, True])
@pytest.mark.parametrize("budget", [0.2, 0.35, 17])
def test_consensus_matches_sorting_reference(tie_break, integer, budget):
    n, t = 149, 6
    s = _scores(n, t, 3, integer)
    valid = np.ones(n, dtype=bool)
    valid[np.random.default_rng(4).choice(n, 20, replace=False)] = False
    n_valid = int(valid.sum())
    count = int(budget * n_valid) if isinstance(budget, float) else budget
    top = budget * 100 if isinstance(budget, float) else 100 * budget / n_valid
    sel, info = consensus_select(s, budget, tie_break=tie_break, valid=valid, return_info=True)
    votes, cut = _check_selection(s, sel, count, valid, top)
    np.testing.assert_array_equal(sel, _select_loop(s, count, top, valid, tie_break))
    # the info describes what happened
    assert info["cut_votes"] == cut
    assert info["budget"] == count and info["n_valid"] == n_valid and info["tie_break"] == tie_break
    assert info["tied_at_cut"] == int((valid & (votes == cut)).sum())
    assert info["taken_at_cut"] == int((votes[sel] == cut).sum())
    assert sum(info["vote_histogram"].values()) == n_valid
    assert info["vote_histogram"] == {int(v): int(c) for v, c in zip(*np.unique(votes[valid], return_counts=True))}
    assert info["selected_per_vote"] == {int(v): int(c) for v, c in zip(*np.unique(votes[sel], return_counts=True))}


def test_heavy_ties_integer_scores():
    """Integer scores in {0, 1}: most samples share vote counts and mean ranks; lower index decides."""
    rng = np.random.default_rng(5)
    s = rng.integers(0, 2, size=(300, 3)).astype(np.float64)
    sel, info = consensus_select(s, 0.1, return_info=True)
    assert info["tied_at_cut"] > info["taken_at_cut"] > 0
    np.testing.assert_array_equal(sel, _select_loop(s, 30, 10.0, np.ones(300, bool), "mean_rank"))
    # all scores equal: everyone has every vote, mean ranks tie, so the lowest indices win
    same = np.full((50, 4), 2.5)
    np.testing.assert_array_equal(consensus_select(same, 7), np.arange(7))
    np.testing.assert_array_equal(consensus_select(same, 7, tie_break="index"), np.arange(7))


def test_random_tie_break_is_seeded():
    s = _scores(200, 4, 6, integer=True)
    a, info = consensus_select(s, 0.25, tie_break="random", seed=3, return_info=True)
    b = consensus_select(s, 0.25, tie_break="random", seed=3)
    c = consensus_select(s, 0.25, tie_break="random", seed=4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    votes, cut = _check_selection(s, a, 50, np.ones(200, bool), 25.0)
    tied = np.flatnonzero(votes == cut)
    want_taken = tied[np.random.default_rng(3).permutation(tied.size)[: info["taken_at_cut"]]]
    np.testing.assert_array_equal(np.sort(want_taken), a[votes[a] == cut])
    assert info["seed"] == 3


def test_invalid_samples_do_not_shift_indices():
    s = _scores(120, 5, 7)
    valid = np.ones(120, dtype=bool)
    valid[[3, 50, 51, 119]] = False
    s_huge = s.copy()
    s_huge[~valid] = 1e6  # invalid samples would otherwise top every task
    sel = consensus_select(s_huge, 0.2, valid=valid)
    assert not set(sel.tolist()) & {3, 50, 51, 119}
    assert sel.size == int(0.2 * 116)
    # same as selecting on the valid rows alone and mapping back through the valid index list
    kept = np.flatnonzero(valid)
    sub = consensus_select(s[valid], 0.2)
    np.testing.assert_array_equal(sel, kept[sub])


def test_budget_and_top_percent_rules():
    s = _scores(100, 3, 8)
    assert consensus_select(s, 0.2).size == 20
    assert consensus_select(s, 0.999).size == 99  # int(), as the released code
    assert consensus_select(s, 1).size == 1
    assert consensus_select(s, 100).size == 100
    _, info = consensus_select(s, 25, return_info=True)
    assert info["top_percent"] == pytest.approx(25.0)
    _, info = consensus_select(s, 0.3, top_percent=10, return_info=True)
    assert info["top_percent"] == 10
    for bad in (0, -1, 101, 1.5, 0.0, True):
        with pytest.raises((ValueError, TypeError)):
            consensus_select(s, bad)
    with pytest.raises(ValueError, match="tie_break"):
        consensus_select(s, 0.2, tie_break="stable")
    s_nan = s.copy()
    s_nan[4, 1] = np.nan
    with pytest.raises(ValueError, match="sample 4"):
        consensus_select(s_nan, 0.2)
    valid = np.ones(100, bool)
    valid[4] = False
    assert 4 not in consensus_select(s_nan, 0.2, valid=valid)  # a NaN on an invalid sample is fine


def test_specialist_select():
    s = _scores(90, 3, 9, integer=True)
    valid = np.ones(90, bool)
    valid[[0, 1, 2]] = False
    got = specialist_select(s, 2, 15, valid=valid)
    order = sorted((i for i in range(90) if valid[i]), key=lambda i: (-s[i, 2], i))
    np.testing.assert_array_equal(got, sorted(order[:15]))
    assert specialist_select(torch.from_numpy(s), 1, 0.1).size == 9
