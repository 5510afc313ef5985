"""Data layer: records, the vicuna_v1 template and its masks, images, errors, batches."""
import json
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image

from icons_fast.data import (
    IGNORE_INDEX,
    ErrorLog,
    LlavaDataset,
    LlavaSampleBuilder,
    SampleError,
    SampleProblem,
    collate,
    load_image,
    load_records,
    make_bad_samples,
    model_kwargs,
    record_ids,
    render_prompt,
    tokenize_record,
)
from icons_fast.data.conversation import tokenize_record_ref
from icons_fast.data.images import expand_to_square

WORDS = "red green blue circle square left right top one two three seven the shape is".split()


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoConfig, AutoProcessor

    return AutoProcessor.from_pretrained(tiny_model_dir), AutoConfig.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def bad_pool(tmp_path_factory):
    return make_bad_samples(str(tmp_path_factory.mktemp("bad")))


def _random_record(rng, n_pairs, with_image):
    conv = []
    for p in range(n_pairs):
        q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 9))) + "?"
        if with_image and p == 0:
            q = "<image>\n" + q
        conv += [{"from": "human", "value": q},
                 {"from": "gpt", "value": " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 5)))}]
    rec = {"id": rng.randint(0, 10**6), "conversations": conv}
    if with_image:
        rec["image"] = "x.png"
    return rec


# ------------------------------------------------------------------ records

def test_load_records_keeps_everything_and_ids_are_strings(tmp_path):
    recs = [
        {"id": 17, "image": "a/b.jpg", "conversations": [], "extra": {"nested": [1, 2]}},
        {"id": "abc", "conversations": [], "model": "x"},
        {"conversations": []},
    ]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(recs))
    loaded = load_records(str(path))
    assert loaded == recs  # unknown keys and order untouched, ids not rewritten
    assert record_ids(loaded) == ["17", "abc", "#2"]


def test_load_records_errors_name_the_file(tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text('[{"id": 1,]')
    with pytest.raises(ValueError, match="broken.json"):
        load_records(str(bad))
    obj = tmp_path / "object.json"
    obj.write_text('{"id": 1}')
    with pytest.raises(ValueError, match="object.json.*list"):
        load_records(str(obj))
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_records(str(tmp_path / "nope.json"))


# ------------------------------------------------------------------ malformed samples

def test_every_malformed_case_gets_exactly_one_error(tiny, bad_pool, tmp_path):
    processor, config = tiny
    records = load_records(bad_pool["json"])
    builder = LlavaSampleBuilder(processor, config, bad_pool["image_folder"], bad_pool["max_length"])
    log = ErrorLog(str(tmp_path))
    ds = LlavaDataset(records, builder, log, stage="tokenize")
    loader = torch.utils.data.DataLoader(ds, batch_size=3, shuffle=False, collate_fn=builder.collate)
    seen_good, seen_err = [], []
    for batch in loader:
        seen_good += batch["indices"].tolist()
        seen_err += [e.index for e in batch["errors"]]
        # ids travel with their rows
        assert batch["ids"] == [record_ids(records)[i] for i in batch["indices"].tolist()]
    assert sorted(seen_good) == bad_pool["good"]  # good samples keep their original indices
    assert sorted(seen_err) == sorted(bad_pool["expected"])  # errors are never dropped
    got = {e.index: e.code for e in log}
    assert got == bad_pool["expected"]
    # one json line per error, readable back, with index / id / stage / reason
    lines = (tmp_path / "errors.jsonl").read_text().splitlines()
    assert len(lines) == len(bad_pool["expected"])
    reread = ErrorLog.read(str(tmp_path))
    assert {e.index: e.code for e in reread} == bad_pool["expected"]
    assert all(e.stage == "tokenize" and e.id == record_ids(records)[e.index] for e in reread)
    assert log.excluded_indices() == sorted(bad_pool["expected"])
    counts = {}
    for code in bad_pool["expected"].values():
        counts[code] = counts.get(code, 0) + 1
    assert log.counts_by_reason() == counts
    # a second pass (or a resumed run) adds nothing
    ErrorLog_again = ErrorLog(str(tmp_path))
    ds2 = LlavaDataset(records, builder, ErrorLog_again, stage="tokenize")
    for i in range(len(ds2)):
        ds2[i]
    assert len((tmp_path / "errors.jsonl").read_text().splitlines()) == len(lines)
    # ... but another stage is a separate entry
    ds3 = LlavaDataset(records, builder, ErrorLog_again, stage="featurize", indices=[1])
    assert isinstance(ds3[0], SampleError) and ds3[0].index == 1
    assert len(ErrorLog.read(str(tmp_path))) == len(lines) + 1


def test_over_long_reason_has_the_count_and_the_limit_is_inclusive(tiny):
    processor, config = tiny
    tok = processor.tokenizer
    rec = {"id": "x", "conversations": [{"from": "human", "value": "What is 2 plus 2?"},
                                        {"from": "gpt", "value": "4"}]}
    ids, _ = tokenize_record(rec, tok, None, 0, None)
    n = len(ids)
    assert len(tokenize_record(rec, tok, None, 0, n)[0]) == n  # exactly max_length is fine
    with pytest.raises(SampleProblem, match=rf"too_long: {n} tokens > max_length {n - 1}"):
        tokenize_record(rec, tok, None, 0, n - 1)


def test_huge_text_is_refused_before_tokenising_and_both_paths_agree(tiny):
    from icons_fast.data.conversation import max_token_chars

    tok = tiny[0].tokenizer
    longest = max_token_chars(tok)
    assert longest == max(len(t) for t in tok.get_vocab())
    rec = {"id": "x", "conversations": [{"from": "human", "value": "why?"}, {"from": "gpt", "value": "ab " * 200}]}
    n = len(tokenize_record(rec, tok, None, 0, None)[0])
    # just under the character bound: tokenised, and refused by its token count
    for fn in (tokenize_record, tokenize_record_ref):
        with pytest.raises(SampleProblem, match=rf"too_long: {n} tokens > max_length {n - 1}"):
            fn(rec, tok, None, 0, n - 1)
    # far beyond: refused from its length in characters, the same reason code by both paths
    rec["conversations"][1]["value"] = "ab " * 1_000_000
    for fn in (tokenize_record, tokenize_record_ref):
        with pytest.raises(SampleProblem, match=r"too_long: \d+ characters cannot fit in max_length 64 tokens"):
            fn(rec, tok, None, 0, 64)


def test_lone_surrogates_and_non_string_images_are_reasons(tiny, tmp_path):
    processor, config = tiny
    builder = LlavaSampleBuilder(processor, config, str(tmp_path), 512)
    text = json.loads('{"id": "a\\ud800", "conversations": [{"from": "human", "value": "hi \\ud83d"},'
                      ' {"from": "gpt", "value": "ok"}]}')  # json escapes of lone surrogates
    with pytest.raises(SampleProblem, match=r"bad_text: turn 0 .* lone surrogate"):
        builder.build(0, text)
    for image in ([], ["a.png", 7], {"path": "a.png"}, 7, True):  # a list of paths is several images
        rec = {"id": 1, "image": image,
               "conversations": [{"from": "human", "value": "<image>\nq?"}, {"from": "gpt", "value": "a"}]}
        with pytest.raises(SampleProblem, match="bad_record: 'image' must be a path string"):
            builder.build(0, rec)
    # the error of a record whose id holds a lone surrogate is still written and read back
    log = ErrorLog(str(tmp_path / "errors.jsonl"))
    err = LlavaDataset([text], builder, log)[0]
    assert isinstance(err, SampleError) and err.code == "bad_text"
    assert ErrorLog.read(str(tmp_path / "errors.jsonl")) == [err]


def test_load_records_refuses_absurd_nesting(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(ValueError, match="deep.json: json nested too deeply"):
        load_records(str(path))


def test_error_log_memory_and_interrupted_write(tmp_path):
    log = ErrorLog()
    assert log.add(SampleError(3, "a", "tokenize", "missing_image: x"))
    assert not log.add(SampleError(3, "a", "tokenize", "corrupt_image: y"))  # same index + stage
    assert log.add(SampleError(3, "a", "warmup", "missing_image: x"))
    assert log.excluded_indices() == [3] and log.excluded_indices("warmup") == [3]
    path = tmp_path / "e.jsonl"
    path.write_text(SampleError(1, "b", "s", "too_long: 9").to_json() + "\n" + '{"index": 2, "id"')
    assert [e.index for e in ErrorLog.read(str(path))] == [1]  # the cut-short last line is skipped
    path.write_text('{"index": 2}\n' + SampleError(1, "b", "s", "r").to_json() + "\n")
    with pytest.raises(ValueError, match="e.jsonl:1"):
        ErrorLog.read(str(path))


# ------------------------------------------------------------------ template and masks

def test_labels_are_exactly_the_answers(tiny):
    processor, config = tiny
    tok = processor.tokenizer
    rng = random.Random(5)
    for trial in range(25):
        with_image = trial % 2 == 0
        rec = _random_record(rng, rng.randint(1, 4), with_image)
        ids, labels = tokenize_record(rec, tok, config.image_token_index, config.image_seq_length, None)
        assert ids.dtype == torch.long and ids.shape == labels.shape
        lab = labels.tolist()
        # labels copy the ids where they are set
        assert all(l == i for l, i in zip(lab, ids.tolist()) if l != IGNORE_INDEX)
        # contiguous labelled runs, one per gpt turn, decode to " answer</s>"
        runs, cur = [], []
        for i, l in zip(ids.tolist(), lab):
            if l != IGNORE_INDEX:
                cur.append(i)
            elif cur:
                runs.append(cur)
                cur = []
        if cur:
            runs.append(cur)
        answers = [t["value"] for t in rec["conversations"][1::2]]
        assert [tok.decode(r) for r in runs] == [" " + a + "</s>" for a in answers]
        # the whole sequence (image run collapsed) decodes to the rendered template
        flat, prev = [], None
        for i in ids.tolist():
            if not (i == config.image_token_index and prev == i):
                flat.append(i)
            prev = i
        assert tok.decode(flat) == render_prompt(rec)
        # the batched encode agrees with encoding piece by piece
        ids_r, labels_r = tokenize_record_ref(rec, tok, config.image_token_index, config.image_seq_length, None)
        assert torch.equal(ids, ids_r) and torch.equal(labels, labels_r)


def _metaspace_tokenizer():
    """A sentencepiece-style (Metaspace, "always" prefix) BPE tokenizer, like Llama's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from icons_fast.data.conversation import SYSTEM_PROMPT

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    alphabet = sorted(set(SYSTEM_PROMPT + " ".join(WORDS) + "USERASSITN:?<>/\n\u2581"))
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<pad>", "<image>"],
                                  initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator([SYSTEM_PROMPT, " ".join(WORDS), "USER: ASSISTANT:"] * 3, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


@pytest.mark.parametrize("kind", ["byte_level", "metaspace"])
def test_pieces_equal_the_template_tokenised_in_one_go(tiny, kind):
    """Independent reference: the whole rendered string through the tokenizer at once.

    Word-splitting pre-tokenizers never merge across the spaces where pieces
    meet, so piecewise ids must equal the one-go ids (image run collapsed).
    """
    processor, config = tiny
    tok = processor.tokenizer if kind == "byte_level" else _metaspace_tokenizer()
    img_id = tok.convert_tokens_to_ids("<image>")
    rng = random.Random(8)
    for trial in range(12):
        rec = _random_record(rng, rng.randint(1, 3), with_image=trial % 3 == 0)
        ids, _ = tokenize_record(rec, tok, img_id, 5, None)
        flat = [i for k, i in enumerate(ids.tolist()) if not (i == img_id and ids[k - 1] == img_id)]
        assert flat == tok(render_prompt(rec), add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("n_image_tokens", [1, 16, 576])
def test_image_token_expansion(tiny, n_image_tokens):
    processor, config = tiny
    tok = processor.tokenizer
    img_id = config.image_token_index
    rec = {"id": "i", "image": "a.png", "conversations": [
        {"from": "human", "value": "Look: <image>\nWhat color is the shape?"}, {"from": "gpt", "value": "red"},
        {"from": "human", "value": "And the shape?"}, {"from": "gpt", "value": "circle"}]}
    ids, labels = tokenize_record(rec, tok, img_id, n_image_tokens, None)
    pos = (ids == img_id).nonzero().flatten()
    assert len(pos) == n_image_tokens
    assert torch.equal(pos, torch.arange(pos[0], pos[0] + n_image_tokens))  # one contiguous run
    assert (labels[pos] == IGNORE_INDEX).all()
    before = tok.decode(ids[: pos[0]])
    assert before.endswith(" USER: Look: ")  # in place of the placeholder
    text = {"id": "t", "conversations": rec["conversations"]}
    text["conversations"] = [dict(t, value=t["value"].replace("<image>", "")) for t in rec["conversations"]]
    assert (tokenize_record(text, tok, img_id, n_image_tokens, None)[0] == img_id).sum() == 0


def test_literal_special_tokens_in_text_stay_text(tiny):
    processor, config = tiny
    tok = processor.tokenizer
    rec = {"id": "s", "conversations": [{"from": "human", "value": "Write </s> please"},
                                        {"from": "gpt", "value": "a </s> b"}]}
    ids, labels = tokenize_record(rec, tok, config.image_token_index, 16, None)
    assert (ids == tok.eos_token_id).sum() == 1 and ids[-1] == tok.eos_token_id
    assert (labels == tok.eos_token_id).sum() == 1


def test_text_only_tokenizer(tiny, tmp_path):
    processor, _ = tiny
    tok = processor.tokenizer  # a bare tokenizer: what a text-only causal LM brings
    builder = LlavaSampleBuilder(tok, None, str(tmp_path), 256)
    assert not builder.supports_images
    rec = {"id": "t", "conversations": [{"from": "human", "value": "What is 1 plus 2?"},
                                        {"from": "gpt", "value": "3"}]}
    s = builder.build(0, rec)
    assert s["pixel_values"] is None and s["input_ids"][0] == tok.bos_token_id
    img_rec = dict(rec, image="a.png")
    img_rec["conversations"] = [dict(rec["conversations"][0], value="<image>\nWhat?"), rec["conversations"][1]]
    with pytest.raises(SampleProblem, match="no_image_support"):
        builder.build(1, img_rec)


# ------------------------------------------------------------------ images

def test_load_image_cases(tmp_path):
    rng = torch.Generator().manual_seed(0)
    arr = torch.randint(0, 256, (7, 11, 3), generator=rng, dtype=torch.uint8).numpy()
    Image.fromarray(arr).save(tmp_path / "ok.PNG")
    Image.fromarray(arr).convert("L").save(tmp_path / "gray.png")
    Image.fromarray(arr).save(tmp_path / "real_png.jpg", format="PNG")
    Image.fromarray(arr).save(tmp_path / "noext", format="PNG")
    img = load_image(str(tmp_path), "ok.PNG")
    assert img.mode == "RGB" and img.size == (11, 7)
    assert (np.asarray(img) == arr).all()  # lossless round trip
    assert load_image(str(tmp_path), "gray.png").mode == "RGB"
    assert load_image(str(tmp_path), "noext").size == (11, 7)  # unknown extension: any format
    with pytest.raises(SampleProblem, match=r"image_format_mismatch: .*real_png.jpg is really PNG"):
        load_image(str(tmp_path), "real_png.jpg")
    with pytest.raises(SampleProblem, match=r"missing_image: .*nope.png does not exist"):
        load_image(str(tmp_path), "nope.png")
    os.mkdir(tmp_path / "folder.jpg")
    os.symlink("loop2.png", tmp_path / "loop1.png")
    os.symlink("loop1.png", tmp_path / "loop2.png")
    for name in ("folder.jpg", "loop1.png"):
        with pytest.raises(SampleProblem, match=rf"missing_image: .*{name} is not a regular file"):
            load_image(str(tmp_path), name)


def test_expand_to_square():
    img = Image.new("RGB", (5, 2), (1, 2, 3))
    sq = expand_to_square(img, (9, 9, 9))
    assert sq.size == (5, 5)
    assert sq.getpixel((0, 0)) == (9, 9, 9) and sq.getpixel((2, 2)) == (1, 2, 3)  # rows 1..2 hold the image
    assert sq.getpixel((2, 1)) == (1, 2, 3) and sq.getpixel((2, 3)) == (9, 9, 9)


# ------------------------------------------------------------------ batches

def _mixed_samples(tiny, tmp_path):
    processor, config = tiny
    rng = random.Random(11)
    gen = torch.Generator().manual_seed(3)
    samples = []
    builder = LlavaSampleBuilder(processor, config, str(tmp_path), 512)
    for k, with_image in enumerate([True, False, True, False, False, True]):
        rec = _random_record(rng, 1 + k % 3, with_image)
        if with_image:
            rec["image"] = f"img{k}.png"
            arr = torch.randint(0, 256, (32, 32, 3), generator=gen, dtype=torch.uint8).numpy()
            Image.fromarray(arr).save(tmp_path / rec["image"])
        samples.append(builder.build(100 + k, rec))
    return builder, samples


def test_collate_padding_and_mixed_batch(tiny, tmp_path):
    builder, samples = _mixed_samples(tiny, tmp_path)
    err = SampleError(7, "bad", "tokenize", "missing_image: x")
    batch = builder.collate(samples[:3] + [err] + samples[3:])
    B = len(samples)
    T = max(len(s["input_ids"]) for s in samples)
    assert batch["input_ids"].shape == (B, T) == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["errors"] == [err]
    assert batch["indices"].tolist() == [s["index"] for s in samples]
    assert batch["ids"] == [s["id"] for s in samples]
    for b, s in enumerate(samples):
        n = len(s["input_ids"])
        assert torch.equal(batch["input_ids"][b, :n], s["input_ids"])  # right padding
        assert torch.equal(batch["labels"][b, :n], s["labels"])
        assert (batch["input_ids"][b, n:] == builder.pad_token_id).all()
        assert (batch["labels"][b, n:] == IGNORE_INDEX).all()
        assert batch["attention_mask"][b].tolist() == [1] * n + [0] * (T - n)
    with_img = [s for s in samples if s["pixel_values"] is not None]
    assert batch["has_image"].tolist() == [s["pixel_values"] is not None for s in samples]
    assert torch.equal(batch["pixel_values"], torch.stack([s["pixel_values"] for s in with_img]))
    assert set(model_kwargs(batch)) == {"input_ids", "attention_mask", "labels", "pixel_values"}
    text_only = collate([s for s in samples if s["pixel_values"] is None], builder.pad_token_id)
    assert "pixel_values" not in text_only and "pixel_values" not in model_kwargs(text_only)
    empty = collate([err])
    assert empty["input_ids"].shape == (0, 0) and empty["errors"] == [err]


def test_mixed_batch_forward_matches_one_by_one(tiny, tiny_model_dir, tmp_path):
    """Padding and image order are right iff each row's logits equal its batch-of-one logits."""
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    builder, samples = _mixed_samples(tiny, tmp_path)
    batch = builder.collate(samples)
    with torch.no_grad():
        out = model(**model_kwargs(batch))
        for b, s in enumerate(samples):
            one = model(**model_kwargs(builder.collate([s])))
            n = len(s["input_ids"])
            torch.testing.assert_close(out.logits[b, :n], one.logits[0], rtol=1e-4, atol=1e-4)


def test_bad_pool_files_exist_where_expected(bad_pool):
    records = load_records(bad_pool["json"])
    assert set(bad_pool["expected"]) | set(bad_pool["good"]) == set(range(len(records)))
    assert records[0]["source"] == "kept"
    assert os.path.isdir(bad_pool["image_folder"])


def test_error_log_survives_a_line_cut_short_by_a_crash(tmp_path):
    from icons_fast.data import ErrorLog, SampleError

    path = tmp_path / "errors.jsonl"
    log = ErrorLog(str(path))
    log.add(SampleError(1, "a", "data", "missing_image: x"))
    with open(path, "a") as f:
        f.write('{"index": 2, "id": "b", "sta')  # killed mid-write
    again = ErrorLog(str(path))
    again.add(SampleError(3, "c", "data", "too_long: 9 tokens"))
    assert [e.index for e in ErrorLog.read(str(path))] == [1, 3]


# ------------------------------------------------------------------ the model's own chat template

CHAT_STYLES = {"qwen2": "<|im_end|>", "llama": "<|eot_id|>", "mistral": "</s>", "idefics3": "<end_of_utterance>"}


def _chat(family):
    from icons_fast.data.conversation import template_renderer
    from icons_fast.model.tiny import family_tokenizer

    tok = family_tokenizer(family)
    return tok, template_renderer(tok, tok.chat_template)


def _labelled_runs(ids, labels):
    runs, cur = [], []
    for i, l in zip(ids.tolist(), labels.tolist()):
        if l != IGNORE_INDEX:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


@pytest.mark.parametrize("family", sorted(CHAT_STYLES))
def test_chat_template_labels_are_exactly_the_answers_and_their_end_of_turn(family):
    from icons_fast.data.conversation import chat_messages, tokenize_chat

    tok, render = _chat(family)
    end = CHAT_STYLES[family]
    rng = random.Random(21)
    for trial in range(15):
        rec = _random_record(rng, rng.randint(1, 4), with_image=False)
        ids, labels = tokenize_chat(rec, tok, render, None, None, None)
        assert all(l == i for l, i in zip(labels.tolist(), ids.tolist()) if l != IGNORE_INDEX)
        answers = [t["value"] for t in rec["conversations"][1::2]]
        decoded = [tok.decode(r) for r in _labelled_runs(ids, labels)]
        assert [d.strip() for d in decoded] == [a + end for a in answers]  # answer text + its end-of-turn, nothing else
        # independent reference: the rendered conversation tokenised in one go
        full = render(chat_messages([(h["value"], g["value"]) for h, g in zip(rec["conversations"][::2],
                                                                                 rec["conversations"][1::2])]
                                    , False), False)
        assert ids.tolist() == tok(full, add_special_tokens=False)["input_ids"]


def test_chat_template_image_piece_and_problems():
    from icons_fast.data.conversation import tokenize_chat

    tok, render = _chat("idefics3")
    rec = {"id": "i", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": "red"}]}
    image_ids = [7, 8, 9, 8, 7]  # what the family's expansion gives for this image
    ids, labels = tokenize_chat(rec, tok, render, "<image>", [image_ids], None)
    at = [k for k in range(len(ids) - 4) if ids[k : k + 5].tolist() == image_ids]
    assert len(at) == 1 and (labels[at[0] : at[0] + 5] == IGNORE_INDEX).all()
    assert tok.convert_tokens_to_ids("<image>") not in ids.tolist()  # replaced, not kept
    with pytest.raises(SampleProblem, match="no_image_support"):
        tokenize_chat(rec, tok, render, None, None, None)
    with pytest.raises(SampleProblem, match="too_long"):
        tokenize_chat(rec, tok, render, "<image>", [image_ids], 8)
    two = dict(rec, image=["a.png", "b.png"], conversations=[
        {"from": "human", "value": "<image>\nand <image>\nsame?"}, {"from": "gpt", "value": "no"}])
    ids = tokenize_chat(two, tok, render, "<image>", [image_ids, [5, 6]], None)[0].tolist()
    first = next(k for k in range(len(ids)) if ids[k : k + 5] == image_ids)
    assert next(k for k in range(len(ids)) if ids[k : k + 2] == [5, 6]) > first  # each image's ids, in text order
    for bad, code in [(dict(two, image=["a.png"] * 3), "image_count_mismatch"),
                      (dict(two, image="a.png"), "multiple_image_tokens"), (dict(two, image=[]), "bad_record")]:
        with pytest.raises(SampleProblem, match=code):
            tokenize_chat(bad, tok, render, "<image>", [image_ids], None)
    empty = {"id": "e", "conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "  "}]}
    with pytest.raises(SampleProblem, match="all_labels_masked"):
        tokenize_chat(empty, tok, render, None, None, None)


def test_chat_template_that_is_not_prefix_stable_is_refused():
    from icons_fast.data.conversation import template_renderer, tokenize_chat

    tok, _ = _chat("qwen2")
    # marks the last message, so a shorter conversation is not a prefix of the longer one
    unstable = "{% for m in messages %}<|im_start|>{{ m['role'] }}{% if loop.last %}!{% endif %}" \
               "{{ m['content'] }}<|im_end|>{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant{% endif %}"
    rec = {"id": "u", "conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "yes"}]}
    with pytest.raises(ValueError, match="not prefix-stable at turn 1"):
        tokenize_chat(rec, tok, template_renderer(tok, unstable), None, None, None)


def test_template_auto_picks_the_models_own_but_vicuna_for_llava():
    from icons_fast.data.conversation import resolve_template

    assert resolve_template("auto", "llava", "{{ x }}") == "vicuna_v1"
    assert resolve_template("auto", "causal_lm", "{{ x }}") == "chat"
    assert resolve_template("auto", "qwen2_vl", "{{ x }}") == "chat"
    assert resolve_template("auto", "causal_lm", None) == "vicuna_v1"  # a base LM without a template
    assert resolve_template("vicuna_v1", "causal_lm", "{{ x }}") == "vicuna_v1"
    with pytest.raises(ValueError, match="no chat template"):
        resolve_template("chat", "llava", None)
    with pytest.raises(ValueError, match="unknown template"):
        resolve_template("alpaca", "llava", None)


def test_text_lm_builder_uses_its_chat_template_and_vicuna_on_request(tmp_path):
    tok, _ = _chat("qwen2")
    rec = {"id": "t", "conversations": [{"from": "human", "value": "What is 1 plus 2?"}, {"from": "gpt", "value": "3"}]}
    chat = LlavaSampleBuilder(tok, None, str(tmp_path), 256, template="auto", chat_template=tok.chat_template)
    vicuna = LlavaSampleBuilder(tok, None, str(tmp_path), 256, template="vicuna_v1", chat_template=tok.chat_template)
    assert (chat.template, vicuna.template) == ("chat", "vicuna_v1")
    a, b = chat.build(0, rec), vicuna.build(0, rec)
    assert tok.decode(a["input_ids"]).startswith("<|im_start|>user\nWhat is 1 plus 2?")
    assert tok.decode(b["input_ids"]).startswith("<s>A chat between")
