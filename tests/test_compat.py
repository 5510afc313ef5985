"""Compatibility layers: LESS files and scores, ICONS release files, the TRAK projector, and docs/api.md examples."""
import json
import logging
import math
import os
import re

import numpy as np
import pytest
import torch

from icons_fast.compat import icons_release as rel
from icons_fast.compat import less
from icons_fast.compat.trak import HAS_TRAK, TRAKProjector
from icons_fast.features.projection import RademacherProjector, effective_seed, project_ref

DOCS = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "api.md")
NO_TRAK = "traker (TRAK) is not installed; `pip install traker` to run the TRAK round trip"


def _unit_np(x):
    n = np.linalg.norm(x, axis=1)
    return x / n[:, None], n


# --------------------------------------------------------------------------- LESS gradient files


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_less_grads_round_trip_unit_rows_and_norms(tmp_path, dtype):
    rng = np.random.default_rng(1)
    f, n = _unit_np(rng.normal(size=(37, 23)) * rng.uniform(0.5, 3, size=(37, 1)))
    feats = torch.tensor(f).to(dtype)
    paths = less.write_less_grads(str(tmp_path / "dolly-ckpt105-adam"), feats, n.astype(np.float32))
    assert paths["orig"] == str(tmp_path / "dolly-ckpt105-adam" / "dim23" / "all_orig.pt")
    back = less.read_less_grads(paths["orig"])
    assert back.dtype == dtype and torch.equal(back, feats)
    assert torch.equal(less.read_less_grads(str(tmp_path / "dolly-ckpt105-adam"), k=23), feats)
    assert torch.equal(less.read_less_grads(str(tmp_path / "dolly-ckpt105-adam" / "dim23")), feats)
    raw = less.read_less_grads(str(tmp_path / "dolly-ckpt105-adam"), normalized=False)
    want = (feats.float() * torch.tensor(n, dtype=torch.float32)[:, None]).to(dtype)
    assert torch.equal(raw, want)


def test_less_grads_from_raw_rows_and_dim_choice(tmp_path):
    g = torch.randn(11, 8, dtype=torch.float64) * 4
    out = str(tmp_path / "mmlu-ckpt5-sgd")
    less.write_less_grads(out, g, dtype=torch.float32)
    less.write_less_grads(out, torch.randn(11, 16), unnormalized=False)
    orig = less.read_less_grads(out, k=8)
    np.testing.assert_allclose(orig.double().numpy(), _unit_np(g.numpy())[0], rtol=1e-6, atol=1e-7)
    assert torch.equal(less.read_less_grads(out, k=8, normalized=False), g.float())
    with pytest.raises(ValueError, match="pass k="):
        less.read_less_grads(out)
    with pytest.raises(FileNotFoundError, match="dim32"):
        less.read_less_grads(out, k=32)
    with pytest.raises(ValueError, match="norm"):
        less.write_less_grads(out, torch.zeros(2, 8))


def _store(root, feats, norms, indices, n_samples):
    from icons_fast.features.store import FeatureStore

    fp = {"n_samples": n_samples, "checkpoint_step": 7, "mode": "adam"}
    store = FeatureStore(root, fp, feats.shape[1], dtype="float16")
    store.write_shard(0, n_samples, np.asarray(indices), [f"s{i}" for i in indices], feats, norms)
    return store


def test_store_to_less_is_exact_and_refuses_gaps(tmp_path):
    rng = np.random.default_rng(2)
    f, n = _unit_np(rng.normal(size=(9, 6)))
    store = _store(str(tmp_path / "full"), torch.tensor(f), n.astype(np.float32), range(9), 9)
    paths = less.store_to_less(store, str(tmp_path / "out"))
    _, _, feats, norms = store.load()
    assert torch.equal(less.read_less_grads(paths["orig"]), feats)
    gappy = _store(str(tmp_path / "gap"), torch.tensor(f[[0, 1, 3]]), n[[0, 1, 3]].astype(np.float32), [0, 1, 3], 4)
    with pytest.raises(ValueError, match="first missing index 2"):
        less.store_to_less(gappy, str(tmp_path / "out2"))
    partial = less.store_to_less(gappy, str(tmp_path / "out3"), allow_missing=True)
    assert less.read_less_grads(partial["orig"]).shape == (3, 6)


