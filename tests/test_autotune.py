"""Measured dispatch (icons_fast.ops.autotune, ops.backend.measured_backend): the choice rule, the on-disk cache
and its keys, forcing a backend, and "auto" of the influence, project and lora_grad ops.
Timings are injected (a fake clock or fixed medians), so nothing here depends on the machine's speed."""
import json

import pytest
import torch

from icons_fast.ops import autotune, backend
from icons_fast.ops import project as pr
from icons_fast.ops import segment_reduce as sr
from icons_fast.ops.backend import BackendUnavailable, has_cpu_ext, has_triton, requested_backend

needs_ext = pytest.mark.skipif(not has_cpu_ext(), reason="icons_fast._C is not built")


def fake_backends(costs: dict[str, float], calls: dict[str, int] | None = None):
    """A fake clock and candidates whose every call advances it by their cost (seconds)."""
    now = [0.0]

    def make(name):
        def run():
            if calls is not None:
                calls[name] = calls.get(name, 0) + 1
            now[0] += costs[name]
        return run

    return (lambda: now[0]), {name: make(name) for name in costs}


def test_choose_never_takes_a_backend_slower_than_the_reference():
    assert autotune.choose({"torch": 1.0, "cpp": 0.5, "blas": 0.7}) == "cpp"
    assert autotune.choose({"torch": 1.0, "cpp": 1.5, "blas": 1.2}) == "torch"
    assert autotune.choose({"torch": 1.0, "cpp": 1.0}) == "torch"  # a tie keeps the reference
    assert autotune.choose({"torch": 1.0}) == "torch"
    with pytest.raises(ValueError, match="reference"):
        autotune.choose({"cpp": 1.0})


def test_time_backends_takes_medians_and_drops_failing_backends():
    clock, cands = fake_backends({"torch": 0.3, "cpp": 0.1})

    def broken():
        raise RuntimeError("no kernel for this shape")

    cands["broken"] = broken
    med = autotune.time_backends(cands, rounds=3, clock=clock)
    assert med == pytest.approx({"torch": 0.3, "cpp": 0.1})


def test_pick_measures_once_then_reads_the_cache_file(autotune_cache):
    calls: dict[str, int] = {}
    clock, cands = fake_backends({"torch": 2.0, "cpp": 1.0, "blas": 0.5}, calls)
    assert autotune.pick("influence", "cpu", "f16 max k1024 M2048", cands, clock=clock) == "blas"
    assert calls == {"torch": 4, "cpp": 4, "blas": 4}  # 1 warm-up + 3 rounds each
    data = json.loads((autotune_cache / "autotune.json").read_text())
    (machine, entries), = data.items()
    assert machine == autotune.machine_key("cpu")
    entry = entries["influence | cpu | f16 max k1024 M2048"]
    assert entry["backend"] == "blas" and entry["median_s"] == pytest.approx({"torch": 2.0, "cpp": 1.0, "blas": 0.5})
    # a new process (forget the in-memory copy) reads the file and times nothing
    autotune.forget()
    calls.clear()
    assert autotune.pick("influence", "cpu", "f16 max k1024 M2048", cands, clock=clock) == "blas"
    assert calls == {}
    # another shape class is measured on its own
    assert autotune.pick("influence", "cpu", "f32 max k1024 M2048", cands, clock=clock) == "blas"
    assert calls["torch"] == 4


def test_machine_key_names_cpu_and_versions_and_a_new_machine_measures_again(autotune_cache, monkeypatch):
    key = autotune.machine_key("cpu")
    assert autotune.cpu_name() in key and f"torch {torch.__version__}" in key and "icons-fast" in key
    assert autotune.cpu_isa() in key
    assert f"extension {autotune._extension_build()}" in key  # a rebuilt extension measures again
    calls: dict[str, int] = {}
    clock, cands = fake_backends({"torch": 1.0, "cpp": 0.5}, calls)
    autotune.pick("influence", "cpu", "c", cands, clock=clock)
    monkeypatch.setattr(autotune, "machine_key", lambda device="cpu": "another CPU | no GPU | torch 0 | icons-fast 0")
    calls.clear()
    clock2, slow_cpp = fake_backends({"torch": 1.0, "cpp": 3.0}, calls)
    assert autotune.pick("influence", "cpu", "c", slow_cpp, clock=clock2) == "torch"
    assert calls  # measured again under the new machine key
    assert len(json.loads((autotune_cache / "autotune.json").read_text())) == 2


