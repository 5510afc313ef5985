"""The influence op (icons_fast.ops.segment_reduce + csrc/influence*.{cpp,cu}) against float64 brute force."""
import os
import shutil
import subprocess

import pytest
import torch

from icons_fast.ops import backend as backend_mod
from icons_fast.ops.backend import BackendUnavailable, has_cpu_ext, has_cuda_ext
from icons_fast.ops.segment_reduce import REDUCTIONS, offsets_from_sizes, segment_reduce, segment_reduce_ref

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_ext = pytest.mark.skipif(not has_cpu_ext(), reason="icons_fast._C is not built")

SIZES = [1, 4, 7]  # segment sizes: a singleton, a short and an odd one
M_TOPM, THRESH = 3, 0.05


def make_inputs(dtype, n=37, k=19, sizes=SIZES, target_dtype=torch.float32, seed=0, device="cpu"):
    """Random non-zero train / target features; int8 comes with a per-row positive scale."""
    g = torch.Generator().manual_seed(seed)
    m = sum(sizes)
    targets = (torch.randn(m, k, generator=g) / k**0.5).to(target_dtype)
    scale = None
    if dtype == torch.int8:
        train = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        scale = torch.rand(n, generator=g) * 0.02 + 0.005
        scale = scale.to(device)
    else:
        train = (torch.randn(n, k, generator=g) / k**0.5).to(dtype)
    return train.to(device), targets.to(device), offsets_from_sizes(sizes), scale


def brute_force(train, targets, offsets, reduction, scale=None):
    """float64 [N, S] reference and the float64 product [N, M]."""
    x = train.double().cpu()
    if scale is not None:
        x = x * scale.double().cpu()[:, None]
    prod = x @ targets.double().cpu().T
    offs = offsets.tolist()
    cols = []
    for lo, hi in zip(offs[:-1], offs[1:]):
        seg = prod[:, lo:hi]
        if reduction == "mean":
            cols.append(seg.mean(1))
        elif reduction == "max":
            cols.append(seg.max(1).values)
        elif reduction == "topm":
            cols.append(seg.sort(1, descending=True).values[:, :M_TOPM].mean(1))
        else:
            cols.append((seg > THRESH).sum(1).double())
    return torch.stack(cols, 1), prod, x


def fp32_bound(x64, targets):
    """Worst-case fp32 dot-product rounding bound gamma_{k+3} * max_ij sum_p |x_ip t_jp|."""
    k = x64.shape[1]
    return (k + 3) * 2.0**-24 * float((x64.abs() @ targets.double().cpu().abs().T).max())


def check_against_brute_force(got, train, targets, offsets, reduction, scale, factor=2.0):
    ref64, prod, x64 = brute_force(train, targets, offsets, reduction, scale)
    got = got.double().cpu()
    if reduction == "count":
        # A count may only differ where a score lies within rounding of the threshold.
        ambiguous = ((prod - THRESH).abs() < fp32_bound(x64, targets)).double()
        amb = torch.stack([ambiguous[:, lo:hi].sum(1) for lo, hi in zip(offsets[:-1], offsets[1:])], 1)
        assert bool(((got - ref64).abs() <= amb).all())
        return
    torch_err = (segment_reduce_ref(train, targets, offsets, reduction, M_TOPM, THRESH, scale=scale).double().cpu() - ref64).abs().max()
    err = (got - ref64).abs().max()
    # flash-attention's rule: at most 2x torch's own error (floor: 2 ulps of the largest score,
    # for cases where torch happens to be exact).
    floor = 2 * 2.0**-23 * float(ref64.abs().max())
    assert err <= max(factor * float(torch_err), floor), (err, torch_err)


@needs_ext
@pytest.mark.parametrize("backend", ["cpp", "blas"])
@pytest.mark.parametrize("k", [19, 33])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int8])
def test_cpp_matches_float64(dtype, reduction, k, backend):
    train, targets, offsets, scale = make_inputs(dtype, k=k, seed=k)
    got = segment_reduce(train, targets, offsets, reduction, m=M_TOPM, threshold=THRESH, backend=backend,
                         scale=scale, block_rows=16)  # blas: 3 blocks, the last one short
    assert got.shape == (37, 3) and got.dtype == torch.float32
    check_against_brute_force(got, train, targets, offsets, reduction, scale)


