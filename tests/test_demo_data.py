"""The generated replica: determinism, sources tagged, ground truth that the pixels confirm, disjoint sets."""
import hashlib
import os
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from icons_fast.data import LlavaSampleBuilder, load_records, make_stage1_data, make_replica_data
from icons_fast.data.replica import (
    BACKGROUND,
    BENCHMARKS,
    COLORS,
    LOWQUALITY_WRONG,
    MATCH_PROMPT,
    QUADRANTS,
    SHAPES,
    SOURCES,
    TARGET_BENCHMARKS,
    UNSEEN_BENCHMARKS,
    ask,
    random_scene,
)

N = 400


def _tree_digest(root):
    """{relative path: sha256} of every file under root."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = os.path.join(dirpath, name)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def replica(tmp_path_factory):
    return make_replica_data(str(tmp_path_factory.mktemp("replica")), n_train=N, seed=0, n_target=8, n_eval=20)


@pytest.fixture(scope="module")
def train(replica):
    return load_records(replica["train"])


def _pixels(folder, rec):
    return np.asarray(Image.open(os.path.join(folder, rec["image"])).convert("RGB")).astype(int)


def _answers(rec):
    return [t["value"] for t in rec["conversations"][1::2]]


def _objects_in_pixels(px):
    """{quadrant: colour name} read from the pixels alone (the majority non-background colour of each quadrant)."""
    found = {}
    for q, (y0, x0) in zip(QUADRANTS, ((0, 0), (0, 16), (16, 0), (16, 16))):
        cell = px[y0:y0 + 16, x0:x0 + 16].reshape(-1, 3)
        fg = cell[np.any(cell != np.array(BACKGROUND), axis=1)]
        if len(fg) > 20:
            colours, counts = np.unique(fg, axis=0, return_counts=True)
            rgb = tuple(int(c) for c in colours[counts.argmax()])
            found[q] = next(name for name, value in COLORS.items() if value == rgb)
    return found


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    make_replica_data(str(tmp_path / "a"), n_train=57, seed=3, n_target=3, n_eval=5)
    make_replica_data(str(tmp_path / "b"), n_train=57, seed=3, n_target=3, n_eval=5)
    c = make_replica_data(str(tmp_path / "c"), n_train=57, seed=4, n_target=3, n_eval=5)
    da, db, dc = (_tree_digest(str(tmp_path / x)) for x in "abc")
    assert da == db and len(da) > 57
    assert da != dc and da["train.json"] != dc["train.json"]
    assert sorted(c["targets"]) == sorted(TARGET_BENCHMARKS)
    assert sorted(c["eval"]) == sorted(BENCHMARKS) and set(UNSEEN_BENCHMARKS).isdisjoint(c["targets"])


def test_every_record_has_its_source_in_the_planned_share(train):
    assert len(train) == N and len({r["id"] for r in train}) == N
    counts = {s: sum(r["source"] == s for r in train) for s in SOURCES}
    for source, share in SOURCES.items():
        assert abs(counts[source] - share * N) <= 1, (source, counts[source])
    for r in train:
        assert ("image" in r) == (r["source"] != "text")
        assert ("<image>" in r["conversations"][0]["value"]) == ("image" in r)
        assert len(r["demo_answers"]) == len(r["demo_tasks"]) == len(r["conversations"]) // 2
        assert (len(r["conversations"]) > 2) == (r["source"] == "conversation" or (
            r["source"] == "duplicate" and len(r["demo_tasks"]) > 1))


def test_ground_truth_flags(train):
    """Wrong answers only in the low-quality source, at about its planned rate; unsupported answers have no truth."""
    wrong = {s: [] for s in SOURCES}
    for r in train:
        truths = r["demo_answers"]
        if r["source"] == "unsupported":
            assert truths == [None] and r["demo_noisy"]
            continue
        bad = [t != a for t, a in zip(truths, _answers(r))]
        assert r["demo_noisy"] == any(bad), r["id"]
        wrong[r["source"]].append(any(bad))
    assert not any(wrong["vqa"] + wrong["mc"] + wrong["conversation"] + wrong["caption"] + wrong["text"])
    assert abs(np.mean(wrong["lowquality"]) - LOWQUALITY_WRONG) < 0.2
    for r in train:
        if r["source"] == "text":  # "What is 3 plus 4?", "What is 7 minus 2?", "What number comes after 5?"
            words = r["conversations"][0]["value"].split("?")[0].split()
            if "after" in words:
                expect = int(words[-1]) + 1
            else:
                a, op, b = int(words[-3]), words[-2], int(words[-1])
                expect = a + b if op == "plus" else a - b
            assert r["demo_answers"] == _answers(r) == [str(expect)]


def test_pixels_agree_with_the_true_answers(replica, train):
    """Independent of the scene code: colours per quadrant read from the pixels confirm count, colour and position."""
    checked = 0
    for r in train:
        if r["source"] not in ("vqa", "lowquality") or r["demo_task"] not in ("count", "position", "color"):
            continue
        found = _objects_in_pixels(_pixels(replica["image_folder"], r))
        truth, q = r["demo_answers"][0], r["conversations"][0]["value"]
        if r["demo_task"] == "count":
            assert str(len(found)) == truth, r["id"]
        elif r["demo_task"] == "position":
            assert list(found) == [truth], r["id"]
        else:
            assert truth in found.values(), r["id"]
        checked += 1
    assert checked > 40


def test_one_object_type_per_image_and_position_only_about_one_object(replica, train):
    """Every scene holds copies of one type (one colour in the pixels); position questions see exactly one object."""
    n_multi = 0
    for r in train:
        if r["source"] in ("text", "unsupported"):
            continue
        found = _objects_in_pixels(_pixels(replica["image_folder"], r))
        assert 1 <= len(found) <= 3 and len(set(found.values())) == 1, r["id"]
        n_multi += len(found) > 1
        if "position" in r["demo_tasks"]:
            assert len(found) == 1, r["id"]
    assert n_multi > 40
    for r in load_records(replica["eval"]["position"]):
        assert len(_objects_in_pixels(_pixels(replica["image_folder"], r))) == 1, r["id"]


def test_only_existence_questions_name_a_colour_or_a_shape(replica, train):
    """Every other kind reads the image's one object type, so its question names none; position never without one."""
    words = set(COLORS) | set(SHAPES) | {s + "s" for s in SHAPES}
    n_exist = 0
    for r in train:
        questions = [t["value"].split("\n") for t in r["conversations"][0::2]]
        for kind, lines in zip(r["demo_tasks"], questions):
            stem = [line for line in lines if line not in ("<image>",) and line[:3] not in ("A. ", "B. ", "C. ", "D. ")]
            named = words & set(" ".join(stem).rstrip("?").replace("?", " ").split())
            if kind == "exist":
                assert len(named) == 2, (r["id"], stem)
                n_exist += 1
            else:
                assert not named, (r["id"], stem)
        if r["source"] == "unsupported":
            assert r["demo_tasks"][0] in ("color", "shape", "count"), r["id"]
    assert n_exist > 40