def test_stale_or_corrupt_cache_is_measured_again(autotune_cache):
    (autotune_cache / "autotune.json").write_text("{not json")
    calls: dict[str, int] = {}
    clock, cands = fake_backends({"torch": 1.0, "cpp": 0.5}, calls)
    assert autotune.pick("influence", "cpu", "c", cands, clock=clock) == "cpp"
    assert calls
    # the cached backend is no longer a candidate (e.g. the extension is gone): measure among the others
    autotune.forget()
    calls.clear()
    clock, only_torch = fake_backends({"torch": 1.0}, calls)
    assert autotune.pick("influence", "cpu", "c", only_torch, clock=clock) == "torch"
    assert calls == {"torch": 4}


def test_pow2_classes():
    assert [autotune.pow2_class(v) for v in (1, 2, 3, 1000, 1024, 1025)] == [1, 2, 4, 1024, 1024, 2048]


def test_forcing_per_op_then_global(monkeypatch):
    monkeypatch.delenv("ICONS_FAST_BACKEND_INFLUENCE", raising=False)
    monkeypatch.setenv("ICONS_FAST_BACKEND", "torch")
    assert requested_backend("influence", "auto", "cpu") == "torch"
    monkeypatch.setenv("ICONS_FAST_BACKEND_INFLUENCE", "cpp")
    assert requested_backend("influence", "auto", "cpu") == "cpp"  # the op's own variable wins
    assert requested_backend("influence", "blas", "cpu") == "blas"  # an explicit argument wins over both
    assert requested_backend("project", None, "cpu") == "torch"  # other ops follow the global one
    monkeypatch.setenv("ICONS_FAST_BACKEND", "triton")  # not an influence backend on the CPU: auto for it
    monkeypatch.delenv("ICONS_FAST_BACKEND_INFLUENCE")
    assert requested_backend("influence", "auto", "cpu") == "auto"


def _inputs(n=64, k=32, sizes=(5, 11)):
    g = torch.Generator().manual_seed(0)
    train = torch.randn(n, k, generator=g).half()
    targets = torch.randn(sum(sizes), k, generator=g)
    return train, targets, sr.offsets_from_sizes(list(sizes))


@needs_ext
def test_forced_backend_skips_the_measurement(autotune_cache, monkeypatch):
    monkeypatch.setattr(autotune, "MIN_FLOPS", 0.0)
    monkeypatch.setattr(autotune, "pick", lambda *a, **k: pytest.fail("a forced backend must not be timed"))
    train, targets, offsets = _inputs()
    monkeypatch.setenv("ICONS_FAST_BACKEND_INFLUENCE", "cpp")
    assert sr.choose_backend(train, targets, offsets, "max") == "cpp"
    monkeypatch.setenv("ICONS_FAST_BACKEND_INFLUENCE", "cuda")
    with pytest.raises(BackendUnavailable, match="CUDA"):
        sr.segment_reduce(train, targets, offsets, "max")


@needs_ext
@pytest.mark.parametrize("fastest", ["cpp", "blas", "torch"])
def test_auto_runs_the_measured_fastest_and_stays_correct(autotune_cache, monkeypatch, fastest):
    """segment_reduce(auto) times its candidates (here: injected medians) and runs the fastest, results unchanged."""
    monkeypatch.setattr(autotune, "MIN_FLOPS", 0.0)
    medians = {"torch": 1.0, "cpp": 1.5, "blas": 1.2, "blas-bf16": 3.0}
    medians[fastest] = 0.1
    seen = {}

    def fake_time(candidates, rounds=3, clock=None):
        seen["names"] = sorted(candidates)
        for fn in candidates.values():
            fn()  # the candidates really run on the sample
        return {name: medians[name] for name in candidates}

    monkeypatch.setattr(autotune, "time_backends", fake_time)
    train, targets, offsets = _inputs()
    assert sr.choose_backend(train, targets, offsets, "max") == fastest
    assert seen["names"] == ["blas", "blas-bf16", "cpp", "torch"]  # bf16 is a candidate for fp16 max
    got = sr.segment_reduce(train, targets, offsets, "max")
    want = sr.segment_reduce_ref(train, targets, offsets, "max")
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    # count is outside the bf16 budget: not a candidate
    sr.choose_backend(train, targets, offsets, "count", threshold=0.0)
    assert seen["names"] == ["blas", "cpp", "torch"]


