"""Formats of the released ICONS code (github.com/princetonvisualai/icons): read and write.

Read from its ``icons/generalist.py``, ``icons/write.py``,
``icons/influence_matrix.py`` and ``scripts/3_specialist.sh``::

    OUT/vote_top_indices.txt        selected pool indices, one integer per line ("%d"),
                                    in the order of an ascending argsort of the votes
                                    (lowest vote first; ties in the sort's order)
    OUT/vote_selected_data.json     the pool records at those indices, in that order,
                                    a JSON list written with indent=4
    INF/<task>-<tag>/<task>_influence_score.pt        [N, M_t] train x target cosine matrix
    INF/mme-<tag>/<sub>/<sub>_influence_score.pt      one [N, M_s] matrix per MME subtask

The released generalist takes each task's row means (``I_t(i) = mean_v``),
the max over the MME subtasks' row means, then votes. Its reader of the
index file also accepts a Python list literal ``[3, 1, 2]``; so does ours.

Ordering: ``write_vote_top_indices`` writes the indices in the order given;
``release_order(indices, votes)`` gives the release's order (ascending votes,
ties by ascending index where the release's sort is arbitrary).
"""
from __future__ import annotations

import json
import os
import re
from typing import Mapping

import numpy as np
import torch

from icons_fast.fileio import atomic_write

INDICES_FILE = "vote_top_indices.txt"
SELECTED_FILE = "vote_selected_data.json"
SCORE_SUFFIX = "_influence_score.pt"
MME = "mme"  # the one task the released code splits into subtasks


def _atomic_text(path: str, text: str) -> str:
    return atomic_write(path, lambda f: f.write(text))


def release_order(indices, votes) -> np.ndarray:
    """``indices`` sorted by ascending ``votes[i]``, then ascending index (the release's file order)."""
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    v = np.asarray(votes).reshape(-1)
    return idx[np.lexsort((idx, v[idx]))]


def write_vote_top_indices(path: str, indices) -> str:
    """One integer per line, in the order given (``path`` may be a folder: ``path/vote_top_indices.txt``)."""
    if os.path.isdir(path):
        path = os.path.join(path, INDICES_FILE)
    idx = np.asarray(indices).reshape(-1)
    if idx.size and (not np.issubdtype(idx.dtype, np.integer) or idx.min() < 0):
        raise ValueError(f"indices must be non-negative integers, got dtype {idx.dtype}")
    return _atomic_text(path, "".join(f"{int(i)}\n" for i in idx))


def read_vote_top_indices(path: str) -> np.ndarray:
    """int64 ``ndarray`` in file order: one integer per line, or a ``[i, j, ...]`` list literal."""
    if os.path.isdir(path):
        path = os.path.join(path, INDICES_FILE)
    with open(path, encoding="utf-8") as f:
        text = f.read().strip()
    if text.startswith("[") and text.endswith("]"):
        values = json.loads(text)  # a list of integers is valid JSON; no eval needed
    else:
        values = []
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                if not re.fullmatch(r"\s*\d+\s*", line):
                    raise ValueError(f"{path} line {n}: {line!r} is not a sample index")
                values.append(int(line))
    return np.asarray(values, dtype=np.int64)


def _load_records(records) -> list:
    """A list as given; a path: a json list's records as read, any other pool format's records as LLaVA
    conversations (the release's trainer reads LLaVA json)."""
    if isinstance(records, (str, os.PathLike)):
        from icons_fast.data.formats import read_pool

        pool = read_pool(os.fspath(records))
        records = pool.raw if pool.container == "json" else pool.records
    if not isinstance(records, list):
        raise ValueError(f"the pool must be a JSON list of records (LLaVA format), got {type(records).__name__}")
    return records


def write_vote_selected_data(path: str, records, indices) -> str:
    """The pool's records at ``indices`` (in that order) as a JSON list with indent=4.

    ``records``: the pool (a list, or the path of its JSON file).
    """
    if os.path.isdir(path):
        path = os.path.join(path, SELECTED_FILE)
    pool = _load_records(records)
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= len(pool)):
        bad = int(idx[(idx < 0) | (idx >= len(pool))][0])
        raise IndexError(f"index {bad} is outside the pool of {len(pool)} records")
    return _atomic_text(path, json.dumps([pool[int(i)] for i in idx], indent=4, ensure_ascii=False))


def read_vote_selected_data(path: str) -> list:
    if os.path.isdir(path):
        path = os.path.join(path, SELECTED_FILE)
    return _load_records(path)


