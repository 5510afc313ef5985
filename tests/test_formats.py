"""Pool formats: every format normalised to the LLaVA record, bad records kept at their index, selections round-trip."""
import base64
import io
import json
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from icons_fast.data.errors import SampleProblem
from icons_fast.data.formats import (
    CheckedBuilder,
    UnreadableRecord,
    detect_container,
    normalise_record,
    read_pool,
    write_selected,
)
from icons_fast.data.images import EmbeddedImage, load_image

datasets = pytest.importorskip("datasets", reason="the table formats need `pip install datasets`")


def _png(colour=(200, 10, 10), size=(5, 3)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


LLAVA = {"id": 7, "image": "a.jpg", "extra": [1, None],
         "conversations": [{"from": "human", "value": "<image>\nq?"}, {"from": "gpt", "value": "a"}]}


# --------------------------------------------------------------------------- normalising


def test_llava_records_are_used_exactly_as_read():
    assert normalise_record(LLAVA, "record 0") is LLAVA
    odd = {"image": ["x.png"], "conversations": [{"from": "human", "value": "hi"}]}
    assert normalise_record(odd, "record 1") is odd  # the tokeniser judges LLaVA records, as before


def test_sharegpt_roles_and_system_turn():
    rec = {"id": "s", "conversations": [{"from": "system", "value": "Be brief."},
                                        {"from": "user", "value": "hi"}, {"from": "assistant", "value": "yo"}],
           "images": ["p.png"]}
    out = normalise_record(rec, "line 1")
    assert out["system"] == "Be brief." and out["image"] == "p.png" and "images" not in out
    assert out["conversations"] == [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]
    assert rec["conversations"][1]["from"] == "user"  # the source record is not modified


def test_openai_messages_with_parts_placeholders_and_data_urls():
    png = _png()
    rec = {"id": 3, "images": ["first.png"], "messages": [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
        {"role": "user", "content": "And now?"},
        {"role": "assistant", "content": "Still."}]}
    out = normalise_record(rec, "line 1")
    assert out == {"id": 3, "system": "sys", "image": "first.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A cat."},
        {"from": "human", "value": "And now?"}, {"from": "gpt", "value": "Still."}]}
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    two = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                     {"type": "image", "image": "file:///x/b.jpg"},
                                                     {"type": "text", "text": "diff?"}]},
                        {"role": "assistant", "content": "none"}]}
    out = normalise_record(two, "line 2")
    assert isinstance(out["image"], list) and out["image"][1] == "/x/b.jpg"
    assert isinstance(out["image"][0], EmbeddedImage) and out["image"][0].data == png
    assert out["conversations"][0]["value"] == "<image>\n<image>\ndiff?"


@pytest.mark.parametrize("rec,match", [
    ({"messages": [{"role": "tool", "content": "x"}]}, "role 'tool'"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]},
     "web url"),
    ({"messages": [{"role": "user", "content": [{"type": "image"}]}]}, "lists only 0"),
    ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, "not a text or image part"),
    ({"messages": []}, "non-empty"),
    ({"messages": [{"role": "user", "content": 5}]}, "content is a int"),
])
def test_bad_messages_become_unreadable_records(rec, match):
    out = normalise_record(dict(rec, id="r9"), "line 4 of p.jsonl")
    assert isinstance(out, UnreadableRecord) and out["id"] == "r9"
    assert "line 4 of p.jsonl" in out.detail and match in out.detail
    with pytest.raises(SampleProblem, match="bad_record: line 4"):
        CheckedBuilder(object()).build(0, out)
    assert pickle.loads(pickle.dumps(out)).detail == out.detail


def test_checked_builder_refuses_several_images_where_the_model_takes_one():
    class Builder:
        def build(self, index, record):
            return {"index": index}

        collate = "the builder's"

    rec = {"image": ["a.png", "b.png"], "conversations": []}
    with pytest.raises(SampleProblem, match="multiple_images: 2 images; this model takes 1"):
        CheckedBuilder(Builder()).build(0, rec)
    assert CheckedBuilder(Builder(), max_images=2).build(5, rec) == {"index": 5}
    assert CheckedBuilder(Builder()).collate == "the builder's"