# --------------------------------------------------------------------------- LESS scores


def test_less_scores_from_files_equal_less_by_hand(tmp_path):
    """matching.py by hand: sum_c w_c train_c @ val_c^T, reshape [N, S, M/S], mean, max."""
    rng = np.random.default_rng(3)
    n, k, s, per = 41, 19, 3, 4
    lrs = [1.6877e-05, 1.2859e-05]
    train_np = [_unit_np(rng.normal(size=(n, k)))[0] for _ in lrs]
    val_np = [_unit_np(rng.normal(size=(s * per, k)))[0] for _ in lrs]
    for c, step in enumerate((105, 211)):
        folder = less.less_grad_dir(str(tmp_path), "dolly", step, "adam")
        less.write_less_grads(folder, torch.tensor(train_np[c]).float())
        less.write_less_grads(less.less_grad_dir(str(tmp_path), "mmlu", step, "sgd"), torch.tensor(val_np[c]).float())
    train = [less.read_less_grads(less.less_grad_dir(str(tmp_path), "dolly", c, "adam")) for c in (105, 211)]
    val = [less.read_less_grads(less.less_grad_dir(str(tmp_path), "mmlu", c, "sgd")) for c in (105, 211)]
    got = less.less_scores(train, val, lrs, n_subtasks=s, block_size=16)

    w = [x / sum(lrs) for x in lrs]
    by_hand = np.zeros(n)
    for i in range(n):
        sub_means = []
        for j in range(s):
            rows = range(j * per, (j + 1) * per)
            sims = [sum(w[c] * float(train_np[c][i] @ val_np[c][v]) for c in range(2)) for v in rows]
            sub_means.append(np.mean(sims))
        by_hand[i] = max(sub_means)
    np.testing.assert_allclose(got.double().numpy(), by_hand, rtol=1e-5, atol=1e-6)  # files are fp32
    np.testing.assert_allclose(less.less_scores_ref(train, val, lrs, s), by_hand, rtol=1e-5, atol=1e-6)

    # the same number through icons-fast's influence op (unit rows: cosine == dot product)
    from icons_fast.select.influence import task_influence

    targets = [{"mmlu": {str(j): v[j * per:(j + 1) * per] for j in range(s)}} for v in val]
    ours, _ = task_influence(train, targets, aggregate="mean", checkpoint_weights=lrs)
    np.testing.assert_allclose(ours[:, 0].double().numpy(), by_hand, rtol=1e-4, atol=1e-5)

    path = less.write_less_scores(str(tmp_path / "sel"), "mmlu", "dolly", got)
    assert path.endswith(os.path.join("sel", "mmlu", "dolly_influence_score.pt"))
    assert torch.equal(less.read_less_scores(path), got)


def test_less_scores_check_subtask_split():
    with pytest.raises(ValueError, match="equal subtasks"):
        less.less_scores(torch.randn(4, 3), torch.randn(5, 3), n_subtasks=2)


def test_sorted_csv_and_selection_as_less_writes_them(tmp_path):
    a = torch.tensor([0.5, 0.25, 0.75, 0.25], dtype=torch.float32)
    b = torch.tensor([0.25, 0.9], dtype=torch.float32)
    path = less.write_sorted_csv(str(tmp_path / "sorted.csv"), {"dolly": a, "oasst1": b})
    lines = open(path).read().splitlines()
    assert lines[0] == "file name, index, score"
    # descending score; ties by file order then index
    assert lines[1:] == ["oasst1, 1, 0.9", "dolly, 2, 0.75", "dolly, 0, 0.5", "dolly, 1, 0.25", "dolly, 3, 0.25",
                         "oasst1, 0, 0.25"]
    assert less.read_sorted_csv(path)[0] == ("oasst1", 1, 0.9)
    assert less.write_sorted_csv(str(tmp_path), {"x": torch.tensor([1 / 3])}).endswith("sorted.csv")
    assert open(tmp_path / "sorted.csv").read().splitlines()[1] == "x, 0, 0.333333"

    files = []
    for name, m in (("dolly", 4), ("oasst1", 2)):
        files.append(str(tmp_path / f"{name}.jsonl"))
        with open(files[-1], "w") as f:
            f.write("".join(json.dumps({"id": f"{name}-{i}"}) + "\n" for i in range(m)))
    out = less.write_less_selection(str(tmp_path / "sel"), "tydiqa", {"dolly": a, "oasst1": b}, files, percentage=0.5)
    assert out["top"].endswith(os.path.join("tydiqa", "top_p0.5.jsonl"))
    assert [json.loads(x)["id"] for x in open(out["top"])] == ["oasst1-1", "dolly-2", "dolly-0"]
    assert less.top_file_name(max_samples=100) == "top_num100.jsonl"


