"""icons-fast: gradient-influence data selection (ICONS) as an engine.

Public API (imported lazily so ``import icons_fast`` stays cheap):

- ``Config``: the one configuration object.
- ``GradientExtractor``: exact batched per-sample LoRA gradients, Adam
  preconditioning and projection, ``Tensor[B, k]`` per batch.
- ``RademacherProjector``: the deterministic counter-hash projection
  ``f = R^T g`` with ``R[i, j] = +-1/sqrt(k)`` never stored.
- ``task_influence``, ``vote_counts``, ``consensus_select``: scores and voting.
- ``FeatureStore``: sharded, checksummed, resumable feature files.
- ``has_cuda_ext()``, ``backends()``: capability queries that always exist.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "Config": "icons_fast.config",
    "GradientExtractor": "icons_fast.features.extractor",
    "RademacherProjector": "icons_fast.features.projection",
    "FeatureStore": "icons_fast.features.store",
    "task_influence": "icons_fast.select.influence",
    "vote_counts": "icons_fast.select.voting",
    "consensus_select": "icons_fast.select.voting",
    "load_model": "icons_fast.model.loading",
    "attach_lora": "icons_fast.model.lora",
    "build_tiny_llava": "icons_fast.model.tiny",
    "build_tiny_family": "icons_fast.model.tiny",
    "has_cuda_ext": "icons_fast.ops.backend",
    "has_cpu_ext": "icons_fast.ops.backend",
    "backends": "icons_fast.ops.backend",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'icons_fast' has no attribute {name!r}")


def __dir__():
    return __all__
