"""Seeded fuzzer for the data layer: mutated LLaVA records and broken image files.

``make_fuzz_images(folder)`` writes a fixed set of image files, good and bad
(truncated JPEG/PNG, zero bytes, a GIF named ``.jpg``, text named ``.png``, a
symlink loop, a dangling link, a directory named ``.jpg``, a header claiming
30000x30000 pixels, 1-pixel and 1x60 images, CMYK, palette, 16-bit, ...).
``fuzz_records(n, seed, images)`` returns ``n`` records, each a valid record
(text-only or with one of those images) with one to three random mutations:
deleted fields, wrong types, huge strings, odd unicode (lone surrogates, NUL,
right-to-left, combining marks, special-token look-alikes), nested junk,
impossible image paths, or not a dict at all. The same ``(n, seed)`` always
gives the same records.

``check_records(dataset, batch_size)`` is the oracle: it reads every record
through the dataset and ``collate`` the way featurize does and returns a
:class:`FuzzReport`. Each record must come back either as a sample whose
``index`` and ``id`` are its own, or as a ``SampleError`` with its index and a
reason code of :data:`~icons_fast.data.errors.REASONS` (and the dataset's
``errors.jsonl``, when it has one, lists exactly those indices); anything else (an
exception, a shifted index, an unknown code) is a failure listed with its
record.
"""
from __future__ import annotations

import io
import json
import os
import random
import struct
import zlib
from collections import Counter
from dataclasses import dataclass, field

from PIL import Image

from icons_fast.data.collate import collate
from icons_fast.data.errors import REASONS, ErrorLog, SampleError
from icons_fast.data.records import record_id

WORDS = "red green blue circle square left right top one two three the shape is where what how many".split()
ODD_TEXT = [
    "\ud800", "caf\u00e9 \u0301\u0301\u0301", "\u202eright to left\u202c", "\u200b\u200d\ufeff", "\x00nul", "\x1b[31m",
    "\U0001f600\U0001f9d1\u200d\U0001f680", "</s>", "<s>", "<unk>", "[INST]", " USER: ", " ASSISTANT:", "<im>age>",
    "\t\r\n", "\\u0000", "\u0000" * 3, "\U0010ffff", "\ufffd", "null", "é" * 50,
]