# --------------------------------------------------------------------------- ICONS release formats


def test_vote_files_round_trip(tmp_path):
    pool = [{"id": str(i), "conversations": [{"from": "gpt", "value": "é" * (i % 3)}]} for i in range(13)]
    pool_path = tmp_path / "pool.json"
    pool_path.write_text(json.dumps(pool))
    votes = np.array([0, 3, 1, 3, 2, 0, 2, 3, 1, 0, 2, 1, 3])
    chosen = np.array([1, 3, 4, 6, 7, 10, 12])
    order = rel.release_order(chosen, votes)
    assert order.tolist() == [4, 6, 10, 1, 3, 7, 12]  # ascending votes, then index
    paths = rel.write_icons_release(str(tmp_path / "out"), str(pool_path), chosen, votes)
    assert open(paths["indices"]).read() == "".join(f"{i}\n" for i in order)
    assert rel.read_vote_top_indices(paths["indices"]).tolist() == order.tolist()
    assert rel.read_vote_selected_data(paths["selected"]) == [pool[i] for i in order]
    assert open(paths["selected"], encoding="utf-8").read().startswith("[\n    {")  # indent=4 as released
    (tmp_path / "list.txt").write_text("[5, 2, 9]")
    assert rel.read_vote_top_indices(str(tmp_path / "list.txt")).tolist() == [5, 2, 9]
    (tmp_path / "bad.txt").write_text("1\nx\n")
    with pytest.raises(ValueError, match="line 2"):
        rel.read_vote_top_indices(str(tmp_path / "bad.txt"))
    with pytest.raises(IndexError, match="13"):
        rel.write_vote_selected_data(str(tmp_path / "o.json"), pool, [13])


def test_run_selection_as_release_files(tmp_path):
    pool = [{"id": f"s{i}"} for i in range(6)]
    (tmp_path / "pool.json").write_text(json.dumps(pool))
    (tmp_path / "config.json").write_text(json.dumps({"config": {"data": {"train_data": str(tmp_path / "pool.json")}}}))
    os.makedirs(tmp_path / "selection")
    (tmp_path / "selection" / "indices.txt").write_text("0\n2\n5\n")
    np.save(tmp_path / "selection" / "votes.npy", np.array([2, 0, 1, 0, 0, 2]))
    paths = rel.run_to_icons_release(str(tmp_path))
    assert rel.read_vote_top_indices(paths["indices"]).tolist() == [2, 0, 5]
    assert [r["id"] for r in rel.read_vote_selected_data(paths["selected"])] == ["s2", "s0", "s5"]


def test_release_influence_folders_read_as_the_generalist_does(tmp_path):
    rng = np.random.default_rng(4)
    n = 17
    mats = {"gqa": torch.tensor(rng.normal(size=(n, 5))), "pope": torch.tensor(rng.normal(size=(n, 3))),
            "mme": {"count": torch.tensor(rng.normal(size=(n, 2))), "OCR": torch.tensor(rng.normal(size=(n, 4)))}}
    files = rel.write_icons_influence(str(tmp_path), mats, tag="0101-ckpt-500")
    assert any(f.endswith(os.path.join("mme-0101-ckpt-500", "OCR", "OCR_influence_score.pt")) for f in files)
    assert any(f.endswith(os.path.join("gqa-0101-ckpt-500", "gqa_influence_score.pt")) for f in files)
    scores, names = rel.read_icons_influence(str(tmp_path))
    assert names == ["mme", "gqa", "pope"]
    want = np.column_stack([np.maximum(mats["mme"]["count"].numpy().mean(1), mats["mme"]["OCR"].numpy().mean(1)),
                            mats["gqa"].numpy().mean(1), mats["pope"].numpy().mean(1)])
    np.testing.assert_allclose(scores, want, rtol=1e-12)
    with pytest.raises(ValueError, match="'-'"):
        rel.write_icons_influence(str(tmp_path), {"text-vqa": torch.zeros(2, 2)})


