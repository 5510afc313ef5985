"""Pool formats in and out: every supported file becomes the internal records, and a selection goes back as it came.

Containers (``detect_container``):

    json     a .json file holding one list of records (LLaVA-665K); also any
             other file name that is not one of the suffixes below
    jsonl    a .jsonl file, one record per line; record ``i`` is raw line ``i`` as
             Python's ``readlines`` counts lines (LESS's ``write_selected_data``
             numbering), so a blank or invalid line is a bad record at its own
             index, never a shifted one
    parquet  a .parquet file, or a folder of them (read in name order)
    arrow    a .arrow file, or a folder written by ``datasets.Dataset.save_to_disk``
    hub      a Hugging Face dataset id ``owner/name`` (optionally ``owner/name:split``,
             default split ``train``), read by ``datasets.load_dataset`` with the
             user's cache and offline settings (``HF_HOME``, ``HF_HUB_OFFLINE``)

Record schemas, recognised per record (a file may mix them):

- LLaVA / ShareGPT: ``{"conversations": [{"from": ..., "value": ...}, ...]}``. A
  LLaVA record (roles ``human``/``gpt``) is used exactly as read. Roles
  ``user``/``assistant`` become ``human``/``gpt``; a leading ``system`` turn moves
  to the record's ``"system"`` key (the ``vicuna_v1`` template has its own fixed
  system prompt and ignores it); a plural ``"images"`` list becomes ``"image"``.
- OpenAI-style messages: ``{"messages": [{"role": ..., "content": ...}, ...]}``
  with ``role`` in ``system``/``user``/``assistant`` and ``content`` a string or a
  list of parts: ``{"type": "text", "text": ...}``, ``{"type": "image"}`` (the next
  entry of the record's ``"images"``), ``{"type": "image", "image" | "path": ...}``
  or ``{"type": "image_url", "image_url": {"url": ...}}`` (a local path,
  ``file://`` or a ``data:image/...;base64,`` url; web urls are refused: nothing
  is downloaded). Each image part becomes ``<image>`` at its place in the text,
  parts joined by newlines (LLaVA's ``"<image>\\n..."``).

The internal record is the LLaVA conversation the data layer consumes:
``{"id"?, "conversations": [{"from": "human"|"gpt", "value": str}, ...],
"image"?: str | list, "system"?: str}``. One image is a path string or an
:class:`~icons_fast.data.images.EmbeddedImage` (an image cell's bytes, for
tables); several images stay a list (one ``<image>`` each, in order), which
:class:`CheckedBuilder` records as ``multiple_images`` when the model's family
takes one per sample (the builder's ``max_images``).

A record that cannot be read (invalid json line, blank line, unknown role,
web image url, ...) becomes an :class:`UnreadableRecord` at its index:
:class:`CheckedBuilder` turns it into a ``bad_record`` error line naming the
line, message or part. Nothing is dropped, so indices never shift.

Out: ``write_selected`` writes the selected records in the pool's own
container: the json records as read (json list), the raw lines byte for byte
(jsonl), the selected rows with every column and the dataset's features
(parquet for parquet and hub pools; a ``save_to_disk`` folder or an arrow
stream file for arrow pools).
"""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass

from icons_fast.data.errors import SampleProblem
from icons_fast.data.images import EmbeddedImage

CONTAINERS = ("json", "jsonl", "parquet", "arrow", "hub")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w.-]+)?$")
SHAREGPT_ROLES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}
MESSAGE_ROLES = {"user": "human", "assistant": "gpt"}
NO_NETWORK_HELP = (
    "set HF_HUB_OFFLINE=1 and HF_DATASETS_OFFLINE=1 to use only the Hugging Face cache (HF_HOME), or pass a local "
    "directory or file instead of a hub id"
)


class UnreadableRecord(dict):
    """A record its format could not read: carries the problem, keeps the id when there was one."""

    def __init__(self, detail: str, record_id=None):
        super().__init__({} if record_id is None else {"id": record_id})
        self.detail = detail

    def __reduce__(self):  # DataLoader workers receive records by pickling
        return (UnreadableRecord, (self.detail, self.get("id")))


