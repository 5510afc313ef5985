"""Build icons-fast: the Python package, the Triton kernels (installed as
``icons_fast.kernels``) and the pybind11 extension ``icons_fast._C``.

The extension's C++17 CPU path (OpenMP) is always built. It takes raw
pointers, shapes and dtypes from the Python wrappers, so it is not tied to
one torch build.
"""
import os
import sys

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

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


setup(
    name="icons-fast",
    version="0.1.0",
    description="GPU-kernel-optimised gradient-influence data selection (ICONS)",
    python_requires=">=3.10",
    packages=[
        "icons_fast",
        "icons_fast.data",
        "icons_fast.model",
        "icons_fast.train",
        "icons_fast.features",
        "icons_fast.select",
        "icons_fast.ops",
        "icons_fast.compat",
        "icons_fast.kernels",
    ],
    package_dir={"icons_fast.kernels": "kernels"},
    ext_modules=[cpu_extension()],
    cmdclass={"build_ext": build_ext},
    install_requires=[
        "torch>=2.4",
        "transformers>=4.45",
        "peft>=0.12",
        "numpy",
        "safetensors",
        "pillow",
        "pyyaml",
        "tqdm",
    ],
    extras_require={
        "cpu": ["faiss-cpu", "triton"],
        "gpu": ["faiss-gpu-cu12", "triton"],
        "test": ["pytest"],
    },
    entry_points={"console_scripts": ["icons-fast=icons_fast.cli:main"]},
)
