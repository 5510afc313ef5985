"""Projection: C++/torch sign tiles vs the contract, projector vs float64 brute force, JL property."""
import math

import pytest
import torch

from icons_fast import contract as rad
from icons_fast.features.projection import RademacherProjector, effective_seed, project_ref
from icons_fast.ops import backend as backend_mod
from icons_fast.ops.backend import BackendUnavailable, has_cpu_ext
from icons_fast.ops.project import project_param, signs_tile

needs_cpp = pytest.mark.skipif(not has_cpu_ext(), reason="icons_fast._C is not built")
CPU_BACKENDS = ["torch", pytest.param("cpp", marks=needs_cpp)]

# (name, seed, row_start, n_rows, k): odd k, a row range crossing 2**32, rows past 2**40, seed past 2**32.
TILE_CASES = [
    ("base_model.model.layers.0.self_attn.q_proj.lora_A.weight", 0, 0, 37, 1),
    ("lora_B", 7, 100, 50, 31),
    ("x", 2**33 + 5, 2**32 - 3, 9, 33),
    ("", 1, 5, 40, 100),
    ("mlp.up_proj.lora_A", 123456789, 2**40 + 11, 4, 70),
    ("é-unicode", 3, 17, 19, 64),
]


def bits(t):
    return t.contiguous().view(torch.int32)


