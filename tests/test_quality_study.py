"""benchmarks/quality.py: a rerun never mixes a seed directory made under other settings."""
import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import quality  # noqa: E402


def _write(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


def test_a_seed_dir_of_another_study_is_moved_aside_and_kept(tmp_path):
    seed_dir = str(tmp_path / "seed0")
    old_key, new_key = {"base": "old"}, {"base": "new"}
    _write(os.path.join(seed_dir, "result.json"), {"key": old_key, "accuracy": {}})
    _write(os.path.join(seed_dir, "select", "features", "x.bin"), [1])
    quality.claim_seed_dir(seed_dir, new_key)
    moved = [p for p in os.listdir(tmp_path) if p.startswith("seed0.old-")]
    assert len(moved) == 1
    assert os.path.exists(tmp_path / moved[0] / "select" / "features" / "x.bin")
    assert os.listdir(seed_dir) == ["key.json"]
    with open(os.path.join(seed_dir, "key.json")) as f:
        assert json.load(f) == new_key


def test_the_same_study_resumes_in_place_and_unknown_dirs_are_not_trusted(tmp_path):
    seed_dir = str(tmp_path / "seed1")
    key = {"base": "b", "pool_sha256": "p"}
    quality.claim_seed_dir(seed_dir, key)
    _write(os.path.join(seed_dir, "select", "partial.bin"), [1])  # killed before its first result
    quality.claim_seed_dir(seed_dir, key)
    assert os.path.exists(os.path.join(seed_dir, "select", "partial.bin"))
    assert not [p for p in os.listdir(tmp_path) if ".old-" in p]
    # A directory that says nothing about how it was made is moved aside too; a second one gets its own name.
    for _ in range(2):
        _write(os.path.join(seed_dir, "select", "partial.bin"), [1])
        os.remove(os.path.join(seed_dir, "key.json"))
        quality.claim_seed_dir(seed_dir, key)
        assert os.listdir(seed_dir) == ["key.json"]
    moved = sorted(p for p in os.listdir(tmp_path) if p.startswith("seed1.old-"))
    assert len(moved) == 2 and moved[1] == moved[0] + "-2"


def test_relative_performance_over_every_benchmark_and_over_the_targets_alone():
    full = {"vqa": 1.0, "pope": 0.8, "mmbench": 0.5, "count": 1.0, "position": 1.0}
    score = {"vqa": 0.5, "pope": 0.8, "mmbench": 0.5, "count": 1.0, "position": 0.0}
    assert quality.relative(score, full) == 70.0
    assert quality.relative(score, full, quality.TARGET_BENCHMARKS) == 87.5
    assert quality.relative(score, dict(full, position=0.0)) == 87.5  # a zero reference is skipped
    table = quality.accuracy_table({0: {"accuracy": {"full": full, "x": score}}}, list(full), ["full", "x"])
    assert table.splitlines()[-1].endswith("| 70.0 ± 0.0 | 87.5 ± 0.0 |")


def test_remedies_pick_the_same_count_and_apply_their_steps():
    from icons_fast.select import remedies
    from icons_fast.select.rules import select_by_rule

    rng = np.random.default_rng(0)
    base = rng.normal(size=(30, 8))
    features = np.concatenate([base, base[:10] + 1e-4 * rng.normal(size=(10, 8))])  # rows 30-39 copy rows 0-9
    valid = np.ones(40, dtype=bool)
    valid[5] = False
    sel = {"scores": rng.normal(size=(40, 3)), "names": ["a", "b", "c"], "valid": valid, "features": features}
    keep = valid & remedies.collapse_near_duplicates(features, 0.99, valid)
    assert not keep[30:40][np.arange(10) != 5].any()  # each copy collapses onto its original (row 35: its own)
    count = int(0.2 * valid.sum())
    picks = {rule: quality.engine_select(rule, sel, 0.2, 0, 0.99) for _, rule, _ in quality.REMEDIES}
    expected = {"icons+quota": remedies.quota_vote(sel["scores"], count, valid),
                "icons+dedup": np.sort(select_by_rule("icons", sel["scores"], sel["names"], count, keep, 0)),
                "icons+dedup+quota": remedies.quota_vote(sel["scores"], count, keep)}
    assert set(picks) == set(expected)
    for rule, idx in picks.items():
        assert len(idx) == count and valid[idx].all(), rule
        np.testing.assert_array_equal(idx, expected[rule], err_msg=rule)
    assert not np.array_equal(expected["icons+quota"], expected["icons+dedup+quota"])  # the steps matter here
    with pytest.raises(SystemExit, match="raise --dedup-threshold"):
        quality.engine_select("icons+dedup+quota", sel, 0.9, 0, 0.99)


def test_run_seed_keeps_finished_conditions_and_reruns_under_another_key(tmp_path, monkeypatch):
    from icons_fast.data import make_replica_data

    data = make_replica_data(str(tmp_path / "data"), n_train=20, seed=0, n_target=2, n_eval=2)
    trained, selections = [], []
    monkeypatch.setattr(quality, "engine_run", lambda cfg: selections.append(cfg.out) or {})
    monkeypatch.setattr(quality, "engine_select", lambda rule, sel, budget, seed, thr: np.arange(4))
    monkeypatch.setattr(quality, "train_and_eval",
                        lambda base, data, subset, out, seed, args: trained.append(os.path.basename(out)) or
                        {"vqa": len(subset) / 20})
    args = type("Args", (), {"warmup_fraction": 0.1, "warmup_epochs": 1, "warmup_checkpoints": 1, "proj_dim": 8,
                             "lora_r": 4, "dedup_threshold": 0.99})()
    out, key = str(tmp_path / "study"), {"base": "b1"}
    full, rand, icons = ("full", "full", 1.0), ("random", "random", 0.2), ("icons", "icons", 0.2)
    first = quality.run_seed(0, out, data, "base", args, [full, rand], key)
    assert trained == ["full", "random"] and first["accuracy"]["full"] == {"vqa": 1.0}
    second = quality.run_seed(0, out, data, "base", args, [full, rand, icons], key)
    assert trained == ["full", "random", "icons"] and set(second["accuracy"]) == {"full", "random", "icons"}
    assert quality.run_seed(0, out, data, "base", args, [rand], key)["accuracy"] == second["accuracy"]
    assert trained == ["full", "random", "icons"]  # nothing left to do
    quality.run_seed(0, out, data, "base", args, [rand], {"base": "b2"})
    assert trained[-1] == "random" and len(trained) == 4
    assert [p for p in os.listdir(out) if p.startswith("seed0.old-")]