ODD = [None, 0, 1.5, True, "", "x", [], [1], {}, {"a": 1}, ["user"], {"url": 3}]


def _mutations():
    """Records of every schema with one field replaced by an odd value (structure the formats do not allow)."""
    base_msgs = {"id": "m", "images": ["a.png"], "messages": [
        {"role": "system", "content": "s"},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q"},
                                     {"type": "image_url", "image_url": {"url": "b.png"}}]},
        {"role": "assistant", "content": "a"}]}
    base_share = {"id": "s", "images": ["a.png"], "conversations": [
        {"from": "system", "value": "s"}, {"from": "user", "value": "<image>\nq"}, {"from": "assistant", "value": "a"}]}
    def turn_field(base, turns_key, turn, key, odd):
        """``base`` with ``base[turns_key][turn][key] = odd`` (a deep copy; ``base`` is untouched)."""
        turns = json.loads(json.dumps(base[turns_key]))
        turns[turn][key] = odd
        return dict(base, **{turns_key: turns})

    for odd in ODD:
        yield dict(base_msgs, images=odd)
        yield dict(base_msgs, messages=odd)
        for m in range(3):
            for key in ("role", "content"):
                yield turn_field(base_msgs, "messages", m, key, odd)
        for p in range(3):
            msgs = json.loads(json.dumps(base_msgs["messages"]))
            msgs[1]["content"][p] = odd
            yield dict(base_msgs, messages=msgs)
            msgs = json.loads(json.dumps(base_msgs["messages"]))
            if isinstance(msgs[1]["content"][p], dict):
                for key in list(msgs[1]["content"][p]):
                    msgs[1]["content"][p][key] = odd
            yield dict(base_msgs, messages=msgs)
        yield dict(base_share, images=odd)
        yield dict(base_share, conversations=odd)
        for t in range(3):
            for key in ("from", "value"):
                yield turn_field(base_share, "conversations", t, key, odd)
        yield odd


def test_odd_records_never_crash_and_keep_their_index(tiny_model_dir, tmp_path):
    from transformers import AutoConfig, AutoProcessor

    from icons_fast.data import ErrorLog, LlavaDataset, LlavaSampleBuilder

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "b.png")
    records = list(_mutations())
    path = tmp_path / "odd.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    pool = read_pool(str(path))
    assert len(pool) == len(records)
    for table in (None, "t[0]"):  # as json lines and as table rows
        for i, r in enumerate(records):
            normalise_record(r, f"record {i}", table=table)  # never raises
    builder = CheckedBuilder(LlavaSampleBuilder(AutoProcessor.from_pretrained(tiny_model_dir),
                                                AutoConfig.from_pretrained(tiny_model_dir), str(tmp_path), 4096))
    log = ErrorLog(None)
    out = [LlavaDataset(pool.records, builder, log)[i] for i in range(len(pool))]
    assert [o.index if hasattr(o, "index") else o["index"] for o in out] == list(range(len(pool)))
    n_bad = sum(1 for o in out if not isinstance(o, dict))
    assert 0 < n_bad < len(pool)  # odd fields are errors; the untouched ones still give good samples


# --------------------------------------------------------------------------- embedded images


def test_embedded_images_decode_and_fail_as_files_do():
    img = load_image("/nowhere", EmbeddedImage(_png(size=(4, 2)), "pool.parquet[3]/image"))
    assert img.size == (4, 2) and img.mode == "RGB"
    copy = pickle.loads(pickle.dumps(EmbeddedImage(_png(), "x.png")))
    assert isinstance(copy, EmbeddedImage) and str(copy) == "x.png" and load_image(None, copy).size == (5, 3)
    with pytest.raises(SampleProblem, match="image_format_mismatch: photo.jpg is really PNG"):
        load_image(None, EmbeddedImage(_png(), "photo.jpg"))
    with pytest.raises(SampleProblem, match="corrupt_image"):
        load_image(None, EmbeddedImage(b"not an image", "t[0]/image"))
    with pytest.raises(SampleProblem, match="empty_image"):
        load_image(None, EmbeddedImage(b"", "t[0]/image"))


