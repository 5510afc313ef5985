"""A generated replica of LLaVA's data: caption and image-text matching sets for stage 1, a mixed-quality stage-2 pool, benchmarks.

Everything is rendered here (coloured shapes on a 32x32 canvas), never downloaded,
and seeded: the same arguments give byte-identical files.

Scenes: one to three copies of one object type (a colour out of red, green,
blue, yellow and a shape out of circle, square, triangle), each copy in its own
quadrant of the canvas (top left, top right, bottom left, bottom right). One
type per image keeps every question's referent unambiguous ("the shapes" are
all one colour and shape) and within reach of the built-in model: with several types
per image it learns each question kind alone but not the mixed pool
(``benchmarks/RESULTS.md`` section 9). Position questions are asked only about
single-object scenes, where "where is it" has one answer.

Stage 1 (:func:`make_stage1_data`), LLaVA's alignment pre-training: "Describe
the image." answered with a caption that names every object, e.g.
``two shapes: a red circle at the top left, a red circle at the bottom right``,
plus image-text matching ("Does the caption fit the image?\na red circle" ->
yes / no). LLaVA's vision tower arrives from CLIP, pre-trained to tell which texts
match an image; the built-in model starts from random weights, and captions alone
do not teach it to compare a text with the image (``benchmarks/RESULTS.md``
section 9: without matching the full pool stays at chance on pope).

Stage 2 (:func:`make_replica_data`), a pool built like LLaVA-665K from sources
of different quality and format. Every record carries its source in ``source``:

    source         share  what
    vqa            .30    clean short-answer VQA (colour, shape, count, yes/no existence, position)
    mc             .10    clean lettered multiple choice (A-OKVQA style)
    conversation   .10    2-3 turns about one image, answered in sentences
    caption        .06    "Describe the image." -> the caption
    lowquality     .13    VQA / multiple choice where most answers (60%) are wrong
    duplicate      .10    a vqa / mc / conversation record re-rendered one pixel off
    unsupported    .08    uninformative image (blank or noise) with an answer it cannot support
    text           .13    text-only instructions (arithmetic), no image

Benchmarks (``targets/<name>.json``: a small validation set used as the
selection target; ``eval/<name>.json``: a separate held-out test set). They
share the same perception, as VQAv2 / GQA / POPE / MMBench do:

    vqa       "What color are the shapes?" / "What shape is it?"           chance 1/4 or 1/3
    pope      "Is there a blue square in the image?" -> yes / no           chance 1/2
    mmbench   lettered options (colours or shapes, always in the same
              order), answer with the letter                               chance 1/4 or 1/3
    count     "How many shapes are there?" -> 1 / 2 / 3                     chance 1/3
    position  "Where is the shape?" -> top left / ...  (one object)         never a target (unseen)

Ground truth lives in extra keys that every loader keeps untouched:
``demo_task`` (question kind of the first turn), ``demo_tasks`` (one kind per
turn), ``demo_answers`` (the true answer of each turn, ``None`` where the image
cannot tell), ``demo_noisy`` (some answer is wrong or unsupported) and
``demo_duplicate_of`` (the id of the re-rendered original). Target, test and stage-1
sets use their own random streams and image names, so they never share
an image with the pool and do not change with ``n_train``.
"""
from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image, ImageDraw

from icons_fast.data.records import save_records

# Bumped whenever the generated data changes, so that caches built on it (the stage-1 base) are rebuilt.
VERSION = 3
SHORT_ANSWER = "Answer the question using a single word or phrase."
MC_SUFFIX = "Answer with the option's letter from the given choices directly."
CAPTION_PROMPT = "Describe the image."
MATCH_PROMPT = "Does the caption fit the image?"
COLORS = {"red": (220, 30, 30), "green": (30, 160, 40), "blue": (30, 60, 220), "yellow": (235, 205, 20)}
SHAPES = ("circle", "square", "triangle")
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
_CENTRES = {"top left": (8, 8), "top right": (24, 8), "bottom left": (8, 24), "bottom right": (24, 24)}
BACKGROUND = (255, 255, 255)
NUMBER_WORDS = ("zero", "one", "two", "three")
KINDS = ("color", "shape", "count", "exist", "position", "mc")
BENCHMARKS = {"vqa": ("color", "shape"), "pope": ("exist",), "mmbench": ("mc",), "count": ("count",),
              "position": ("position",)}
TARGET_BENCHMARKS = ("vqa", "pope", "mmbench", "count")
UNSEEN_BENCHMARKS = ("position",)
SOURCES = {"vqa": 0.30, "mc": 0.10, "conversation": 0.10, "caption": 0.06, "lowquality": 0.13,
           "duplicate": 0.10, "unsupported": 0.08, "text": 0.13}
