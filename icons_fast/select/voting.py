"""Consensus voting over per-task influence scores (design section 2, step 7).

For each task ``t`` the threshold is the ``(100 - p)``-th percentile of that
task's scores over the valid samples (``numpy.percentile``, linear
interpolation, as the released ICONS code does); sample ``i`` gets a vote from
task ``t`` when ``I_t(i) >= threshold_t``. Votes are summed over tasks and the
``budget`` samples with the most votes are selected.

Ties at the cut (the vote level where not all tied samples fit) are broken
deterministically and reported (the released code leaves them to an unstable
sort):

- ``"mean_rank"`` (default): higher mean percentile rank across tasks, then lower index;
- ``"index"``: lower index;
- ``"random"``: the first of a ``numpy.random.default_rng(seed)`` permutation of
  the tied indices (taken in ascending order).

Invalid samples (``valid[i] == False``, e.g. unreadable data) get no votes, are
left out of every percentile and are never selected; indices stay those of the
full pool. Everything is vectorised numpy: no Python loop over samples.
"""
from __future__ import annotations

import numpy as np

from icons_fast.select.inputs import budget_count, check_finite, score_matrix, valid_mask

TIE_BREAKS = ("mean_rank", "index", "random")


def vote_thresholds(scores, top_percent: float = 20.0, valid=None) -> np.ndarray:
    """Per-task thresholds ``[T]``: the ``(100 - top_percent)``-th percentile over valid samples."""
    s = score_matrix(scores)
    v = valid_mask(valid, s.shape[0])
    if not 0 < float(top_percent) <= 100:
        raise ValueError(f"top_percent must be in (0, 100], got {top_percent}")
    if not v.any():
        raise ValueError("no valid samples: every sample is marked invalid")
    check_finite(s, v)
    sv = np.ascontiguousarray((s if v.all() else s[v]).T)  # (T, N_valid): each task contiguous
    return np.percentile(sv, 100.0 - float(top_percent), axis=1)


def vote_counts(scores, top_percent: float = 20.0, valid=None) -> np.ndarray:
    """Votes per sample: ``sum_t [I_t(i) >= percentile_t(100 - top_percent)]``.

    Arguments:
        scores: ``[N, T]`` numpy array or torch tensor (``[N]`` = one task).
        top_percent: ``p``; each task votes for (about) its top ``p`` % of valid samples.
        valid: boolean ``[N]``; invalid samples get 0 votes and are left out of the percentiles.
    Return:
        int64 ``ndarray[N]`` in ``[0, T]``.
    """
    s = score_matrix(scores)
    v = valid_mask(valid, s.shape[0])
    thresholds = vote_thresholds(s, top_percent, v)
    votes = (s >= thresholds[None, :]).sum(axis=1, dtype=np.int64)
    votes[~v] = 0
    return votes