def write_icons_release(out_dir: str, records, indices, votes=None) -> dict[str, str]:
    """Both release files into ``out_dir``; with ``votes`` the indices go in the release's order."""
    order = release_order(indices, votes) if votes is not None else np.asarray(indices, dtype=np.int64).reshape(-1)
    os.makedirs(out_dir, exist_ok=True)
    return {
        "indices": write_vote_top_indices(os.path.join(out_dir, INDICES_FILE), order),
        "selected": write_vote_selected_data(os.path.join(out_dir, SELECTED_FILE), records, order),
    }


def run_to_icons_release(run_dir: str, out_dir: str | None = None, records_path: str | None = None) -> dict[str, str]:
    """A run's ``selection/`` (indices.txt, votes.npy) as the release's two files (default: into ``selection/``).

    ``records_path`` defaults to the run config's ``data.train_data``.
    """
    sel = os.path.join(run_dir, "selection")
    indices = np.loadtxt(os.path.join(sel, "indices.txt"), dtype=np.int64, ndmin=1)
    votes_path = os.path.join(sel, "votes.npy")
    votes = np.load(votes_path) if os.path.exists(votes_path) else None
    if records_path is None:
        with open(os.path.join(run_dir, "config.json")) as f:
            saved = json.load(f)
        records_path = saved.get("config", saved)["data"]["train_data"]
    return write_icons_release(out_dir or sel, records_path, indices, votes)


# --------------------------------------------------------------------------- influence matrices


def write_icons_influence(base: str, matrices: Mapping[str, object], tag: str = "icons-fast") -> list[str]:
    """Per-task ``[N, M]`` matrices in the release's layout; return the files written.

    ``matrices``: task -> ``Tensor[N, M_t]``, or "mme" -> {subtask: Tensor}.
    Layouts the released generalist would silently drop are refused with the
    reason: it reads subtask folders only under ``mme-<tag>/`` and nothing else
    there (so "mme" must come as subtasks, never as one plain matrix), and reads
    only ``<task>_influence_score.pt`` for every other task (so no other task may
    have subtasks). Task names may not contain "-": the release takes the task
    name as the folder name up to the first "-".
    """
    for task, value in matrices.items():
        if "-" in task:
            raise ValueError(f"task name {task!r} contains '-'; the release parses <task>-<tag> at the first '-'")
        if task == MME and not isinstance(value, Mapping):
            raise ValueError("task 'mme' is one plain matrix; the released generalist reads only subtask folders "
                             "under mme-<tag>/ and would drop it: give {subtask: matrix} (or rename the task)")
        if task != MME and isinstance(value, Mapping):
            raise ValueError(f"task {task!r} has subtasks; the released generalist takes the max over subtasks only "
                             f"for 'mme' and would skip {task}'s subtask folders: give one matrix for {task!r}")
        if task == MME and not value:
            raise ValueError("task 'mme' has no subtasks; the released generalist would write no mme column")
    written = []
    for task, value in matrices.items():
        folder = os.path.join(base, f"{task}-{tag}")
        items = value.items() if isinstance(value, Mapping) else [(None, value)]
        for sub, m in items:
            m = torch.as_tensor(np.asarray(m) if not torch.is_tensor(m) else m).detach().cpu()
            if m.ndim != 2:
                raise ValueError(f"influence matrix of {task}/{sub} has shape {tuple(m.shape)}; expected [N, M]")
            path = (os.path.join(folder, f"{task}{SCORE_SUFFIX}") if sub is None
                    else os.path.join(folder, str(sub), f"{sub}{SCORE_SUFFIX}"))
            atomic_write(path, lambda f, m=m: torch.save(m, f), mode="wb")
            written.append(path)
    return written


def read_icons_influence(base: str) -> tuple[np.ndarray, list[str]]:
    """The release's per-task scores from its influence folder: (float64 ``[N, T]``, task names).

    ``I_t(i)`` = row mean of ``<task>_influence_score.pt``; for a folder of
    subtask folders (the release's MME), the max over subtasks of their row
    means. Order: subtask tasks (MME) first, as the release, then by folder name.
    """
    entries = sorted(d for d in os.listdir(base) if os.path.isdir(os.path.join(base, d)) and d != "selected_data")
    grouped, plain = [], []
    for d in entries:
        task = d.split("-")[0]
        own = os.path.join(base, d, f"{task}{SCORE_SUFFIX}")
        if os.path.exists(own):
            plain.append((task, own))
            continue
        subs = sorted(s for s in os.listdir(os.path.join(base, d))
                      if os.path.exists(os.path.join(base, d, s, f"{s}{SCORE_SUFFIX}")))
        if subs:
            grouped.append((task, [os.path.join(base, d, s, f"{s}{SCORE_SUFFIX}") for s in subs]))
    if not grouped and not plain:
        raise FileNotFoundError(f"no <task>-*/<task>{SCORE_SUFFIX} files under {base}")
    cols, names = [], []
    for task, paths in grouped:
        cols.append(np.max(np.stack([_row_means(p) for p in paths], axis=1), axis=1))
        names.append(task)
    for task, path in plain:
        cols.append(_row_means(path))
        names.append(task)
    if len({c.shape[0] for c in cols}) != 1:
        raise ValueError(f"influence matrices under {base} disagree on N: {[c.shape[0] for c in cols]}")
    return np.stack(cols, axis=1), names