# --------------------------------------------------------------------------- TRAK projector


P_SHAPES = {"fc1.weight": (5, 7), "fc1.bias": (5,), "fc2.weight": (3, 5), "fc2.bias": (3,)}
P_TOTAL = sum(math.prod(s) for s in P_SHAPES.values())


def _dict_grads(b, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(b, *s, generator=g).to(dtype) for n, s in P_SHAPES.items()}


def test_trak_projector_interface():
    proj = TRAKProjector(grad_dim=1001, proj_dim=64, seed=7, proj_type="rademacher", device="cpu",
                         dtype=torch.float16, block_size=128, max_batch_size=16)  # LESS's call
    out = proj.project(torch.randn(3, 1001), model_id=0)
    assert out.shape == (3, 64) and out.dtype == torch.float16 and proj.proj_dim == 64
    proj.free_memory()
    if HAS_TRAK:
        from trak.projectors import AbstractProjector, ProjectionType

        assert isinstance(proj, AbstractProjector) and proj.proj_type == ProjectionType.rademacher
        TRAKProjector(10, 4, proj_type=ProjectionType.rademacher)
    with pytest.raises(TypeError, match="unexpected"):
        TRAKProjector(10, 4, projector_batch=3)
    with pytest.raises(ValueError, match="Rademacher"):
        TRAKProjector(10, 4, proj_type="normal")
    with pytest.raises(ValueError, match="scale"):
        TRAKProjector(10, 4, scale="unit")


def test_trak_scale_is_sqrt_k_times_the_contract():
    g = torch.randn(4, 777)
    contract = TRAKProjector(777, 96, seed=3, scale="contract").project(g, model_id=2)
    trak = TRAKProjector(777, 96, seed=3).project(g, model_id=2)
    assert torch.equal(contract, RademacherProjector(777, 96, seed=3).project(g, model_id=2))
    torch.testing.assert_close(trak, contract * math.sqrt(96), rtol=1e-6, atol=1e-6)
    ref = project_ref(g, 96, seed=effective_seed(3, 2)) * math.sqrt(96)
    torch.testing.assert_close(trak.double(), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("seed", [0, 1, 10**8])
def test_trak_seed_consistency(seed):
    """TRAK's own checks: same call twice, a fresh instance, and other seeds / model ids differ."""
    g = torch.randn(8, 1001)
    proj = TRAKProjector(1001, 128, seed=seed, dtype=torch.float16)
    first = proj.project(g, model_id=0)
    assert torch.equal(first, proj.project(g, model_id=0))
    assert torch.equal(first, TRAKProjector(1001, 128, seed=seed, dtype=torch.float16).project(g, model_id=0))
    assert not torch.allclose(first, proj.project(g, model_id=1))
    other = TRAKProjector(1001, 128, seed=seed + 1, dtype=torch.float16)
    assert not torch.allclose(first, other.project(g, model_id=0))


def test_trak_jl_bounds():
    """Norms of differences and inner products preserved within C * sqrt(log(1/delta) / k)."""
    k, delta = 1024, 0.05
    eps = math.sqrt(math.log(1 / delta) / k)
    g = torch.randn(12, 3001, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    p = TRAKProjector(3001, k, seed=5).project(g.float()).double() / math.sqrt(k)  # back to the contract scale
    i, j = np.triu_indices(12, 1)
    d_true = (g[i] - g[j]).norm(dim=1)
    d_proj = (p[i] - p[j]).norm(dim=1)
    assert ((d_true - d_proj).abs() <= 3 * eps * d_true).float().mean() >= 1 - delta
    ip_true, ip_proj = (g[i] * g[j]).sum(1), (p[i] * p[j]).sum(1)
    scale = g[i].norm(dim=1) * g[j].norm(dim=1)
    assert ((ip_true - ip_proj).abs() <= 3 * eps * scale).float().mean() >= 1 - delta
    # and the bound is not vacuous: a wrong matrix (another seed) fails it badly
    q = TRAKProjector(3001, k, seed=6).project(g.float()).double() / math.sqrt(k)
    assert ((p - q).norm(dim=1) > 0.5 * g.norm(dim=1)).all()


def test_trak_every_feature_counts():
    """A single non-zero coordinate (first, last, any) reaches every output column; equal rows, equal outputs."""
    g = torch.zeros(5, 2049)
    g[0, 0], g[1, -1], g[2, 1234], g[3, 7] = 1.0, -2.0, 0.5, 3.0
    g[4] = g[3]
    out = TRAKProjector(2049, 256, seed=2).project(g)
    assert (out[:4].abs() > 0).all()
    assert torch.equal(out[3], out[4])
    torch.testing.assert_close(out[0].abs(), torch.ones(256))  # +-1 entries at TRAK's scale


def test_trak_dict_and_flat_inputs_agree():
    grads = _dict_grads(6, seed=1)
    flat = torch.cat([t.reshape(6, -1) for t in grads.values()], dim=1)
    proj = TRAKProjector(P_TOTAL, 40, seed=9, param_shapes=P_SHAPES)
    a, b = proj.project(grads), proj.project(flat)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    if HAS_TRAK:
        from trak.utils import vectorize

        torch.testing.assert_close(proj.project(vectorize(grads, device="cpu")), a, rtol=1e-6, atol=1e-6)
    ref = project_ref(grads, 40, seed=9) * math.sqrt(40)
    torch.testing.assert_close(a.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-2), (torch.bfloat16, 1e-1), (torch.float32, 1e-4)])
