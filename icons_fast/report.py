"""``icons-fast report RUN_DIR``: PNG plots and one self-contained HTML page for a run directory.

Reads what the earlier stages wrote (see :mod:`icons_fast.rundir`) and writes
into ``RUN/report/`` (or ``out_dir``):

- ``scores_<t>_<task>.png``: per task, the histogram of the valid samples'
  influence scores (pool, and the selected samples inside it) with the vote
  threshold ``percentile_{100 - p}(I_t over valid samples)`` as a vertical line;
- ``votes.png``: samples per vote count, pool vs selected;
- ``overlap.png``: ``O[a, b] = |top_a ∩ top_b| / |top_a|`` where ``top_t`` is the
  set of valid samples with ``I_t(i) >= threshold_t`` (the samples task ``t`` votes for);
- ``composition.png``: share of each source (``demo_task``, else the image
  path's first folder such as ``coco``, else ``text-only``) in pool and selection;
  ``demo_quality.png``: noisy / near-duplicate shares when the demo keys exist;
- ``excluded.png``: excluded samples per reason code (only when there are any);
- ``index.html``: key numbers, the plots, the reason table and a sample of
  selected records. Images are linked relatively; no JavaScript.

Optional inputs may be missing: no error logs, no pool file, a specialist or
rule selection instead of the vote, a single task.
"""
from __future__ import annotations

import glob
import html
import json
import os
import re
from collections import Counter

import numpy as np

from icons_fast import report_plots as plots
from icons_fast.rundir import RunLayout

N_EXAMPLES = 20  # selected records shown in the page
MAX_TABLE_TASKS = 20  # the overlap matrix is also given as a table up to this many tasks


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


def load_run(run_dir: str, selection: str | None = None) -> dict:
    """Everything the report needs, as plain python / numpy values.

    Keys: ``config`` (dict), ``scores`` [N, T] float32 (NaN rows = excluded),
    ``valid`` [N] bool, ``task_names`` [T], ``score_info`` (task_names.json),
    ``selection_dir`` (or None), ``indices`` [S] int64 ascending, ``summary``,
    ``pool`` (records list or None when the file is gone), ``selected_records``,
    ``errors`` {split: [SampleError]}.
    """
    from icons_fast.data import ErrorLog

    layout = RunLayout(run_dir)
    scores_path = os.path.join(layout.scores, "scores.npy")
    if not os.path.exists(scores_path):
        raise FileNotFoundError(f"no scores in {layout.scores}; run `icons-fast influence --out {run_dir}` first")
    scores = np.load(scores_path)
    if scores.ndim == 1:
        scores = scores[:, None]
    valid_path = os.path.join(layout.scores, "valid.npy")
    valid = np.load(valid_path).astype(bool) if os.path.exists(valid_path) else np.isfinite(scores).all(axis=1)
    score_info = _read_json(os.path.join(layout.scores, "task_names.json"), {})
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
            pool = _read_json(path)
            break
    if pool is not None and len(pool) != len(valid):
        pool = None  # a different file now sits at that path: its records would not line up
    errors = {}
    for path in sorted(glob.glob(os.path.join(run_dir, "errors", "*.jsonl"))):
        errors[os.path.basename(path)[: -len(".jsonl")]] = ErrorLog.read(path)
    return dict(config=config, scores=scores, valid=valid, task_names=names, score_info=score_info,
                selection_dir=sel_dir, indices=indices, summary=summary, pool=pool,
                selected_records=selected_records, errors=errors)


# ---------------------------------------------------------------- what the plots show

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


def record_source(record) -> str:
    """A record's source: ``demo_task``, else its image path's first folder (``coco``), else ``text-only``."""
    if not isinstance(record, dict):
        return "invalid record"
    if record.get("demo_task"):
        return str(record["demo_task"])
    image = record.get("image")
    if image is None:
        return "text-only"
    parts = [p for p in re.split(r"[\\/]", str(image)) if p]
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


# ---------------------------------------------------------------- the page

def _esc(x) -> str:
    return html.escape(str(x))