def _png_claiming(width: int, height: int) -> bytes:
    """A well-formed PNG whose header claims ``width x height`` RGB pixels but holds one row of data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" + b"\x00" * 3 * max(width, 1))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _encoded(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _picture() -> Image.Image:
    """A 20x14 RGB picture with a diagonal line (not flat, so lossy codecs have work to do)."""
    img = Image.new("RGB", (20, 14), (200, 30, 40))
    for y in range(14):
        img.putpixel((y, y), (0, 255, 0))
    return img


def _fuzz_image_files() -> dict[str, tuple[bool, bytes | str | None]]:
    """``{name: (expected to load, content)}``; content is bytes, a symlink target (str) or None (a directory)."""
    pic = _picture()
    jpeg, png = _encoded(pic, "JPEG", quality=80), _encoded(pic, "PNG")
    return {
        # good files, some in odd modes, sizes and names
        "ok.png": (True, png),
        "ok.jpg": (True, jpeg),
        "ok.gif": (True, _encoded(pic.convert("P"), "GIF")),
        "ok.webp": (True, _encoded(pic, "WEBP")),
        "gray.png": (True, _encoded(pic.convert("L"), "PNG")),
        "rgba.png": (True, _encoded(pic.convert("RGBA"), "PNG")),
        "i16.png": (True, _encoded(Image.new("I;16", (9, 9), 300), "PNG")),
        "cmyk.jpg": (True, _encoded(pic.convert("CMYK"), "JPEG")),
        "one_pixel.png": (True, _encoded(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG")),
        "one_by_sixty.png": (True, _encoded(Image.new("RGB", (1, 60), (9, 9, 9)), "PNG")),
        "no_extension": (True, png),  # unknown extensions accept any format
        "jpeg.xyz": (True, jpeg),
        "sub dir/ünïcode ✓.png": (True, png),
        "link_to_ok.png": (True, "ok.png"),
        # broken files
        "truncated.jpg": (False, jpeg[: len(jpeg) // 2]),
        "truncated.png": (False, png[:60]),
        "zero.jpg": (False, b""),
        "gif_named.jpg": (False, _encoded(pic.convert("P"), "GIF")),
        "png_named.jpeg": (False, png),
        "text_named.png": (False, b"this is not an image\n" * 10),
        "garbage.jpg": (False, random.Random(0).randbytes(3000)),
        "jpeg_magic_only.jpg": (False, b"\xff\xd8\xff\xe0" + b"\x00" * 20),
        "huge_header.png": (False, _png_claiming(30000, 30000)),  # a decompression bomb by its header
        "zero_width.png": (False, _png_claiming(0, 10)),
        "loop_a.jpg": (False, "loop_b.jpg"),
        "loop_b.jpg": (False, "loop_a.jpg"),
        "dangling.png": (False, "nowhere/none.png"),
        "a_directory.jpg": (False, None),
    }


def make_fuzz_images(folder: str) -> dict[str, bool]:
    """Write the fuzz image files into ``folder``; returns ``{relative name: expected to load}``."""
    out = {}
    for name, (ok, content) in _fuzz_image_files().items():
        path = os.path.join(folder, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if content is None:
            os.makedirs(path, exist_ok=True)
        elif isinstance(content, str):
            os.symlink(content, path)
        else:
            with open(path, "wb") as f:
                f.write(content)
        out[name] = ok
    return out


def _sentence(rng: random.Random, lo: int = 1, hi: int = 8) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def _junk(rng: random.Random, depth: int = 0):
    """A random json value, nested up to a few levels."""
    kind = rng.randrange(8 if depth < 6 else 5)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, -1, 2**63, 1.5, -0.0, 1e308])
    if kind == 3:
        return rng.choice(ODD_TEXT + [_sentence(rng)])
    if kind == 4:
        return ""
    if kind == 5:
        return [_junk(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {rng.choice(["a", "from", "value", "image", "id", ""]): _junk(rng, depth + 1) for _ in range(rng.randint(0, 3))}


def valid_record(rng: random.Random, images: list[str], index: int) -> dict:
    """A well-formed record: 1-3 (human, gpt) pairs, an image (first human turn) half of the time."""
    with_image = bool(images) and rng.random() < 0.5
    conv = []
    for p in range(rng.randint(1, 3)):
        q = _sentence(rng) + "?"
        if with_image and p == 0:
            q = rng.choice(["<image>\n" + q, q + "\n<image>"])
        conv += [{"from": "human", "value": q}, {"from": "gpt", "value": _sentence(rng)}]
    rec = {"id": rng.choice([f"r{index}", index, f"{index:012d}"]), "conversations": conv}
    if with_image:
        rec["image"] = rng.choice(images)
    return rec


def _any_turn(rng: random.Random, rec: dict) -> dict | None:
    """A random turn of ``rec`` that is a dict (None when there is none)."""
    conv = rec.get("conversations")
    turns = [t for t in conv if isinstance(t, dict)] if isinstance(conv, list) else []
    return rng.choice(turns) if turns else None


def _mutate(rng: random.Random, rec: dict, images: list[str]):
    """Apply one random mutation to ``rec`` (in place when it stays a dict); returns the record."""
    m = rng.randrange(16)
    turn = _any_turn(rng, rec)
    if m == 0:  # delete a top-level field
        rec.pop(rng.choice(["id", "image", "conversations"]), None)
    elif m == 1 and turn is not None:  # delete a turn field
        turn.pop(rng.choice(["from", "value"]), None)
    elif m == 2:  # conversations of the wrong type
        rec["conversations"] = _junk(rng) if rng.random() < 0.7 else json.dumps(rec.get("conversations"))
    elif m == 3 and turn is not None:  # a turn field of the wrong type
        turn[rng.choice(["from", "value"])] = _junk(rng)
    elif m == 4:  # a wrong-typed id
        rec["id"] = _junk(rng)
    elif m == 5:  # a wrong-typed or impossible image
        rec["image"] = rng.choice([_junk(rng), "", "/", "../../../etc/passwd", "/dev/zero", "ok.png\x00.jpg",
                                   "x" * 300 + ".jpg", "ok.PNG", "OK.png", "./ok.png", "ok.png/", "\ud800.png"])
    elif m == 6 and turn is not None and isinstance(turn.get("value"), str):  # a huge string
        turn["value"] += " " + rng.choice(WORDS) * rng.choice([2_000, 20_000, 100_000])
    elif m == 7 and turn is not None and isinstance(turn.get("value"), str):  # odd unicode
        v = turn["value"]
        cut = rng.randint(0, len(v))
        turn["value"] = v[:cut] + rng.choice(ODD_TEXT) + v[cut:]
    elif m == 8:  # nested junk in extra keys
        rec[rng.choice(["meta", "model", "", "conversations_", "image_folder"])] = _junk(rng)
    elif m == 9 and images:  # point at another image (good or bad)
        rec["image"] = rng.choice(images)
    elif m == 10 and turn is not None and isinstance(turn.get("value"), str):  # image tokens in odd places
        turn["value"] = rng.choice(["<image>", "<image><image>", "<image >", "<IMAGE>"]) + turn["value"]
    elif m == 11 and isinstance(rec.get("conversations"), list):  # reorder / drop / duplicate turns
        conv = rec["conversations"]
        op = rng.randrange(4)
        if op == 0:
            rng.shuffle(conv)
        elif op == 1 and conv:
            conv.pop(rng.randrange(len(conv)))
        elif op == 2 and conv:
            conv.append(conv[rng.randrange(len(conv))])
        else:
            conv.clear()
    elif m == 12 and turn is not None:  # role spelled differently
        turn["from"] = rng.choice(["user", "assistant", "GPT", "Human", "system", "", None, 1])
    elif m == 13 and turn is not None:  # empty or whitespace answers
        turn["value"] = rng.choice(["", " ", "\n\t", "\u3000"])
    elif m == 14:  # the record is not a dict at all
        return rng.choice([None, [], [rec], "record", 7, json.dumps(rec)])
    elif m == 15:  # a turn that is not a dict
        conv = rec.get("conversations")
        if isinstance(conv, list) and conv:
            conv[rng.randrange(len(conv))] = _junk(rng)
    return rec


def fuzz_records(n: int, seed: int, images: list[str]) -> list:
    """``n`` records: valid records given 1-3 mutations (15% left valid, to check acceptance too)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        rec = valid_record(rng, images, i)
        if rng.random() >= 0.15:
            for _ in range(rng.choices((1, 2, 3), weights=(6, 3, 1))[0]):
                rec = _mutate(rng, rec, images)
                if not isinstance(rec, dict):
                    break
        out.append(rec)
    return out


