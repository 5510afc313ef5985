"""Triton kernels (icons_fast.kernels) against plain-torch references.

Without a GPU the kernels run under TRITON_INTERPRET=1 (set below, before
triton is imported), on small odd shapes. With a GPU the same tests run
compiled on CUDA tensors, and the ``cuda``-marked ones add realistic shapes.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first `import triton`

import pytest  # noqa: E402

from icons_fast.contract import AdamMoments, ProjectionSpec, rademacher_signs_ref  # noqa: E402
from icons_fast.kernels.project import rademacher_project  # noqa: E402
from icons_fast.kernels.rademacher import rademacher_signs  # noqa: E402
from icons_fast.ops.lora_grad import (  # noqa: E402
    LoraParams,
    lora_grad_project,
    lora_grad_project_ref,
    lora_grads,
    lora_grads_ref,
)
from icons_fast.ops.project import adam_precondition_ref, project_param_ref  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
A_NAME = "base_model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
B_NAME = "base_model.model.layers.0.self_attn.q_proj.lora_B.default.weight"


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double().cpu(), ref.double().cpu()
    return ((x - ref).norm() / ref.norm()).item()


def make_module_inputs(n=3, t=5, d_in=20, d_out=12, r=3, dtype=torch.float32, seed=0, poison=True):
    """Random LoRA module inputs with a ragged mask; padded rows of X and D poisoned with NaN / inf."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, t, d_in, generator=g)
    D = torch.randn(n, t, d_out, generator=g)
    A = torch.randn(r, d_in, generator=g) / d_in**0.5
    B = torch.randn(d_out, r, generator=g) / r**0.5
    lengths = torch.tensor([t, max(1, t - 3), max(1, t - 1)] * n)[:n]
    mask = (torch.arange(t)[None, :] < lengths[:, None]).to(torch.int64)
    if poison:
        X[mask == 0] = float("nan")
        D[mask == 0] = float("inf")
    adam_A = (torch.randn(r, d_in, generator=g) * 0.1, torch.rand(r, d_in, generator=g) * 0.5)
    adam_B = (torch.randn(d_out, r, generator=g) * 0.1, torch.rand(d_out, r, generator=g) * 0.5)
    to = lambda z: z.to(DEVICE, dtype)  # noqa: E731
    return dict(X=to(X), D=to(D), A=to(A), B=to(B), mask=mask.to(DEVICE)), adam_A, adam_B


def to64(inputs: dict) -> dict:
    return {k: (v.double() if v.is_floating_point() else v) for k, v in inputs.items()}


def _site_call(op, X, D, A, B, scale, a_name, b_name, seed, proj_dim, mask=None, adam_A=None, adam_B=None, **rest):
    """Call a lora_grad op with the site, spec and moments built from flat test arguments."""
    adam = None if adam_A is None else (AdamMoments(*adam_A), AdamMoments(*adam_B))
    return op(X, D, LoraParams(A, B, scale, a_name, b_name), ProjectionSpec(seed, proj_dim), mask=mask, adam=adam,
              **rest)


def lora_fast(*args, **kwargs):
    """``lora_grad_project`` (auto backend: Triton here) on flat test arguments."""
    return _site_call(lora_grad_project, *args, **kwargs)


def lora_ref(*args, **kwargs):
    """``lora_grad_project_ref`` on flat test arguments."""
    return _site_call(lora_grad_project_ref, *args, **kwargs)


# ------------------------------------------------------------------ signs
@pytest.mark.parametrize(
    "name, seed, row_start, n_rows, k",
    [
        (A_NAME, 0, 0, 41, 37),
        (B_NAME, 12345, 7, 33, 70),
        ("x", 2**40 + 7, 2**32 - 45, 45, 37),  # seed taken mod 2**32; last uint32 indices
        (0xDEADBEEF, 3, 2**31 - 3, 9, 100),  # precomputed pid; crosses 2**31
        ("y", 1, 1, 3, 1),
    ],
)
def test_signs_bit_identical(name, seed, row_start, n_rows, k):
    got = rademacher_signs(name, seed, row_start, n_rows, k, device=DEVICE).cpu()
    ref = rademacher_signs_ref(name, seed, row_start, n_rows, k)
    assert got.dtype == ref.dtype and torch.equal(got, ref)
    unscaled = rademacher_signs(name, seed, row_start, n_rows, k, device=DEVICE, scaled=False).cpu()
    assert torch.equal(unscaled, rademacher_signs_ref(name, seed, row_start, n_rows, k, scaled=False))


