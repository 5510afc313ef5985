"""Load a model and its processor from a local directory (or build the tiny one).

Supported:
- a llava-hf ``LlavaForConditionalGeneration`` directory (config ``model_type``
  "llava"): model + ``AutoProcessor`` (tokenizer + image processor);
- any causal LM directory: ``AutoModelForCausalLM`` + ``AutoTokenizer`` (text only);
- ``"tiny"`` / ``"small"``: a tiny LLaVA built from configs, saved to a cache
  directory and loaded back through ``from_pretrained`` like a real one.

Nothing is downloaded: a path that is not a local directory raises with the fix.
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
    if not os.path.isdir(model):
        raise FileNotFoundError(
            f"model {model!r} is not a local directory. icons-fast never downloads weights: pass a llava-hf "
            f"or causal-LM directory saved with save_pretrained, or 'tiny' / 'small' for the built-in test model."
        )
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