class CheckedBuilder:
    """Wraps a sample builder: a record's reading problems are raised before the builder sees it.

    ``build`` raises ``bad_record`` for an :class:`UnreadableRecord` and
    ``multiple_images`` for a record with more images than ``max_images``
    (the wrapped builder's ``max_images`` when it has one, else 1: LLaVA-1.5),
    then calls the builder. Everything else (``collate``, ``supports_images``,
    ...) is the wrapped builder's.
    """

    def __init__(self, builder, max_images: int | None = None):
        self.builder = builder
        self.max_images = max_images if max_images is not None else getattr(builder, "max_images", 1)

    def build(self, index: int, record) -> dict:
        if isinstance(record, UnreadableRecord):
            raise SampleProblem("bad_record", record.detail)
        images = record.get("image") if isinstance(record, dict) else None
        if isinstance(images, list) and self.max_images is not None and len(images) > self.max_images:
            family = getattr(self.builder, "family", None)
            raise SampleProblem("multiple_images", f"{len(images)} images; this model takes {self.max_images} per "
                                                   f"sample{f' (family {family})' if family else ''}; keep one, or "
                                                   "select with a model that takes several (Qwen2-VL, LLaVA-NeXT, "
                                                   "Idefics3)")
        return self.builder.build(index, record)

    def __getattr__(self, name):
        if name == "builder":  # not set yet (an unpickling copy): no recursion
            raise AttributeError(name)
        return getattr(self.builder, name)


@dataclass
class Pool:
    """A pool as read: ``records`` (internal, one per source record) and what ``write_selected`` needs.

    ``raw``: the json records as read (json), the raw lines as bytes (jsonl); ``dataset``:
    the ``datasets.Dataset`` (parquet, arrow, hub).
    """

    source: str
    container: str
    records: list
    raw: list | None = None
    dataset: object = None

    def __len__(self) -> int:
        return len(self.records)


# --------------------------------------------------------------------------- detection


def is_hub_id(source: str) -> bool:
    """True for ``owner/name`` (or ``owner/name:split``) that is not an existing local path."""
    return not os.path.exists(source) and bool(HUB_ID.match(source)) and not source.endswith((".json", ".jsonl"))


def detect_container(source: str) -> str:
    """One of :data:`CONTAINERS` for a file, a folder or a hub id; raises naming the fix otherwise."""
    if os.path.isdir(source):
        if os.path.exists(os.path.join(source, "state.json")) or any(n.endswith(".arrow") for n in os.listdir(source)):
            return "arrow"
        if any(n.endswith(".parquet") for n in os.listdir(source)):
            return "parquet"
        raise ValueError(f"{source} is a folder without .parquet files or a datasets save_to_disk layout; "
                         "pass a .json, .jsonl, .parquet or .arrow file, or such a folder")
    suffix = os.path.splitext(source)[1].lower()
    if suffix in (".json", ".jsonl", ".parquet", ".arrow"):
        if not os.path.exists(source):
            raise FileNotFoundError(f"data file {source!r} does not exist")
        return suffix[1:]
    if is_hub_id(source):
        return "hub"
    if not os.path.exists(source):
        raise FileNotFoundError(f"data file {source!r} does not exist (nor is it a Hugging Face dataset id owner/name)")
    return "json"  # any other file name: a json list, as LLaVA pools have always been read


# --------------------------------------------------------------------------- reading


def read_pool(source: str) -> Pool:
    """Read ``source`` in its container and normalise every record (see the module docstring)."""
    container = detect_container(source)
    if container == "json":
        raw = load_json_list(source)
        return Pool(source, "json", [normalise_record(r, f"record {i}") for i, r in enumerate(raw)], raw=raw)
    if container == "jsonl":
        lines, records = read_jsonl(source)
        return Pool(source, "jsonl", records, raw=lines)
    ds = load_table(source, container)
    name = os.path.basename(os.path.normpath(source))
    records = [normalise_record(row, f"row {i}", table=f"{name}[{i}]") for i, row in enumerate(ds)]
    return Pool(source, container, records, dataset=ds)


def load_json_list(path: str) -> list:
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
            f"{path}: expected a json list of records (LLaVA-665K format), got a {type(data).__name__}; "
            "one record per line is a .jsonl file"
        )
    return data