def test_h1_is_one_int32_type():
    """``h1`` travels as the int32 with the uint32's bits (one compiled type); the golden
    cases above include names whose ``h1`` is >= 2**31 (negative as int32) and < 2**31."""
    from icons_fast.contract import MASK32, param_hash
    from icons_fast.kernels.rademacher import param_hash_i32

    hashes = [param_hash(name, seed) for name, seed in ((A_NAME, 0), (0xDEADBEEF, 3))]
    assert hashes[0] < 2**31 <= hashes[1]
    for name, seed in ((A_NAME, 0), (0xDEADBEEF, 3), ("x", 2**40 + 7)):
        h1 = param_hash_i32(name, seed)
        assert -(2**31) <= h1 < 2**31 and h1 & MASK32 == param_hash(name, seed)


def test_autotune_set_is_pruned_per_block_b():
    """Every BLOCK_B the launcher picks keeps some configurations, all from the autotune set and
    all dividing the row alignment and the chunk (so chunks and splits start on a tile)."""
    from icons_fast.kernels.project import (
        CHUNK_ROWS, MAX_BLOCK_B, ROW_ALIGN, autotune_configs, prune_configs,
    )

    every = autotune_configs()
    for block_b in (16, 32, MAX_BLOCK_B):
        kept = prune_configs(every, None, BLOCK_B=block_b, ADAM=True, N_TERMS=2)
        assert 0 < len(kept) < len(every)
        assert all(c in every for c in kept)
        assert all(ROW_ALIGN % c.kwargs["BLOCK_P"] == 0 and CHUNK_ROWS % c.kwargs["BLOCK_P"] == 0 for c in kept)


def test_signs_refuse_indices_past_uint32():
    with pytest.raises(ValueError, match="2\\*\\*32"):
        rademacher_signs("x", 0, 2**32 - 2, 3, 8, device=DEVICE)


# ------------------------------------------------------------- projection
@pytest.mark.parametrize(
    "n, p, k, adam, split_p, row_start",
    [
        (3, 300, 37, False, None, 0),
        (3, 300, 70, True, 2, 11),
        (17, 129, 33, True, 3, 0),  # B > 16: two sample rows per tile edge
        (1, 5, 1, False, None, 2**32 - 5),
    ],
)
def test_project_matches_ref(n, p, k, adam, split_p, row_start):
    g = torch.Generator().manual_seed(n * 1000 + p)
    G = torch.randn(n, p, generator=g)
    moments = (torch.randn(p, generator=g) * 0.1, torch.rand(p, generator=g)) if adam else None
    start = torch.randn(n, k, generator=g)
    out = start.clone().to(DEVICE)
    got = rademacher_project(
        G.to(DEVICE), A_NAME, 9, k, row_start=row_start, split_p=split_p,
        adam=None if moments is None else AdamMoments(*(m.to(DEVICE) for m in moments)), out=out,
    )
    assert got is out
    expected = project_param_ref(
        G.double(), A_NAME, 9, k, row_start=row_start,
        adam=None if moments is None else AdamMoments(*(m.double() for m in moments)),
    )
    assert rel_err(got.cpu() - start, expected) < 1e-5


