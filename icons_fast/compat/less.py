"""LESS file formats: gradient stores, influence scores and ``sorted.csv`` (read and write).

The layout, as LESS's scripts (``less/data_selection/*.py`` and its README) lay it out::

    GRADS/<name>-ckpt<step>-<type>/dim<k>/all_orig.pt           # [N, k] rows L2-normalised
    GRADS/<name>-ckpt<step>-<type>/dim<k>/all_unormalized.pt    # [N, k] raw projections (LESS's spelling)
    OUT/<target task>/<train file name>_influence_score.pt       # [N] one score per train row
    OUT/<target task>/sorted.csv                                 # "file name, index, score", descending
    OUT/<target task>/top_p<percentage>.jsonl | top_num<count>.jsonl   # the selected lines

``<type>`` is "adam" for the pool and "sgd" for validation (target) sets. A
gradient file is one torch tensor, row ``i`` = line ``i`` of the data file (no
sample ids: rows are positional, so a store with a missing sample cannot be
written without shifting rows; ``store_to_less`` refuses that).

LESS's score for one target task with ``S`` equal, contiguous subtasks of the
validation rows (``matching.py``; MMLU 57, BBH 27, TydiQA 9)::

    score(i) = max_s mean_{v in s} sum_c w_c <train_c(i), val_c(v)>      (w renormalised to sum 1)

``less_scores`` computes it through the subtask mean vectors (``<x, mean_v v>
= mean_v <x, v>``, an ``N x k`` by ``k x S`` product per checkpoint);
``less_scores_ref`` is the literal float64 ``N x M`` product for the tests.
Selection is per target task (``write_selected_data.py``): the top
``int(percentage * N)`` (or ``max_samples``) rows by that score.

As LESS's ``write_selected_data.py`` (at its current head) does it: ``sorted.csv``
and the top file both follow one descending ``torch.sort`` of the concatenated
scores (it also computes a ``torch.topk`` but selects from the sort's order);
the file name column names the file each row comes from; record ``i`` of a
train file is raw line ``i`` as ``readlines`` counts lines, blank lines
included, and the selected lines are copied with their endings read and
written in text mode (``\r\n`` and ``\r`` become ``\n``). Our differences, on
purpose: ties are broken by file order then row index (``torch.sort`` is not
stable), ``sorted.csv`` is rewritten on every call (LESS keeps an existing one,
so a stale file survives a rerun), a selected blank line is refused (it would
be an empty training example), and a last line without a newline gets one.

Task names: LESS's ``matching.py`` looks each target task up in its
``N_SUBTASKS`` dict (``{"mmlu": 57, "bbh": 27, "tydiqa": 9}``) and splits that
task's validation rows into that many contiguous equal groups; a name missing
from it is a ``KeyError``. ``run_to_less`` therefore also writes, for each task,
one validation folder with its subtasks' rows in order, and ``N_SUBTASKS.py``
with the line to put in ``matching.py`` (``less_n_subtasks`` returns the dict).
"""
from __future__ import annotations

import json
import logging
import os
import re
from typing import Mapping, Sequence

import numpy as np
import torch

from icons_fast.fileio import atomic_write
from icons_fast.select.influence import checkpoint_weights_normalised

log = logging.getLogger(__name__)

ORIG = "all_orig.pt"
UNNORMALIZED = "all_unormalized.pt"
SORTED_CSV = "sorted.csv"
CSV_HEADER = "file name, index, score"


# --------------------------------------------------------------------------- paths


def less_grad_dir(root: str, name: str, ckpt, gradient_type: str = "adam") -> str:
    """``root/<name>-ckpt<ckpt>-<gradient_type>``: the folder LESS's ``get_info`` writes ``dim<k>/`` into."""
    return os.path.join(root, f"{name}-ckpt{ckpt}-{gradient_type}")


def _atomic_torch_save(obj, path: str) -> None:
    atomic_write(path, lambda f: torch.save(obj, f), mode="wb")


