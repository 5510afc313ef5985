"""Many processes: torchrun (NCCL on GPU, gloo on CPU) or ``--shard i/n`` job arrays.

Work is split by contiguous ranges of feature shards (``process_share``);
every process writes its own shards and their manifest entries into the same
feature directory, so results merge by sample index, never by file order,
and do not depend on how many processes made them. Under torchrun a process
group is initialised only to wait for the others (``barrier``) before rank 0
writes the merged manifest; job arrays need no communication at all.
"""
from __future__ import annotations

# torch is imported inside the functions that need it: ``world()`` and ``is_main()`` serve the
# CLI's logging set-up, which must not pay for importing torch.

import os
from datetime import timedelta


def world() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from torchrun's environment, ``(0, 1, 0)`` otherwise."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def init_distributed() -> bool:
    """Initialise the default process group under torchrun (once); True when running distributed."""
    import torch
    import torch.distributed as dist

    _, size, local_rank = world()
    if size <= 1 or "MASTER_ADDR" not in os.environ:
        return False
    if not dist.is_initialized():
        # Ranks wait in barriers while rank 0 runs the warmup or finishes its last shards,
        # which at LLaVA scale takes hours: the default 30-minute collective timeout is too short.
        timeout = timedelta(hours=float(os.environ.get("ICONS_FAST_DIST_TIMEOUT_HOURS", "48")))
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            dist.init_process_group("nccl", timeout=timeout)
        else:
            dist.init_process_group("gloo", timeout=timeout)
    return True


def device_for_rank(device: str) -> str:
    """``cuda`` becomes ``cuda:<local_rank>`` under torchrun; other devices are unchanged."""
    if device == "cuda" and world()[1] > 1:
        return f"cuda:{world()[2]}"
    return device


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def is_main() -> bool:
    return world()[0] == 0


def process_share(ranges: list, rank: int, world_size: int) -> list:
    """The contiguous block of ``ranges`` owned by process ``rank`` of ``world_size``."""
    if not 0 <= rank < world_size:
        raise ValueError(f"shard {rank}/{world_size} is out of range: i must be in [0, {world_size})")
    per, extra = divmod(len(ranges), world_size)
    start = rank * per + min(rank, extra)
    return ranges[start : start + per + (1 if rank < extra else 0)]


def parse_shard(spec: str | None) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)``; None -> torchrun's ``(RANK, WORLD_SIZE)``, or ``(0, 1)``."""
    if spec:
        try:
            i, n = (int(x) for x in spec.split("/"))
        except ValueError:
            raise ValueError(f"--shard takes i/n (e.g. 3/200), got {spec!r}") from None
        return i, n
    rank, size, _ = world()
    return rank, size