def test_a_position_question_about_several_objects_is_refused():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="single-object"):
        ask(rng, random_scene(rng, 2), "position")


def test_multiple_choice_options_keep_their_canonical_order(replica, train):
    mc = [r for r in train if r["demo_task"] == "mc"] + load_records(replica["eval"]["mmbench"])
    assert len(mc) > 20
    for r in mc:
        lines = r["conversations"][0]["value"].split("\n")
        options = [line[3:] for line in lines if line[:3] in ("A. ", "B. ", "C. ", "D. ")]
        assert options in (list(COLORS), list(SHAPES)), r["id"]


def test_duplicates_are_shifted_re_renders(replica, train):
    by_id = {r["id"]: r for r in train}
    dups = [r for r in train if r["source"] == "duplicate"]
    assert dups
    for r in dups:
        orig = by_id[r["demo_duplicate_of"]]
        assert orig["source"] in ("vqa", "mc", "conversation") and orig["demo_duplicate_of"] is None
        assert r["conversations"] == orig["conversations"] and r["image"] != orig["image"]
        a, b = _pixels(replica["image_folder"], r), _pixels(replica["image_folder"], orig)
        assert (np.abs(a - b).sum(-1) > 0).any()
        best = min(np.abs(np.roll(a, (dy, dx), (0, 1)) - b)[2:-2, 2:-2].sum() for dy in (-1, 1) for dx in (-1, 1))
        assert best == 0


def test_uninformative_images_hold_no_shape(replica, train):
    """Blank grey (one colour, not a shape colour) or uniform noise (hundreds of colours)."""
    n = 0
    for r in train:
        if r["source"] == "unsupported":
            colours = {tuple(c) for c in _pixels(replica["image_folder"], r).reshape(-1, 3)}
            grey = len(colours) == 1 and len(set(next(iter(colours)))) == 1
            assert grey or len(colours) > 500, r["id"]
            n += 1
    assert n > 0


