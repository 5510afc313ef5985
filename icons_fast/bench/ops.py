"""Op-level providers: projection, influence and voting.

- projection: ``grads [B, P] @ R [P, k]``: ours (``RademacherProjector``, the
  counter-hash matrix never stored) vs ``dense`` (a stored +-1 matrix made
  untimed, the lower bound for any projector that reads ``R`` from memory) vs
  TRAK's projector when ``trak`` is importable (``BasicProjector``, or
  ``CudaProjector`` where ``fast_jl`` exists). FLOPs ``2 B P k``.
- influence: per-task max / top-m over target segments of ``train [N, k] fp16``
  against ``targets [M, k]``: ``segment_reduce`` through "auto" and each backend
  vs the plain GEMMs of the same shape and the torch references (blocked, and
  materialise-then-reduce). FLOPs ``2 N M k``.
- voting: ``vote_counts`` and ``consensus_select`` on ``[N, T]`` scores.

Each ``*_providers`` function returns ``[{name, fn, items, unit, flops, bytes, note}]``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from icons_fast.bench.featurize import TRAK_BLOCK_SIZE

LLAVA_665K = 665_298


def projection_providers(B: int, P: int, k: int, device: str | torch.device = "cpu", with_trak: bool = True
                         ) -> list[dict]:
    """Providers for ``[B, P] -> [B, k]`` on ``device`` (see the module docstring)."""
    from icons_fast.features.projection import RademacherProjector

    dev = torch.device(device)
    g = torch.randn(B, P, generator=torch.Generator().manual_seed(0)).to(dev)
    ours = RademacherProjector(P, k, seed=0, device=dev)
    ours.project(g)  # one untimed call: "auto" measures here, and the row names what ran
    flops = 2.0 * B * P * k
    # cuBLAS is fastest on a bf16 matrix; the CPU BLAS on fp32 (CPU bf16 GEMMs are slow)
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    R = torch.empty(P, k, dtype=dt, device=dev)
    gen = torch.Generator(device=dev).manual_seed(1)
    for r0 in range(0, P, 8192):
        r1 = min(P, r0 + 8192)
        R[r0:r1] = (torch.randint(0, 2, (r1 - r0, k), generator=gen, device=dev) * 2 - 1).to(dt)
    gd = g.to(dt)
    provs = [
        dict(name="dense (stored R)", fn=lambda: gd @ R, items=B, unit="samples", flops=flops,
             bytes=P * k * R.element_size(), note=f"R [{P}, {k}] {str(dt).replace('torch.', '')} stored, made untimed"),
        dict(name=f"ours ({ours.describe_backend()})", fn=lambda: ours.project(g), items=B, unit="samples", flops=flops,
             bytes=None, note="counter-hash R, never stored"),
    ]
    if with_trak:
        try:
            from trak.projectors import BasicProjector, CudaProjector, ProjectionType
        except ImportError:
            provs[-1]["note"] += "; trak not installed: no TRAK row"
        else:
            trak, what = None, None
            if dev.type == "cuda":
                try:
                    import fast_jl  # noqa: F401

                    trak = CudaProjector(P, k, 0, ProjectionType.rademacher, dev, max_batch_size=min(B, 32))
                    what = "TRAK CudaProjector (fast_jl)"
                except Exception:  # noqa: BLE001 - no fast_jl: the basic projector, as TRAK falls back
                    trak = None
            if trak is None:
                trak = BasicProjector(P, k, 0, ProjectionType.rademacher, dev, block_size=TRAK_BLOCK_SIZE)
                what = f"TRAK BasicProjector (block {TRAK_BLOCK_SIZE}, regenerates R per call)"
            gt = g.half() if "Cuda" in what else g
            provs.append(dict(name="trak", fn=lambda: trak.project(gt, model_id=0), items=B, unit="samples",
                              flops=flops, bytes=None, note=what))
    return provs


def influence_providers(n: int, k: int, m: int, tasks: int, device: str | torch.device = "cpu",
                        topm: int = 8, blas_block_rows: Sequence[int] = ()) -> list[dict]:
    """Per-task max (and top-m) influence of ``n`` fp16 train rows against ``m`` fp32 targets in ``tasks`` segments.

    Rows: the plain GEMMs of the same shape (fp32, and bf16 on the CPU: what the
    machine's BLAS does alone, inputs converted untimed), ``segment_reduce``
    through "auto" (max and top-m; the row names the backend it picked), every
    other available backend on max, and the torch materialise-then-reduce.
    ``blas_block_rows`` adds the blas backend on max at those block sizes.
    Each provider dict also carries ``gemm`` (the GEMM row at its precision) and
    ``ref`` (the reference row), which ``set_time_ratios`` turns into ``vs_gemm`` / ``vs_ref``.
    """
    from icons_fast.ops.backend import backends
    from icons_fast.ops.segment_reduce import choose_backend, offsets_from_sizes, segment_reduce

    dev = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    train = torch.empty(n, k, dtype=torch.float16)
    for i in range(0, n, 8192):  # fill in chunks: no fp32 [n, k] temporary
        rows = min(8192, n - i)
        train[i : i + rows] = (torch.randn(rows, k, generator=gen) / math.sqrt(k)).half()
    targets = (torch.randn(m, k, generator=gen) / math.sqrt(k)).to(dev)
    train = train.to(dev)
    sizes = [m // tasks + (1 if t < m % tasks else 0) for t in range(tasks)]
    offsets = offsets_from_sizes(sizes)
    offs = offsets.tolist()
    flops = 2.0 * n * m * k
    shape = f"N={n:,} k={k} M={m} T={tasks} fp16 train"
    # the GEMMs alone: inputs already in the GEMM's precision (converted here, untimed)
    gemm32 = "fp32 GEMM alone"
    train32 = train.float()
    provs = [dict(name=gemm32, fn=lambda: train32 @ targets.T, precision="fp32", note=f"[N, k] @ [k, M]; {shape}")]
    gemm_bf16 = None
    if dev.type == "cpu":
        gemm_bf16 = "bf16 GEMM alone"
        train_b, targets_b = train.bfloat16(), targets.bfloat16()
        provs.append(dict(name=gemm_bf16, fn=lambda: train_b @ targets_b.T, precision="bf16", note="oneDNN / MKL bf16"))

    def materialise():
        p = train.float() @ targets.T  # [n, m] fp32, formed whole
        return torch.stack([p[:, a:b].amax(1) for a, b in zip(offs[:-1], offs[1:])], 1)

    def op(reduction, backend, block_rows=None):
        return lambda: segment_reduce(train, targets, offsets, reduction, m=topm, backend=backend,
                                      block_rows=block_rows)

    for reduction in ("max", "topm"):
        picked = choose_backend(train, targets, offsets, reduction, m=topm)  # "auto" measures here, untimed
        provs.append(dict(name=f"ours auto {reduction} -> {picked}", fn=op(reduction, "auto"),
                          precision="bf16" if picked == "blas-bf16" else "fp32", ref=f"torch blocked {reduction}",
                          note=f"segment_reduce(..., {reduction!r}{f', m={topm}' if reduction == 'topm' else ''})"))
    for name in backends(dev)["influence"]:
        prec = "bf16" if name == "blas-bf16" else "fp32"
        label = "torch blocked max" if name == "torch" else f"{name} max"
        provs.append(dict(name=label, fn=op("max", name), precision=prec, ref="torch blocked max",
                          note=f"backend={name!r}" + (" (the reference, blocked)" if name == "torch" else "")))
    for rows in blas_block_rows if "blas" in backends(dev)["influence"] else ():
        provs.append(dict(name=f"blas max rows={rows}", fn=op("max", "blas", rows), precision="fp32",
                          ref="torch blocked max", note=f"backend='blas', block_rows={rows}"))
    provs.append(dict(name="torch blocked topm", fn=op("topm", "torch"), precision="fp32", ref="torch blocked topm",
                      note=f"backend='torch', m={topm} (the reference of auto topm)"))
    provs.append(dict(name="torch materialise max", fn=materialise, precision="fp32", ref="torch blocked max",
                      note=f"upcast + GEMM + amax; [N, M] fp32 = {n * m * 4 / 2**20:.0f} MiB formed"))
    gemm_of = {"fp32": gemm32, "bf16": gemm_bf16 or gemm32}
    for p in provs:
        p.update(items=n, unit="rows", flops=flops, bytes=None, gemm=gemm_of[p["precision"]])
    return provs


def voting_providers(n: int = LLAVA_665K, tasks: int = 10, budget: float = 0.2) -> list[dict]:
    """``vote_counts`` and ``consensus_select`` (20% budget, mean-rank tie-break) on ``[n, tasks]`` float32 scores."""
    from icons_fast.select.voting import consensus_select, vote_counts

    scores = np.random.default_rng(0).standard_normal((n, tasks), dtype=np.float32)
    shape = f"N={n:,} T={tasks}, budget {budget:.0%}"
    return [
        dict(name="vote_counts", fn=lambda: vote_counts(scores, 100 * budget), items=n, unit="samples",
             flops=None, bytes=scores.nbytes, note=shape),
        dict(name="consensus_select", fn=lambda: consensus_select(scores, budget), items=n, unit="samples",
             flops=None, bytes=scores.nbytes, note=shape + " (votes + cut + ties)"),
    ]
