"""The numbers behind each figure and table of the report, read from a run directory.

Nothing here draws: :func:`read_run` loads what the earlier stages wrote (see
:mod:`icons_fast.rundir`) and :func:`figure_data` turns it into plain numpy
arrays, one small record per figure. :mod:`icons_fast.report.plots` draws them
and :mod:`icons_fast.report.html` writes the page, so tests can check every
number against an independent recomputation without looking at pixels.

Optional inputs may be missing: no error logs, no pool file, a specialist or
rule selection instead of the vote, a single task.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass

import numpy as np

from icons_fast.data.records import image_list, load_records
from icons_fast.rundir import RunLayout

log = logging.getLogger(__name__)

SOURCE_KEY = "source"  # the pool record key that names where a record came from (vqa_clean, duplicate, ...)
MISSING_SOURCE = "(no source)"  # category of records without that key, when others have it


# ---------------------------------------------------------------- reading the run directory

def _read_json(path: str, default=None):
    if not os.path.exists(path):
        return default
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def find_selection(run_dir: str, name: str | None = None) -> str | None:
    """The selection folder to report: ``selection/`` (the vote), ``selection/<name>``, or the only other one.

    Returns None when the run has no selection yet. Several specialist / rule
    selections and no vote: the first in name order (pass ``name`` to choose).
    """
    root = RunLayout(run_dir).selection
    if name is not None:
        path = root if name in ("", ".", "selection") else os.path.join(root, name)
        if not os.path.exists(os.path.join(path, "indices.txt")):
            found = [os.path.basename(os.path.dirname(p)) for p in glob.glob(os.path.join(root, "*", "indices.txt"))]
            raise FileNotFoundError(f"no selection {name!r} in {root} (no indices.txt); selections there: {sorted(found)}")
        return path
    if os.path.exists(os.path.join(root, "indices.txt")):
        return root
    others = sorted(glob.glob(os.path.join(root, "*", "indices.txt")))
    return os.path.dirname(others[0]) if others else None


def read_run(run_dir: str, selection: str | None = None) -> dict:
    """Everything the report needs, as plain python / numpy values.

    Keys: ``config`` (dict), ``scores`` [N, T] float32 (NaN rows = excluded),
    ``valid`` [N] bool, ``task_names`` [T], ``score_info`` (task_names.json),
    ``selection_dir`` (or None), ``indices`` [S] int64 ascending, ``summary``,
    ``pool`` (records list or None when the file is gone), ``selected_records``,
    ``errors`` {split: [SampleError]}.
    """
    from icons_fast.data import ErrorLog

    layout = RunLayout(run_dir)
    files = layout.score_files()
    scores_path = files["scores"]
    if not os.path.exists(scores_path):
        raise FileNotFoundError(f"no scores in {layout.scores}; run `icons-fast influence --out {run_dir}` first")
    scores = np.load(scores_path)
    if scores.ndim == 1:
        scores = scores[:, None]
    valid_path = files["valid"]
    valid = np.load(valid_path).astype(bool) if os.path.exists(valid_path) else np.isfinite(scores).all(axis=1)
    score_info = _read_json(files["task_names"], {})
    names = list(score_info.get("task_names") or [f"task{t}" for t in range(scores.shape[1])])
    if len(names) != scores.shape[1] or len(valid) != scores.shape[0]:
        raise ValueError(f"{layout.scores}: scores {scores.shape}, {len(names)} task names, {len(valid)} valid flags "
                         "do not match; rerun `icons-fast influence`")
    config = (_read_json(layout.config, {}) or {}).get("config", {})
    sel_dir = find_selection(run_dir, selection)
    indices, summary, selected_records = np.zeros(0, dtype=np.int64), {}, []
    if sel_dir is not None:
        indices = np.loadtxt(os.path.join(sel_dir, "indices.txt"), dtype=np.int64, ndmin=1)
        summary = _read_json(os.path.join(sel_dir, "summary.json"), {})
        selected_records = _read_json(os.path.join(sel_dir, "selected.json"), [])
    pool = None
    for path in (summary.get("records_path"), config.get("data", {}).get("train_data")):
        if path and os.path.exists(path):
            pool = load_records(path)  # any pool format, as the internal records
            break
    if pool is not None and len(pool) != len(valid):
        log.warning("pool file has %d records but the scores have %d rows: composition from selected.json only",
                    len(pool), len(valid))
        pool = None  # a different file now sits at that path: its records would not line up
    errors = {}
    for split, path in RunLayout(run_dir).error_logs().items():
        errors[split] = ErrorLog.read(path)
    return dict(config=config, scores=scores, valid=valid, task_names=names, score_info=score_info,
                selection_dir=sel_dir, indices=indices, summary=summary, pool=pool,
                selected_records=selected_records, errors=errors)


# ---------------------------------------------------------------- the vote as the plots show it

def top_percent_of(summary: dict, config: dict, n_valid: int) -> float:
    """The vote's ``p``: the selection's, else ``select.top_percent``, else the budget as a percentage."""
    if summary.get("top_percent") is not None:
        return float(summary["top_percent"])
    sel = config.get("select", {})
    if sel.get("top_percent") is not None:
        return float(sel["top_percent"])
    budget = float(sel.get("budget", 0.2))
    return 100.0 * budget if budget < 1 else 100.0 * budget / max(n_valid, 1)


def task_top_sets(scores: np.ndarray, valid: np.ndarray, top_percent: float) -> tuple[np.ndarray, np.ndarray]:
    """Thresholds [T] and the per-task top sets [N, T] bool (the samples each task votes for).

    ``threshold_t = percentile_{100 - p}({I_t(i) : i valid})`` (numpy's linear
    interpolation, as the vote uses); ``top[i, t] = valid[i] and I_t(i) >= threshold_t``.
    """
    from icons_fast.select.voting import vote_thresholds

    n, t = scores.shape
    if not valid.any():
        return np.full(t, np.nan), np.zeros((n, t), dtype=bool)
    # The vote's own function, in the scores' dtype, so that the top sets are exactly the votes.
    thresholds = vote_thresholds(np.nan_to_num(scores, nan=-np.inf), top_percent, valid)
    top = (scores >= thresholds[None, :]) & valid[:, None]
    return thresholds, top


def overlap_matrix(top: np.ndarray) -> np.ndarray:
    """``O[a, b] = |top_a ∩ top_b| / |top_a|`` [T, T] (NaN where ``top_a`` is empty); one matrix product."""
    t = top.astype(np.float64)
    inter = t.T @ t  # [T, T] intersection sizes
    sizes = np.diag(inter)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(sizes[:, None] > 0, inter / sizes[:, None], np.nan)


def overlap_matrix_ref(top: np.ndarray) -> np.ndarray:
    """Plain-python reference of :func:`overlap_matrix` with sets."""
    sets = [set(np.flatnonzero(top[:, a]).tolist()) for a in range(top.shape[1])]
    return np.array([[len(sa & sb) / len(sa) if sa else np.nan for sb in sets] for sa in sets])


# ---------------------------------------------------------------- what a record is

def record_source(record) -> str:
    """A record's task type: ``demo_task``, else its (first) image path's first folder (``coco``), else ``text-only``."""
    if not isinstance(record, dict):
        return "invalid record"
    if record.get("demo_task"):
        return str(record["demo_task"])
    images = image_list(record)
    if not images:
        return "text-only"
    parts = [p for p in re.split(r"[\\/]", str(images[0])) if p]
    return parts[0] if len(parts) > 1 else "image (no folder)"


def demo_flags(records: list) -> dict[str, np.ndarray] | None:
    """{"noisy": [n] bool, "near-duplicate": [n] bool} from the demo keys; None when no record has them."""
    if not any(isinstance(r, dict) and ("demo_noisy" in r or "demo_duplicate_of" in r) for r in records):
        return None
    get = lambda r, k: r.get(k) if isinstance(r, dict) else None  # noqa: E731
    return {"noisy": np.array([bool(get(r, "demo_noisy")) for r in records], dtype=bool),
            "near-duplicate": np.array([get(r, "demo_duplicate_of") is not None for r in records], dtype=bool)}


def first_turns(record) -> tuple[str, str]:
    """The first human question (without ``<image>``) and the first gpt answer of a record."""
    conv = record.get("conversations") if isinstance(record, dict) else None
    question = answer = ""
    for turn in conv if isinstance(conv, list) else []:
        if not isinstance(turn, dict):
            continue
        if turn.get("from") == "human" and not question:
            question = str(turn.get("value", "")).replace("<image>", "").strip()
        elif turn.get("from") == "gpt" and not answer:
            answer = str(turn.get("value", "")).strip()
    return question, answer


# ---------------------------------------------------------------- one record per figure

@dataclass(frozen=True)
class ScoreHistogram:
    """One task's influence scores over the valid samples.

    ``edges`` [B+1] (``B = clip(sqrt(N_valid), 5, 40)`` equal bins over the
    valid scores), ``pool`` [B] and ``selected`` [B] sample counts per bin,
    ``threshold`` the task's vote threshold.
    """
    task: str
    edges: np.ndarray
    pool: np.ndarray
    selected: np.ndarray
    threshold: float


@dataclass(frozen=True)
class Composition:
    """Counts per category in the pool and the selection.

    ``categories`` [C] ordered by pool count, then selection count, then name;
    ``pool`` [C] int counts or None when the pool file is gone; ``selected`` [C];
    ``n_pool`` and ``n_selected`` the totals the shares divide by.
    """
    categories: list[str]
    pool: np.ndarray | None
    selected: np.ndarray
    n_pool: int
    n_selected: int

    def shares(self) -> tuple[np.ndarray | None, np.ndarray]:
        """``100 * count / total`` [C] for pool (None without it) and selection; 0 where a total is 0."""
        pct = lambda c, n: 100.0 * c / n if n else np.zeros(len(c))  # noqa: E731
        return (None if self.pool is None else pct(self.pool, self.n_pool)), pct(self.selected, self.n_selected)


def composition(pool: list | None, selected: list, category) -> Composition:
    """Count ``category(record)`` over the pool records (None: gone) and the selected records."""
    pool_c = Counter(category(r) for r in pool) if pool is not None else Counter()
    sel_c = Counter(category(r) for r in selected)
    cats = sorted(set(pool_c) | set(sel_c), key=lambda c: (-pool_c[c], -sel_c[c], c))
    return Composition(categories=cats,
                       pool=None if pool is None else np.array([pool_c[c] for c in cats], dtype=np.int64),
                       selected=np.array([sel_c[c] for c in cats], dtype=np.int64),
                       n_pool=0 if pool is None else len(pool), n_selected=len(selected))


def source_of(key: str):
    """``record -> record[key]`` as text, :data:`MISSING_SOURCE` where the record has no such key."""
    def get(record) -> str:
        value = record.get(key) if isinstance(record, dict) else None
        return MISSING_SOURCE if value is None else str(value)
    return get


@dataclass
class FigureData:
    """The numbers behind every figure and table (N pool samples, T tasks, S selected).

    ``is_selected`` [N] bool; ``top_percent`` the vote's p; ``thresholds`` [T];
    ``top`` [N, T] bool; ``votes`` [N] int (tasks voting for each sample);
    ``histograms`` one :class:`ScoreHistogram` per task with valid samples;
    ``vote_levels`` [T+1] = 0..T with ``vote_pool`` / ``vote_selected`` [T+1]
    valid samples per vote count; ``overlap`` [T, T] (:func:`overlap_matrix`);
    ``by_type`` composition by :func:`record_source` (None: no records at all);
    ``by_source`` composition by the ``source_key`` record key (None when no
    record has it); ``demo`` {"pool"/"selected": {flag: [n] bool}} from the
    demo keys (None when absent); ``excluded`` {split: {code: count}} with
    ``codes`` in descending total order and ``splits`` train first.
    """
    is_selected: np.ndarray
    top_percent: float
    thresholds: np.ndarray
    top: np.ndarray
    votes: np.ndarray
    histograms: list[ScoreHistogram]
    vote_levels: np.ndarray
    vote_pool: np.ndarray
    vote_selected: np.ndarray
    overlap: np.ndarray
    by_type: Composition | None
    by_source: Composition | None
    source_key: str
    demo: dict | None
    excluded: dict
    codes: list[str]
    splits: list[str]


def selected_records_of(run: dict, is_selected: np.ndarray) -> list:
    """The selected records: from the pool in pool order, else ``selected.json`` when the pool file is gone."""
    pool = run["pool"]
    return [pool[i] for i in np.flatnonzero(is_selected)] if pool is not None else run["selected_records"]


def figure_data(run: dict, source_key: str = SOURCE_KEY) -> FigureData:
    """Compute every figure's numbers from :func:`read_run`'s values (formulas in :class:`FigureData`)."""
    scores, valid, indices = run["scores"], run["valid"], run["indices"]
    n, n_tasks = scores.shape
    is_sel = np.zeros(n, dtype=bool)
    is_sel[indices[(indices >= 0) & (indices < n)]] = True
    p = top_percent_of(run["summary"], run["config"], int(valid.sum()))
    thresholds, top = task_top_sets(scores, valid, p)
    votes = top.sum(axis=1)

    histograms = []
    for t, name in enumerate(run["task_names"]):
        col = scores[valid, t].astype(np.float64)
        if len(col) == 0:
            continue
        edges = np.histogram_bin_edges(col, bins=int(np.clip(np.sqrt(len(col)), 5, 40)))
        histograms.append(ScoreHistogram(task=name, edges=edges, pool=np.histogram(col, edges)[0],
                                         selected=np.histogram(scores[valid & is_sel, t].astype(np.float64), edges)[0],
                                         threshold=float(thresholds[t])))

    levels = np.arange(n_tasks + 1)
    vote_pool = np.array([((votes == k) & valid).sum() for k in levels], dtype=np.int64)
    vote_sel = np.array([((votes == k) & valid & is_sel).sum() for k in levels], dtype=np.int64)

    pool = run["pool"]
    selected = selected_records_of(run, is_sel)
    by_type = composition(pool, selected, record_source) if (pool is not None or selected) else None
    has_key = lambda recs: any(isinstance(r, dict) and source_key in r for r in recs or [])  # noqa: E731
    by_source = (composition(pool, selected, source_of(source_key))
                 if has_key(pool) or (pool is None and has_key(selected)) else None)
    demo = {label: flags for label, flags in (("pool", demo_flags(pool) if pool is not None else None),
                                              ("selected", demo_flags(selected))) if flags is not None} or None

    excluded = {split: Counter(e.code for e in errs) for split, errs in run["errors"].items()}
    excluded = {split: dict(c) for split, c in excluded.items() if c}
    codes = sorted({c for cnt in excluded.values() for c in cnt},
                   key=lambda c: (-sum(x.get(c, 0) for x in excluded.values()), c))
    splits = sorted(excluded, key=lambda s: (s != "train", s))
    return FigureData(is_selected=is_sel, top_percent=p, thresholds=thresholds, top=top, votes=votes,
                      histograms=histograms, vote_levels=levels, vote_pool=vote_pool, vote_selected=vote_sel,
                      overlap=overlap_matrix(top), by_type=by_type, by_source=by_source, source_key=source_key,
                      demo=demo, excluded=excluded, codes=codes, splits=splits)
