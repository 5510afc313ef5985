"""Write a selection to disk in the input's own format (design section 2, step 8).

``export_selection`` writes into ``out_dir``:

- ``selected.<ext>``: the input records at the selected indices, in original order,
  in the input's own format (``icons_fast.data.formats.write_selected``):
  ``selected.json`` (a json list of the records as read), ``selected.jsonl`` (the
  raw lines, byte for byte), ``selected.parquet`` (parquet and hub pools: the rows
  with every column, images embedded), ``selected.arrow`` or a ``selected/``
  ``save_to_disk`` folder (arrow pools);
- ``indices.txt``: the selected sample indices, ascending, one per line;
- ``votes.npy`` (int64 ``[N]``), ``scores.npy`` (``[N, T]``) and ``task_names.json``
  when given;
- ``summary.json``: the selection info (vote histogram, cut, tie-break) and counts.

Every file is written to a temporary file in ``out_dir`` and moved into place with
``os.replace``, so a crash never leaves a half-written file under the final name.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np
import torch

from icons_fast.data.formats import read_pool, selected_file_name, write_selected
from icons_fast.data.records import record_id
from icons_fast.fileio import atomic_write


def _jsonable(x):
    """numpy / torch scalars and containers -> plain JSON values (dict keys as strings)."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    return x