# Question kinds per source and their weights; position needs a single-object scene. Existence
# questions weigh four times the others in the clean VQA source: they are the one kind that compares
# the question's words with the image, and the built-in model learns them last in a mixed pool
# (benchmarks/RESULTS.md section 9: near chance there until stage 1 trained image-text matching).
VQA_KINDS = {"color": 1, "shape": 1, "count": 1, "exist": 4, "position": 1}
LOWQUALITY_KINDS = ("color", "shape", "count", "exist", "mc")
CONVERSATION_KINDS = ("color", "shape", "count", "exist")
LOWQUALITY_WRONG = 0.6  # share of wrong answers in the low-quality source
# Separate random streams: the pool, the targets, the test sets, the captions and the matching records
# never share a draw.
_STREAM = {"train": 0, "targets": 1, "eval": 2, "captions": 3, "matching": 4}


# ---------------------------------------------------------------- scenes and rendering

def random_scene(rng, n_objects: int | None = None) -> list[tuple[str, str, str]]:
    """``[(colour, shape, quadrant)]`` in quadrant order: one colour and shape, distinct quadrants."""
    n = int(rng.integers(1, 4)) if n_objects is None else n_objects
    colour, shape = str(rng.choice(list(COLORS))), str(rng.choice(SHAPES))
    quads = sorted(rng.choice(len(QUADRANTS), size=n, replace=False))
    return [(colour, shape, QUADRANTS[q]) for q in quads]


def render_scene(scene, image_size: int = 32, shift: tuple[int, int] = (0, 0), jitter=None) -> Image.Image:
    """Draw ``scene`` (each object 12 pixels wide, centred in its quadrant, on a 32 grid scaled to ``image_size``).

    ``jitter``: per-object ``(dx, dy)`` offsets of the centre; ``shift`` moves the whole drawing.
    """
    s = image_size / 32.0
    img = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for i, (colour, shape, quad) in enumerate(scene):
        cx, cy = _CENTRES[quad]
        dx, dy = jitter[i] if jitter is not None else (0, 0)
        x, y, r = (cx + dx) * s + shift[0], (cy + dy) * s + shift[1], 6 * s
        box = [x - r, y - r, x + r - 1, y + r - 1]
        if shape == "circle":
            draw.ellipse(box, fill=COLORS[colour])
        elif shape == "square":
            draw.rectangle(box, fill=COLORS[colour])
        else:
            draw.polygon([(x, y - r), (x - r, y + r - 1), (x + r - 1, y + r - 1)], fill=COLORS[colour])
    return img


def uninformative_image(rng, image_size: int = 32) -> Image.Image:
    """A blank grey canvas or uniform noise: nothing in it answers a question about shapes."""
    if rng.random() < 0.5:
        level = int(rng.integers(120, 200))
        return Image.new("RGB", (image_size, image_size), (level, level, level))
    return Image.fromarray(rng.integers(0, 256, size=(image_size, image_size, 3), dtype=np.uint8))


def caption(scene) -> str:
    """The caption that names every object: ``two shapes: a red circle at the top left, a red circle at ...``."""
    n = len(scene)
    head = f"{NUMBER_WORDS[n]} shape{'s' if n > 1 else ''}"
    return head + ": " + ", ".join(f"a {c} {s} at the {q}" for c, s, q in scene)


def matching_pair(rng, scene) -> tuple[str, str]:
    """Stage-1 image-text matching about ``scene``: ``(text, "yes" | "no")``.

    The text names one object type, ``a <colour> <shape>``. Half the texts name
    the scene's type ("yes"); the others change its colour, its shape or both (a
    third each, "no"), so that one attribute alone never decides.
    """
    colour, shape, _ = scene[0]
    if rng.random() < 0.5:
        return f"a {colour} {shape}", "yes"
    other_colour = str(rng.choice([c for c in COLORS if c != colour]))
    other_shape = str(rng.choice([s for s in SHAPES if s != shape]))
    change = rng.random()
    if change < 1 / 3:
        return f"a {other_colour} {shape}", "no"
    if change < 2 / 3:
        return f"a {colour} {other_shape}", "no"
    return f"a {other_colour} {other_shape}", "no"


# ---------------------------------------------------------------- questions