def test_benchmark_sets_are_clean_and_disjoint_from_the_pool(replica, train):
    pool_images = {r["image"] for r in train if "image" in r}
    seen = set()
    for split, n in (("targets", 8), ("eval", 20)):
        for bench, path in replica[split].items():
            recs = load_records(path)
            assert len(recs) == n
            for r in recs:
                assert r["source"] == bench and r["demo_task"] in BENCHMARKS[bench]
                assert not r["demo_noisy"] and _answers(r) == r["demo_answers"] and len(r["conversations"]) == 2
                assert r["image"] not in pool_images and r["image"] not in seen
                assert os.path.isfile(os.path.join(replica["image_folder"], r["image"]))
                seen.add(r["image"])
    pope = load_records(replica["eval"]["pope"])
    assert 0.25 < np.mean([r["demo_answers"][0] == "yes" for r in pope]) < 0.75
    mc = load_records(replica["eval"]["mmbench"])
    assert {r["demo_answers"][0] for r in mc} <= set("ABCD") and len({r["demo_answers"][0] for r in mc}) > 1


def test_sets_do_not_change_with_the_pool_size(tmp_path):
    a = make_replica_data(str(tmp_path / "a"), n_train=30, seed=1, n_target=2, n_eval=3)
    b = make_replica_data(str(tmp_path / "b"), n_train=60, seed=1, n_target=2, n_eval=3)
    for split in ("targets", "eval"):
        for bench in a[split]:
            assert load_records(a[split][bench]) == load_records(b[split][bench])


def _object_type_in_pixels(px):
    """``(colour, shape)`` of a one-type scene from the pixels: colour by RGB, shape by the filled area of one
    copy (12-pixel square 144, circle 112, triangle 78 pixels)."""
    colour = next(iter(_objects_in_pixels(px).values()))
    copies = len(_objects_in_pixels(px))
    area = int(np.any(px != np.array(BACKGROUND), axis=2).sum()) / copies
    shape = "square" if area > 128 else "circle" if area > 95 else "triangle"
    return colour, shape


def test_captions_name_every_object(tmp_path):
    d = make_stage1_data(str(tmp_path / "cap"), n_train=30, n_eval=10, seed=5)
    train, held_out = load_records(d["train"]), load_records(d["eval"])
    assert len(train) == 30 and len(held_out) == 10
    assert not {r["image"] for r in train} & {r["image"] for r in held_out}
    assert {r["source"] for r in train} == {"caption"}
    for r in train + held_out:
        text = r["conversations"][1]["value"]
        found = _objects_in_pixels(_pixels(d["image_folder"], r))
        assert text.count(" at the ") == len(found)
        for quad, colour in found.items():
            assert f"{colour} " in text and f"at the {quad}" in text


def test_matching_records_say_whether_the_text_names_the_pictured_type(tmp_path):
    d = make_stage1_data(str(tmp_path / "cap"), n_train=20, n_eval=40, seed=5, n_matching=200)
    train, held_out = load_records(d["train"]), load_records(d["matching_eval"])
    matching = [r for r in train if r["source"] == "matching"]
    assert len(matching) == 200 and len(train) == 220 and len(held_out) == 40
    assert not {r["image"] for r in matching} & {r["image"] for r in held_out}
    changed = {"colour": 0, "shape": 0, "both": 0}
    for r in matching + held_out:
        question, answer = r["conversations"][0]["value"], r["conversations"][1]["value"]
        assert question.startswith("<image>\n" + MATCH_PROMPT + "\n")
        _, colour, shape = question.rsplit("\n", 1)[1].split(" ")
        true_colour, true_shape = _object_type_in_pixels(_pixels(d["image_folder"], r))
        assert answer == ("yes" if (colour, shape) == (true_colour, true_shape) else "no"), r["id"]
        if answer == "no":
            changed["both" if colour != true_colour and shape != true_shape else
                    "colour" if colour != true_colour else "shape"] += 1
    n_no = sum(changed.values())
    assert 0.4 < n_no / 240 < 0.6
    assert all(c > n_no / 6 for c in changed.values()), changed  # a third each: one attribute never decides


def test_matching_leaves_the_captions_unchanged(tmp_path):
    a = make_stage1_data(str(tmp_path / "a"), n_train=12, n_eval=4, seed=2)
    b = make_stage1_data(str(tmp_path / "b"), n_train=12, n_eval=4, seed=2, n_matching=30)
    assert load_records(a["eval"]) == load_records(b["eval"])
    assert sorted(load_records(a["train"]), key=lambda r: r["id"]) == sorted(
        [r for r in load_records(b["train"]) if r["source"] == "caption"], key=lambda r: r["id"])