def test_trak_low_precision_inputs(dtype, tol):
    """fp16 / bf16 gradients: error vs fp64 at most ~ the inputs' own rounding (relative to the row norm)."""
    grads = _dict_grads(5, seed=3, dtype=dtype)
    out = TRAKProjector(P_TOTAL, 64, seed=1, dtype=dtype).project(grads)
    assert out.dtype == dtype
    ref = project_ref({n: t.double() for n, t in grads.items()}, 64, seed=1) * 8.0
    err = (out.double() - ref).norm(dim=1) / ref.norm(dim=1)
    assert err.max() < tol


class _MaterialisedProjector:
    """The same matrix built explicitly (float64), as a TRAK projector: an independent reference."""

    def __init__(self, grad_dim, proj_dim, seed):
        self.grad_dim, self.proj_dim, self.seed = grad_dim, proj_dim, seed
        self.proj_type, self.device = "rademacher", "cpu"

    def project(self, grads, model_id):
        ref = project_ref(grads, self.proj_dim, effective_seed(self.seed, model_id))
        return (ref * math.sqrt(self.proj_dim)).float()

    def free_memory(self):
        pass


def _trak_scores(projector, save_dir):
    from trak import TRAKer

    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("fc1", torch.nn.Linear(7, 5))
    model.add_module("act", torch.nn.Tanh())
    model.add_module("fc2", torch.nn.Linear(5, 3))
    model.eval()
    x, y = torch.randn(21, 7), torch.randint(0, 3, (21,))
    xt, yt = torch.randn(4, 7), torch.randint(0, 3, (4,))
    traker = TRAKer(model=model, task="image_classification", train_set_size=21, save_dir=save_dir, device="cpu",
                    projector=projector, use_half_precision=False, logging_level=logging.ERROR)
    traker.load_checkpoint(model.state_dict(), model_id=0)
    for s in range(0, 21, 8):  # uneven last batch
        traker.featurize(batch=(x[s:s + 8], y[s:s + 8]), num_samples=len(x[s:s + 8]))
    traker.finalize_features()
    traker.start_scoring_checkpoint(exp_name="t", checkpoint=model.state_dict(), model_id=0, num_targets=4)
    traker.score(batch=(xt, yt), num_samples=4)
    return np.asarray(traker.finalize_scores(exp_name="t"), dtype=np.float64)