# --------------------------------------------------------------------------- containers


def test_jsonl_indices_are_raw_lines_and_export_is_byte_identical(tmp_path):
    good = json.dumps({"id": "a", "conversations": [{"from": "user", "value": "é"}, {"from": "gpt", "value": "b"}]},
                      ensure_ascii=False)
    data = (good + "\n\n{broken\n" + '{"id": "c", "conversations": []}\r\n').encode() + b"\xff\xfe\n" + \
        b'{"id": "e", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]}'
    path = tmp_path / "pool.jsonl"
    path.write_bytes(data)
    pool = read_pool(str(path))
    assert pool.container == "jsonl" and len(pool) == 6
    kinds = [type(r).__name__ for r in pool.records]
    assert kinds == ["dict", "UnreadableRecord", "UnreadableRecord", "dict", "UnreadableRecord", "dict"]
    assert "line 2 of pool.jsonl is blank" in pool.records[1].detail
    assert "line 3 of pool.jsonl is not valid json" in pool.records[2].detail
    assert "line 5 of pool.jsonl is not UTF-8" in pool.records[4].detail
    assert pool.records[5]["conversations"][1] == {"from": "gpt", "value": "r"}
    out = write_selected(pool, [0, 3, 5], str(tmp_path / "selected.jsonl"))
    assert open(out, "rb").read() == data.splitlines(keepends=True)[0] + b'{"id": "c", "conversations": []}\r\n' + \
        data.splitlines(keepends=True)[5] + b"\n"


def _table_rows(n=5):
    rows = []
    for i in range(n):
        rows.append({"id": f"t{i}", "image": {"bytes": _png((i * 40, 0, 0)), "path": f"img{i}.png"} if i % 2 == 0
                     else None,
                     "conversations": [{"from": "human", "value": ("<image>\n" if i % 2 == 0 else "") + f"q{i}"},
                                       {"from": "gpt", "value": f"a{i}"}]})
    return rows


def _table(rows):
    feats = datasets.Features({"id": datasets.Value("string"), "image": datasets.Image(),
                               "conversations": [{"from": datasets.Value("string"), "value": datasets.Value("string")}]})
    return datasets.Dataset.from_list(rows, features=feats)


@pytest.mark.parametrize("layout", ["parquet", "arrow_dir", "arrow_file"])
def test_tables_with_embedded_images_round_trip(tmp_path, layout):
    rows = _table_rows()
    ds = _table(rows)
    if layout == "parquet":
        src = str(tmp_path / "pool.parquet")
        ds.to_parquet(src)
    elif layout == "arrow_dir":
        src = str(tmp_path / "pool")
        ds.save_to_disk(src)
    else:
        ds.save_to_disk(str(tmp_path / "saved"))
        src = str(tmp_path / "pool.arrow")
        arrow = [n for n in os.listdir(tmp_path / "saved") if n.endswith(".arrow")][0]
        os.rename(tmp_path / "saved" / arrow, src)
    pool = read_pool(src)
    assert pool.container == detect_container(src) == ("parquet" if layout == "parquet" else "arrow")
    rec = pool.records[2]
    assert isinstance(rec["image"], EmbeddedImage) and str(rec["image"]) == "img2.png"
    assert load_image(None, rec["image"]).getpixel((0, 0)) == (80, 0, 0)
    assert "image" not in pool.records[1] or pool.records[1]["image"] is None
    assert rec["conversations"][0] == {"from": "human", "value": "<image>\nq2"}
    name = {"parquet": "selected.parquet", "arrow_dir": "selected", "arrow_file": "selected.arrow"}[layout]
    out = write_selected(pool, [0, 2, 3], str(tmp_path / name))
    back = read_pool(out)
    assert back.container == pool.container and len(back) == 3
    assert [r["id"] for r in back.records] == ["t0", "t2", "t3"]
    assert back.records[1]["image"].data == rows[2]["image"]["bytes"]
    assert back.dataset.features == pool.dataset.features  # the image column is still an Image feature


