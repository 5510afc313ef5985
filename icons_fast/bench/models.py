"""Benchmark model configurations, synthetic batches and analytic FLOPs.

Configurations (``BENCH_CONFIGS``):

- ``tiny``: the test model (hidden 64, 2 layers), CI smoke.
- ``small``: the CPU benchmark: hidden 256, 4 layers, mlp 688, sequences of 128
  tokens (16 image tokens), LoRA r=16 on all seven projections, k=5120.
- ``llava-7b-shape``: CLIP ViT-L/14-336 (1024 wide, 24 layers, 576 image tokens)
  + Llama-2-7B (hidden 4096, 32 layers, mlp 11008, 32 heads, vocab 32000), LoRA
  r=128 on all seven, k=5120, 1000 tokens per sample. Random bf16 weights built
  directly on the target device (never saved, never built on a CPU: ~7B params).
  ``layers`` can be reduced to fit a time budget; rates per layer scale.

Batches are synthetic and equal-length (``seq`` tokens, the image tokens first
after BOS, the last half of the text tokens as the answer), so every provider
sees the same samples and lengths.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from icons_fast.bench.args import CONFIG_NAMES
from icons_fast.config import LLAMA_LORA_TARGETS, ModelConfig


@dataclass
class BenchConfig:
    """One benchmark workload: model, LoRA, projection and batch shape."""

    name: str
    model: str  # "tiny" | "small" (built-in llava) | "llava-7b-shape"
    seq: int  # tokens per sample (image tokens included)
    lora_r: int
    proj_dim: int
    batch: int  # featurize / floor batch size
    baseline_samples: int  # samples the one-at-a-time baseline is timed on (a multiple of 16 = one projection)
    dtype: str = "float32"
    layers: int | None = None  # llava-7b-shape only: decoder layers (None = 32)
    vision_layers: int | None = None  # llava-7b-shape only: CLIP layers (None = 24)


BENCH_CONFIGS = {
    "tiny": BenchConfig("tiny", "tiny", seq=48, lora_r=4, proj_dim=256, batch=4, baseline_samples=16),
    "small": BenchConfig("small", "small", seq=128, lora_r=16, proj_dim=5120, batch=8, baseline_samples=16),
    "llava-7b-shape": BenchConfig("llava-7b-shape", "llava-7b-shape", seq=1000, lora_r=128, proj_dim=5120, batch=4,
                                  baseline_samples=16, dtype="bfloat16"),
}

assert tuple(BENCH_CONFIGS) == CONFIG_NAMES, "keep icons_fast.bench.args.CONFIG_NAMES in step"

# Llama-2-7B and CLIP ViT-L/14-336 dimensions (their published configs).
LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, rms_norm_eps=1e-5, max_position_embeddings=4096)
CLIP_L14_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    image_size=336, patch_size=14, projection_dim=768)


def get_config(name: str, **overrides) -> BenchConfig:
    """A copy of ``BENCH_CONFIGS[name]`` with ``overrides`` (None values ignored)."""
    if name not in BENCH_CONFIGS:
        raise ValueError(f"unknown benchmark config {name!r}; choose from {sorted(BENCH_CONFIGS)}")
    return dataclasses.replace(BENCH_CONFIGS[name], **{k: v for k, v in overrides.items() if v is not None})


def llava_7b_shape_config(layers: int | None = None, vision_layers: int | None = None, text: dict | None = None,
                          vision: dict | None = None):
    """``LlavaConfig`` with LLaVA-1.5-7B dimensions (``text`` / ``vision`` override them, e.g. for CPU tests)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    t = dict(LLAMA2_7B, **(text or {}))
    v = dict(CLIP_L14_336, **(vision or {}))
    if layers is not None:
        t["num_hidden_layers"] = layers
    if vision_layers is not None:
        v["num_hidden_layers"] = vision_layers
    n_patches = (v["image_size"] // v["patch_size"]) ** 2
    image_token = t["vocab_size"] - 1  # a real id inside the vocabulary, used only as the image placeholder
    return LlavaConfig(
        vision_config=CLIPVisionConfig(**v),
        text_config=LlamaConfig(**t, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False),
        image_token_index=image_token,
        image_seq_length=n_patches,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        pad_token_id=0,
    )


def build_random_llava(config, device: str | torch.device, dtype: torch.dtype, seed: int = 0):
    """``LlavaForConditionalGeneration`` with random weights allocated directly on ``device`` in ``dtype``.

    No CPU copy is made (``torch.device`` context + default dtype), so a 7B model
    goes straight to GPU memory; weights are N(0, 0.02) (the HF initialiser).
    """
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(old)
    return model.to(dtype)


def build_bench_model(cfg: BenchConfig, device: str | torch.device = "cpu", seed: int = 0,
                      llava_overrides: dict | None = None):
    """The PEFT-wrapped benchmark model (eval mode, LoRA B random so both gradients are non-zero).

    ``llava_overrides``: ``{"text": {...}, "vision": {...}}`` dims for ``llava-7b-shape``
    (tests shrink it to run the same code path on a CPU).
    """
    from icons_fast.model.loading import DTYPES, load_model
    from icons_fast.model.lora import attach_lora

    dtype = DTYPES[cfg.dtype]
    if cfg.model == "llava-7b-shape":
        lcfg = llava_7b_shape_config(cfg.layers, cfg.vision_layers, **(llava_overrides or {}))
        base = build_random_llava(lcfg, device, dtype, seed)
    else:
        base = load_model(cfg.model, cfg.dtype, device, seed=seed).model
    lora = ModelConfig(lora_r=cfg.lora_r, lora_alpha=2 * cfg.lora_r, lora_dropout=0.05,
                       lora_targets=list(LLAMA_LORA_TARGETS))
    torch.manual_seed(seed + 1)
    model = attach_lora(base, lora)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero, which would make every grad_A zero
                p.normal_(0, 0.02)
    model.eval()
    return model


def make_batch(model, batch: int, seq: int, seed: int = 0, device: str | torch.device | None = None) -> dict:
    """A synthetic LLaVA batch: ``input_ids / attention_mask / labels [batch, seq]``, ``pixel_values``.

    Each sample: BOS, the image placeholder tokens (``image_seq_length`` of them),
    text tokens; the last half of the text tokens are the answer (labels), the
    rest -100. Every sample has an image and ``seq`` tokens.
    """
    cfg = model.config
    n_img = int(cfg.image_seq_length)
    vocab = int(cfg.text_config.vocab_size)
    img_tok = int(cfg.image_token_index)
    if seq < n_img + 8:
        raise ValueError(f"seq={seq} leaves no room for text after {n_img} image tokens; use seq >= {n_img + 8}")
    device = device or next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, min(vocab, 30000) - 1, (batch, seq), generator=g)
    ids[ids == img_tok] = 5
    ids[:, 0] = 1
    ids[:, 1 : 1 + n_img] = img_tok
    labels = torch.full((batch, seq), -100, dtype=torch.long)
    n_text = seq - 1 - n_img
    ans0 = seq - n_text // 2
    labels[:, ans0:] = ids[:, ans0:]
    size = int(cfg.vision_config.image_size)
    pix = torch.randn(batch, 3, size, size, generator=g)
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones(batch, seq, dtype=torch.long, device=device),
        "labels": labels.to(device),
        "pixel_values": pix.to(device, dtype),
    }