@needs_ext
@pytest.mark.parametrize("backend", ["cpp", "blas"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cpp_fp16_targets_and_tile_edges(reduction, backend):
    """k past one 256-chunk, M past one 256-column tile, a segment straddling it, fp16 targets."""
    sizes = [1, 255, 3, 41]
    train, targets, offsets, scale = make_inputs(torch.float16, n=50, k=300, sizes=sizes, target_dtype=torch.float16, seed=3)
    got = segment_reduce(train, targets, offsets, reduction, m=M_TOPM, threshold=THRESH, backend=backend)
    check_against_brute_force(got, train, targets, offsets, reduction, scale)


@needs_ext
@pytest.mark.parametrize("m", [1, 3, 40])
def test_topm_long_segments_match_float64(m):
    """Top-m over segments much longer than 2m (the candidate buffer is cut back many times), ties included."""
    global M_TOPM
    train, targets, offsets, _ = make_inputs(torch.float32, n=23, k=8, sizes=[300, 41, 2], seed=21)
    targets[5:9] = targets[4]  # repeated scores: equal values at the floor
    saved, M_TOPM = M_TOPM, m
    try:
        for backend in ("cpp", "blas"):
            got = segment_reduce(train, targets, offsets, "topm", m=m, backend=backend)
            check_against_brute_force(got, train, targets, offsets, "topm", None)
    finally:
        M_TOPM = saved


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "max", "topm"])
def test_bf16_gemm_within_error_budget(dtype, reduction):
    """blas-bf16 against fp64: every score within BF16_SCORE_BUDGET * ||x|| * max ||t|| of its segment, and the
    top 20% per task overlaps the fp64 selection by at least BF16_MIN_OVERLAP (the documented budget)."""
    from icons_fast.ops.segment_reduce import BF16_MIN_OVERLAP, BF16_SCORE_BUDGET

    n, sizes = 2000, [40, 7, 120, 1, 60]
    train, targets, offsets, _ = make_inputs(dtype, n=n, k=256, sizes=sizes, seed=31)
    got = segment_reduce(train, targets, offsets, reduction, m=M_TOPM, backend="blas-bf16", block_rows=300).double()
    ref64, _, x64 = brute_force(train, targets, offsets, reduction)
    tnorm = targets.double().norm(dim=1)
    seg_tmax = torch.stack([tnorm[lo:hi].max() for lo, hi in zip(offsets[:-1], offsets[1:])])
    bound = BF16_SCORE_BUDGET * x64.norm(dim=1)[:, None] * seg_tmax[None, :]
    assert bool(((got - ref64).abs() <= bound).all()), float(((got - ref64).abs() / bound).max())
    # the bound is not vacuous: the error is there (bf16 differs from fp64) but well inside it
    assert float((got - ref64).abs().max()) > 0
    budget = int(0.2 * n)
    for s in range(len(sizes)):
        ours = set(got[:, s].topk(budget).indices.tolist())
        exact = set(ref64[:, s].topk(budget).indices.tolist())
        assert len(ours & exact) / budget >= BF16_MIN_OVERLAP, (s, len(ours & exact) / budget)


@needs_ext
def test_bf16_backend_refuses_what_its_budget_does_not_cover():
    train, targets, offsets, _ = make_inputs(torch.float16)
    with pytest.raises(BackendUnavailable, match="count"):
        segment_reduce(train, targets, offsets, "count", threshold=0.0, backend="blas-bf16")
    with pytest.raises(BackendUnavailable, match="float32"):
        segment_reduce(train.float(), targets, offsets, "max", backend="blas-bf16")


@needs_ext
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_fold_of_a_block_equals_the_fused_kernel(reduction):
    """The C++ fold on precomputed, transposed dot products (blas) reduces like the fused kernel (cpp): same scores
    in, bit-identical results out, for a row count that leaves a partial lane group (70 = 64 + 6 rows)."""
    from icons_fast._C import influence_codes, influence_segment_fold_t_cpu

    n = 70
    _, targets, offsets, _ = make_inputs(torch.float32, n=n, k=1, sizes=[3, 300, 1, 250], seed=9)
    train = ((torch.linspace(-2, 2, n) * 64).round() / 64)[:, None]  # k = 1: one rounded product each, the same in both paths
    want = segment_reduce(train, targets, offsets, reduction, m=M_TOPM, threshold=THRESH, backend="cpp")
    scores_t = (targets @ train.T).contiguous()  # [M, n]
    ld = n + 5  # a column stride larger than the row count
    padded = torch.full((scores_t.shape[0], ld), float("nan"))
    padded[:, :n] = scores_t
    out = torch.zeros(n, 4)
    codes = influence_codes()
    influence_segment_fold_t_cpu(padded.data_ptr(), n, scores_t.shape[0], ld, offsets.data_ptr(), 4,
                                 codes[reduction], M_TOPM, THRESH, 1.0, out.data_ptr(), 2)
    assert torch.equal(out, want)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bit_level_conversion_of_every_finite_value(dtype):
    """Identity targets make out == float(train) exactly: checks the C++ fp16 / bf16 decoding
    on every finite bit pattern (subnormals, +-0, the largest normals)."""
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    vals = bits.view(dtype)
    vals = vals[torch.isfinite(vals.float())]
    k = 19
    vals = torch.cat([vals, vals[: (-vals.numel()) % k]]).reshape(-1, k).contiguous()
    eye = torch.eye(k)
    got = segment_reduce(vals, eye, torch.arange(k + 1), "max", backend="cpp")
    assert torch.equal(got, vals.float())


