"""Many processes and kills: torchrun (gloo) and --shard i/n give the same features as one process;
a featurize killed with SIGKILL and rerun gives the same features as an uninterrupted run."""
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from icons_fast.config import Config
from icons_fast.data import make_replica_data
from icons_fast.features.store import FeatureStore

N_TRAIN, SHARD = 48, 6  # 8 shards


@pytest.fixture(scope="module")
def warm_run(tmp_path_factory, tiny_model_dir):
    """A run directory holding config.json and a finished warmup (no features yet)."""
    from icons_fast.stages.warmup import run_warmup

    root = tmp_path_factory.mktemp("scale")
    data = make_replica_data(str(root / "data"), n_train=N_TRAIN, n_target=2, n_eval=1)
    cfg = Config()
    cfg.override({"model.model": tiny_model_dir, "model.lora_r": 4, "model.lora_alpha": 8, "warmup.fraction": 0.1,
                  "features.proj_dim": 32, "features.batch_size": 4, "features.shard_size": SHARD,
                  "data.max_length": 1024, "out": str(root / "base")})
    cfg.data.train_data, cfg.data.image_folder = data["train"], data["image_folder"]
    cfg.data.targets = {"vqa": data["targets"]["vqa"]}
    cfg.save(cfg.out)
    run_warmup(cfg, cfg.out)
    return cfg


def _copy(warm_run, dest) -> str:
    shutil.copytree(warm_run.out, dest)
    return str(dest)


def _featurize_cmd(run_dir, *extra, split="train"):
    return [sys.executable, "-m", "icons_fast", "featurize", "--config", os.path.join(run_dir, "config.json"),
            "--out", run_dir, "--split", split, *extra]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def _features(run_dir):
    ckpt = sorted(os.listdir(os.path.join(run_dir, "features")))[0]
    return FeatureStore.open(os.path.join(run_dir, "features", ckpt, "train")).load()


def _assert_same(a, b):
    assert np.array_equal(a[0], b[0]) and a[1] == b[1]
    assert torch.equal(a[2], b[2])  # bit-identical
    assert np.array_equal(a[3], b[3])


@pytest.fixture(scope="module")
def reference(warm_run, tmp_path_factory):
    run_dir = _copy(warm_run, tmp_path_factory.mktemp("ref") / "run")
    subprocess.run(_featurize_cmd(run_dir), check=True, env=_env(), capture_output=True)
    feats = _features(run_dir)
    assert len(feats[0]) == N_TRAIN
    return feats


def test_torchrun_two_processes_equal_one(warm_run, reference, tmp_path):
    run_dir = _copy(warm_run, tmp_path / "run")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "icons_fast", "-v", "featurize", "--config", os.path.join(run_dir, "config.json"), "--out", run_dir,
           "--split", "train"]
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "process 1/2" in res.stderr and "[rank 1]" in res.stderr  # -v: every rank logs, prefixed by its rank
    _assert_same(_features(run_dir), reference)
    ckpt = sorted(os.listdir(os.path.join(run_dir, "features")))[0]
    import json

    manifest = json.load(open(os.path.join(run_dir, "features", ckpt, "train", "manifest.json")))
    assert len(manifest["entries"]) == N_TRAIN // SHARD  # merged by rank 0 after the barrier


def test_job_array_shards_equal_one_process_and_partial_is_refused(warm_run, reference, tmp_path):
    from icons_fast.stages.influence import run_influence

    run_dir = _copy(warm_run, tmp_path / "run")
    subprocess.run(_featurize_cmd(run_dir, "--shard", "1/3"), check=True, env=_env(), capture_output=True)
    cfg = Config.load(os.path.join(run_dir, "config.json"))
    cfg.out = run_dir
    subprocess.run(_featurize_cmd(run_dir, split="target-vqa"), check=True, env=_env(), capture_output=True)
    with pytest.raises(RuntimeError, match="incomplete"):
        run_influence(cfg, run_dir)  # shards 0/3 and 2/3 are missing: never score a partial pool
    for i in (0, 2):
        subprocess.run(_featurize_cmd(run_dir, "--shard", f"{i}/3"), check=True, env=_env(), capture_output=True)
    _assert_same(_features(run_dir), reference)
    assert run_influence(cfg, run_dir)["scores"]


def test_sigkill_half_way_then_rerun_gives_identical_features(warm_run, reference, tmp_path):
    run_dir = _copy(warm_run, tmp_path / "run")
    proc = subprocess.Popen(_featurize_cmd(run_dir), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    entries = None
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        found = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(run_dir, "features"))
                 for f in fs if f.endswith(".json") and os.path.basename(d) == "entries"]
        if found:
            entries = found
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "featurize finished before it could be killed"
    assert 0 < len(entries) < N_TRAIN // SHARD
    subprocess.run(_featurize_cmd(run_dir), check=True, env=_env(), capture_output=True)
    _assert_same(_features(run_dir), reference)
