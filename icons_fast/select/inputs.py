"""The inputs every selection rule takes, converted and checked once.

A selection works on a score matrix ``[N, T]`` (numpy or torch; ``[N]`` is one
task), an optional boolean ``valid`` mask ``[N]`` (invalid samples are never
selected and may hold anything, NaN included) and a budget (a fraction in
(0, 1), taken as ``int(budget * N_valid)`` as ICONS and LESS do, or an integer
count). ``voting`` and ``rules`` both build on these helpers.
"""
from __future__ import annotations

import numbers

import numpy as np
import torch


def score_matrix(scores) -> np.ndarray:
    """Scores as a 2-D numpy array ``[N, T]`` (a 1-D input is one task; fp16/bf16 tensors upcast to fp32)."""
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().cpu()
        if scores.dtype in (torch.bfloat16, torch.float16):
            scores = scores.float()  # numpy has no bfloat16
        scores = scores.numpy()
    scores = np.asarray(scores)
    if scores.ndim == 1:
        scores = scores[:, None]
    if scores.ndim != 2:
        raise ValueError(f"scores have shape {scores.shape}; expected [N, T] (or [N] for one task)")
    return scores


def valid_mask(valid, n: int) -> np.ndarray:
    """Boolean ``[N]`` mask (all True when ``valid`` is None)."""
    if valid is None:
        return np.ones(n, dtype=bool)
    if isinstance(valid, torch.Tensor):
        valid = valid.detach().cpu().numpy()
    valid = np.asarray(valid)
    if valid.shape != (n,) or valid.dtype != bool:
        raise ValueError(f"valid must be a boolean mask of shape ({n},), got dtype {valid.dtype} shape {valid.shape}")
    return valid


def check_finite(scores: np.ndarray, valid: np.ndarray) -> None:
    """Raise naming the first valid sample whose score is NaN or infinite (invalid rows may be anything)."""
    ok = np.isfinite(scores) | ~valid[:, None]
    if not ok.all():
        i, t = np.argwhere(~ok)[0]
        raise ValueError(
            f"score of sample {i} for task {t} is {scores[i, t]}; non-finite scores cannot be ranked "
            "(mark the sample invalid or recompute its features)"
        )


def checked_scores(scores, valid) -> tuple[np.ndarray, np.ndarray]:
    """``(float64 [N, T], bool [N])`` with at least one valid sample and every valid score finite."""
    s = score_matrix(scores).astype(np.float64)
    v = valid_mask(valid, s.shape[0])
    if not v.any():
        raise ValueError("no valid samples: every sample is marked invalid")
    check_finite(s, v)
    return s, v


def budget_count(budget, n_valid: int) -> tuple[int, bool]:
    """``budget`` -> (sample count, was a fraction). Fraction: ``int(budget * n_valid)`` as ICONS."""
    if isinstance(budget, bool):
        raise TypeError("budget must be a fraction in (0, 1) or an integer count, not a bool")
    if isinstance(budget, numbers.Integral):
        count, fraction = int(budget), False
    elif isinstance(budget, numbers.Real) and 0 < float(budget) < 1:
        count, fraction = int(float(budget) * n_valid), True
    else:
        raise ValueError(f"budget {budget!r} must be a fraction in (0, 1) or an integer count >= 1")
    if count < 1 or count > n_valid:
        raise ValueError(f"budget {budget!r} selects {count} samples; it must select between 1 and {n_valid} (the valid samples)")
    return count, fraction
