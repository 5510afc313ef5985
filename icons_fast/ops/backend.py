"""The one backend factory: which implementation runs each op.

Every op has a plain-torch backend ("torch") and optional fast paths. Each
op module (``ops/project.py``, ``ops/lora_grad.py``, ``ops/segment_reduce.py``)
registers its implementations with ``@register(op, backend)``; the table
``registry(device)`` maps ``(op, backend) -> (available, impl)`` and
``implementation(op, requested, device)`` is the one dispatch every op uses.
The choice is made here and nowhere else:

- ``resolve_backend(op, "auto", device)`` picks the first available backend
  for that device in the order of ``_PREFERENCE`` and says which one it took
  (``logging`` at INFO level): the static choice, for callers that need a
  name before they see any input (e.g. ``RademacherProjector``).
- ``measured_backend(op, "auto", device, shape_class, work, run_sample)``:
  what every op calls with its inputs in hand. It times the candidates
  (``auto_candidates``: the available backends of the op on that device) once
  per shape class on a sample of the inputs through ``ops.autotune.pick``
  (measured dispatch, cached on disk); below ``autotune.MIN_FLOPS`` of work,
  or with one candidate, it takes the first of the preference order untimed.
- ``recording_choices()``: a block that collects which backend ran each op
  call made inside it (``{op: [names]}``), so a caller that passes "auto" on
  (``RademacherProjector``, ``GradientExtractor``) can say what actually ran.
- Forcing: an explicit name (argument, ``--backend``), else
  ``ICONS_FAST_BACKEND_<OP>`` (e.g. ``ICONS_FAST_BACKEND_INFLUENCE=blas``),
  else ``ICONS_FAST_BACKEND`` (``requested_backend``). A forced name that
  cannot run raises ``BackendUnavailable`` with the reason and the fix (the
  global variable only applies to ops that have a backend of that name);
  ``checked_request`` raises it up front for callers that pass the request on.

Capability queries that always exist: ``has_cpu_ext()``, ``has_cuda_ext()``,
``has_triton()``, ``backends()``.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
from collections.abc import Callable, Collection, Iterator

import torch

from icons_fast.ops import autotune

log = logging.getLogger(__name__)

# "influence" is the segment-reduce op of ops/segment_reduce.py (its public name in
# backends(), --backend and ICONS_FAST_BACKEND).
OPS = ("project", "lora_grad", "influence")

# Fastest first; "torch" is the reference and always available. The CPU lists never
# hold "triton": on the CPU it only runs in the interpreter (TRITON_INTERPRET=1, for
# tests), which must never be a choice of "auto"; it runs there when named explicitly.
_PREFERENCE = {
    ("project", "cuda"): ("triton", "torch"),
    ("project", "cpu"): ("cpp", "torch"),
    ("lora_grad", "cuda"): ("triton", "torch"),
    ("lora_grad", "cpu"): ("torch",),
    ("influence", "cuda"): ("cuda", "torch"),
    # blas: torch/MKL GEMM per row block + the C++ fold; blas-bf16: the same in bf16
    # (fp16/bf16 train features only, see ops/segment_reduce.py's error budget);
    # cpp: the AVX2 micro-kernel. "auto" measures these (ops.autotune) on real work.
    ("influence", "cpu"): ("blas", "cpp", "blas-bf16", "torch"),
}


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run here."""


@functools.lru_cache(maxsize=None)
def _cpu_ext():
    try:
        from icons_fast import _C  # noqa: F401

        return _C, None
    except ImportError as e:  # not built
        return None, f"icons_fast._C is not built ({e}); run `make build` or `pip install -e .`"


def has_cpu_ext() -> bool:
    """True when the C++ extension ``icons_fast._C`` (CPU path) is importable."""
    return _cpu_ext()[0] is not None


def cpu_ext():
    """The ``icons_fast._C`` module, or ``BackendUnavailable`` saying how to build it."""
    mod, why = _cpu_ext()
    if mod is None:
        raise BackendUnavailable(why)
    return mod


@functools.lru_cache(maxsize=None)
def _cuda_runtime_problem(mod) -> str:
    """Why the CUDA path of ``mod`` cannot run on the current device ("" when it can).

    Probed once per process with a tiny kernel launch (``_C.cuda_runtime_status``):
    the extension links the static CUDA runtime of the nvcc that built it, which
    may need a newer driver than torch's, and may hold no image for this GPU.
    """
    status = getattr(mod, "cuda_runtime_status", None)
    problem = "the extension predates its CUDA probe (rebuild it)" if status is None else status()
    if problem:
        log.warning("icons_fast: the CUDA extension cannot run here (%s); influence falls back to torch", problem)
    return problem


def cuda_ext_problem() -> str:
    """Why the extension's CUDA path cannot run here, with the fix ("" when it can)."""
    mod, why = _cpu_ext()
    if mod is None:
        return why
    if not getattr(mod, "has_cuda", lambda: False)():
        return "the extension was built without CUDA (set ICONS_FAST_FORCE_CUDA_BUILD=1 and rebuild)"
    if not torch.cuda.is_available():
        return "torch sees no CUDA GPU"
    return _cuda_runtime_problem(mod)


