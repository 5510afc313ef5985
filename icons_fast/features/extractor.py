"""Exact batched per-sample LoRA gradients, Adam preconditioning and projection.

For a PEFT LoRA linear layer ``y = W x + s * B(A x)`` (``s = alpha / r``) the
per-sample gradients come from quantities one batched forward/backward pass
already has: the layer input ``x_t`` and the output gradient ``d_t = dL/dy_t``
at every token ``t``::

    grad_B[b] = s * sum_t d_t (A x_t)^T        [d_out, r]
    grad_A[b] = s * sum_t (B^T d_t) x_t^T      [r, d_in]

Forward hooks record ``x`` and ``y`` of every LoRA layer; one
``torch.autograd.grad(sum_b loss_b, ys)`` gives every ``d`` without touching
the parameters' ``.grad``. Because ``loss_b`` (mean cross-entropy over sample
b's own answer tokens) depends only on sample b, and padding is on the right
and masked, row b equals the gradient a batch holding only sample b would
give. Modules are processed one at a time, so at most one module's per-sample
gradients exist at once; the whole model's ``[B, P]`` is never formed unless
raw gradients are asked for (``proj_dim=None``).

Preconditioning (LESS), with the warmup checkpoint's Adam moments ``m, v``::

    G = (b1 m + (1 - b1) g) / sqrt(b2 v + (1 - b2) g^2 + eps)

Projection: ``f = R^T G`` with the counter-hash Rademacher matrix of
``icons_fast.features.rademacher`` (never stored).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.profiler import record_function

from icons_fast.features.rademacher import fnv1a32
from icons_fast.model.lora import lora_modules, trainable_parameters
from icons_fast.ops.backend import resolve_backend

MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "pixel_values", "image_sizes", "position_ids")


@dataclass
class _LoraSite:
    """One LoRA layer: its parameters and the parameter names used by the projection."""

    name: str
    module: torch.nn.Module
    adapter: str
    a_name: str
    b_name: str

    @property
    def A(self) -> torch.Tensor:  # [r, d_in]
        return self.module.lora_A[self.adapter].weight

    @property
    def B(self) -> torch.Tensor:  # [d_out, r]
        return self.module.lora_B[self.adapter].weight

    @property
    def scale(self) -> float:
        return float(self.module.scaling[self.adapter])


def per_sample_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy per sample over its unmasked label tokens.

    logits: [B, T, V]; labels: [B, T] with -100 for ignored tokens.
    Returns float32 [B]. A sample with no label token raises (the data layer
    records such samples before they reach a batch).
    """
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    tok = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=-100, reduction="none"
    ).view(shift_labels.shape)
    counts = (shift_labels != -100).sum(dim=1)
    if bool((counts == 0).any()):
        bad = (counts == 0).nonzero().flatten().tolist()
        raise ValueError(f"batch rows {bad} have no label token (every label is -100); exclude them before featurizing")
    return tok.sum(dim=1) / counts