def test_messages_table_with_a_list_of_images(tmp_path):
    png = _png((0, 90, 0))
    rows = [{"id": "m0", "images": [{"bytes": png, "path": None}, {"bytes": png, "path": "b.png"}],
             "messages": [{"role": "user", "content": [{"type": "image", "text": None}, {"type": "image", "text": None},
                                                       {"type": "text", "text": "same?"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "yes"}]}]}]
    ds = datasets.Dataset.from_list(rows).cast_column("images", datasets.List(datasets.Image()))
    ds.to_parquet(str(tmp_path / "m.parquet"))
    rec = read_pool(str(tmp_path / "m.parquet")).records[0]
    assert [str(x) for x in rec["image"]] == ["m.parquet[0]/image[0]", "b.png"]
    assert load_image(None, rec["image"][0]).getpixel((0, 0)) == (0, 90, 0)
    assert rec["conversations"][0] == {"from": "human", "value": "<image>\n<image>\nsame?"}
    with pytest.raises(SampleProblem, match="multiple_images"):
        CheckedBuilder(object()).build(0, rec)


# --------------------------------------------------------------------------- hub ids


def test_hub_dataset_id_goes_through_load_dataset(monkeypatch):
    calls = []

    def fake_load_dataset(name, split=None, **kwargs):
        calls.append((name, split, kwargs))
        return _table(_table_rows(2))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert detect_container("liuhaotian/LLaVA-Instruct-150K") == "hub"
    pool = read_pool("HuggingFaceM4/the_cauldron:validation")
    assert calls == [("HuggingFaceM4/the_cauldron", "validation", {})]  # the user's cache and offline settings
    assert [r["id"] for r in pool.records] == ["t0", "t1"]
    read_pool("owner/name")
    assert calls[-1][:2] == ("owner/name", "train")