def read_jsonl(path: str) -> tuple[list[bytes], list]:
    """``(raw lines, records)``: lines split as ``readlines`` splits them (``\\n``, ``\\r\\n``, ``\\r``)."""
    with open(path, "rb") as f:
        data = f.read()
    lines = data.splitlines(keepends=True)
    records = []
    for i, line in enumerate(lines):
        where = f"line {i + 1} of {os.path.basename(path)}"
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            records.append(UnreadableRecord(f"{where} is not UTF-8 ({exc.reason} at byte {exc.start})"))
            continue
        if not text.strip():
            records.append(UnreadableRecord(f"{where} is blank; it still counts as a record (LESS numbers raw "
                                            "lines), so remove it from the file"))
            continue
        try:
            value = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:
            records.append(UnreadableRecord(f"{where} is not valid json ({str(exc)[:80]})"))
            continue
        records.append(normalise_record(value, where))
    return lines, records


def load_table(source: str, container: str):
    """A ``datasets.Dataset`` for a parquet / arrow file or folder, or a hub id; image columns left undecoded."""
    try:
        import datasets
    except ImportError as exc:  # an optional dependency: only table pools need it
        raise ImportError(f"reading {source} needs the `datasets` library: pip install 'icons-fast[formats]'") from exc
    if container == "parquet":
        files = ([os.path.join(source, n) for n in sorted(os.listdir(source)) if n.endswith(".parquet")]
                 if os.path.isdir(source) else [source])
        ds = datasets.Dataset.from_parquet(files)
    elif container == "arrow":
        ds = datasets.load_from_disk(source) if os.path.isdir(source) else datasets.Dataset.from_file(source)
        if isinstance(ds, datasets.DatasetDict):
            raise ValueError(f"{source} holds several splits {list(ds)}; pass the folder of one split")
    else:
        ds = load_hub_dataset(source)
    return _undecoded_images(ds)


def load_hub_dataset(source: str):
    """``datasets.load_dataset(owner/name, split=...)`` with the user's cache and offline settings.

    A failure to reach the hub (no network, offline mode without a cached copy)
    becomes one ``ConnectionError`` line naming ``HF_HUB_OFFLINE`` and local folders.
    """
    import datasets

    name, _, split = source.partition(":")
    try:
        return datasets.load_dataset(name, split=split or "train")
    except Exception as exc:  # noqa: BLE001 - the hub client raises many kinds; each gets the same advice
        if isinstance(exc, ValueError) and "split" in str(exc).lower():
            raise ValueError(f"dataset {name!r} has no split {split or 'train'!r} ({exc}); "
                             f"pass {name}:<split>") from exc
        raise ConnectionError(f"{name!r} is no local file or folder, and loading it as a Hugging Face dataset failed "
                              f"({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}); {NO_NETWORK_HELP}") from None


def _undecoded_images(ds):
    """The dataset with every ``Image`` feature (also inside lists) left as ``{bytes, path}`` cells."""
    import datasets

    def undecoded(feature):
        if isinstance(feature, datasets.Image):
            return datasets.Image(decode=False)
        if isinstance(feature, dict):
            return {k: undecoded(v) for k, v in feature.items()}
        if isinstance(feature, list) and len(feature) == 1:
            return [undecoded(feature[0])]
        if dataclasses.is_dataclass(feature) and hasattr(feature, "feature"):  # List / Sequence / LargeList
            inner = undecoded(feature.feature)
            return feature if inner == feature.feature else dataclasses.replace(feature, feature=inner)
        return feature

    features = datasets.Features({k: undecoded(v) for k, v in ds.features.items()})
    return ds.cast(features) if features != ds.features else ds


# --------------------------------------------------------------------------- normalising


def normalise_record(record, where: str, table: str | None = None):
    """One source record -> the internal record (or an :class:`UnreadableRecord` naming ``where``).

    ``table``: the name embedded images get (``"<file>[<row>]"``), given for table rows,
    whose image cells are ``{bytes, path}`` dicts.
    """
    if not isinstance(record, dict):
        return record  # the tokeniser reports a non-object record as bad_record, as for LLaVA json
    rid = record.get("id")
    try:
        if record.get("conversations") is None and record.get("messages") is not None:
            return _from_messages(record, table)
        return _from_sharegpt(record, table)
    except _Unreadable as exc:
        return UnreadableRecord(f"{where}: {exc}", rid)


class _Unreadable(Exception):
    pass