def _row_means(path: str) -> np.ndarray:
    m = torch.load(path, map_location="cpu", weights_only=True)
    m = m if torch.is_tensor(m) else torch.as_tensor(np.asarray(m))
    if m.ndim != 2:
        raise ValueError(f"{path} holds shape {tuple(m.shape)}; expected an [N, M] influence matrix")
    return m.double().mean(dim=1).numpy()



# --------------------------------------------------------------------------- the release-exact scores


def release_scores(train, targets, checkpoint_weights=None, unnormalised_task: str | None = MME,
                   backend: str = "auto") -> tuple[np.ndarray, list[str]]:
    """Per-task scores ``[N, T]`` exactly as the released specialist + generalist compute them.

    The release (``scripts/3_specialist.sh``) multiplies the pool's normalised
    gradients with each task's normalised validation gradients (``all_normalized.pt``),
    except for the MME subtasks, whose validation side is ``all_unormalized.pt``::

        I_t(i)   = mean_{v in V_t} <f(i), f(v)>                       (every task but MME)
        I_mme(i) = max_s mean_{v in V_s} <f(i), p(v)>,   p(v) = n(v) f(v)

    with ``f`` the unit features and ``n`` their stored norms. Only the MME column
    differs from the default (cosine on both sides); the mode exists to reproduce
    the release's numbers, not as a recommendation. Rows are used as stored (no
    renormalisation), as the release does; checkpoints are summed with weights
    ``w_c`` renormalised to 1 (the release uses one checkpoint).

    Arguments:
        train: unit features ``Tensor[N, k]``, or a list per checkpoint.
        targets: task -> ``(features [M, k], norms [M])`` or task -> {subtask: pair};
            or a list of such dicts, one per checkpoint.
        unnormalised_task: the task scored with raw validation projections ("mme";
            None: none, which gives the default cosine-mean scores).
    Return: (float64 ``ndarray[N, T]``, task names in the order given).
    """
    from icons_fast.select.influence import raw_projections, task_influence

    per_ckpt = [targets] if isinstance(targets, Mapping) else list(targets)
    mixed = []
    for d in per_ckpt:
        out = {}
        for task, value in d.items():
            subs = value if isinstance(value, Mapping) else {None: value}
            rows = {}
            for sub, (feats, norms) in subs.items():
                f = torch.as_tensor(feats).float()
                rows[sub] = raw_projections(f, norms) if task == unnormalised_task else f
            out[task] = rows if isinstance(value, Mapping) else rows[None]
        mixed.append(out)
    trains = [torch.as_tensor(t).float() for t in (train if isinstance(train, (list, tuple)) else [train])]
    scores, names = task_influence(trains if len(trains) > 1 else trains[0], mixed if len(mixed) > 1 else mixed[0],
                                   aggregate="mean", checkpoint_weights=checkpoint_weights, backend=backend,
                                   normalise=False)
    return scores.double().numpy(), names


def release_scores_from_stores(train_store, target_stores: Mapping, unnormalised_task: str | None = MME):
    """:func:`release_scores` from feature stores (or their folders) of one checkpoint.

    ``target_stores``: task -> store, or task -> {subtask: store}. Return
    ``(scores [N, T] float64 with NaN on samples the pool store lacks, task names)``.
    """
    from icons_fast.features.store import FeatureStore

    def opened(s):
        return FeatureStore.open(os.fspath(s)) if isinstance(s, (str, os.PathLike)) else s

    def pair(s):
        _, _, feats, norms = opened(s).load()
        return feats, norms

    train = opened(train_store)
    idx, _, feats, _ = train.load()
    targets = {task: ({sub: pair(x) for sub, x in v.items()} if isinstance(v, Mapping) else pair(v))
               for task, v in target_stores.items()}
    part, names = release_scores(feats, targets, unnormalised_task=unnormalised_task)
    n = int(train.fingerprint.get("n_samples", int(idx.max()) + 1 if len(idx) else 0))
    scores = np.full((n, len(names)), np.nan)
    scores[idx] = part
    return scores, names
