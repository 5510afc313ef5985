"""What a batch hands the model, and the per-sample loss every stage agrees on.

``MODEL_INPUT_KEYS``: the batch keys passed to the model's forward (the
collator adds ``labels`` and bookkeeping keys that the forward must not see).

``per_sample_losses``: the loss of sample ``z`` is the mean next-token
cross-entropy over its answer tokens (labels ``!= -100``), design.md section
2.2. Training, evaluation and the per-sample gradients all use this one form.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Every family's image tensors (icons_fast.data.collate's batch layout): LLaVA pixel_values;
# Qwen2-VL patches + image_grid_thw (the model builds its multimodal rotary positions from them
# the image-token types and the attention mask); LLaVA-NeXT/OneVision tiles + image_sizes; Idefics3 crops +
# pixel_attention_mask. Text-only chat LMs take input_ids and attention_mask.
MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "image_sizes",
                    "pixel_attention_mask", "mm_token_type_ids", "position_ids")


def per_sample_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy per sample over its unmasked label tokens.

    logits: [B, T, V]; labels: [B, T] with -100 for ignored tokens.
    Returns float32 [B]. A sample with no label token raises (the data layer
    records such samples before they reach a batch).
    """
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    tok = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=-100, reduction="none"
    ).view(shift_labels.shape)
    counts = (shift_labels != -100).sum(dim=1)
    if bool((counts == 0).any()):
        bad = (counts == 0).nonzero().flatten().tolist()
        raise ValueError(f"batch rows {bad} have no label token (every label is -100); exclude them before featurizing")
    return tok.sum(dim=1) / counts
