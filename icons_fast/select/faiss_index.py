"""FAISS indexes over target-task features, and influence retrieval.

A target index holds one task's (or all tasks') target features ``[M, k]``
L2-normalised in fp32, in a ``faiss.IndexFlatIP`` (exact inner product =
cosine). On a machine with faiss-gpu and a GPU the index lives on the GPU
with fp16 storage, on the process's current CUDA device
(``torch.cuda.current_device()``, so each torchrun rank uses its own GPU);
otherwise on the CPU. Saved with ``faiss.write_index``
(GPU indexes are copied to the CPU first), so a file loads anywhere.

Retrieval (scores are ``<normalise(x_i), normalise(t_j)>``):

- ``top_train_for_targets``: for each target j, the m train rows with the
  largest scores, streaming train blocks and merging the per-block top-m.
- ``top_targets_for_train``: for each train row, the m closest targets
  (``index.search``).

GPU k-selection is capped (``GPU_KSELECT_CAP`` = 2048 in classic faiss-gpu):
above it the searched side is cut into shards of at most the cap, each shard
searched for all its rows, and the results merged; exact either way.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable

import numpy as np
import torch

GPU_KSELECT_CAP = 2048
_GPU_RES = None  # one StandardGpuResources per process (it owns scratch memory and streams)


def _faiss():
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - faiss is a declared dependency
        raise ImportError("FAISS is not installed: pip install faiss-cpu (or faiss-gpu-cu12 on a GPU machine)") from e
    return faiss


def gpu_available() -> bool:
    """True when the installed faiss has GPU support and sees a GPU."""
    faiss = _faiss()
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _gpu_res():
    global _GPU_RES
    if _GPU_RES is None:
        _GPU_RES = _faiss().StandardGpuResources()
    return _GPU_RES


def _gpu_device() -> int:
    """The GPU this process works on: torch's current device (under torchrun each rank sets its own)."""
    return torch.cuda.current_device() if torch.cuda.is_available() else 0


def _is_gpu_index(index) -> bool:
    return "Gpu" in type(index).__name__


def l2_normalize(x: torch.Tensor, eps: float = 1e-12) -> np.ndarray:
    """``[n, k]`` tensor (any float dtype) -> C-contiguous fp32 numpy rows of unit norm (zero rows stay 0)."""
    x = x.detach().to("cpu", torch.float32)
    x = x / x.norm(dim=1, keepdim=True).clamp_min(eps)
    return np.ascontiguousarray(x.numpy())


def _flat_ip(vectors: np.ndarray, use_gpu: bool):
    """An IndexFlatIP over ``vectors`` ``[n, k]`` fp32 (GPU with fp16 storage when use_gpu)."""
    faiss = _faiss()
    k = vectors.shape[1]
    if use_gpu:
        cfg = faiss.GpuIndexFlatConfig()
        cfg.useFloat16 = True
        cfg.device = _gpu_device()
        index = faiss.GpuIndexFlatIP(_gpu_res(), k, cfg)
    else:
        index = faiss.IndexFlatIP(k)
    index.add(vectors)
    return index


def build_target_index(features: torch.Tensor, use_gpu: bool | None = None):
    """Target features ``[M, k]`` -> ``faiss.IndexFlatIP`` of their L2-normalised fp32 rows.

    ``use_gpu`` None: on the GPU (fp16 storage) when faiss-gpu and a GPU are
    present, else on the CPU.
    """
    if not isinstance(features, torch.Tensor) or features.dim() != 2 or features.shape[0] == 0:
        raise ValueError(f"features must be a non-empty 2-D tensor [M, k]; got {getattr(features, 'shape', type(features))}")
    if use_gpu is None:
        use_gpu = gpu_available()
    elif use_gpu and not gpu_available():
        raise RuntimeError("use_gpu=True but faiss has no GPU support here (install faiss-gpu-cu12 on a GPU machine)")
    return _flat_ip(l2_normalize(features), use_gpu)