def _cut(s: str, n: int = 200) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(name: str, alt: str) -> str:
    return f'<img src="{_esc(name)}" alt="{_esc(alt)}">'


_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px auto; max-width: 1200px;
       color: #1e1e1e; padding: 0 16px; }
h1 { font-size: 24px; } h2 { font-size: 19px; border-bottom: 1px solid #ddd; padding-bottom: 4px; margin-top: 32px; }
table { border-collapse: collapse; margin: 8px 0; font-size: 14px; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
.grid { display: flex; flex-wrap: wrap; gap: 8px; } img { border: 1px solid #eee; max-width: 100%; }
pre { background: #f7f7f7; padding: 8px; font-size: 13px; overflow-x: auto; } .note { color: #666; }
"""


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:40]


def write_report(run_dir: str, out_dir: str | None = None, selection: str | None = None,
                 n_examples: int = N_EXAMPLES) -> str:
    """Write the plots and ``index.html`` for ``run_dir`` into ``out_dir`` (default ``RUN/report``).

    ``selection`` names a folder under ``RUN/selection`` (``specialist-<task>``,
    ``rule-<name>``); by default the vote's. Returns the path of ``index.html``.
    """
    run = load_run(run_dir, selection)
    out_dir = out_dir or RunLayout(run_dir).report
    os.makedirs(out_dir, exist_ok=True)
    scores, valid, names, indices = run["scores"], run["valid"], run["task_names"], run["indices"]
    summary, config = run["summary"], run["config"]
    n, n_tasks = scores.shape
    n_valid = int(valid.sum())
    is_sel = np.zeros(n, dtype=bool)
    is_sel[indices[(indices >= 0) & (indices < n)]] = True
    p = top_percent_of(summary, config, n_valid)
    thresholds, top = task_top_sets(scores, valid, p)
    votes = top.sum(axis=1)
    sections = []

    # Key numbers.
    budget = summary.get("budget", config.get("select", {}).get("budget"))
    key = [["samples in the pool (N)", n], ["valid (scored)", n_valid], ["excluded", n - n_valid],
           ["selected", int(is_sel.sum())], ["budget", budget], ["vote threshold: top % per task", f"{p:.4g}"],
           ["tasks (T)", f"{n_tasks}: {', '.join(names)}"]]
    if run["selection_dir"] is not None:
        key.append(["selection", os.path.relpath(run["selection_dir"], run_dir)
                    + (f" (rule {summary['rule']})" if summary.get("rule") else "")])
    for k in ("tie_break", "cut_votes", "tied_at_cut", "taken_at_cut"):
        if k in summary:
            key.append([k.replace("_", " "), summary[k]])
    if run["score_info"].get("aggregate"):
        key.append(["aggregate over target samples", run["score_info"]["aggregate"]])
    sections.append("<h2>Run</h2>" + _table(["", "value"], key))
    if summary.get("text"):
        sections.append(f"<pre>{_esc(summary['text'])}</pre>")
    if run["selection_dir"] is None:
        sections.append('<p class="note">No selection yet: run <code>icons-fast select</code>.</p>')

    # (1) Per-task score histograms with the vote threshold.
    figs = []
    for t, name in enumerate(names):
        col = scores[valid, t].astype(np.float64)
        if len(col) == 0:
            continue
        edges = np.histogram_bin_edges(col, bins=int(np.clip(np.sqrt(len(col)), 5, 40)))
        pool_c, _ = np.histogram(col, edges)
        sel_c, _ = np.histogram(scores[valid & is_sel, t].astype(np.float64), edges)
        fname = f"scores_{t}_{_safe(name)}.png"
        plots.histogram(os.path.join(out_dir, fname), edges,
                        [("pool", pool_c, plots.POOL_COLOR), ("selected", sel_c, plots.SELECTED_COLOR)],
                        f"task {name}: influence scores", "influence score",
                        vlines=[(f"threshold (top {p:.3g}%) = {thresholds[t]:.4g}", thresholds[t],
                                 plots.THRESHOLD_COLOR)])
        figs.append(_img(fname, f"scores of task {name}"))
    sections.append("<h2>Score distributions per task</h2><p>Valid samples only; the red line is the task's vote "
                    f"threshold, the {100 - p:.4g}th percentile of its scores.</p><div class=grid>"
                    + "".join(figs) + "</div>")

    # (2) Votes, pool vs selected.
    levels = list(range(n_tasks + 1))
    pool_v = [int(((votes == k) & valid).sum()) for k in levels]
    sel_v = [int(((votes == k) & valid & is_sel).sum()) for k in levels]
    plots.bar_chart(os.path.join(out_dir, "votes.png"), [str(k) for k in levels],
                    [("pool", pool_v, plots.POOL_COLOR), ("selected", sel_v, plots.SELECTED_COLOR)],
                    f"votes per sample (top {p:.3g}% of each of {n_tasks} task(s))", "votes", "samples", integer=True)
    sections.append("<h2>Votes</h2>" + _img("votes.png", "vote histogram")
                    + _table(["votes", "pool", "selected"], [[k, a, b] for k, a, b in zip(levels, pool_v, sel_v)][::-1]))

    # (3) Overlap of the per-task top sets.
    overlap = overlap_matrix(top)
    plots.heatmap(os.path.join(out_dir, "overlap.png"), overlap, names, names,
                  "overlap of per-task top sets: |top_a & top_b| / |top_a|", "task b", "task a")
    sections.append("<h2>Task overlap</h2><p>Row <i>a</i>, column <i>b</i>: the share of task <i>a</i>'s top "
                    f"{p:.4g}% that is also in task <i>b</i>'s.</p>" + _img("overlap.png", "task overlap"))
    if n_tasks <= MAX_TABLE_TASKS:
        sections.append(_table(["top set of", "size"] + names,
                               [[a, int(top[:, i].sum())] + [f"{v:.3f}" for v in overlap[i]] for i, a in enumerate(names)]))

    # (4) Composition by source, and the demo's ground truth.
    sections.append(_composition(run, is_sel, out_dir))

    # (5) Excluded samples and why.
    sections.append(_excluded(run, out_dir))

    # A sample of the selected records.
    sections.append(_examples(run, votes, n_examples))

    page = ("<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
            f"<title>icons-fast report: {_esc(os.path.basename(os.path.abspath(run_dir)))}</title>"
            f"<style>{_CSS}</style></head><body>"
            f"<h1>icons-fast report</h1><p class=note>{_esc(os.path.abspath(run_dir))}</p>"
            + "\n".join(sections) + "</body></html>\n")
    path = os.path.join(out_dir, "index.html")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(page)
    os.replace(tmp, path)
    return path


def _composition(run: dict, is_sel: np.ndarray, out_dir: str) -> str:
    pool = run["pool"]
    selected = [pool[i] for i in np.flatnonzero(is_sel)] if pool is not None else run["selected_records"]
    if pool is None and not selected:
        return "<h2>Composition</h2><p class=note>The pool file is not available and nothing is selected.</p>"
    pool_src = Counter(record_source(r) for r in pool) if pool is not None else Counter()
    sel_src = Counter(record_source(r) for r in selected)
    cats = sorted(set(pool_src) | set(sel_src), key=lambda c: (-pool_src[c], -sel_src[c], c))
    share = lambda c, n: 100.0 * c / n if n else 0.0  # noqa: E731
    n_pool, n_sel = len(pool) if pool is not None else 0, len(selected)
    series = ([("pool", [share(pool_src[c], n_pool) for c in cats], plots.POOL_COLOR)] if pool is not None else [])
    series.append(("selected", [share(sel_src[c], n_sel) for c in cats], plots.SELECTED_COLOR))
    plots.bar_chart(os.path.join(out_dir, "composition.png"), cats, series, "composition by source / task type",
                    "source", "% of samples", value_format="{:.1f}")
    rows = [[c, pool_src[c] if pool is not None else "?", f"{share(pool_src[c], n_pool):.1f}%" if pool is not None else "?",
             sel_src[c], f"{share(sel_src[c], n_sel):.1f}%"] for c in cats]
    out = ["<h2>Composition</h2>", _img("composition.png", "composition"),
           _table(["source", "pool", "pool %", "selected", "selected %"], rows)]
    if pool is None:
        out.append('<p class=note>The pool file is gone: only the selection is shown.</p>')
    flags_pool = demo_flags(pool) if pool is not None else None
    flags_sel = demo_flags(selected)
    if flags_sel is not None or flags_pool is not None:
        kinds = ["noisy", "near-duplicate"]
        series, rows = [], []
        for label, flags, colour in (("pool", flags_pool, plots.POOL_COLOR), ("selected", flags_sel, plots.SELECTED_COLOR)):
            if flags is not None:
                fr = [100.0 * flags[k].mean() if len(flags[k]) else 0.0 for k in kinds]
                series.append((label, fr, colour))
                rows.append([label] + [f"{int(flags[k].sum())} ({f:.1f}%)" for k, f in zip(kinds, fr)])
        plots.bar_chart(os.path.join(out_dir, "demo_quality.png"), kinds, series,
                        "demo ground truth: noisy and near-duplicate records", "", "% of samples",
                        value_format="{:.1f}", size=(480, 360))
        out += ["<h3>Demo ground truth</h3>", _img("demo_quality.png", "noisy and duplicate shares"),
                _table(["", "noisy", "near-duplicate"], rows)]
    return "\n".join(out)


def _excluded(run: dict, out_dir: str) -> str:
    from icons_fast.data.errors import REASONS

    counts = {split: Counter(e.code for e in errs) for split, errs in run["errors"].items()}
    counts = {split: c for split, c in counts.items() if c}
    out = ["<h2>Excluded samples</h2>"]
    n_invalid = int((~run["valid"]).sum())
    train_bad = {e.index for e in run["errors"].get("train", [])}
    unexplained = sorted(set(np.flatnonzero(~run["valid"]).tolist()) - train_bad)
    if not counts:
        out.append(f"<p>No error records (errors/*.jsonl). Samples without scores: {n_invalid}.</p>")
    else:
        codes = sorted({c for cnt in counts.values() for c in cnt}, key=lambda c: (-sum(x[c] for x in counts.values()), c))
        splits = sorted(counts, key=lambda s: (s != "train", s))
        series = [(split, [counts[split][c] for c in codes], plots.PALETTE[i % len(plots.PALETTE)])
                  for i, split in enumerate(splits)]
        plots.bar_chart(os.path.join(out_dir, "excluded.png"), codes, series, "excluded samples by reason",
                        "reason code", "samples", integer=True)
        rows = [[split, code, counts[split][code], REASONS.get(code, "")] for split in splits for code in codes
                if counts[split][code]]
        out += [_img("excluded.png", "excluded samples by reason"),
                _table(["split", "reason code", "samples", "meaning"], rows)]
    if unexplained:
        out.append(f"<p class=note>{len(unexplained)} pool sample(s) have no scores and no error record "
                   f"(first index {unexplained[0]}).</p>")
    return "\n".join(out)


def _examples(run: dict, votes: np.ndarray, n_examples: int) -> str:
    indices, records = run["indices"], run["selected_records"]
    if not len(indices):
        return "<h2>Selected records</h2><p class=note>Nothing selected.</p>"
    pool = run["pool"]
    rows = []
    for j, i in enumerate(indices[:n_examples].tolist()):
        rec = pool[i] if pool is not None else (records[j] if j < len(records) else {})
        question, answer = first_turns(rec)
        rid = rec.get("id", f"#{i}") if isinstance(rec, dict) else f"#{i}"
        rows.append([i, rid, record_source(rec), int(votes[i]) if i < len(votes) else "", _cut(question), _cut(answer, 80)])
    return (f"<h2>Selected records</h2><p>The first {len(rows)} of {len(indices)} in pool order.</p>"
            + _table(["index", "id", "source", "votes", "first question", "answer"], rows))
