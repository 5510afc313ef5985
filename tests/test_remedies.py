"""Remedies beside the paper's rule: near-duplicate collapse and the per-task quota vote."""
import numpy as np
import pytest

from icons_fast.select.remedies import (
    collapse_near_duplicates,
    near_duplicate_groups,
    quota_vote,
    similar_pairs,
    similar_pairs_ref,
    vote_order,
)
from icons_fast.select.voting import consensus_select


def _pool_with_copies(seed=0, n=60, k=32):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, k))
    # rows 40..49 are noisy copies of rows 0..9 (and 50 is a copy of 40, i.e. a chain 0 - 40 - 50)
    x[40:50] = x[0:10] + 0.01 * rng.standard_normal((10, k))
    x[50] = x[40] + 0.01 * rng.standard_normal(k)
    return x * rng.uniform(0.5, 3.0, size=(n, 1))  # scale must not matter


def test_faiss_pairs_match_the_reference():
    x = _pool_with_copies()
    for threshold in (0.99, 0.5, 0.2):
        np.testing.assert_array_equal(similar_pairs(x, threshold, block_size=7), similar_pairs_ref(x, threshold))


def test_groups_and_collapse():
    x = _pool_with_copies()
    labels = near_duplicate_groups(x, 0.99)
    assert labels[40:50].tolist() == list(range(10)) and labels[50] == 0  # chains join the lowest index
    assert labels[10:40].tolist() == list(range(10, 40))
    keep = collapse_near_duplicates(x, 0.99)
    assert keep.sum() == 60 - 11 and not keep[40:51].any() and keep[:10].all()
    valid = np.ones(60, dtype=bool)
    valid[0] = False
    labels = near_duplicate_groups(x, 0.99, valid)
    assert labels[0] == -1 and labels[40] == 40 and labels[50] == 40


def test_quota_vote_gives_every_task_its_share():
    rng = np.random.default_rng(1)
    n = 200
    scores = rng.standard_normal((n, 3))
    scores[:, 1] += 3 * scores[:, 0]  # tasks 0 and 1 agree, task 2 is on its own: the vote starves it
    plain = consensus_select(scores, 0.2)
    quota = quota_vote(scores, 0.2)
    assert len(quota) == len(plain) == 40 and len(set(quota)) == 40
    ranks = np.argsort(np.argsort(-scores, axis=0), axis=0)
    home = np.argmin(ranks, axis=1)  # the task where a sample ranks best
    got = np.bincount(home[quota], minlength=3)
    assert (got >= 13).all(), got
    assert np.bincount(home[plain], minlength=3)[2] < got[2]


def test_quota_vote_respects_valid_and_counts():
    rng = np.random.default_rng(2)
    scores = rng.standard_normal((50, 2))
    valid = np.ones(50, dtype=bool)
    valid[::5] = False
    picked = quota_vote(scores, 12, valid)
    assert len(picked) == 12 and valid[picked].all() and (np.diff(picked) > 0).all()
    order = vote_order(scores, 20.0, valid)
    assert set(order) == set(np.flatnonzero(valid))
    with pytest.raises(ValueError):
        quota_vote(np.full((5, 2), np.nan), 0.5)
