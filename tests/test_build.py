"""setup.py's CUDA build checks, and the Triton kernels without the extension."""
import importlib.util
import os
import subprocess
import sys
import warnings

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup_mod():
    """setup.py as a module (its setup() call runs only as __main__)."""
    spec = importlib.util.spec_from_file_location("icons_fast_setup", os.path.join(REPO, "setup.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_arch_list_is_checked_against_nvcc(setup_mod):
    supported = ["75", "80", "86", "90", "100", "120"]
    setup_mod.check_archs(["80", "90", "90a"], supported, "nvcc")  # "90a" is sm_90's arch-specific variant
    with pytest.raises(ValueError, match=r"names 70;61, .*supports 75;80;86;90;100;120"):
        setup_mod.check_archs(["70", "80", "61"], supported, "nvcc")
    assert setup_mod.parse_archs("8.0, 9.0") == ["80", "90"]
    with pytest.raises(ValueError, match="names no architecture"):
        setup_mod.parse_archs(" ; ")


def test_installed_nvcc_lists_its_archs(setup_mod):
    nvcc = setup_mod.find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    archs = setup_mod.nvcc_archs(nvcc)
    assert archs and all(a[:2].isdigit() for a in archs)
    major, minor = setup_mod.nvcc_version(nvcc)
    assert major >= 11 and minor >= 0


def test_nvcc_and_torch_cuda_majors(setup_mod):
    assert setup_mod.cuda_mismatch((12, 4), "12.1") is None
    assert setup_mod.cuda_mismatch((13, 0), "13.0") is None
    assert "majors differ" in setup_mod.cuda_mismatch((13, 0), "12.4")
    assert "CPU build" in setup_mod.cuda_mismatch((13, 0), None)
    assert setup_mod.cuda_mismatch(None, "12.4") is None  # unreadable nvcc: not refused here
    assert setup_mod.cuda_mismatch((13, 0), "") is None  # no torch in the build environment


@pytest.mark.parametrize("forced", [False, True])
def test_cuda_plan_refuses_a_mismatch_unless_forced(setup_mod, monkeypatch, forced):
    monkeypatch.setattr(setup_mod, "find_nvcc", lambda: "/opt/cuda-13/bin/nvcc")
    monkeypatch.setattr(setup_mod, "nvcc_version", lambda nvcc: (13, 0))
    monkeypatch.setattr(setup_mod, "torch_cuda_version", lambda: "12.4")
    monkeypatch.setattr(setup_mod, "gpu_driver_present", lambda: True)
    monkeypatch.delenv("ICONS_FAST_SKIP_CUDA_BUILD", raising=False)
    monkeypatch.setenv("ICONS_FAST_FORCE_CUDA_BUILD", "1" if forced else "0")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = setup_mod.cuda_plan()
    assert plan == ("/opt/cuda-13/bin/nvcc" if forced else None)
    assert len(caught) == 1 and "CUDA 13.0 but torch was built with CUDA 12.4" in str(caught[0].message)
    # A matching torch builds the CUDA path without a word.
    monkeypatch.setattr(setup_mod, "torch_cuda_version", lambda: "13.0")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert setup_mod.cuda_plan() == "/opt/cuda-13/bin/nvcc"
    assert caught == []


def test_triton_kernels_import_and_run_without_the_extension(tmp_path):
    """icons_fast.kernels must not need icons_fast._C: a failed extension build leaves Triton usable."""
    pytest.importorskip("triton")
    code = """
import os, sys
sys.modules["icons_fast._C"] = None  # `from icons_fast import _C` now raises ImportError
import torch
from icons_fast.ops.backend import has_cpu_ext, has_cuda_ext, resolve_backend
assert not has_cpu_ext() and not has_cuda_ext()
from icons_fast.kernels import rademacher_project
from icons_fast.ops.project import project_param_ref
G = torch.randn(2, 40, generator=torch.Generator().manual_seed(0))
got = rademacher_project(G, "layer.weight", 1, 16)
ref = project_param_ref(G.double(), "layer.weight", 1, 16)
err = float((got.double() - ref).norm() / ref.norm())
assert err < 1e-5, err
assert resolve_backend("influence", "auto", "cpu") == "torch"
print("ok", err)
"""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.startswith("ok"), proc.stderr[-3000:]