@needs_ext
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_portable_kernel_matches_float64(reduction):
    """The non-AVX2 micro-kernel (what runs on other CPUs), called through _C directly."""
    from icons_fast._C import influence_codes, influence_segment_reduce_cpu

    codes = influence_codes()
    train, targets, offsets, _ = make_inputs(torch.bfloat16, n=41, k=270, sizes=[5, 1, 300], seed=5)
    out = torch.zeros(41, 3)
    name = influence_segment_reduce_cpu(
        train.data_ptr(), codes["bf16"], 41, 270, 0, targets.data_ptr(), codes["f32"], targets.shape[0],
        offsets.data_ptr(), 3, codes[reduction], M_TOPM, THRESH, 1.0, out.data_ptr(), 13, 0, True,
    )
    assert name.startswith("generic")
    # Without FMA each term is rounded twice (product, then sum): allow 4x torch's error.
    check_against_brute_force(out, train, targets, offsets, reduction, None, factor=4.0)


@needs_ext
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cpp_independent_of_block_size_and_threads(reduction):
    train, targets, offsets, _ = make_inputs(torch.float16, n=97, k=33, sizes=[3, 9, 17, 1], seed=7)
    base = segment_reduce(train, targets, offsets, reduction, m=2, threshold=0.0, backend="cpp", block_rows=48)
    for rows, threads in [(1, 1), (5, 2), (7, 1), (97, 2), (1000, 2)]:
        other = segment_reduce(train, targets, offsets, reduction, m=2, threshold=0.0, backend="cpp",
                               block_rows=rows, num_threads=threads)
        assert torch.equal(base, other), (rows, threads)


@pytest.mark.parametrize("backend", ["cpp", "blas", "torch"])
def test_weighted_accumulation(backend):
    if backend != "torch" and not has_cpu_ext():
        pytest.skip("icons_fast._C is not built")
    a, targets, offsets, _ = make_inputs(torch.float32, seed=11)
    b, _, _, _ = make_inputs(torch.float32, seed=12)
    start = torch.randn(37, 3)  # out already holds scores: they must be kept, not overwritten
    out = start.clone()
    segment_reduce(a, targets, offsets, "max", weight=0.3, out=out, backend=backend)
    res = segment_reduce(b, targets, offsets, "max", weight=0.7, out=out, backend=backend)
    assert res.data_ptr() == out.data_ptr()
    want = start.double() + 0.3 * brute_force(a, targets, offsets, "max")[0] + 0.7 * brute_force(b, targets, offsets, "max")[0]
    assert torch.allclose(out.double(), want, atol=1e-5, rtol=0)


def test_torch_backend_blocks_match_reference():
    train, targets, offsets, scale = make_inputs(torch.int8, seed=13)
    for red in REDUCTIONS:
        got = segment_reduce(train, targets, offsets, red, m=2, threshold=0.1, backend="torch", block_rows=5, scale=scale)
        ref = segment_reduce_ref(train, targets, offsets, red, m=2, threshold=0.1, scale=scale)
        assert torch.allclose(got, ref, atol=1e-6, rtol=0)