def test_every_record_builds_with_the_tiny_model(replica, train, tiny_model_dir):
    from transformers import AutoConfig, AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    config = AutoConfig.from_pretrained(tiny_model_dir)
    builder = LlavaSampleBuilder(processor, config, replica["image_folder"], max_length=512)
    pools = [train] + [load_records(p) for split in ("targets", "eval") for p in replica[split].values()]
    n = 0
    for recs in pools:
        for i, r in enumerate(recs):
            s = builder.build(i, r)
            assert (s["pixel_values"] is not None) == ("image" in r)
            n_img = int((s["input_ids"] == config.image_token_index).sum())
            assert n_img == (config.image_seq_length if "image" in r else 0)
            n += 1
    assert n == N + len(TARGET_BENCHMARKS) * 8 + len(BENCHMARKS) * 20


def test_matching_and_caption_accuracy_score_the_greedy_answers(tmp_path, tiny_model_dir, monkeypatch):
    from icons_fast import demo

    d = make_stage1_data(str(tmp_path / "cap"), n_train=2, n_eval=4, seed=3, n_matching=0)
    matching, captions = load_records(d["matching_eval"]), load_records(d["eval"])
    # The real model path runs end to end (an untrained model: only the shape of the answer is known).
    got = demo.matching_accuracy(tiny_model_dir, matching, d["image_folder"])
    assert got["n"] == 4 and 0.0 <= got["accuracy"] <= 1.0 and 0.0 <= got["yes_rate"] <= 1.0
    # The scoring, with the answers fixed: the truth for the first two, the opposite for the rest.
    gold = [r["conversations"][1]["value"] for r in matching]
    flipped = gold[:2] + [{"yes": "no", "no": "yes"}[g] for g in gold[2:]]
    monkeypatch.setattr(demo, "_greedy_answers", lambda *a, **k: flipped)
    got = demo.matching_accuracy(tiny_model_dir, matching, d["image_folder"])
    assert got["accuracy"] == 0.5 and got["yes_rate"] == sum(p == "yes" for p in flipped) / 4
    # Captions: the first one with a wrong count word, the rest exact.
    truth = [r["conversations"][1]["value"] for r in captions]
    head, rest = truth[0].split(" ", 1)
    predicted = [("one" if head != "one" else "two") + " " + rest] + truth[1:]
    monkeypatch.setattr(demo, "_greedy_answers", lambda *a, **k: predicted)
    got = demo.caption_accuracy(tiny_model_dir, captions, d["image_folder"])
    assert got["exact"] == 0.75 and got["count"] == 0.75 and got["objects"] == 1.0


def test_stage1_base_caches_under_its_whole_recipe_and_reports_both_skills(tmp_path, monkeypatch):
    import json

    import icons_fast.fileio
    import icons_fast.train.finetune
    from icons_fast import demo

    trained = []

    def fake_train(cfg, data_path, out_dir):  # stands in for the minutes of pre-training
        trained.append(load_records(data_path))
        os.makedirs(os.path.join(out_dir, "model"))
        open(os.path.join(out_dir, "model", "config.json"), "w").close()
        return os.path.join(out_dir, "model")

    monkeypatch.setattr(icons_fast.fileio, "cache_dir", lambda: str(tmp_path))
    monkeypatch.setattr(icons_fast.train.finetune, "run_train", fake_train)
    monkeypatch.setattr(demo, "caption_accuracy", lambda *a: {"exact": 1.0, "objects": 1.0, "count": 1.0, "n": 64})
    monkeypatch.setattr(demo, "matching_accuracy", lambda *a: {"accuracy": 0.9, "yes_rate": 0.5, "n": 64})
    model = demo.stage1_base(n_captions=4, n_matching=6, epochs=1)
    root = os.path.dirname(model)
    assert os.path.basename(root).startswith("stage1-v") and "-n4-m6-e1-" in os.path.basename(root)
    assert len(trained) == 1 and Counter(r["source"] for r in trained[0]) == {"caption": 4, "matching": 6}
    with open(os.path.join(root, "base_report.json")) as f:
        report = json.load(f)
    assert report["stage1"]["n_matching"] == 6 and report["held_out_matching"]["accuracy"] == 0.9
    assert report["held_out_captions"]["exact"] == 1.0
    assert demo.stage1_base(n_captions=4, n_matching=6, epochs=1) == model and len(trained) == 1  # cached
    assert demo.stage1_base(n_captions=4, n_matching=0, epochs=1) != model and len(trained) == 2