@needs_ext
def test_auto_does_not_time_small_calls(autotune_cache, monkeypatch):
    monkeypatch.setattr(autotune, "pick", lambda *a, **k: pytest.fail("too little work to be worth timing"))
    train, targets, offsets = _inputs()
    assert sr.choose_backend(train, targets, offsets, "mean") == "blas"  # the preference order's first


def test_one_log_line_per_choice(autotune_cache, caplog):
    clock, cands = fake_backends({"torch": 1.0, "cpp": 0.5})
    with caplog.at_level("INFO", logger="icons_fast.ops.autotune"):
        for _ in range(3):
            autotune.pick("influence", "cpu", "c", cands, clock=clock)
        autotune.forget()
        autotune.pick("influence", "cpu", "c", cands, clock=clock)  # read back from the file: already said
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "'cpp'" in lines[0] and "cpp 500.0 ms" in lines[0] and "torch 1000.0 ms" in lines[0]


# ---------------------------------------------------------------- project and lora_grad
def _spy(monkeypatch, op: str, names, out: torch.Tensor, writes: list):
    """Record which backends of ``op`` write into ``out`` (the caller's output, not a scratch one)."""
    for name in names:
        impl = backend._IMPLS[(op, name)]

        def spy(*args, _impl=impl, _name=name, **kw):
            if any(a is out for a in (*args, *kw.values())):
                writes.append(_name)
            return _impl(*args, **kw)

        monkeypatch.setitem(backend._IMPLS, (op, name), spy)


def _grads(b=3, n=300, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, generator=g)


@needs_ext
@pytest.mark.parametrize("fastest", ["cpp", "torch"])
def test_project_auto_runs_the_measured_fastest_once_and_caches_it(autotune_cache, fixed_timings, monkeypatch, fastest):
    from icons_fast.ops.project import project_param

    monkeypatch.setattr(autotune, "MIN_FLOPS", 0.0)
    monkeypatch.setattr(pr, "TUNE_ELEMENTS", 128)  # the sample is g[:, :128]
    medians = {"cpp": 2.0, "torch": 1.5}
    medians[fastest] = 0.5
    seen = fixed_timings(medians)
    g = _grads()
    out = torch.ones(3, 64)
    writes: list = []
    _spy(monkeypatch, "project", ["cpp", "torch"], out, writes)
    project_param(g, "w", 7, 64, out)
    assert seen == [["cpp", "torch"]]  # both timed (never the Triton interpreter, even with TRITON_INTERPRET=1)
    assert writes == [fastest]  # the real output: written once, by the chosen backend
    want = project_param(g, "w", 7, 64, torch.ones(3, 64), backend=fastest)
    assert torch.equal(out, want)  # bit-identical to naming the backend
    entry, = json.loads((autotune_cache / "autotune.json").read_text())[autotune.machine_key("cpu")].items()
    assert entry[0] == f"project | cpu | {pr.shape_class(g, 64, None)}" and entry[1]["backend"] == fastest
    assert "n128" in entry[0]
    # cached: the next call (and the next process) times nothing
    monkeypatch.setattr(autotune, "time_backends", lambda *a, **k: pytest.fail("a cached choice must not be timed"))
    autotune.forget()
    writes.clear()
    project_param(g, "w", 7, 64, out)
    assert writes == [fastest]