def slice_batch(batch: dict, b: int) -> dict:
    """Sample ``b`` of a ``make_batch`` batch as a batch of one (every sample has one image)."""
    return {k: v[b : b + 1] for k, v in batch.items()}


def param_counts(model) -> dict:
    """Frozen base parameters of the language model / vision part and the LoRA parameter count ``P``."""
    lm = vis = lora = 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            lora += p.numel()
        elif "vision_tower" in name or "multi_modal_projector" in name:
            vis += p.numel()
        elif "embed_tokens" not in name:  # an embedding lookup costs no FLOPs
            lm += p.numel()
    return {"lm": lm, "vision": vis, "lora": lora}


def floor_flops(model, seq: int) -> float:
    """Analytic FLOPs per sample of a LoRA forward+backward (design section 6).

    ``4 * N_lm * T`` (forward ``2 N T`` + activation-gradient backward ``2 N T``
    through the language model, lm_head included) ``+ 2 * N_vision * n_img`` (the
    frozen vision tower runs forward only). Attention's ``T^2`` term and the LoRA
    weight-gradient are left out (small at these shapes).
    """
    c = param_counts(model)
    n_img = int(model.config.image_seq_length)
    return 4.0 * c["lm"] * seq + 2.0 * c["vision"] * n_img


def projection_flops(n_params: int, k: int) -> float:
    """FLOPs per sample of ``g @ R`` with ``R`` ``[P, k]``: ``2 P k``."""
    return 2.0 * n_params * k
