"""Rademacher projection of per-sample gradients: ``f = G @ R`` with ``R`` never stored.

``R`` is the ``P x k`` matrix of the projection contract
(``icons_fast.contract``): entry ``(i, j)`` of parameter ``p``'s
block is ``+-1/sqrt(k)``, a function of (seed, name of ``p``, element index
``i`` inside ``p``, column ``j``) only. So::

    f[b, :] = sum_p  G_p[b, :] @ R_p          (G_p: Tensor[B, numel_p], row-major per sample)

is a sum over parameters: the same on every backend, batch size and block
size, and a parameter's contribution does not change when others are added.

``RademacherProjector`` follows TRAK's projector interface (constructor
``grad_dim, proj_dim, seed, proj_type, device``; ``project(grads, model_id)``;
``free_memory()``), so it can stand in for TRAK's ``CudaProjector`` /
``BasicProjector``. ``model_id`` picks an independent matrix per model:
``seed_eff = (seed + 10_000 * model_id) mod 2**32``; ``model_id=0`` uses
``seed`` itself (the contract's seed).

``project_ref`` is the float64 brute force of the whole projection for tests:
the project op's reference (``ops.project.project_param_ref``) summed over
parameters.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Mapping

import torch

from icons_fast.contract import MASK32, fnv1a32
from icons_fast.ops.backend import checked_request, describe, recording_choices
from icons_fast.ops.project import project_param, project_param_ref

MODEL_ID_STRIDE = 10_000
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def effective_seed(seed: int, model_id: int = 0) -> int:
    """``(seed + 10_000 * model_id) mod 2**32``: the seed of model ``model_id``'s matrix."""
    return (int(seed) + MODEL_ID_STRIDE * int(model_id)) & MASK32


def _numel(shape) -> int:
    if isinstance(shape, int):
        return shape
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _proj_type_name(proj_type) -> str:
    # TRAK passes a ProjectionType enum whose .value is the string.
    return str(getattr(proj_type, "value", proj_type)).lower()


