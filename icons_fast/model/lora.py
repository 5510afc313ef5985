"""LoRA placement: the language model's linear layers only.

A PEFT target list such as ``["q_proj", ...]`` also matches the CLIP vision
tower (its attention has q/k/v_proj too). ICONS (LLaVA-1.5 LoRA recipe) adapts
only the language model, so the target is a regular expression that excludes
the vision tower, the multimodal projector and ``lm_head``.
"""
from __future__ import annotations

import hashlib
import json
import re

import torch

from icons_fast.config import ModelConfig

EXCLUDED_PARTS = ("vision_tower", "multi_modal_projector", "vision_model", "lm_head")


def lora_target_regex(module_names: list[str]) -> str:
    """Regex (PEFT fullmatch) for modules ending in one of ``module_names`` outside the vision parts."""
    alternatives = "|".join(re.escape(n) for n in module_names)
    excluded = "|".join(EXCLUDED_PARTS)
    return rf"^(?!.*(?:{excluded})).*\.(?:{alternatives})$"


def attach_lora(model: torch.nn.Module, cfg: ModelConfig | None = None, **overrides):
    """Wrap ``model`` with PEFT LoRA adapters on the language model's linear layers.

    Defaults follow LLaVA-1.5 LoRA: r=128, alpha=256, dropout=0.05 on
    q/k/v/o/gate/up/down. Only the LoRA parameters stay trainable.
    """
    from peft import LoraConfig, get_peft_model

    cfg = cfg or ModelConfig()
    r = overrides.get("r", cfg.lora_r)
    alpha = overrides.get("alpha", cfg.lora_alpha)
    dropout = overrides.get("dropout", cfg.lora_dropout)
    targets = overrides.get("targets", cfg.lora_targets)
    lora_cfg = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=lora_target_regex(list(targets)),
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lora_cfg)
    placed = [n for n, _ in lora_modules(peft_model)]
    if not placed:
        raise ValueError(f"no LoRA module was placed: no linear layer named {targets} outside {EXCLUDED_PARTS}")
    return peft_model


def lora_modules(model: torch.nn.Module):
    """``(name, module)`` of every PEFT LoRA linear layer, in ``named_modules`` order."""
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def trainable_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """Trainable parameters in ``model.named_parameters()`` order (the feature layout)."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def lora_fingerprint(model: torch.nn.Module) -> str:
    """sha256 (16 hex) of the trainable parameter names, shapes and LoRA scalings."""
    desc = [(n, list(p.shape)) for n, p in trainable_parameters(model)]
    scal = [(n, {k: float(v) for k, v in m.scaling.items()}) for n, m in lora_modules(model)]
    blob = json.dumps([desc, scal], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