def test_input_checks_raise_clear_errors():
    train, targets, offsets, _ = make_inputs(torch.float32)
    q, _, _, scale = make_inputs(torch.int8)
    cases = [
        (dict(train=train[0]), ValueError, "2-D"),
        (dict(train=train.double()), TypeError, "dtype"),
        (dict(targets_cat=targets.bfloat16()), TypeError, "float32 or float16"),
        (dict(targets_cat=targets[:, :5].contiguous()), ValueError, "feature sizes differ"),
        (dict(train=train.t().contiguous().t()), ValueError, "contiguous"),
        (dict(offsets=[1, 4, 12]), ValueError, "start at 0"),
        (dict(offsets=[0, 4, 11]), ValueError, "end at M"),
        (dict(offsets=[0, 4, 4, 12]), ValueError, "segment 1 is empty"),
        (dict(reduction="median"), ValueError, "unknown reduction"),
        (dict(reduction="topm", m=None), ValueError, "needs m"),
        (dict(reduction="count", threshold=None), ValueError, "threshold"),
        (dict(train=q), ValueError, "need scale"),
        (dict(train=q, scale=scale[:5]), ValueError, "scale must be float32"),
        (dict(scale=scale), ValueError, "only for int8"),
        (dict(out=torch.zeros(37, 2)), ValueError, "out must be float32"),
        (dict(out=torch.zeros(37, 3, dtype=torch.float64)), ValueError, "out must be float32"),
        (dict(block_rows=-3), ValueError, "block_rows"),
        (dict(backend="cuda"), BackendUnavailable, "cuda"),
    ]
    for override, exc, match in cases:
        kw = dict(train=train, targets_cat=targets, offsets=offsets, reduction="mean", m=2, threshold=0.0)
        kw.update(override)
        with pytest.raises(exc, match=match):
            segment_reduce(**kw)


def test_without_extension_runs_torch_path(monkeypatch):
    monkeypatch.setattr(backend_mod, "_cpu_ext", lambda: (None, "icons_fast._C is not built (test)"))
    assert not backend_mod.has_cpu_ext() and not backend_mod.has_cuda_ext()
    assert backend_mod.resolve_backend("influence", "auto", "cpu") == "torch"
    train, targets, offsets, _ = make_inputs(torch.float16, seed=17)
    got = segment_reduce(train, targets, offsets, "topm", m=M_TOPM)
    check_against_brute_force(got, train, targets, offsets, "topm", None)
    with pytest.raises(BackendUnavailable, match="not built"):
        segment_reduce(train, targets, offsets, "mean", backend="cpp")


def test_has_cuda_ext_false_without_gpu():
    if not torch.cuda.is_available():
        assert has_cuda_ext() is False
        assert backend_mod.resolve_backend("influence", "auto", "cpu") in ("blas", "cpp", "torch")


def test_cuda_source_compiles(tmp_path):
    """Every csrc/*.cu with nvcc for sm_75 (tensor-core bf16 body replaced by a trap) and sm_90."""
    nvcc = shutil.which("nvcc") or (os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc") if os.environ.get("CUDA_HOME") else None)
    if not nvcc or not os.path.exists(nvcc):
        pytest.skip("nvcc not found")
    for cu in sorted(f for f in os.listdir(os.path.join(REPO, "csrc")) if f.endswith(".cu")):
        obj = tmp_path / (cu + ".o")
        cmd = [nvcc, "-c", os.path.join(REPO, "csrc", cu), "-o", str(obj), "-std=c++17", "-O1",
               "-DICONS_FAST_WITH_CUDA", '-DICONS_FAST_CUDA_ARCH_LIST="75;90"', "-I" + os.path.join(REPO, "csrc"),
               "-Xcompiler", "-fPIC", "--threads", "2", "-gencode=arch=compute_75,code=sm_75",
               "-gencode=arch=compute_90,code=sm_90"]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, (cu, res.stderr[-4000:])
        assert obj.stat().st_size > 0

class _FakeExt:
    """An extension whose CUDA path is compiled in but whose probe reports ``problem``."""

    def __init__(self, problem):
        self.problem, self.calls = problem, 0

    def has_cuda(self):
        return True

    def cuda_runtime_status(self):
        self.calls += 1
        return self.problem


@pytest.mark.parametrize("problem", ["", "cudaGetDeviceCount: CUDA driver version is insufficient for CUDA runtime version"])
def test_has_cuda_ext_probes_the_runtime_once(monkeypatch, caplog, problem):
    """Compiled in + a GPU is not enough: the probe kernel must run; a failed probe is one logged line."""
    fake = _FakeExt(problem)
    monkeypatch.setattr(backend_mod, "_cpu_ext", lambda: (fake, None))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    backend_mod._cuda_runtime_problem.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="icons_fast"):
            assert backend_mod.has_cuda_ext() is (problem == "")
            assert backend_mod.has_cuda_ext() is (problem == "")
            want = "cuda" if problem == "" else "torch"
            assert backend_mod.resolve_backend("influence", "auto", "cuda") == want
        assert fake.calls == 1
        warned = [r for r in caplog.records if "cannot run here" in r.getMessage()]
        assert len(warned) == (0 if problem == "" else 1)
        if problem:
            assert "insufficient" in warned[0].getMessage()
    finally:
        backend_mod._cuda_runtime_problem.cache_clear()


