"""Embedded demo data: a small multi-task visual QA pool, generated, never downloaded.

``make_demo_data`` renders coloured shapes on a white canvas and asks LLaVA-style
short-answer questions about them, one task per question type:

    color      "What color is the shape?"            red / green / blue / yellow / purple / orange
    shape      "What shape is shown?"                circle / square / triangle
    count      "How many shapes are there?"          1 .. 5
    position   "Where is the shape? ..."             left / right / top / bottom
    arithmetic "What is 3 plus 4?" (text only)       a number

Every question ends with LLaVA's short-answer suffix :data:`SHORT_ANSWER`. The
training pool is built to give a selector something to find:

- near-duplicates (~15%): the scene of another record re-rendered shifted by
  one pixel, with the same conversation (``demo_duplicate_of`` = that record's id);
- label noise (~15% of records): one answer replaced by a wrong one
  (``demo_noisy`` true; ``demo_answers`` holds the true answers); a duplicate
  copies its original's answers, noise included;
- multi-turn records (~10% of image records): two or three questions about one scene.

The ground truth lives in extra keys (``demo_task``, ``demo_tasks``,
``demo_answers``, ``demo_noisy``, ``demo_duplicate_of``), which every loader
keeps untouched. Target sets (``targets/<task>.json``, clean, single-turn) and
held-out evaluation sets (``eval/<task>.json``) use their own images and their
own random streams, so they do not change with ``n_train``.

``make_bad_samples`` writes a small pool with one record per malformed case,
interleaved with good records, and returns the reason code expected at each
index (for the tests of the data layer and of every stage after it).

Everything is seeded (numpy ``default_rng``) and PNG encoding is deterministic:
the same arguments give byte-identical files.
"""
from __future__ import annotations

import io
import json
import os

import numpy as np
from PIL import Image, ImageDraw

from icons_fast.data.records import save_records

TASKS = ("color", "shape", "count", "position", "arithmetic")
IMAGE_TASKS = ("color", "shape", "count", "position")
SHORT_ANSWER = "Answer the question using a single word or phrase."
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 160, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 205, 20),
    "purple": (140, 40, 170),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("left", "right", "top", "bottom")
COUNTS = ("1", "2", "3", "4", "5")
QUESTIONS = {
    "color": "What color is the shape?",
    "shape": "What shape is shown?",
    "count": "How many shapes are there?",
    "position": "Where is the shape? Is it on the left, right, top or bottom?",
}
BACKGROUND = (255, 255, 255)
# Centre ranges (on a 32-pixel grid) of the four position regions: (x range, y range).
_REGIONS = {
    "left": ((5, 9), (12, 20)),
    "right": ((23, 27), (12, 20)),
    "top": ((12, 20), (5, 9)),
    "bottom": ((12, 20), (23, 27)),
}
DUPLICATE_FRACTION = 0.15
NOISE_FRACTION = 0.15
MULTI_TURN_FRACTION = 0.10
# Separate random streams so that target / eval sets do not depend on n_train.
_STREAM = {"train": 0, "targets": 1, "eval": 2}


# ---------------------------------------------------------------- scenes and rendering

