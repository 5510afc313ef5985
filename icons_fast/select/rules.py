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
  ``tracin_scores`` from the stored unit features ``f`` and norms ``n``
  (``p = n * f`` is the projected gradient)::

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
(LESS leaves ties to an unstable ``torch.topk``); the output is ascending.
"""
from __future__ import annotations

import os
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from icons_fast.select.influence import checkpoint_weights_normalised
from icons_fast.select.voting import (
    _budget_count,
    _to_numpy,
    _valid_mask,
    consensus_select,
    percentile_ranks,
)

COMBINES = ("mean", "max", "rank", "znorm")


# --------------------------------------------------------------------------- combining tasks


def _checked(scores, valid) -> tuple[np.ndarray, np.ndarray]:
    """``(float64 [N, T], bool [N])`` with every valid score finite (invalid rows may be anything)."""
    s = _to_numpy(scores).astype(np.float64)
    v = _valid_mask(valid, s.shape[0])
    if not v.any():
        raise ValueError("no valid samples: every sample is marked invalid")
    bad = ~np.isfinite(s) & v[:, None]
    if bad.any():
        i, t = np.argwhere(bad)[0]
        raise ValueError(
            f"score of sample {i} for task {t} is {s[i, t]}; mark the sample invalid or recompute its features"
        )
    return s, v


def combine_scores(scores, how: str, valid=None) -> np.ndarray:
    """One selection score per sample from the ``[N, T]`` task scores.

    ``how``: "mean" (mean_t I_t), "max" (max_t I_t), "rank" (mean_t percentile
    rank among valid samples), "znorm" (mean_t of ``(I_t - mu_t) / sigma_t`` over
    valid samples, population std; sigma_t = 0 contributes 0).
    Return: float64 ``ndarray[N]``; NaN on invalid samples.
    """
    s, v = _checked(scores, valid)
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
    s, v = _checked(np.asarray(score, dtype=np.float64).reshape(-1), valid)
    s = s[:, 0]
    count, _ = _budget_count(budget, int(v.sum()))
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
    n = _to_numpy(scores).shape[0]
    v = _valid_mask(valid, n)
    count, _ = _budget_count(budget, int(v.sum()))
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
    s = _to_numpy(scores)
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
        v = _valid_mask(valid, s.shape[0])
        info = {"budget": int(indices.shape[0]), "n_valid": int(v.sum()), "n_samples": int(s.shape[0]), "seed": seed}
    else:
        indices, info = top_budget(combine_scores(s, _RULE_COMBINE[name], valid), budget, valid, return_info=True)
        info["combine"] = _RULE_COMBINE[name]
    return indices, {"rule": name, **info}


# --------------------------------------------------------------------------- TracIn scores


def _target_means(targets: Mapping) -> tuple[torch.Tensor, list[int], list[str]]:
    """Per subtask ``mean_v n(v) f(v)`` (float64 ``[S, k]``), task index per subtask, task names.

    ``targets``: task -> (features [M, k], norms [M]) or task -> {subtask: (features, norms)}.
    """
    rows, seg_task, names = [], [], []
    for t, (task, value) in enumerate(targets.items()):
        subs = value.values() if isinstance(value, Mapping) else [value]
        names.append(str(task))
        for pair in subs:
            feats, norms = _pair(pair, f"target task {task!r}")
            rows.append((feats * norms[:, None]).mean(dim=0))
            seg_task.append(t)
    if not rows:
        raise ValueError("targets is empty; give at least one task")
    return torch.stack(rows), seg_task, names


def _pair(pair, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features, norms)`` -> float64 tensors with matching rows, checked."""
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise TypeError(f"{what}: expected a (features Tensor[M, k], norms [M]) pair, got {type(pair).__name__}")
    feats = torch.as_tensor(pair[0]).detach().to("cpu", torch.float64)
    norms = torch.as_tensor(np.asarray(pair[1], dtype=np.float64)).reshape(-1)
    if feats.ndim != 2 or feats.shape[0] == 0 or norms.shape[0] != feats.shape[0]:
        raise ValueError(f"{what}: features {tuple(feats.shape)} and norms {tuple(norms.shape)} do not match")
    return feats, norms


def _task_max(acc: np.ndarray, seg_task: Sequence[int], n_tasks: int) -> np.ndarray:
    """``[N, S]`` subtask scores -> ``[N, T]`` max over each task's subtasks."""
    seg_task = np.asarray(seg_task)
    return np.stack([acc[:, seg_task == t].max(axis=1) for t in range(n_tasks)], axis=1)


def tracin_scores(train, train_norms, targets, checkpoint_weights=None, block_size: int = 8192,
                  progress: bool = False) -> tuple[np.ndarray, list[str]]:
    """TracIn-style scores ``[N, T]`` from unit features and their norms (formula in the module doc).

    Arguments:
        train: ``Tensor[N, k]`` unit features (any float dtype) or a list, one per checkpoint.
        train_norms: ``[N]`` norms of the projected gradients, or a list per checkpoint.
        targets: task -> ``(features [M, k], norms [M])`` or task -> {subtask: pair};
            or a list of such dicts, one per checkpoint.
        checkpoint_weights: ``w_c`` (learning rates), renormalised; uniform if None.
    Return:
        (float64 ``ndarray[N, T]``, task names). Memory: one ``block_size x k`` block.
    """
    trains = list(train) if isinstance(train, (list, tuple)) else [train]
    norms = list(train_norms) if isinstance(train_norms, (list, tuple)) else [train_norms]
    per_ckpt = [targets] if isinstance(targets, Mapping) else list(targets)
    if not (len(trains) == len(norms) == len(per_ckpt)):
        raise ValueError(f"{len(trains)} train feature sets, {len(norms)} norm sets and {len(per_ckpt)} target dicts: "
                         "give one of each per checkpoint")
    weights = checkpoint_weights_normalised(checkpoint_weights, len(trains))
    acc, seg_task, names = None, None, None
    for c, (x, nrm, tg) in enumerate(zip(trains, norms, per_ckpt)):
        means, seg, nm = _target_means(tg)
        if names is not None and (nm != names or seg != seg_task):
            raise ValueError(f"targets for checkpoint {c} have tasks {nm}; checkpoint 0 has {names}")
        names, seg_task = nm, seg
        x = torch.as_tensor(x)
        nrm = np.asarray(nrm, dtype=np.float64).reshape(-1)
        if x.ndim != 2 or x.shape[0] != nrm.shape[0] or x.shape[1] != means.shape[1]:
            raise ValueError(f"train features {tuple(x.shape)} / norms {nrm.shape} (checkpoint {c}) do not match "
                             f"each other or k={means.shape[1]} of the targets")
        if acc is None:
            acc = np.zeros((x.shape[0], means.shape[0]))
        elif acc.shape[0] != x.shape[0]:
            raise ValueError(f"checkpoint {c} has {x.shape[0]} train rows, checkpoint 0 has {acc.shape[0]}")
        starts = range(0, x.shape[0], block_size)
        for s in tqdm(starts, desc=f"tracin ckpt {c}", unit="block", disable=not progress):
            acc[s:s + block_size] += weights[c] * tracin_block(x[s:s + block_size], nrm[s:s + block_size], means)
    return _task_max(acc, seg_task, len(names)), names


def tracin_block(feats: torch.Tensor, norms: np.ndarray, target_means: torch.Tensor) -> np.ndarray:
    """``n(i) * <f(i), m_s>`` for one block: float64 ``[n, S]`` (``target_means``: ``[S, k]``)."""
    f = torch.as_tensor(feats).detach().to("cpu", torch.float64)
    return (f @ target_means.T).numpy() * np.asarray(norms, dtype=np.float64)[:, None]


def tracin_scores_ref(train, train_norms, targets, checkpoint_weights=None) -> tuple[np.ndarray, list[str]]:
    """Float64 brute force of ``tracin_scores``: rebuild ``p = n * f`` and take every ``<p(i), p(v)>``."""
    trains = list(train) if isinstance(train, (list, tuple)) else [train]
    norms = list(train_norms) if isinstance(train_norms, (list, tuple)) else [train_norms]
    per_ckpt = [targets] if isinstance(targets, Mapping) else list(targets)
    w = checkpoint_weights_normalised(checkpoint_weights, len(trains))
    cols, names = [], list(per_ckpt[0])
    for task in names:
        subs = per_ckpt[0][task]
        sub_keys = list(subs) if isinstance(subs, Mapping) else [None]
        sub_scores = []
        for key in sub_keys:
            total = 0.0
            for c in range(len(trains)):
                pair = per_ckpt[c][task] if key is None else per_ckpt[c][task][key]
                pv = np.asarray(torch.as_tensor(pair[0]).double()) * np.asarray(pair[1], np.float64)[:, None]
                pi = np.asarray(torch.as_tensor(trains[c]).double()) * np.asarray(norms[c], np.float64)[:, None]
                total = total + w[c] * (pi @ pv.T).mean(axis=1)  # full N x M product
            sub_scores.append(total)
        cols.append(np.max(np.stack(sub_scores, axis=1), axis=1))
    return np.stack(cols, axis=1), [str(t) for t in names]


