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
