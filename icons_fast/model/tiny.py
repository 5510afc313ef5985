"""A tiny LLaVA (small CLIP vision tower + small Llama) built from configs.

No weights or tokenizers can be downloaded, so tests, the demo and CPU
benchmarks use this model. It is saved with ``save_pretrained`` in the
llava-hf layout and loaded back through the same ``from_pretrained`` path a
real LLaVA-1.5 checkpoint takes, so the real loading code is what runs.

The tokenizer is a byte-level BPE trained on a fixed, built-in corpus
(deterministic, no unknown tokens, exact decoding).
"""
from __future__ import annotations

import os

import torch

TINY_SIZES = {
    # name: (vision hidden, vision layers, image size, patch, text hidden, text layers, heads, kv heads, mlp)
    "tiny": dict(v_hidden=32, v_layers=2, image_size=32, patch=8, hidden=64, layers=2, heads=4, kv_heads=2, mlp=128),
    "small": dict(v_hidden=64, v_layers=2, image_size=32, patch=8, hidden=256, layers=4, heads=8, kv_heads=4, mlp=688),
}
IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN]
VOCAB_SIZE = 512

_CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "USER: ASSISTANT: What color is the shape? What shape is shown? How many shapes are there?",
    "Where is the shape? Is it on the left or the right, the top or the bottom?",
    "red green blue yellow purple orange white black gray circle square triangle star",
    "left right top bottom center one two three four five six seven eight nine zero",
    "Answer the question using a single word or phrase. yes no",
    "Describe the image. The image shows a small shape on a plain background.",
    "What is the sum of two numbers? Count the objects. Name the color of the largest shape.",
    "0 1 2 3 4 5 6 7 8 9 . , ? ! : ; ' \" ( ) - + = / * % & # @",
]


def build_tokenizer():
    """Byte-level BPE tokenizer (vocab 512) wrapped as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="right",
    )


def build_tiny_llava(out_dir: str, size: str = "tiny", seed: int = 0) -> str:
    """Build, save and return the directory of a randomly initialised tiny LLaVA.

    The directory holds the model (safetensors), the tokenizer and the image
    processor, loadable with ``icons_fast.model.load_model(out_dir)``.
    Rebuilding with the same ``size`` and ``seed`` gives the same weights.
    """
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    if size not in TINY_SIZES:
        raise ValueError(f"unknown tiny model size {size!r}; choose from {sorted(TINY_SIZES)}")
    s = TINY_SIZES[size]
    tokenizer = build_tokenizer()
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    n_patches = (s["image_size"] // s["patch"]) ** 2
    vision = CLIPVisionConfig(
        hidden_size=s["v_hidden"],
        intermediate_size=4 * s["v_hidden"],
        num_hidden_layers=s["v_layers"],
        num_attention_heads=2,
        image_size=s["image_size"],
        patch_size=s["patch"],
        projection_dim=s["v_hidden"],
    )
    text = LlamaConfig(
        hidden_size=s["hidden"],
        intermediate_size=s["mlp"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"],
        vocab_size=len(tokenizer),
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        image_seq_length=n_patches,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    mean = [0.48145466, 0.4578275, 0.40821073]
    std = [0.26862954, 0.26130258, 0.27577711]
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": s["image_size"]},
        crop_size={"height": s["image_size"], "width": s["image_size"]},
        image_mean=mean,
        image_std=std,
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=s["patch"],
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir
