"""The report page: draws every figure of :mod:`icons_fast.report.data` and writes ``index.html`` beside them.

Files written into ``RUN/report/`` (or ``out_dir``):

- ``scores_<t>_<task>.png``: per task, the histogram of the valid samples'
  influence scores (pool, and the selected samples inside it) with the vote
  threshold ``percentile_{100 - p}(I_t over valid samples)`` as a vertical line;
- ``votes.png``: samples per vote count, pool vs selected;
- ``overlap.png``: ``O[a, b] = |top_a ∩ top_b| / |top_a|`` where ``top_t`` is the
  set of valid samples with ``I_t(i) >= threshold_t`` (the samples task ``t`` votes for);
- ``composition.png``: share of each task type (``demo_task``, else the image
  path's first folder such as ``coco``, else ``text-only``) in pool and selection;
- ``composition_source.png``: share of each value of the records' ``source``
  key (when the pool records carry one) in pool and selection;
- ``demo_quality.png``: noisy / near-duplicate shares when the demo keys exist;
- ``excluded.png``: excluded samples per reason code (only when there are any);
- ``index.html``: key numbers, the plots, their tables and a sample of
  selected records. Images are linked relatively; no JavaScript.
"""
from __future__ import annotations

import html
import logging
import os
import re

import numpy as np

from icons_fast.fileio import atomic_write
from icons_fast.report import plots
from icons_fast.report.data import (SOURCE_KEY, Composition, FigureData, figure_data, first_turns, read_run,
                                    record_source)
from icons_fast.rundir import RunLayout

log = logging.getLogger(__name__)

N_EXAMPLES = 20  # selected records shown in the page
MAX_TABLE_TASKS = 20  # the overlap matrix is also given as a table up to this many tasks

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


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:40]


def write_report(run_dir: str, out_dir: str | None = None, selection: str | None = None,
                 n_examples: int = N_EXAMPLES, source_key: str = SOURCE_KEY) -> str:
    """Write the plots and ``index.html`` for ``run_dir`` into ``out_dir`` (default ``RUN/report``).

    ``selection`` names a folder under ``RUN/selection`` (``specialist-<task>``,
    ``rule-<name>``); by default the vote's. ``source_key``: the pool record key
    whose values the composition-by-source figure counts. Returns the path of ``index.html``.
    """
    run = read_run(run_dir, selection)
    fd = figure_data(run, source_key)
    out_dir = out_dir or RunLayout(run_dir).report
    os.makedirs(out_dir, exist_ok=True)
    sections = [_key_numbers(run, fd, run_dir), _score_section(fd, out_dir), _vote_section(run, fd, out_dir),
                _overlap_section(run, fd, out_dir), _composition_section(run, fd, out_dir),
                _excluded_section(run, fd, out_dir), _examples(run, fd.votes, n_examples)]
    page = ("<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
            f"<title>icons-fast report: {_esc(os.path.basename(os.path.abspath(run_dir)))}</title>"
            f"<style>{_CSS}</style></head><body>"
            f"<h1>icons-fast report</h1><p class=note>{_esc(os.path.abspath(run_dir))}</p>"
            + "\n".join(sections) + "</body></html>\n")
    path = os.path.join(out_dir, "index.html")
    atomic_write(path, lambda f: f.write(page))
    log.info("report written to %s", path)
    return path


def _key_numbers(run: dict, fd: FigureData, run_dir: str) -> str:
    summary, config, names = run["summary"], run["config"], run["task_names"]
    n, n_valid = len(run["valid"]), int(run["valid"].sum())
    budget = summary.get("budget", config.get("select", {}).get("budget"))
    key = [["samples in the pool (N)", n], ["valid (scored)", n_valid], ["excluded", n - n_valid],
           ["selected", int(fd.is_selected.sum())], ["budget", budget],
           ["vote threshold: top % per task", f"{fd.top_percent:.4g}"], ["tasks (T)", f"{len(names)}: {', '.join(names)}"]]
    if run["selection_dir"] is not None:
        key.append(["selection", os.path.relpath(run["selection_dir"], run_dir)
                    + (f" (rule {summary['rule']})" if summary.get("rule") else "")])
    for k in ("tie_break", "cut_votes", "tied_at_cut", "taken_at_cut"):
        if k in summary:
            key.append([k.replace("_", " "), summary[k]])
    if run["score_info"].get("aggregate"):
        key.append(["aggregate over target samples", run["score_info"]["aggregate"]])
    out = ["<h2>Run</h2>" + _table(["", "value"], key)]
    if summary.get("text"):
        out.append(f"<pre>{_esc(summary['text'])}</pre>")
    if run["selection_dir"] is None:
        out.append('<p class="note">No selection yet: run <code>icons-fast select</code>.</p>')
    return "\n".join(out)


def _score_section(fd: FigureData, out_dir: str) -> str:
    figs = []
    for t, h in enumerate(fd.histograms):
        fname = f"scores_{t}_{_safe(h.task)}.png"
        plots.score_histogram(os.path.join(out_dir, fname), h.task, h.edges, h.pool, h.selected, h.threshold,
                              fd.top_percent)
        figs.append(_img(fname, f"scores of task {h.task}"))
    return ("<h2>Score distributions per task</h2><p>Valid samples only; the red line is the task's vote "
            f"threshold, the {100 - fd.top_percent:.4g}th percentile of its scores.</p><div class=grid>"
            + "".join(figs) + "</div>")