def _atomic_text(path: str, text: str) -> None:
    atomic_write(path, lambda f: f.write(text))


# --------------------------------------------------------------------------- gradient files


def write_less_grads(out_path: str, grads: torch.Tensor, norms=None, dtype: torch.dtype | None = None,
                     unnormalized: bool = True) -> dict[str, str]:
    """Write ``out_path/dim<k>/all_orig.pt`` (and ``all_unormalized.pt``).

    Arguments:
        out_path: the ``<name>-ckpt<step>-<type>`` folder (see ``less_grad_dir``).
        grads: ``Tensor[N, k]``. With ``norms`` these are unit rows (an icons-fast
            FeatureStore's features) and the raw projections are ``grads * norms``;
            without, they are raw projections and ``all_orig`` is their row normalisation.
        norms: optional ``[N]`` row norms of the raw projections.
        dtype: dtype of the written tensors (default: that of ``grads``; LESS writes
            its model's dtype, usually bfloat16).
        unnormalized: also write ``all_unormalized.pt``.
    Return: ``{"orig": path, "unnormalized": path}`` (the keys written).
    """
    g = torch.as_tensor(grads).detach().cpu()
    if g.ndim != 2 or g.shape[0] == 0:
        raise ValueError(f"grads must be a non-empty Tensor[N, k], got shape {tuple(g.shape)}")
    dtype = dtype or g.dtype
    if norms is not None:
        n = torch.as_tensor(np.asarray(norms, dtype=np.float32)).reshape(-1)
        if n.shape[0] != g.shape[0]:
            raise ValueError(f"norms have {n.shape[0]} entries but grads have {g.shape[0]} rows")
        unit = g.to(dtype)  # already unit rows: written as stored, so they read back bit-identical
        raw = g.float() * n[:, None]
    else:
        raw = g.float()
        lengths = torch.linalg.vector_norm(raw, dim=1)
        if not bool((lengths > 0).all()):
            row = int(torch.nonzero(~(lengths > 0))[0, 0])
            raise ValueError(f"row {row} of grads has norm {float(lengths[row])}; it cannot be normalised")
        unit = (raw / lengths[:, None]).to(dtype)
    folder = os.path.join(out_path, f"dim{g.shape[1]}")
    paths = {"orig": os.path.join(folder, ORIG)}
    _atomic_torch_save(unit.contiguous(), paths["orig"])
    if unnormalized:
        paths["unnormalized"] = os.path.join(folder, UNNORMALIZED)
        _atomic_torch_save(raw.to(dtype).contiguous(), paths["unnormalized"])
    return paths


def _dim_folders(path: str) -> list[str]:
    return sorted(d for d in os.listdir(path) if re.fullmatch(r"dim\d+", d) and os.path.isdir(os.path.join(path, d)))


def read_less_grads(path: str, k: int | None = None, normalized: bool = True) -> torch.Tensor:
    """Load a LESS gradient tensor ``[N, k]`` (dtype as stored).

    ``path``: a ``.pt`` file, a ``dim<k>`` folder, or the folder above it (then
    ``k`` picks ``dim<k>``; without ``k`` there must be exactly one). ``normalized``
    picks ``all_orig.pt`` (True) or ``all_unormalized.pt`` (False) in a folder.
    """
    if os.path.isdir(path):
        if not re.fullmatch(r"dim\d+", os.path.basename(os.path.normpath(path))):
            dims = _dim_folders(path)
            if k is not None:
                if f"dim{k}" not in dims:
                    raise FileNotFoundError(f"{path} has no dim{k}/ folder (found {dims})")
                path = os.path.join(path, f"dim{k}")
            elif len(dims) == 1:
                path = os.path.join(path, dims[0])
            else:
                raise ValueError(f"{path} holds {dims or 'no dim<k> folders'}; pass k= to pick one")
        path = os.path.join(path, ORIG if normalized else UNNORMALIZED)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no LESS gradient file at {path}")
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not torch.is_tensor(data):
        data = torch.tensor(data)  # LESS accepts lists too
    if data.ndim != 2 or (k is not None and data.shape[1] != k):
        raise ValueError(f"{path} holds shape {tuple(data.shape)}; expected [N, {k if k is not None else 'k'}]")
    return data


