"""Featurize providers: ours, the LoRA forward+backward floor, and the LESS/ICONS-style baseline.

All three run on the same PEFT model, with the same synthetic samples and
lengths, in one process:

- ``ours``: ``GradientExtractor.featurize(batch)`` (batched hooks, Adam
  preconditioning, counter-hash projection), ``B`` samples per call.
- ``floor``: a plain LoRA training step without the optimizer: one forward and
  ``loss.backward()`` on the same ``B`` samples. ``eta = ours / floor`` (samples/s),
  ceiling 1 (design section 6).
- ``less-style``: what the LESS and released ICONS code do, reproduced: one sample
  per step, ``loss.backward()``, the LoRA ``.grad`` concatenated into one vector,
  the Adam formula ``m' / sqrt(v' + eps)`` with the checkpoint moments, and every
  16 samples a projection of the stacked ``[16, P]`` gradients with TRAK's
  projector (``CudaProjector`` where ``fast_jl`` exists, ``BasicProjector``
  on the CPU, block size 128 as LESS configures it). Without them a stand-in is
  used (``make_less_projector``; the row's note says which).
- ``less-style grads only``: the same loop without the projection (how much of
  the baseline's time is its per-sample backward alone).
"""
from __future__ import annotations

import math

import torch

from icons_fast.bench.models import BenchConfig, floor_flops, make_batch, projection_flops, slice_batch

PROJECT_INTERVAL = 16  # LESS / ICONS project the collected gradients every 16 samples
TRAK_BLOCK_SIZE = 128  # LESS's BasicProjector block size
DENSE_LIMIT_BYTES = 2 << 30  # the dense stand-in is stored only below this size


