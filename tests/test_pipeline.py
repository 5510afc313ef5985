"""The whole loop on tiny data: run (warmup -> featurize -> influence -> select), resume, bad samples, train + evaluate."""
import json
import logging
import os

import numpy as np
import pytest

from icons_fast.cli import COMMANDS, main, make_parser
from icons_fast.config import Config
from icons_fast.data import ErrorLog, load_records, make_bad_samples, make_replica_data


def _cfg(tiny_model_dir, data, out, targets=None):
    cfg = Config()
    cfg.override({
        "model.model": tiny_model_dir, "model.lora_r": 4, "model.lora_alpha": 8,
        "warmup.fraction": 0.25, "warmup.batch_size": 4, "features.proj_dim": 64, "features.batch_size": 8,
        "features.shard_size": 16, "data.max_length": 1024, "out": out,
    })
    cfg.data.train_data, cfg.data.image_folder = data["train"], data["image_folder"]
    cfg.data.targets = dict(targets or data["targets"])
    return cfg


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_replica_data(str(tmp_path_factory.mktemp("demo")), n_train=40, n_target=3, n_eval=4)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir, demo):
    from icons_fast.stages.pipeline import run

    out = str(tmp_path_factory.mktemp("run"))
    cfg = _cfg(tiny_model_dir, demo, out, targets={k: demo["targets"][k] for k in ("vqa", "count", "mmbench")})
    run(cfg)
    return cfg


def test_run_end_to_end_writes_a_selection(finished_run, demo):
    out = finished_run.out
    saved = json.load(open(os.path.join(out, "config.json")))
    assert saved["fingerprint"] == finished_run.fingerprint()
    indices = np.loadtxt(os.path.join(out, "selection", "indices.txt"), dtype=int)
    assert len(indices) == int(0.2 * 40) and np.all(np.diff(indices) > 0)
    pool = json.load(open(demo["train"]))
    selected = json.load(open(os.path.join(out, "selection", "selected.json")))
    assert selected == [pool[i] for i in indices]
    scores = np.load(os.path.join(out, "scores", "scores.npy"))
    names = json.load(open(os.path.join(out, "scores", "task_names.json")))["task_names"]
    assert scores.shape == (40, 3) and names == ["vqa", "count", "mmbench"]
    assert np.isfinite(scores).all() and np.abs(scores).max() <= 1.0 + 1e-3  # mean cosine
    votes = np.load(os.path.join(out, "selection", "votes.npy"))
    assert votes.shape == (40,) and votes[indices].min() >= np.delete(votes, indices).max()


def test_rerun_skips_finished_stages(finished_run, capsys, caplog):
    from icons_fast.stages.pipeline import run

    caplog.set_level(logging.INFO, logger="icons_fast")
    shard = os.path.join(finished_run.out, "features")
    before = {os.path.join(d, f): os.path.getmtime(os.path.join(d, f))
              for d, _, fs in os.walk(shard) for f in fs if f.endswith(".safetensors")}
    run(finished_run)
    out = capsys.readouterr().out + caplog.text  # stage messages are log records; results are printed
    assert "reusing 1 checkpoint" in out and "0 of 3 shard(s) to do" in out
    assert "scores in" in out and "up to date" in out
    after = {p: os.path.getmtime(p) for p in before}
    assert before == after


def test_changed_projection_is_refused(finished_run):
    from icons_fast.features.store import FingerprintMismatch
    from icons_fast.stages.pipeline import featurize_all

    cfg = Config.from_dict(finished_run.to_dict())
    cfg.features.seed = 7
    with pytest.raises(FingerprintMismatch, match="seed"):
        featurize_all(cfg, cfg.out, splits=["train"])


def test_bad_samples_are_recorded_excluded_and_never_shift(tmp_path, tiny_model_dir, demo):
    from icons_fast.stages.pipeline import run

    bad = make_bad_samples(str(tmp_path / "bad"))
    data = {"train": bad["json"], "image_folder": bad["image_folder"], "targets": demo["targets"]}
    cfg = _cfg(tiny_model_dir, data, str(tmp_path / "run"), targets={"vqa": demo["targets"]["vqa"]})
    cfg.data.target_image_folder = demo["image_folder"]
    cfg.select.budget = 3
    run(cfg)
    errors = ErrorLog.read(os.path.join(cfg.out, "errors", "train.jsonl"))
    got = {e.index: e.code for e in errors}
    assert got == {int(i): c for i, c in bad["expected"].items()}
    assert len(errors) == len(got)  # each one recorded once
    valid = np.load(os.path.join(cfg.out, "scores", "valid.npy"))
    assert set(np.flatnonzero(valid)) == set(bad["good"])
    indices = np.loadtxt(os.path.join(cfg.out, "selection", "indices.txt"), dtype=int)
    assert len(indices) == 3 and set(indices) <= set(bad["good"])
    pool = load_records(bad["json"])
    selected = json.load(open(os.path.join(cfg.out, "selection", "selected.json")))
    assert selected == [pool[i] for i in indices]
    summary = json.load(open(os.path.join(cfg.out, "selection", "summary.json")))
    assert summary["excluded_bad_samples"] == len(bad["expected"])


