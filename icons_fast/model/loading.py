"""Load a model and its processor from a local directory (or build the tiny one).

Supported families (the config's ``model_type``, see :data:`VISION_FAMILIES`):
- ``llava`` (LLaVA-1.5, llava-hf layout): ``LlavaForConditionalGeneration`` + ``AutoProcessor``;
- ``qwen2_vl`` / ``qwen2_5_vl``, ``llava_next`` / ``llava_onevision``, ``idefics3`` /
  ``smolvlm``: ``AutoModelForImageTextToText`` + the tokenizer and image processor;
- any other config: a causal LM (Llama, Qwen2.5, Mistral, ...) through
  ``AutoModelForCausalLM`` + ``AutoTokenizer`` (text only);
- ``"tiny"`` / ``"small"``: a tiny LLaVA built from configs, saved to a cache
  directory and loaded back through ``from_pretrained`` like a real one
  (``icons_fast.model.tiny.build_tiny_family`` builds the other families' tiny models).

Each loaded model carries its family and its chat template (``chat_template``
of the processor or tokenizer files; None when it has none), which the data
layer's ``--template auto`` reads.

A Hugging Face id (``llava-hf/llava-1.5-7b-hf``) is fetched into, or found in,
the user's Hugging Face cache (``resolve_model_source``); anything else that is
not a local directory raises with the fix.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from icons_fast.fileio import cache_dir
from icons_fast.model.tiny import TINY_SIZES, build_tiny_llava

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# model_type -> the family name the data layer knows (its image expansion and batching rule).
VISION_FAMILIES = {
    "llava": "llava",
    "qwen2_vl": "qwen2_vl",
    "qwen2_5_vl": "qwen2_vl",  # same inputs: patches + image_grid_thw, multimodal rotary positions
    "llava_next": "llava_next",
    "llava_onevision": "llava_onevision",
    "idefics3": "idefics3",
    "smolvlm": "idefics3",  # SmolVLM is Idefics3's architecture
}
TEXT_FAMILY = "causal_lm"


@dataclass
class LoadedModel:
    """A model with what the data layer needs to feed it."""

    model: Any  # nn.Module (possibly PEFT-wrapped later)
    processor: Any  # LlavaProcessor / ProcessorParts, or a tokenizer for text-only models
    path: str  # the directory it was loaded from
    family: str = "llava"  # a value of VISION_FAMILIES, or TEXT_FAMILY
    chat_template: str | None = None  # the model's own template (jinja), None when it has none

    @property
    def is_llava(self) -> bool:
        """LLaVA-1.5 (family "llava")."""
        return self.family == "llava"

    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)


@dataclass
class ProcessorParts:
    """A tokenizer and an image processor, loaded on their own.

    Used when ``AutoProcessor`` cannot be built: ``Qwen2VLProcessor`` and
    ``LlavaOnevisionProcessor`` also build a video processor, which needs
    torchvision; featurizing images needs only these two parts.
    """

    tokenizer: Any
    image_processor: Any

    def save_pretrained(self, path: str) -> None:
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)


def resolve_model_dir(model: str, seed: int = 0) -> str:
    """Directory of ``model``: builds and caches the tiny model for "tiny"/"small"."""
    if model in TINY_SIZES:
        out = os.path.join(cache_dir(), f"{model}-llava-seed{seed}")
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
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoProcessor,
        AutoTokenizer,
        LlavaForConditionalGeneration,
    )

    path = resolve_model_dir(model, seed=seed)
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {sorted(DTYPES)}")
    with open(os.path.join(path, "config.json")) as f:
        model_type = json.load(f).get("model_type")
    family = VISION_FAMILIES.get(model_type, TEXT_FAMILY)
    if family == "llava":
        net = LlavaForConditionalGeneration.from_pretrained(path, dtype=DTYPES[dtype])
        processor = AutoProcessor.from_pretrained(path)
    elif family != TEXT_FAMILY:
        net = AutoModelForImageTextToText.from_pretrained(path, dtype=DTYPES[dtype])
        processor = _vision_processor(path)
    else:
        net = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
        processor = AutoTokenizer.from_pretrained(path)
    tokenizer = getattr(processor, "tokenizer", processor)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    net.to(device)
    return LoadedModel(model=net, processor=processor, path=path, family=family,
                       chat_template=chat_template_of(processor, path))


def _vision_processor(path: str):
    """``AutoProcessor`` of ``path``, or its tokenizer and image processor when the full processor cannot be built."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    try:
        return AutoProcessor.from_pretrained(path)
    except (ImportError, AttributeError, ValueError, OSError, TypeError) as exc:
        # without torchvision the video processor of Qwen2-VL / LLaVA-OneVision fails to build
        log.info("%s: AutoProcessor unavailable (%s: %s); loading the tokenizer and image processor",
                 path, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        return ProcessorParts(AutoTokenizer.from_pretrained(path), AutoImageProcessor.from_pretrained(path))


def chat_template_of(processor, path: str) -> str | None:
    """The model's chat template: the processor's, the tokenizer's, or ``chat_template.jinja/.json`` in ``path``."""
    tokenizer = getattr(processor, "tokenizer", processor)
    for owner in (processor, tokenizer):
        template = getattr(owner, "chat_template", None)
        if isinstance(template, str) and template:
            return template
    jinja = os.path.join(path, "chat_template.jinja")
    if os.path.exists(jinja):
        with open(jinja, encoding="utf-8") as f:
            return f.read()
    js = os.path.join(path, "chat_template.json")
    if os.path.exists(js):
        with open(js, encoding="utf-8") as f:
            return json.load(f).get("chat_template")
    return None


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