def has_cuda_ext() -> bool:
    """True when the extension's CUDA path can run here: compiled in, a GPU visible, and a probe kernel ran."""
    return not cuda_ext_problem()


@functools.lru_cache(maxsize=None)
def has_triton() -> bool:
    """True when Triton kernels can run: a CUDA GPU, or ``TRITON_INTERPRET=1`` on the CPU."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def _available(name: str, device_type: str) -> tuple[bool, str]:
    if name == "torch":
        return True, ""
    if name in ("cpp", "blas", "blas-bf16"):
        if device_type != "cpu":
            return False, f"the {name} backend runs on CPU tensors only"
        return has_cpu_ext(), _cpu_ext()[1] or ""
    if name == "cuda":
        if device_type != "cuda":
            return False, "the CUDA backend needs CUDA tensors"
        problem = cuda_ext_problem()
        return not problem, problem
    if name == "triton":
        if device_type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            return False, "Triton kernels need a CUDA GPU (or TRITON_INTERPRET=1 for slow CPU testing)"
        return has_triton(), "triton is not installed (pip install triton)"
    return False, f"unknown backend {name!r}"


@functools.lru_cache(maxsize=None)
def _say_choice(op: str, device_type: str, name: str) -> None:
    """Log the automatic choice once per (op, device, backend), not at every call of the op."""
    log.info("icons_fast: %s on %s uses backend %r", op, device_type, name)


def _device_type(device: str | torch.device) -> str:
    return "cuda" if torch.device(device).type == "cuda" else "cpu"


def auto_candidates(op: str, device: str | torch.device = "cpu") -> list[str]:
    """The backends "auto" may take for ``op`` on ``device``: the available ones, in the preference order."""
    dt = _device_type(device)
    return [b for b in _PREFERENCE[(op, dt)] if _available(b, dt)[0]]


def backends(device: str | torch.device = "cpu") -> dict[str, list[str]]:
    """Available backends per op for ``device``, fastest first."""
    return {op: auto_candidates(op, device) for op in OPS}


def env_var(op: str) -> str:
    """The variable that forces ``op``'s backend: ``ICONS_FAST_BACKEND_<OP>`` (upper case)."""
    return f"ICONS_FAST_BACKEND_{op.upper()}"


def requested_backend(op: str, requested: str | None = "auto", device: str | torch.device = "cpu") -> str:
    """The backend asked for, after the environment: an explicit name, else ``ICONS_FAST_BACKEND_<OP>``,
    else ``ICONS_FAST_BACKEND`` (when ``op`` has a backend of that name on ``device``), else "auto"."""
    if requested not in (None, "auto"):
        return requested
    per_op = os.environ.get(env_var(op), "") or "auto"
    if per_op != "auto":
        return per_op
    dt = _device_type(device)
    general = os.environ.get("ICONS_FAST_BACKEND", "auto") or "auto"
    # The global variable naming a backend this op/device does not have means auto for it.
    return general if general in _PREFERENCE[(op, dt)] else "auto"


def checked_request(op: str, requested: str | None = "auto", device: str | torch.device = "cpu") -> str:
    """``requested_backend``, with a forced name checked now: "auto", or a backend that can run ``op`` on ``device``
    (else ``BackendUnavailable``). For callers that pass the request on to every op call and must fail early."""
    name = requested_backend(op, requested, device)
    return name if name == "auto" else resolve_backend(op, name, device)


def resolve_backend(op: str, requested: str | None = "auto", device: str | torch.device = "cpu") -> str:
    """Return the backend name that will run ``op`` on ``device``.

    ``requested`` None or "auto" falls back to the environment
    (``requested_backend``) and then to the first available backend of
    ``_PREFERENCE``. An explicit backend that cannot run raises ``BackendUnavailable``.
    """
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; ops: {OPS}")
    dt = _device_type(device)
    requested = requested_backend(op, requested, dt)
    if requested == "auto":
        name = auto_candidates(op, dt)[0]
        _say_choice(op, dt, name)
        return name
    known = list(dict.fromkeys(_PREFERENCE[(op, "cuda")] + _PREFERENCE[(op, "cpu")]))  # every backend of the op
    if requested not in known:
        raise BackendUnavailable(f"op {op!r} has no backend {requested!r}; its backends: {known}")
    ok, why = _available(requested, dt)
    if not ok:
        raise BackendUnavailable(
            f"backend {requested!r} cannot run {op!r} on {dt}: {why}. Available here: {auto_candidates(op, dt)}"
        )
    return requested


