"""Warmup / fine-tune checkpoint format.

A LoRA checkpoint directory ``checkpoint-<step>/`` holds:

- ``adapter/``: the PEFT adapter (``adapter_model.safetensors`` + ``adapter_config.json``),
  loadable with ``PeftModel.from_pretrained(base, ckpt/"adapter")``;
- ``optimizer_moments.safetensors``: AdamW's ``exp_avg`` and ``exp_avg_sq`` for every
  trainable parameter, keys ``"exp_avg/<param name>"`` and ``"exp_avg_sq/<param name>"``
  with the names of ``model.named_parameters()`` (so they line up with the
  per-sample gradients, whatever the optimizer's internal order);
- ``state.json``: ``step``, ``lr`` (the learning rate of the last optimizer step, the
  checkpoint weight of design section 2 step 6), ``epoch``, ``samples_seen``,
  ``lora_fingerprint``, ``base_model`` and ``param_names``.

A full fine-tune checkpoint (``--full-finetune``) holds ``model/`` (``save_pretrained``
of the whole model and processor) and ``state.json``.
"""
from __future__ import annotations

import json
import os
import re
import shutil

import torch
from safetensors.torch import load_file, save_file

from icons_fast.fileio import atomic_json

MOMENTS_FILE = "optimizer_moments.safetensors"
STATE_FILE = "state.json"


def optimizer_moments(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, dict[str, torch.Tensor]]:
    """``{"exp_avg": {name: T}, "exp_avg_sq": {name: T}}`` keyed by parameter name.

    Parameters the optimizer has not stepped yet get zero moments.
    """
    out: dict[str, dict[str, torch.Tensor]] = {"exp_avg": {}, "exp_avg_sq": {}}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        state = optimizer.state.get(p, {})
        for key in out:
            t = state.get(key)
            out[key][name] = (t if t is not None else torch.zeros_like(p)).detach().float().cpu().contiguous()
    return out


def save_lora_checkpoint(
    out_dir: str, model, optimizer, step: int, lr: float, epoch: float, samples_seen: int, extra: dict | None = None
) -> str:
    """Write a LoRA checkpoint atomically (into a temp dir, then rename)."""
    from icons_fast.model.lora import lora_fingerprint

    final = os.path.join(out_dir, f"checkpoint-{step}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    model.save_pretrained(os.path.join(tmp, "adapter"))
    moments = optimizer_moments(model, optimizer)
    flat = {f"{k}/{n}": t for k, d in moments.items() for n, t in d.items()}
    save_file(flat, os.path.join(tmp, MOMENTS_FILE))
    state = {
        "step": step,
        "lr": lr,
        "epoch": epoch,
        "samples_seen": samples_seen,
        "lora_fingerprint": lora_fingerprint(model),
        "param_names": list(moments["exp_avg"]),
        **(extra or {}),
    }
    atomic_json(os.path.join(tmp, STATE_FILE), state, sort_keys=True)
    old = final + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(final):  # keep the previous one until the new one is in place
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint_state(ckpt_dir: str) -> dict:
    path = os.path.join(ckpt_dir, STATE_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{ckpt_dir} is not a complete checkpoint (no {STATE_FILE}); rerun warmup")
    with open(path) as f:
        return json.load(f)


def load_moments(ckpt_dir: str) -> dict[str, dict[str, torch.Tensor]]:
    """Read ``optimizer_moments.safetensors`` back into ``{"exp_avg": {...}, "exp_avg_sq": {...}}``."""
    flat = load_file(os.path.join(ckpt_dir, MOMENTS_FILE))
    out: dict[str, dict[str, torch.Tensor]] = {"exp_avg": {}, "exp_avg_sq": {}}
    for key, t in flat.items():
        kind, name = key.split("/", 1)
        out[kind][name] = t
    return out


def list_checkpoints(warmup_dir: str) -> list[str]:
    """Complete checkpoint directories under ``warmup_dir``, by step."""
    if not os.path.isdir(warmup_dir):
        return []
    found = []
    for entry in os.listdir(warmup_dir):
        path = os.path.join(warmup_dir, entry)
        m = re.fullmatch(r"checkpoint-(\d+)", entry)  # not .tmp / .old leftovers
        if m and os.path.exists(os.path.join(path, STATE_FILE)):
            found.append((int(m.group(1)), path))
    return [p for _, p in sorted(found)]


def checkpoint_sha256(ckpt_dir: str) -> str:
    """sha256 over the adapter weights and the optimizer moments: what featurize depends on."""
    import hashlib

    from icons_fast.fileio import file_sha256

    parts = [file_sha256(os.path.join(ckpt_dir, "adapter", "adapter_model.safetensors")),
             file_sha256(os.path.join(ckpt_dir, MOMENTS_FILE))]
    return hashlib.sha256("".join(parts).encode()).hexdigest()


def load_lora_checkpoint(base_model, ckpt_dir: str):
    """Attach the checkpoint's adapter to ``base_model`` with the LoRA parameters trainable."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(base_model, os.path.join(ckpt_dir, "adapter"), is_trainable=True)
    return model
