"""Model families beyond LLaVA-1.5: tiny random models built here, exact per-sample gradients, runs end to end.

For every family: the per-sample LoRA gradients of one batched pass
(``GradientExtractor``) equal batch-of-one autograd (what LESS does) on a batch
mixing images of different sizes, text-only and ragged samples; the
out-of-memory halving (``batch_rows``) keeps each row's own image tensors; LoRA
sits on the language model only; and ``icons-fast run --model DIR`` completes.
"""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from icons_fast.config import ModelConfig
from icons_fast.data import ErrorLog
from icons_fast.data.collate import batch_rows, model_kwargs
from icons_fast.data.loader import make_dataset
from icons_fast.features.extractor import GradientExtractor
from icons_fast.model.inputs import MODEL_INPUT_KEYS, per_sample_losses
from icons_fast.model.loading import load_model
from icons_fast.model.lora import EXCLUDED_PARTS, attach_lora, check_lora_placement, lora_modules, trainable_parameters
from icons_fast.model.tiny import build_tiny_family
from icons_fast.stages.featurize import featurize_resilient

TEXT_FAMILIES = ["llama", "qwen2", "mistral"]
VISION_FAMILIES = ["qwen2_vl", "qwen2_5_vl", "llava_next", "llava_onevision", "idefics3"]
FAMILIES = TEXT_FAMILIES + VISION_FAMILIES
IMAGE_SIZES = [(48, 12), (40, 32), (16, 16)]  # (width, height): different token counts per image

QUESTIONS = [("What color is the shape?", "red"), ("How many shapes are there?", "three"),
             ("Where is the shape?", "on the left"), ("What is 3 plus 4?", "7")]


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {f: build_tiny_family(str(root / f), f, seed=0) for f in FAMILIES}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.RandomState(0)
    for k, (w, h) in enumerate(IMAGE_SIZES):
        Image.fromarray(rng.randint(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"img{k}.png")
    return str(folder)


def _records(with_images: bool) -> list:
    """Ragged records: 1-3 turns, images of different sizes (vision families) between text-only ones."""
    recs = []
    for i in range(6):
        turns = []
        for t in range(1 + i % 3):
            q, a = QUESTIONS[(i + t) % len(QUESTIONS)]
            turns += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
        rec = {"id": f"r{i}", "conversations": turns}
        if with_images and i % 2 == 0:
            rec["image"] = f"img{(i // 2) % len(IMAGE_SIZES)}.png"
            turns[0]["value"] = "<image>\n" + turns[0]["value"]
        recs.append(rec)
    return recs


def _lora(path):
    lm = load_model(path)
    model = attach_lora(lm.model, ModelConfig(lora_r=2, lora_alpha=4, lora_dropout=0.1))
    torch.manual_seed(1)
    with torch.no_grad():  # B starts at zero in PEFT; make both gradients non-trivial
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return lm, model


def _samples(lm, family, images):
    recs = _records(family in VISION_FAMILIES)
    ds, collate = make_dataset(lm, recs, images, 512, ErrorLog(None), "data")
    samples = [ds[i] for i in range(len(recs))]
    assert all(isinstance(s, dict) for s in samples), samples
    return samples, collate


def _batch_of_one(model, samples, collate) -> torch.Tensor:
    """One sample per forward/backward (what LESS does): gradients of the LoRA parameters."""
    params = [p for _, p in trainable_parameters(model)]
    model.eval()
    rows = []
    for s in samples:
        batch = collate([s])
        kw = {k: v for k, v in batch.items() if k in MODEL_INPUT_KEYS and torch.is_tensor(v)}
        loss = per_sample_losses(model(**kw, use_cache=False).logits, batch["labels"]).sum()
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)


