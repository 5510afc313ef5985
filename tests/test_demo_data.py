"""Embedded demo data: determinism, tasks, ground-truth flags, pixels that match the answers."""
import hashlib
import os

import numpy as np
import pytest
from PIL import Image

from icons_fast.data import LlavaSampleBuilder, load_records, make_demo_data
from icons_fast.data.demo import BACKGROUND, COLORS, IMAGE_TASKS, SHORT_ANSWER, TASKS


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
def demo(tmp_path_factory):
    return make_demo_data(str(tmp_path_factory.mktemp("demo")), n_train=600, seed=0)


@pytest.fixture(scope="module")
def train(demo):
    return load_records(demo["train"])


def _pixels(demo, rec):
    return np.asarray(Image.open(os.path.join(demo["image_folder"], rec["image"])).convert("RGB")).astype(int)


def _answers(rec):
    return [t["value"] for t in rec["conversations"][1::2]]


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = make_demo_data(str(tmp_path / "a"), n_train=97, seed=3, n_target=3, n_eval=5)
    b = make_demo_data(str(tmp_path / "b"), n_train=97, seed=3, n_target=3, n_eval=5)
    c = make_demo_data(str(tmp_path / "c"), n_train=97, seed=4, n_target=3, n_eval=5)
    da, db, dc = (_tree_digest(str(tmp_path / x)) for x in "abc")
    assert da == db and len(da) > 97
    assert da != dc and da["train.json"] != dc["train.json"]
    assert sorted(a["targets"]) == sorted(a["eval"]) == sorted(TASKS) == sorted(b["targets"])
    assert os.path.relpath(a["train"], str(tmp_path / "a")) == "train.json"
    assert os.path.isdir(c["image_folder"])


def test_tasks_noise_duplicates_and_multi_turn(train):
    assert len(train) == 600
    assert len({r["id"] for r in train}) == 600
    tasks = [r["demo_task"] for r in train]
    for t in TASKS:
        assert tasks.count(t) >= 60, t
    noisy = [r for r in train if r["demo_noisy"]]
    dups = [r for r in train if r["demo_duplicate_of"] is not None]
    assert 0.10 <= len(noisy) / 600 <= 0.20
    assert 0.10 <= len(dups) / 600 <= 0.20
    assert sum(len(r["demo_tasks"]) > 1 for r in train) >= 20
    for r in train:
        wrong = [a != t for a, t in zip(_answers(r), r["demo_answers"])]
        assert sum(wrong) == (1 if r["demo_noisy"] else 0), r["id"]  # noise = exactly one wrong answer
        assert len(r["demo_answers"]) == len(r["demo_tasks"]) == len(r["conversations"]) // 2
        for turn in r["conversations"][0::2]:
            assert turn["value"].endswith(SHORT_ANSWER)
        assert ("image" in r) == (r["demo_task"] in IMAGE_TASKS)
        assert ("<image>" in r["conversations"][0]["value"]) == ("image" in r)
        assert all(len(a.split()) == 1 for a in _answers(r))


def test_duplicates_are_jittered_copies(demo, train):
    by_id = {r["id"]: r for r in train}
    for r in train:
        if r["demo_duplicate_of"] is None:
            continue
        orig = by_id[r["demo_duplicate_of"]]
        assert orig["demo_duplicate_of"] is None
        assert r["conversations"] == orig["conversations"] and r["demo_noisy"] == orig["demo_noisy"]
        if "image" in r:
            assert r["image"] != orig["image"]
            a, b = _pixels(demo, r), _pixels(demo, orig)
            diff = np.abs(a - b).sum(-1) > 0
            # a one-pixel shift: some pixels change, and shifting back explains nearly all of the image
            assert 0 < diff.mean() < 0.5
            best = min(np.abs(np.roll(a, (dy, dx), (0, 1)) - b)[2:-2, 2:-2].sum()
                       for dy in (-1, 1) for dx in (-1, 1))
            assert best < 0.02 * np.abs(a - b)[2:-2, 2:-2].sum() + 1


def _foreground(px):
    return np.any(px != np.array(BACKGROUND), axis=-1)


def test_pixels_agree_with_the_true_answers(demo, train):
    """Independent of the generator's scene code: read colour, position and shape from the pixels."""
    checked = 0
    for r in train:
        if "image" not in r or r["demo_task"] == "count" or r["demo_duplicate_of"] is not None:
            continue
        px = _pixels(demo, r)
        fg = _foreground(px)
        truth = dict(zip(r["demo_tasks"], r["demo_answers"]))
        if "color" in truth:
            colours, counts = np.unique(px[fg], axis=0, return_counts=True)
            assert tuple(colours[counts.argmax()]) == COLORS[truth["color"]]
        ys, xs = np.nonzero(fg)
        if "position" in truth:
            cx, cy = xs.mean() - 15.5, ys.mean() - 15.5
            pos = ("right" if cx > 0 else "left") if abs(cx) > abs(cy) else ("bottom" if cy > 0 else "top")
            assert pos == truth["position"], r["id"]
        if "shape" in truth:
            fill = fg.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
            shape = "square" if fill > 0.9 else ("circle" if fill > 0.68 else "triangle")
            assert shape == truth["shape"], (r["id"], fill)
        checked += 1
    assert checked > 300


def test_count_answers_match_foreground_cells(demo, train):
    for r in train:
        if r["demo_task"] != "count" or r["demo_duplicate_of"] is not None:
            continue
        fg = _foreground(_pixels(demo, r))
        # shapes sit one per 8x8 cell, centre within one pixel of the cell centre
        cells = sum(fg[8 * i + 3: 8 * i + 6, 8 * j + 3: 8 * j + 6].any() for i in range(4) for j in range(4))
        assert str(cells) == r["demo_answers"][0]


def test_targets_and_eval_sets(demo, train):
    train_images = {r["image"] for r in train if "image" in r}
    seen = set()
    for split, n in (("targets", 16), ("eval", 48)):
        for task in TASKS:
            recs = load_records(demo[split][task])
            assert len(recs) == n
            for r in recs:
                assert r["demo_task"] == task and not r["demo_noisy"] and len(r["conversations"]) == 2
                assert _answers(r) == r["demo_answers"]
                if "image" in r:
                    assert r["image"] not in train_images and r["image"] not in seen
                    assert os.path.isfile(os.path.join(demo["image_folder"], r["image"]))
                    seen.add(r["image"])
                else:
                    assert task == "arithmetic"


def test_every_demo_record_builds_with_the_tiny_model(demo, train, tiny_model_dir):
    from transformers import AutoConfig, AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    config = AutoConfig.from_pretrained(tiny_model_dir)
    builder = LlavaSampleBuilder(processor, config, demo["image_folder"], max_length=512)
    pools = [train] + [load_records(p) for split in ("targets", "eval") for p in demo[split].values()]
    n = 0
    for recs in pools:
        for i, r in enumerate(recs):
            s = builder.build(i, r)
            assert (s["pixel_values"] is not None) == ("image" in r)
            n_img = int((s["input_ids"] == config.image_token_index).sum())
            assert n_img == (config.image_seq_length if "image" in r else 0)
            n += 1
    assert n == 600 + 5 * (16 + 48)
