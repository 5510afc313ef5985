"""Run-directory helpers (RunLayout), pure neighbour retrieval, and the select/ -> stages/ layering."""
import json
import os

import numpy as np
import pytest
import torch

from icons_fast.rundir import RunLayout, target_splits



def _warmup(root: str, lrs: dict[str, float], done: list[str]) -> RunLayout:
    layout = RunLayout(root)
    for name, lr in lrs.items():
        os.makedirs(os.path.join(layout.warmup, name))
        with open(os.path.join(layout.warmup, name, "state.json"), "w") as f:
            json.dump({"lr": lr, "step": int(name.split("-")[1])}, f)
    with open(layout.warmup_done, "w") as f:
        json.dump({"fingerprint": "x", "checkpoints": done}, f)
    return layout


def test_warmup_checkpoints_are_the_finished_ones_with_their_lrs(tmp_path):
    layout = _warmup(str(tmp_path), {"checkpoint-5": 1e-4, "checkpoint-10": 3e-4, "checkpoint-20": 9e-4},
                     done=["checkpoint-10", "checkpoint-20"])  # checkpoint-5: a leftover of an earlier warmup
    assert layout.warmup_checkpoints() == [os.path.join(layout.warmup, n) for n in ("checkpoint-10", "checkpoint-20")]
    assert layout.checkpoint_lrs() == [("checkpoint-10", 3e-4), ("checkpoint-20", 9e-4)]


def test_warmup_checkpoints_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="run `icons-fast warmup`"):
        RunLayout(str(tmp_path)).warmup_checkpoints()
    layout = _warmup(str(tmp_path / "gone"), {"checkpoint-3": 1e-4}, done=["checkpoint-3", "checkpoint-6"])
    with pytest.raises(FileNotFoundError, match="checkpoint-6.*rerun `icons-fast warmup`"):
        layout.warmup_checkpoints()
    with pytest.raises(FileNotFoundError, match="run `icons-fast featurize`"):
        layout.feature_store("checkpoint-3", "train")


def test_feature_store_opens_what_featurize_wrote(tmp_path):
    from icons_fast.features.store import FeatureStore

    layout = RunLayout(str(tmp_path))
    store = FeatureStore(layout.features("checkpoint-1", "target-vqa"), {"n_samples": 3}, 4, dtype="float32")
    feats = torch.nn.functional.normalize(torch.randn(3, 4), dim=1)
    store.write_shard(0, 3, np.arange(3), ["a", "b", "c"], feats, np.ones(3, np.float32))
    idx, ids, got, _ = layout.feature_store("checkpoint-1", "target-vqa").load()
    assert idx.tolist() == [0, 1, 2] and ids == ["a", "b", "c"] and torch.equal(got, feats)


def test_target_splits_keep_config_order_and_group_subtasks():
    got = target_splits(["vqa", "mme/count", "gqa", "mme/color"])
    assert got == {"vqa": {None: "target-vqa"}, "mme": {"count": "target-mme--count", "color": "target-mme--color"},
                   "gqa": {None: "target-gqa"}}
    assert list(got) == ["vqa", "mme", "gqa"]


def test_neighbors_name_rows_by_sample_index_and_id():
    """Pure retrieval against a brute-force cosine; indices are not row positions (samples excluded)."""
    pytest.importorskip("faiss")
    from icons_fast.select.faiss_index import build_target_index
    from icons_fast.select.neighbors import targets_for_train, train_for_targets

    g = torch.Generator().manual_seed(3)
    train, targets = torch.randn(23, 8, generator=g), torch.randn(5, 8, generator=g)
    t_idx, t_ids = np.array([2, 4, 5, 9, 11]), [f"t{i}" for i in (2, 4, 5, 9, 11)]
    tr_idx = np.array([i for i in range(25) if i not in (6, 13)])  # two excluded pool samples
    tr_ids = [f"s{i}" for i in tr_idx]
    index = build_target_index(targets, use_gpu=False)
    blocks = [(tr_idx[s:s + 7], tr_ids[s:s + 7], train[s:s + 7]) for s in range(0, 23, 7)]
    sims = torch.nn.functional.normalize(targets, dim=1) @ torch.nn.functional.normalize(train, dim=1).T  # [5, 23]

    per_target = train_for_targets(index, t_idx, t_ids, blocks, m=3)
    assert [p["index"] for p in per_target] == t_idx.tolist() and [p["id"] for p in per_target] == t_ids
    for j, p in enumerate(per_target):
        best = torch.topk(sims[j], 3)
        assert [nb["index"] for nb in p["neighbors"]] == tr_idx[best.indices.numpy()].tolist()
        assert [nb["id"] for nb in p["neighbors"]] == [f"s{i}" for i in tr_idx[best.indices.numpy()]]
        np.testing.assert_allclose([nb["score"] for nb in p["neighbors"]], best.values.numpy(), atol=1e-5)

    rows = [14, 0]  # positions of samples 16 and 0
    per_train = targets_for_train(index, t_idx, t_ids, tr_idx[rows].tolist(), [tr_ids[r] for r in rows],
                                  train[rows], m=2)
    assert [p["index"] for p in per_train] == [16, 0] and [p["id"] for p in per_train] == ["s16", "s0"]
    for p, r in zip(per_train, rows):
        best = torch.topk(sims[:, r], 2)
        assert [nb["index"] for nb in p["neighbors"]] == t_idx[best.indices.numpy()].tolist()
        np.testing.assert_allclose([nb["score"] for nb in p["neighbors"]], best.values.numpy(), atol=1e-5)


def test_error_logs_are_the_split_logs_only(tmp_path):
    """The out-of-memory retry log sits apart from the bad-sample logs, which the report reads as ErrorLogs."""
    from icons_fast.data import ErrorLog, SampleError

    layout = RunLayout(str(tmp_path))
    log = ErrorLog(layout.errors("train"))
    log.add(SampleError(3, "s3", "data", "missing_image: no such file"))
    os.makedirs(os.path.dirname(layout.oom_retries("train")))
    with open(layout.oom_retries("train"), "w") as f:
        f.write(json.dumps({"checkpoint": "checkpoint-1", "batch_size": 8, "indices": [0, 7]}) + "\n")
    assert layout.error_logs() == {"train": layout.errors("train")}
    assert [e.index for e in ErrorLog.read(layout.error_logs()["train"])] == [3]
