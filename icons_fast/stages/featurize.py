"""Stage 2: featurize a split (the pool or a target set) under one warmup checkpoint.

For every sample: the projected (Adam-preconditioned for the pool by default)
per-sample LoRA gradient, L2-normalised and stored in fp16 with its raw norm,
in shards of ``features.shard_size`` consecutive sample indices. Finished
shards are skipped on rerun; a partial one is redone. Bad samples (data
problems, non-finite or zero gradients) are recorded in ``errors/<split>.jsonl``
and simply absent from the shards: rows are keyed by sample index, so nothing
shifts.

Several processes share the work by contiguous shard ranges: ``--shard i/n``
(job arrays) or ``torchrun`` (``RANK`` / ``WORLD_SIZE``), see
``icons_fast.distributed``; the features do not depend on how many processes
made them.

Before computing, each process checks its own shard ranges and removes the
shards that fail (``FeatureStore.repair``: entry readable, file present with
its size; with ``verify`` also its sha256), logging each, so they are
recomputed. A SIGTERM finishes and writes the shard in flight, then stops with
``Preempted`` (exit code 75 at the command line); the rerun resumes. The
writer lock of the run directory (``rundir.writer_lock``) is held throughout.

Where the time goes: the loop is split into ``torch.profiler.record_function``
ranges, ``data`` (collate), ``featurize`` (gradients and projection, with the
extractor's inner ranges) and ``io`` (shard writes), which
``benchmarks/profile_featurize.py`` and any ``torch.profiler`` session read.
"""
from __future__ import annotations

import json
import logging
import os
import time
from contextlib import nullcontext

import numpy as np
import torch
from torch.profiler import record_function
from tqdm.auto import tqdm

from icons_fast.config import Config
from icons_fast.distributed import barrier, device_for_rank, is_main, parse_shard, process_share
from icons_fast.data.collate import batch_rows
from icons_fast.data.formats import source_sha256
from icons_fast.fileio import raise_write_error
from icons_fast.rundir import RunLayout, target_splits, writer_lock
from icons_fast.signals import GracefulStop, Preempted

log = logging.getLogger(__name__)


def split_jobs(cfg: Config) -> list[tuple[str, str | None, str, str | None]]:
    """``[(split, data file, gradient mode, image folder)]``: the pool, then every target (sub)task in config order."""
    target_images = cfg.data.target_image_folder or cfg.data.image_folder
    jobs = [("train", cfg.data.train_data, cfg.features.train_mode, cfg.data.image_folder)]
    for task, subs in target_splits(cfg.data.targets).items():
        for sub, split in subs.items():
            name = task if sub is None else f"{task}/{sub}"
            jobs.append((split, cfg.data.targets[name], cfg.features.target_mode, target_images))
    return jobs


def feature_settings(cfg: Config, ckpt_dir: str, mode: str, image_folder: str | None) -> dict:
    """The settings part of a feature store's fingerprint (no file is read).

    Featurize stores these, the data file's and the checkpoint's sha256, the
    model, the LoRA layout, the step and the sample count in the store's
    fingerprint; ``stages.influence.check_fresh`` compares them with this
    config and the current files to refuse stale features.
    """
    return {
        "checkpoint": os.path.basename(os.path.normpath(ckpt_dir)),
        "dtype": cfg.model.dtype,
        "image_folder": os.path.abspath(image_folder or cfg.data.image_folder or ""),
        "seed": cfg.features.seed,
        "proj_dim": cfg.features.proj_dim,
        "mode": mode,
        "max_length": cfg.data.max_length,
        "template": cfg.data.template,
    }


def repair_command(run_dir: str, split: str) -> str:
    """The command that checks ``split``'s shards in full and recomputes the ones that fail."""
    layout = RunLayout(run_dir)
    config = f" --config {layout.config}" if os.path.exists(layout.config) else ""
    return f"icons-fast featurize{config} --out {run_dir} --split {split} --verify"


def explain_corrupt(exc, run_dir: str):
    """A ``CorruptShard`` from reading a run's features, re-made with the exact repairing command in its message."""
    from icons_fast.features.store import REPAIR_HINT, CorruptShard

    text = str(exc)
    if text.endswith(REPAIR_HINT):
        text = text[: -len(REPAIR_HINT)].rstrip("; ")
    split = os.path.basename(os.path.dirname(exc.path)) if exc.path else "train"
    return CorruptShard(f"{text}; repair it with `{repair_command(run_dir, split)}` (it removes the shards that fail "
                        f"and recomputes their ranges)", exc.path, exc.start, exc.end)


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
    )


