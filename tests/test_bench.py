"""Benchmark harness: rows are produced and well-formed, the LESS-style baseline computes what ours computes,
the benchmark configs have the dimensions they claim, the llava-7b-shape builder runs (shrunk) on a CPU.
No timing assertions: speed is recorded in benchmarks/RESULTS.md, not tested."""
import csv
import json
import math

import numpy as np
import pytest
import torch

from icons_fast.bench.featurize import LessStyleBaseline, featurize_providers, random_moments
from icons_fast.bench.models import build_bench_model, get_config, make_batch, param_counts
from icons_fast.bench.timing import make_row, measure, quantiles, set_ratios
from icons_fast.cli import main as cli_main
from icons_fast.features.extractor import GradientExtractor

SHRUNK_7B = {  # llava-7b-shape's code path at toy width (the real one is ~7B params: GPU only)
    "text": dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=4, vocab_size=300),
    "vision": dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, image_size=28, patch_size=14),
}


@pytest.fixture(scope="module")
def tiny():
    cfg = get_config("tiny")
    return cfg, build_bench_model(cfg)


def test_quantiles_against_numpy():
    rng = np.random.default_rng(3)
    ts = list(rng.uniform(0.1, 2.0, size=11))
    med, p20, p80 = quantiles(ts)
    assert med == pytest.approx(float(np.median(ts)))
    s = sorted(ts)
    assert p20 == s[2] and p80 == s[8]  # nearest rank of 0.2 * 10 and 0.8 * 10
    assert p20 <= med <= p80


def test_rows_and_ratios():
    env = {"device": "cpu-x", "torch": "t"}
    a = make_row("s", "ref", "c", [2.0, 2.0, 2.0], 4, "samples", env, flops=8e12)
    b = make_row("s", "fast", "c", [0.5, 0.5, 0.7], 4, "samples", env)
    set_ratios([a, b], "ref")
    assert a["rate"] == 2.0 and b["rate"] == 8.0 and b["ratio"] == 4.0 and b["ratio_to"] == "ref"
    assert a["tflops"] == pytest.approx(4.0) and a["device"] == "cpu-x"
    assert len(measure(lambda: None, repeats=3, warmup=0)) == 3


def test_small_config_matches_the_spec():
    """small = hidden 256, 4 layers, LoRA r=16 on all seven projections; P counted by hand from the dims."""
    cfg = get_config("small")
    assert (cfg.seq, cfg.lora_r) == (128, 16)
    model = build_bench_model(cfg)
    tc = model.config.text_config
    assert (tc.hidden_size, tc.num_hidden_layers) == (256, 4)
    h, kv, mlp, r = 256, 256 // tc.num_attention_heads * tc.num_key_value_heads, tc.intermediate_size, 16
    per_layer = r * ((h + h) * 2 + (h + kv) * 2 + (h + mlp) * 3)  # q, o; k, v; gate, up, down
    assert param_counts(model)["lora"] == 4 * per_layer
    names = {n.split(".")[-4] for n, p in model.named_parameters() if p.requires_grad}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not any("vision" in n for n, p in model.named_parameters() if p.requires_grad)


def test_synthetic_batch_layout(tiny):
    cfg, model = tiny
    b = make_batch(model, 3, cfg.seq, seed=5)
    n_img = model.config.image_seq_length
    assert b["input_ids"].shape == (3, cfg.seq) and b["pixel_values"].shape[0] == 3
    assert ((b["input_ids"] == model.config.image_token_index).sum(1) == n_img).all()
    lab = b["labels"] != -100
    assert lab.any(1).all()
    assert not (lab & (b["input_ids"] == model.config.image_token_index)).any()  # image tokens never labels


def test_less_style_baseline_equals_batched_extractor(tiny):
    """Batch-of-one loss.backward() + Adam (the baseline) == hooks + Adam (ours), sample by sample, before projection."""
    cfg, model = tiny
    batch = make_batch(model, 5, cfg.seq, seed=7)
    moments = random_moments(model, seed=4)
    base = LessStyleBaseline(model, cfg.proj_dim, moments, project=False)
    base.project = lambda g: g  # identity "projection": run() returns the [n, P] preconditioned grads
    out = base.run(batch)
    ours = GradientExtractor(model, proj_dim=None, mode="adam", optimizer_state=moments, backend="torch").featurize(batch)
    assert out.shape == ours.shape == (5, base.P)
    rel = (out - ours).norm() / ours.norm()
    assert rel < 1e-4, f"relative difference {rel:.2e}"