def ask(rng, scene, kind: str) -> tuple[str, str, list[str]]:
    """A question of ``kind`` about ``scene``: ``(question, true short answer, wrong answers)``.

    The question has no answer-format suffix; ``mc`` questions carry their options.
    Only existence questions name a colour and a shape (and must compare them with
    the image); every other kind reads one attribute of the image's single object
    type, so it names none ("What color are the shapes?").
    """
    obj = scene[int(rng.integers(len(scene)))]
    colour, shape, quad = obj
    many = len(scene) > 1
    colour_question = "What color are the shapes?" if many else "What color is the shape?"
    shape_question = "What shape are they?" if many else "What shape is it?"
    if kind == "color":
        return colour_question, colour, [c for c in COLORS if c != colour]
    if kind == "shape":
        return shape_question, shape, [s for s in SHAPES if s != shape]
    if kind == "count":
        n = str(len(scene))
        return "How many shapes are there?", n, [str(k) for k in (1, 2, 3) if str(k) != n]
    if kind == "position":
        if len(scene) != 1:
            raise ValueError(f"a position question needs a single-object scene, got {len(scene)} objects")
        return "Where is the shape?", quad, [q for q in QUADRANTS if q != quad]
    if kind == "exist":
        if rng.random() < 0.5:
            return f"Is there a {colour} {shape} in the image?", "yes", ["no"]
        # An absent object: half reuse the scene's colour with another shape (POPE's "adversarial"
        # negatives), half take another colour.
        if rng.random() < 0.5:
            c, s = colour, str(rng.choice([s for s in SHAPES if s != shape]))
        else:
            c, s = str(rng.choice([c for c in COLORS if c != colour])), str(rng.choice(SHAPES))
        return f"Is there a {c} {s} in the image?", "no", ["yes"]
    if kind == "mc":
        if rng.random() < 0.5:
            question, truth, options = colour_question, colour, list(COLORS)
        else:
            question, truth, options = shape_question, shape, list(SHAPES)
        # Options keep their canonical order: with shuffled options the built-in model stays at chance.
        letters = "ABCD"[: len(options)]
        body = question + "\n" + "\n".join(f"{letter}. {o}" for letter, o in zip(letters, options))
        right = letters[options.index(truth)]
        return body, right, [letter for letter in letters if letter != right]
    raise ValueError(f"unknown question kind {kind!r}; choose from {KINDS}")


def sentence(kind: str, answer: str, n_objects: int) -> str:
    """The conversation source's long-form answer about a scene of ``n_objects`` copies."""
    if kind == "color":
        return f"They are {answer}." if n_objects > 1 else f"It is {answer}."
    if kind == "shape":
        return f"They are {answer}s." if n_objects > 1 else f"It is a {answer}."
    if kind == "count":
        return f"There {'is' if answer == '1' else 'are'} {answer} shape{'s' if answer != '1' else ''}."
    if kind == "position":
        return f"It is at the {answer}."
    if kind == "exist":
        return "Yes, there is." if answer == "yes" else "No, there is not."
    raise ValueError(kind)


def suffix(kind: str) -> str:
    return MC_SUFFIX if kind == "mc" else SHORT_ANSWER


def _record(rid, image, turns, tasks, truths, source) -> dict:
    """A LLaVA record from ``[(question, answer)]``; ``<image>`` goes before the first question."""
    conv = []
    for i, (q, a) in enumerate(turns):
        conv += [{"from": "human", "value": f"<image>\n{q}" if i == 0 and image else q}, {"from": "gpt", "value": a}]
    rec = {"id": rid, "conversations": conv}
    if image:
        rec["image"] = image
    rec.update(source=source, demo_task=tasks[0], demo_tasks=list(tasks), demo_answers=list(truths),
               demo_noisy=any(t is None or t != a for t, (_, a) in zip(truths, turns)), demo_duplicate_of=None)
    return rec


def arithmetic(rng) -> tuple[str, str]:
    """A text-only instruction and its answer."""
    kind = int(rng.integers(0, 3))
    a, b = int(rng.integers(0, 10)), int(rng.integers(0, 10))
    if kind == 0:
        return f"What is {a} plus {b}?", str(a + b)
    if kind == 1:
        a, b = max(a, b), min(a, b)
        return f"What is {a} minus {b}?", str(a - b)
    return f"What number comes after {a}?", str(a + 1)


def short_record(rng, rid, image, scene, kind, source="vqa", wrong: bool = False) -> dict:
    """One single-turn short-answer (or lettered) question; ``wrong`` gives a wrong answer."""
    q, truth, wrongs = ask(rng, scene, kind)
    answer = str(rng.choice(wrongs)) if wrong else truth
    return _record(rid, image, [(f"{q}\n{suffix(kind)}", answer)], [kind], [truth], source)


# ---------------------------------------------------------------- sets

def _jitter(rng, scene):
    return [(int(rng.integers(-1, 2)), int(rng.integers(-1, 2))) for _ in scene]


