"""Hooks and a loop over LoRA sites: exact batched per-sample LoRA gradients, projected.

For a PEFT LoRA linear layer ``y = W x + s * B(A x)`` (``s = alpha / r``) the
per-sample gradients come from quantities one batched forward/backward pass
already has: the layer input ``x_t`` and the output gradient ``d_t = dL/dy_t``
at every token ``t`` (the formulas live in ``icons_fast.ops.lora_grad``).

Forward hooks record ``x`` and ``y`` of every LoRA layer; one
``torch.autograd.grad(sum_b loss_b, ys)`` gives every ``d`` without touching
the parameters' ``.grad``. Because ``loss_b`` (mean cross-entropy over sample
b's own answer tokens, ``icons_fast.model.inputs.per_sample_losses``) depends
only on sample b, and padding is on the right and masked, row b equals the
gradient a batch holding only sample b would give. Sites are processed one at
a time by the ``lora_grad`` op (gradient, optional LESS Adam preconditioning
with the warmup checkpoint's moments, projection ``f = R^T G`` with the
contract's matrix), so at most one site's per-sample gradients exist at once;
the whole model's ``[B, P]`` is never formed unless raw gradients are asked
for (``proj_dim=None``).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch.profiler import record_function

from icons_fast.contract import AdamMoments, ProjectionSpec
from icons_fast.model.inputs import MODEL_INPUT_KEYS, per_sample_losses
from icons_fast.model.lora import lora_modules, trainable_parameters
from icons_fast.ops.backend import checked_request, describe, recording_choices
from icons_fast.ops.lora_grad import LoraParams, lora_grad_project, per_sample_lora_grads


@dataclass
class _LoraSite:
    """One LoRA layer: its module, adapter and the parameter names used by the projection."""

    name: str
    module: torch.nn.Module
    adapter: str
    a_name: str
    b_name: str

    def params(self) -> LoraParams:
        """The site's current (detached) weights and scale, as the lora_grad op takes them."""
        return LoraParams(
            A=self.module.lora_A[self.adapter].weight.detach(),  # [r, d_in]
            B=self.module.lora_B[self.adapter].weight.detach(),  # [d_out, r]
            scale=float(self.module.scaling[self.adapter]),
            a_name=self.a_name,
            b_name=self.b_name,
        )


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
            "auto" (when no ``ICONS_FAST_BACKEND_LORA_GRAD`` / ``ICONS_FAST_BACKEND``
            forces one) is passed on to every call of the lora_grad op, whose
            measured dispatch picks per shape class (``ops.lora_grad``); an
            explicit backend that cannot run raises ``BackendUnavailable`` here.

    ``featurize(batch) -> Tensor[B, proj_dim]`` (float32). ``backend`` holds the
    request ("auto" or the forced name), ``backends_ran`` the backends that ran
    so far (``{"lora_grad": [names], "project": [names]}``; the torch lora_grad
    backend projects through the project op's own "auto") and
    ``describe_backend()`` both in one string for logs.
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
        self.backend = checked_request("lora_grad", backend, device)
        self.backends_ran: dict[str, list[str]] = {}
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

    def _check_moments(self, state: dict | None) -> dict[str, tuple[AdamMoments, AdamMoments]]:
        """``{site name: (A's AdamMoments, B's AdamMoments)}`` from the checkpoint's optimizer state."""
        if state is None:
            raise ValueError("mode='adam' needs optimizer_state (the warmup checkpoint's exp_avg / exp_avg_sq)")
        for key in ("exp_avg", "exp_avg_sq"):
            if key not in state:
                raise ValueError(f"optimizer_state lacks {key!r}; expected keys exp_avg, exp_avg_sq")
            missing = [n for n in self.param_names if n not in state[key]]
            if missing:
                raise ValueError(
                    f"optimizer_state[{key!r}] has no entry for {len(missing)} parameters, e.g. {missing[0]}; "
                    "was the checkpoint made with the same LoRA configuration?"
                )
        b1, b2 = self.adam_betas

        def moments(name: str) -> AdamMoments:
            m, v = (state[key][name].to(self.device, torch.float32) for key in ("exp_avg", "exp_avg_sq"))
            return AdamMoments(m, v, beta1=b1, beta2=b2, eps=self.adam_eps)

        return {site.name: (moments(site.a_name), moments(site.b_name)) for site in self.sites}

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
    def _adam(self, site: _LoraSite) -> tuple[AdamMoments, AdamMoments] | None:
        return None if self.moments is None else self.moments[site.name]

    @torch.no_grad()
    def per_sample_grads(self, batch: dict) -> dict[str, torch.Tensor]:
        """Raw (preconditioned when mode='adam') per-sample gradients {param name: [B, *shape]} fp32.

        Keys follow ``model.named_parameters()`` order. Forms every module's
        per-sample gradient at once: use ``featurize`` for large models.
        """
        captured, mask = self._forward_backward(batch)
        grads = {}
        for site in self.sites:
            x, d = captured.pop(site.name)
            grads[site.a_name], grads[site.b_name] = per_sample_lora_grads(x, d, site.params(), mask, self._adam(site))
        return {n: grads[n] for n in self.param_names}

    # ------------------------------------------------------------- featurize
    def featurize(self, batch: dict) -> torch.Tensor:
        """Projected per-sample gradients ``Tensor[B, proj_dim]`` float32 (raw ``[B, P]`` if proj_dim is None).

        ``batch`` holds the model's forward kwargs (input_ids, attention_mask,
        pixel_values, ...) and ``labels`` with -100 for ignored tokens.
        """
        if self.proj_dim is None:
            grads = self.per_sample_grads(batch)
            return torch.cat([g.reshape(g.shape[0], -1) for g in grads.values()], dim=1)
        captured, mask = self._forward_backward(batch)
        spec = ProjectionSpec(self.seed, self.proj_dim)
        out = torch.zeros(batch["labels"].shape[0], self.proj_dim, dtype=torch.float32, device=self.device)
        with torch.no_grad(), recording_choices(self.backends_ran):
            for site in self.sites:
                x, d = captured.pop(site.name)  # free the activations as we go
                lora_grad_project(x, d, site.params(), spec, mask, self._adam(site), out, backend=self.backend)
        return out

    def describe_backend(self) -> str:
        """The request and what ran it so far, e.g. "auto (ran: lora_grad torch, project cpp)" (``ops.backend.describe``)."""
        return describe(self.backend, self.backends_ran)
