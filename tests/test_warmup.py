"""Warmup: checkpoint round trip (moments by parameter name), schedule, the stage end to end."""
import json
import os

import numpy as np
import pytest
import torch

from icons_fast.config import Config, ModelConfig
from icons_fast.model.loading import load_model
from icons_fast.model.lora import attach_lora
from icons_fast.train.checkpoint import (
    list_checkpoints,
    load_checkpoint_state,
    load_lora_checkpoint,
    load_moments,
    save_lora_checkpoint,
)
from icons_fast.train.loop import checkpoint_steps, cosine_with_warmup
from icons_fast.stages.warmup import run_warmup, warmup_subset


def test_checkpoint_moments_match_optimizer_by_name(tiny_model_dir, tmp_path):
    torch.manual_seed(0)
    model = attach_lora(load_model(tiny_model_dir).model, ModelConfig(lora_r=4, lora_alpha=8))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    # shuffle the optimizer's parameter order: moments must be matched by name, not position
    opt = torch.optim.AdamW([p for _, p in reversed(named)], lr=1e-2)
    ids = torch.randint(5, 500, (2, 12))
    for _ in range(3):
        model(input_ids=ids).logits.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    ckpt = save_lora_checkpoint(str(tmp_path), model, opt, step=3, lr=1e-2, epoch=1.0, samples_seen=6)
    moments = load_moments(ckpt)
    assert set(moments["exp_avg"]) == {n for n, _ in named}
    for name, p in named:
        torch.testing.assert_close(moments["exp_avg"][name], opt.state[p]["exp_avg"], rtol=0, atol=0)
        torch.testing.assert_close(moments["exp_avg_sq"][name], opt.state[p]["exp_avg_sq"], rtol=0, atol=0)
    state = load_checkpoint_state(ckpt)
    assert state["step"] == 3 and state["lr"] == 1e-2 and state["param_names"] == [n for n, _ in named]
    # adapter weights come back under the same names
    reloaded = load_lora_checkpoint(load_model(tiny_model_dir).model, ckpt)
    again = dict(reloaded.named_parameters())
    for name, p in named:
        torch.testing.assert_close(again[name], p.detach(), rtol=0, atol=0)
        assert again[name].requires_grad


def test_cosine_schedule_with_warmup():
    f = cosine_with_warmup(100, 0.03)  # 3 warmup steps
    assert f(0) < f(1) < f(2) <= 1.0
    assert f(3) == pytest.approx(1.0)
    assert f(99) < 0.01
    vals = [f(s) for s in range(3, 100)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))


def test_checkpoint_steps_spread_and_end_at_last():
    assert checkpoint_steps(10, 1) == [10]
    assert checkpoint_steps(10, 4) == [2, 5, 8, 10]  # round(2.5) is 2 under banker's rounding
    assert checkpoint_steps(3, 10) == [1, 2, 3]


def test_warmup_subset_is_seeded_and_sized():
    a, b = warmup_subset(1000, 0.05, seed=1), warmup_subset(1000, 0.05, seed=1)
    assert np.array_equal(a, b) and len(a) == 50 and len(set(a.tolist())) == 50
    assert not np.array_equal(a, warmup_subset(1000, 0.05, seed=2))
    assert len(warmup_subset(7, 0.05, seed=0)) == 1
    with pytest.raises(ValueError):
        warmup_subset(10, 0.0, seed=0)


def test_warmup_stage_end_to_end_and_reuse(tmp_path, tiny_model_dir):
    from icons_fast.data.replica import make_replica_data

    data = make_replica_data(str(tmp_path / "data"), n_train=40, n_target=2, n_eval=2)
    cfg = Config()
    cfg.override({"model.model": tiny_model_dir, "model.lora_r": 4, "model.lora_alpha": 8, "warmup.fraction": 0.25,
                  "warmup.batch_size": 4, "warmup.num_checkpoints": 2, "data.max_length": 512})
    cfg.data.train_data, cfg.data.image_folder = data["train"], data["image_folder"]
    run = str(tmp_path / "run")
    ckpts = run_warmup(cfg, run)
    assert [os.path.basename(c) for c in ckpts] == ["checkpoint-2", "checkpoint-3"]
    assert list_checkpoints(os.path.join(run, "warmup")) == ckpts
    subset = np.loadtxt(os.path.join(run, "warmup", "subset.txt"), dtype=int)
    assert len(subset) == 10
    for c in ckpts:
        state = load_checkpoint_state(c)
        assert state["lr"] > 0 and state["base_model"] == tiny_model_dir
        m = load_moments(c)
        assert all(torch.count_nonzero(t) > 0 for t in m["exp_avg_sq"].values())
    mtime = os.path.getmtime(os.path.join(ckpts[-1], "state.json"))
    assert run_warmup(cfg, run) == ckpts  # reused, not retrained
    assert os.path.getmtime(os.path.join(ckpts[-1], "state.json")) == mtime
    with open(os.path.join(run, "warmup", "warmup_done.json")) as f:
        assert json.load(f)["summary"]["samples_seen"] == 10  # one epoch over the 10-sample subset
    # Features made from these checkpoints: a warmup retrained under other settings moves them aside.
    stale = os.path.join(run, "features", "checkpoint-3", "train", "shard.bin")
    os.makedirs(os.path.dirname(stale))
    open(stale, "w").close()
    cfg.override({"warmup.lr": cfg.warmup.lr * 2})
    run_warmup(cfg, run)
    assert not os.path.exists(os.path.join(run, "features"))
    moved = [p for p in os.listdir(run) if p.startswith("features.stale-")]
    assert len(moved) == 1 and os.path.exists(os.path.join(run, moved[0], "checkpoint-3", "train", "shard.bin"))