def _draw(rng, out_dir, name, scene, image_size):
    jitter = _jitter(rng, scene)
    render_scene(scene, image_size, jitter=jitter).save(os.path.join(out_dir, "images", name), format="PNG")
    return jitter


def _pool_record(rng, i, source, out_dir, image_size):
    """Record ``i`` of ``source``; returns ``(record, (scene, jitter) or None)``."""
    rid, name = f"pool-{i:05d}", f"pool_{i:05d}.png"
    if source == "text":
        q, a = arithmetic(rng)
        return _record(rid, None, [(f"{q}\n{SHORT_ANSWER}", a)], ["arithmetic"], [a], source), None
    if source == "unsupported":
        uninformative_image(rng, image_size).save(os.path.join(out_dir, "images", name), format="PNG")
        kind = str(rng.choice(["color", "shape", "count"]))
        q, a, _ = ask(rng, random_scene(rng), kind)  # a question about a scene that is not in the image
        return _record(rid, name, [(f"{q}\n{SHORT_ANSWER}", a)], [kind], [None], source), None
    if source not in ("vqa", "mc", "lowquality", "caption", "conversation"):
        raise ValueError(f"unknown source {source!r}; choose from {sorted(SOURCES)}")
    kind = None  # the question kind of a single-turn source, drawn before the scene (position needs one object)
    if source == "vqa":
        weights = np.array(list(VQA_KINDS.values()), dtype=float)
        kind = str(rng.choice(list(VQA_KINDS), p=weights / weights.sum()))
    elif source == "lowquality":
        kind = str(rng.choice(LOWQUALITY_KINDS))
    elif source == "mc":
        kind = "mc"
    scene = random_scene(rng, 1 if kind == "position" else None)
    jitter = _draw(rng, out_dir, name, scene, image_size)
    if source in ("vqa", "mc"):
        rec = short_record(rng, rid, name, scene, kind, source)
    elif source == "lowquality":
        rec = short_record(rng, rid, name, scene, kind, source, wrong=bool(rng.random() < LOWQUALITY_WRONG))
    elif source == "caption":
        text = caption(scene)
        rec = _record(rid, name, [(CAPTION_PROMPT, text)], ["caption"], [text], source)
    else:  # conversation: 2-3 different kinds about the one image
        allowed = CONVERSATION_KINDS + (("position",) if len(scene) == 1 else ())
        kinds = [str(k) for k in rng.choice(allowed, size=int(rng.integers(2, 4)), replace=False)]
        turns, truths = [], []
        for k in kinds:
            q, a, _ = ask(rng, scene, k)
            turns.append((q, sentence(k, a, len(scene))))
            truths.append(turns[-1][1])
        rec = _record(rid, name, turns, kinds, truths, source)
    return rec, (scene, jitter)


def _source_plan(rng, n_train: int) -> list[str]:
    """Exactly ``round(share * n_train)`` records per source (the last source takes the rest), shuffled."""
    names = list(SOURCES)
    counts = [int(round(SOURCES[s] * n_train)) for s in names[:-1]]
    counts.append(max(0, n_train - sum(counts)))
    plan = [s for s, c in zip(names, counts) for _ in range(c)][:n_train]
    return [plan[int(k)] for k in rng.permutation(len(plan))]


def _train_pool(out_dir: str, n_train: int, seed: int, image_size: int) -> list:
    rng = np.random.default_rng([seed, _STREAM["train"]])
    plan = _source_plan(rng, n_train)
    records, drawn = [], {}
    dup_slots = [i for i, s in enumerate(plan) if s == "duplicate"]
    for i, source in enumerate(plan):
        if source == "duplicate":
            records.append(None)
            continue
        rec, scene = _pool_record(rng, i, source, out_dir, image_size)
        records.append(rec)
        if scene is not None and source in ("vqa", "mc", "conversation"):
            drawn[i] = scene
    originals = sorted(drawn)
    for i in dup_slots:
        if not originals:  # a pool too small to hold an original: a clean record instead
            records[i] = _pool_record(rng, i, "vqa", out_dir, image_size)[0]
            continue
        j = originals[int(rng.integers(len(originals)))]
        orig, (scene, jitter) = records[j], drawn[j]
        rec = json.loads(json.dumps(orig))
        rec.update(id=f"pool-{i:05d}", image=f"pool_{i:05d}.png", source="duplicate", demo_duplicate_of=orig["id"])
        shift = (int(rng.choice([-1, 1])), int(rng.choice([-1, 1])))
        render_scene(scene, image_size, shift=shift, jitter=jitter).save(
            os.path.join(out_dir, "images", rec["image"]), format="PNG")
        records[i] = rec
    return records