class GradientExtractor:
    """Per-sample projected LoRA gradients for a PEFT-wrapped Hugging Face model.

    Arguments:
        model: PEFT-wrapped model whose trainable parameters are LoRA A/B only.
        proj_dim: k; ``None`` returns raw per-sample gradients ``[B, P]`` in
            ``model.named_parameters()`` order.
        seed: projection seed (the contract's ``seed``).
        mode: "sgd" (plain gradient) or "adam" (LESS preconditioning).
        optimizer_state: for "adam", ``{"exp_avg": {name: T}, "exp_avg_sq": {name: T}}``
            keyed by parameter name (what warmup saves).
        backend: "auto" | "torch" | "triton" (per-module gradient + projection).

    ``featurize(batch) -> Tensor[B, proj_dim]`` (float32).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        proj_dim: int | None = 5120,
        seed: int = 0,
        mode: str = "sgd",
        optimizer_state: dict | None = None,
        backend: str = "auto",
        adam_betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
    ):
        if mode not in ("sgd", "adam"):
            raise ValueError(f"mode must be 'sgd' or 'adam', got {mode!r}")
        if proj_dim is not None and proj_dim < 1:
            raise ValueError(f"proj_dim must be >= 1 or None, got {proj_dim}")
        self.model = model
        self.proj_dim = proj_dim
        self.seed = seed
        self.mode = mode
        self.adam_betas = adam_betas
        self.adam_eps = adam_eps
        self.sites = self._find_sites(model)
        self.param_names = [n for n, _ in trainable_parameters(model)]
        device = next(model.parameters()).device
        self.device = device
        self.backend = resolve_backend("lora_grad", backend, device)
        self.project_backend = resolve_backend("project", "auto", device) if self.backend == "torch" else None
        self.moments = self._check_moments(optimizer_state) if mode == "adam" else None

    # ------------------------------------------------------------ set-up
    @staticmethod
    def _find_sites(model: torch.nn.Module) -> list[_LoraSite]:
        sites = []
        trainable = {n for n, _ in trainable_parameters(model)}
        for name, module in lora_modules(model):
            adapters = list(module.active_adapters)
            if len(adapters) != 1:
                raise ValueError(f"LoRA layer {name} has active adapters {adapters}; exactly one is supported")
            ad = adapters[0]
            sites.append(_LoraSite(name, module, ad, f"{name}.lora_A.{ad}.weight", f"{name}.lora_B.{ad}.weight"))
        covered = {s.a_name for s in sites} | {s.b_name for s in sites}
        extra = sorted(trainable - covered)
        if extra:
            raise ValueError(
                f"trainable parameters outside LoRA A/B are not supported by per-sample hooks: {extra[:5]}... "
                "freeze them (requires_grad=False) before featurizing"
            )
        missing = sorted(covered - trainable)
        if missing:
            raise ValueError(f"LoRA parameters {missing[:5]} are frozen; featurize needs them trainable")
        return sites

    def _check_moments(self, state: dict | None) -> dict:
        if state is None:
            raise ValueError("mode='adam' needs optimizer_state (the warmup checkpoint's exp_avg / exp_avg_sq)")
        out = {}
        for key in ("exp_avg", "exp_avg_sq"):
            if key not in state:
                raise ValueError(f"optimizer_state lacks {key!r}; expected keys exp_avg, exp_avg_sq")
            missing = [n for n in self.param_names if n not in state[key]]
            if missing:
                raise ValueError(
                    f"optimizer_state[{key!r}] has no entry for {len(missing)} parameters, e.g. {missing[0]}; "
                    "was the checkpoint made with the same LoRA configuration?"
                )
            out[key] = {n: state[key][n].to(self.device, torch.float32) for n in self.param_names}
        return out

    # -------------------------------------------------------- forward/backward
    @contextlib.contextmanager
    def _capture(self):
        """Record (input, output) of every LoRA layer during one forward pass."""
        records: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        handles = []
        for site in self.sites:

            def hook(module, args, output, _name=site.name):
                records[_name] = (args[0].detach(), output)

            handles.append(site.module.register_forward_hook(hook))
        try:
            yield records
        finally:
            for h in handles:
                h.remove()

    def _forward_backward(self, batch: dict):
        """Run the batch; return (records {name: (x, d)}, token mask [B, T])."""
        kwargs = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items() if k in MODEL_INPUT_KEYS}
        labels = batch["labels"].to(self.device)
        was_training = self.model.training
        self.model.eval()  # dropout off
        try:
            with torch.enable_grad(), self._capture() as records:
                with record_function("forward"):
                    out = self.model(**kwargs, use_cache=False)
                    loss = per_sample_losses(out.logits, labels).sum()
                ys = [records[s.name][1] for s in self.sites]
                with record_function("backward"):
                    ds = torch.autograd.grad(loss, ys, allow_unused=True)
        finally:
            self.model.train(was_training)
        captured = {}
        for site, d in zip(self.sites, ds):
            x = records[site.name][0]
            if d is None:  # the layer does not influence the loss (e.g. last layer's unused head)
                d = torch.zeros_like(records[site.name][1])
            captured[site.name] = (x, d.detach())
        mask = kwargs.get("attention_mask")
        if mask is None:
            mask = torch.ones(labels.shape, dtype=torch.bool, device=self.device)
        return captured, mask.bool()

    # ----------------------------------------------------------- gradients
    @staticmethod
    def module_grads(x: torch.Tensor, d: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float, mask: torch.Tensor):
        """Per-sample ``grad_A [B, r, d_in]`` and ``grad_B [B, d_out, r]`` of one LoRA layer (fp32).

        x: [B, T, d_in] layer inputs; d: [B, T, d_out] output gradients;
        mask: [B, T] bool (False rows are padding and contribute nothing,
        whatever they hold).
        """
        m = mask[..., None]
        x = torch.where(m, x.float(), 0.0)
        d = torch.where(m, d.float(), 0.0)
        a = x @ A.float().t()  # [B, T, r]
        bd = d @ B.float()  # [B, T, r]
        grad_B = scale * torch.einsum("bto,btr->bor", d, a)
        grad_A = scale * torch.einsum("btr,bti->bri", bd, x)
        return grad_A, grad_B

    def _precondition(self, name: str, g: torch.Tensor) -> torch.Tensor:
        if self.moments is None:
            return g
        b1, b2 = self.adam_betas
        m = self.moments["exp_avg"][name]
        v = self.moments["exp_avg_sq"][name]
        return (b1 * m + (1 - b1) * g) / torch.sqrt(b2 * v + (1 - b2) * g * g + self.adam_eps)

    def per_sample_grads(self, batch: dict) -> dict[str, torch.Tensor]:
        """Raw (preconditioned when mode='adam') per-sample gradients {param name: [B, *shape]} fp32.

        Keys follow ``model.named_parameters()`` order. Forms every module's
        per-sample gradient at once: use ``featurize`` for large models.
        """
        captured, mask = self._forward_backward(batch)
        grads = {}
        for site in self.sites:
            x, d = captured.pop(site.name)
            gA, gB = self.module_grads(x, d, site.A.detach(), site.B.detach(), site.scale, mask)
            grads[site.a_name] = self._precondition(site.a_name, gA)
            grads[site.b_name] = self._precondition(site.b_name, gB)
        return {n: grads[n] for n in self.param_names}

    # ------------------------------------------------------------- featurize
    @torch.no_grad()
    def _project_torch(self, captured, mask, n_rows: int) -> torch.Tensor:
        from icons_fast.ops.project import project_param

        out = torch.zeros(n_rows, self.proj_dim, dtype=torch.float32, device=self.device)
        for site in self.sites:
            x, d = captured.pop(site.name)  # free the activations as we go
            with record_function("lora_grads"):
                gA, gB = self.module_grads(x, d, site.A.detach(), site.B.detach(), site.scale, mask)
            for name, g in ((site.a_name, gA), (site.b_name, gB)):
                with record_function("projection"):
                    g = self._precondition(name, g).reshape(n_rows, -1)
                    project_param(g, fnv1a32(name), self.seed, self.proj_dim, out=out, backend=self.project_backend)
        return out

    @torch.no_grad()
    def _project_triton(self, captured, mask, n_rows: int) -> torch.Tensor:
        from icons_fast.kernels.lora_project import lora_grad_project

        out = torch.zeros(n_rows, self.proj_dim, dtype=torch.float32, device=self.device)
        for site in self.sites:
            x, d = captured.pop(site.name)
            adam_A = adam_B = None
            if self.moments is not None:
                adam_A = (self.moments["exp_avg"][site.a_name], self.moments["exp_avg_sq"][site.a_name])
                adam_B = (self.moments["exp_avg"][site.b_name], self.moments["exp_avg_sq"][site.b_name])
            with record_function("lora_grads + projection"):
                lora_grad_project(
                    x, d, site.A.detach(), site.B.detach(), site.scale, site.a_name, site.b_name, self.seed,
                    self.proj_dim, mask=mask, adam_A=adam_A, adam_B=adam_B, out=out,
                    adam_betas=self.adam_betas, adam_eps=self.adam_eps,
                )
        return out

    def featurize(self, batch: dict) -> torch.Tensor:
        """Projected per-sample gradients ``Tensor[B, proj_dim]`` float32 (raw ``[B, P]`` if proj_dim is None).

        ``batch`` holds the model's forward kwargs (input_ids, attention_mask,
        pixel_values, ...) and ``labels`` with -100 for ignored tokens.
        """
        if self.proj_dim is None:
            grads = self.per_sample_grads(batch)
            return torch.cat([g.reshape(g.shape[0], -1) for g in grads.values()], dim=1)
        captured, mask = self._forward_backward(batch)
        n_rows = batch["labels"].shape[0]
        if self.backend == "triton":
            return self._project_triton(captured, mask, n_rows)
        return self._project_torch(captured, mask, n_rows)