@needs_ext
def test_project_forced_or_small_calls_are_not_timed(autotune_cache, monkeypatch):
    from icons_fast.ops.project import project_param

    monkeypatch.setattr(autotune, "pick", lambda *a, **k: pytest.fail("must not be timed"))
    g = _grads()
    # below MIN_FLOPS: the preference order's first, untimed
    assert torch.equal(project_param(g, "w", 7, 64, torch.zeros(3, 64)),
                       project_param(g, "w", 7, 64, torch.zeros(3, 64), backend="cpp"))
    monkeypatch.setattr(autotune, "MIN_FLOPS", 0.0)
    writes: list = []
    out = torch.zeros(3, 64)
    _spy(monkeypatch, "project", ["cpp", "torch"], out, writes)
    project_param(g, "w", 7, 64, out, backend="torch")  # explicit
    monkeypatch.setenv("ICONS_FAST_BACKEND_PROJECT", "cpp")  # the op's variable
    project_param(g, "w", 7, 64, out)
    monkeypatch.setenv("ICONS_FAST_BACKEND_PROJECT", "")
    monkeypatch.setenv("ICONS_FAST_BACKEND", "torch")  # the global one
    project_param(g, "w", 7, 64, out)
    assert writes == ["torch", "cpp", "torch"]


def test_auto_never_takes_the_triton_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for op in backend.OPS:
        assert "triton" not in backend.auto_candidates(op, "cpu")


def _lora_inputs(n=3, t=5, d_in=16, d_out=12, r=4):
    from icons_fast.ops.lora_grad import LoraParams

    g = torch.Generator().manual_seed(2)
    X, D = torch.randn(n, t, d_in, generator=g), torch.randn(n, t, d_out, generator=g)
    mask = torch.ones(n, t, dtype=torch.int64)
    mask[1, 3:] = 0
    site = LoraParams(torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g), 2.0, "s.A", "s.B")
    return X, D, mask, site


@pytest.mark.skipif(not has_triton(), reason="triton is not installed")
@pytest.mark.parametrize("fastest", ["triton", "torch"])
def test_lora_grad_auto_runs_the_measured_fastest(autotune_cache, fixed_timings, monkeypatch, fastest):
    """The CPU has one lora_grad backend; a second one (Triton, interpreted) is let in here to have a choice."""
    from icons_fast.contract import ProjectionSpec
    from icons_fast.ops.lora_grad import TUNE_SAMPLES, lora_grad_project

    monkeypatch.setitem(backend._PREFERENCE, ("lora_grad", "cpu"), ("triton", "torch"))
    monkeypatch.setattr(autotune, "MIN_FLOPS", 0.0)  # the torch backend's own project calls are measured too
    medians = {"triton": 2.0, "torch": 1.5, "cpp": 1.0}
    medians[fastest] = 0.5
    seen = fixed_timings(medians)
    X, D, mask, site = _lora_inputs()
    spec = ProjectionSpec(seed=3, proj_dim=32)
    out = torch.ones(3, 32)
    writes: list = []
    _spy(monkeypatch, "lora_grad", ["triton", "torch"], out, writes)
    lora_grad_project(X, D, site, spec, mask, out=out)
    assert ["torch", "triton"] in seen  # (a nested measurement of the project op may come first)
    assert writes == [fastest]
    want = lora_grad_project(X, D, site, spec, mask, out=torch.ones(3, 32), backend=fastest)
    assert torch.equal(out, want)
    data = json.loads((autotune_cache / "autotune.json").read_text())[autotune.machine_key("cpu")]
    key = [e for e in data if e.startswith("lora_grad")]
    assert key == [f"lora_grad | cpu | float32/float32 B{autotune.pow2_class(min(3, TUNE_SAMPLES))} T8 d16x16 r4 k32"]
    # the env variable and an explicit backend skip the timing (the project op's choice is cached by now)
    monkeypatch.setattr(autotune, "time_backends", lambda *a, **k: pytest.fail("must not be timed"))
    monkeypatch.setenv("ICONS_FAST_BACKEND_LORA_GRAD", "torch")
    writes.clear()
    lora_grad_project(X, D, site, spec, mask, out=out)
    lora_grad_project(X, D, site, spec, mask, out=out, backend="triton")
    assert writes == ["torch", "triton"]