def featurize_resilient(extractor, batch: dict, on_retry) -> tuple[torch.Tensor, list[int]]:
    """``extractor.featurize(batch)``, retried in halves (with their images) when the device runs out of memory.

    Returns ``(g [B, k], oom_rows)``: rows of samples that do not fit even
    alone are NaN and listed in ``oom_rows`` (the caller records them).
    ``on_retry(batch_size, indices)`` is told of every split.
    """
    try:
        return extractor.featurize(batch), []
    except Exception as exc:  # noqa: BLE001 - only out-of-memory is handled, the rest re-raised
        if not is_out_of_memory(exc):
            raise
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    n = len(batch["ids"])
    if n == 1:
        return torch.full((1, extractor.proj_dim), float("nan")), [0]
    on_retry(n, batch["indices"].tolist())
    half = n // 2
    g1, bad1 = featurize_resilient(extractor, batch_rows(batch, list(range(half))), on_retry)
    g2, bad2 = featurize_resilient(extractor, batch_rows(batch, list(range(half, n))), on_retry)
    return torch.cat([g1.to(g2.device), g2]), bad1 + [half + r for r in bad2]


def featurize_split(
    cfg: Config,
    run_dir: str,
    split: str,
    records_path: str,
    ckpt_dir: str,
    mode: str,
    shard: str | None = None,
    image_folder: str | None = None,
    verify: bool = False,
    stop: GracefulStop | None = None,
) -> str:
    """Featurize ``records_path`` under checkpoint ``ckpt_dir``; return the feature directory.

    ``image_folder`` defaults to ``cfg.data.image_folder``. ``verify``: hash
    every existing shard of this process's ranges before trusting it (the
    default checks sizes only). ``stop``: the ``GracefulStop`` of the caller
    (one is made when None); a SIGTERM raises ``Preempted`` after the shard in flight.
    """
    with writer_lock(run_dir, "featurize", cfg, shard), (nullcontext(stop) if stop else GracefulStop()) as stop:
        return _featurize_split(cfg, run_dir, split, records_path, ckpt_dir, mode, shard, image_folder, verify, stop)


