"""``icons-fast report``: plots and the HTML page of a run directory built by hand.

The run directory holds synthetic scores with a known structure (tasks a and b
share most of their signal, task c is independent), NaN rows for two excluded
samples, a pool with the demo keys, error logs and a consensus selection made
by the real voting and export code (no model, no pipeline). Numbers on the page
are checked against plain-numpy / plain-python recomputations.
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

from icons_fast import report_plots as plots
from icons_fast.report import overlap_matrix, overlap_matrix_ref, record_source, task_top_sets, write_report
from icons_fast.select.export import export_selection
from icons_fast.select.voting import consensus_select, specialist_select

N = 53
TASKS = ["alpha", "beta", "gamma"]
BAD = {4: "missing_image", 17: "too_long", 30: "missing_image"}  # pool index -> reason code
TARGET_BAD = {2: "corrupt_image"}  # in target-alpha
BUDGET = 11
DEMO_TASKS = ["color", "count", "arithmetic", "shape"]


def _pool(n: int, rng) -> list:
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
        records.append(rec)
    return records


def _write_errors(path: str, bad: dict, stage: str = "data") -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for i, code in bad.items():
            f.write(json.dumps({"index": i, "id": f"r{i:03d}", "stage": stage, "reason": f"{code}: detail {i}"}) + "\n")


def make_run(root: str, n: int = N, tasks=TASKS, bad=BAD, target_bad=TARGET_BAD, specialist: str | None = None,
             seed: int = 0) -> dict:
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
    pool = _pool(n, rng)
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


def _colours(img: Image.Image) -> set:
    return {c for _, c in img.convert("RGB").getcolors(maxcolors=1 << 20)}


def _rows(page: str) -> list[list[str]]:
    """Every table row of the page as a list of cell texts."""
    return [re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", row) for row in re.findall(r"<tr>(.*?)</tr>", page)]


def _row(page: str, first: str) -> list[str]:
    found = [r for r in _rows(page) if r and r[0] == first]
    assert found, f"no table row starting with {first!r}"
    return found[0]


def _segments(mask_row: np.ndarray) -> int:
    """Number of runs of True in a 1-D mask."""
    m = mask_row.astype(np.int8)
    return int(((m[1:] == 1) & (m[:-1] == 0)).sum() + m[0])


def _mask(img: Image.Image, colour) -> np.ndarray:
    return (np.asarray(img.convert("RGB")) == np.array(colour, dtype=np.uint8)).all(axis=2)


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


def test_nice_ticks_and_formatting():
    for lo, hi in [(0.0, 62.0), (-0.0213, 0.0457), (0.25, 0.37), (3.0, 3.0), (-5e-5, 1e-4), (0, 1)]:
        ticks, step = plots.nice_ticks(lo, hi, 5)
        assert ticks[0] <= lo + 1e-12 and ticks[-1] >= hi - 1e-12
        assert 3 <= len(ticks) <= 12
        mant = step / 10 ** np.floor(np.log10(step))
        assert min(abs(mant - m) for m in (1, 2, 2.5, 5, 10)) < 1e-9
        labels = [plots.format_tick(t, step) for t in ticks]
        assert len(set(labels)) == len(labels), labels  # enough decimals to tell ticks apart
    for hi in (1.0, 2.2, 3.0, 7.0, 26.0, 1234.0):
        ticks, step = plots.nice_ticks(0.0, hi, 5, integer=True)
        assert step >= 1 and float(step).is_integer() and ticks[-1] >= hi and all(float(t).is_integer() for t in ticks)
    assert plots.format_tick(0.25, 0.05) == "0.25"
    assert plots.format_tick(20.0, 10.0) == "20"


# ---------------------------------------------------------------- the files


def test_every_plot_exists_loads_and_is_drawn(run):
    out = run["out"]
    expected = {f"scores_{t}_{name}.png": plots.HIST_SIZE for t, name in enumerate(TASKS)}
    expected.update({"votes.png": plots.BAR_SIZE, "overlap.png": plots.HEATMAP_SIZE, "composition.png": plots.BAR_SIZE,
                     "demo_quality.png": (480, 360), "excluded.png": plots.BAR_SIZE})
    assert set(f for f in os.listdir(out) if f.endswith(".png")) == set(expected)
    for name, size in expected.items():
        with Image.open(os.path.join(out, name)) as img:
            img.load()
            assert img.size == size, name
            assert len(_colours(img)) >= 8, f"{name} looks blank"
    for t in range(len(TASKS)):
        with Image.open(os.path.join(out, f"scores_{t}_{TASKS[t]}.png")) as img:
            line = _mask(img, plots.THRESHOLD_COLOR)
        plot = line[60:]  # below the title and legend: only the threshold line
        cols = np.flatnonzero(plot.any(axis=0))
        assert len(cols) and cols[-1] - cols[0] <= 2, "threshold is not one vertical line"
        assert plot[:, cols[0]].sum() > 0.6 * (plots.HIST_SIZE[1] - 60 - 52)  # spans the plot height
        assert _mask(img, plots.SELECTED_COLOR)[60:].any() and _mask(img, plots.POOL_COLOR)[60:].any()
    # votes.png: one orange bar per vote level that has selected samples
    levels = Counter(run["info"]["selected_per_vote"])
    with Image.open(os.path.join(out, "votes.png")) as img:
        orange = _mask(img, plots.SELECTED_COLOR)[60:]
    assert max(_segments(r) for r in orange) == sum(1 for v in levels.values() if v > 0)
    # overlap.png: the colour scale's both ends appear (diagonal = 1, the bar holds 0)
    with Image.open(os.path.join(out, "overlap.png")) as img:
        cols = _colours(img)
    assert plots.scale_color(1.0) in cols and plots.scale_color(0.0) in cols


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
    assert len({len(x) for x in sets}) > 1  # the ties make the overlap matrix asymmetric
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
        with Image.open(os.path.join(out, name)) as img:
            assert len(_colours(img)) >= 5, name
    with open(index, encoding="utf-8") as f:
        page = f.read()
    assert set(re.findall(r'<img src="([^"]+)"', page)) == pngs
    # One task, its own top budget: the selected bars lie right of the threshold, but for the bin that holds it.
    with Image.open(os.path.join(out, "scores_0_solo.png")) as img:
        line, orange = _mask(img, plots.THRESHOLD_COLOR)[60:], _mask(img, plots.SELECTED_COLOR)[60:]
    x_line = int(np.flatnonzero(line.any(axis=0))[0])
    assert orange[:, x_line + 2:].any()
    assert max(_segments(r) for r in orange[:, :x_line]) <= 1
    assert "No error records" in page
    assert "specialist-solo" in page and "specialist:solo" in page
    assert _row(page, "selected")[1] == str(BUDGET)
    # the selection's composition comes from selected.json when the pool is gone
    sel_c = Counter(made["pool"][i]["demo_task"] for i in made["indices"])
    for task, k in sel_c.items():
        assert _row(page, task)[3] == str(k)


def test_run_without_scores_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="icons-fast influence"):
        write_report(str(tmp_path))


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="no headless browser: install Debian's chromium (apt-get install -y chromium)")
def test_page_renders_in_headless_chromium(run, tmp_path):
    shot = str(tmp_path / "page.png")
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
           f"--screenshot={shot}", "--window-size=1200,2000", "file://" + os.path.abspath(run["index"])]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert os.path.exists(shot), f"chromium wrote no screenshot (rc {proc.returncode}): {proc.stderr[-2000:]}"
    with Image.open(shot) as img:
        rgb = np.asarray(img.convert("RGB"))
    assert rgb.shape[:2] == (2000, 1200)
    non_white = (rgb < 245).any(axis=2).mean()
    assert non_white > 0.02, "the screenshot is (almost) blank"
    # the plots were loaded: their pool / selected bar colours are on the screen
    for colour in (plots.POOL_COLOR, plots.SELECTED_COLOR):
        close = (np.abs(rgb.astype(int) - np.array(colour)) <= 3).all(axis=2)
        assert close.sum() > 200, f"colour {colour} of the plots is not on the rendered page"