def _benchmark_set(out_dir: str, split: str, bench: str, n: int, seed: int, image_size: int) -> list:
    rng = np.random.default_rng([seed, _STREAM[split], list(BENCHMARKS).index(bench)])
    records = []
    for i in range(n):
        name = f"{split}_{bench}_{i:04d}.png"
        kinds = BENCHMARKS[bench]
        kind = kinds[i % len(kinds)]
        scene = random_scene(rng, 1 if kind == "position" else None)
        _draw(rng, out_dir, name, scene, image_size)
        records.append(short_record(rng, f"{split}-{bench}-{i:04d}", name, scene, kind, source=bench))
    return records


def make_replica_data(out_dir: str, n_train: int = 800, seed: int = 0, image_size: int = 32,
                      n_target: int = 16, n_eval: int = 60) -> dict:
    """Write the stage-2 pool, the target (validation) sets and the held-out test sets under ``out_dir``.

    Layout: ``train.json``, ``images/*.png``, ``targets/<bench>.json`` (``n_target``
    records, only for :data:`TARGET_BENCHMARKS`), ``eval/<bench>.json`` (``n_eval``
    records, every benchmark including the unseen one).

    Returns ``dict(train=path, image_folder=path, targets={bench: path}, eval={bench: path},
    tasks=list of target benchmarks, unseen=list)``.
    """
    if n_train < 1:
        raise ValueError(f"n_train must be >= 1, got {n_train}")
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    paths = {"train": os.path.join(out_dir, "train.json"), "image_folder": os.path.join(out_dir, "images"),
             "targets": {}, "eval": {}, "tasks": list(TARGET_BENCHMARKS), "unseen": list(UNSEEN_BENCHMARKS)}
    save_records(_train_pool(out_dir, n_train, seed, image_size), paths["train"])
    for split, n, benches in (("targets", n_target, TARGET_BENCHMARKS), ("eval", n_eval, list(BENCHMARKS))):
        for bench in benches:
            path = os.path.join(out_dir, split, f"{bench}.json")
            save_records(_benchmark_set(out_dir, split, bench, n, seed, image_size), path)
            paths[split][bench] = path
    return paths


def _stage1_set(rng, out_dir: str, kind: str, split: str, n: int, image_size: int, turn) -> list:
    """``n`` single-turn stage-1 records of ``kind`` on fresh scenes; ``turn(rng, scene)`` -> ``(prompt, answer)``."""
    records = []
    for i in range(n):
        name = f"{kind}_{split}_{i:05d}.png"
        scene = random_scene(rng)
        _draw(rng, out_dir, name, scene, image_size)
        prompt, answer = turn(rng, scene)
        records.append(_record(f"{kind}-{split}-{i:05d}", name, [(prompt, answer)], [kind], [answer], kind))
    return records


def make_stage1_data(out_dir: str, n_train: int, n_eval: int = 64, seed: int = 0, image_size: int = 32,
                     n_matching: int = 0) -> dict:
    """Stage-1 alignment data: captions and image-text matching, each with its own stream and images.

    ``train``: ``n_train`` caption records and ``n_matching`` matching records
    (:func:`matching_pair`), shuffled together; ``eval``: ``n_eval`` held-out
    captions; ``matching_eval``: ``n_eval`` held-out matching records. The
    caption records (ids, images, texts) do not change with ``n_matching``; only
    their order in ``train`` does.

    Returns ``dict(train=path, eval=path, matching_eval=path, image_folder=path)``.
    """
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    out = {"image_folder": os.path.join(out_dir, "images")}
    rng = np.random.default_rng([seed, _STREAM["captions"]])
    captions = {split: _stage1_set(rng, out_dir, "caption", split, n, image_size,
                                   lambda rng, scene: (CAPTION_PROMPT, caption(scene)))
                for split, n in (("train", n_train), ("eval", n_eval))}
    rng = np.random.default_rng([seed, _STREAM["matching"]])

    def matching_turn(rng, scene):
        text, answer = matching_pair(rng, scene)
        return f"{MATCH_PROMPT}\n{text}", answer

    matching = {split: _stage1_set(rng, out_dir, "matching", split, n, image_size, matching_turn)
                for split, n in (("train", n_matching), ("eval", n_eval))}
    train = captions["train"] + matching["train"]
    train = [train[int(k)] for k in rng.permutation(len(train))]
    for key, records in (("train", train), ("eval", captions["eval"]), ("matching_eval", matching["eval"])):
        out[key] = os.path.join(out_dir, f"stage1_{key}.json")
        save_records(records, out[key])
    return out
