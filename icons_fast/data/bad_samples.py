"""A pool of malformed records for the tests of the data layer and of every stage after it.

``make_bad_samples`` writes one record per malformed case, interleaved with
good records (rendered with :mod:`icons_fast.data.replica`, answers that match
their images), and returns the reason code expected at each index.
"""
from __future__ import annotations

import io
import os

import numpy as np

from icons_fast.data.records import save_records
from icons_fast.data.replica import SHORT_ANSWER, arithmetic, ask, random_scene, render_scene

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
    def conv(*turns):
        return [{"from": ("human", "gpt")[i % 2], "value": v} for i, v in enumerate(turns)]

    img_dir = os.path.join(out_dir, "images")
    os.makedirs(img_dir, exist_ok=True)
    rng = np.random.default_rng(1234)

    def good_png(name: str) -> str:
        render_scene(random_scene(rng), image_size).save(os.path.join(img_dir, name), format="PNG")
        return name

    def good(rid, kind: str, name: str | None = None, n_turns: int = 1) -> dict:
        """A clean record: ``n_turns`` questions of ``kind`` about its image, or a text-only one."""
        if kind == "arithmetic":
            q, a = arithmetic(rng)
            return {"id": rid, "conversations": conv(f"{q}\n{SHORT_ANSWER}", a)}
        scene = random_scene(rng)
        render_scene(scene, image_size).save(os.path.join(img_dir, name), format="PNG")
        kinds = [kind] if n_turns == 1 else ["color", "shape", "position"][:n_turns]
        turns = []
        for i, k in enumerate(kinds):
            q, a, _ = ask(rng, scene, k)
            turns += [f"<image>\n{q}\n{SHORT_ANSWER}" if i == 0 else f"{q}\n{SHORT_ANSWER}", a]
        return {"id": rid, "image": name, "conversations": conv(*turns)}

    buf = io.BytesIO()
    render_scene(random_scene(rng), image_size).save(buf, format="PNG")
    png = buf.getvalue()
    with open(os.path.join(img_dir, "truncated.png"), "wb") as f:
        f.write(png[: len(png) // 2])
    with open(os.path.join(img_dir, "garbage.png"), "wb") as f:
        f.write(b"this is not an image" * 8)
    with open(os.path.join(img_dir, "empty.jpg"), "wb"):
        pass
    render_scene(random_scene(rng), image_size).save(os.path.join(img_dir, "gif_named.jpg"), format="GIF")
    q = f"<image>\nWhat color is the circle?\n{SHORT_ANSWER}"
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
        (good("good-3", "color", "good4.png", n_turns=3), None),
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