def sign_scalar(name: str, seed: int, i: int, j: int) -> int:
    """The contract written out with Python ints, one entry at a time (independent of the torch code)."""

    def fmix(h):
        h ^= h >> 16
        h = (h * 0x85EBCA6B) & 0xFFFFFFFF
        h ^= h >> 13
        h = (h * 0xC2B2AE35) & 0xFFFFFFFF
        return h ^ (h >> 16)

    pid = 0x811C9DC5
    for byte in name.encode():
        pid = ((pid ^ byte) * 0x01000193) & 0xFFFFFFFF
    h = fmix((seed % 2**32) ^ pid)
    if i >> 32:
        h = fmix(h ^ (i >> 32))
    h = fmix(fmix(h ^ (i & 0xFFFFFFFF)) ^ (j // 32))
    return -1 if (h >> (j % 32)) & 1 else 1


# ------------------------------------------------------------------ signs


@needs_cpp
@pytest.mark.parametrize("name,seed,row_start,n_rows,k", TILE_CASES)
def test_cpp_and_torch_tiles_bit_identical_to_ref(name, seed, row_start, n_rows, k):
    ref = rad.rademacher_signs_ref(name, seed, row_start, n_rows, k)
    assert torch.equal(bits(signs_tile(name, seed, row_start, n_rows, k, backend="cpp")), bits(ref))
    pid = rad.fnv1a32(name)
    assert torch.equal(bits(signs_tile(pid, seed % 2**32, row_start, n_rows, k, backend="torch")), bits(ref))
    assert torch.equal(bits(signs_tile(pid, seed, row_start, n_rows, k, backend="torch")), bits(ref))


@needs_cpp
def test_tile_entries_match_scalar_definition():
    for name, seed, row_start, n_rows, k in TILE_CASES:
        tile = signs_tile(name, seed, row_start, n_rows, k, backend="cpp")
        for r, j in [(0, 0), (n_rows - 1, k - 1), (n_rows // 2, k // 2)]:
            want = sign_scalar(name, seed, row_start + r, j) / math.sqrt(k)
            assert tile[r, j].item() == pytest.approx(want, rel=1e-7)


@needs_cpp
def test_cpp_words_and_fnv_match_ref():
    ext = backend_mod.cpu_ext()
    for name, seed, row_start, n_rows, k in TILE_CASES:
        pid = rad.fnv1a32(name)
        assert ext.fnv1a32(name) == pid
        w = (k + 31) // 32
        buf = torch.full((n_rows, w), -7, dtype=torch.int32)  # poisoned
        ext.rademacher_words(buf.data_ptr(), pid, seed % 2**32, row_start, n_rows, k)
        ref = rad.rademacher_words_ref(pid, seed, row_start, n_rows, k)
        assert torch.equal(buf.to(torch.int64) & rad.MASK32, ref)


def test_golden_words():
    # These values pin the projection contract: computed once from rademacher_words_ref and
    # written here. They must never change; a change means every stored feature is invalid.
    name = "base_model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert rad.fnv1a32(name) == 3584003988
    assert rad.fnv1a32("") == 2166136261
    assert rad.rademacher_words_ref(3584003988, 0, 0, 2, 64).tolist() == [
        [1637393023, 3347725000],
        [2843588240, 1730725708],
    ]
    pid_b = rad.fnv1a32("lora_B")
    assert rad.rademacher_words_ref(pid_b, 12345, 2**32 + 7, 2, 40).tolist() == [
        [736318888, 2348362199],
        [1673359648, 3824663787],
    ]
    assert rad.rademacher_words_ref(2166136261, 2**32 - 1, 123456, 1, 33).tolist() == [[3950940352, 2324109420]]
    # The same words drive the C++ and torch tiles: sign of (row 1, col 35) is bit 3 of word 1.
    expect = -1 if (1730725708 >> 3) & 1 else 1
    for backend in ["torch"] + (["cpp"] if has_cpu_ext() else []):
        tile = signs_tile(name, 0, 0, 2, 64, backend=backend)
        assert tile[1, 35].item() == pytest.approx(expect / 8.0, rel=0, abs=0)


def golden_grads():
    x = torch.arange(2 * 60, dtype=torch.float64).reshape(2, 60)
    return {"a": torch.sin(x[:, :25] * 0.7 + 0.1), "b.weight": torch.cos(x[:, 25:] * 1.3)}


# Pinned projected values (contract): project_ref(golden_grads(), k=5, seed=42), computed once.
GOLDEN_PROJECTION = [
    [-1.6317798222878692, -0.3669297940118622, -3.9595075433393463, -0.7866872443361764, 0.3236423371337962],
    [3.818273767395844, 0.10421315728846414, 0.40377478422046376, -1.3635659059515146, 0.6420227697659229],
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_golden_projection(backend):
    want = torch.tensor(GOLDEN_PROJECTION, dtype=torch.float64)
    assert torch.allclose(project_ref(golden_grads(), 5, seed=42), want, rtol=1e-12, atol=1e-12)
    g = {n: t.float() for n, t in golden_grads().items()}
    got = RademacherProjector(60, 5, seed=42, backend=backend).project(g)
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5)


@needs_cpp
def test_tiles_compose_across_offsets():
    k, n = 45, 61
    whole = signs_tile("p", 9, 1000, n, k, backend="cpp")
    parts = [signs_tile("p", 9, 1000 + r0, min(13, n - r0), k, backend="cpp") for r0 in range(0, n, 13)]
    assert torch.equal(bits(torch.cat(parts)), bits(whole))
    # In-place fill of a wider, poisoned buffer touches only its first k columns.
    buf = torch.full((n, k + 3), float("nan"))
    signs_tile("p", 9, 1000, n, k, backend="cpp", out=buf)
    assert torch.equal(bits(buf[:, :k]), bits(whole)) and torch.isnan(buf[:, k:]).all()


# ------------------------------------------------------------------ projection


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


METHODS = [("torch", "auto"), pytest.param("cpp", "fused", marks=needs_cpp), pytest.param("cpp", "tile", marks=needs_cpp)]


@pytest.mark.parametrize("backend,method", METHODS)
@pytest.mark.parametrize("B,n,k", [(1, 1000, 33), (5, 1003, 1), (33, 517, 100), (16, 2049, 64)])
def test_project_param_matches_float64(backend, method, B, n, k):
    gen = torch.Generator().manual_seed(B * 1000 + n + k)
    g = torch.randn(B, n, generator=gen)
    want = project_ref({"w": g}, k, seed=5)
    out = torch.full((B, k), 0.25)  # accumulates into existing values
    project_param(g, "w", 5, k, out, backend=backend, method=method, tile_rows=300)
    assert rel_err(out - 0.25, want) < 1e-5


@pytest.mark.parametrize("backend,method", METHODS)
def test_project_param_row_slices_add_up(backend, method):
    g = torch.randn(3, 901, generator=torch.Generator().manual_seed(1))
    whole = torch.zeros(3, 77)
    project_param(g, "w", 2, 77, whole, backend=backend, method=method)
    sliced = torch.zeros(3, 77)
    project_param(g[:, :400], "w", 2, 77, sliced, backend=backend, method=method, row_start=0)
    project_param(g[:, 400:], "w", 2, 77, sliced, backend=backend, method=method, row_start=400)
    assert rel_err(sliced, whole) < 1e-6


def rand_grads(B, shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(B, *s, generator=gen) for n, s in shapes.items()}


SHAPES = {"l0.lora_A": (4, 37), "l0.lora_B": (29, 4), "l1.lora_A": (3, 21)}
P = sum(math.prod(s) for s in SHAPES.values())


@needs_cpp
def test_cpp_and_torch_backends_agree():
    g = rand_grads(6, SHAPES, seed=3)
    a = RademacherProjector(P, 257, seed=11, backend="cpp").project(g)
    b = RademacherProjector(P, 257, seed=11, backend="torch").project(g)
    want = project_ref(g, 257, seed=11)
    assert rel_err(a, b) < 1e-5
    assert rel_err(a, want) < 1e-5 and rel_err(b, want) < 1e-5


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_deterministic_across_calls_batches_and_blocks(backend):
    g = rand_grads(9, SHAPES, seed=4)
    proj = RademacherProjector(P, 100, seed=1, backend=backend)
    first = proj.project(g)
    assert torch.equal(first, proj.project(g))
    one_by_one = torch.cat([proj.project({n: t[i : i + 1] for n, t in g.items()}) for i in range(9)])
    if backend == "cpp":  # the fused kernel's lanes are independent: bit-identical per sample
        assert torch.equal(one_by_one, first)
    assert rel_err(one_by_one, first) < 1e-6
    for rows in (1, 7, 64):
        blocked = RademacherProjector(P, 100, seed=1, backend=backend, block_rows=rows).project(g)
        assert rel_err(blocked, first) < 1e-5


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dict_and_flat_agree(backend):
    g = rand_grads(4, SHAPES, seed=5)
    flat = torch.cat([t.reshape(4, -1) for t in g.values()], dim=1)
    shapes = {n: s for n, s in SHAPES.items()}
    a = RademacherProjector(P, 50, seed=2, backend=backend, param_shapes=shapes).project(flat)
    b = RademacherProjector(P, 50, seed=2, backend=backend).project(g)
    assert rel_err(a, b) < 1e-6
    # Without param_shapes the flat vector is one parameter named "".
    c = RademacherProjector(P, 50, seed=2, backend=backend).project(flat)
    assert rel_err(c, project_ref({"": flat}, 50, seed=2)) < 1e-5


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_adding_a_parameter_keeps_the_others(backend):
    g = rand_grads(3, SHAPES, seed=6)
    extra = {"l2.lora_A": torch.randn(3, 5, 11, generator=torch.Generator().manual_seed(9))}
    base = RademacherProjector(P, 64, seed=3, backend=backend).project(g)
    alone = RademacherProjector(55, 64, seed=3, backend=backend).project(extra)
    both = RademacherProjector(P + 55, 64, seed=3, backend=backend).project({**g, **extra})
    assert rel_err(both - alone, base) < 1e-5


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_jl_inner_products_preserved(backend):
    # Unit vectors x, y: <Rx, Ry> - <x, y> has mean 0 and std about sqrt((1 + <x,y>^2) / k).
    # Bound for every one of the m pairs at once (union bound, failure prob delta = 1e-6):
    # |err| <= 1.5 * sqrt(2 * log(2 m / delta) / k): the Gaussian tail radius for variance 1/k,
    # with 1.5x slack for the heavier (sub-exponential) tail and the variance factor 1 + <x,y>^2.
    k, n_vec, dim = 512, 20, 3001
    x = torch.randn(n_vec, dim, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    x[1::2] += 0.5 * x[0::2]  # some correlated pairs
    x = x / x.norm(dim=1, keepdim=True)
    f = RademacherProjector(dim, k, seed=13, backend=backend).project(x.float()).double()
    err = f @ f.T - x @ x.T  # diagonal: squared-norm errors
    m = n_vec * (n_vec + 1) // 2
    bound = 1.5 * math.sqrt(2 * math.log(2 * m / 1e-6) / k)
    assert err.abs().max().item() < bound
    # The errors are not only small but the right size: a scale or correlation bug moves this ratio.
    iu = torch.triu_indices(n_vec, n_vec, 1)
    expect = ((1 + (x @ x.T)[iu[0], iu[1]] ** 2) / k).mean().sqrt()
    ratio = err[iu[0], iu[1]].pow(2).mean().sqrt() / expect
    assert 0.6 < ratio.item() < 1.5
    assert abs(err.diagonal().mean().item()) < 4 * math.sqrt(2 / k / n_vec)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs(backend, dtype):
    g = rand_grads(5, SHAPES, seed=8)
    proj = RademacherProjector(P, 96, seed=4, backend=backend)
    low = {n: t.to(dtype) for n, t in g.items()}
    got = proj.project(low)
    assert got.dtype == torch.float32
    # Same input values in fp32: only the accumulation differs (fp32 in both).
    assert rel_err(got, proj.project({n: t.float() for n, t in low.items()})) < 1e-6
    # Against the unrounded fp32 gradients: the input rounding of the dtype.
    assert rel_err(got, proj.project(g)) < (2e-3 if dtype == torch.float16 else 1.6e-2)
    out_low = RademacherProjector(P, 96, seed=4, backend=backend, dtype=dtype).project(g)
    assert out_low.dtype == dtype and rel_err(out_low, proj.project(g)) < 1e-2


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_model_id_shifts_the_seed(backend):
    g = rand_grads(2, SHAPES, seed=10)
    a = RademacherProjector(P, 40, seed=5, backend=backend).project(g, model_id=3)
    b = RademacherProjector(P, 40, seed=5 + 30_000, backend=backend).project(g)
    assert torch.equal(a, b)
    assert effective_seed(2**32 - 1, 1) == 9_999
    c = RademacherProjector(P, 40, seed=5, backend=backend).project(g)
    assert rel_err(a, c) > 0.1


# ------------------------------------------------------------------ errors


def test_explicit_cpp_without_extension_raises(monkeypatch):
    monkeypatch.setattr(backend_mod, "_cpu_ext", lambda: (None, "icons_fast._C is not built (test)"))
    with pytest.raises(BackendUnavailable, match="not built"):
        RademacherProjector(10, 4, backend="cpp")
    with pytest.raises(BackendUnavailable):
        signs_tile("p", 0, 0, 3, 4, backend="cpp")
    with pytest.raises(BackendUnavailable):
        project_param(torch.randn(2, 10), "p", 0, 4, torch.zeros(2, 4), backend="cpp")
    # "auto" falls back to torch quietly and still computes the contract.
    proj = RademacherProjector(10, 4, backend="auto")
    assert proj.backend == "auto" and proj.backends_ran == {}
    g = torch.randn(2, 10)
    assert rel_err(proj.project(g), project_ref(g, 4, 0)) < 1e-5
    assert proj.backends_ran == {"project": ["torch"]} and proj.describe_backend() == "auto (ran: project torch)"


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="proj_dim"):
        RademacherProjector(10, 0)
    with pytest.raises(ValueError, match="proj_type"):
        RademacherProjector(10, 4, proj_type="normal")
    with pytest.raises(ValueError, match="grad_dim"):
        RademacherProjector(10, 4, param_shapes={"a": 3, "b": (2, 2)})
    proj = RademacherProjector(10, 4, backend="torch")
    with pytest.raises(ValueError, match="grad_dim=10"):
        proj.project(torch.randn(2, 11))
    with pytest.raises(ValueError, match="grad_dim=10"):
        proj.project({"a": torch.randn(2, 3), "b": torch.randn(2, 2, 3)})
    with pytest.raises(ValueError, match="batch"):
        proj.project({"a": torch.randn(2, 4), "b": torch.randn(3, 6)})
    with pytest.raises(ValueError, match="Tensor"):
        proj.project(torch.randn(10))
    named = RademacherProjector(10, 4, backend="torch", param_shapes={"a": 4, "b": 6})
    with pytest.raises(ValueError, match="missing"):
        named.project({"a": torch.randn(2, 4), "c": torch.randn(2, 6)})
    with pytest.raises(ValueError, match="out must be float32"):
        project_param(torch.randn(2, 10), "p", 0, 4, torch.zeros(2, 4, dtype=torch.float64), backend="torch")
    with pytest.raises(ValueError, match="Tensor\\[B, n\\]"):
        project_param(torch.randn(2, 5, 2), "p", 0, 4, torch.zeros(2, 4), backend="torch")
    with pytest.raises(ValueError, match="k must be >= 1"):
        signs_tile("p", 0, 0, 3, 0, backend="torch")


@needs_cpp
def test_native_boundary_checks():
    with pytest.raises(ValueError, match="unit column stride"):
        project_param(torch.randn(2, 10), "p", 0, 4, torch.zeros(4, 2).T, backend="cpp")
    with pytest.raises(ValueError, match="CPU"):
        signs_tile("p", 0, 0, 3, 4, backend="cpp", out=torch.empty(3, 4, device="meta"))
    # A transposed (column-strided) gradient is copied, not misread.
    g = torch.randn(12, 3).T
    out = torch.zeros(3, 8)
    project_param(g, "p", 1, 8, out, backend="cpp")
    assert rel_err(out, project_ref({"p": g.contiguous()}, 8, 1)) < 1e-5


@pytest.mark.cuda
def test_cuda_matches_cpu():
    g = rand_grads(4, SHAPES, seed=12)
    cpu = RademacherProjector(P, 300, seed=6, backend="torch").project(g)
    gpu = RademacherProjector(P, 300, seed=6, device="cuda").project({n: t.cuda() for n, t in g.items()})
    assert gpu.device.type == "cuda" and rel_err(gpu.cpu(), cpu) < 1e-5


def test_triton_backend_of_project_param_matches_torch():
    """The "triton" project backend (interpreted on the CPU) agrees with the torch reference."""
    pytest.importorskip("triton")
    from icons_fast.ops.project import project_param

    g = torch.randn(3, 70, generator=torch.Generator().manual_seed(4))
    ref = project_param(g, 12345, 9, 37, out=torch.zeros(3, 37), backend="torch")
    tri = project_param(g, 12345, 9, 37, out=torch.zeros(3, 37), backend="triton")
    torch.testing.assert_close(tri, ref, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ "auto" passed on


@needs_cpp
@pytest.mark.parametrize("fastest", ["cpp", "torch"])
def test_auto_is_measured_per_shape_class_and_named(tmp_path, monkeypatch, fastest):
    """"auto" reaches every project call: one timing per shape class, the forced backend's features, what ran named."""
    from icons_fast.ops import autotune

    monkeypatch.setenv("ICONS_FAST_CACHE", str(tmp_path))
    for var in ("ICONS_FAST_BACKEND", backend_mod.env_var("project")):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(autotune, "MIN_FLOPS", 0.0)
    autotune.forget()
    timed: list = []

    def fake_time(candidates, rounds=3, clock=None):
        timed.append(sorted(candidates))
        return {name: 0.5 if name == fastest else 1.0 for name in candidates}

    monkeypatch.setattr(autotune, "time_backends", fake_time)
    shapes = {"a": 300, "b": (7, 9)}
    gen = torch.Generator().manual_seed(8)
    g = {"a": torch.randn(3, 300, generator=gen), "b": torch.randn(3, 7, 9, generator=gen)}
    proj = RademacherProjector(363, 40, seed=6, param_shapes=shapes)
    assert proj.backend == "auto" and not timed
    got = proj.project(g)
    assert timed == [["cpp", "torch"]] * 2  # two shape classes: n up to 512 and up to 64
    assert proj.backends_ran == {"project": [fastest]} and proj.describe_backend() == f"auto (ran: project {fastest})"
    proj.project(g)
    assert len(timed) == 2  # cached per shape class
    for forced in ("cpp", "torch"):
        ref = RademacherProjector(363, 40, seed=6, param_shapes=shapes, backend=forced)
        assert ref.backend == forced
        want = ref.project(g)
        assert ref.describe_backend() == forced
        if forced == fastest:
            assert torch.equal(got, want)  # the same backend: the same bits
        assert rel_err(got, want) < 1e-5  # what test_cpp_and_torch_backends_agree allows between backends
    autotune.forget()