def _rel(a, b):
    return ((a - b).norm(dim=1) / b.norm(dim=1)).max().item()


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_per_sample_gradients_equal_batch_of_one(family, family_dirs, images):
    lm, model = _lora(family_dirs[family])
    samples, collate = _samples(lm, family, images)
    batch = collate(samples)
    lengths = batch["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) > 2  # ragged
    if family in VISION_FAMILIES:
        assert batch["has_image"].any() and not batch["has_image"].all()  # images and text-only rows mixed
    ours = GradientExtractor(model, proj_dim=None).featurize(batch)
    ref = _batch_of_one(model, samples, collate)
    assert ours.shape == ref.shape and bool((ref.norm(dim=1) > 0).all())
    assert _rel(ours, ref) < 1e-4
    # the out-of-memory halving re-batches rows with their own image tensors
    half = batch_rows(batch, [1, 2, 5])
    assert _rel(GradientExtractor(model, proj_dim=None).featurize(half), ref[[1, 2, 5]]) < 1e-4
    halved, oom_rows = featurize_resilient(_OOMAbove(GradientExtractor(model, proj_dim=None), 2), batch,
                                           lambda size, indices: None)
    assert oom_rows == [] and _rel(halved, ref) < 1e-4


class _OOMAbove:
    """An extractor that runs out of memory on batches of more than ``limit`` rows."""

    def __init__(self, inner, limit):
        self.inner, self.limit, self.proj_dim = inner, limit, inner.proj_dim

    def featurize(self, batch):
        if len(batch["ids"]) > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.inner.featurize(batch)


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_on_the_language_model_only(family, family_dirs):
    lm = load_model(family_dirs[family])
    model = attach_lora(lm.model, ModelConfig(lora_r=2, lora_alpha=4))
    names = [n for n, _ in lora_modules(model)]
    n_layers = lm.model.config.get_text_config().num_hidden_layers
    assert len(names) == 7 * n_layers
    assert not any(part in n.split(".") for n in names for part in EXCLUDED_PARTS)
    if family in VISION_FAMILIES:
        assert all(".language_model." in n or ".text_model." in n for n in names)
        vision_like = [n for n, _ in lm.model.named_modules() if n.rsplit(".", 1)[-1] in ModelConfig().lora_targets
                       and not any(p in n.split(".") for p in ("language_model", "text_model"))]
        if family == "qwen2_5_vl":
            assert vision_like  # its vision MLP has gate/up/down_proj: a plain PEFT list would adapt them
        with pytest.raises(ValueError, match="outside the language model"):
            check_lora_placement(names + ["base_model.model.model.visual.blocks.0.mlp.up_proj"], True)


@pytest.mark.parametrize("family", FAMILIES)
def test_loaded_through_the_auto_classes_with_family_and_template(family, family_dirs):
    lm = load_model(family_dirs[family])
    assert lm.family == {"qwen2_5_vl": "qwen2_vl"}.get(family, "causal_lm" if family in TEXT_FAMILIES else family)
    assert type(lm.model).__name__.endswith("ForCausalLM" if family in TEXT_FAMILIES else "ForConditionalGeneration")
    assert lm.chat_template and not lm.is_llava
    if family in VISION_FAMILIES:
        assert lm.processor.image_processor is not None and lm.tokenizer.pad_token_id is not None


def test_qwen2_vl_batch_layout(family_dirs, images):
    """Patches of a batch are concatenated (not stacked); each image's tokens match its grid."""
    lm = load_model(family_dirs["qwen2_vl"])
    samples, collate = _samples(lm, "qwen2_vl", images)
    batch = collate(samples)
    thw = batch["image_grid_thw"]
    image_rows = [s for s in samples if s["image_inputs"] is not None]
    assert thw.shape == (len(image_rows), 3)
    assert batch["pixel_values"].shape[0] == int(thw.prod(dim=1).sum())  # every image's patches, one after another
    assert len({int(t.prod()) for t in thw}) > 1  # images of different sizes
    merge = lm.processor.image_processor.merge_size
    img_id = lm.model.config.image_token_id
    for s, t in zip(image_rows, thw):
        assert int((s["input_ids"] == img_id).sum()) == int(t.prod()) // merge**2
        assert torch.equal(s["mm_token_type_ids"], (s["input_ids"] == img_id).long())
    assert set(model_kwargs(batch)) >= {"pixel_values", "image_grid_thw", "mm_token_type_ids"}


def test_anyres_token_count_matches_the_llava_next_processor(family_dirs):
    """Our any-resolution count against LlavaNextProcessor's own expansion, over many image shapes."""
    from transformers import AutoProcessor

    from icons_fast.data.collate import anyres_image_tokens

    path = family_dirs["llava_next"]
    processor = AutoProcessor.from_pretrained(path)
    config = load_model(path).model.config
    token = processor.image_token
    seen = set()
    for w, h in [(16, 16), (48, 12), (12, 48), (40, 32), (33, 17), (17, 33), (64, 64), (100, 7), (9, 9)]:
        img = Image.new("RGB", (w, h), (10, 200, 30))
        out = processor(text=[token], images=[img], add_special_tokens=False, return_tensors="pt")
        expected = int((out["input_ids"][0] == config.image_token_index).sum())
        got = anyres_image_tokens((h, w), tuple(out["pixel_values"].shape[-2:]), 2, config.image_grid_pinpoints,
                                  cls_token=True, drop_first=True)
        assert got == expected, (w, h)
        seen.add(expected)
    assert len(seen) > 2


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision", "idefics3"])
def test_tiles_and_crops_are_zero_padded_per_image(family, family_dirs, images):
    """Images with different tile/crop counts: padded to the batch's largest, each image's own tiles first."""
    lm = load_model(family_dirs[family])
    samples, collate = _samples(lm, family, images)
    image_rows = [s["image_inputs"] for s in samples if s["image_inputs"] is not None]
    counts = [d["pixel_values"].shape[1] for d in image_rows]
    assert len(set(counts)) > 1
    batch = collate(samples)
    assert batch["pixel_values"].shape[:2] == (len(image_rows), max(counts))
    for k, (d, n) in enumerate(zip(image_rows, counts)):
        assert torch.equal(batch["pixel_values"][k, :n], d["pixel_values"][0])
        assert not batch["pixel_values"][k, n:].any()
    if family == "idefics3":
        assert batch["pixel_attention_mask"].shape[:2] == (len(image_rows), max(counts))
    else:
        assert torch.equal(batch["image_sizes"], torch.cat([d["image_sizes"] for d in image_rows]))


@pytest.mark.parametrize("family", FAMILIES)
def test_icons_fast_run_end_to_end(family, family_dirs, images, tmp_path):
    from icons_fast.cli import main

    pool = _records(family in VISION_FAMILIES) * 4  # 24 records
    pool = [dict(r, id=f"p{i}") for i, r in enumerate(pool)]
    target = _records(family in VISION_FAMILIES)[:3]
    pool_path, target_path = tmp_path / "pool.json", tmp_path / "target.json"
    pool_path.write_text(json.dumps(pool))
    target_path.write_text(json.dumps(target))
    out = tmp_path / "run"
    rc = main(["run", "--model", family_dirs[family], "--train-data", str(pool_path), "--image-folder", images,
               "--target", f"task={target_path}", "--out", str(out), "--lora-r", "2", "--lora-alpha", "4",
               "--warmup-fraction", "0.25", "--proj-dim", "32", "--batch-size", "4", "--shard-size", "16",
               "--budget", "0.25", "--max-length", "512"])
    assert rc == 0
    indices = np.loadtxt(out / "selection" / "indices.txt", dtype=int)
    assert len(indices) == 6
    selected = json.loads((out / "selection" / "selected.json").read_text())
    assert selected == [pool[i] for i in indices]
    scores = np.load(out / "scores" / "scores.npy")
    assert scores.shape == (24, 1) and np.isfinite(scores).all()
    config = json.loads((out / "config.json").read_text())
    assert config["config"]["data"]["template"] == "auto"
    errors = out / "errors" / "train.jsonl"
    assert not os.path.exists(errors) or not errors.read_text().strip()  # every sample featurized


@pytest.mark.parametrize("family", ["qwen2", "qwen2_vl", "llava_next", "llava_onevision", "idefics3"])
def test_evaluate_decodes_with_each_familys_image_tensors(family, family_dirs, images):
    """Greedy answers (the evaluate step) equal ``model.generate`` fed the processor-style inputs."""
    from icons_fast.train.evaluate import evaluate_task, greedy_answer

    lm = load_model(family_dirs[family])
    recs = _records(family in VISION_FAMILIES)
    result = evaluate_task(lm, recs, images, 512, batch_size=4)
    assert result["n"] == len(recs) and result["excluded"] == 0
    assert 0.0 <= result["accuracy"] <= 1.0 and np.isfinite(result["answer_loss"])
    samples, _ = _samples(lm, family, images)
    s = samples[0]  # an image record for the vision families
    first = int((s["labels"] != -100).nonzero()[0])
    kw = dict(input_ids=s["input_ids"][:first][None], attention_mask=torch.ones(1, first, dtype=torch.long))
    kw.update(s["image_inputs"] or {})
    if "mm_token_type_ids" in s:
        kw["mm_token_type_ids"] = s["mm_token_type_ids"][:first][None]
    eos = lm.tokenizer.eos_token_id
    out = lm.model.generate(**kw, max_new_tokens=6, do_sample=False, eos_token_id=eos,
                            pad_token_id=lm.tokenizer.pad_token_id)[0, first:].tolist()
    out = out[: out.index(eos)] if eos in out else out
    assert greedy_answer(lm.model, s, lm.tokenizer, max_new_tokens=6) == lm.tokenizer.decode(out, skip_special_tokens=True)


MULTI_IMAGE = ["qwen2_vl", "qwen2_5_vl", "llava_next", "idefics3"]


def _mixed_image_records() -> list:
    """A 2-image record (images of different sizes), a 1-image record and a text-only record."""
    def rec(i, image, question):
        return {"id": f"m{i}", "image": image, "conversations": [
            {"from": "human", "value": question}, {"from": "gpt", "value": "the same"},
            {"from": "human", "value": "And now?"}, {"from": "gpt", "value": "different"}]}
    two = rec(0, ["img0.png", "img1.png"], "<image>\nFirst, then <image>\nsecond: same shapes?")
    one = rec(1, "img2.png", "<image>\nWhat color?")
    text = rec(2, None, "What is 3 plus 4?")
    del text["image"]
    return [two, one, text]


@pytest.mark.parametrize("family", MULTI_IMAGE)
def test_several_images_per_sample_batched_equal_batch_of_one(family, family_dirs, images):
    lm, model = _lora(family_dirs[family])
    recs = _mixed_image_records()
    ds, collate = make_dataset(lm, recs, images, 1024, ErrorLog(None), "data")
    samples = [ds[i] for i in range(len(recs))]
    assert all(isinstance(s, dict) for s in samples), samples
    two, one, text = (s["image_inputs"] for s in samples)
    assert text is None
    single = [make_dataset(lm, [dict(recs[1], image=p)], images, 1024, None, "data")[0][0]["image_inputs"]
              for p in recs[0]["image"]]  # each of the two images as a sample of its own
    if family in ("qwen2_vl", "qwen2_5_vl"):  # two patch runs and two grid rows, in text order
        assert two["image_grid_thw"].shape == (2, 3)
        assert torch.equal(two["pixel_values"], torch.cat([d["pixel_values"] for d in single]))
        assert int(samples[0]["mm_token_type_ids"].sum()) == int(two["image_grid_thw"].prod(1).sum()) // 4
    else:  # one slot per image on the leading axis, tiles/crops zero-padded
        assert two["pixel_values"].shape[0] == 2
        for k, d in enumerate(single):
            n = d["pixel_values"].shape[1]
            assert torch.equal(two["pixel_values"][k, :n], d["pixel_values"][0])
    batch = collate(samples)
    ours = GradientExtractor(model, proj_dim=None).featurize(batch)
    ref = _batch_of_one(model, samples, collate)
    assert bool((ref.norm(dim=1) > 0).all()) and _rel(ours, ref) < 1e-4
    # the second image matters: swapping the two images changes the 2-image sample's gradient
    swapped = make_dataset(lm, [dict(recs[0], image=recs[0]["image"][::-1])], images, 1024, None, "data")[0][0]
    assert _rel(_batch_of_one(model, [swapped], collate), ref[:1]) > 1e-3
    assert _rel(GradientExtractor(model, proj_dim=None).featurize(batch_rows(batch, [0, 2])), ref[[0, 2]]) < 1e-4


@pytest.mark.parametrize("family", ["llava", "llava_onevision"])
def test_one_image_families_refuse_several_with_the_reason(family, family_dirs, tiny_model_dir, images):
    lm = load_model(tiny_model_dir if family == "llava" else family_dirs[family])
    recs = _mixed_image_records()
    ds, _ = make_dataset(lm, recs, images, 1024, ErrorLog(None), "data")
    err = ds[0]
    assert err.code == "multiple_images" and f"family {family}" in err.reason and "takes 1" in err.reason
    assert isinstance(ds[1], dict) and isinstance(ds[2], dict)  # the others are built as usual


def test_a_bad_image_among_several_makes_the_sample_bad(family_dirs, images, tmp_path):
    lm = load_model(family_dirs["qwen2_vl"])
    recs = _mixed_image_records()
    recs[0]["image"] = ["img0.png", "gone.png"]
    log = ErrorLog(str(tmp_path / "errors.jsonl"))
    ds, collate = make_dataset(lm, recs, images, 1024, log, "data")
    batch = collate([ds[i] for i in range(len(recs))])
    assert batch["indices"].tolist() == [1, 2]  # the others keep their own indices
    [err] = batch["errors"]
    assert (err.index, err.id, err.code) == (0, "m0", "missing_image") and "gone.png" in err.reason
    lines = [json.loads(line) for line in (tmp_path / "errors.jsonl").read_text().splitlines()]
    assert [(e["index"], e["reason"].split(":")[0]) for e in lines] == [(0, "missing_image")]
    assert batch["image_grid_thw"].shape == (1, 3)  # only the 1-image record's image
