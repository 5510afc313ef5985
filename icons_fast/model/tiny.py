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


def build_tokenizer(extra_special: tuple[str, ...] = (), **token_names):
    """Byte-level BPE tokenizer (vocab 512) wrapped as a ``PreTrainedTokenizerFast``.

    ``extra_special``: more special tokens (a chat template's markers), added
    after the built-in ones so the built-in ids do not move. ``token_names``
    override the bos/eos/pad names (e.g. ``eos_token="<|im_end|>"``).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS + [t for t in extra_special if t not in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    names = dict(unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    names.update(token_names)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="right",
        **names,
    )


def build_tiny_llava(out_dir: str, size: str = "tiny", seed: int = 0) -> str:
    """Build, save and return the directory of a randomly initialised tiny LLaVA.

    The directory holds the model (safetensors), the tokenizer and the image
    processor, loadable with ``icons_fast.model.loading.load_model(out_dir)``.
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


# ---------------------------------------------------------------------------------------------
# Tiny random models of the other families (issue 15): each built from a config, saved with
# save_pretrained (model, tokenizer with its chat template, image processor) and loaded back by
# icons_fast.model.loading like a real checkpoint. Hidden size 32-64, 1-2 layers.

# Chat templates written for the tiny models, one per template style the families use. Each
# takes content as a string or as a list of parts ({"type": "image"} / {"type": "text"}).
_CONTENT = ("{%- if m['content'] is string -%}{{ m['content'] }}{%- else -%}{%- for p in m['content'] -%}"
            "{%- if p['type'] == 'image' -%}IMAGE{%- else -%}{{ p['text'] }}{%- endif -%}{%- endfor -%}{%- endif -%}")
NL = "{{ '\\n' }}"  # a newline the template engine's whitespace trimming cannot eat
CHAT_TEMPLATES = {
    # ChatML (Qwen2.5, Qwen2-VL): <|im_start|>role\ncontent<|im_end|>\n
    "chatml": ("{%- for m in messages -%}<|im_start|>{{ m['role'] }}" + NL + _CONTENT + "<|im_end|>" + NL
               + "{%- endfor -%}{%- if add_generation_prompt -%}<|im_start|>assistant" + NL + "{%- endif -%}"),
    # Llama-3 headers: <|begin_of_text|><|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>
    "llama3": ("{{- bos_token -}}{%- for m in messages -%}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
               + NL + NL + _CONTENT + "<|eot_id|>{%- endfor -%}{%- if add_generation_prompt -%}"
               "<|start_header_id|>assistant<|end_header_id|>" + NL + NL + "{%- endif -%}"),
    # Mistral: <s>[INST] user [/INST] answer</s>
    "mistral": ("{{- bos_token -}}{%- for m in messages -%}{%- if m['role'] == 'user' -%}[INST]{{ ' ' }}" + _CONTENT
                + "{{ ' ' }}[/INST]{%- else -%}{{ ' ' }}" + _CONTENT + "{{ eos_token }}{%- endif -%}{%- endfor -%}"),
    # Idefics3 / SmolVLM: User:content<end_of_utterance>\nAssistant: answer<end_of_utterance>\n
    "idefics3": ("{{- bos_token -}}{%- for m in messages -%}{{ m['role'] | capitalize }}:"
                 "{%- if m['role'] == 'assistant' -%}{{ ' ' }}{%- endif -%}" + _CONTENT + "<end_of_utterance>" + NL
                 + "{%- endfor -%}{%- if add_generation_prompt -%}Assistant:{%- endif -%}"),
}

# family: (chat template style, its special tokens, the string the template writes for an image)
FAMILY_TOKENS = {
    "qwen2": ("chatml", ("<|im_start|>", "<|im_end|>"), None),
    "llama": ("llama3", ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), None),
    "mistral": ("mistral", ("[INST]", "[/INST]"), None),
    "qwen2_vl": ("chatml", ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                            "<|video_pad|>"), "<|vision_start|><|image_pad|><|vision_end|>"),
    "qwen2_5_vl": ("chatml", ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                              "<|video_pad|>"), "<|vision_start|><|image_pad|><|vision_end|>"),
    "llava_next": ("chatml", ("<|im_start|>", "<|im_end|>"), IMAGE_TOKEN),
    "llava_onevision": ("chatml", ("<|im_start|>", "<|im_end|>"), IMAGE_TOKEN),
    "idefics3": ("idefics3", ("<end_of_utterance>", "<fake_token_around_image>", "<global-img>")
                 + tuple(f"<row_{r}_col_{c}>" for r in range(1, 5) for c in range(1, 5)), IMAGE_TOKEN),
}
TINY_FAMILIES = tuple(FAMILY_TOKENS)


