"""LoRA placement: the language model's linear layers only.

A PEFT target list such as ``["q_proj", ...]`` also matches the CLIP vision
tower (its attention has q/k/v_proj too), and Qwen2.5-VL's vision blocks have
gate/up/down_proj. ICONS (LLaVA-1.5 LoRA recipe) adapts only the language
model, so the target is a regular expression that excludes each family's
vision, projector and head modules by name:

    family              vision              projector / merger            language model
    LLaVA-1.5/NeXT/OV   vision_tower        multi_modal_projector         language_model
    Qwen2-VL/2.5-VL     visual              visual.merger                 language_model
    Idefics3/SmolVLM    vision_model        connector                     text_model
    causal LMs          -                   -                             model.layers

``lm_head`` is excluded everywhere; :func:`check_lora_placement` verifies after
placement that no excluded module got an adapter and, for a vision-language
model, that every adapter sits inside its language model.
"""
from __future__ import annotations

import hashlib
import json
import re

import torch

from icons_fast.config import ModelConfig

EXCLUDED_PARTS = ("vision_tower", "multi_modal_projector", "vision_model", "visual", "merger", "connector",
                  "lm_head")
LANGUAGE_MODEL_PARTS = ("language_model", "text_model")  # where a vision-language model keeps its LM


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
    has_vision = getattr(model.config, "vision_config", None) is not None
    peft_model = get_peft_model(model, lora_cfg)
    check_lora_placement([n for n, _ in lora_modules(peft_model)], has_vision, targets)
    return peft_model


def check_lora_placement(names: list[str], has_vision: bool, targets=()) -> None:
    """Raise ``ValueError`` unless the LoRA modules ``names`` are all in the language model.

    None may contain a vision, projector/merger/connector or head part
    (:data:`EXCLUDED_PARTS`); with ``has_vision`` each must lie under the
    language model (:data:`LANGUAGE_MODEL_PARTS`). An empty list is refused too.
    """
    if not names:
        raise ValueError(f"no LoRA module was placed: no linear layer named {list(targets)} outside {EXCLUDED_PARTS}")
    for name in names:
        parts = name.split(".")
        bad = [p for p in EXCLUDED_PARTS if p in parts]
        if bad or (has_vision and not any(p in parts for p in LANGUAGE_MODEL_PARTS)):
            why = f"it is in {bad[0]}" if bad else f"its name has none of {LANGUAGE_MODEL_PARTS}"
            raise ValueError(f"LoRA adapter on {name}, outside the language model ({why}); only the language "
                             f"model's linear layers may be adapted (check model.lora_targets)")


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