def test_hub_dataset_without_network_is_one_clear_line(monkeypatch):
    def offline(name, split=None, **kwargs):
        raise ConnectionError("Couldn't reach 'owner/name' on the Hub (LocalEntryNotFoundError)\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ConnectionError) as err:
        read_pool("owner/name")
    msg = str(err.value)
    assert "\n" not in msg and "HF_HUB_OFFLINE" in msg and "local directory" in msg and "owner/name" in msg


def test_hub_model_id_goes_through_the_hub_cache(monkeypatch, tmp_path):
    import huggingface_hub

    from icons_fast.model.loading import resolve_model_dir, resolve_model_source

    calls = []
    snap = tmp_path / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (snap / "model.safetensors").write_bytes(b"")

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert resolve_model_source("llava-hf/llava-1.5-7b-hf") == (str(snap), True)
    assert calls[0][0] == "llava-hf/llava-1.5-7b-hf"
    assert set(calls[0][1]) == {"allow_patterns"} and "*.safetensors" in calls[0][1]["allow_patterns"]
    assert resolve_model_dir("llava-hf/llava-1.5-7b-hf") == str(snap)
    assert resolve_model_source(str(tmp_path)) == (str(tmp_path), False)

    def offline(repo_id, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'\nsecond line")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ConnectionError) as err:
        resolve_model_dir("llava-hf/llava-1.5-7b-hf")
    msg = str(err.value)
    assert "\n" not in msg and "HF_HUB_OFFLINE" in msg and "local directory" in msg
    with pytest.raises(FileNotFoundError, match="neither a local directory nor a Hugging Face id"):
        resolve_model_dir(str(tmp_path / "missing" / "deeper" / "dir"))


# --------------------------------------------------------------------------- end to end


def _as_format(kind, demo, tmp_path):
    """The demo pool rewritten in ``kind``; return its path."""
    pool = json.load(open(demo["train"]))
    folder = demo["image_folder"]
    if kind == "sharegpt_jsonl":
        path = tmp_path / "pool.jsonl"
        roles = {"human": "user", "gpt": "assistant"}
        lines = [json.dumps(dict(r, conversations=[{"from": roles[t["from"]], "value": t["value"]}
                                                    for t in r["conversations"]])) for r in pool]
        path.write_text("\n".join(lines) + "\n\n{broken\n")  # a blank and a broken line: records 16 and 17
        return str(path)
    if kind == "messages_jsonl":
        path = tmp_path / "pool.jsonl"
        out = []
        for r in pool:
            msgs = []
            for t in r["conversations"]:
                role = "user" if t["from"] == "human" else "assistant"
                if "<image>" in t["value"]:
                    text = t["value"].replace("<image>", "").strip()
                    msgs.append({"role": role, "content": [{"type": "image"}, {"type": "text", "text": text}]})
                else:
                    msgs.append({"role": role, "content": t["value"]})
            rec = {"id": r["id"], "messages": msgs}
            if "image" in r:
                rec["images"] = [os.path.join(folder, r["image"])]
            out.append(json.dumps(rec))
        path.write_text("\n".join(out) + "\n")
        return str(path)
    rows = []
    for r in pool:
        image = None
        if "image" in r:
            image = {"bytes": open(os.path.join(folder, r["image"]), "rb").read(), "path": os.path.basename(r["image"])}
        rows.append({"id": str(r["id"]), "image": image, "conversations": r["conversations"]})
    ds = _table(rows)
    if kind == "parquet":
        path = str(tmp_path / "pool.parquet")
        ds.to_parquet(path)
    else:
        path = str(tmp_path / "pool_arrow")
        ds.save_to_disk(path)
    return path


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    from icons_fast.data import make_replica_data

    return make_replica_data(str(tmp_path_factory.mktemp("demo")), n_train=16, n_target=2, n_eval=2)


@pytest.mark.parametrize("kind", ["sharegpt_jsonl", "messages_jsonl", "parquet", "arrow"])
def test_each_format_runs_end_to_end_and_its_selection_round_trips(kind, small_demo, tiny_model_dir, tmp_path):
    from icons_fast.cli import main

    src = _as_format(kind, small_demo, tmp_path)
    out = str(tmp_path / "run")
    target = next(iter(small_demo["targets"].items()))
    rc = main(["run", "--model", tiny_model_dir, "--train-data", src, "--image-folder", small_demo["image_folder"],
               "--target", f"{target[0]}={target[1]}", "--out", out, "--lora-r", "4", "--proj-dim", "32",
               "--lora-alpha", "8", "--set", "warmup.fraction=0.25", "--set", "features.batch_size=8",
               "--set", "features.shard_size=8", "--set", "data.max_length=1024"])
    assert rc in (0, None)
    indices = np.loadtxt(os.path.join(out, "selection", "indices.txt"), dtype=int)
    assert len(indices) == int(0.2 * 16)
    from icons_fast.data import ErrorLog

    log_path = os.path.join(out, "errors", "train.jsonl")
    errors = ErrorLog.read(log_path) if os.path.exists(log_path) else []
    if kind == "sharegpt_jsonl":  # the bad lines are errors at their own line numbers, nothing shifted
        assert sorted((e.index, e.code) for e in errors) == [(16, "bad_record"), (17, "bad_record")]
        assert "line 17 of pool.jsonl is blank" in errors[0].reason + errors[1].reason
        assert not set(indices.tolist()) & {16, 17}
    else:
        assert errors == []
    pool = read_pool(src)
    sel_name = {"sharegpt_jsonl": "selected.jsonl", "messages_jsonl": "selected.jsonl", "parquet": "selected.parquet",
                "arrow": "selected"}[kind]
    selected = read_pool(os.path.join(out, "selection", sel_name))
    assert selected.container == pool.container
    if pool.container == "jsonl":
        assert open(os.path.join(out, "selection", sel_name), "rb").read() == b"".join(pool.raw[i] for i in indices)
    else:
        assert selected.dataset.to_list() == pool.dataset.select(indices).to_list()
        assert selected.dataset.features == pool.dataset.features