def _vote_section(run: dict, fd: FigureData, out_dir: str) -> str:
    n_tasks = len(run["task_names"])
    plots.bar_chart(os.path.join(out_dir, "votes.png"), [str(k) for k in fd.vote_levels],
                    [("pool", fd.vote_pool, plots.POOL_COLOR), ("selected", fd.vote_selected, plots.SELECTED_COLOR)],
                    f"votes per sample (top {fd.top_percent:.3g}% of each of {n_tasks} task(s))", "votes", "samples",
                    integer=True)
    rows = [[int(k), int(a), int(b)] for k, a, b in zip(fd.vote_levels, fd.vote_pool, fd.vote_selected)][::-1]
    return "<h2>Votes</h2>" + _img("votes.png", "vote histogram") + _table(["votes", "pool", "selected"], rows)


def _overlap_section(run: dict, fd: FigureData, out_dir: str) -> str:
    names = run["task_names"]
    plots.heatmap(os.path.join(out_dir, "overlap.png"), fd.overlap, names,
                  "overlap of per-task top sets: |top_a ∩ top_b| / |top_a|", "task b", "task a",
                  "share of task a's top set")
    out = [f"<h2>Task overlap</h2><p>Row <i>a</i>, column <i>b</i>: the share of task <i>a</i>'s top "
           f"{fd.top_percent:.4g}% that is also in task <i>b</i>'s.</p>" + _img("overlap.png", "task overlap")]
    if len(names) <= MAX_TABLE_TASKS:
        out.append(_table(["top set of", "size"] + names, [[a, int(fd.top[:, i].sum())] + [f"{v:.3f}" for v in fd.overlap[i]]
                                                          for i, a in enumerate(names)]))
    return "".join(out)


def _composition_view(comp: Composition, fname: str, title: str, xlabel: str, out_dir: str) -> list[str]:
    """One composition figure and its table: counts and shares, pool against selection."""
    pool_pct, sel_pct = comp.shares()
    series = [] if comp.pool is None else [("pool", pool_pct, plots.POOL_COLOR)]
    series.append(("selected", sel_pct, plots.SELECTED_COLOR))
    plots.bar_chart(os.path.join(out_dir, fname), comp.categories, series, title, xlabel, "% of samples",
                    value_format="{:.1f}")
    rows = [[c, "?" if comp.pool is None else int(comp.pool[j]), "?" if comp.pool is None else f"{pool_pct[j]:.1f}%",
             int(comp.selected[j]), f"{sel_pct[j]:.1f}%"] for j, c in enumerate(comp.categories)]
    return [_img(fname, title), _table([xlabel, "pool", "pool %", "selected", "selected %"], rows)]


def _composition_section(run: dict, fd: FigureData, out_dir: str) -> str:
    if fd.by_type is None:
        return "<h2>Composition</h2><p class=note>The pool file is not available and nothing is selected.</p>"
    out = ["<h2>Composition</h2>"]
    out += _composition_view(fd.by_type, "composition.png", "composition by source / task type", "source", out_dir)
    if run["pool"] is None:
        out.append('<p class=note>The pool file is gone: only the selection is shown.</p>')
    if fd.by_source is not None:
        out.append(f"<h3>By record source (<code>{_esc(fd.source_key)}</code>)</h3>")
        out += _composition_view(fd.by_source, "composition_source.png", f"composition by record {fd.source_key!r}",
                                 fd.source_key, out_dir)
    if fd.demo is not None:
        kinds = ["noisy", "near-duplicate"]
        colours = {"pool": plots.POOL_COLOR, "selected": plots.SELECTED_COLOR}
        series, rows = [], []
        for label, flags in fd.demo.items():
            shares = [100.0 * flags[k].mean() if len(flags[k]) else 0.0 for k in kinds]
            series.append((label, shares, colours[label]))
            rows.append([label] + [f"{int(flags[k].sum())} ({s:.1f}%)" for k, s in zip(kinds, shares)])
        plots.bar_chart(os.path.join(out_dir, "demo_quality.png"), kinds, series,
                        "demo ground truth: noisy / near-duplicate", "record flag", "% of samples",
                        value_format="{:.1f}", size=plots.SMALL_BAR_SIZE)
        out += ["<h3>Demo ground truth</h3>", _img("demo_quality.png", "noisy and duplicate shares"),
                _table(["", "noisy", "near-duplicate"], rows)]
    return "\n".join(out)


def _excluded_section(run: dict, fd: FigureData, out_dir: str) -> str:
    from icons_fast.data.errors import REASONS

    out = ["<h2>Excluded samples</h2>"]
    n_invalid = int((~run["valid"]).sum())
    train_bad = {e.index for e in run["errors"].get("train", [])}
    unexplained = sorted(set(np.flatnonzero(~run["valid"]).tolist()) - train_bad)
    if not fd.excluded:
        out.append(f"<p>No error records (errors/*.jsonl). Samples without scores: {n_invalid}.</p>")
    else:
        series = [(split, [fd.excluded[split].get(c, 0) for c in fd.codes], plots.SERIES_COLORS[i % len(plots.SERIES_COLORS)])
                  for i, split in enumerate(fd.splits)]
        plots.bar_chart(os.path.join(out_dir, "excluded.png"), fd.codes, series, "excluded samples by reason",
                        "reason code", "samples", integer=True)
        rows = [[split, code, fd.excluded[split][code], REASONS.get(code, "")] for split in fd.splits
                for code in fd.codes if fd.excluded[split].get(code)]
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