def _from_sharegpt(record: dict, table: str | None):
    conv = record.get("conversations")
    if not isinstance(conv, list) or not all(isinstance(t, dict) for t in conv):
        return _with_images(record, table) if table else record  # the tokeniser names the structural problem
    roles = [t.get("from") for t in conv]
    is_llava = all(r in ("human", "gpt") for r in roles)
    if is_llava and "images" not in record and not table:
        return record  # LLaVA as read: exactly what the data layer has always consumed
    out = {k: v for k, v in record.items()}
    turns = list(conv)
    if turns and turns[0].get("from") == "system":
        out["system"] = turns[0].get("value")
        turns = turns[1:]
    renamed = []
    for t, turn in enumerate(turns):
        role = SHAREGPT_ROLES.get(turn.get("from")) if isinstance(turn.get("from"), str) else None
        renamed.append(dict(turn, **{"from": role}) if role and role != turn.get("from") else turn)
    out["conversations"] = renamed
    return _with_images(out, table)


def _with_images(out: dict, table: str | None) -> dict:
    """``"images"`` -> ``"image"`` (one value, or a list of several); table cells -> EmbeddedImage."""
    if "images" in out:
        images = out.pop("images")
        images = [] if images is None else images if isinstance(images, list) else [images]
        if images:
            out["image"] = images[0] if len(images) == 1 else images
    if table and out.get("image") is not None:
        value = out["image"]
        if isinstance(value, list):
            out["image"] = [_image_value(v, f"{table}/image[{j}]") for j, v in enumerate(value)]
        else:
            out["image"] = _image_value(value, f"{table}/image")
    return out


def _image_value(value, name: str):
    """A path string, or a ``{bytes, path}`` cell / raw bytes as an :class:`EmbeddedImage`."""
    if isinstance(value, dict) and value.get("bytes"):
        return EmbeddedImage(value["bytes"], value.get("path") or name)
    if isinstance(value, dict) and value.get("path"):
        return value["path"]
    if isinstance(value, (bytes, bytearray)):
        return EmbeddedImage(value, name)
    if isinstance(value, str):
        if value.startswith("data:"):
            return _data_url(value, name)
        if value.startswith("file://"):
            return value[len("file://"):]
        if value.startswith(("http://", "https://")):
            raise _Unreadable(f"image {value[:60]!r} is a web url; nothing is downloaded: save the image and "
                              "give its path")
        return value
    raise _Unreadable(f"image {name} is a {type(value).__name__}; give a path, bytes or a data: url")


def _data_url(url: str, name: str) -> EmbeddedImage:
    header, _, payload = url.partition(",")
    if not header.endswith(";base64"):
        raise _Unreadable(f"image {name} is a data: url without base64 encoding")
    try:
        return EmbeddedImage(base64.b64decode(payload, validate=True), name)
    except ValueError as exc:
        raise _Unreadable(f"image {name} has invalid base64 data ({exc})") from None


def _from_messages(record: dict, table: str | None) -> dict:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise _Unreadable("'messages' must be a non-empty list of {'role', 'content'}")
    pool_images = record.get("images")
    pool_images = [] if pool_images is None else list(pool_images) if isinstance(pool_images, list) else [pool_images]
    name = table or "image"
    images, next_listed = [], 0
    out = {k: v for k, v in record.items() if k not in ("messages", "images")}
    turns = []
    for m, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise _Unreadable(f"message {m} is a {type(msg).__name__}, not {{'role', 'content'}}")
        role, content = msg.get("role"), msg.get("content")
        if role == "system" and m == 0:
            out["system"] = _text_only(content, m)
            continue
        if not isinstance(role, str) or role not in MESSAGE_ROLES:
            raise _Unreadable(f"message {m} has role {str(role)[:40]!r}; expected user or assistant "
                              "(system only first)")
        if isinstance(content, str):
            turns.append({"from": MESSAGE_ROLES[role], "value": content})
            continue
        if not isinstance(content, list):
            raise _Unreadable(f"message {m} content is a {type(content).__name__}; "
                              "expected a string or a list of parts")
        pieces = []
        for p, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                pieces.append(part["text"])
            elif kind in ("image", "image_url"):
                if role != "user":
                    raise _Unreadable(f"message {m} ({role}) has an image part; images belong to user messages")
                if kind == "image_url":  # {"url": ...} as OpenAI's API has it, or the url itself
                    value = part.get("image_url")
                    value = value.get("url") if isinstance(value, dict) else value
                else:
                    value = next((part.get(k) for k in ("image", "path", "url") if part.get(k) is not None), None)
                if value is None:  # a placeholder: the record's next listed image
                    if next_listed >= len(pool_images):
                        raise _Unreadable(f"message {m} part {p} is an image placeholder but the record lists "
                                          f"only {len(pool_images)} image(s)")
                    value, next_listed = pool_images[next_listed], next_listed + 1
                images.append(_image_value(value, f"{name}/image[{len(images)}]"))
                pieces.append("<image>")
            else:
                raise _Unreadable(f"message {m} part {p} is not a text or image part ({str(part)[:60]})")
        turns.append({"from": MESSAGE_ROLES[role], "value": "\n".join(pieces)})
    if next_listed < len(pool_images) and images:
        raise _Unreadable(f"the record lists {len(pool_images)} images but its messages place {next_listed}")
    if not images and pool_images:  # string contents with <image> in the text and a listed image
        images = [_image_value(v, f"{name}/image[{j}]") for j, v in enumerate(pool_images)]
    out["conversations"] = turns
    if images:
        out["image"] = images[0] if len(images) == 1 else images
    return out