def random_moments(model, seed: int = 0) -> dict:
    """Adam moments keyed by LoRA parameter name: ``exp_avg`` ~ N(0, 1e-3), ``exp_avg_sq`` ~ |N(0, 1e-6)|."""
    g = torch.Generator().manual_seed(seed)
    m, v = {}, {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            m[name] = (torch.randn(p.shape, generator=g) * 1e-3).to(p.device)
            v[name] = (torch.randn(p.shape, generator=g).abs() * 1e-6 + 1e-12).to(p.device)
    return {"exp_avg": m, "exp_avg_sq": v}


def make_less_projector(grad_dim: int, proj_dim: int, device: torch.device, seed: int = 0, prefer: str = "auto"):
    """``(project(grads [n, P]) -> [n, k], description)``: TRAK's projector as LESS sets it up, or a stand-in.

    ``prefer``: "auto" | "trak" | "dense" | "ours". "auto" takes, in order: TRAK's
    ``CudaProjector`` (CUDA with ``fast_jl``; LESS's GPU setting), TRAK's
    ``BasicProjector`` on the CPU (LESS's fallback), a stored dense Rademacher
    matrix when it fits in ``DENSE_LIMIT_BYTES``, and last icons-fast's own
    counter-hash projector (then the baseline differs from ours only by its
    one-sample-per-step loop: the speed-up shown is a lower bound).
    TRAK's ``BasicProjector`` is not used on a GPU: it allocates ``[P, 128]`` fp32
    (41 GB at LLaVA-7B's P = 320M).
    """
    if prefer in ("auto", "trak"):
        try:
            from trak.projectors import BasicProjector, CudaProjector, ProjectionType
        except ImportError:
            if prefer == "trak":
                raise
        else:
            if device.type == "cuda":
                try:
                    import fast_jl  # noqa: F401

                    proj = CudaProjector(grad_dim, proj_dim, seed, ProjectionType.rademacher, device,
                                         max_batch_size=PROJECT_INTERVAL)
                    return (lambda g: proj.project(g.to(torch.float16), model_id=0)), "TRAK CudaProjector (fast_jl)"
                except Exception:  # noqa: BLE001 - fast_jl absent or unusable: the stand-ins below
                    if prefer == "trak":
                        raise
            else:
                proj = BasicProjector(grad_dim, proj_dim, seed, ProjectionType.rademacher, device,
                                      block_size=TRAK_BLOCK_SIZE, dtype=torch.float32)
                return (lambda g: proj.project(g, model_id=0)), f"TRAK BasicProjector (block {TRAK_BLOCK_SIZE})"
    nbytes = grad_dim * proj_dim * 4
    if prefer in ("auto", "dense") and nbytes <= DENSE_LIMIT_BYTES:
        gen = torch.Generator().manual_seed(seed)
        R = (torch.randint(0, 2, (grad_dim, proj_dim), generator=gen, dtype=torch.int8).float() * 2 - 1)
        R = (R / math.sqrt(proj_dim)).to(device)
        return (lambda g: g.float() @ R), "dense Rademacher stand-in for TRAK (R stored, made untimed)"
    if prefer == "dense":
        raise MemoryError(f"a dense [{grad_dim}, {proj_dim}] stand-in needs {nbytes / 2**30:.1f} GiB "
                          f"(limit {DENSE_LIMIT_BYTES / 2**30:.0f} GiB); install trak or use --baseline auto")
    from icons_fast.features.projection import RademacherProjector

    proj = RademacherProjector(grad_dim, proj_dim, seed=seed, device=device)
    return proj.project, (f"stand-in: icons-fast's projector, backend {proj.describe_backend()} "
                          f"(no TRAK/fast_jl; lower-bound speed-up)")


class LessStyleBaseline:
    """LESS / ICONS per-sample gradient collection, one sample per step (see the module docstring).

    ``run(batch) -> Tensor[B, k]`` (or ``None`` with ``project=False``).
    """

    def __init__(self, model, proj_dim: int, moments: dict, project: bool = True, prefer: str = "auto",
                 eps: float = 1e-8, betas=(0.9, 0.999)):
        self.model = model
        self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.P = sum(p.numel() for _, p in self.params)
        dev = self.params[0][1].device
        # LESS keeps the moments as one flat vector in parameter order
        self.m = torch.cat([moments["exp_avg"][n].reshape(-1) for n, _ in self.params]).to(dev)
        self.v = torch.cat([moments["exp_avg_sq"][n].reshape(-1) for n, _ in self.params]).to(dev)
        self.eps, self.betas = eps, betas
        self.project = None
        self.description = "no projection"
        if project:
            self.project, self.description = make_less_projector(self.P, proj_dim, dev, prefer=prefer)

    def _adam(self, g: torch.Tensor) -> torch.Tensor:
        b1, b2 = self.betas
        m = b1 * self.m + (1 - b1) * g
        v = b2 * self.v + (1 - b2) * g * g
        return m / torch.sqrt(v + self.eps)

    def run(self, batch: dict):
        out, pending = [], []
        for b in range(batch["input_ids"].shape[0]):
            one = slice_batch(batch, b)
            labels = one.pop("labels")
            loss = self.model(**one, labels=labels, use_cache=False).loss
            loss.backward()
            g = torch.cat([p.grad.reshape(-1) for _, p in self.params]).float()
            self.model.zero_grad(set_to_none=True)
            pending.append(self._adam(g))
            if self.project is not None and len(pending) == PROJECT_INTERVAL:
                out.append(self.project(torch.stack(pending)))
                pending = []
            elif self.project is None:
                pending = []
        if self.project is None:
            return None
        if pending:
            out.append(self.project(torch.stack(pending)))
        return torch.cat(out)


def featurize_providers(model, cfg: BenchConfig, backend: str = "auto", baseline: str = "auto",
                        with_baseline: bool = True) -> list[dict]:
    """Providers of the featurize suite: ``[{name, fn, items, flops, note}]`` (call ``fn`` to time it).

    ``baseline``: "auto" | "trak" | "dense" | "ours" | "none" (the LESS-style row's projector, see
    ``make_less_projector``).
    """
    from icons_fast.features.extractor import GradientExtractor

    device = next(model.parameters()).device
    batch = make_batch(model, cfg.batch, cfg.seq, seed=1, device=device)
    moments = random_moments(model)
    extractor = GradientExtractor(model, proj_dim=cfg.proj_dim, seed=0, mode="adam", optimizer_state=moments,
                                  backend=backend)
    P = sum(p.numel() for p in model.parameters() if p.requires_grad)
    fl = floor_flops(model, cfg.seq)
    fl_proj = projection_flops(P, cfg.proj_dim)
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def floor():
        model.zero_grad(set_to_none=True)
        model(**inputs, labels=batch["labels"], use_cache=False).loss.backward()
        model.zero_grad(set_to_none=True)

    shape = f"B={cfg.batch} T={cfg.seq} r={cfg.lora_r} P={P:,} k={cfg.proj_dim}"
    extractor.featurize(batch)  # one untimed call: "auto" measures here, and the row names what ran
    provs = [
        dict(name="floor (LoRA fwd+bwd)", fn=floor, items=cfg.batch, flops=fl * cfg.batch, note=shape),
        dict(name=f"ours ({extractor.describe_backend()})", fn=lambda: extractor.featurize(batch), items=cfg.batch,
             flops=(fl + fl_proj) * cfg.batch, note="adam, " + shape),
    ]
    if with_baseline and baseline != "none":
        n = cfg.baseline_samples
        bbatch = make_batch(model, n, cfg.seq, seed=2, device=device)
        less = LessStyleBaseline(model, cfg.proj_dim, moments, project=True, prefer=baseline)
        grads_only = LessStyleBaseline(model, cfg.proj_dim, moments, project=False)
        provs.append(dict(name="less-style (B=1)", fn=lambda: less.run(bbatch), items=n,
                          flops=(fl + fl_proj) * n, note=f"{less.description}; {n} samples per call"))
        provs.append(dict(name="less-style grads only", fn=lambda: grads_only.run(bbatch), items=n,
                          flops=fl * n, note="same loop, projection skipped"))
    return provs