def test_traker_round_trip_with_our_projector(tmp_path):
    pytest.importorskip("trak", reason=NO_TRAK)
    from trak.projectors import AbstractProjector

    class Materialised(_MaterialisedProjector, AbstractProjector):
        pass

    ours = _trak_scores(TRAKProjector(P_TOTAL, 16, seed=3), str(tmp_path / "ours"))
    ref = _trak_scores(Materialised(P_TOTAL, 16, 3), str(tmp_path / "ref"))
    contract = _trak_scores(TRAKProjector(P_TOTAL, 16, seed=3, scale="contract"), str(tmp_path / "contract"))
    assert ours.shape == (21, 4) and np.isfinite(ours).all() and np.abs(ours).max() > 0
    np.testing.assert_allclose(ours, ref, rtol=1e-3, atol=1e-4 * np.abs(ref).max())
    # TRAK divides (X^T X)^-1 by its mean |entry|, so scores scale with the square of the projection's
    # scale: "contract" gives the "trak" scores / k, the same ranking
    np.testing.assert_allclose(contract * 16, ours, rtol=1e-3, atol=1e-4 * np.abs(ours).max())


# --------------------------------------------------------------------------- docs/api.md


def _doc_blocks():
    text = open(DOCS, encoding="utf-8").read()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_docs_api_examples_run(tmp_path, monkeypatch):
    """Every ```python block of docs/api.md, in order, in one namespace (so the docs cannot rot)."""
    blocks = _doc_blocks()
    assert len(blocks) >= 4
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__docs__"}
    for n, block in enumerate(blocks, start=1):
        try:
            exec(compile(block, f"docs/api.md block {n}", "exec"), namespace)
        except Exception as err:  # name the block so a failure points at the docs
            raise AssertionError(f"docs/api.md python block {n} failed: {err!r}\n{block}") from err


def test_docs_api_lists_every_public_name():
    import icons_fast

    text = open(DOCS, encoding="utf-8").read()
    missing = [name for name in icons_fast.__all__ if name != "__version__" and f"`{name}" not in text]
    assert not missing, f"docs/api.md does not document {missing}"


# --------------------------------------------------------------------------- drop-in fidelity (LESS and ICONS heads)


def test_release_influence_refuses_layouts_the_generalist_would_drop(tmp_path):
    m = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="plain matrix.*only subtask folders"):
        rel.write_icons_influence(str(tmp_path), {"mme": m})
    with pytest.raises(ValueError, match="'gqa' has subtasks.*only\\s+for 'mme'"):
        rel.write_icons_influence(str(tmp_path), {"gqa": {"a": m, "b": m}})
    with pytest.raises(ValueError, match="no subtasks"):
        rel.write_icons_influence(str(tmp_path), {"mme": {}})
    assert not os.listdir(tmp_path)  # refused before anything is written


