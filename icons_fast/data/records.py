"""LLaVA-665K style json records.

The file is one json list. A record looks like::

    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat are the colors of the bus?"},
                       {"from": "gpt", "value": "White and red."}, ...]}

Text-only records have no ``image`` key. Any other key is kept untouched (the
export writes records back exactly as read). A record is addressed by its index
in the file, never re-ordered; its id is ``str(record["id"])`` (LLaVA-665K
mixes string and integer ids), or ``"#<index>"`` when it has none.

Records are returned as read: checking their structure is the tokeniser's job
(:mod:`icons_fast.data.conversation`), so that a bad record becomes an error
line for its index rather than a failure for the whole file.
"""
from __future__ import annotations

import json
import os


def load_records(path: str) -> list:
    """The list of records in the json file ``path`` (order and content untouched).

    Raises ``FileNotFoundError`` / ``ValueError`` naming the file when it is
    missing, is not valid json, or does not hold a list.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"data file {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid json at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc
    except RecursionError as exc:
        raise ValueError(f"{path}: json nested too deeply to read (a corrupt or hostile file)") from exc
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc}); LLaVA json files are UTF-8") from exc
    if not isinstance(data, list):
        raise ValueError(
            f"{path}: expected a json list of records (LLaVA-665K format), got a {type(data).__name__}"
        )
    return data


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


def save_records(records: list, path: str) -> None:
    """Write ``records`` as a json list, atomically (temp file + rename)."""
    from icons_fast.fileio import atomic_write

    atomic_write(path, lambda f: (json.dump(records, f, ensure_ascii=False, indent=1), f.write("\n")))
