"""Triton kernels, installed as ``icons_fast.kernels``: the bottom of each op's column.

- ``rademacher``: on-chip generator of the projection contract's sign tiles
  (bit-identical to ``icons_fast.contract.rademacher_signs_ref``).
- ``project``: ``out[b] += R^T G'[b]`` for one parameter's per-sample gradients,
  optional Adam (LESS) applied on the fly, R never stored.

Kernels import only ``icons_fast.contract``; input checks, backend dispatch
and the plain-torch references live one layer up in ``icons_fast.ops``
(``ops.project`` calls ``project.rademacher_project``; ``ops.lora_grad``
reaches it through ``ops.project``).

Importing this package imports neither torch nor triton; the names below load
their module on first use. On the CPU the kernels run only under
``TRITON_INTERPRET=1`` (slow; for tests).
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "rademacher_project": "project",
    "rademacher_signs": "rademacher",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