def save_index(index, path: str | os.PathLike) -> None:
    """Write ``index`` to ``path`` atomically (temp file in the same folder + rename)."""
    faiss = _faiss()
    cpu = faiss.index_gpu_to_cpu(index) if _is_gpu_index(index) else index
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".faiss", dir=folder)
    os.close(fd)
    try:
        faiss.write_index(cpu, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_index(path: str | os.PathLike, use_gpu: bool | None = None):
    """Read an index written by ``save_index`` (moved to the GPU, fp16 storage, when available)."""
    faiss = _faiss()
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no FAISS index at {path} (build it with build_target_index + save_index)")
    index = faiss.read_index(path)
    if use_gpu is None:
        use_gpu = gpu_available()
    if use_gpu:
        co = faiss.GpuClonerOptions()
        co.useFloat16 = True
        index = faiss.index_cpu_to_gpu(_gpu_res(), _gpu_device(), index, co)
    return index


def index_vectors(index) -> torch.Tensor:
    """The stored vectors ``[M, k]`` fp32 (``reconstruct_n``), e.g. the target side of the influence op."""
    faiss = _faiss()
    cpu = faiss.index_gpu_to_cpu(index) if _is_gpu_index(index) else index
    return torch.from_numpy(np.ascontiguousarray(cpu.reconstruct_n(0, cpu.ntotal)))


def _merge_topm(best, new, m: int):
    """Merge two (scores [q, a], ids [q, a]) candidate sets into the top-m (scores descending)."""
    if best is None:
        scores, ids = new
    else:
        scores = torch.cat([best[0], new[0]], 1)
        ids = torch.cat([best[1], new[1]], 1)
    if scores.shape[1] > m:
        scores, pos = scores.topk(m, dim=1)
        ids = ids.gather(1, pos)
    else:  # keep them sorted for the caller
        scores, pos = scores.sort(dim=1, descending=True)
        ids = ids.gather(1, pos)
    return scores, ids


def _search_db_block(queries: np.ndarray, db: np.ndarray, m: int, use_gpu: bool, cap: int | None, best, base: int):
    """Merge the top-m of ``db`` rows (global ids ``base + row``) for every query into ``best``.

    With a k-selection cap, ``db`` is searched in shards of at most ``cap``
    rows so no search asks for more than ``cap`` neighbours.
    """
    step = db.shape[0] if cap is None or m <= cap else cap
    for lo in range(0, db.shape[0], step):
        shard = db[lo : lo + step]
        kk = min(m, shard.shape[0])
        scores, ids = _flat_ip(shard, use_gpu).search(queries, kk)
        best = _merge_topm(best, (torch.from_numpy(scores), torch.from_numpy(ids).to(torch.int64) + base + lo), m)
    return best


def top_train_for_targets(
    train_blocks: torch.Tensor | Iterable[torch.Tensor],
    index,
    m: int,
    block_rows: int = 65536,
    kselect_cap: int | None = -1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each target j in ``index``, the ``m`` train rows with the largest scores.

    Args:
        train_blocks: a ``[N, k]`` tensor (cut into ``block_rows`` blocks) or an
            iterable of ``[b_i, k]`` blocks in row order (row ids continue across blocks).
        index: a target index from ``build_target_index`` / ``load_index``.
        m: neighbours per target; ``min(m, N)`` are returned.
        kselect_cap: largest k one search may ask for; -1 = 2048 on the GPU and
            none on the CPU; None = no cap.
    Returns:
        ``(scores [M, m'] fp32 descending, train_ids [M, m'] int64)``, ``m' = min(m, N)``.
    """
    if m < 1:
        raise ValueError(f"m must be >= 1; got {m}")
    use_gpu = _is_gpu_index(index)
    cap = (GPU_KSELECT_CAP if use_gpu else None) if kselect_cap == -1 else kselect_cap
    targets = np.ascontiguousarray(index_vectors(index).numpy())
    if isinstance(train_blocks, torch.Tensor):
        full = train_blocks
        blocks = (full[i : i + block_rows] for i in range(0, full.shape[0], block_rows))
    else:
        blocks = train_blocks
    best, base = None, 0
    for block in blocks:
        if block.dim() != 2 or block.shape[1] != targets.shape[1]:
            raise ValueError(f"train block shape {tuple(block.shape)} does not match the index dimension k={targets.shape[1]}")
        if block.shape[0] == 0:
            continue
        best = _search_db_block(targets, l2_normalize(block), m, use_gpu, cap, best, base)
        base += block.shape[0]
    if best is None:
        raise ValueError("no train rows were given")
    return best


def top_targets_for_train(
    train: torch.Tensor, index, m: int, kselect_cap: int | None = -1
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each train row (L2-normalised), the ``m`` targets with the largest scores.

    Returns ``(scores [N, m'] fp32 descending, target_ids [N, m'] int64)``,
    ``m' = min(m, M)``. Above the k-selection cap the index's vectors are
    searched in shards and merged.
    """
    if m < 1:
        raise ValueError(f"m must be >= 1; got {m}")
    if train.dim() != 2 or train.shape[1] != index.d:
        raise ValueError(f"train shape {tuple(train.shape)} does not match the index dimension k={index.d}")
    use_gpu = _is_gpu_index(index)
    cap = (GPU_KSELECT_CAP if use_gpu else None) if kselect_cap == -1 else kselect_cap
    queries = l2_normalize(train)
    kk = min(m, index.ntotal)
    if cap is None or kk <= cap:
        scores, ids = index.search(queries, kk)
        return torch.from_numpy(scores), torch.from_numpy(ids).to(torch.int64)
    db = np.ascontiguousarray(index_vectors(index).numpy())
    return _search_db_block(queries, db, kk, use_gpu, cap, None, 0)
