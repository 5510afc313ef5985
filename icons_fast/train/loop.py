"""The training loop shared by warmup, LoRA fine-tuning and full fine-tuning.

AdamW over the trainable parameters, linear warmup then cosine decay to zero
(the LLaVA-1.5 schedule), token-mean cross-entropy over the batch's answer
tokens (what Hugging Face's Trainer optimises). Bad samples met while loading
are recorded in the error log and left out of the batch explicitly.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from icons_fast.model.inputs import MODEL_INPUT_KEYS


def cosine_with_warmup(total_steps: int, warmup_ratio: float) -> Callable[[int], float]:
    """LR multiplier at optimizer step ``s`` (0-based): linear warmup, then cosine to 0."""
    warmup = math.ceil(warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def batch_loss(model, batch: dict, device) -> torch.Tensor:
    """Token-mean next-token cross-entropy over the batch's labelled tokens."""
    kwargs = {k: v.to(device) for k, v in batch.items() if k in MODEL_INPUT_KEYS and torch.is_tensor(v)}
    labels = batch["labels"].to(device)
    logits = model(**kwargs, use_cache=False).logits
    return F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
    )


def checkpoint_steps(total_steps: int, n: int) -> list[int]:
    """``n`` optimizer steps spread evenly over the run, the last one at the end."""
    n = max(1, min(n, total_steps))
    return sorted({max(1, round(total_steps * (i + 1) / n)) for i in range(n)})


@dataclass(frozen=True)
class Schedule:
    """Optimiser settings of one training run (warmup or fine-tuning).

    ``Schedule.of(cfg.warmup)`` and ``Schedule.of(cfg.train)`` read the fields
    both config sections share.
    """

    batch_size: int
    epochs: int
    lr: float
    warmup_ratio: float
    weight_decay: float

    @classmethod
    def of(cls, section) -> "Schedule":
        return cls(section.batch_size, section.epochs, section.lr, section.warmup_ratio, section.weight_decay)


def train_model(
    model: torch.nn.Module,
    dataset,
    collate_fn,
    *,
    indices: list[int],
    schedule: Schedule,
    seed: int,
    n_checkpoints: int = 1,
    save_checkpoint: Callable[[int, float, float, int, torch.optim.Optimizer], None] | None = None,
    error_log=None,
    desc: str = "train",
    after_step: Callable[[int, int], None] | None = None,
) -> dict:
    """Train on ``dataset[indices]``; call ``save_checkpoint(step, lr, epoch, samples, optimizer)`` at checkpoints.

    ``after_step(step, total)`` is called after every optimizer step (and its
    checkpoint, if any); it may raise to stop training there (a graceful stop).

    Returns a summary (steps, samples seen, final loss, samples/s, excluded samples).
    """
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    batch_size, epochs = schedule.batch_size, schedule.epochs
    steps_per_epoch = math.ceil(len(indices) / batch_size)
    total = steps_per_epoch * epochs
    if total == 0:
        raise ValueError("nothing to train on: the training subset is empty")
    optimizer = torch.optim.AdamW(params, lr=schedule.lr, weight_decay=schedule.weight_decay, betas=(0.9, 0.999),
                                  eps=1e-8)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(total, schedule.warmup_ratio))
    ckpts = set(checkpoint_steps(total, n_checkpoints)) if save_checkpoint else set()
    rng = np.random.default_rng(seed)
    model.train()
    step = samples = 0
    excluded: set[int] = set()
    ema_loss = None
    t0 = time.perf_counter()
    bar = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True)
    try:  # the bar is closed whatever stops the loop (an exception, a stop request from after_step)
        for epoch in range(epochs):
            order = rng.permutation(np.asarray(indices, dtype=np.int64))
            for start in range(0, len(order), batch_size):
                items = [dataset[int(i)] for i in order[start : start + batch_size]]
                batch = collate_fn(items)
                for err in batch.get("errors", []):
                    excluded.add(err.index)
                    if error_log is not None:
                        error_log.add(err)
                if batch.get("input_ids") is not None and len(batch["input_ids"]):
                    loss = batch_loss(model, batch, device)
                    loss.backward()
                    ema_loss = loss.item() if ema_loss is None else 0.9 * ema_loss + 0.1 * loss.item()
                    samples += len(batch["input_ids"])
                last_lr = scheduler.get_last_lr()[0]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                elapsed = time.perf_counter() - t0
                bar.update(1)
                bar.set_postfix(loss=f"{ema_loss:.3f}" if ema_loss is not None else "-",
                                samples_s=f"{samples / elapsed:.1f}")
                if step in ckpts:
                    save_checkpoint(step, last_lr, epoch + (start + batch_size) / len(order), samples, optimizer)
                if after_step is not None:
                    after_step(step, total)
    finally:
        bar.close()
    model.eval()
    elapsed = time.perf_counter() - t0
    return {
        "steps": step,
        "samples_seen": samples,
        "final_loss": ema_loss,
        "samples_per_s": samples / elapsed if elapsed > 0 else float("nan"),
        "excluded": sorted(excluded),
    }
