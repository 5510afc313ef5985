"""Per-task influence scores from projected gradient features (design section 2, step 6).

For train sample ``i``, target task ``t`` with subtasks ``s`` (a task without
subtasks is one subtask), checkpoints ``c`` with weights ``w_c`` (renormalised
to sum 1) and L2-normalised features ``f_c``::

    A_s(i) = sum_c w_c * agg_{v in V_s} <f_c(i), f_c(v)>
    I_t(i) = max_{s in t} A_s(i)

(the subtask max is taken after the checkpoint sum, as LESS does for MMLU; for
"mean" the order does not matter). ``agg`` is

- ``"mean"``:    ``mean_v <f(i), f(v)> = <f(i), mean_v f(v)>``, so the targets
  are averaged once and the whole task score is an ``N x k`` by ``k x S`` product;
- ``"max"``:     ``max_v <f(i), f(v)>``;
- ``"topm:<m>"``: the mean of the ``min(m, |V_s|)`` largest ``<f(i), f(v)>``.

Non-linear aggregates need the ``n x M`` similarity block, so train rows are
processed in blocks of ``block_size`` rows and no larger product is formed.
Everything runs in float32 (fp16/bf16 features are upcast one block at a time).

The unnormalised mode (``normalise=False``) takes the rows as given. Fed the
raw projected gradients ``p = n * f`` (stored norms times stored unit
features), it is TracIn's checkpoint-weighted inner product (``tracin_scores``)::

    A_s(i) = sum_c w_c * mean_{v in V_s} <p_c(i), p_c(v)>     (~ <g_c(i), g_c(v)> by JL)

One code path: ``task_influence`` (in-memory tensors), ``stream_task_influence``
(an iterable of blocks read from feature shards) and ``tracin_scores`` all run
``_block_scores``, which calls ``_reduce_block`` once per checkpoint;
``_reduce_block`` calls the segment-reduce op (``icons_fast.ops.segment_reduce``,
C++/CUDA or torch). ``task_influence_ref`` / ``tracin_scores_ref`` are the
float64 brute force the tests compare against.

Influence at three levels, one concept: ``icons_fast.ops.segment_reduce`` reduces
one block against concatenated targets; this module turns tasks, subtasks and
checkpoints into those calls (arrays in, scores out); ``icons_fast.stages.influence``
reads the run directory's feature stores and writes ``scores/``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

DEFAULT_BLOCK_SIZE = 4096


# --------------------------------------------------------------------------- parsing


def parse_aggregate(aggregate: str) -> tuple[str, int]:
    """``"mean"`` / ``"max"`` / ``"topm:<m>"`` -> (kind, m); m is 0 unless kind is "topm"."""
    if aggregate in ("mean", "max"):
        return aggregate, 0
    if isinstance(aggregate, str) and aggregate.startswith("topm:"):
        try:
            m = int(aggregate[len("topm:"):])
        except ValueError:
            m = 0
        if m >= 1:
            return "topm", m
    raise ValueError(
        f"unknown influence aggregate {aggregate!r}; use 'mean', 'max' or 'topm:<m>' with an integer m >= 1"
    )


def _as_list(train) -> list[torch.Tensor]:
    """``Tensor[N, k]`` or a list of them (one per checkpoint) -> list of tensors."""
    items = list(train) if isinstance(train, (list, tuple)) else [train]
    if not items:
        raise ValueError("train features: got an empty list; give one Tensor[N, k] per checkpoint")
    return [torch.as_tensor(x) for x in items]


def checkpoint_weights_normalised(checkpoint_weights, n_ckpt: int) -> list[float]:
    """Weights ``w_c`` renormalised to sum 1 (uniform when ``None``)."""
    if checkpoint_weights is None:
        return [1.0 / n_ckpt] * n_ckpt
    w = [float(x) for x in checkpoint_weights]
    if len(w) != n_ckpt:
        raise ValueError(f"checkpoint_weights has {len(w)} entries but there are {n_ckpt} checkpoints")
    if not all(np.isfinite(w)) or any(x < 0 for x in w) or sum(w) <= 0:
        raise ValueError(
            f"checkpoint_weights {w} must be finite, non-negative and not all zero "
            "(ICONS/LESS use each checkpoint's learning rate)"
        )
    total = sum(w)
    return [x / total for x in w]


def _per_checkpoint_targets(targets, n_ckpt: int) -> list[Mapping]:
    """One ``{task: Tensor | {subtask: Tensor}}`` dict per checkpoint."""
    if isinstance(targets, Mapping):
        if n_ckpt != 1:
            raise ValueError(
                f"train has {n_ckpt} checkpoints but targets is a single dict; target features depend on "
                "the checkpoint, so pass a list of target dicts, one per checkpoint"
            )
        return [targets]
    per_ckpt = list(targets)
    if len(per_ckpt) != n_ckpt:
        raise ValueError(f"targets is a list of {len(per_ckpt)} dicts but train has {n_ckpt} checkpoints")
    for c, d in enumerate(per_ckpt):
        if not isinstance(d, Mapping):
            raise TypeError(f"targets[{c}] is a {type(d).__name__}; expected a dict task name -> features")
    return per_ckpt


def _structure(targets: Mapping, c: int) -> list[tuple[str, list[tuple[str, torch.Tensor]]]]:
    """``[(task, [(subtask, Tensor[M_s, k]), ...]), ...]`` in dict order; checks shapes."""
    if len(targets) == 0:
        raise ValueError(f"targets for checkpoint {c} is empty; give at least one task")
    out = []
    for task, value in targets.items():
        subs = list(value.items()) if isinstance(value, Mapping) else [(str(task), value)]
        if not subs:
            raise ValueError(f"task {task!r} (checkpoint {c}) has an empty subtask dict")
        checked = []
        for sub, x in subs:
            x = torch.as_tensor(x)
            if x.ndim != 2 or x.shape[0] == 0:
                raise ValueError(
                    f"target features of task {task!r} subtask {sub!r} (checkpoint {c}) have shape "
                    f"{tuple(x.shape)}; expected a non-empty Tensor[M, k]"
                )
            checked.append((str(sub), x))
        out.append((str(task), checked))
    return out


# --------------------------------------------------------------------------- normalisation


def _rows(x: torch.Tensor, what: str, row_ids=None, dtype=torch.float32, normalise: bool = True) -> torch.Tensor:
    """``x / ||x||`` row-wise in ``dtype`` (``x`` itself when not ``normalise``).

    A non-finite row (or, when normalising, an all-zero row) raises naming the row.
    """
    x = x.to(dtype)
    norms = torch.linalg.vector_norm(x, dim=1)
    bad = ~torch.isfinite(norms)
    if normalise:
        bad |= norms <= 0
    if bool(bad.any()):
        j = int(torch.nonzero(bad)[0, 0])
        row = int(row_ids[j]) if row_ids is not None else j
        cannot = "cosine-normalised" if normalise else "scored"
        raise ValueError(
            f"{what} row {row} has L2 norm {float(norms[j])}: an all-zero or non-finite feature cannot be "
            f"{cannot}; re-featurize that sample or mark it invalid and drop it"
        )
    return x / norms[:, None] if normalise else x


# --------------------------------------------------------------------------- prepared targets


@dataclass
class PreparedTargets:
    """Targets normalised (and for "mean" averaged) once, concatenated per checkpoint.

    ``target_cat[c]``: float32 ``[M_c, k]`` rows of all subtasks of all tasks;
    ``segments[c]``: ``[(start, stop), ...]`` one per subtask into ``target_cat[c]``
    (for "mean" each subtask is its mean vector, a segment of length 1);
    ``seg_task``: task index of each segment (segments of a task are contiguous);
    ``task_names``: in the order of the targets dict.
    """

    aggregate: str
    weights: list[float]
    target_cat: list[torch.Tensor]
    segments: list[list[tuple[int, int]]]
    seg_task: list[int]
    task_names: list[str]
    k: int
    backend: str = "auto"  # influence backend for the non-linear aggregates (icons_fast.ops.backend)
    normalise: bool = True  # False: rows are raw projections (TracIn), used as given

    def task_ranges(self) -> list[tuple[int, int]]:
        """``[(first_segment, last_segment + 1), ...]`` per task."""
        ranges = []
        for t in range(len(self.task_names)):
            first = self.seg_task.index(t)
            ranges.append((first, first + self.seg_task.count(t)))
        return ranges

    def to(self, device) -> "PreparedTargets":
        if all(t.device == torch.device(device) for t in self.target_cat):
            return self
        return replace(self, target_cat=[t.to(device) for t in self.target_cat])


def prepare_targets(
    targets, n_ckpt: int, aggregate: str = "mean", checkpoint_weights=None, backend: str = "auto",
    normalise: bool = True,
) -> PreparedTargets:
    """Normalise (unless not ``normalise``), for "mean" average, and concatenate the target features once.

    ``targets``: task -> ``Tensor[M_t, k]``, task -> {subtask: Tensor}, or a list of
    such dicts, one per checkpoint (task and subtask names must agree across them).
    """
    kind, _ = parse_aggregate(aggregate)
    weights = checkpoint_weights_normalised(checkpoint_weights, n_ckpt)
    per_ckpt = [_structure(d, c) for c, d in enumerate(_per_checkpoint_targets(targets, n_ckpt))]
    names0 = [(task, [sub for sub, _ in subs]) for task, subs in per_ckpt[0]]
    for c, struct in enumerate(per_ckpt[1:], start=1):
        names = [(task, [sub for sub, _ in subs]) for task, subs in struct]
        if names != names0:
            raise ValueError(f"targets for checkpoint {c} have tasks/subtasks {names}, checkpoint 0 has {names0}")
    k = int(per_ckpt[0][0][1][0][1].shape[1])
    seg_task = [t for t, (_, subs) in enumerate(per_ckpt[0]) for _ in subs]
    target_cat, segments = [], []
    for c, struct in enumerate(per_ckpt):
        rows, segs, start = [], [], 0
        for task, subs in struct:
            for sub, x in subs:
                if x.shape[1] != k:
                    raise ValueError(
                        f"target features of task {task!r} subtask {sub!r} (checkpoint {c}) have k={x.shape[1]}, "
                        f"expected k={k}"
                    )
                f = _rows(x, f"target task {task!r} subtask {sub!r} (checkpoint {c})", normalise=normalise)
                if kind == "mean":
                    f = f.mean(dim=0, keepdim=True)  # <f(i), mean_v f(v)> = mean_v <f(i), f(v)>
                rows.append(f)
                segs.append((start, start + f.shape[0]))
                start += f.shape[0]
        target_cat.append(torch.cat(rows).contiguous())
        segments.append(segs)
    return PreparedTargets(aggregate, weights, target_cat, segments, seg_task, [t for t, _ in names0], k, backend,
                           normalise)


# --------------------------------------------------------------------------- the per-block kernel


def _reduce_block(
    train_block: torch.Tensor, target_cat: torch.Tensor, segments, aggregate: str, backend: str = "auto"
) -> torch.Tensor:
    """Per-segment aggregate of one block of train rows against one checkpoint's targets.

    Arguments:
        train_block: float32 ``[n, k]``, rows already L2-normalised (raw rows in the unnormalised mode).
        target_cat: float32 ``[M, k]``, every subtask's (normalised) targets concatenated.
        segments: ``[(start, stop), ...]`` one per subtask, contiguous rows of ``target_cat`` from 0.
        aggregate: "mean" | "max" | "topm:<m>".
        backend: influence backend for "max" / "topm" (the C++/CUDA op fuses the
            reduction into a blocked matmul; "torch" materialises the block's
            product, ``icons_fast.ops.segment_reduce.segment_reduce_ref``). "mean" is one
            BLAS matmul against averaged targets and always runs in torch.
    Return:
        float32 ``[n, S]``: ``agg_{v in segment s} <train_block[i], target_cat[v]>``.
    """
    from icons_fast.ops.segment_reduce import segment_reduce

    kind, m = parse_aggregate(aggregate)
    offsets = [0] + [stop for _, stop in segments]
    return segment_reduce(train_block, target_cat, offsets, kind, m=m if kind == "topm" else None,
                          backend="torch" if kind == "mean" else backend)


def _block_scores(train_blocks: Sequence[torch.Tensor], prep: PreparedTargets, row_ids=None) -> torch.Tensor:
    """Task scores ``[n, T]`` float32 for one block of train rows (one tensor per checkpoint)."""
    if len(train_blocks) != len(prep.target_cat):
        raise ValueError(f"a train block has {len(train_blocks)} checkpoint tensors, targets have {len(prep.target_cat)}")
    n = train_blocks[0].shape[0]
    acc = None
    for c, x in enumerate(train_blocks):
        x = torch.as_tensor(x)
        if x.ndim != 2 or x.shape[0] != n or x.shape[1] != prep.k:
            raise ValueError(
                f"train block for checkpoint {c} has shape {tuple(x.shape)}; expected ({n}, {prep.k}) "
                "(same rows for every checkpoint, k as the targets)"
            )
        f = _rows(x, f"train (checkpoint {c})", row_ids, normalise=prep.normalise)  # fp16/bf16 upcast here, per block
        target = prep.target_cat[c].to(f.device)
        seg = _reduce_block(f, target, prep.segments[c], prep.aggregate, prep.backend) * prep.weights[c]
        acc = seg if acc is None else acc + seg  # (n, S): sum_c w_c agg_v
    # max over each task's subtask segments (contiguous by construction)
    cols = [acc[:, a:b].amax(dim=1) for a, b in prep.task_ranges()]
    return torch.stack(cols, dim=1)


# --------------------------------------------------------------------------- public API


def task_influence(
    train,
    targets,
    aggregate: str = "mean",
    checkpoint_weights=None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    progress: bool | None = None,
    backend: str = "auto",
    normalise: bool = True,
) -> tuple[torch.Tensor, list[str]]:
    """Influence of every train sample on every target task.

    Arguments:
        train: ``Tensor[N, k]`` or a list of them, one per checkpoint (any float dtype).
        targets: task -> ``Tensor[M_t, k]``; task -> {subtask: Tensor} (max over subtasks);
            or a list of such dicts, one per checkpoint.
        aggregate: "mean" | "max" | "topm:<m>" (see the module docstring).
        checkpoint_weights: ``w_c`` (e.g. learning rates), renormalised; uniform if None.
        block_size: train rows per block (bounds the ``n x M`` similarity block).
        progress: tqdm bar over blocks; default on when there are more than 8 blocks.
        backend: influence backend for "max" / "topm:<m>" ("auto": the C++/CUDA
            extension when built, else torch; "torch": the reference path).
        normalise: True (cosine influence) L2-normalises every row; False uses the
            rows as given (raw projected gradients: the TracIn mode).
    Return:
        (float32 ``Tensor[N, T]`` on the train features' device, task names in dict order).
    """
    trains = _as_list(train)
    n = trains[0].shape[0]
    for c, x in enumerate(trains):
        if x.ndim != 2 or x.shape[0] != n:
            raise ValueError(f"train features for checkpoint {c} have shape {tuple(x.shape)}; expected ({n}, k)")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    prep = prepare_targets(targets, len(trains), aggregate, checkpoint_weights, backend, normalise).to(trains[0].device)
    starts = range(0, n, block_size)
    if progress is None:
        progress = len(starts) > 8
    parts = [
        _block_scores([x[s:s + block_size] for x in trains], prep, row_ids=range(s, min(s + block_size, n)))
        for s in tqdm(starts, desc="influence", unit="block", disable=not progress)
    ]
    if not parts:
        return torch.empty((0, len(prep.task_names)), dtype=torch.float32, device=trains[0].device), prep.task_names
    return torch.cat(parts), prep.task_names


def stream_task_influence(
    blocks: Iterable,
    targets,
    aggregate: str = "mean",
    checkpoint_weights=None,
    progress: bool = False,
    backend: str = "auto",
    normalise: bool = True,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Streaming form of ``task_influence`` over blocks read from feature shards.

    Arguments:
        blocks: iterable of ``(row_indices: ndarray[int64] [n], features: list of
            Tensor[n, k], one per checkpoint)``; a bare tensor is taken as one checkpoint.
        targets, aggregate, checkpoint_weights, backend, normalise: as in ``task_influence``.
    Return:
        (float32 ``ndarray[N_rows, T]`` in the order the blocks came, int64 row
        indices ``ndarray[N_rows]``, task names). Targets are prepared once.
    """
    prep = None
    scores, rows = [], []
    for row_idx, feats in tqdm(blocks, desc="influence", unit="block", disable=not progress):
        feats = _as_list(feats)
        row_idx = np.asarray(row_idx, dtype=np.int64).reshape(-1)
        if row_idx.shape[0] != feats[0].shape[0]:
            raise ValueError(f"a block has {row_idx.shape[0]} row indices but {feats[0].shape[0]} feature rows")
        if prep is None:
            prep = prepare_targets(targets, len(feats), aggregate, checkpoint_weights, backend, normalise)
        prep = prep.to(feats[0].device)
        scores.append(_block_scores(feats, prep, row_ids=row_idx).cpu().numpy())
        rows.append(row_idx)
    if prep is None:  # no blocks: still validate targets to return the task names
        n_ckpt = 1 if isinstance(targets, Mapping) else len(list(targets))
        prep = prepare_targets(targets, n_ckpt, aggregate, checkpoint_weights, backend, normalise)
        return np.empty((0, len(prep.task_names)), np.float32), np.empty(0, np.int64), prep.task_names
    return np.concatenate(scores).astype(np.float32, copy=False), np.concatenate(rows), prep.task_names


def task_influence_ref(train, targets, aggregate: str = "mean", checkpoint_weights=None,
                       normalise: bool = True) -> tuple[torch.Tensor, list[str]]:
    """Float64 brute force: full ``N x M`` product per checkpoint, then reduce (tests only).

    ``A_s(i) = sum_c w_c agg_{v in s} <f_c(i), f_c(v)>``, ``I_t(i) = max_{s in t} A_s(i)``,
    with ``f`` normalised in float64 (as given when not ``normalise``) and "mean"
    taken over the products (not over the targets).
    Return: (float64 ``Tensor[N, T]``, task names).
    """
    kind, m = parse_aggregate(aggregate)
    trains = _as_list(train)
    weights = checkpoint_weights_normalised(checkpoint_weights, len(trains))
    per_ckpt = [_structure(d, c) for c, d in enumerate(_per_checkpoint_targets(targets, len(trains)))]
    names = [task for task, _ in per_ckpt[0]]
    f_train = [_rows(x, "train", dtype=torch.float64, normalise=normalise) for x in trains]
    columns = []
    for t, (task, subs) in enumerate(per_ckpt[0]):
        sub_scores = []
        for s in range(len(subs)):
            total = 0.0
            for c, fi in enumerate(f_train):
                fv = _rows(per_ckpt[c][t][1][s][1], "target", dtype=torch.float64, normalise=normalise)
                sims = fi @ fv.T  # (N, M_s), the full product
                if kind == "mean":
                    agg = sims.mean(dim=1)
                elif kind == "max":
                    agg = sims.max(dim=1).values
                else:
                    agg = sims.sort(dim=1, descending=True).values[:, : min(m, sims.shape[1])].mean(dim=1)
                total = total + weights[c] * agg
            sub_scores.append(total)
        columns.append(torch.stack(sub_scores, dim=1).max(dim=1).values)
    return torch.stack(columns, dim=1), names


# --------------------------------------------------------------------------- TracIn: the unnormalised mode


def raw_projections(features, norms, dtype=torch.float32) -> torch.Tensor:
    """``p = n * f`` in ``dtype``, ``[n, k]``, from unit features ``[n, k]`` (any float dtype) and norms ``[n]``."""
    f = torch.as_tensor(features).detach()
    n = torch.as_tensor(np.asarray(norms, dtype=np.float64)).reshape(-1).to(f.device, dtype)
    return f.to(dtype) * n[:, None]


def _pair(pair, what: str) -> tuple[torch.Tensor, np.ndarray]:
    """``(features [M, k], norms [M])`` checked; features as given, norms float64."""
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise TypeError(f"{what}: expected a (features Tensor[M, k], norms [M]) pair, got {type(pair).__name__}")
    feats = torch.as_tensor(pair[0]).detach()
    norms = np.asarray(pair[1], dtype=np.float64).reshape(-1)
    if feats.ndim != 2 or feats.shape[0] == 0 or norms.shape[0] != feats.shape[0]:
        raise ValueError(f"{what}: features {tuple(feats.shape)} and norms {tuple(norms.shape)} do not match")
    return feats, norms


def _raw_targets(targets, dtype) -> list[dict]:
    """task -> pair (or {subtask: pair}) dicts -> the same dicts of raw projections in ``dtype``, one per checkpoint."""
    out = []
    for d in [targets] if isinstance(targets, Mapping) else list(targets):
        raw = {}
        for task, value in d.items():
            subs = value if isinstance(value, Mapping) else {None: value}
            pairs = {sub: _pair(pair, f"target task {task!r}") for sub, pair in subs.items()}
            rows = {sub: raw_projections(f, n, dtype) for sub, (f, n) in pairs.items()}
            raw[task] = rows if isinstance(value, Mapping) else rows[None]
        out.append(raw)
    return out


def _train_pairs(train, train_norms, n_targets: int) -> tuple[list[torch.Tensor], list[np.ndarray]]:
    """One (unit features, norms) per checkpoint, rows matching."""
    trains = _as_list(train)
    norms = [np.asarray(x, dtype=np.float64).reshape(-1)
             for x in (train_norms if isinstance(train_norms, (list, tuple)) else [train_norms])]
    if not (len(trains) == len(norms) == n_targets):
        raise ValueError(f"{len(trains)} train feature sets, {len(norms)} norm sets and {n_targets} target dicts: "
                         "give one of each per checkpoint")
    for c, (x, nrm) in enumerate(zip(trains, norms)):
        if x.ndim != 2 or x.shape[0] != nrm.shape[0] or x.shape[0] != trains[0].shape[0]:
            raise ValueError(f"train features {tuple(x.shape)} / norms {nrm.shape} (checkpoint {c}) do not match "
                             f"each other or the {trains[0].shape[0]} rows of checkpoint 0")
    return trains, norms


def tracin_scores(train, train_norms, targets, checkpoint_weights=None, block_size: int = DEFAULT_BLOCK_SIZE,
                  progress: bool = False, backend: str = "auto") -> tuple[np.ndarray, list[str]]:
    """TracIn scores ``[N, T]``: the unnormalised mode of ``stream_task_influence`` with the "mean" aggregate.

    ``A_s(i) = sum_c w_c * mean_{v in V_s} <p_c(i), p_c(v)>``, ``I_t(i) = max_{s in t} A_s(i)``
    with ``p = n * f`` rebuilt one block of ``block_size`` rows at a time.

    Arguments:
        train: ``Tensor[N, k]`` unit features (any float dtype) or a list, one per checkpoint.
        train_norms: ``[N]`` norms of the projected gradients, or a list per checkpoint.
        targets: task -> ``(features [M, k], norms [M])`` or task -> {subtask: pair};
            or a list of such dicts, one per checkpoint.
        checkpoint_weights: ``w_c`` (learning rates), renormalised; uniform if None.
    Return:
        (float64 ``ndarray[N, T]`` of sums taken in float32 like every influence score, task names).
    """
    raw_targets = _raw_targets(targets, torch.float32)
    trains, norms = _train_pairs(train, train_norms, len(raw_targets))
    n = trains[0].shape[0]

    def blocks():
        for s in range(0, n, block_size):
            e = min(s + block_size, n)
            yield np.arange(s, e), [raw_projections(x[s:e], nrm[s:e]) for x, nrm in zip(trains, norms)]

    scores, _, names = stream_task_influence(
        blocks(), raw_targets if len(raw_targets) > 1 else raw_targets[0], "mean", checkpoint_weights,
        progress=progress, backend=backend, normalise=False,
    )
    return scores.astype(np.float64), names


def tracin_scores_ref(train, train_norms, targets, checkpoint_weights=None) -> tuple[np.ndarray, list[str]]:
    """Float64 brute force of ``tracin_scores``: ``p = n * f`` in float64, every ``<p(i), p(v)>`` (tests only)."""
    raw_targets = _raw_targets(targets, torch.float64)
    trains, norms = _train_pairs(train, train_norms, len(raw_targets))
    raw = [raw_projections(x, nrm, torch.float64) for x, nrm in zip(trains, norms)]
    scores, names = task_influence_ref(raw, raw_targets if len(raw) > 1 else raw_targets[0], "mean",
                                       checkpoint_weights, normalise=False)
    return scores.numpy(), names
