"""``icons-fast report``: the numbers behind each figure, the PNGs and the page of a run directory built by hand.

The run directory holds synthetic scores with a known structure (tasks a and b
share most of their signal, task c is independent), NaN rows for three excluded
samples, a pool with the demo keys, error logs and a consensus selection made
by the real voting and export code (no model, no pipeline). Every figure's
numbers are checked against plain-numpy / plain-python recomputations from the
files in the run directory; the PNGs are checked for existence and size only,
and the page is rendered in headless Chromium when one is installed.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from icons_fast.report import plots, write_report
from icons_fast.report.data import (MISSING_SOURCE, figure_data, overlap_matrix, overlap_matrix_ref, read_run,
                                    record_source, task_top_sets)
from icons_fast.select.export import export_selection
from icons_fast.select.voting import consensus_select, specialist_select

N = 53
TASKS = ["alpha", "beta", "gamma"]
BAD = {4: "missing_image", 17: "too_long", 30: "missing_image"}  # pool index -> reason code
TARGET_BAD = {2: "corrupt_image"}  # in target-alpha
BUDGET = 11
DEMO_TASKS = ["color", "count", "arithmetic", "shape"]
SOURCES = ["vqa_clean", "low_quality", "duplicate", "uninformative", "text_only", "conversation", "caption"]


def _pool(n: int, rng, source_key: str | None) -> list:
    records = []
    for i in range(n):
        task = DEMO_TASKS[int(rng.integers(len(DEMO_TASKS)))]
        rec = {"id": f"r{i:03d}", "conversations": [
            {"from": "human", "value": ("<image>\n" if task != "arithmetic" else "") + f"Question {i} about {task}?"},
            {"from": "gpt", "value": f"answer-{i}"}],
            "demo_task": task, "demo_noisy": bool(rng.random() < 0.3),
            "demo_duplicate_of": f"r{i - 1:03d}" if i and rng.random() < 0.2 else None}
        if task != "arithmetic":
            rec["image"] = f"train_{i:03d}.png"
        if source_key is not None and i % 9 != 5:  # every ninth record has no source: its own category
            rec[source_key] = SOURCES[int(rng.integers(len(SOURCES)))]
        records.append(rec)
    return records


def _write_errors(path: str, bad: dict, stage: str = "data") -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for i, code in bad.items():
            f.write(json.dumps({"index": i, "id": f"r{i:03d}", "stage": stage, "reason": f"{code}: detail {i}"}) + "\n")


def make_run(root: str, n: int = N, tasks=TASKS, bad=BAD, target_bad=TARGET_BAD, specialist: str | None = None,
             seed: int = 0, source_key: str | None = None) -> dict:
    """A run directory as influence + select leave it; returns what went into it."""
    rng = np.random.default_rng(seed)
    shared = rng.normal(size=n)
    cols = [shared + 0.3 * rng.normal(size=n) if t < 2 else rng.normal(size=n) for t in range(len(tasks))]
    if len(cols) > 2:  # many ties in the last task: its top set is larger than the others'
        cols[-1] = np.round(cols[-1] * 1.5) / 1.5
    scores = (0.1 + 0.02 * np.stack(cols, axis=1)).astype(np.float32)  # [N, T]
    valid = np.ones(n, dtype=bool)
    valid[list(bad)] = False
    scores[~valid] = np.nan
    pool = _pool(n, rng, source_key)
    os.makedirs(os.path.join(root, "scores"))
    np.save(os.path.join(root, "scores", "scores.npy"), scores)
    np.save(os.path.join(root, "scores", "valid.npy"), valid)
    with open(os.path.join(root, "scores", "task_names.json"), "w") as f:
        json.dump({"task_names": list(tasks), "aggregate": "mean"}, f)
    pool_path = os.path.join(root, "data", "train.json")
    os.makedirs(os.path.dirname(pool_path))
    with open(pool_path, "w") as f:
        json.dump(pool, f)
    with open(os.path.join(root, "config.json"), "w") as f:
        json.dump({"config": {"data": {"train_data": pool_path},
                              "select": {"budget": BUDGET, "top_percent": None}}}, f)
    if bad:
        _write_errors(os.path.join(root, "errors", "train.jsonl"), bad)
    if target_bad:
        _write_errors(os.path.join(root, "errors", "target-alpha.jsonl"), target_bad)
    s = np.nan_to_num(scores, nan=-np.inf)
    if specialist is None:
        indices, info = consensus_select(s, budget=BUDGET, valid=valid, return_info=True)
        out = os.path.join(root, "selection")
    else:
        indices = specialist_select(s, list(tasks).index(specialist), BUDGET, valid=valid)
        info = {"rule": f"specialist:{specialist}", "selected": int(len(indices))}
        out = os.path.join(root, "selection", f"specialist-{specialist}")
    export_selection(pool_path, indices, out, scores=scores, task_names=list(tasks), info=info)
    return dict(scores=scores, valid=valid, pool=pool, indices=np.sort(np.asarray(indices)), info=info)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("run"))
    made = make_run(root)
    index = write_report(root)
    with open(index, encoding="utf-8") as f:
        page = f.read()
    return dict(made, root=root, index=index, out=os.path.dirname(index), page=page)


def _from_disk(root: str, selection: str = "selection") -> dict:
    """The run directory's files read back with numpy / json alone (the references' inputs)."""
    sel = os.path.join(root, selection)
    with open(os.path.join(root, "data", "train.json")) as f:
        pool = json.load(f)
    with open(os.path.join(sel, "summary.json")) as f:
        summary = json.load(f)
    errors = {}
    for name in sorted(os.listdir(os.path.join(root, "errors"))) if os.path.isdir(os.path.join(root, "errors")) else []:
        with open(os.path.join(root, "errors", name)) as f:
            errors[name[: -len(".jsonl")]] = Counter(json.loads(line)["reason"].split(":")[0] for line in f if line.strip())
    return dict(scores=np.load(os.path.join(root, "scores", "scores.npy")),
                valid=np.load(os.path.join(root, "scores", "valid.npy")),
                indices=np.loadtxt(os.path.join(sel, "indices.txt"), dtype=np.int64, ndmin=1),
                pool=pool, summary=summary, errors=errors)


def _rows(page: str) -> list[list[str]]:
    """Every table row of the page as a list of cell texts."""
    return [re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", row) for row in re.findall(r"<tr>(.*?)</tr>", page)]


def _row(page: str, first: str, width: int | None = None) -> list[str]:
    found = [r for r in _rows(page) if r and r[0] == first and (width is None or len(r) == width)]
    assert found, f"no table row starting with {first!r}"
    return found[0]


def _png_size(path: str) -> tuple[int, int]:
    with Image.open(path) as img:
        img.load()
        lo_hi = img.convert("L").getextrema()
        assert lo_hi[0] < lo_hi[1], f"{path} is one flat colour"
        return img.size


# ---------------------------------------------------------------- the computations


def test_top_sets_and_overlap_match_plain_numpy():
    rng = np.random.default_rng(5)
    scores = rng.normal(size=(41, 4)).astype(np.float32)
    scores[:, 1] = np.round(scores[:, 1] * 2) / 2  # ties: top sets of different sizes
    valid = rng.random(41) > 0.2
    scores[~valid] = np.nan
    p = 27.0
    thresholds, top = task_top_sets(scores, valid, p)
    for t in range(4):
        col = scores[valid, t]
        want = np.percentile(col, 100 - p)
        assert thresholds[t] == pytest.approx(want, rel=1e-6)
        assert set(np.flatnonzero(top[:, t])) == {int(i) for i in np.flatnonzero(valid) if scores[i, t] >= thresholds[t]}
    o = overlap_matrix(top)
    assert top[:, 1].sum() > top[:, 0].sum()
    np.testing.assert_allclose(o, overlap_matrix_ref(top))
    # independent brute force on the raw scores
    sets = [{i for i in range(41) if valid[i] and scores[i, t] >= np.percentile(scores[valid, t], 100 - p)} for t in range(4)]
    for a in range(4):
        for b in range(4):
            assert o[a, b] == pytest.approx(len(sets[a] & sets[b]) / len(sets[a]))
    assert np.isnan(overlap_matrix(np.zeros((5, 2), dtype=bool))).all()


def test_record_source():
    assert record_source({"demo_task": "count", "image": "coco/x.jpg"}) == "count"
    assert record_source({"image": "coco/train2017/000001.jpg"}) == "coco"
    assert record_source({"image": "ocr_vqa/images/1.jpg"}) == "ocr_vqa"
    assert record_source({"conversations": []}) == "text-only"
    assert record_source({"image": "lonely.png"}) == "image (no folder)"
    assert record_source(["not", "a", "dict"]) == "invalid record"


def test_figure_data_matches_numpy_on_the_run_files(run):
    disk = _from_disk(run["root"])
    s, valid, idx, pool = disk["scores"], disk["valid"], disk["indices"], disk["pool"]
    fd = figure_data(read_run(run["root"]))
    n_valid = int(valid.sum())
    p = 100.0 * BUDGET / n_valid  # config has no top_percent: the budget as a share of the valid samples
    assert fd.top_percent == pytest.approx(p)
    chosen = np.isin(np.arange(N), idx)
    np.testing.assert_array_equal(fd.is_selected, chosen)

    # score histograms: equal bins between min and max, counts by searchsorted, the threshold by np.percentile
    assert [h.task for h in fd.histograms] == TASKS
    n_bins = int(min(max(np.sqrt(n_valid), 5), 40))
    for t, h in enumerate(fd.histograms):
        col = s[valid, t].astype(np.float64)
        edges = np.linspace(col.min(), col.max(), n_bins + 1)
        np.testing.assert_allclose(h.edges, edges, rtol=1e-12, atol=1e-15)
        bin_of = lambda x: np.clip(np.searchsorted(edges, x, side="right") - 1, 0, n_bins - 1)  # noqa: E731
        np.testing.assert_array_equal(h.pool, np.bincount(bin_of(col), minlength=n_bins))
        np.testing.assert_array_equal(h.selected, np.bincount(bin_of(s[valid & chosen, t].astype(np.float64)),
                                                              minlength=n_bins))
        assert h.pool.sum() == n_valid and h.selected.sum() == len(idx)
        assert h.threshold == pytest.approx(float(np.percentile(s[valid, t], 100 - p)), rel=1e-6)

    # votes: per sample, the tasks whose percentile it reaches; agrees with the vote's own summary.json
    sets = [{i for i in np.flatnonzero(valid) if s[i, t] >= np.percentile(s[valid, t], 100 - p)} for t in range(3)]
    votes = np.array([sum(i in x for x in sets) for i in range(N)])
    np.testing.assert_array_equal(fd.vote_levels, np.arange(len(TASKS) + 1))
    np.testing.assert_array_equal(fd.vote_pool, [int(((votes == k) & valid).sum()) for k in range(4)])
    np.testing.assert_array_equal(fd.vote_selected, [int(((votes == k) & chosen).sum()) for k in range(4)])
    hist, sel = disk["summary"]["vote_histogram"], disk["summary"]["selected_per_vote"]
    assert fd.vote_pool.tolist() == [hist.get(str(k), 0) for k in range(4)]
    assert fd.vote_selected.tolist() == [sel.get(str(k), 0) for k in range(4)]

    # overlap: set arithmetic on the top sets
    assert len({len(x) for x in sets}) > 1  # the ties make the overlap matrix asymmetric
    np.testing.assert_allclose(fd.overlap, [[len(a & b) / len(a) for b in sets] for a in sets])

    # composition by task type, and the demo flags
    pool_c, sel_c = Counter(r["demo_task"] for r in pool), Counter(pool[i]["demo_task"] for i in idx)
    assert sorted(fd.by_type.categories) == sorted(pool_c)
    assert dict(zip(fd.by_type.categories, fd.by_type.pool.tolist())) == pool_c
    assert dict(zip(fd.by_type.categories, fd.by_type.selected.tolist())) == {c: sel_c[c] for c in pool_c}
    assert fd.by_type.pool.tolist() == sorted(fd.by_type.pool.tolist(), reverse=True)
    pool_pct, sel_pct = fd.by_type.shares()
    np.testing.assert_allclose(pool_pct, [100 * pool_c[c] / N for c in fd.by_type.categories])
    np.testing.assert_allclose(sel_pct, [100 * sel_c[c] / len(idx) for c in fd.by_type.categories])
    assert fd.by_source is None  # no record has a `source` key
    assert int(fd.demo["selected"]["noisy"].sum()) == sum(pool[i]["demo_noisy"] for i in idx)
    assert int(fd.demo["pool"]["near-duplicate"].sum()) == sum(r["demo_duplicate_of"] is not None for r in pool)

    # excluded: reason codes per error log
    assert fd.excluded == {k: dict(v) for k, v in disk["errors"].items()}
    assert fd.splits == ["train", "target-alpha"] and fd.codes[0] == "missing_image"


def test_composition_by_source_key(tmp_path):
    root = str(tmp_path / "run")
    make_run(root, source_key="source", seed=1)
    disk = _from_disk(root)
    pool, idx = disk["pool"], disk["indices"]
    src = lambda r: r.get("source", MISSING_SOURCE)  # noqa: E731
    pool_c, sel_c = Counter(map(src, pool)), Counter(src(pool[i]) for i in idx)
    assert MISSING_SOURCE in pool_c and len(pool_c) >= 4

    fd = figure_data(read_run(root))
    comp = fd.by_source
    assert dict(zip(comp.categories, comp.pool.tolist())) == pool_c
    assert dict(zip(comp.categories, comp.selected.tolist())) == {c: sel_c[c] for c in pool_c}
    assert (comp.n_pool, comp.n_selected) == (N, len(idx))
    pool_pct, sel_pct = comp.shares()
    assert pool_pct.sum() == pytest.approx(100) and sel_pct.sum() == pytest.approx(100)
    assert fd.by_type is not None  # the task-type view stays

    index = write_report(root)
    out = os.path.dirname(index)
    assert _png_size(os.path.join(out, "composition_source.png")) == plots.BAR_SIZE
    with open(index, encoding="utf-8") as f:
        page = f.read()
    assert 'src="composition_source.png"' in page and 'src="composition.png"' in page
    for c in pool_c:
        row = _row(page, c, width=5)
        assert row[1:] == [str(pool_c[c]), f"{100 * pool_c[c] / N:.1f}%", str(sel_c[c]),
                           f"{100 * sel_c[c] / len(idx):.1f}%"]

    # the key is a parameter: another key name, and a key no record has (no figure then)
    other = str(tmp_path / "rep-origin")
    with open(os.path.join(root, "data", "train.json")) as f:
        renamed = [{("origin" if k == "source" else k): v for k, v in r.items()} for r in json.load(f)]
    with open(os.path.join(root, "data", "train.json"), "w") as f:
        json.dump(renamed, f)
    assert figure_data(read_run(root), source_key="origin").by_source.pool.tolist() == comp.pool.tolist()
    write_report(root, out_dir=other, source_key="origin")
    assert os.path.exists(os.path.join(other, "composition_source.png"))
    assert figure_data(read_run(root)).by_source is None


# ---------------------------------------------------------------- the files


def test_every_plot_is_written_with_its_size(run):
    out = run["out"]
    expected = {f"scores_{t}_{name}.png": plots.HIST_SIZE for t, name in enumerate(TASKS)}
    expected.update({"votes.png": plots.BAR_SIZE, "overlap.png": plots.HEATMAP_SIZE, "composition.png": plots.BAR_SIZE,
                     "demo_quality.png": plots.SMALL_BAR_SIZE, "excluded.png": plots.BAR_SIZE})
    assert set(f for f in os.listdir(out) if f.endswith(".png")) == set(expected)
    for name, size in expected.items():
        assert _png_size(os.path.join(out, name)) == size, name


def test_page_references_every_plot_and_states_the_numbers(run):
    page, out = run["page"], run["out"]
    srcs = re.findall(r'<img src="([^"]+)"', page)
    assert set(srcs) == {f for f in os.listdir(out) if f.endswith(".png")}
    assert all(not s.startswith(("/", "file:", "http")) for s in srcs)
    assert "<script" not in page
    valid, indices = run["valid"], run["indices"]
    assert _row(page, "samples in the pool (N)")[1] == str(N)
    assert _row(page, "valid (scored)")[1] == str(int(valid.sum()))
    assert _row(page, "excluded")[1] == str(len(BAD))
    assert _row(page, "selected")[1] == str(BUDGET) == str(len(indices))
    assert _row(page, "budget")[1] == str(BUDGET)
    assert _row(page, "tie break")[1] == run["info"]["tie_break"]
    # reason table: split, code, count
    want = Counter(BAD.values())
    got = {(r[0], r[1]): int(r[2]) for r in _rows(page) if len(r) == 4 and r[0] in ("train", "target-alpha")}
    assert got == {**{("train", c): k for c, k in want.items()}, ("target-alpha", "corrupt_image"): 1}
    # vote table == the vote's own histogram in summary.json
    hist, sel = run["info"]["vote_histogram"], run["info"]["selected_per_vote"]
    for k in range(len(TASKS) + 1):
        assert _row(page, str(k))[1:3] == [str(hist.get(k, 0)), str(sel.get(k, 0))]
    # overlap table == brute force over the raw scores with numpy's percentile
    s, p = run["scores"], 100.0 * BUDGET / valid.sum()
    sets = [{i for i in np.flatnonzero(valid) if s[i, t] >= np.percentile(s[valid, t], 100 - p)} for t in range(3)]
    for a, name in enumerate(TASKS):
        row = _row(page, name)
        assert row[1] == str(len(sets[a]))
        assert [float(x) for x in row[2:]] == pytest.approx([len(sets[a] & sb) / len(sets[a]) for sb in sets], abs=5e-4)
    # composition: counts per demo_task in pool and selection
    pool = run["pool"]
    pool_c = Counter(r["demo_task"] for r in pool)
    sel_c = Counter(pool[i]["demo_task"] for i in indices)
    for task in DEMO_TASKS:
        row = _row(page, task)
        assert int(row[1]) == pool_c[task] and int(row[3]) == sel_c[task]
    noisy = sum(pool[i]["demo_noisy"] for i in indices)
    quality = [r for r in _rows(page) if r[0] == "selected" and len(r) == 3]
    assert quality and quality[0][1].startswith(f"{noisy} (")
    # a sample of selected records: ids and first questions, html-escaped
    for i in indices[:5]:
        assert f"<td>{pool[i]['id']}</td>" in page
        assert f"Question {i} about" in page


def test_cli_prints_the_index_path(run, tmp_path, capsys):
    from icons_fast.cli import main

    out = str(tmp_path / "rep")
    assert main(["report", run["root"], "--out", out]) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert printed == os.path.join(out, "index.html") and os.path.exists(printed)
    assert os.path.exists(os.path.join(out, "votes.png"))


def test_optional_parts_missing(tmp_path):
    """One task, no error logs, only a specialist selection, and the pool file gone."""
    root = str(tmp_path / "run1")
    made = make_run(root, n=101, tasks=["solo"], bad={}, target_bad={}, specialist="solo", seed=3)
    os.remove(os.path.join(root, "data", "train.json"))
    index = write_report(root)
    out = os.path.dirname(index)
    pngs = {f for f in os.listdir(out) if f.endswith(".png")}
    assert pngs == {"scores_0_solo.png", "votes.png", "overlap.png", "composition.png", "demo_quality.png"}
    for name in pngs:
        _png_size(os.path.join(out, name))
    with open(index, encoding="utf-8") as f:
        page = f.read()
    assert set(re.findall(r'<img src="([^"]+)"', page)) == pngs
    # One task, its own top budget: every selected sample is at or above the threshold.
    fd = figure_data(read_run(root))
    (h,) = fd.histograms
    scores = made["scores"][:, 0]
    assert (scores[made["indices"]] >= h.threshold).all()
    assert h.selected[: max(int(np.searchsorted(h.edges, h.threshold, side="right")) - 1, 0)].sum() == 0
    assert "No error records" in page
    assert "specialist-solo" in page and "specialist:solo" in page
    assert _row(page, "selected")[1] == str(BUDGET)
    # the selection's composition comes from selected.json when the pool is gone
    assert fd.by_type.pool is None
    sel_c = Counter(made["pool"][i]["demo_task"] for i in made["indices"])
    for task, k in sel_c.items():
        assert _row(page, task)[3] == str(k)


def test_run_without_scores_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="icons-fast influence"):
        write_report(str(tmp_path))


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
_PROBE = """<script>
window.addEventListener("load", () => {
  const imgs = [...document.images].map(i => i.getAttribute("src") + "=" + i.naturalWidth + "x" + i.naturalHeight);
  document.body.setAttribute("data-probe", imgs.join(";") + "|tables=" + document.querySelectorAll("table").length);
});
</script>"""


def _chromium(*args: str, profile: str) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
           "--virtual-time-budget=5000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="no headless browser: install Debian's chromium (apt-get install -y chromium)")
def test_page_renders_in_headless_chromium(run, tmp_path):
    # The page itself has no script; a copy beside it gets one that records what the browser loaded.
    with open(run["index"], encoding="utf-8") as f:
        page = f.read()
    probe = os.path.join(run["out"], "probe.html")
    with open(probe, "w", encoding="utf-8") as f:
        f.write(page.replace("</body>", _PROBE + "</body>"))
    try:
        proc = _chromium("--dump-dom", "file://" + os.path.abspath(probe), profile=str(tmp_path / "p1"))
    finally:
        os.remove(probe)
    found = re.search(r'data-probe="([^"]*)"', proc.stdout)
    assert found, f"chromium did not run the page's load event (rc {proc.returncode}): {proc.stderr[-2000:]}"
    images, tables = found.group(1).split("|tables=")
    loaded = dict(item.split("=") for item in images.split(";"))
    want = {f: "{}x{}".format(*Image.open(os.path.join(run["out"], f)).size) for f in os.listdir(run["out"])
            if f.endswith(".png")}
    assert loaded == want  # every plot decoded by the browser, at its own size
    assert int(tables) == page.count("<table>")

    shot = str(tmp_path / "page.png")
    proc = _chromium(f"--screenshot={shot}", "--window-size=1200,2000", "file://" + os.path.abspath(run["index"]),
                     profile=str(tmp_path / "p2"))
    assert os.path.exists(shot), f"chromium wrote no screenshot (rc {proc.returncode}): {proc.stderr[-2000:]}"
    with Image.open(shot) as img:
        rgb = np.asarray(img.convert("RGB"))
    assert rgb.shape[:2] == (2000, 1200)
    assert (rgb < 245).any(axis=2).mean() > 0.02, "the screenshot is (almost) blank"