@pytest.mark.cuda
def test_auto_on_cuda_measures_and_matches_the_named_backend(autotune_cache):
    """On a GPU: project (triton vs torch), lora_grad and influence (cuda vs torch) are measured with a real clock;
    every result equals the chosen backend's own (no assertion on which one wins)."""
    from icons_fast.contract import ProjectionSpec
    from icons_fast.ops.lora_grad import lora_grad_project
    from icons_fast.ops.project import project_param

    dev = torch.device("cuda")
    g = torch.randn(16, 1 << 16, device=dev)
    out = project_param(g, "w", 1, 4096, torch.zeros(16, 4096, device=dev))
    data = json.loads((autotune_cache / "autotune.json").read_text())[autotune.machine_key(dev)]
    (entry, got), = [(e, v) for e, v in data.items() if e.startswith("project | cuda")]
    assert sorted(got["median_s"]) == ["torch", "triton"]
    assert torch.equal(out, project_param(g, "w", 1, 4096, torch.zeros(16, 4096, device=dev), backend=got["backend"]))

    X, D, mask, site = _lora_inputs(n=16, t=256, d_in=1024, d_out=1024, r=16)
    X, D, mask = X.to(dev).half(), D.to(dev).half(), mask.to(dev)
    site = type(site)(site.A.to(dev), site.B.to(dev), site.scale, site.a_name, site.b_name)
    spec = ProjectionSpec(seed=3, proj_dim=4096)
    got_l = lora_grad_project(X, D, site, spec, mask)
    data = json.loads((autotune_cache / "autotune.json").read_text())[autotune.machine_key(dev)]
    (choice,) = [v["backend"] for e, v in data.items() if e.startswith("lora_grad | cuda")]
    assert torch.equal(got_l, lora_grad_project(X, D, site, spec, mask, backend=choice))

    train = torch.randn(8192, 1024, device=dev).half()
    targets = torch.randn(2048, 1024, device=dev)
    offsets = sr.offsets_from_sizes([1024, 1024])
    got_i = sr.segment_reduce(train, targets, offsets, "max")
    data = json.loads((autotune_cache / "autotune.json").read_text())[autotune.machine_key(dev)]
    (choice,) = [v["backend"] for e, v in data.items() if e.startswith("influence | cuda")]
    assert torch.equal(got_i, sr.segment_reduce(train, targets, offsets, "max", backend=choice))
    # top-m past the CUDA kernel's limit: torch, untimed
    assert sr.choose_backend(train, targets, offsets, "topm", m=sr.CUDA_MAX_TOPM + 1) == "torch"


@needs_ext
def test_project_auto_times_adam_on_the_sliced_moments(autotune_cache, fixed_timings, monkeypatch):
    from icons_fast.contract import AdamMoments
    from icons_fast.ops.project import project_param

    monkeypatch.setattr(autotune, "MIN_FLOPS", 0.0)
    monkeypatch.setattr(pr, "TUNE_ELEMENTS", 64)
    seen = fixed_timings({"cpp": 1.0, "torch": 0.5})
    g = _grads(n=200)
    gen = torch.Generator().manual_seed(4)
    adam = AdamMoments(torch.randn(10, 20, generator=gen), torch.rand(10, 20, generator=gen))
    out = project_param(g, "w", 7, 32, torch.zeros(3, 32), adam=adam)
    assert seen == [["cpp", "torch"]]
    assert torch.equal(out, project_param(g, "w", 7, 32, torch.zeros(3, 32), adam=adam, backend="torch"))
    entries = json.loads((autotune_cache / "autotune.json").read_text())[autotune.machine_key("cpu")]
    assert list(entries) == ["project | cpu | float32 B4 n64 k32 adam"]


def test_a_backend_the_op_does_not_have_is_refused_by_name():
    """lora_grad has no cpp kernel: forcing it names the op's backends instead of failing later in the registry."""
    from icons_fast.ops.backend import BackendUnavailable, resolve_backend

    with pytest.raises(BackendUnavailable, match=r"op 'lora_grad' has no backend 'cpp'; its backends: \['triton', 'torch'\]"):
        resolve_backend("lora_grad", "cpp", "cpu")
    assert resolve_backend("lora_grad", "torch", "cpu") == "torch"