def _column_ranks(sorted_col: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Average 0-based rank of each value ``x`` inside the ascending ``sorted_col`` (ties averaged).

    rank(x) = #{values < x} + (#{values == x} - 1) / 2. The queries are sorted
    first because ``searchsorted`` with sorted keys is several times faster.
    """
    order = np.argsort(x)
    xs = x[order]
    lo = np.searchsorted(sorted_col, xs, side="left")
    hi = np.searchsorted(sorted_col, xs, side="right")
    ranks = np.empty(x.shape[0], dtype=np.float64)
    ranks[order] = (lo + hi - 1) / 2.0
    return ranks


def percentile_ranks(scores, valid=None, rows=None) -> np.ndarray:
    """Percentile rank per task in ``[0, 1]``: (average rank of ties) / (n_valid - 1).

    Ranks are among the valid samples (lowest score 0, highest 1; a single valid
    sample gets 0.5). ``rows`` (optional int array) restricts the output to those
    samples, still ranked against the whole valid pool. Invalid samples get NaN.
    Return: float64 ``ndarray[len(rows) or N, T]``.
    """
    s = score_matrix(scores)
    v = valid_mask(valid, s.shape[0])
    if not v.any():
        raise ValueError("no valid samples: every sample is marked invalid")
    rows = np.arange(s.shape[0]) if rows is None else np.asarray(rows, dtype=np.int64)
    n_valid = int(v.sum())
    out = np.empty((rows.shape[0], s.shape[1]), dtype=np.float64)
    s_t = np.ascontiguousarray(s.T)  # (T, N): strided columns sort and gather slowly
    for t in range(s.shape[1]):  # loop over tasks only
        col = s_t[t] if v.all() else s_t[t][v]
        ranks = _column_ranks(np.sort(col), s_t[t][rows])
        out[:, t] = ranks / (n_valid - 1) if n_valid > 1 else 0.5
    out[~v[rows]] = np.nan
    return out


def _take_ties(tied: np.ndarray, need: int, scores: np.ndarray, valid: np.ndarray, tie_break: str, seed) -> np.ndarray:
    """``need`` of the ``tied`` indices (ascending) by the tie-break rule."""
    if need == tied.shape[0]:
        return tied
    if tie_break == "index":
        return tied[:need]
    if tie_break == "random":
        return tied[np.random.default_rng(seed).permutation(tied.shape[0])[:need]]
    mean_rank = percentile_ranks(scores, valid, rows=tied).mean(axis=1)
    order = np.lexsort((tied, -mean_rank))  # higher mean rank first, then lower index
    return tied[order[:need]]


def consensus_select(
    scores,
    budget=0.2,
    top_percent: float | None = None,
    tie_break: str = "mean_rank",
    seed: int = 0,
    valid=None,
    return_info: bool = False,
):
    """Select the ``budget`` samples with the most votes (ICONS consensus).

    Arguments:
        scores: ``[N, T]`` influence scores (numpy or torch).
        budget: fraction in (0, 1) -> ``int(budget * N_valid)``, or an integer count >= 1.
        top_percent: per-task vote percentage; default ``budget * 100`` (fraction) or
            ``100 * count / N_valid`` (integer count).
        tie_break: "mean_rank" | "index" | "random" (at the cut only; see module docstring).
        seed: seed of the "random" tie-break.
        valid: boolean ``[N]``; invalid samples are never selected.
        return_info: also return a dict describing the votes and the cut.
    Return:
        int64 ``ndarray[budget]`` of selected indices, ascending; with ``return_info``,
        ``(indices, info)`` where info holds ``vote_histogram`` {votes: valid samples},
        ``selected_per_vote`` {votes: selected}, ``cut_votes``, ``tied_at_cut``,
        ``taken_at_cut``, ``tie_break`` and the sizes used.
    """
    if tie_break not in TIE_BREAKS:
        raise ValueError(f"unknown tie_break {tie_break!r}; use one of {TIE_BREAKS}")
    s = score_matrix(scores)
    v = valid_mask(valid, s.shape[0])
    n_valid = int(v.sum())
    if n_valid == 0:
        raise ValueError("no valid samples: every sample is marked invalid")
    count, fraction = budget_count(budget, n_valid)
    if top_percent is None:
        top_percent = float(budget) * 100.0 if fraction else 100.0 * count / n_valid
    votes = vote_counts(s, top_percent, v)

    n_tasks = s.shape[1]
    hist = np.bincount(votes[v], minlength=n_tasks + 1)  # valid samples per vote level
    at_least = np.cumsum(hist[::-1])[::-1]  # at_least[L] = #valid with votes >= L
    cut = int(np.nonzero(at_least >= count)[0][-1])  # highest level whose ">= L" set holds the budget
    above = int(at_least[cut + 1]) if cut + 1 <= n_tasks else 0
    sure = np.flatnonzero(v & (votes > cut))
    tied = np.flatnonzero(v & (votes == cut))
    taken = _take_ties(tied, count - above, s, v, tie_break, seed)
    selected = np.sort(np.concatenate([sure, taken]).astype(np.int64))
    if not return_info:
        return selected
    sel_hist = np.bincount(votes[selected], minlength=n_tasks + 1)
    info = {
        "n_samples": int(s.shape[0]),
        "n_valid": n_valid,
        "n_tasks": int(n_tasks),
        "budget": count,
        "top_percent": float(top_percent),
        "vote_histogram": {int(L): int(c) for L, c in enumerate(hist) if c},
        "selected_per_vote": {int(L): int(c) for L, c in enumerate(sel_hist) if c},
        "cut_votes": cut,
        "tied_at_cut": int(tied.shape[0]),
        "taken_at_cut": int(taken.shape[0]),
        "tie_break": tie_break,
    }
    if tie_break == "random":
        info["seed"] = seed
    return selected, info


def specialist_select(scores, task_index: int, budget, valid=None) -> np.ndarray:
    """One task's top ``budget`` samples (ties -> lower index), indices ascending.

    ``budget`` as in ``consensus_select``; invalid samples are never selected.
    """
    s = score_matrix(scores)
    v = valid_mask(valid, s.shape[0])
    if not -s.shape[1] <= task_index < s.shape[1]:
        raise IndexError(f"task_index {task_index} out of range for {s.shape[1]} tasks")
    count, _ = budget_count(budget, int(v.sum()))
    idx = np.flatnonzero(v)
    col = s[idx, task_index]
    check_finite(col[:, None], np.ones(col.shape[0], dtype=bool))
    order = np.argsort(-col.astype(np.float64), kind="stable")  # stable: ties keep ascending index order
    return np.sort(idx[order[:count]]).astype(np.int64)