def test_release_exact_scores_use_raw_validation_rows_for_mme_only():
    rng = np.random.default_rng(5)
    n, k = 23, 8
    f, _ = _unit_np(rng.normal(size=(n, k)))
    targets = {}
    for task, subs in (("gqa", None), ("mme", ("count", "OCR"))):
        def pair(m):
            u, norms = _unit_np(rng.normal(size=(m, k)) * rng.uniform(0.5, 4, size=(m, 1)))
            return torch.tensor(u, dtype=torch.float32), norms.astype(np.float32)
        targets[task] = pair(4) if subs is None else {s: pair(3 + j) for j, s in enumerate(subs)}
    scores, names = rel.release_scores(torch.tensor(f, dtype=torch.float32), targets)
    assert names == ["gqa", "mme"]
    gqa = f @ targets["gqa"][0].double().numpy().T
    mme = [f @ (u.double().numpy() * nrm[:, None]).T for u, nrm in targets["mme"].values()]
    np.testing.assert_allclose(scores[:, 0], gqa.mean(1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scores[:, 1], np.maximum(mme[0].mean(1), mme[1].mean(1)), rtol=1e-5, atol=1e-5)
    # the release's own reader, fed the release's matrices, gives the same columns
    import tempfile

    with tempfile.TemporaryDirectory() as base:
        rel.write_icons_influence(base, {"gqa": torch.tensor(gqa), "mme": {"count": torch.tensor(mme[0]),
                                                                          "OCR": torch.tensor(mme[1])}})
        read, read_names = rel.read_icons_influence(base)
    np.testing.assert_allclose(read[:, [read_names.index("gqa"), read_names.index("mme")]], scores,
                               rtol=1e-5, atol=1e-5)
    cosine, _ = rel.release_scores(torch.tensor(f, dtype=torch.float32), targets, unnormalised_task=None)
    np.testing.assert_allclose(cosine[:, 0], scores[:, 0], rtol=1e-6)  # only the MME column differs
    assert not np.allclose(cosine[:, 1], scores[:, 1])


def test_run_to_less_writes_the_n_subtasks_line_and_one_folder_per_task(tmp_path):
    rng = np.random.default_rng(6)
    run = tmp_path / "run"
    stores = {}
    for split, m in (("train", 9), ("target-mme--a", 3), ("target-mme--b", 3), ("target-gqa", 4)):
        f, nrm = _unit_np(rng.normal(size=(m, 6)))
        stores[split] = _store(str(run / "features" / "checkpoint-7" / split), torch.tensor(f),
                               nrm.astype(np.float32), range(m), m)
    from icons_fast.features.store import FeatureStore

    loads = []
    real_load = FeatureStore.load
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(FeatureStore, "load", lambda self, *a, **k: (loads.append(self.root), real_load(self, *a, **k))[1])
        written = less.run_to_less(str(run), str(tmp_path / "less"))
    assert sorted(loads) == sorted(set(loads)) and len(loads) == 4  # every store read once
    assert str(tmp_path / "less" / "mme-ckpt7-adam") in written
    text = open(tmp_path / "less" / "N_SUBTASKS.py").read()
    namespace = {}
    exec(text, namespace)
    assert namespace["N_SUBTASKS"] == {"mmlu": 57, "bbh": 27, "tydiqa": 9, "mme": 2, "gqa": 1}
    combined = less.read_less_grads(str(tmp_path / "less" / "mme-ckpt7-adam"))
    parts = [stores[s].load()[2] for s in ("target-mme--a", "target-mme--b")]
    assert torch.equal(combined, torch.cat(parts))
    # LESS's matching on the combined folder with N_SUBTASKS["mme"] groups = the max over our two subtasks
    train = less.read_less_grads(str(tmp_path / "less" / "train-ckpt7-adam"))
    got = less.less_scores(train, combined, n_subtasks=namespace["N_SUBTASKS"]["mme"])
    per_sub = [less.less_scores(train, p) for p in parts]
    torch.testing.assert_close(got, torch.maximum(*per_sub))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_less_scores_files_are_float32_whatever_they_are_given(tmp_path, dtype):
    path = less.write_less_scores(str(tmp_path), "mmlu", "dolly", torch.arange(5, dtype=dtype))
    assert less.read_less_scores(path).dtype == torch.float32
    path = less.write_less_scores(str(tmp_path), "bbh", "dolly", np.arange(5, dtype=np.float64))
    assert less.read_less_scores(path).dtype == torch.float32


def test_less_selection_numbers_raw_jsonl_lines_as_less_does(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_bytes(b'{"id": 0}\n\n{"id": 2}\r\n{"id": 3}')  # a blank line 1, CRLF, no final newline
    out = less.write_less_selection(str(tmp_path / "sel"), "t", {"d": torch.tensor([0.1, -1.0, 0.9, 0.5])},
                                    [str(data)], max_samples=2)
    assert open(out["top"], "rb").read() == b'{"id": 2}\n{"id": 3}\n'  # lines 2 and 3, endings as text mode writes
    with pytest.raises(ValueError, match="line 2 of its file is blank"):
        less.write_less_selection(str(tmp_path / "sel"), "t", {"d": torch.tensor([0.1, 2.0, 0.9, 0.5])},
                                  [str(data)], max_samples=1)
