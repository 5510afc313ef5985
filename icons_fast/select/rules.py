"""Selection rules on the same features and scores: ICONS, LESS, TracIn, the paper's ablation, random.

Every rule has one signature::

    fn(scores, task_names, budget, valid=None, seed=0, **extra) -> int64 ndarray[count], ascending

``scores`` is the ``[N, T]`` per-task matrix (numpy or torch; NaN allowed on
invalid rows), ``budget`` a fraction in (0, 1) (``int(budget * N_valid)``
samples, as ICONS and LESS) or an integer count, ``valid`` a boolean ``[N]``
mask (invalid samples are never selected). ``RULES`` maps names to rules and
``select_by_rule`` looks one up.

The rules (``I_t(i)`` = column ``t`` of ``scores``; ``V`` = valid samples):

- ``icons`` (default): the consensus vote, ``voting.consensus_select``
  (``extra``: ``top_percent``, ``tie_break``).
- ``less``: LESS's rule on mean-aggregated cosine scores. LESS scores one
  target task as ``max_s mean_{v in s} sum_c w_c <f_c(i), f_c(v)>`` (subtask
  means, max over subtasks; ``matching.py``), which is what
  ``task_influence(aggregate="mean")`` computes per task, and selects the top
  budget of that one score. With several target tasks LESS selects a separate
  subset per task. Our multi-task choice: the tasks play the part of LESS's
  subtasks, ``s(i) = max_t I_t(i)``, then the top budget (so with one task it is
  LESS exactly; for LESS's own per-task subsets use ``specialist_select`` /
  ``icons-fast select --task NAME``). Numerically the same as ``max`` below;
  it exists to name the convention and to check the scores' aggregate.
- ``tracin``: the checkpoint-weighted *unnormalised* inner product, computed by
  ``icons_fast.select.influence.tracin_scores`` from the stored unit features
  ``f`` and norms ``n`` (``p = n * f`` is the projected gradient)::

      A_s(i) = sum_c w_c * n_c(i) * < f_c(i), mean_{v in s} n_c(v) f_c(v) >
             = sum_c w_c * mean_{v in s} < p_c(i), p_c(v) >     (~ <g_c(i), g_c(v)> by JL)
      I_t(i) = max_{s in t} A_s(i)
      s(i)   = mean_t I_t(i)

  with ``w_c`` the checkpoints' learning rates renormalised to sum 1 (TracIn's
  ``sum_c eta_c`` up to one global factor, which cannot change a top-k). The
  rule itself takes those TracIn scores and selects by the task mean.
- ``mean`` / ``max`` / ``rank`` / ``znorm`` (the paper's aggregation
  ablation): ``s(i)`` = mean of raw scores, max of raw scores, mean
  percentile rank (ties averaged, ``voting.percentile_ranks``), mean z-score
  (``(I_t(i) - mu_t) / sigma_t`` with mean and population std over ``V``; a
  constant task contributes 0), then the top budget.
- ``random``: ``count`` valid samples drawn without replacement by
  ``numpy.random.default_rng(seed)``.

Top budget: descending ``s(i)`` over valid samples, ties broken by lower index
(LESS's ``write_selected_data`` takes the first rows of a descending
``torch.sort``, which is not stable, so its ties fall in no defined order; the
``torch.topk`` it also computes is unused); the output is ascending.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from icons_fast.select.inputs import budget_count, checked_scores, score_matrix, valid_mask
from icons_fast.select.voting import consensus_select, percentile_ranks

COMBINES = ("mean", "max", "rank", "znorm")


# --------------------------------------------------------------------------- combining tasks


def combine_scores(scores, how: str, valid=None) -> np.ndarray:
    """One selection score per sample from the ``[N, T]`` task scores.

    ``how``: "mean" (mean_t I_t), "max" (max_t I_t), "rank" (mean_t percentile
    rank among valid samples), "znorm" (mean_t of ``(I_t - mu_t) / sigma_t`` over
    valid samples, population std; sigma_t = 0 contributes 0).
    Return: float64 ``ndarray[N]``; NaN on invalid samples.
    """
    s, v = checked_scores(scores, valid)
    sv = s[v]
    if how == "mean":
        out_v = sv.mean(axis=1)
    elif how == "max":
        out_v = sv.max(axis=1)
    elif how == "rank":
        out_v = percentile_ranks(s, v, rows=np.flatnonzero(v)).mean(axis=1)
    elif how == "znorm":
        mu, sigma = sv.mean(axis=0), sv.std(axis=0)
        z = np.divide(sv - mu, sigma, out=np.zeros_like(sv), where=sigma > 0)
        out_v = z.mean(axis=1)
    else:
        raise ValueError(f"unknown combine {how!r}; use one of {COMBINES}")
    out = np.full(s.shape[0], np.nan)
    out[v] = out_v
    return out


def top_budget(score, budget, valid=None, return_info: bool = False):
    """The ``budget`` valid samples with the highest ``score`` (ties: lower index), ascending.

    ``score``: ``[N]``; ``budget`` as in ``consensus_select``. With ``return_info``
    also ``{"budget", "n_valid", "cut_score", "tied_at_cut", "taken_at_cut"}``.
    """
    s, v = checked_scores(np.asarray(score, dtype=np.float64).reshape(-1), valid)
    s = s[:, 0]
    count, _ = budget_count(budget, int(v.sum()))
    idx = np.flatnonzero(v)
    order = np.lexsort((idx, -s[idx]))  # primary: score descending; then index ascending
    chosen = idx[order[:count]]
    selected = np.sort(chosen).astype(np.int64)
    if not return_info:
        return selected
    cut = float(s[chosen[-1]])
    tied = int((s[idx] == cut).sum())
    info = {"budget": count, "n_valid": int(v.sum()), "n_samples": int(s.shape[0]), "cut_score": cut,
            "tied_at_cut": tied, "taken_at_cut": int((s[chosen] == cut).sum()), "tie_break": "index"}
    return selected, info


# --------------------------------------------------------------------------- the rules


def icons_rule(scores, task_names, budget, valid=None, seed=0, top_percent=None, tie_break="mean_rank", **_):
    """ICONS consensus vote (``voting.consensus_select``)."""
    return consensus_select(scores, budget, top_percent=top_percent, tie_break=tie_break, seed=seed, valid=valid)


def _combine_rule(how: str, doc: str) -> Callable:
    def rule(scores, task_names, budget, valid=None, seed=0, **_):
        return top_budget(combine_scores(scores, how, valid), budget, valid)

    rule.__name__ = f"{how}_rule"
    rule.__doc__ = doc
    return rule


mean_rule = _combine_rule("mean", "Top budget by the mean over tasks of the raw scores.")
max_rule = _combine_rule("max", "Top budget by the max over tasks of the raw scores.")
rank_rule = _combine_rule("rank", "Top budget by the mean over tasks of the percentile ranks.")
znorm_rule = _combine_rule("znorm", "Top budget by the mean over tasks of the z-scores.")
less_rule = _combine_rule("max", "LESS: top budget by the max over tasks (LESS's subtask max) of mean cosines.")
less_rule.__name__ = "less_rule"
tracin_rule = _combine_rule("mean", "TracIn: top budget by the task mean of ``tracin_scores`` output.")
tracin_rule.__name__ = "tracin_rule"


def random_rule(scores, task_names, budget, valid=None, seed=0, **_):
    """``count`` valid samples drawn without replacement with ``numpy.random.default_rng(seed)``."""
    n = score_matrix(scores).shape[0]
    v = valid_mask(valid, n)
    count, _ = budget_count(budget, int(v.sum()))
    pick = np.random.default_rng(seed).choice(np.flatnonzero(v), size=count, replace=False)
    return np.sort(pick).astype(np.int64)


RULES: dict[str, Callable] = {
    "icons": icons_rule,
    "less": less_rule,
    "tracin": tracin_rule,
    "mean": mean_rule,
    "max": max_rule,
    "rank": rank_rule,
    "znorm": znorm_rule,
    "random": random_rule,
}

# rule -> how it combines tasks (for the info dict); icons and random have their own info
_RULE_COMBINE = {"less": "max", "tracin": "mean", "mean": "mean", "max": "max", "rank": "rank", "znorm": "znorm"}


def select_by_rule(name: str, scores, task_names=None, budget=0.2, valid=None, seed: int = 0,
                   return_info: bool = False, **extra):
    """Apply rule ``name`` from ``RULES``; ``extra`` goes to the rule (e.g. ``top_percent``).

    Return: int64 ``ndarray[count]`` ascending; with ``return_info`` also a dict
    (``rule``, sizes, and per rule: the vote info for icons, the cut score and
    ties for the score rules, the seed for random).
    """
    if name not in RULES:
        raise ValueError(f"unknown selection rule {name!r}; use one of {sorted(RULES)}")
    s = score_matrix(scores)
    if task_names is not None and len(task_names) != s.shape[1]:
        raise ValueError(f"scores have {s.shape[1]} task columns but {len(task_names)} task names were given")
    if not return_info:
        return RULES[name](s, task_names, budget, valid=valid, seed=seed, **extra)
    if name == "icons":
        indices, info = consensus_select(s, budget, top_percent=extra.get("top_percent"),
                                         tie_break=extra.get("tie_break", "mean_rank"), seed=seed, valid=valid,
                                         return_info=True)
    elif name == "random":
        indices = random_rule(s, task_names, budget, valid=valid, seed=seed)
        v = valid_mask(valid, s.shape[0])
        info = {"budget": int(indices.shape[0]), "n_valid": int(v.sum()), "n_samples": int(s.shape[0]), "seed": seed}
    else:
        indices, info = top_budget(combine_scores(s, _RULE_COMBINE[name], valid), budget, valid, return_info=True)
        info["combine"] = _RULE_COMBINE[name]
    return indices, {"rule": name, **info}