def test_split_offsets_past_int32():
    """Row offsets ``split * rows_per_split`` are int64: a split starting past 2**31 reads no row.

    The kernel is launched directly with 300 rows and splits of 2**31 - 128
    rows: split 1 starts at 2**31 - 128, split 2 at 2**32 - 256 (in int32 that
    wraps to -256, and the split would re-read rows -256..299 of ``buf``).
    """
    import triton.language as tl

    from icons_fast.kernels.project import _adam_scalars, _project_kernel
    from icons_fast.kernels.rademacher import param_hash_i32

    k, n_rows = 40, 300
    buf = torch.randn(2, 256 + n_rows, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    G = buf[:, 256:]  # rows before G's first column exist: a wrapped offset reads them instead of crashing
    partial = torch.full((3, 2, k), float("nan"), device=DEVICE)
    _project_kernel[(2, 3, 1)](
        G, G, G, partial, 2, n_rows, k, 2**31 - 128, param_hash_i32(A_NAME, 9), 0, G.stride(0),
        *_adam_scalars(None), k**-0.5, ADAM=False, N_TERMS=2, MMA_DTYPE=tl.float16, BLOCK_B=16, BLOCK_P=32,
        BLOCK_K=32, CHUNK_P=64,
    )
    partial = partial.cpu()
    assert torch.equal(partial[1:], torch.zeros(2, 2, k))
    assert rel_err(partial[0], project_param_ref(G.cpu().double(), A_NAME, 9, k)) < 1e-5


@pytest.mark.parametrize("precision, tol", [("bf16", 3e-3), ("bf16x2", 1e-5), ("bf16x3", 1e-6)])
def test_project_precision_modes(precision, tol):
    G = torch.randn(4, 200, generator=torch.Generator().manual_seed(1))
    got = rademacher_project(G.to(DEVICE), B_NAME, 1, 45, precision=precision)
    assert rel_err(got, project_param_ref(G.double(), B_NAME, 1, 45)) < tol


def test_adam_ref_formula():
    g, m, v = torch.randn(3, 7).double(), torch.randn(7).double(), torch.rand(7).double()
    got = adam_precondition_ref(g, AdamMoments(m, v))
    m1 = 0.9 * m + 0.1 * g
    v1 = 0.999 * v + 0.001 * g**2
    assert torch.allclose(got, m1 / (v1 + 1e-8).sqrt(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("beta1, beta2", [(0.9, 0.999), (0.9, 0.9999)])
def test_adam_coefficients_within_fp32_rounding(beta1, beta2):
    """The kernel's and the fp32 reference's ``G'`` match float64 within fp32 rounding.

    ``1 - beta2`` formed in fp32 is 1.3e-5 relative off at 0.999 (1.5e-4 at
    0.9999), which moves ``G'`` by half that where ``(1-b2) g**2`` dominates
    the root (``v = 0`` below). One row, k = 1 and bf16x3 pieces (which hold
    an fp32 value exactly) make ``out[b] = sign * G'[b]``.
    """
    g = torch.cat([torch.logspace(-2, 2, 24), -torch.logspace(-2, 2, 24)])[:, None]  # [48, 1]
    sign = rademacher_signs_ref(A_NAME, 5, 0, 1, 1, dtype=torch.float64)[0, 0].item()
    for m, v in ((0.0, 0.0), (0.05, 0.3), (-0.2, 1e-6)):
        moments = AdamMoments(torch.tensor([m]), torch.tensor([v]), beta1=beta1, beta2=beta2)
        got = rademacher_project(g.to(DEVICE), A_NAME, 5, 1, adam=AdamMoments(
            *(x.to(DEVICE) for x in (moments.exp_avg, moments.exp_avg_sq)), beta1=beta1, beta2=beta2),
            precision="bf16x3").cpu().double()[:, 0] * sign
        g64, m64, v64 = g.double()[:, 0], float(torch.tensor(m)), float(torch.tensor(v))  # the fp32 inputs, exactly
        exact = (beta1 * m64 + (1 - beta1) * g64) / torch.sqrt(beta2 * v64 + (1 - beta2) * g64**2 + 1e-8)
        # fp32 rounding is relative to the terms' magnitudes (b1*m + (1-b1)*g may cancel)
        scale = (abs(beta1 * m64) + (1 - beta1) * g64.abs()) / torch.sqrt(beta2 * v64 + (1 - beta2) * g64**2 + 1e-8)
        ref32 = adam_precondition_ref(g, moments)[:, 0].double()
        for name, x in (("kernel", got), ("torch fp32 reference", ref32)):
            worst = ((x - exact).abs() / scale).max().item()
            assert worst < 1e-6, f"{name}: G' off by {worst:.2e} relative (m={m}, v={v})"


# ------------------------------------------------------ module, end to end
@pytest.mark.parametrize("use_adam", [False, True])
@pytest.mark.parametrize("shape", [(3, 5, 20, 12, 3, 37), (2, 1, 7, 9, 2, 70), (4, 6, 33, 17, 5, 64)])
def test_lora_grad_project_fp32(shape, use_adam):
    n, t, d_in, d_out, r, k = shape
    inputs, adam_A, adam_B = make_module_inputs(n, t, d_in, d_out, r)
    kw = dict(scale=1.7, a_name=A_NAME, b_name=B_NAME, seed=3, proj_dim=k)
    adam = dict(adam_A=adam_A, adam_B=adam_B) if use_adam else {}
    got = lora_fast(**inputs, **kw, **{a: tuple(x.to(DEVICE) for x in v) for a, v in adam.items()})
    assert got.shape == (n, k) and got.dtype == torch.float32 and torch.isfinite(got).all()
    ref = lora_ref(**to64(inputs), **kw, **{a: tuple(x.double() for x in v) for a, v in adam.items()})
    assert rel_err(got, ref) < 1e-4
    # accumulation: a second module's call adds into the same buffer
    twice = lora_fast(**inputs, **kw, **{a: tuple(x.to(DEVICE) for x in v) for a, v in adam.items()},
                              out=got.clone())
    assert rel_err(twice, 2 * ref) < 1e-4


def test_padding_does_not_leak():
    """A padded batch gives, sample by sample, what each sample alone gives."""
    inputs, adam_A, adam_B = make_module_inputs(3, 6, 11, 8, 2, seed=5)
    kw = dict(scale=2.0, a_name=A_NAME, b_name=B_NAME, seed=4, proj_dim=40)
    batched = lora_fast(**inputs, **kw)
    for b in range(3):
        n_tok = int(inputs["mask"][b].sum())
        alone = lora_fast(inputs["X"][b:b + 1, :n_tok], inputs["D"][b:b + 1, :n_tok], inputs["A"],
                                  inputs["B"], **kw)
        assert rel_err(batched[b:b + 1], alone) < 1e-5


def test_fast_grads_match_ref():
    inputs, _, _ = make_module_inputs(3, 5, 20, 12, 3, seed=2)
    gA, gB = lora_grads(**inputs, scale=0.5)
    rA, rB = lora_grads_ref(**to64(inputs), scale=0.5)
    assert gA.dtype == gB.dtype == torch.float32
    assert rel_err(gA, rA) < 1e-5 and rel_err(gB, rB) < 1e-5


def test_mixed_dtypes_compute_in_the_wider_one():
    """bf16 activations with fp32 output gradients (and fp32 LoRA weights) are accepted."""
    inputs, _, _ = make_module_inputs(2, 4, 9, 6, 2, seed=7)
    inputs["X"] = inputs["X"].bfloat16()
    kw = dict(scale=1.5, a_name=A_NAME, b_name=B_NAME, seed=2, proj_dim=40)
    got = lora_fast(**inputs, **kw)
    assert rel_err(got, lora_ref(**to64(inputs), **kw)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("use_adam", [False, True])
def test_lora_grad_project_low_precision(dtype, use_adam):
    """Error vs fp64 at most 2x that of the same computation done by torch in ``dtype``."""
    inputs, adam_A, adam_B = make_module_inputs(3, 7, 24, 14, 4, dtype=dtype, seed=11)
    kw = dict(scale=2.0, a_name=A_NAME, b_name=B_NAME, seed=8, proj_dim=70)
    adam = dict(adam_A=adam_A, adam_B=adam_B) if use_adam else {}
    got = lora_fast(**inputs, **kw, **{a: tuple(x.to(DEVICE) for x in v) for a, v in adam.items()})
    exact = lora_ref(**to64(inputs), **kw, **{a: tuple(x.double() for x in v) for a, v in adam.items()})
    torch_dtype = lora_ref(
        **{k: v.cpu() for k, v in inputs.items()}, **kw, **{a: tuple(x.to(dtype) for x in v) for a, v in adam.items()}
    )
    assert torch.isfinite(got).all()
    assert rel_err(got, exact) <= 2 * rel_err(torch_dtype, exact)


def test_input_errors_name_the_problem():
    inputs, _, _ = make_module_inputs()
    kw = dict(scale=1.0, a_name=A_NAME, b_name=B_NAME, seed=0, proj_dim=8)
    with pytest.raises(ValueError, match="LoRA shapes"):
        lora_fast(inputs["X"], inputs["D"], inputs["A"][:, 1:], inputs["B"], **kw)
    with pytest.raises(ValueError, match="mask"):
        lora_fast(**{**inputs, "mask": inputs["mask"][:, 1:]}, **kw)
    with pytest.raises(ValueError, match="out must be float32"):
        lora_fast(**inputs, **kw, out=torch.zeros(3, 9, device=DEVICE))


# ------------------------------------------------- the reference vs autograd
def test_reference_matches_peft_autograd():
    """Pin the formulas: PEFT LoRA on a tiny nn.Linear, per-sample grads by batch-of-one autograd."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    n, t, d_in, d_out, r, k = 3, 5, 10, 7, 3, 33

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(d_in, d_out)

        def forward(self, x):
            return self.proj(x)

    cfg = peft.LoraConfig(r=r, lora_alpha=5, target_modules=["proj"], lora_dropout=0.0)
    model = peft.get_peft_model(Tiny().double(), cfg).eval()
    lora = model.base_model.model.proj
    with torch.no_grad():  # PEFT starts B at zero, which would make grad_A vanish
        lora.lora_B["default"].weight.normal_()
    names = dict(model.named_parameters())
    a_name = next(nm for nm in names if "lora_A" in nm)
    b_name = next(nm for nm in names if "lora_B" in nm)
    scale = lora.scaling["default"]

    inputs, adam_A, adam_B = make_module_inputs(n, t, d_in, d_out, r, poison=False)
    X, mask = inputs["X"].double().cpu(), inputs["mask"].cpu()
    targets = torch.randn(n, t, d_out, dtype=torch.float64)

    def loss_fn(y, tgt):  # a non-linear per-token loss, summed over the sample's tokens
        return (torch.tanh(y) * tgt).sum() + 0.5 * (y**2).sum()

    # batched forward/backward, capturing the module's input and output gradient
    y = model(X)
    y.retain_grad()
    keep = (mask != 0)[:, :, None]
    torch.where(keep, torch.tanh(y) * targets + 0.5 * y**2, torch.zeros((), dtype=y.dtype)).sum().backward()
    D = y.grad.clone()
    Xp, Dp = X.clone(), D.clone()
    Xp[mask == 0] = float("nan")  # garbage in padded rows must not matter
    Dp[mask == 0] = 1e300

    # per-sample gradients: one autograd pass per sample on its own tokens
    A, B = names[a_name], names[b_name]
    feats = torch.zeros(n, k, dtype=torch.float64)
    for b in range(n):
        n_tok = int(mask[b].sum())
        gA, gB = torch.autograd.grad(loss_fn(model(X[b:b + 1, :n_tok]), targets[b:b + 1, :n_tok]), [A, B])
        rA, rB = lora_grads_ref(Xp[b:b + 1], Dp[b:b + 1], A.detach(), B.detach(), scale, mask[b:b + 1])
        assert torch.allclose(rA[0], gA, rtol=1e-10, atol=1e-12) and torch.allclose(rB[0], gB, rtol=1e-10, atol=1e-12)
        GA = adam_precondition_ref(gA.reshape(1, -1), AdamMoments(*(x.double() for x in adam_A)))
        GB = adam_precondition_ref(gB.reshape(1, -1), AdamMoments(*(x.double() for x in adam_B)))
        feats[b] = (GA @ rademacher_signs_ref(a_name, 6, 0, A.numel(), k, dtype=torch.float64)
                    + GB @ rademacher_signs_ref(b_name, 6, 0, B.numel(), k, dtype=torch.float64))[0]
    ref = lora_ref(
        Xp, Dp, A.detach(), B.detach(), scale, a_name, b_name, 6, k, mask=mask,
        adam_A=tuple(x.double() for x in adam_A), adam_B=tuple(x.double() for x in adam_B),
    )
    assert rel_err(ref, feats) < 1e-6  # ref returns float32


# ---------------------------------------------------------- realistic, GPU
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_grad_project_realistic_shape(dtype):
    """LLaVA-7B-like module (d=4096, r=128), k=5120, 16 samples, ragged lengths, Adam."""
    n, t, d, r, k = 16, 257, 4096, 128, 5120
    inputs, adam_A, adam_B = make_module_inputs(n, t, d, d, r, dtype=dtype, seed=3)
    kw = dict(scale=2.0, a_name=A_NAME, b_name=B_NAME, seed=1, proj_dim=k)
    adam = dict(adam_A=tuple(x.cuda() for x in adam_A), adam_B=tuple(x.cuda() for x in adam_B))
    got = lora_fast(**inputs, **kw, **adam)
    gA, gB = lora_grads(**inputs, scale=2.0)  # step 1 is cuBLAS; check the projection of exactly these
    ref = torch.zeros(n, k, dtype=torch.float64, device="cuda")
    for g, name, (m, v) in ((gA, A_NAME, adam["adam_A"]), (gB, B_NAME, adam["adam_B"])):
        G = adam_precondition_ref(g.reshape(n, -1).double(), AdamMoments(m.double(), v.double()))
        for r0 in range(0, G.shape[1], 65536):  # R in fp64 from the signs kernel (bit-identical, tested above)
            R = rademacher_signs(name, 1, r0, min(65536, G.shape[1] - r0), k, device="cuda", dtype=torch.float64)
            ref += G[:, r0:r0 + R.shape[0]] @ R
    assert rel_err(got, ref) < 1e-5


@pytest.mark.cuda
def test_signs_bit_identical_large():
    got = rademacher_signs(A_NAME, 42, 1_000_003, 777, 5120, device="cuda").cpu()
    assert torch.equal(got, rademacher_signs_ref(A_NAME, 42, 1_000_003, 777, 5120))