def _featurize_split(cfg: Config, run_dir: str, split: str, records_path: str, ckpt_dir: str, mode: str,
                     shard: str | None, image_folder: str | None, verify: bool, stop: GracefulStop) -> str:
    from icons_fast.data import ErrorLog, SampleError, SampleProblem, load_records
    from icons_fast.data.loader import make_dataset
    from icons_fast.features.extractor import GradientExtractor
    from icons_fast.features.store import FeatureStore, normalize_rows, shard_ranges
    from icons_fast.model.loading import load_model
    from icons_fast.model.lora import lora_fingerprint
    from icons_fast.train.checkpoint import (
        checkpoint_sha256,
        load_checkpoint_state,
        load_lora_checkpoint,
        load_moments,
    )

    layout = RunLayout(run_dir)
    ckpt_name = os.path.basename(os.path.normpath(ckpt_dir))
    out_dir = layout.features(ckpt_name, split)
    t0 = time.perf_counter()
    records = load_records(records_path)
    state = load_checkpoint_state(ckpt_dir)
    device = device_for_rank(cfg.resolved_device())
    lm = load_model(state.get("base_model", cfg.model.model), cfg.model.dtype, device, seed=cfg.seed)
    model = load_lora_checkpoint(lm.model, ckpt_dir)
    moments = load_moments(ckpt_dir) if mode == "adam" else None
    extractor = GradientExtractor(
        model, proj_dim=cfg.features.proj_dim, seed=cfg.features.seed, mode=mode,
        optimizer_state=moments, backend=cfg.features.backend,
    )
    fingerprint = {
        "model": os.path.abspath(lm.path),
        "lora": lora_fingerprint(model),
        "checkpoint_step": state["step"],
        "checkpoint_sha256": checkpoint_sha256(ckpt_dir),  # a retrained warmup never reuses old features
        "data_sha256": source_sha256(records_path),
        "n_samples": len(records),
        **feature_settings(cfg, ckpt_dir, mode, image_folder),
    }
    store = FeatureStore(out_dir, fingerprint, cfg.features.proj_dim, dtype=cfg.features.store_dtype)
    errors = ErrorLog(layout.errors(split))
    folder = image_folder or cfg.data.image_folder
    dataset, collate = make_dataset(lm, records, folder, cfg.data.max_length, errors, stage="data",
                                   template=cfg.data.template)
    t_loaded = time.perf_counter()

    rank, world = parse_shard(shard)
    mine = process_share(shard_ranges(len(records), cfg.features.shard_size), rank, world)
    # Only this process's ranges: a shard another writer is committing right now looks like an orphan.
    for p in store.repair(verify=verify, ranges=mine):
        log.warning("%s: removed shard %s [%d, %d) (%s: %s); recomputing it", split, p.file, p.start, p.end,
                    p.problem, p.detail)
    todo = store.missing_ranges(mine)
    n_todo = sum(e - s for s, e in todo)
    log.info("%s @ %s (%s, k=%d, backend=%s): %d of %d shard(s) to do, process %d/%d", split, ckpt_name, mode,
             cfg.features.proj_dim, extractor.describe_backend(), len(todo), len(mine), rank, world)
    retries_path = layout.oom_retries(split)

    def on_retry(size: int, indices: list[int]) -> None:
        """Out-of-memory splits are recorded (they are not sample errors: the samples still get features)."""
        log.warning("out of memory on a batch of %d (indices %d..%d): retrying in halves", size, indices[0], indices[-1])
        try:
            os.makedirs(os.path.dirname(retries_path), exist_ok=True)
            with open(retries_path, "a") as f:
                f.write(json.dumps({"checkpoint": ckpt_name, "batch_size": size, "indices": indices}) + "\n")
        except OSError as err:  # a full disk or read-only directory: one line naming the file
            raise_write_error(err, retries_path)

    bar = tqdm(total=n_todo, desc=f"featurize {split}", unit="sample", dynamic_ncols=True)
    try:
        bs = cfg.features.batch_size
        for start, end in todo:
            idx_out, ids_out, feats, norms = [], [], [], []
            for b0 in range(start, end, bs):
                with record_function("data"):
                    batch = collate([dataset[i] for i in range(b0, min(b0 + bs, end))])
                for err in batch.get("errors", []):
                    errors.add(err)
                if batch.get("input_ids") is None or len(batch["input_ids"]) == 0:
                    bar.update(min(b0 + bs, end) - b0)
                    continue
                with record_function("featurize"):
                    g, oom_rows = featurize_resilient(extractor, batch, on_retry)  # [b, k] float32
                norm = torch.linalg.vector_norm(g.float(), dim=1)
                ok = torch.isfinite(norm) & (norm > 0)
                for row in (~ok).nonzero().flatten().tolist():
                    if row in oom_rows:
                        problem = SampleProblem("out_of_memory", f"{int(batch['attention_mask'][row].sum())} tokens")
                    elif not torch.isfinite(norm[row]):
                        problem = SampleProblem("non_finite_gradient", f"projected gradient norm {float(norm[row])}")
                    else:
                        problem = SampleProblem("zero_gradient", f"projected gradient norm 0 under {ckpt_name}")
                    errors.add(SampleError(int(batch["indices"][row]), batch["ids"][row], "featurize", problem.reason))
                keep = ok.cpu()
                idx_out.append(batch["indices"][keep].numpy())
                ids_out.extend(i for i, k in zip(batch["ids"], keep.tolist()) if k)
                f, n = normalize_rows(g[ok], cfg.features.store_dtype)
                feats.append(f.cpu())
                norms.append(n)
                bar.update(min(b0 + bs, end) - b0)
            k = cfg.features.proj_dim
            with record_function("io"):
                store.write_shard(
                    start,
                    end,
                    np.concatenate(idx_out) if idx_out else np.zeros(0, dtype=np.int64),
                    ids_out,
                    torch.cat(feats) if feats else torch.zeros(0, k, dtype=store.torch_dtype),
                    np.concatenate(norms) if norms else np.zeros(0, dtype=np.float32),
                )
            if stop.requested:
                left = len(todo) - todo.index((start, end)) - 1
                raise Preempted(f"featurize stopped by SIGTERM after shard [{start}, {end}) of {split} @ {ckpt_name} "
                                f"({left} shard(s) of this process left); finished shards are saved, rerun the same "
                                f"command to resume")
    finally:
        bar.close()  # also on a failure: its line ends before the error is printed
    barrier()  # under torchrun: wait for every rank's shards before merging the manifest
    # Whoever sees every range done writes the merged manifest (atomic, identical content).
    if (is_main() or shard) and not store.missing_ranges(shard_ranges(len(records), cfg.features.shard_size)):
        store.finalize()
    t_end = time.perf_counter()
    if n_todo:
        log.info("%s: %d sample(s) in %.1f s (%.1f samples/s) after %.1f s loading the model and data; backend %s",
                 split, n_todo, t_end - t_loaded, n_todo / max(t_end - t_loaded, 1e-9), t_loaded - t0,
                 extractor.describe_backend())
    return out_dir
