"""Model loading through from_pretrained and LoRA placement on the language model only."""
import pytest
import torch

from icons_fast.config import ModelConfig
from icons_fast.model.loading import load_model, resolve_model_dir
from icons_fast.model.lora import attach_lora, check_lora_placement, lora_fingerprint, lora_modules, lora_target_regex


def test_tiny_llava_loads_through_from_pretrained(tiny_model_dir):
    lm = load_model(tiny_model_dir)
    assert lm.is_llava
    assert type(lm.model).__name__ == "LlavaForConditionalGeneration"
    assert lm.tokenizer.convert_tokens_to_ids("<image>") == lm.model.config.image_token_index
    assert lm.model.config.image_seq_length == 16


def test_lora_only_on_language_model_linears(tiny_model_dir):
    lm = load_model(tiny_model_dir)
    model = attach_lora(lm.model, ModelConfig(lora_r=4, lora_alpha=8))
    names = [n for n, _ in lora_modules(model)]
    n_layers = lm.model.config.text_config.num_hidden_layers
    assert len(names) == 7 * n_layers
    assert all(".language_model." in n for n in names)
    assert not any(part in n for n in names for part in ("vision_tower", "multi_modal_projector", "lm_head"))
    suffixes = {n.rsplit(".", 1)[1] for n in names}
    assert suffixes == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # the vision tower has q/k/v_proj too: a plain PEFT list would have hit them
    vision_q = [n for n, _ in lm.model.named_modules() if "vision_tower" in n and n.endswith("q_proj")]
    assert vision_q


def test_lora_scaling_and_rank(tiny_model_dir):
    model = attach_lora(load_model(tiny_model_dir).model, ModelConfig(lora_r=4, lora_alpha=12))
    for _, m in lora_modules(model):
        assert m.r["default"] == 4
        assert m.scaling["default"] == pytest.approx(3.0)


def test_target_regex_excludes_vision_parts():
    import re

    rx = re.compile(lora_target_regex(["q_proj", "down_proj"]))
    assert rx.fullmatch("model.language_model.layers.3.self_attn.q_proj")
    assert rx.fullmatch("model.layers.0.mlp.down_proj")  # plain causal LM naming
    assert not rx.fullmatch("model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj")
    assert not rx.fullmatch("model.language_model.layers.3.self_attn.q_proj.lora_A")
    # each family's vision and projector names (Qwen2.5-VL's vision MLP, Idefics3's connector)
    assert not rx.fullmatch("model.visual.blocks.0.mlp.down_proj")
    assert not rx.fullmatch("model.visual.merger.mlp.0.down_proj")
    assert not rx.fullmatch("model.connector.modality_projection.down_proj")
    assert rx.fullmatch("model.text_model.layers.0.mlp.down_proj")


def test_lora_placement_check_names_the_module():
    lm_names = ["base_model.model.model.language_model.layers.0.self_attn.q_proj",
                "base_model.model.model.text_model.layers.1.mlp.down_proj"]
    check_lora_placement(lm_names, has_vision=True)
    check_lora_placement(["base_model.model.model.layers.0.self_attn.q_proj"], has_vision=False)  # a causal LM
    for bad in ["base_model.model.model.visual.blocks.0.mlp.up_proj", "base_model.model.lm_head",
                "base_model.model.model.connector.modality_projection.proj"]:
        with pytest.raises(ValueError, match=bad.replace(".", r"\.")):
            check_lora_placement(lm_names + [bad], has_vision=True)
    with pytest.raises(ValueError, match="outside the language model"):  # vision model, adapter outside its LM
        check_lora_placement(["base_model.model.model.layers.0.q_proj"], has_vision=True)
    with pytest.raises(ValueError, match="no LoRA module was placed"):
        check_lora_placement([], has_vision=False, targets=["q_proj"])


def test_lora_fingerprint_changes_with_rank(tiny_model_dir):
    a = lora_fingerprint(attach_lora(load_model(tiny_model_dir).model, ModelConfig(lora_r=4, lora_alpha=8)))
    b = lora_fingerprint(attach_lora(load_model(tiny_model_dir).model, ModelConfig(lora_r=2, lora_alpha=8)))
    assert a != b


def test_missing_model_directory_is_not_taken_for_a_hub_id(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a local directory nor a Hugging Face id"):
        resolve_model_dir(str(tmp_path / "llava-1.5-7b-hf"))


def test_causal_lm_directory_loads_with_tokenizer(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=len(tok))
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    lm = load_model(str(tmp_path))
    assert not lm.is_llava
    model = attach_lora(lm.model, ModelConfig(lora_r=2, lora_alpha=4))
    assert len(lora_modules(model)) == 7
    out = model(input_ids=torch.tensor([[5, 6, 7]]))
    assert out.logits.shape == (1, 3, len(tok))
