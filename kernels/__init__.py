"""Triton kernels, installed as ``icons_fast.kernels``.

- ``rademacher``: on-chip generator of the projection contract's sign tiles
  (bit-identical to ``icons_fast.features.rademacher.rademacher_signs_ref``).
- ``project``: ``out[b] += R^T G'[b]`` for one parameter's per-sample gradients,
  optional Adam (LESS) applied on the fly, R never stored.
- ``lora_project``: per-sample LoRA gradients of one module (batched GEMMs)
  followed by the projection of both LoRA parameters.

Importing this package imports neither torch nor triton; the names below load
their module on first use. On the CPU the kernels run only under
``TRITON_INTERPRET=1`` (slow; for tests).
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "lora_grad_project": "lora_project",
    "lora_grad_project_ref": "lora_project",
    "lora_grads": "lora_project",
    "lora_grads_ref": "lora_project",
    "rademacher_project": "project",
    "rademacher_project_ref": "project",
    "adam_precondition_ref": "project",
    "rademacher_signs": "rademacher",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