def store_to_less(store, out_path: str, dtype: torch.dtype | None = None, unnormalized: bool = True,
                  allow_missing: bool = False) -> dict[str, str]:
    """Write an icons-fast ``FeatureStore`` (or its directory) as LESS gradient files.

    LESS rows are positional, so every sample ``0..n_samples-1`` must be in the
    store; otherwise this raises naming the first missing sample index, unless
    ``allow_missing`` (fine for validation sets, whose rows LESS only averages).
    """
    from icons_fast.features.store import FeatureStore

    if isinstance(store, (str, os.PathLike)):
        store = FeatureStore.open(os.fspath(store))
    return _loaded_to_less(store, store.load(), out_path, dtype, unnormalized, allow_missing)


def _loaded_to_less(store, loaded, out_path: str, dtype, unnormalized: bool, allow_missing: bool) -> dict[str, str]:
    """:func:`store_to_less` on ``loaded`` = ``store.load()``, read once by the caller."""
    idx, _ids, feats, norms = loaded
    n = int(store.fingerprint.get("n_samples", len(idx)))
    if not allow_missing and (len(idx) != n or not np.array_equal(idx, np.arange(n))):
        missing = np.setdiff1d(np.arange(n), idx)
        first = int(missing[0]) if len(missing) else -1
        raise ValueError(
            f"{store.root} holds {len(idx)} of {n} samples (first missing index {first}); LESS gradient files are "
            "positional, so a missing row would shift every later one. Drop the bad samples from the data file "
            "and featurize it again, or export the rows you have with write_less_grads and keep their indices"
        )
    return write_less_grads(out_path, feats, norms, dtype=dtype, unnormalized=unnormalized)


LESS_N_SUBTASKS = {"mmlu": 57, "bbh": 27, "tydiqa": 9}  # matching.py's own dict, kept in the snippet
N_SUBTASKS_FILE = "N_SUBTASKS.py"