def _as_array(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:
            x = x.float()  # numpy has no bfloat16
        x = x.numpy()
    return np.asarray(x)


def _check_indices(indices, n_records: int, records_path: str) -> np.ndarray:
    idx = _as_array(indices).reshape(-1)
    if idx.size and not np.issubdtype(idx.dtype, np.integer):
        raise TypeError(f"indices must be integers, got dtype {idx.dtype}")
    idx = np.sort(idx.astype(np.int64))
    if idx.size and (idx[0] < 0 or idx[-1] >= n_records):
        bad = idx[0] if idx[0] < 0 else idx[-1]
        raise IndexError(f"selected index {bad} is outside {records_path} ({n_records} records)")
    dup = idx[1:][idx[1:] == idx[:-1]]
    if dup.size:
        raise ValueError(f"selected index {dup[0]} appears more than once")
    return idx


def _expected_ids(sample_ids, given: np.ndarray, n_records: int) -> dict[int, object]:
    """Expected id per selected index from ``sample_ids`` in one of three forms.

    - a dict ``{index: id}``;
    - a sequence of length N (the pool's ids by sample index, e.g. the feature manifest's);
    - a sequence aligned with ``indices`` as passed (``sample_ids[j]`` is the id of ``indices[j]``).
    """
    if isinstance(sample_ids, dict):
        return {int(i): sample_ids[int(i)] for i in given.tolist() if int(i) in sample_ids}
    ids = list(sample_ids)
    if len(ids) == n_records:
        return {i: ids[i] for i in given.tolist()}
    if len(ids) == given.shape[0]:
        return dict(zip(given.tolist(), ids))
    raise ValueError(
        f"sample_ids has {len(ids)} entries but there are {n_records} records and {given.shape[0]} selected "
        "indices; give the pool's ids by sample index (length N) or one id per selected index"
    )


def _check_ids(records: list, idx: np.ndarray, expected: dict, records_path: str) -> None:
    """Each selected record's ``id`` must equal its expected id (catches shifted files)."""
    for i in idx.tolist():
        if i not in expected:
            raise ValueError(f"sample_ids has no expected id for selected index {i}")
        got = record_id(records[i], i)  # "#<index>" for a record without an id, as the features have it
        want = expected[i]
        if str(got) != str(want):
            raise ValueError(
                f"record {i} of {records_path} has id {got!r} but the features say sample {i} is {want!r}; "
                "the records file does not match the one the features were made from (shifted or edited?)"
            )


def export_selection(
    records_path: str,
    indices,
    out_dir: str,
    scores=None,
    task_names: Sequence[str] | None = None,
    votes=None,
    info: dict | None = None,
    sample_ids: Sequence | None = None,
) -> dict[str, str]:
    """Write the selected records and the selection's data into ``out_dir``.

    Arguments:
        records_path: the input pool (any format ``icons_fast.data.formats`` reads), N records.
        indices: selected sample indices into that list (any order, no duplicates).
        out_dir: created if missing.
        scores: optional ``[N, T]`` per-task influence (saved as ``scores.npy``).
        task_names: the T task names (``task_names.json``); required with ``scores``.
        votes: optional ``[N]`` votes per sample (``votes.npy``).
        info: optional dict from ``consensus_select(..., return_info=True)``.
        sample_ids: optional expected ids (e.g. from the feature manifest): the pool's
            ids by sample index (length N), one id per entry of ``indices`` (same
            order), or a dict {index: id}. A selected record whose ``id`` differs
            (compared as strings) raises ``ValueError`` naming the index and both ids.
    Return:
        dict name -> written path (keys among selected, indices, votes, scores,
        task_names, summary).
    """
    pool = read_pool(records_path)
    records = pool.records  # internal records: their ids are the ones the features were made with
    n = len(records)
    given = _as_array(indices).reshape(-1)
    idx = _check_indices(given, n, records_path)
    if sample_ids is not None:
        _check_ids(records, idx, _expected_ids(sample_ids, given.astype(np.int64), n), records_path)
    if scores is not None:
        scores = _as_array(scores)
        if scores.ndim == 1:
            scores = scores[:, None]
        if scores.shape[0] != n:
            raise ValueError(f"scores have {scores.shape[0]} rows but {records_path} has {n} records")
        if task_names is None or len(task_names) != scores.shape[1]:
            raise ValueError(f"scores have {scores.shape[1]} task columns; give task_names with that many names")
    if votes is not None:
        votes = _as_array(votes).reshape(-1)
        if votes.shape[0] != n:
            raise ValueError(f"votes have {votes.shape[0]} entries but {records_path} has {n} records")

    os.makedirs(out_dir, exist_ok=True)
    out = lambda name: os.path.join(out_dir, name)  # noqa: E731
    written = {}
    # ascending index = original order
    written["selected"] = write_selected(pool, idx.tolist(), out(selected_file_name(pool)))
    written["indices"] = atomic_write(out("indices.txt"), lambda f: f.write("".join(f"{i}\n" for i in idx.tolist())))
    if votes is not None:
        written["votes"] = atomic_write(out("votes.npy"), lambda f: np.save(f, votes), mode="wb")
    if scores is not None:
        written["scores"] = atomic_write(out("scores.npy"), lambda f: np.save(f, scores), mode="wb")
    if task_names is not None:
        names = [str(t) for t in task_names]
        written["task_names"] = atomic_write(out("task_names.json"), lambda f: json.dump(names, f, ensure_ascii=False))
    summary = {
        "records_path": os.path.abspath(records_path) if os.path.exists(records_path) else records_path,
        "format": pool.container,
        "n_records": n,
        "n_selected": int(idx.shape[0]),
        "task_names": [str(t) for t in task_names] if task_names is not None else None,
        **_jsonable(info or {}),
    }
    if info and "vote_histogram" in info:  # a consensus selection (not e.g. a specialist rule)
        summary["text"] = format_summary(info, task_names)
    written["summary"] = atomic_write(out("summary.json"), lambda f: json.dump(summary, f, ensure_ascii=False, indent=2))
    return written


def format_summary(info: dict, task_names: Sequence[str] | None = None) -> str:
    """A short human-readable summary of a consensus selection (``info`` from ``consensus_select``).

    Works on the dict as returned and as read back from ``summary.json`` (string keys).
    """
    hist = {int(k): int(v) for k, v in info.get("vote_histogram", {}).items()}
    sel = {int(k): int(v) for k, v in info.get("selected_per_vote", {}).items()}
    n_sel = sum(sel.values())
    n_valid = info.get("n_valid", sum(hist.values()))
    lines = [
        f"consensus selection: {n_sel} of {n_valid} valid samples"
        + (f" ({100.0 * n_sel / n_valid:.2f}%)" if n_valid else "")
        + f", {info.get('n_tasks', len(task_names or []))} tasks, top {info.get('top_percent', float('nan')):.4g}% per task",
    ]
    n_invalid = info.get("n_samples", n_valid) - n_valid
    if n_invalid:
        lines.append(f"excluded as invalid: {n_invalid}")
    if task_names:
        lines.append("tasks: " + ", ".join(str(t) for t in task_names))
    lines.append("votes   pool       selected")
    for level in sorted(set(hist) | set(sel), reverse=True):
        lines.append(f"{level:>5}   {hist.get(level, 0):<10} {sel.get(level, 0)}")
    if "cut_votes" in info:
        tied, taken = info.get("tied_at_cut", 0), info.get("taken_at_cut", 0)
        how = {
            "mean_rank": "higher mean percentile rank across tasks, then lower index",
            "index": "lower index first",
            "random": f"random permutation (seed {info.get('seed')})",
        }.get(info.get("tie_break"), str(info.get("tie_break")))
        if taken < tied:
            lines.append(f"cut at {info['cut_votes']} votes: {taken} of {tied} tied samples taken by {how}")
        else:
            lines.append(f"cut at {info['cut_votes']} votes: all {tied} samples at that level fit, no ties broken")
    return "\n".join(lines)