def test_less_style_dense_projection_is_rademacher(tiny):
    """The dense stand-in: entries +-1/sqrt(k), and the projected row is the preconditioned gradient times it."""
    cfg, model = tiny
    base = LessStyleBaseline(model, 64, random_moments(model), prefer="dense")
    assert "dense" in base.description
    g = torch.randn(3, base.P)
    e = torch.eye(base.P)[:5]
    R5 = base.project(e)  # first five rows of R
    assert torch.allclose(R5.abs(), torch.full_like(R5, 1 / math.sqrt(64)))
    R = base.project(torch.eye(base.P))
    assert torch.allclose(base.project(g).double(), g.double() @ R.double(), rtol=1e-4, atol=1e-4)


def test_shrunk_llava_7b_shape_runs_every_featurize_provider():
    cfg = get_config("llava-7b-shape", dtype="float32", layers=1, vision_layers=1, seq=40, batch=2,
                     baseline_samples=3, proj_dim=32, lora_r=4)
    model = build_bench_model(cfg, "cpu", llava_overrides=SHRUNK_7B)
    assert model.config.image_seq_length == 4  # (28 / 14)^2 patches
    assert model.config.text_config.num_hidden_layers == 1
    provs = featurize_providers(model, cfg, baseline="dense")
    names = [p["name"] for p in provs]
    assert names[0].startswith("floor") and names[1].startswith("ours") and "less-style (B=1)" in names
    ours = provs[1]["fn"]()
    assert ours.shape == (2, 32) and torch.isfinite(ours).all() and ours.abs().sum() > 0
    less = provs[2]["fn"]()
    assert less.shape == (3, 32) and torch.isfinite(less).all()


def test_cli_quick_writes_rows(tmp_path, capsys):
    """``icons-fast bench --quick`` (featurize on tiny + voting) prints the table and writes CSV/JSON rows."""
    csv_path, json_path = tmp_path / "rows.csv", tmp_path / "rows.json"
    rc = cli_main(["bench", "--quick", "--suites", "featurize,projection,voting", "--repeats", "1",
                   "--csv", str(csv_path), "--json", str(json_path)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "eta = ours / floor" in printed and "consensus_select" in printed
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    by = {(r["suite"], r["provider"].split(" (")[0]): r for r in rows}
    for key in [("featurize", "floor"), ("featurize", "ours"), ("featurize", "less-style"),
                ("projection", "dense"), ("projection", "ours"), ("voting", "vote_counts"),
                ("voting", "consensus_select")]:
        assert key in by, f"missing row {key}; got {sorted(by)}"
    for r in rows:
        assert float(r["median_s"]) > 0 and float(r["rate"]) > 0 and r["device"] and r["torch"] and r["date"]
    ours = by[("featurize", "ours")]
    assert float(ours["ratio"]) == pytest.approx(float(ours["rate"]) / float(by[("featurize", "floor")]["rate"]))
    data = json.loads(json_path.read_text())
    assert len(data["rows"]) == len(rows) and data["meta"]["quick"] is True


def test_influence_suite_rows_carry_gemm_and_reference_ratios(monkeypatch):
    """The influence suite times the op against the plain GEMMs and the references, and names the CPU's ISA."""
    from icons_fast.bench import suite
    from icons_fast.ops.autotune import cpu_isa

    sizes = dict(suite.SIZES["quick"], influence=(300, 64, 50, 5))
    monkeypatch.setitem(suite.SIZES, "quick", sizes)
    rows = suite.run_bench(["influence"], quick=True, device="cpu", repeats=1)
    by = {r["provider"]: r for r in rows}
    assert by["fp32 GEMM alone"]["vs_gemm"] == 1.0 and by["torch blocked max"]["vs_ref"] == 1.0
    auto = [r for r in rows if r["provider"].startswith("ours auto max -> ")]
    assert len(auto) == 1 and auto[0]["provider"].split(" -> ")[1] in ("blas", "cpp", "blas-bf16", "torch")
    for r in rows:
        assert r["device"].endswith(f"{cpu_isa()})")
        if "GEMM" not in r["provider"]:
            ref = "torch blocked topm" if "topm" in r["provider"] else "torch blocked max"
            assert r["vs_ref"] == pytest.approx(r["median_s"] / by[ref]["median_s"])
        if "blas-bf16" in r["provider"]:
            assert r["vs_gemm"] == pytest.approx(r["median_s"] / by["bf16 GEMM alone"]["median_s"])