def run_to_less(run_dir: str, out_root: str, dtype: torch.dtype | None = None) -> list[str]:
    """Every feature store of a run as LESS gradient folders; return the folders written.

    ``RUN/features/<ckpt>/<split>`` -> ``out_root/<name>-ckpt<step>-<mode>/dim<k>/``
    with ``name`` = "train" for the pool and the task (``task--subtask``) for a
    target split, ``step`` and ``mode`` (adam / sgd) from the store's fingerprint.
    Target splits may miss bad samples (their rows are only averaged); the pool may not.

    For LESS's ``matching.py`` each task with subtasks also gets one folder
    ``<task>-ckpt<step>-sgd`` holding its subtasks' rows in split-name order
    (LESS splits a task's rows into ``N_SUBTASKS[task]`` contiguous equal groups;
    subtasks of unequal sizes cannot be represented and are logged instead), and
    ``out_root/N_SUBTASKS.py`` holds the ``N_SUBTASKS = {...}`` line to put in
    ``matching.py``: LESS's three tasks plus every task of the run.
    """
    from icons_fast.features.store import FeatureStore

    root = os.path.join(run_dir, "features")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{run_dir} has no features/ folder; run `icons-fast featurize` first")
    written, n_subtasks = [], {}
    for ckpt in sorted(os.listdir(root)):
        by_task: dict[str, list] = {}
        for split in sorted(os.listdir(os.path.join(root, ckpt))):
            path = os.path.join(root, ckpt, split)
            if not os.path.exists(os.path.join(path, "manifest.json")):
                continue
            store = FeatureStore.open(path)
            fp = store.fingerprint
            name = "train" if split == "train" else split[len("target-"):] if split.startswith("target-") else split
            folder = less_grad_dir(out_root, name, fp.get("checkpoint_step", ckpt), fp.get("mode", "sgd"))
            loaded = store.load()
            _loaded_to_less(store, loaded, folder, dtype, unnormalized=True, allow_missing=split != "train")
            written.append(folder)
            if name != "train":  # target rows are few: kept for the subtask folders below, not read again
                by_task.setdefault(name.split("--")[0], []).append((name, store, loaded))
            del loaded
        for task, subs in by_task.items():
            n_subtasks[task] = len(subs)
            if len(subs) == 1:
                continue
            loaded = [rows for _, _, rows in subs]
            sizes = [len(idx) for idx, *_ in loaded]
            if len(set(sizes)) != 1:
                log.warning("task %s: subtasks %s have %s rows; LESS splits a task's rows into equal groups, so "
                            "they are written only one folder per subtask", task, [n for n, *_ in subs], sizes)
                continue
            fp = subs[0][1].fingerprint
            folder = less_grad_dir(out_root, task, fp.get("checkpoint_step", ckpt), fp.get("mode", "sgd"))
            feats = torch.cat([torch.as_tensor(f) for _, _, f, _ in loaded])
            norms = np.concatenate([np.asarray(n, dtype=np.float32) for *_, n in loaded])
            write_less_grads(folder, feats, norms, dtype=dtype)
            written.append(folder)
    if n_subtasks:
        merged = {**LESS_N_SUBTASKS, **n_subtasks}
        text = ("# the line for LESS's less/data_selection/matching.py (its own three tasks and this run's)\n"
                f"N_SUBTASKS = {json.dumps(merged)}\n")
        _atomic_text(os.path.join(out_root, N_SUBTASKS_FILE), text)
        log.info("LESS needs N_SUBTASKS to list the run's tasks: %s (written to %s)", n_subtasks,
                 os.path.join(out_root, N_SUBTASKS_FILE))
    return written


# --------------------------------------------------------------------------- scores


def _per_ckpt(x, what: str) -> list[torch.Tensor]:
    items = list(x) if isinstance(x, (list, tuple)) else [x]
    out = [torch.as_tensor(t).detach().cpu() for t in items]
    for c, t in enumerate(out):
        if t.ndim != 2 or t.shape[0] == 0:
            raise ValueError(f"{what} for checkpoint {c} has shape {tuple(t.shape)}; expected a non-empty [rows, k]")
    return out