def _text_only(content, m: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "\n".join(str(p.get("text", "")) for p in content)
    raise _Unreadable(f"message {m} (system) must be text")


# --------------------------------------------------------------------------- fingerprint and writing


def source_sha256(source: str) -> str:
    """Hex sha256 of a pool's content: the file; a folder's files (names and bytes); a hub dataset's cache files."""
    from icons_fast.fileio import file_sha256

    if os.path.isfile(source):
        return file_sha256(source)
    h = hashlib.sha256()
    if os.path.isdir(source):
        files = sorted(os.path.relpath(os.path.join(d, n), source) for d, _, ns in os.walk(source) for n in ns)
        for rel in files:
            h.update(rel.encode() + b"\0" + file_sha256(os.path.join(source, rel)).encode())
        return h.hexdigest()
    ds = load_table(source, detect_container(source))
    h.update(source.encode())
    for f in sorted(c["filename"] for c in ds.cache_files):
        h.update(file_sha256(f).encode())
    return h.hexdigest()


def selected_file_name(pool: Pool) -> str:
    """``selected.json`` / ``selected.jsonl`` / ``selected.parquet`` / ``selected.arrow`` / ``selected`` (a folder)."""
    if pool.container == "hub":
        return "selected.parquet"
    if pool.container == "arrow" and os.path.isdir(pool.source):
        return "selected"
    return f"selected.{pool.container}"


def write_selected(pool: Pool, indices, path: str) -> str:
    """Write the records at ``indices`` (ascending) in the pool's container to ``path``; return ``path``.

    json: the records as read, one json list; jsonl: the raw lines byte for byte (a
    final line without a newline gets one); parquet / hub: the rows with all their
    columns and features; arrow: a ``save_to_disk`` folder for a folder pool, an
    arrow stream file (``datasets.Dataset.from_file`` reads it) for a file pool.
    """
    from icons_fast.fileio import atomic_write

    idx = [int(i) for i in indices]
    if pool.container == "json":
        selected = [pool.raw[i] for i in idx]
        return atomic_write(path, lambda f: json.dump(selected, f, ensure_ascii=False))
    if pool.container == "jsonl":
        lines = [pool.raw[i] if pool.raw[i].endswith((b"\n", b"\r")) else pool.raw[i] + b"\n" for i in idx]
        return atomic_write(path, lambda f: f.write(b"".join(lines)), mode="wb")
    ds = pool.dataset.select(idx).flatten_indices()
    if pool.container in ("parquet", "hub"):
        return atomic_write(path, lambda f: ds.to_parquet(f), mode="wb")
    if os.path.isdir(pool.source):
        import shutil

        tmp = f"{path}.tmp{os.getpid()}"
        ds.save_to_disk(tmp)
        if os.path.isdir(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
        return path
    import pyarrow as pa

    table = ds.with_format("arrow")[:]
    meta = dict(table.schema.metadata or {})
    meta[b"huggingface"] = json.dumps({"info": {"features": ds.features.to_dict()}}).encode()
    table = table.replace_schema_metadata(meta)

    def write(f):
        with pa.ipc.new_stream(f, table.schema) as writer:
            writer.write_table(table)

    return atomic_write(path, write, mode="wb")
