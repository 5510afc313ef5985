"""Triton LoRA grad + projection kernels vs cuBLAS against a stored sign matrix.

Workload (defaults): one LLaVA-7B decoder layer's seven LoRA modules (q/k/v/o
4096->4096, gate/up 4096->11008, down 11008->4096), r = 128, T = 1000 tokens
(ragged: lengths 60-100% of T), B = 16 samples, k = 5120, bf16 activations, Adam
moments (LESS). Providers, per module and for the whole layer:

- ``ours``:        ``lora_grad_project`` (cuBLAS per-sample grads in fp32, then the Triton
                   projection with Adam fused and sign tiles made on chip).
- ``ours-proj``:   the Triton projection alone, on precomputed fp32 per-sample grads.
- ``cublas``:      the same per-sample grads, Adam in torch, then a bf16 GEMM against a
                   stored ``[P, k]`` bf16 sign matrix (the matrix is made once, outside the timing).
- ``cublas-proj``: that bf16 GEMM alone.

FLOPs: ``2*B*P*k`` for a projection, plus ``4*B*T*r*(d_in+d_out)`` for the
per-sample grads (U = X A^T, V = D B, then the two weight-gradient GEMMs).
Each row: median ms over repeats (p20/p80 beside it), TFLOP/s, and speed vs cublas.

    python benchmarks/bench_kernels.py              # needs a CUDA GPU
    python benchmarks/bench_kernels.py --smoke      # tiny shapes under TRITON_INTERPRET=1 (CPU; checks, no timing)
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys

LLAVA7B_LAYER = [  # (module, d_in, d_out)
    ("q_proj", 4096, 4096),
    ("k_proj", 4096, 4096),
    ("v_proj", 4096, 4096),
    ("o_proj", 4096, 4096),
    ("gate_proj", 4096, 11008),
    ("up_proj", 4096, 11008),
    ("down_proj", 11008, 4096),
]


def grad_flops(n, t, r, d_in, d_out):
    return 4 * n * t * r * (d_in + d_out)


def proj_flops(n, r, d_in, d_out, k):
    return 2 * n * r * (d_in + d_out) * k


def timeit(fn, sync, repeats: int, warmup: int = 2):
    """Median, p20, p80 milliseconds of ``fn`` (synchronised; icons_fast.bench.timing)."""
    from icons_fast.bench.timing import measure, quantiles

    return tuple(1e3 * t for t in quantiles(measure(fn, repeats, warmup=warmup, sync=sync)))


def make_module(n, t, d_in, d_out, r, dtype, device, seed):
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    lengths = (t * (0.6 + 0.4 * torch.rand(n, generator=g))).long().clamp(min=1)
    mask = (torch.arange(t)[None, :] < lengths[:, None]).to(device)
    X = torch.randn(n, t, d_in, generator=g).to(device, dtype)
    D = (torch.randn(n, t, d_out, generator=g) * 1e-3).to(device, dtype)
    A = (torch.randn(r, d_in, generator=g) / d_in**0.5).to(device, dtype)
    B = (torch.randn(d_out, r, generator=g) * 1e-2).to(device, dtype)
    moments = lambda *shape: (  # noqa: E731  (exp_avg, exp_avg_sq) at a warm-up checkpoint's scale
        (torch.randn(*shape, generator=g) * 1e-4).to(device), (torch.rand(*shape, generator=g) * 1e-8).to(device)
    )
    adam_A, adam_B = moments(r, d_in), moments(d_out, r)
    return dict(X=X, D=D, A=A, B=B, mask=mask), adam_A, adam_B


def run_gpu(args) -> None:
    import torch
    import triton

    from icons_fast.contract import AdamMoments, ProjectionSpec
    from icons_fast.kernels.project import rademacher_project
    from icons_fast.ops.lora_grad import LoraParams, lora_grad_project, lora_grads
    from icons_fast.ops.project import adam_precondition_ref

    dev = "cuda"
    n, t, r, k = args.batch, args.tokens, args.rank, args.proj_dim
    dtype = torch.bfloat16
    sync = torch.cuda.synchronize
    max_p = max(r * (di + do) for _, di, do in LLAVA7B_LAYER)
    max_rows = max(max(r * di, r * do) for _, di, do in LLAVA7B_LAYER)
    # the stored matrix cuBLAS reads: +-1/sqrt(k) in bf16 (values do not change the timing)
    R = torch.randint(0, 2, (max_rows, k), device=dev, dtype=torch.int8).to(dtype).mul_(2).sub_(1).div_(k**0.5)

    print(f"# GPU: {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | "
          f"{datetime.date.today()}")
    print(f"# B={n} T={t} (ragged) r={r} k={k} bf16 activations, Adam on, max P per module {max_p:,}")
    header = f"{'module':<10} {'provider':<12} {'ms':>8} {'p20':>8} {'p80':>8} {'TFLOP/s':>8} {'vs cublas':>9}"
    print(header)
    print("-" * len(header))
    totals: dict[str, float] = {}
    total_flops = {"full": 0, "proj": 0}
    for i, (mod, d_in, d_out) in enumerate(LLAVA7B_LAYER):
        inputs, adam_A, adam_B = make_module(n, t, d_in, d_out, r, dtype, dev, seed=i)
        adam_A, adam_B = AdamMoments(*adam_A), AdamMoments(*adam_B)
        site = LoraParams(inputs["A"], inputs["B"], 2.0, f"layers.0.{mod}.lora_A.default.weight",
                          f"layers.0.{mod}.lora_B.default.weight")
        spec = ProjectionSpec(seed=0, proj_dim=k)
        out = torch.zeros(n, k, device=dev)
        gA, gB = lora_grads(**inputs, scale=2.0)
        gA, gB = gA.reshape(n, -1), gB.reshape(n, -1)

        def ours():
            lora_grad_project(inputs["X"], inputs["D"], site, spec, inputs["mask"], (adam_A, adam_B), out,
                              backend="triton")

        def ours_proj():
            rademacher_project(gA, site.a_name, 0, k, adam=adam_A, out=out)
            rademacher_project(gB, site.b_name, 0, k, adam=adam_B, out=out)

        def cublas_proj(a=gA, b=gB):
            out.add_(a.to(dtype) @ R[: a.shape[1]])
            out.add_(b.to(dtype) @ R[: b.shape[1]])

        def cublas():
            a, b = lora_grads(**inputs, scale=2.0)
            a = adam_precondition_ref(a.reshape(n, -1), adam_A)
            b = adam_precondition_ref(b.reshape(n, -1), adam_B)
            cublas_proj(a, b)

        fl_proj = proj_flops(n, r, d_in, d_out, k)
        fl_full = fl_proj + grad_flops(n, t, r, d_in, d_out)
        total_flops["full"] += fl_full
        total_flops["proj"] += fl_proj
        rows = {}
        for name, fn, fl in (("cublas", cublas, fl_full), ("ours", ours, fl_full),
                             ("cublas-proj", cublas_proj, fl_proj), ("ours-proj", ours_proj, fl_proj)):
            rows[name] = (timeit(fn, sync, args.repeats), fl)
            totals[name] = totals.get(name, 0.0) + rows[name][0][0]
        for name, ((ms, p20, p80), fl) in rows.items():
            base = rows["cublas-proj" if name.endswith("proj") else "cublas"][0][0]
            print(f"{mod:<10} {name:<12} {ms:8.3f} {p20:8.3f} {p80:8.3f} {fl / ms / 1e9:8.1f} {base / ms:8.2f}x")
        del inputs, gA, gB
    print("-" * len(header))
    for name, ms in totals.items():
        fl = total_flops["proj" if name.endswith("proj") else "full"]
        base = totals["cublas-proj" if name.endswith("proj") else "cublas"]
        print(f"{'layer':<10} {name:<12} {ms:8.3f} {'':>8} {'':>8} {fl / ms / 1e9:8.1f} {base / ms:8.2f}x")


def run_smoke() -> None:
    """Tiny shapes through the interpreter: ours vs the torch reference (no timing claims)."""
    os.environ["TRITON_INTERPRET"] = "1"
    import torch

    from icons_fast.contract import AdamMoments, ProjectionSpec
    from icons_fast.ops.lora_grad import LoraParams, lora_grad_project, lora_grad_project_ref

    print("# smoke: TRITON_INTERPRET=1 on CPU, tiny shapes; correctness only, CPU times mean nothing")
    for mod, d_in, d_out in (("q_proj", 24, 24), ("gate_proj", 24, 40), ("down_proj", 40, 24)):
        inputs, adam_A, adam_B = make_module(3, 9, d_in, d_out, 4, torch.float32, "cpu", seed=d_in + d_out)
        names = f"{mod}.lora_A.default.weight", f"{mod}.lora_B.default.weight"
        spec = ProjectionSpec(seed=0, proj_dim=70)
        site = LoraParams(inputs["A"], inputs["B"], 2.0, *names)
        got = lora_grad_project(inputs["X"], inputs["D"], site, spec, inputs["mask"],
                                (AdamMoments(*adam_A), AdamMoments(*adam_B)), backend="triton")
        site64 = LoraParams(inputs["A"].double(), inputs["B"].double(), 2.0, *names)
        ref = lora_grad_project_ref(inputs["X"].double(), inputs["D"].double(), site64, spec, inputs["mask"],
                                    tuple(AdamMoments(*(x.double() for x in a)) for a in (adam_A, adam_B)))
        err = ((got.double() - ref.double()).norm() / ref.double().norm()).item()
        print(f"{mod:<10} d_in={d_in:<3} d_out={d_out:<3} rel err vs fp64 ref {err:.2e}")
        if not err < 1e-4:
            sys.exit(f"smoke failed: {mod} relative error {err:.2e} >= 1e-4")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny interpreted run on the CPU (correctness only)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=1000)
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--proj-dim", type=int, default=5120)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args(argv)
    if args.smoke:
        run_smoke()
        return 0
    import torch

    if not torch.cuda.is_available():
        print("bench_kernels: needs a CUDA GPU for timings (none here); run with --smoke for a CPU check")
        return 0
    run_gpu(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