def test_train_and_evaluate_on_the_selection(finished_run, demo, tmp_path):
    out = str(tmp_path / "ft")
    subset = os.path.join(finished_run.out, "selection", "selected.json")
    rc = main(["train", "--data", subset, "--image-folder", demo["image_folder"], "--model", finished_run.model.model,
               "--lora-r", "4", "--lora-alpha", "8", "--max-length", "1024", "--out", out])
    assert rc == 0 and os.path.exists(os.path.join(out, "model", "config.json"))
    res_path = str(tmp_path / "eval.json")
    rc = main(["evaluate", "--model-dir", os.path.join(out, "model"), "--image-folder", demo["image_folder"],
               "--target", f"vqa={demo['eval']['vqa']}", "--target", f"mmbench={demo['eval']['mmbench']}",
               "--max-length", "1024", "--json", res_path])
    assert rc == 0
    res = json.load(open(res_path))["tasks"]
    assert set(res) == {"vqa", "mmbench"}
    for r in res.values():
        assert r["n"] == 4 and 0.0 <= r["accuracy"] <= 1.0 and np.isfinite(r["answer_loss"]) and r["answer_loss"] > 0


def test_evaluate_scores_exact_answers(tiny_model_dir, demo):
    from icons_fast.train.evaluate import normalize_answer

    assert normalize_answer("  Red.\n") == "red"
    assert normalize_answer("Top  left") == "top left"
    assert normalize_answer("3") != normalize_answer("4")


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        make_parser().parse_args([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert ("run_dir" in out and "--out" in out) if command == "report" else "--config" in out


def test_neighbors_retrieval_both_ways(finished_run, tmp_path):
    """icons-fast neighbors: per target its most influential pool samples, per pool sample its targets,
    checked against a brute-force cosine over the stored features."""
    import torch

    from icons_fast.features.store import FeatureStore

    out = str(tmp_path / "nb.json")
    rc = main(["neighbors", "--config", os.path.join(finished_run.out, "config.json"), "--out", finished_run.out,
               "--task", "vqa", "--m", "3", "--train-index", "5", "--train-index", "17", "--json", out])
    assert rc == 0
    res = json.load(open(out))
    ckpt = res["checkpoint"]
    feats = os.path.join(finished_run.out, "features", ckpt)
    tr_idx, tr_ids, tr, _ = FeatureStore.open(os.path.join(feats, "train")).load()
    tg_idx, tg_ids, tg, _ = FeatureStore.open(os.path.join(feats, "target-vqa")).load()
    tr = torch.nn.functional.normalize(tr.float(), dim=1)
    tg = torch.nn.functional.normalize(tg.float(), dim=1)
    sims = tg @ tr.T  # [M, N]
    per_target = res["tasks"]["vqa"]["per_target"]
    assert [p["index"] for p in per_target] == tg_idx.tolist()
    for j, p in enumerate(per_target):
        got = [nb["score"] for nb in p["neighbors"]]
        want = torch.topk(sims[j], 3).values.tolist()
        assert np.allclose(got, want, atol=1e-5)
        for nb in p["neighbors"]:
            assert tr_ids[list(tr_idx).index(nb["index"])] == nb["id"]
    per_train = res["tasks"]["vqa"]["per_train"]
    assert [p["index"] for p in per_train] == [5, 17]
    for p in per_train:
        want = torch.topk(sims[:, list(tr_idx).index(p["index"])], 3).values.tolist()
        assert np.allclose([nb["score"] for nb in p["neighbors"]], want, atol=1e-5)
    assert os.path.exists(os.path.join(feats, "target-vqa", "faiss.index"))


def _copy_run(finished_run, dest):
    import shutil

    shutil.copytree(finished_run.out, dest)
    cfg = Config.from_dict(finished_run.to_dict())
    cfg.out = str(dest)
    return cfg


def test_retrained_checkpoint_invalidates_features(finished_run, tmp_path):
    from icons_fast.features.store import FingerprintMismatch
    from icons_fast.rundir import RunLayout
    from icons_fast.stages.pipeline import featurize_all

    cfg = _copy_run(finished_run, tmp_path / "run")
    adapter = os.path.join(RunLayout(cfg.out).warmup_checkpoints()[0], "adapter", "adapter_model.safetensors")
    with open(adapter, "r+b") as f:  # same checkpoint name and step, other weights
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    with pytest.raises(FingerprintMismatch, match="checkpoint_sha256"):
        featurize_all(cfg, cfg.out, splits=["train"])


def test_new_target_keeps_warmup_and_stale_scores_are_refused(finished_run, tmp_path, demo, caplog):
    from icons_fast.stages.influence import run_influence
    from icons_fast.stages.select import run_select
    from icons_fast.stages.warmup import run_warmup

    cfg = _copy_run(finished_run, tmp_path / "run")
    cfg.data.targets = dict(cfg.data.targets, pope=demo["targets"]["pope"])
    with caplog.at_level(logging.INFO, logger="icons_fast"):
        run_warmup(cfg, cfg.out)
    assert "reusing 1 checkpoint" in caplog.text  # adding a task does not retrain
    with pytest.raises(FileNotFoundError, match="run `icons-fast featurize`"):
        run_select(cfg, cfg.out)  # scores on disk were made for 3 tasks; the 4th has no features yet
    agg = Config.from_dict(cfg.to_dict())
    agg.data.targets = dict(finished_run.data.targets)
    agg.select.aggregate = "max"
    with pytest.raises(RuntimeError, match="run `icons-fast influence`"):
        run_select(agg, agg.out)
    run_influence(agg, agg.out)
    assert run_select(agg, agg.out)["selected"]


def test_partial_target_features_are_refused(finished_run, tmp_path):
    from icons_fast.rundir import RunLayout
    from icons_fast.stages.influence import run_influence

    cfg = _copy_run(finished_run, tmp_path / "run")
    ckpt = os.path.basename(RunLayout(cfg.out).warmup_checkpoints()[0])
    entries = os.path.join(cfg.out, "features", ckpt, "target-count", "entries")
    os.remove(os.path.join(entries, sorted(os.listdir(entries))[0]))  # as if a job-array task died
    os.remove(os.path.join(cfg.out, "scores", "task_names.json"))
    with pytest.raises(RuntimeError, match="target-count .* incomplete"):
        run_influence(cfg, cfg.out)


def test_rerun_warmup_with_other_settings_removes_old_checkpoints(tmp_path, tiny_model_dir, demo):
    from icons_fast.rundir import RunLayout
    from icons_fast.stages.warmup import run_warmup

    cfg = _cfg(tiny_model_dir, demo, str(tmp_path / "run"))
    cfg.warmup.num_checkpoints = 2
    first = run_warmup(cfg, cfg.out)
    cfg.warmup.num_checkpoints = 1
    cfg.warmup.fraction = 0.2
    second = run_warmup(cfg, cfg.out)
    assert len(first) == 2 and len(second) == 1
    assert RunLayout(cfg.out).warmup_checkpoints() == second
    left = sorted(d for d in os.listdir(os.path.join(cfg.out, "warmup")) if d.startswith("checkpoint-"))
    assert left == [os.path.basename(second[0])]


def test_resume_with_another_backend_mixes_equal_features_and_logs_what_ran(finished_run, tmp_path, monkeypatch,
                                                                             caplog):
    """The run was featurized with "auto" (the default); a shard recomputed with every op forced to torch passes
    the store's checks (the backend is not part of any fingerprint) and equals the "auto" one within the
    cross-backend tolerance; the featurize log names the request and what ran."""
    import shutil

    import torch

    from icons_fast.features.store import FeatureStore
    from icons_fast.ops import backend
    from icons_fast.stages.pipeline import featurize_all

    run_dir = str(tmp_path / "run")
    shutil.copytree(finished_run.out, run_dir)
    cfg = Config.from_dict(finished_run.to_dict())
    cfg.out = run_dir
    assert cfg.features.backend == "auto"
    ckpt = sorted(os.listdir(os.path.join(run_dir, "features")))[0]
    store = FeatureStore.open(os.path.join(run_dir, "features", ckpt, "train"))
    before = store.load()
    os.unlink(store.shard_path(16, 32))  # the middle shard: recomputed on the rerun
    for op in backend.OPS:
        monkeypatch.delenv(backend.env_var(op), raising=False)
    monkeypatch.setenv("ICONS_FAST_BACKEND", "torch")  # lora_grad and project: the references
    caplog.set_level(logging.INFO, logger="icons_fast")
    featurize_all(cfg, run_dir, splits=["train"])
    assert "k=64, backend=torch): 1 of 3 shard(s) to do" in caplog.text
    assert "; backend torch" in caplog.text  # every op call ran the forced backend
    after = FeatureStore.open(os.path.join(run_dir, "features", ckpt, "train")).load()
    assert np.array_equal(before[0], after[0]) and before[1] == after[1]
    rows = np.isin(after[0], np.arange(16, 32))
    assert torch.equal(after[2][~rows], before[2][~rows])  # the other shards are untouched
    torch.testing.assert_close(after[2][rows].float(), before[2][rows].float(), rtol=0, atol=2e-3)  # fp16 rows
    np.testing.assert_allclose(after[3], before[3], rtol=1e-4)  # raw norms, fp32

    # the same shard under "auto": the log names what each op ran
    os.unlink(store.shard_path(16, 32))
    monkeypatch.delenv("ICONS_FAST_BACKEND")
    caplog.clear()
    featurize_all(cfg, run_dir, splits=["train"])
    project = "cpp" if backend.has_cpu_ext() else "torch"  # the CPU's lora_grad has one backend, torch
    assert "backend=auto): 1 of 3 shard(s) to do" in caplog.text
    assert f"; backend auto (ran: lora_grad torch, project {project})" in caplog.text
