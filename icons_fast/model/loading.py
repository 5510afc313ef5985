"""Load a model and its processor from a local directory (or build the tiny one).

Supported:
- a llava-hf ``LlavaForConditionalGeneration`` directory (config ``model_type``
  "llava"): model + ``AutoProcessor`` (tokenizer + image processor);
- any causal LM directory: ``AutoModelForCausalLM`` + ``AutoTokenizer`` (text only);
- ``"tiny"`` / ``"small"``: a tiny LLaVA built from configs, saved to a cache
  directory and loaded back through ``from_pretrained`` like a real one.

A Hugging Face id (``llava-hf/llava-1.5-7b-hf``) is fetched into, or found in,
the user's Hugging Face cache (``resolve_model_source``); anything else that is
not a local directory raises with the fix.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch

from icons_fast.model.tiny import TINY_SIZES, build_tiny_llava

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    """A model with what the data layer needs to feed it."""

    model: Any  # nn.Module (possibly PEFT-wrapped later)
    processor: Any  # LlavaProcessor, or a tokenizer for text-only models
    path: str  # the directory it was loaded from
    is_llava: bool

    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)


def default_cache_dir() -> str:
    return os.environ.get("ICONS_FAST_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "icons_fast"))


def resolve_model_dir(model: str, seed: int = 0) -> str:
    """Directory of ``model``: builds and caches the tiny model for "tiny"/"small"."""
    if model in TINY_SIZES:
        out = os.path.join(default_cache_dir(), f"{model}-llava-seed{seed}")
        if not os.path.exists(os.path.join(out, "config.json")):
            tmp = out + f".tmp{os.getpid()}"
            build_tiny_llava(tmp, size=model, seed=seed)
            if os.path.exists(out):  # another process won the race
                import shutil

                shutil.rmtree(tmp, ignore_errors=True)
            else:
                os.replace(tmp, out)
        return out
    model, _ = resolve_model_source(model)  # a hub id -> its snapshot in the Hugging Face cache
    if not os.path.exists(os.path.join(model, "config.json")):
        raise FileNotFoundError(f"{model!r} has no config.json; is it a Hugging Face model directory?")
    return model


def load_model(model: str, dtype: str = "float32", device: str | torch.device = "cpu", seed: int = 0) -> LoadedModel:
    """Load ``model`` (directory, "tiny" or "small") and its processor onto ``device``."""
    from transformers import AutoModelForCausalLM, AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration

    path = resolve_model_dir(model, seed=seed)
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {sorted(DTYPES)}")
    with open(os.path.join(path, "config.json")) as f:
        model_type = json.load(f).get("model_type")
    is_llava = model_type == "llava"
    if is_llava:
        net = LlavaForConditionalGeneration.from_pretrained(path, dtype=DTYPES[dtype])
        processor = AutoProcessor.from_pretrained(path)
    else:
        net = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
        processor = AutoTokenizer.from_pretrained(path)
        if processor.pad_token is None:
            processor.pad_token = processor.eos_token
    net.to(device)
    return LoadedModel(model=net, processor=processor, path=path, is_llava=is_llava)


# Files a model snapshot needs: configs, tokenizer and processor files, chat templates, weights.
MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja", "*.py"]
HUB_MODEL_ID = r"^[A-Za-z0-9][\w.-]*/[\w.-]+$"


def resolve_model_source(name: str) -> tuple[str, bool]:
    """``(local directory, is_hub)`` for a model directory or a Hugging Face model id.

    A hub id ``owner/name`` (not an existing local path) is resolved by
    ``huggingface_hub.snapshot_download``, the cache and download code
    ``from_pretrained`` itself uses: the user's cache (``HF_HOME`` /
    ``HF_HUB_CACHE``) and offline setting (``HF_HUB_OFFLINE=1``: the cached
    snapshot or an error) apply unchanged, and the returned directory is the
    snapshot of one revision, so a run's fingerprint changes when the hub
    revision does. Weights: ``*.safetensors``, falling back to ``*.bin`` for
    repositories that have no safetensors. Failing to reach the hub raises one
    ``ConnectionError`` line naming ``HF_HUB_OFFLINE`` and local directories.
    """
    import re

    if os.path.isdir(name):
        return name, False
    if not re.match(HUB_MODEL_ID, name) or os.path.exists(name):
        raise FileNotFoundError(
            f"model {name!r} is neither a local directory nor a Hugging Face id (owner/name): pass a llava-hf "
            f"or causal-LM directory saved with save_pretrained, a hub id, or 'tiny' / 'small' for the built-in "
            f"test model."
        )
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(repo_id=name, allow_patterns=MODEL_FILES)
        if not any(f.endswith(".safetensors") for f in os.listdir(path)):
            path = snapshot_download(repo_id=name, allow_patterns=MODEL_FILES + ["*.bin"])
    except Exception as exc:  # noqa: BLE001 - network, offline-cache and auth errors all get the same advice
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ConnectionError(
            f"cannot load model {name!r} from the Hugging Face hub ({type(exc).__name__}: {first[:200]}); with no "
            f"network set HF_HUB_OFFLINE=1 to use the cached copy (HF_HOME), or pass a local directory saved with "
            f"save_pretrained"
        ) from None
    return path, True