def family_tokenizer(family: str):
    """The tiny tokenizer with ``family``'s special tokens and chat template."""
    style, extra, image_text = FAMILY_TOKENS[family]
    names = {"qwen2": dict(bos_token="<s>", eos_token="<|im_end|>"),
             "qwen2_vl": dict(eos_token="<|im_end|>"), "qwen2_5_vl": dict(eos_token="<|im_end|>"),
             "llama": dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")}.get(family, {})
    tok = build_tokenizer(extra, **names)
    tok.chat_template = CHAT_TEMPLATES[style].replace("IMAGE", image_text or "")
    return tok


def _text_config(cls, tok, hidden=64, layers=2, heads=4, kv_heads=2, mlp=128, **extra):
    return cls(hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers, num_attention_heads=heads,
               num_key_value_heads=kv_heads, vocab_size=len(tok), max_position_embeddings=4096,
               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
               tie_word_embeddings=False, **extra)


def build_tiny_family(out_dir: str, family: str, seed: int = 0) -> str:
    """Build, save and return the directory of a random tiny model of ``family``.

    Families: ``llama``, ``qwen2``, ``mistral`` (text-only chat LMs, ``AutoModelForCausalLM``),
    ``qwen2_vl`` / ``qwen2_5_vl`` (dynamic resolution: patches + ``image_grid_thw``,
    multimodal rotary positions), ``llava_next`` / ``llava_onevision`` (any-resolution tiles + ``image_sizes``),
    ``idefics3`` (image splitting). The directory holds the model, the tokenizer with its
    chat template and, for vision families, the image processor; nothing is downloaded.
    """
    import transformers as tf

    if family not in FAMILY_TOKENS:
        raise ValueError(f"unknown tiny family {family!r}; choose from {', '.join(TINY_FAMILIES)}")
    tok = family_tokenizer(family)
    torch.manual_seed(seed)
    image_processor = processor = None
    if family in ("llama", "qwen2", "mistral"):
        cls = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config, "mistral": tf.MistralConfig}[family]
        model = tf.AutoModelForCausalLM.from_config(_text_config(cls, tok))
    elif family in ("qwen2_vl", "qwen2_5_vl"):
        ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                                                         "<|vision_end|>")}
        if family == "qwen2_vl":
            vision = dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, patch_size=4, spatial_merge_size=2,
                          temporal_patch_size=2)
        else:  # Qwen2.5-VL's vision blocks have gate/up/down_proj too (what the LoRA exclusion must skip)
            vision = dict(depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=64, num_heads=2, patch_size=4,
                          spatial_merge_size=2, temporal_patch_size=2, window_size=16, fullatt_block_indexes=[1])
        config = (tf.Qwen2VLConfig if family == "qwen2_vl" else tf.Qwen2_5_VLConfig)(
            text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=4096,
                             rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3]},
                             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id),
            vision_config=vision,
            image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
            tie_word_embeddings=False,
        )
        model = tf.AutoModelForImageTextToText.from_config(config)
        # 8x8-pixel units (patch 4, merge 2): a 24x16 image is 6x4 patches, 6 tokens
        image_processor = tf.Qwen2VLImageProcessor(patch_size=4, merge_size=2, temporal_patch_size=2,
                                                   min_pixels=8 * 8, max_pixels=32 * 32)
    elif family in ("llava_next", "llava_onevision"):
        # 16x16 base tiles of 8x8 patches (4 per tile); a grid of up to 2x2 tiles by aspect ratio
        pinpoints = [[16, 32], [32, 16], [32, 32]]
        image_token_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
        text = _text_config(tf.Qwen2Config, tok).to_dict()
        if family == "llava_next":
            vision = tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                         image_size=16, patch_size=8, projection_dim=32)
            config = tf.LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=image_token_id,
                                        image_grid_pinpoints=pinpoints, vision_feature_layer=-1,
                                        vision_feature_select_strategy="default", image_seq_length=4)
            model = tf.LlavaNextForConditionalGeneration(config)
            image_processor = tf.LlavaNextImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16},
                                                         image_grid_pinpoints=pinpoints)
            processor = tf.LlavaNextProcessor(image_processor=image_processor, tokenizer=tok, patch_size=8,
                                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                              chat_template=tok.chat_template)
        else:
            vision = tf.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=16, patch_size=8)
            config = tf.LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_index=image_token_id,
                                             image_grid_pinpoints=pinpoints, vision_feature_layer=-1,
                                             vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9")
            model = tf.LlavaOnevisionForConditionalGeneration(config)
            image_processor = tf.LlavaOnevisionImageProcessor(size={"height": 16, "width": 16},
                                                              image_grid_pinpoints=pinpoints)
            processor = None
    elif family == "idefics3":
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                      patch_size=4)
        config = tf.Idefics3Config(vision_config=vision, text_config=_text_config(tf.LlamaConfig, tok).to_dict(),
                                   image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN), scale_factor=2,
                                   tie_word_embeddings=False)
        model = tf.Idefics3ForConditionalGeneration(config)
        # images resized to a longest edge of 32 and split into 16x16 crops (+ the whole image at 16x16);
        # each crop is (16/4)^2 / 2^2 = 4 tokens
        image_processor = tf.Idefics3ImageProcessor(do_image_splitting=True, size={"longest_edge": 32},
                                                    max_image_size={"longest_edge": 16})
        processor = tf.Idefics3Processor(image_processor=image_processor, tokenizer=tok, image_seq_len=4,
                                         chat_template=tok.chat_template)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    if processor is not None:
        processor.save_pretrained(out_dir)
    elif image_processor is not None:
        image_processor.save_pretrained(out_dir)
    return out_dir