# --------------------------------------------------------------------------- run directories


def run_tracin_scores(cfg, run_dir: str, block_size: int = 8192) -> tuple[np.ndarray, list[str], np.ndarray]:
    """TracIn scores ``[N, T]`` (NaN where invalid), task names and ``valid`` from a run's feature stores.

    Each checkpoint's train store is streamed on its own: the checkpoint sum is
    linear, so per-subtask sums accumulate into an ``[N, S]`` array and the max
    over subtasks is taken at the end. ``valid``: rows present under every checkpoint.
    """
    from icons_fast.rundir import RunLayout
    from icons_fast.select.stage import _checkpoints, _open_store, target_splits  # run-dir glue only

    layout = RunLayout(run_dir)
    ckpts = _checkpoints(layout)
    tasks = target_splits(cfg)
    if not tasks:
        raise ValueError("no target task: pass --target NAME=FILE.json (repeatable)")
    weights = checkpoint_weights_normalised([lr for _, lr in ckpts], len(ckpts))
    stores = [_open_store(layout.features(ckpt, "train")) for ckpt, _ in ckpts]
    n = int(stores[0].fingerprint["n_samples"])
    valid = np.logical_and.reduce([s.coverage(n) for s in stores])
    acc = seg_task = names = None
    for (ckpt, _), store, w in zip(ckpts, stores, weights):
        targets = {}
        for task, subs in tasks.items():
            pairs = {}
            for sub, split in subs.items():
                _, _, feats, norms = _open_store(layout.features(ckpt, split)).load()
                if len(feats) == 0:
                    raise ValueError(f"target split {split!r} has no usable sample under {ckpt}")
                pairs[sub] = (feats, norms)
            targets[task] = pairs[None] if list(pairs) == [None] else pairs
        means, seg_task, names = _target_means(targets)
        if acc is None:
            acc = np.zeros((n, means.shape[0]))
        for idx, _ids, feats, norms in tqdm(store.iter_blocks(block_size), desc=f"tracin {ckpt}", unit="block"):
            keep = valid[idx]
            acc[idx[keep]] += w * tracin_block(feats[torch.from_numpy(keep)], norms[keep], means)
    out = _task_max(acc, seg_task, len(names))
    out[~valid] = np.nan
    return out, names, valid


def run_rule(cfg, run_dir: str, rule: str, scores, task_names, valid) -> tuple[np.ndarray, dict, np.ndarray, list[str]]:
    """Select with ``rule`` in a run directory (the dispatch behind ``icons-fast select --rule``).

    ``scores``/``task_names``/``valid`` are the run's ``scores/`` (mean/max/topm
    cosine influence). "tracin" recomputes its scores from the feature stores
    (norms included); "less" needs the "mean" aggregate. Return
    ``(indices, info, scores used, task names)``.
    """
    import json

    if rule not in RULES:
        raise ValueError(f"unknown selection rule {rule!r}; use one of {sorted(RULES)}")
    if rule == "tracin":
        scores, task_names, valid = run_tracin_scores(cfg, run_dir)
    if rule == "less":
        with open(os.path.join(run_dir, "scores", "task_names.json")) as f:
            aggregate = json.load(f).get("aggregate", "mean")
        if aggregate != "mean":
            raise ValueError(f"the LESS rule needs mean-aggregated scores but {run_dir}/scores used {aggregate!r}; "
                             "rerun `icons-fast influence --aggregate mean`")
    budget = cfg.select.budget
    budget = int(budget) if budget >= 1 else budget
    extra = {"top_percent": cfg.select.top_percent, "tie_break": cfg.select.tie_break} if rule == "icons" else {}
    indices, info = select_by_rule(rule, scores, task_names, budget, valid=valid, seed=cfg.seed,
                                   return_info=True, **extra)
    return indices, info, scores, list(task_names)
