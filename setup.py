"""Build icons-fast: the Python package, the Triton kernels (installed as
``icons_fast.kernels``) and the pybind11 extension ``icons_fast._C``.

The extension's C++17 CPU path (OpenMP) is always built. It takes raw
pointers, shapes and dtypes from the Python wrappers, so it is not tied to
one torch build.

The CUDA path (csrc/*.cu) is compiled with nvcc into objects that are linked
into the same ``icons_fast._C`` with ``-DICONS_FAST_WITH_CUDA`` and the static
CUDA runtime (so ``_C`` still imports on machines without a driver):

- ``ICONS_FAST_SKIP_EXT=1``: build no extension at all (a pure-Python
  install: the Triton and torch backends only; the GPU suite's fallback).
- ``ICONS_FAST_SKIP_CUDA_BUILD=1``: never build the CUDA path.
- ``ICONS_FAST_FORCE_CUDA_BUILD=1``: build it even without a GPU driver, with
  a CPU-only torch, or with an nvcc whose major version differs from torch's
  CUDA; fail loudly when nvcc is missing or the build fails.
- default: build it when nvcc (``$CUDA_HOME/bin/nvcc`` or on PATH), a torch
  built with CUDA of the same major version as nvcc, and a GPU driver
  (``nvidia-smi`` or ``/dev/nvidia0``) are all present; otherwise, or when
  the CUDA build fails, warn in one line and build the CPU path only. (The
  static runtime of a CUDA 13 nvcc needs a driver new enough for CUDA 13,
  which a machine set up for a CUDA 12 torch may not have.)
- ``ICONS_FAST_CUDA_ARCHS``: ";"-separated compute capabilities (default
  "80;90"); SASS for each, plus PTX for the newest so later GPUs can JIT it.
  Entries the installed nvcc does not support (``nvcc --list-gpu-arch``) are
  refused with the list it does support. The list is compiled in
  (``_C.cuda_archs()``) for error messages.
- ``MAX_JOBS``: parallel C++ compiles and nvcc ``--threads`` (default: all cores).

At run time ``icons_fast.has_cuda_ext()`` probes the CUDA path once (a tiny
kernel launch, ``_C.cuda_runtime_status()``) and falls back to torch with one
logged line when it cannot run (driver too old, no image for the GPU).

CI without a GPU still catches CUDA compile errors through
``tests/test_influence_ext.py::test_cuda_source_compiles`` (``nvcc -c`` of every
csrc/*.cu for sm_75 and sm_90).
"""
import os
import re
import shutil
import subprocess
import sys
import warnings

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension, build_ext
from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def cpu_extension():
    sources = sorted(
        os.path.join("csrc", f) for f in os.listdir(os.path.join(HERE, "csrc")) if f.endswith(".cpp")
    )
    extra_compile = ["-O3", "-fopenmp", "-march=x86-64-v2"] if sys.platform.startswith("linux") else ["-O3"]
    extra_link = ["-fopenmp"] if sys.platform.startswith("linux") else []
    return Pybind11Extension(
        "icons_fast._C",
        sources,
        cxx_std=17,
        extra_compile_args=extra_compile,
        extra_link_args=extra_link,
    )


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def find_nvcc() -> str | None:
    """nvcc from CUDA_HOME / CUDA_PATH, else from PATH; None when absent."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root and os.path.isfile(os.path.join(root, "bin", "nvcc")):
            return os.path.join(root, "bin", "nvcc")
    return shutil.which("nvcc")


def gpu_driver_present() -> bool:
    return shutil.which("nvidia-smi") is not None or os.path.exists("/dev/nvidia0")


def cuda_lib_dirs(nvcc: str) -> list[str]:
    """Candidate CUDA library folders: CUDA_HOME, the toolkit around nvcc, /usr/local/cuda."""
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
             os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "/usr/local/cuda"]
    dirs = []
    for root in filter(None, roots):
        for sub in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib")):
            d = os.path.join(root, sub)
            if os.path.isdir(d) and d not in dirs:
                dirs.append(d)
    return dirs


def nvcc_version(nvcc: str) -> tuple[int, int] | None:
    """(major, minor) from ``nvcc --version`` ("... release 13.0, V13.0.88"); None when unreadable."""
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def nvcc_archs(nvcc: str) -> list[str] | None:
    """Compute capabilities the installed nvcc compiles for (``--list-gpu-arch``), e.g. ["75", "80", ...]."""
    try:
        out = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    caps = re.findall(r"compute_(\w+)", out)
    return caps or None


def torch_cuda_version() -> str | None:
    """``torch.version.cuda`` ("13.0"), None for a CPU build, "" when torch cannot be imported."""
    try:
        import torch
    except Exception:  # no torch in the build environment: nothing to compare against
        return ""
    return torch.version.cuda


def parse_archs(archs: str) -> list[str]:
    """"80;90" / "8.0,9.0" -> ["80", "90"]."""
    caps = [a.strip().replace(".", "") for a in archs.replace(",", ";").split(";") if a.strip()]
    if not caps:
        raise ValueError(f"ICONS_FAST_CUDA_ARCHS={archs!r} names no architecture (example: '80;90')")
    return caps


def check_archs(caps: list[str], supported: list[str] | None, nvcc: str) -> None:
    """Refuse entries the installed nvcc does not compile for ("90a" counts as "90")."""
    if supported is None:
        return  # nvcc too old for --list-gpu-arch: let nvcc itself judge
    bad = [c for c in caps if c not in supported and c.rstrip("af") not in supported]
    if bad:
        raise ValueError(
            f"ICONS_FAST_CUDA_ARCHS names {';'.join(bad)}, which {nvcc} does not support; "
            f"it supports {';'.join(supported)} (set ICONS_FAST_CUDA_ARCHS from these, or use another CUDA_HOME)"
        )


def cuda_arch_flags(archs: str) -> list[str]:
    """"80;90" -> SASS for sm_80 and sm_90, PTX for compute_90."""
    caps = parse_archs(archs)
    flags = [f"-gencode=arch=compute_{c},code=sm_{c}" for c in caps]
    newest = max(caps, key=lambda c: int("".join(ch for ch in c if ch.isdigit())))
    return flags + [f"-gencode=arch=compute_{newest},code=compute_{newest}"]


def cuda_mismatch(nvcc_ver: tuple[int, int] | None, torch_cuda: str | None) -> str | None:
    """Why nvcc and torch do not go together, or None (unknown versions are not refused)."""
    if torch_cuda is None:
        return "torch is a CPU build (torch.version.cuda is None), so no CUDA tensors can reach the CUDA path"
    if not torch_cuda or nvcc_ver is None:
        return None
    if int(torch_cuda.split(".")[0]) != nvcc_ver[0]:
        return (f"nvcc is CUDA {nvcc_ver[0]}.{nvcc_ver[1]} but torch was built with CUDA {torch_cuda}: the majors "
                f"differ, and CUDA {nvcc_ver[0]}'s runtime may need a newer driver than torch's")
    return None


def cuda_plan() -> str | None:
    """Path of nvcc when the CUDA path should be built, else None (with a warning)."""
    if _flag("ICONS_FAST_SKIP_CUDA_BUILD"):
        return None
    nvcc = find_nvcc()
    forced = _flag("ICONS_FAST_FORCE_CUDA_BUILD")
    if forced and nvcc is None:
        raise RuntimeError(
            "ICONS_FAST_FORCE_CUDA_BUILD=1 but nvcc was not found: set CUDA_HOME to the CUDA toolkit "
            "or put nvcc on PATH"
        )
    if nvcc is None:
        warnings.warn("icons-fast: nvcc not found; building the CPU path only (has_cuda_ext() will be False)")
        return None
    mismatch = cuda_mismatch(nvcc_version(nvcc), torch_cuda_version())
    if forced:
        if mismatch:
            warnings.warn(f"icons-fast: {mismatch}; building the CUDA path anyway (ICONS_FAST_FORCE_CUDA_BUILD=1)")
        return nvcc
    if mismatch:
        warnings.warn(f"icons-fast: {mismatch}; building the CPU path only. Install a torch built with that CUDA "
                      "major or point CUDA_HOME at a toolkit matching torch's; ICONS_FAST_FORCE_CUDA_BUILD=1 builds "
                      "it anyway.")
        return None
    if not gpu_driver_present():
        warnings.warn(
            "icons-fast: nvcc found but no GPU driver (no nvidia-smi, no /dev/nvidia0); building the CPU path "
            "only. Set ICONS_FAST_FORCE_CUDA_BUILD=1 to build the CUDA path anyway."
        )
        return None
    return nvcc


class BuildExt(build_ext):
    """pybind11's build_ext plus the optional nvcc step for csrc/*.cu."""

    def build_extension(self, ext):
        nvcc = cuda_plan()
        if nvcc is not None:
            try:
                self._add_cuda(ext, nvcc)
            except (OSError, subprocess.CalledProcessError) as e:
                if _flag("ICONS_FAST_FORCE_CUDA_BUILD"):
                    raise
                warnings.warn(f"icons-fast: CUDA build failed ({e}); building the CPU path only")
        super().build_extension(ext)

    def _add_cuda(self, ext, nvcc):
        lib_dirs = cuda_lib_dirs(nvcc)
        if not any(os.path.isfile(os.path.join(d, "libcudart_static.a")) for d in lib_dirs):
            raise OSError(f"libcudart_static.a not found in {lib_dirs} (set CUDA_HOME to the CUDA toolkit)")
        archs = os.environ.get("ICONS_FAST_CUDA_ARCHS", "80;90")
        caps = parse_archs(archs)
        check_archs(caps, nvcc_archs(nvcc), nvcc)
        arch_list = ";".join(caps)
        os.makedirs(self.build_temp, exist_ok=True)
        objects = []
        for cu in sorted(f for f in os.listdir(os.path.join(HERE, "csrc")) if f.endswith(".cu")):
            obj = os.path.join(self.build_temp, cu + ".o")
            cmd = [nvcc, "-c", os.path.join(HERE, "csrc", cu), "-o", obj, "-O3", "-std=c++17",
                   "-DICONS_FAST_WITH_CUDA", f'-DICONS_FAST_CUDA_ARCH_LIST="{arch_list}"',
                   "-I" + os.path.join(HERE, "csrc"), "-Xcompiler", "-fPIC",
                   "--threads", os.environ.get("MAX_JOBS", "0"), *cuda_arch_flags(archs)]
            print("icons-fast: " + " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
            objects.append(obj)
        ext.extra_objects = list(ext.extra_objects or []) + objects
        ext.define_macros = list(ext.define_macros or []) + [
            ("ICONS_FAST_WITH_CUDA", None), ("ICONS_FAST_CUDA_ARCH_LIST", f'"{arch_list}"')]
        ext.library_dirs = list(ext.library_dirs or []) + lib_dirs
        # Static runtime: _C must import on machines without libcudart / a driver.
        ext.libraries = list(ext.libraries or []) + ["cudart_static", "rt", "dl", "pthread"]


if __name__ == "__main__":  # pip's build backend runs this file as __main__; tests import the helpers
    ParallelCompile("MAX_JOBS").install()  # the C++ files compile in parallel
    setup(
        name="icons-fast",
        version="0.1.0",
        description="GPU-kernel-optimised gradient-influence data selection (ICONS)",
        python_requires=">=3.10",
        # every subpackage of icons_fast, plus kernels/ installed as icons_fast.kernels
        packages=find_packages(include=["icons_fast", "icons_fast.*"]) + ["icons_fast.kernels"],
        package_dir={"icons_fast.kernels": "kernels"},
        ext_modules=[] if _flag("ICONS_FAST_SKIP_EXT") else [cpu_extension()],
        cmdclass={"build_ext": BuildExt},
        install_requires=[
            "torch>=2.4",
            "transformers>=4.45",
            "peft>=0.12",
            "numpy",
            "safetensors",
            "pillow",
            "matplotlib",
            "pyyaml",
            "tqdm",
        ],
        extras_require={
            "cpu": ["faiss-cpu", "triton"],
            "gpu": ["faiss-gpu-cu12", "triton"],
            "test": ["pytest"],
            "formats": ["datasets==5.2.0"],  # parquet / arrow pools and hub dataset ids
        },
        entry_points={"console_scripts": ["icons-fast=icons_fast.cli:main"]},
    )