def less_scores(train, val, checkpoint_weights=None, n_subtasks: int = 1, block_size: int = 16384) -> torch.Tensor:
    """LESS's influence score of every train row on one target task (formula in the module doc).

    Arguments:
        train: ``Tensor[N, k]`` (``all_orig.pt`` rows) or a list, one per checkpoint.
        val: ``Tensor[M, k]`` validation rows or a list, one per checkpoint; the rows are
            ``n_subtasks`` contiguous equal groups (LESS reshapes ``M`` into ``[S, M/S]``).
        checkpoint_weights: LESS's ``--checkpoint_weights`` (renormalised); uniform if None.
    Return: float32 ``Tensor[N]``. Rows are used as given (not renormalised), as LESS does.
    """
    trains, vals = _per_ckpt(train, "train"), _per_ckpt(val, "val")
    if len(trains) != len(vals):
        raise ValueError(f"{len(trains)} train tensors but {len(vals)} validation tensors; give one per checkpoint")
    w = checkpoint_weights_normalised(checkpoint_weights, len(trains))
    n = trains[0].shape[0]
    out = torch.zeros(n, int(n_subtasks), dtype=torch.float64)
    for c, (x, v) in enumerate(zip(trains, vals)):
        if x.shape[0] != n or x.shape[1] != v.shape[1]:
            raise ValueError(f"checkpoint {c}: train {tuple(x.shape)} and val {tuple(v.shape)} do not fit "
                             f"(N={n} rows everywhere, one k)")
        if n_subtasks < 1 or v.shape[0] % n_subtasks:
            raise ValueError(f"{v.shape[0]} validation rows cannot be split into {n_subtasks} equal subtasks")
        means = v.double().reshape(n_subtasks, v.shape[0] // n_subtasks, v.shape[1]).mean(dim=1)  # (S, k)
        for s in range(0, n, block_size):
            out[s:s + block_size] += w[c] * (x[s:s + block_size].double() @ means.T)
    return out.max(dim=1).values.float()


def less_scores_ref(train, val, checkpoint_weights=None, n_subtasks: int = 1) -> np.ndarray:
    """Plain numpy float64: the full ``N x M`` product, weighted, reshaped ``[N, S, M/S]``, mean, max."""
    trains = [np.asarray(torch.as_tensor(t).double()) for t in (train if isinstance(train, (list, tuple)) else [train])]
    vals = [np.asarray(torch.as_tensor(t).double()) for t in (val if isinstance(val, (list, tuple)) else [val])]
    w = np.asarray(checkpoint_weights if checkpoint_weights is not None else [1.0] * len(trains), dtype=np.float64)
    w = w / w.sum()
    total = sum(wc * (x @ v.T) for wc, x, v in zip(w, trains, vals))  # (N, M)
    return total.reshape(total.shape[0], n_subtasks, -1).mean(axis=2).max(axis=1)


def write_less_scores(output_path: str, target_task: str, train_file_name: str, scores) -> str:
    """``output_path/<target_task>/<train_file_name>_influence_score.pt``: float32 ``Tensor[N]``, whatever is given.

    LESS's ``matching.py`` computes in float32 (it calls ``.float()`` on both gradient
    sets), so float32 is what its files hold.
    """
    s = (scores.detach() if torch.is_tensor(scores) else torch.as_tensor(np.asarray(scores))).reshape(-1).float()
    path = os.path.join(output_path, target_task, f"{train_file_name}_influence_score.pt")
    _atomic_torch_save(s.detach().cpu().contiguous(), path)
    return path


def read_less_scores(path: str) -> torch.Tensor:
    """One ``*_influence_score.pt``: ``Tensor[N]``."""
    data = torch.load(path, map_location="cpu", weights_only=True)
    return data if torch.is_tensor(data) else torch.tensor(data)


def _sorted_rows(scores_by_file: Mapping[str, object]) -> list[tuple[str, int, float]]:
    """``(file name, index, score)`` for every row of every file, score descending, then file order, then index."""
    names, idx, vals = [], [], []
    for f, (name, s) in enumerate(scores_by_file.items()):
        s = torch.as_tensor(np.asarray(s) if not torch.is_tensor(s) else s).reshape(-1).float()
        names.append(np.full(s.shape[0], f))
        idx.append(np.arange(s.shape[0]))
        vals.append(s.numpy())
    file_of, index, score = np.concatenate(names), np.concatenate(idx), np.concatenate(vals)
    order = np.lexsort((index, file_of, -score.astype(np.float64)))
    keys = list(scores_by_file)
    return [(keys[file_of[i]], int(index[i]), float(score[i])) for i in order]


def write_sorted_csv(path: str, scores_by_file: Mapping[str, object]) -> str:
    """LESS's ``sorted.csv``: header ``file name, index, score``, rows ``<name>, <index>, <score rounded to 6>``.

    ``scores_by_file``: ``{train file name: scores [N_f]}`` in file order; ``path``
    a file or a folder (then ``path/sorted.csv``).
    """
    if os.path.isdir(path):
        path = os.path.join(path, SORTED_CSV)
    rows = _sorted_rows(scores_by_file)
    lines = [CSV_HEADER] + [f"{name}, {index}, {round(score, 6)}" for name, index, score in rows]
    _atomic_text(path, "\n".join(lines) + "\n")
    return path


def read_sorted_csv(path: str) -> list[tuple[str, int, float]]:
    """``[(file name, index, score), ...]`` in file order (descending score)."""
    if os.path.isdir(path):
        path = os.path.join(path, SORTED_CSV)
    with open(path, encoding="utf-8") as f:
        header = f.readline().strip()
        if header != CSV_HEADER:
            raise ValueError(f"{path} starts with {header!r}; a LESS sorted.csv starts with {CSV_HEADER!r}")
        rows = []
        for line_no, line in enumerate(f, start=2):
            if not line.strip():
                continue
            parts = line.rstrip("\n").rsplit(", ", 2)  # names may hold ", "; index and score never do
            if len(parts) != 3:
                raise ValueError(f"{path} line {line_no}: {line!r} is not 'name, index, score'")
            rows.append((parts[0], int(parts[1]), float(parts[2])))
    return rows


def top_file_name(percentage: float | None = None, max_samples: int | None = None) -> str:
    """``top_p<percentage>.jsonl`` or ``top_num<max_samples>.jsonl`` (LESS's names)."""
    if percentage is not None:
        return f"top_p{percentage}.jsonl"
    if max_samples is not None:
        return f"top_num{max_samples}.jsonl"
    raise ValueError("give percentage or max_samples")


def _records(path: str) -> list[bytes]:
    """One line per sample, newline included: the raw lines of a ``.jsonl`` file (``readlines`` numbering,
    blank lines included, as LESS counts them), or the records of a JSON list (LLaVA) as one json line each."""
    if path.endswith(".jsonl"):
        with open(path, "rb") as f:
            return f.read().splitlines(keepends=True)
    from icons_fast.data.formats import load_json_list

    return [(json.dumps(r, ensure_ascii=False) + "\n").encode("utf-8") for r in load_json_list(path)]


def write_less_selection(output_path: str, target_task: str, scores_by_file: Mapping[str, object],
                         train_files: Sequence[str], percentage: float | None = None,
                         max_samples: int | None = None) -> dict[str, str]:
    """LESS's ``write_selected_data`` for one target task: ``sorted.csv`` and the top-rows jsonl.

    ``scores_by_file`` and ``train_files`` are in the same order (one data file per
    score tensor, ``.jsonl`` or a JSON list). The count is ``int(percentage * total)``
    or ``max_samples``. Return ``{"sorted": path, "top": path}``.
    """
    if len(train_files) != len(scores_by_file):
        raise ValueError(f"{len(scores_by_file)} score sets but {len(train_files)} train files")
    rows = _sorted_rows(scores_by_file)
    count = int(percentage * len(rows)) if percentage is not None else max_samples
    if count is None or not 1 <= count <= len(rows):
        raise ValueError(f"selection size {count} must be between 1 and {len(rows)}")
    folder = os.path.join(output_path, target_task)
    os.makedirs(folder, exist_ok=True)
    paths = {"sorted": write_sorted_csv(os.path.join(folder, SORTED_CSV), scores_by_file)}
    records = {}
    for (name, s), path in zip(scores_by_file.items(), train_files):
        records[name] = _records(path)
        n_scores = len(np.asarray(s).reshape(-1))
        if len(records[name]) < n_scores:
            raise ValueError(f"{path} has {len(records[name])} records but {name} has {n_scores} scores")
    lines = []
    for name, i, _ in rows[:count]:
        line = records[name][i]
        if not line.strip():
            raise ValueError(f"row {i} of {name} selected, but line {i + 1} of its file is blank; LESS numbers raw "
                             "lines, so remove blank lines from the file and score it again")
        lines.append(line.rstrip(b"\r\n") + b"\n")  # LESS reads and writes text mode: every ending becomes "\n"
    paths["top"] = os.path.join(folder, top_file_name(percentage, max_samples))
    atomic_write(paths["top"], lambda f: f.write(b"".join(lines)), mode="wb")
    return paths
