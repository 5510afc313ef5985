"""Shared test set-up: the `cuda` marker skips without a GPU; small shared fixtures."""
import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not torch.cuda.is_available():
    # Triton kernels run on the CPU only through the interpreter; set it before any test imports triton.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny LLaVA saved in the llava-hf layout (built once per test session)."""
    from icons_fast.model.tiny import build_tiny_llava

    return build_tiny_llava(str(tmp_path_factory.mktemp("tiny_llava")))


@pytest.fixture
def autotune_cache(tmp_path, monkeypatch):
    """A private measured-dispatch cache (``ICONS_FAST_CACHE``), no backend forced by the environment,
    and a fresh in-process copy of the cache file."""
    from icons_fast.ops import autotune, backend

    monkeypatch.setenv("ICONS_FAST_CACHE", str(tmp_path))
    monkeypatch.delenv("ICONS_FAST_BACKEND", raising=False)
    for op in backend.OPS:
        monkeypatch.delenv(backend.env_var(op), raising=False)
    autotune.forget()
    yield tmp_path
    autotune.forget()


@pytest.fixture
def fixed_timings(monkeypatch):
    """``fixed_timings(medians) -> timed``: measured dispatch times every candidate at ``medians[name]``.

    The candidates still run once each (on their sample); ``timed`` collects the
    sorted candidate names of every measurement.
    """
    from icons_fast.ops import autotune

    timed: list = []

    def install(medians: dict) -> list:
        def fake_time(candidates, rounds=3, clock=None):
            timed.append(sorted(candidates))
            for fn in candidates.values():
                fn()
            return {name: medians[name] for name in candidates}

        monkeypatch.setattr(autotune, "time_backends", fake_time)
        return timed

    return install