class RademacherProjector:
    """Projects per-sample gradients to ``proj_dim`` with the contract's Rademacher matrix.

    Arguments:
        grad_dim: ``P``, total number of gradient entries per sample.
        proj_dim: ``k >= 1``.
        seed: projection seed (mod 2**32).
        proj_type: "rademacher" only (the contract); TRAK's enum is accepted.
        device: where the projection runs; inputs elsewhere are moved here
            and the output lives here.
        dtype: output dtype (accumulation is always float32).
        param_shapes: ordered ``{name: numel or shape}``; a flat ``[B, P]``
            input is split into these parameters in order, so flat and dict
            inputs give the same features. Without it a flat input is one
            parameter named ``""``.
        backend: "auto" | "cpp" | "torch" | "triton". "auto" (when no
            ``ICONS_FAST_BACKEND_PROJECT`` / ``ICONS_FAST_BACKEND`` forces one)
            is passed on to every call of the project op, whose measured
            dispatch picks per shape class (``ops.project``); an explicit
            backend that cannot run raises ``BackendUnavailable`` here.
        block_rows: rows of ``R`` per kernel call / tile (None: measured default).

    ``backend`` holds the request ("auto" or the forced name), ``backends_ran``
    the backends that ran so far (``{"project": [names]}``) and
    ``describe_backend()`` both in one string for logs.
    """

    def __init__(
        self,
        grad_dim: int,
        proj_dim: int,
        seed: int = 0,
        proj_type="rademacher",
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        param_shapes: Mapping[str, int | tuple] | None = None,
        backend: str = "auto",
        block_rows: int | None = None,
    ):
        if int(proj_dim) < 1:
            raise ValueError(f"proj_dim must be >= 1, got {proj_dim}")
        if int(grad_dim) < 1:
            raise ValueError(f"grad_dim must be >= 1, got {grad_dim}")
        if _proj_type_name(proj_type) != "rademacher":
            raise ValueError(
                f"proj_type {proj_type!r} is not supported: the projection contract is Rademacher (proj_type='rademacher')"
            )
        if block_rows is not None and int(block_rows) < 1:
            raise ValueError(f"block_rows must be >= 1, got {block_rows}")
        self.grad_dim = int(grad_dim)
        self.proj_dim = int(proj_dim)
        self.seed = int(seed) & MASK32
        self.proj_type = "rademacher"
        self.device = torch.device(device)
        self.dtype = dtype
        self.block_rows = block_rows
        self.param_shapes = None
        if param_shapes is not None:
            self.param_shapes = OrderedDict((str(n), _numel(s)) for n, s in param_shapes.items())
            total = sum(self.param_shapes.values())
            if total != self.grad_dim:
                raise ValueError(f"param_shapes hold {total} elements but grad_dim={self.grad_dim}; they must agree")
        self.backend = checked_request("project", backend, self.device)
        self.backends_ran: dict[str, list[str]] = {}
        self._pids: dict[str, int] = {}

    def _pid(self, name: str) -> int:
        if name not in self._pids:
            self._pids[name] = fnv1a32(name)
        return self._pids[name]

    def _split(self, grads) -> list[tuple[str, torch.Tensor]]:
        """``[(name, Tensor[B, numel])]`` in projection order, with shapes checked against ``grad_dim``."""
        if isinstance(grads, torch.Tensor):
            if grads.dim() != 2:
                raise ValueError(f"grads must be Tensor[B, {self.grad_dim}] (use g[None] for one sample); got {tuple(grads.shape)}")
            if grads.shape[1] != self.grad_dim:
                raise ValueError(f"grads has {grads.shape[1]} columns per sample but the projector's grad_dim={self.grad_dim}")
            if self.param_shapes is None:
                return [("", grads)]
            parts, start = [], 0
            for name, n in self.param_shapes.items():
                parts.append((name, grads[:, start : start + n]))
                start += n
            return parts
        if not isinstance(grads, Mapping):
            raise TypeError(f"grads must be a Tensor[B, P] or a dict {{name: Tensor[B, ...]}}; got {type(grads).__name__}")
        if not grads:
            raise ValueError("grads is an empty dict")
        batch = {t.shape[0] if t.dim() else None for t in grads.values()}
        if len(batch) != 1 or None in batch:
            raise ValueError(f"every gradient in the dict needs the same leading batch size; got {sorted(map(str, batch))}")
        parts = [(str(name), t.reshape(t.shape[0], -1)) for name, t in grads.items()]
        if self.param_shapes is not None:
            got = {n: t.shape[1] for n, t in parts}
            if set(got) != set(self.param_shapes):
                missing = sorted(set(self.param_shapes) - set(got))
                extra = sorted(set(got) - set(self.param_shapes))
                raise ValueError(f"grads names differ from param_shapes: missing {missing}, unexpected {extra}")
            bad = {n: (got[n], want) for n, want in self.param_shapes.items() if got[n] != want}
            if bad:
                raise ValueError(f"per-sample sizes (got, expected) differ from param_shapes: {bad}")
        total = sum(t.shape[1] for _, t in parts)
        if total != self.grad_dim:
            raise ValueError(f"grads hold {total} elements per sample but the projector's grad_dim={self.grad_dim}")
        return parts

    @torch.no_grad()
    def project(self, grads, model_id: int = 0) -> torch.Tensor:
        """``Tensor[B, proj_dim]`` in ``dtype``: ``sum_p G_p @ R_p`` (float32 accumulation).

        ``grads``: ``Tensor[B, grad_dim]`` or ``{name: Tensor[B, ...]}``
        (float32/float16/bfloat16/float64). ``model_id`` selects the matrix with
        seed ``effective_seed(seed, model_id)``.
        """
        parts = self._split(grads)
        batch = parts[0][1].shape[0]
        for name, t in parts:
            if t.dtype not in _DTYPES:
                raise TypeError(f"gradient {name!r} has dtype {t.dtype}; expected one of {_DTYPES}")
        seed = effective_seed(self.seed, model_id)
        out = torch.zeros(batch, self.proj_dim, dtype=torch.float32, device=self.device)
        with recording_choices(self.backends_ran):
            for name, t in parts:
                project_param(
                    t.to(self.device), self._pid(name), seed, self.proj_dim, out,
                    backend=self.backend, tile_rows=self.block_rows,
                )
        return out.to(self.dtype)

    def describe_backend(self) -> str:
        """The request and what ran it so far, e.g. "auto (ran: project cpp)" or "torch" (``ops.backend.describe``)."""
        return describe(self.backend, self.backends_ran)

    def free_memory(self) -> None:
        """Nothing is cached between calls (``R`` is never stored); kept for TRAK's interface."""
        self._pids.clear()


@torch.no_grad()
def project_ref(grads_dict, proj_dim: int, seed: int = 0) -> torch.Tensor:
    """Float64 brute force: ``sum_p G_p @ R_p`` with each ``R_p`` materialised -> ``Tensor[B, k]``.

    ``grads_dict``: ``{name: Tensor[B, ...]}`` (a bare ``Tensor[B, P]`` is one
    parameter named ``""``). For tests and small sizes only.
    """
    if isinstance(grads_dict, torch.Tensor):
        grads_dict = {"": grads_dict}
    out = None
    for name, t in grads_dict.items():
        g = t.detach().reshape(t.shape[0], -1).to("cpu", torch.float64)
        part = project_param_ref(g, name, seed, proj_dim)
        out = part if out is None else out + part
    return out
