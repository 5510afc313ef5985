"""Records: the pool as the data layer sees it, addressed by index.

The internal record is LLaVA-665K's (every other format is normalised to it
by :mod:`icons_fast.data.formats`). A record looks like::

    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat are the colors of the bus?"},
                       {"from": "gpt", "value": "White and red."}, ...]}

Text-only records have no ``image`` key. Any other key is kept untouched (the
export writes the source records back exactly as read). A record is addressed by its index
in the file, never re-ordered; its id is ``str(record["id"])`` (LLaVA-665K
mixes string and integer ids), or ``"#<index>"`` when it has none.

Records are returned as read: checking their structure is the tokeniser's job
(:mod:`icons_fast.data.conversation`), so that a bad record becomes an error
line for its index rather than a failure for the whole file.
"""
from __future__ import annotations

import json


def load_records(path: str) -> list:
    """The pool at ``path`` as internal records, one per source record, in source order.

    ``path``: a json list (LLaVA-665K: its records returned exactly as read), a
    ``.jsonl`` file, parquet / arrow files or folders, or a Hugging Face dataset
    id; ShareGPT and OpenAI ``messages`` records are normalised to the LLaVA
    conversation (:mod:`icons_fast.data.formats`). Raises ``FileNotFoundError`` /
    ``ValueError`` naming the file when it is missing or unreadable as a whole.
    """
    from icons_fast.data.formats import read_pool

    return read_pool(path).records


def record_id(record, index: int) -> str:
    """The id of ``record`` as a string (``"#<index>"`` when it has none)."""
    if isinstance(record, dict) and record.get("id") is not None:
        return str(record["id"])
    return f"#{index}"


def record_ids(records: list) -> list[str]:
    """``record_id`` of every record, in file order."""
    return [record_id(r, i) for i, r in enumerate(records)]


def has_image(record) -> bool:
    """True when the record names an image file (``image`` key present and not null)."""
    return isinstance(record, dict) and record.get("image") is not None


def image_list(record) -> list:
    """A record's images as a list: ``[]`` without image, ``[path]`` for one path, the list itself for several.

    (Anything else than a string or a list comes back as a one-element list, for the caller's type check.)
    """
    if not has_image(record):
        return []
    image = record["image"]
    return list(image) if isinstance(image, list) else [image]


def save_records(records: list, path: str) -> None:
    """Write ``records`` as a json list, atomically (temp file + rename)."""
    from icons_fast.fileio import atomic_write

    atomic_write(path, lambda f: (json.dump(records, f, ensure_ascii=False, indent=1), f.write("\n")))
