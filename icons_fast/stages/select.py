"""Stage 4: selection from a run's scores, exported in the pool's own format.

Reads ``scores/`` (``stages.influence``; refused when stale for this config, or
when the pool, target files, checkpoints or settings changed after the
features were made: ``influence.check_fresh``),
the pool file ``cfg.data.train_data`` and the train feature manifest of the
last checkpoint (its sample ids guard the export against a changed pool file);
the TracIn rule also reads every checkpoint's feature stores.
Writes (``select.export``: ``selected.json``, ``indices.txt``, ``scores.npy``,
``task_names.json``, ``summary.json``, and ``votes.npy`` for the vote) into

- ``selection/`` for the ICONS vote (``cfg.select.rule == "icons"``, the default);
- ``selection/rule-<NAME>/`` for another rule of ``select.rules.RULES``;
- ``selection/specialist-<TASK>/`` for one task's top budget (``task=``).
"""
from __future__ import annotations

import logging
import os

import numpy as np

from icons_fast.config import Config
from icons_fast.rundir import RunLayout, writer_lock
from icons_fast.select.export import export_selection, format_summary
from icons_fast.select.rules import RULES, select_by_rule
from icons_fast.select.voting import consensus_select, specialist_select, vote_counts
from icons_fast.stages.influence import check_fresh, load_scores, run_tracin_scores, scores_inputs, scores_meta

log = logging.getLogger(__name__)


def _budget(cfg: Config):
    """``cfg.select.budget`` as a fraction (< 1) or an integer count."""
    budget = cfg.select.budget
    return int(budget) if budget >= 1 else budget


def run_rule(cfg: Config, run_dir: str, rule: str, scores, task_names, valid) -> tuple[np.ndarray, dict, np.ndarray, list[str]]:
    """Select with ``rule`` in a run directory (the dispatch behind ``icons-fast select --rule``).

    ``scores``/``task_names``/``valid`` are the run's ``scores/`` (mean/max/topm
    cosine influence). "tracin" recomputes its scores from the feature stores
    (norms included); "less" needs the "mean" aggregate. Return
    ``(indices, info, scores used, task names)``.
    """
    if rule not in RULES:
        raise ValueError(f"unknown selection rule {rule!r}; use one of {sorted(RULES)}")
    if rule == "tracin":
        scores, task_names, valid = run_tracin_scores(cfg, run_dir)
    if rule == "less":
        aggregate = (scores_meta(RunLayout(run_dir)) or {}).get("aggregate", "mean")
        if aggregate != "mean":
            raise ValueError(f"the LESS rule needs mean-aggregated scores but {run_dir}/scores used {aggregate!r}; "
                             "rerun `icons-fast influence --aggregate mean`")
    extra = {"top_percent": cfg.select.top_percent, "tie_break": cfg.select.tie_break} if rule == "icons" else {}
    indices, info = select_by_rule(rule, scores, task_names, _budget(cfg), valid=valid, seed=cfg.seed,
                                   return_info=True, **extra)
    return indices, info, scores, list(task_names)


def run_select(cfg: Config, run_dir: str | None = None, task: str | None = None) -> dict:
    """Vote (or one task's top budget, or ``cfg.select.rule``) and export; return the written paths."""
    layout = RunLayout(run_dir or cfg.out)
    with writer_lock(layout.root, "select", cfg):
        return _select(cfg, layout, task)


def _select(cfg: Config, layout: RunLayout, task: str | None) -> dict:
    check_fresh(cfg, layout)
    if (scores_meta(layout) or {}).get("inputs_fingerprint") != scores_inputs(cfg, layout):
        raise RuntimeError(
            f"the scores in {layout.scores} are missing or were made from other features, targets or aggregate "
            f"than this config asks for; run `icons-fast influence` (same flags) first"
        )
    scores, names, valid = load_scores(layout.root)
    budget = _budget(cfg)
    out_dir = layout.selection if task is None else os.path.join(layout.selection, f"specialist-{task}")
    if task is None and cfg.select.rule != "icons":  # other selectors -> selection/rule-NAME/
        indices, info, scores, names = run_rule(cfg, layout.root, cfg.select.rule, scores, names, valid)
        out_dir, votes = os.path.join(layout.selection, f"rule-{cfg.select.rule}"), None
    elif task is None:
        indices, info = consensus_select(
            np.nan_to_num(scores, nan=-np.inf), budget=budget, top_percent=cfg.select.top_percent,
            tie_break=cfg.select.tie_break, seed=cfg.seed, valid=valid, return_info=True,
        )
        # the per-sample votes at the percentage the vote used (votes.npy; the info holds only histograms)
        votes = vote_counts(np.nan_to_num(scores, nan=-np.inf), top_percent=info["top_percent"], valid=valid)
    else:
        if task not in names:
            raise ValueError(f"unknown task {task!r}; tasks with scores: {names}")
        indices = specialist_select(np.nan_to_num(scores, nan=-np.inf), names.index(task), budget, valid=valid)
        info = {"rule": f"specialist:{task}", "selected": int(len(indices))}
        votes = None
    info["excluded_bad_samples"] = int((~valid).sum())
    # The ids the features were made for guard the export against a changed or shifted pool file.
    ckpt = os.path.basename(layout.warmup_checkpoints()[-1])
    feature_ids = layout.feature_store(ckpt, "train").sample_ids()
    paths = export_selection(
        cfg.data.train_data, indices, out_dir, scores=scores, task_names=names, votes=votes, info=info,
        sample_ids=[feature_ids[int(i)] for i in indices],
    )
    if "vote_histogram" in info:
        log.info("%s", format_summary(info, names))
    else:
        log.info("[select] %s: %d samples", info.get("rule"), len(indices))
    log.info("[select] wrote %s", out_dir)
    return paths