def test_cuda_runtime_status_of_the_built_extension(monkeypatch):
    """Where the extension was built with its CUDA path on a machine without a usable GPU, the real
    probe says why in one line and has_cuda_ext() is False even if torch claimed a GPU."""
    if not has_cpu_ext():
        pytest.skip("icons_fast._C is not built")
    ext = backend_mod.cpu_ext()
    status = ext.cuda_runtime_status()
    assert isinstance(status, str) and "\n" not in status
    if not ext.has_cuda():
        assert "built without its CUDA path" in status
        return
    assert ext.cuda_archs()
    if torch.cuda.is_available():
        assert status == "", status
        return
    assert status, "a CUDA build must not pass its probe on a machine without a GPU"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    backend_mod._cuda_runtime_problem.cache_clear()
    try:
        assert backend_mod.has_cuda_ext() is False
    finally:
        backend_mod._cuda_runtime_problem.cache_clear()

@pytest.mark.cuda
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int8])
def test_cuda_matches_float64(dtype, reduction):
    if not has_cuda_ext():
        pytest.skip("extension built without CUDA")
    for k, sizes, tdt in [(19, SIZES, torch.float32), (300, [1, 70, 3, 41], torch.float16)]:
        train, targets, offsets, scale = make_inputs(dtype, n=133, k=k, sizes=sizes, target_dtype=tdt, seed=k, device="cuda")
        got = segment_reduce(train, targets, offsets, reduction, m=M_TOPM, threshold=THRESH, backend="cuda", scale=scale)
        if dtype in (torch.float16, torch.bfloat16):
            # Tensor cores take the targets rounded to the train dtype: compare with
            # torch doing the product at that dtype (error at most 2x torch's).
            ref64, _, _ = brute_force(train, targets, offsets, reduction, scale)
            if reduction == "count":
                continue  # thresholds on dtype-rounded scores: covered by fp32 / int8
            prod = (train @ targets.to(dtype).T).float()
            torch_red = torch.stack([
                {"mean": s.mean(1), "max": s.amax(1), "topm": s.topk(min(M_TOPM, s.shape[1]), 1).values.mean(1)}[reduction]
                for s in (prod[:, lo:hi] for lo, hi in zip(offsets[:-1].tolist(), offsets[1:].tolist()))], 1)
            err = (got.double().cpu() - ref64).abs().max()
            torch_err = (torch_red.double().cpu() - ref64).abs().max()
            assert err <= 2 * torch_err + 1e-6, (err, torch_err)
        else:
            check_against_brute_force(got, train, targets, offsets, reduction, scale)


@pytest.mark.cuda
def test_cuda_weighted_and_same_as_cpu_for_fp32():
    if not has_cuda_ext():
        pytest.skip("extension built without CUDA")
    train, targets, offsets, _ = make_inputs(torch.float32, n=200, k=65, sizes=[2, 63, 64, 1], seed=23)
    out = torch.ones(200, 4, device="cuda")
    segment_reduce(train.cuda(), targets.cuda(), offsets, "mean", weight=0.5, out=out, backend="cuda")
    cpu = segment_reduce(train, targets, offsets, "mean", weight=0.5, out=torch.ones(200, 4), backend="torch")
    assert torch.allclose(out.cpu(), cpu, atol=1e-5, rtol=0)


@needs_ext
def test_blas_buffers_are_capped(monkeypatch):
    """A memory cap smaller than one default block splits the rows into more blocks; the result is unchanged."""
    from icons_fast.ops import segment_reduce as sr

    train, targets, offsets, _ = make_inputs(torch.float16, n=37, k=19, seed=23)
    want = segment_reduce(train, targets, offsets, "topm", m=M_TOPM, backend="blas")
    seen = []
    real_fold = backend_mod.cpu_ext().influence_segment_fold_t_cpu

    class Ext:  # the real extension, recording the rows of every fold call
        def __getattr__(self, name):
            return getattr(backend_mod.cpu_ext(), name)

        def influence_segment_fold_t_cpu(self, ptr, rows, *args):
            seen.append(rows)
            return real_fold(ptr, rows, *args)

    monkeypatch.setattr(sr, "cpu_ext", lambda: Ext())
    monkeypatch.setattr(sr, "BLAS_BUFFER_BYTES", 4 * (19 + targets.shape[0]) * 10)  # 10 rows fit
    got = segment_reduce(train, targets, offsets, "topm", m=M_TOPM, backend="blas")
    assert seen == [10, 10, 10, 7]
    assert torch.allclose(got, want, rtol=0, atol=1e-6)  # the BLAS may order a row's sums by block shape