@dataclass
class FuzzReport:
    """What ``check_records`` saw: accepted samples, errors by reason code, failures (should be none)."""

    accepted: int = 0
    reasons: Counter = field(default_factory=Counter)
    failures: list = field(default_factory=list)  # (index, what went wrong)

    @property
    def total(self) -> int:
        return self.accepted + sum(self.reasons.values()) + len(self.failures)


def check_records(dataset, batch_size: int = 16) -> FuzzReport:
    """Read every item of ``dataset`` (an ``LlavaDataset``) through ``collate`` in order; see the module docstring."""
    report = FuzzReport()
    errors_seen: list[tuple[int, str]] = []
    for start in range(0, len(dataset), batch_size):
        positions = range(start, min(start + batch_size, len(dataset)))
        items = []
        for i in positions:
            index = dataset.indices[i]
            try:
                items.append(dataset[i])
            except Exception as exc:  # the oracle: any exception here is a data-layer bug
                report.failures.append((index, f"{type(exc).__name__}: {exc}"))
                items.append(None)
        got = [x for x in items if x is not None]
        batch = collate(got)
        seen = [int(j) for j in batch["indices"]] + [e.index for e in batch["errors"]]
        expect = [dataset.indices[i] for i, x in zip(positions, items) if x is not None]
        if sorted(seen) != sorted(expect):
            report.failures.append((expect[0] if expect else start, f"batch indices {sorted(seen)} != {sorted(expect)}"))
        for x in got:
            index = x.index if isinstance(x, SampleError) else x["index"]
            want_id = record_id(dataset.records[index], index)
            got_id = x.id if isinstance(x, SampleError) else x["id"]
            if got_id != want_id:
                report.failures.append((index, f"id {got_id!r} != {want_id!r} (shifted index?)"))
            elif isinstance(x, SampleError):
                if x.code not in REASONS:
                    report.failures.append((index, f"unknown reason code {x.code!r}"))
                else:
                    report.reasons[x.code] += 1
                    errors_seen.append((index, x.code))
            else:
                report.accepted += 1
    log = getattr(dataset, "error_log", None)
    if log is not None and log.path is not None:  # the file must name exactly the records found bad
        on_disk = sorted(e.index for e in ErrorLog.read(log.path) if e.stage == dataset.stage)
        if on_disk != sorted(i for i, _ in errors_seen):
            report.failures.append((-1, f"{log.path} lists {len(on_disk)} errors, the dataset returned {len(errors_seen)}"))
    return report
