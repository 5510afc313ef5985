"""The public API: every exported name resolves, capability queries always answer, backend choice is explicit."""
import pytest
import torch

import icons_fast
from icons_fast.ops.backend import BackendUnavailable, resolve_backend


@pytest.mark.parametrize("name", [n for n in icons_fast.__all__ if n != "__version__"])
def test_every_public_name_resolves_with_a_docstring(name):
    obj = getattr(icons_fast, name)
    assert obj.__doc__ and len(obj.__doc__.strip()) > 20


def test_capability_queries_always_answer():
    assert isinstance(icons_fast.has_cuda_ext(), bool)
    if not torch.cuda.is_available():
        assert icons_fast.has_cuda_ext() is False
    assert isinstance(icons_fast.has_cpu_ext(), bool)
    b = icons_fast.backends("cpu")
    assert set(b) == {"project", "lora_grad", "influence"} and all("torch" in v for v in b.values())


def test_explicit_backend_that_cannot_run_raises(monkeypatch):
    with pytest.raises(BackendUnavailable, match="cuda"):
        resolve_backend("influence", "cuda", "cpu")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendUnavailable, match="GPU"):
        resolve_backend("lora_grad", "triton", "cpu")
    with pytest.raises(ValueError, match="unknown op"):
        resolve_backend("nope", "auto", "cpu")


def test_env_var_picks_backend_and_auto_falls_back(monkeypatch):
    monkeypatch.setenv("ICONS_FAST_BACKEND", "torch")
    assert resolve_backend("project", "auto", "cpu") == "torch"
    monkeypatch.setenv("ICONS_FAST_BACKEND", "auto")
    assert resolve_backend("project", None, "cpu") == ("cpp" if icons_fast.has_cpu_ext() else "torch")
