"""export_selection writes exactly the selected input records, unchanged and in order, atomically."""
import json
import os

import numpy as np
import pytest
import torch

from icons_fast.select.export import export_selection, format_summary
from icons_fast.select.voting import consensus_select, vote_counts

N, T = 41, 3


def _records():
    """LLaVA-like records with varied value types, unicode and nested conversations."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(N):
        rec = {
            "id": f"{i:012d}",
            "conversations": [
                {"from": "human", "value": f"<image>\nQuestion {i}: ¿qué es? 画像 {rng.integers(1000)}"},
                {"from": "gpt", "value": f"Answer {i} \u00e9\u00e8 \"quoted\" \\ backslash"},
            ],
        }
        if i % 3 == 0:
            rec["image"] = f"coco/train2017/{i:012d}.jpg"
        if i % 7 == 0:
            rec["score"] = 0.1 * i  # a float value must survive unchanged
            rec["tags"] = [None, True, 3]
        out.append(rec)
    return out


@pytest.fixture
def pool(tmp_path):
    records = _records()
    path = tmp_path / "pool.json"
    path.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    return str(path), records


def _selection():
    scores = np.random.default_rng(1).standard_normal((N, T)).astype(np.float32)
    sel, info = consensus_select(scores, 0.3, return_info=True)
    return scores, sel, info


def test_selected_records_are_exactly_the_input_records(pool, tmp_path):
    path, records = pool
    scores, sel, info = _selection()
    votes = vote_counts(scores, info["top_percent"])
    out_dir = str(tmp_path / "selection")
    shuffled = np.random.default_rng(2).permutation(sel)  # any order in, original order out
    written = export_selection(path, shuffled, out_dir, scores=scores, task_names=["a", "b", "c"], votes=votes, info=info)
    assert set(written) == {"selected", "indices", "votes", "scores", "task_names", "summary"}

    with open(path, encoding="utf-8") as f:
        original = json.loads(f.read())
    with open(written["selected"], encoding="utf-8") as f:
        selected = json.loads(f.read())
    assert selected == [original[i] for i in sorted(sel.tolist())]
    assert len(selected) == len(sel)
    assert "画像" in open(written["selected"], encoding="utf-8").read()  # ensure_ascii=False

    with open(written["indices"]) as f:
        assert [int(line) for line in f] == sorted(sel.tolist())
    np.testing.assert_array_equal(np.load(written["votes"]), votes)
    np.testing.assert_array_equal(np.load(written["scores"]), scores)
    assert json.load(open(written["task_names"])) == ["a", "b", "c"]
    summary = json.load(open(written["summary"]))
    assert summary["n_records"] == N and summary["n_selected"] == len(sel)
    assert summary["cut_votes"] == info["cut_votes"]
    assert {int(k): v for k, v in summary["vote_histogram"].items()} == info["vote_histogram"]
    # no temp files left behind
    assert sorted(os.listdir(out_dir)) == sorted(os.path.basename(p) for p in written.values())


def test_minimal_export_and_torch_inputs(pool, tmp_path):
    path, records = pool
    idx = torch.tensor([40, 0, 17])
    written = export_selection(path, idx, str(tmp_path / "out"))
    assert set(written) == {"selected", "indices", "summary"}
    assert json.load(open(written["selected"], encoding="utf-8")) == [records[0], records[17], records[40]]
    written = export_selection(path, [3], str(tmp_path / "spec"), info={"rule": "specialist:a"})
    summary = json.load(open(written["summary"]))
    assert summary["rule"] == "specialist:a" and "text" not in summary  # no vote text for a non-vote rule


def test_sample_ids_check(pool, tmp_path):
    path, records = pool
    ids = [r["id"] for r in records]
    export_selection(path, [1, 2, 30], str(tmp_path / "ok"), sample_ids=ids)  # matching ids pass
    shifted = ids[1:] + ["extra"]  # the features were made from a file missing its first record
    with pytest.raises(ValueError, match=r"record 2 .*'000000000002'.*'000000000003'"):
        export_selection(path, [2, 30], str(tmp_path / "bad"), sample_ids=shifted)
    with pytest.raises(ValueError, match="40 entries"):
        export_selection(path, [2], str(tmp_path / "bad"), sample_ids=ids[:-1])
    # one expected id per selected index, in the order the indices are given
    export_selection(path, [30, 1], str(tmp_path / "ok"), sample_ids=[ids[30], ids[1]])
    with pytest.raises(ValueError, match=r"record 1 .*'000000000001'.*'000000000030'"):
        export_selection(path, [30, 1], str(tmp_path / "bad"), sample_ids=[ids[1], ids[30]])
    # a dict {index: id}
    export_selection(path, [4, 9], str(tmp_path / "ok"), sample_ids={4: ids[4], 9: ids[9]})
    with pytest.raises(ValueError, match="record 9"):
        export_selection(path, [4, 9], str(tmp_path / "bad"), sample_ids={4: ids[4], 9: "nope"})
    with pytest.raises(ValueError, match="no expected id"):
        export_selection(path, [4, 9], str(tmp_path / "bad"), sample_ids={4: ids[4]})
    assert not os.path.exists(tmp_path / "bad")


def test_bad_inputs_raise(pool, tmp_path):
    path, _ = pool
    out = str(tmp_path / "out")
    with pytest.raises(IndexError, match="41"):
        export_selection(path, [0, 41], out)
    with pytest.raises(ValueError, match="more than once"):
        export_selection(path, [3, 3], out)
    with pytest.raises(ValueError, match="rows"):
        export_selection(path, [3], out, scores=np.ones((40, 2)), task_names=["a", "b"])
    with pytest.raises(ValueError, match="task_names"):
        export_selection(path, [3], out, scores=np.ones((N, 2)))
    not_list = tmp_path / "d.json"
    not_list.write_text('{"a": 1}')
    with pytest.raises(ValueError, match="list of records"):
        export_selection(str(not_list), [0], out)


def test_rewrite_replaces_files(pool, tmp_path):
    path, records = pool
    out = str(tmp_path / "out")
    export_selection(path, [1, 2, 3], out)
    written = export_selection(path, [5], out)
    assert json.load(open(written["selected"], encoding="utf-8")) == [records[5]]
    assert open(written["indices"]).read() == "5\n"


def test_format_summary(tmp_path):
    s = np.random.default_rng(3).integers(0, 3, size=(200, 4)).astype(np.float32)
    valid = np.ones(200, bool)
    valid[:5] = False
    _, info = consensus_select(s, 0.2, valid=valid, return_info=True)
    text = format_summary(info, ["vqa", "ocr", "mme", "pope"])
    assert f"{info['budget']} of 195" in text
    assert "vqa, ocr, mme, pope" in text
    assert "excluded as invalid: 5" in text
    assert f"cut at {info['cut_votes']} votes" in text
    assert "mean percentile rank" in text
    for level, count in info["vote_histogram"].items():
        assert any(line.split()[:2] == [str(level), str(count)] for line in text.splitlines())
    # the same text from the dict as read back from summary.json (string keys)
    assert format_summary(json.loads(json.dumps(info)), ["vqa", "ocr", "mme", "pope"]) == text


def test_pool_without_ids_exports_with_index_ids(tmp_path):
    """Features key a record without an id as "#<index>"; export must accept exactly that."""
    from icons_fast.select.export import export_selection

    pool = [{"conversations": [{"from": "human", "value": str(i)}]} for i in range(5)]
    path = tmp_path / "pool.json"
    path.write_text(json.dumps(pool))
    export_selection(str(path), np.array([1, 3]), str(tmp_path / "sel"), sample_ids=["#1", "#3"])
    assert json.loads((tmp_path / "sel" / "selected.json").read_text()) == [pool[1], pool[3]]
    with pytest.raises(ValueError, match="shifted"):
        export_selection(str(path), np.array([1, 3]), str(tmp_path / "sel2"), sample_ids=["#1", "#4"])