def measured_backend(op: str, requested: str | None, device: str | torch.device, shape_class: str, work: float,
                     run_sample: Callable[[str], object], exclude: Collection[str] = ()) -> str:
    """The backend that runs one call of ``op`` on ``device``: forced, else measured (``ops.autotune``).

    Args:
        requested: an explicit backend, or "auto" / None (then the environment, ``requested_backend``).
            A forced name is checked by ``resolve_backend`` (``BackendUnavailable``) and never timed.
        shape_class: what the measured choice is keyed on besides the machine
            (dtype and sizes up to powers of two, ``autotune.pow2_class``).
        work: the call's nominal work in flops; below ``autotune.MIN_FLOPS`` nothing is timed.
        run_sample: ``run_sample(name)`` runs backend ``name`` once on a small
            slice of the call's inputs, writing scratch outputs only (the
            caller's output is written once, afterwards, by the chosen backend).
            Called only when the shape class has no cached choice yet.
        exclude: backends that cannot run these particular arguments (never candidates).
    Returns the backend name: with "auto", the first of ``auto_candidates``
    (less ``exclude``) when it is the only one or ``work`` is small, else the
    measured-fastest that is not slower than "torch" (``autotune.pick``).
    On CUDA every timed call ends with a synchronize, so the clock sees the kernels.
    """
    dt = _device_type(device)
    requested = requested_backend(op, requested, dt)
    if requested != "auto":
        return _record(op, resolve_backend(op, requested, dt))
    names = [b for b in auto_candidates(op, dt) if b not in exclude]
    if len(names) == 1 or work < autotune.MIN_FLOPS:
        _say_choice(op, dt, names[0])
        return _record(op, names[0])

    def timed(name: str) -> Callable[[], None]:
        if dt != "cuda":
            return lambda: run_sample(name)
        return lambda: (run_sample(name), torch.cuda.synchronize(device))

    with _not_recorded():  # the timed samples (and the ops they call) are not what ran the caller's call
        name = autotune.pick(op, device, shape_class, {name: timed(name) for name in names})
    return _record(op, name)


# ------------------------------------------------------------------ what ran
_RECORDING = threading.local()  # .stack: the open recording_choices() dicts of this thread, innermost last


def _record(op: str, name: str) -> str:
    """Note that ``name`` runs a call of ``op`` in every open ``recording_choices()`` block; returns ``name``."""
    for ran in getattr(_RECORDING, "stack", ()):
        names = ran.setdefault(op, [])
        if name not in names:
            names.append(name)
    return name


@contextlib.contextmanager
def recording_choices(ran: dict[str, list[str]] | None = None) -> Iterator[dict[str, list[str]]]:
    """Collect the backend of every op call made in the block (this thread): ``{op: [names, in first-use order]}``.

    Every op dispatches through ``measured_backend``, which records its answer
    here; the calls that only time a candidate (a measurement) are not recorded.
    ``ran``: a dict to add to (e.g. one kept over many blocks); a new one when None.
    """
    ran = {} if ran is None else ran
    stack = _RECORDING.__dict__.setdefault("stack", [])
    stack.append(ran)
    try:
        yield ran
    finally:
        del stack[next(i for i, d in enumerate(stack) if d is ran)]  # by identity: two blocks may hold equal dicts


def describe(requested: str, ran: dict[str, list[str]]) -> str:
    """A backend request and what ran it, for logs and bench rows.

    ``"auto"`` before anything ran; ``"auto (ran: lora_grad torch, project cpp)"``
    after (several names of one op joined by "+": measured per shape class); a
    forced name that is all that ran reads as just that name (``"cpp"``).
    """
    if not ran or all(names == [requested] for names in ran.values()):
        return requested
    parts = [f"{op} {'+'.join(names)}" for op, names in ran.items()]
    return f"{requested} (ran: {', '.join(parts)})"


@contextlib.contextmanager
def _not_recorded() -> Iterator[None]:
    saved = _RECORDING.__dict__.get("stack", [])
    _RECORDING.stack = []
    try:
        yield
    finally:
        _RECORDING.stack = saved


# ------------------------------------------------------------------ registry
_IMPLS: dict[tuple[str, str], Callable] = {}


def register(op: str, backend: str) -> Callable[[Callable], Callable]:
    """Decorator: the function runs ``op`` on ``backend`` (called by the op's own module at import)."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; ops: {OPS}")

    def deco(fn: Callable) -> Callable:
        _IMPLS[(op, backend)] = fn
        return fn

    return deco


def registry(device: str | torch.device = "cpu") -> dict[tuple[str, str], tuple[bool, Callable]]:
    """The table ``(op, backend) -> (available on device, impl)`` of every registered implementation."""
    dt = _device_type(device)
    return {key: (_available(key[1], dt)[0], fn) for key, fn in _IMPLS.items()}


def implementation(op: str, requested: str | None = "auto", device: str | torch.device = "cpu") -> tuple[str, Callable]:
    """``(backend name, impl)`` that runs ``op`` on ``device`` (``resolve_backend`` picks the name)."""
    name = resolve_backend(op, requested, device)
    return name, _IMPLS[(op, name)]