def _scene(rng, task: str) -> dict:
    """A scene: ``{"shapes": [(shape, color, cx, cy, size)], "position": str|None}`` on a 32 grid."""
    if task == "count":
        n = int(rng.integers(1, 6))
        cells = rng.choice(16, size=n, replace=False)  # 4x4 grid of 8-pixel cells: no overlap
        shapes = []
        for c in cells:
            cx = 8 * (int(c) % 4) + 4 + int(rng.integers(-1, 2))
            cy = 8 * (int(c) // 4) + 4 + int(rng.integers(-1, 2))
            shapes.append((str(rng.choice(SHAPES)), str(rng.choice(list(COLORS))), cx, cy, 6))
        return {"shapes": shapes, "position": None}
    shape, color = str(rng.choice(SHAPES)), str(rng.choice(list(COLORS)))
    if task == "position" or task == "multi":
        pos = str(rng.choice(POSITIONS))
        (x0, x1), (y0, y1) = _REGIONS[pos]
        cx, cy = int(rng.integers(x0, x1 + 1)), int(rng.integers(y0, y1 + 1))
        return {"shapes": [(shape, color, cx, cy, 8)], "position": pos}
    cx, cy = int(rng.integers(12, 21)), int(rng.integers(12, 21))
    return {"shapes": [(shape, color, cx, cy, int(rng.integers(10, 15)))], "position": None}


def _answer(scene: dict, task: str) -> str:
    if task == "color":
        return scene["shapes"][0][1]
    if task == "shape":
        return scene["shapes"][0][0]
    if task == "count":
        return str(len(scene["shapes"]))
    if task == "position":
        return scene["position"]
    raise ValueError(task)


def render_scene(scene: dict, image_size: int = 32, shift: tuple[int, int] = (0, 0)) -> Image.Image:
    """Draw the scene (coordinates on a 32 grid, scaled to ``image_size``), shifted by ``shift`` pixels."""
    s = image_size / 32.0
    img = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for shape, color, cx, cy, size in scene["shapes"]:
        x, y, r = cx * s + shift[0], cy * s + shift[1], size * s / 2.0
        box = [x - r, y - r, x + r - 1, y + r - 1]
        if shape == "circle":
            draw.ellipse(box, fill=COLORS[color])
        elif shape == "square":
            draw.rectangle(box, fill=COLORS[color])
        else:
            draw.polygon([(x, y - r), (x - r, y + r - 1), (x + r - 1, y + r - 1)], fill=COLORS[color])
    return img


def _save_png(img: Image.Image, path: str) -> None:
    img.save(path, format="PNG")


# ---------------------------------------------------------------- records

def _question(task: str, first: bool) -> str:
    q = f"{QUESTIONS[task]}\n{SHORT_ANSWER}"
    return f"<image>\n{q}" if first else q


def _arithmetic(rng) -> tuple[str, str]:
    kind = int(rng.integers(0, 3))
    a, b = int(rng.integers(0, 10)), int(rng.integers(0, 10))
    if kind == 0:
        return f"What is {a} plus {b}?", str(a + b)
    if kind == 1:
        a, b = max(a, b), min(a, b)
        return f"What is {a} minus {b}?", str(a - b)
    return f"What number comes after {a}?", str(a + 1)


def _wrong(rng, task: str, truth: str) -> str:
    if task == "arithmetic":
        value = int(truth) + int(rng.choice([-3, -2, -1, 1, 2, 3]))
        return str(value if value >= 0 else int(truth) + 1)
    choices = {"color": list(COLORS), "shape": SHAPES, "count": COUNTS, "position": POSITIONS}[task]
    return str(rng.choice([c for c in choices if c != truth]))


def _make_record(rng, rid: str, task: str, image_name: str | None, n_turns: int = 1):
    """One clean record and (for image tasks) its scene; ``task="multi"`` asks 2-3 questions."""
    if task == "arithmetic":
        q, a = _arithmetic(rng)
        conv = [{"from": "human", "value": f"{q}\n{SHORT_ANSWER}"}, {"from": "gpt", "value": a}]
        rec = {"id": rid, "conversations": conv, "demo_task": task, "demo_tasks": [task], "demo_answers": [a]}
        return rec, None
    scene = _scene(rng, task)
    if task == "multi":
        tasks = [str(t) for t in rng.permutation(["color", "shape", "position"])[:n_turns]]
    else:
        tasks = [task]
    conv, answers = [], []
    for t_i, t in enumerate(tasks):
        answers.append(_answer(scene, t))
        conv += [{"from": "human", "value": _question(t, t_i == 0)}, {"from": "gpt", "value": answers[-1]}]
    rec = {"id": rid, "image": image_name, "conversations": conv,
           "demo_task": tasks[0], "demo_tasks": tasks, "demo_answers": answers}
    return rec, scene


def _clean_set(out_dir: str, split: str, task: str, n: int, seed: int, image_size: int) -> list:
    rng = np.random.default_rng([seed, _STREAM[split], TASKS.index(task)])
    records = []
    for i in range(n):
        name = f"{split}_{task}_{i:04d}.png" if task in IMAGE_TASKS else None
        rec, scene = _make_record(rng, f"{split}-{task}-{i:04d}", task, name)
        rec.update(demo_noisy=False, demo_duplicate_of=None)
        if scene is not None:
            _save_png(render_scene(scene, image_size), os.path.join(out_dir, "images", name))
        records.append(rec)
    return records


def _train_pool(out_dir: str, n_train: int, seed: int, image_size: int) -> list:
    rng = np.random.default_rng([seed, _STREAM["train"]])
    n_dup = int(round(DUPLICATE_FRACTION * n_train))
    n_base = n_train - n_dup
    base, scenes = [], []
    for i in range(n_base):
        task = TASKS[i % len(TASKS)]
        n_turns = 1
        if task in IMAGE_TASKS and rng.random() < MULTI_TURN_FRACTION:
            task, n_turns = "multi", int(rng.integers(2, 4))
        name = f"train_{i:05d}.png" if task != "arithmetic" else None
        rec, scene = _make_record(rng, f"demo-{i:05d}", task, name, n_turns)
        rec.update(demo_noisy=False, demo_duplicate_of=None)
        base.append(rec)
        scenes.append(scene)
    # Label noise on exactly round(15%) of the originals: one answer made wrong.
    for i in rng.choice(n_base, size=int(round(NOISE_FRACTION * n_base)), replace=False):
        rec = base[int(i)]
        turn = int(rng.integers(0, len(rec["demo_tasks"])))
        gpt = rec["conversations"][2 * turn + 1]
        gpt["value"] = _wrong(rng, rec["demo_tasks"][turn], rec["demo_answers"][turn])
        rec["demo_noisy"] = True
    # Near-duplicates: same conversation (noise included), scene shifted by one pixel.
    dups = []
    for j, i in enumerate(rng.choice(n_base, size=n_dup, replace=False)):
        orig = base[int(i)]
        rec = json.loads(json.dumps(orig))
        rec["id"] = f"demo-{n_base + j:05d}"
        rec["demo_duplicate_of"] = orig["id"]
        if scenes[int(i)] is not None:
            rec["image"] = f"train_{n_base + j:05d}.png"
            shift = (int(rng.choice([-1, 1])), int(rng.choice([-1, 1])))
            _save_png(render_scene(scenes[int(i)], image_size, shift), os.path.join(out_dir, "images", rec["image"]))
        dups.append(rec)
    for rec, scene in zip(base, scenes):
        if scene is not None:
            _save_png(render_scene(scene, image_size), os.path.join(out_dir, "images", rec["image"]))
    pool = base + dups
    return [pool[int(k)] for k in rng.permutation(len(pool))]


def make_demo_data(out_dir: str, n_train: int = 600, seed: int = 0, image_size: int = 32,
                   n_target: int = 16, n_eval: int = 48) -> dict:
    """Write the demo pool, target sets and eval sets under ``out_dir``.

    Layout: ``train.json``, ``images/*.png``, ``targets/<task>.json`` (``n_target``
    clean single-turn records per task), ``eval/<task>.json`` (``n_eval`` per task).

    Returns ``dict(train=path, image_folder=path, targets={task: path},
    eval={task: path}, tasks=list)``.
    """
    if n_train < 1:
        raise ValueError(f"n_train must be >= 1, got {n_train}")
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    paths = {"train": os.path.join(out_dir, "train.json"), "image_folder": os.path.join(out_dir, "images"),
             "targets": {}, "eval": {}, "tasks": list(TASKS)}
    save_records(_train_pool(out_dir, n_train, seed, image_size), paths["train"])
    for split, n in (("targets", n_target), ("eval", n_eval)):
        for task in TASKS:
            path = os.path.join(out_dir, split, f"{task}.json")
            save_records(_clean_set(out_dir, split, task, n, seed, image_size), path)
            paths[split][task] = path
    return paths


# ---------------------------------------------------------------- malformed samples

BAD_SAMPLES_MAX_LENGTH = 1024  # the max_length that make_bad_samples' expectations assume


def make_bad_samples(out_dir: str, image_size: int = 32) -> dict:
    """A pool with one record per malformed case, interleaved with good records.

    Returns ``dict(json=path, image_folder=path, expected={index: reason code},
    good=[indices], max_length=BAD_SAMPLES_MAX_LENGTH)``. The good image records
    stay under ``max_length`` even with LLaVA-1.5's 576 image tokens; the
    over-long record is several thousand tokens for any tokenizer. The
    ``all_labels_masked`` record is one whose gpt answers are all empty, so
    only ``</s>`` would carry a label (see :mod:`icons_fast.data.conversation`).
    Answers of the good records match their images.
    """
    img_dir = os.path.join(out_dir, "images")
    os.makedirs(img_dir, exist_ok=True)
    rng = np.random.default_rng(1234)

    def good_png(name: str, task: str = "color") -> str:
        _save_png(render_scene(_scene(rng, task), image_size), os.path.join(img_dir, name))
        return name

    def good(rid, task: str, name: str | None = None, n_turns: int = 1) -> dict:
        """A clean record (answers match its image) without the demo_* keys."""
        rec, scene = _make_record(rng, rid, task, name, n_turns)
        if scene is not None:
            _save_png(render_scene(scene, image_size), os.path.join(img_dir, name))
        return {k: v for k, v in rec.items() if not k.startswith("demo_")}

    buf = io.BytesIO()
    render_scene(_scene(rng, "shape"), image_size).save(buf, format="PNG")
    png = buf.getvalue()
    with open(os.path.join(img_dir, "truncated.png"), "wb") as f:
        f.write(png[: len(png) // 2])
    with open(os.path.join(img_dir, "garbage.png"), "wb") as f:
        f.write(b"this is not an image" * 8)
    with open(os.path.join(img_dir, "empty.jpg"), "wb"):
        pass
    render_scene(_scene(rng, "shape"), image_size).save(os.path.join(img_dir, "gif_named.jpg"), format="GIF")

    def conv(*turns):
        return [{"from": ("human", "gpt")[i % 2], "value": v} for i, v in enumerate(turns)]

    q = _question("color", True)
    cases = [
        # (record, expected code or None for a good record)
        ({**good("good-0", "color", "good0.png"), "source": "kept"}, None),
        ({"id": "missing", "image": "no_such_file.png", "conversations": conv(q, "red")}, "missing_image"),
        (good("good-1", "arithmetic"), None),
        ({"id": "truncated", "image": "truncated.png", "conversations": conv(q, "blue")}, "corrupt_image"),
        ({"id": "gif", "image": "gif_named.jpg", "conversations": conv(q, "blue")}, "image_format_mismatch"),
        ({**good("good-2", "count", "good2.png"), "id": 7}, None),
        ({"id": "token-no-image", "conversations": conv(q, "red")}, "image_token_without_image"),
        ({"id": "image-no-token", "image": good_png("good3.png"),
          "conversations": conv("What color is the shape?", "red")}, "image_without_image_token"),
        (good("good-3", "multi", "good4.png", n_turns=3), None),
        ({"id": "empty-conv", "conversations": []}, "empty_conversation"),
        ({"id": "no-gpt", "conversations": [{"from": "human", "value": "Hello?"}]}, "no_gpt_turn"),
        ({"id": "good-4", "conversations": conv("What number comes after 5?", "6", "And after 6?", "7")}, None),
        ({"id": "too-long", "conversations": conv("Please repeat:" + " word" * 4000, "word")}, "too_long"),
        ({"id": "empty-answers", "conversations": conv("Say nothing.", "", "Again.", "  ")}, "all_labels_masked"),
        ({"id": "two-images", "image": good_png("good5.png"),
          "conversations": conv("<image>\n<image>\nWhat color?", "red")}, "multiple_image_tokens"),
        ({"id": "gpt-first", "conversations": [{"from": "gpt", "value": "Hi."},
                                               {"from": "human", "value": "Hello?"}]}, "bad_turn_order"),
        ({"id": "zero-bytes", "image": "empty.jpg", "conversations": conv(q, "red")}, "empty_image"),
        ({"id": "garbage", "image": "garbage.png", "conversations": conv(q, "red")}, "corrupt_image"),
        ({"id": "no-conversations", "image": good_png("good6.png")}, "bad_record"),
        (good("good-5", "position", "good7.png"), None),
    ]
    records = [rec for rec, _ in cases]
    path = os.path.join(out_dir, "bad.json")
    save_records(records, path)
    return dict(json=path, image_folder=img_dir,
                expected={i: code for i, (_, code) in enumerate(cases) if code is not None},
                good=[i for i, (_, code) in enumerate(cases) if code is None],
                max_length=BAD_SAMPLES_MAX_LENGTH)
