"""Public entry points of the bottleneck kernels: checks, allocation, backend dispatch, ``torch.library`` ops.

Each Triton entry point is a ``torch.library.custom_op`` named ``effdense::<name>`` that *mutates* outputs
allocated here, outside the op, so FakeTensor, ``torch.compile`` and memory trackers see every byte; its
fake implementation does nothing. The Python functions below choose the backend:

* ``backend="auto"`` (default): Triton when :func:`kernels_available` says it runs for the tensor's device
  (a CUDA tensor, or any tensor under ``TRITON_INTERPRET=1``), else the PyTorch twin in :mod:`.reference`;
* ``backend="triton"``: always Triton (raises if it cannot run);
* ``backend="reference"``: always the PyTorch twin.

The kernels offset samples in 64 bits but channels and rows in 32 bits: a tensor with ``N*H*W`` above about
2**31 values per channel, or whose channel stride spans that much (a channel-major view), runs on the twin
under ``"auto"`` and is refused by ``"triton"`` (:func:`._checks.int32_span_error`).

The ops take arguments the functions below have checked and allocated, and check nothing of them (only that
the kernels can run: on a GPU a wrong size is an out-of-bounds write): call the functions. In plain eager
execution the functions launch directly, without the op (its dispatch costs host time; see ``_plain_eager``). The checks that need storage (an output
overlapping an input, :func:`._checks.check_disjoint`) run in eager execution only: traced tensors under
``torch.compile`` have none.

Numerics, layouts and shapes are documented on each function; the twins follow the same contract.
float64 inputs run on the twins only (``"auto"`` picks them, ``"triton"`` refuses), with float64 per-channel
vectors and statistics wherever fp32 is written below.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any, Literal, Sequence

import torch
from torch.autograd import forward_ad as _forward_ad

from effdense._autograd import differentiable_once, legacy_batched
from effdense.kernels import _checks, _launch, reference

try:
    from effdense.kernels import bottleneck as _bottleneck
    from effdense.kernels import stats as _stats

    _TRITON_ERROR: Exception | None = None
except ImportError as exc:  # no triton in this environment: the reference twins still work
    _TRITON_ERROR = exc

Backend = Literal["auto", "triton", "reference"]
_BACKENDS = ("auto", "triton", "reference")


def kernels_available(device: torch.device | str | None = None) -> bool:
    """Whether the Triton kernels would run for tensors on ``device``: triton imports, and the device is
    CUDA or Triton's interpreter is on (``TRITON_INTERPRET=1``, set before effdense.kernels is imported).
    With ``device=None``, whether they run on the current CUDA device (no CUDA call if CUDA is absent).
    ``device`` is anything ``torch.device`` takes (a string such as ``"cuda:0"``, a ``torch.device``, an index)."""
    if device is not None:
        device = torch.device(device)  # (raises for what is not a device, e.g. "bogus")
    if _TRITON_ERROR is not None:
        return False
    if _launch.interpreting():
        return True
    return torch.cuda.is_available() and (device is None or device.type == "cuda")


def set_autotune(enabled: bool) -> bool:
    """Whether the GEMM kernels autotune on a GPU (the default; ``EFFDENSE_AUTOTUNE=0`` in the environment
    when effdense.kernels is imported turns it off) or launch each new shape with a fixed configuration:
    the first of the kernel's configurations that fits the device, chosen without timing. Tuning times
    every configuration of each new shape (77 s in the first fused DenseNet-121 step on a fresh H200); the
    fixed choice compiles one. Returns the previous setting. See :func:`.bottleneck.set_autotune`."""
    if _TRITON_ERROR is not None:
        raise RuntimeError(f"set_autotune: triton failed to import ({_TRITON_ERROR}); there are no kernels to tune")
    return _bottleneck.set_autotune(enabled)


def set_direct_launch(enabled: bool) -> bool:
    """Whether a GPU kernel launches through its compiled kernel's launcher after its first launch for a
    given specialisation (the default; ``EFFDENSE_DIRECT_LAUNCH=0`` in the environment when effdense.kernels
    is imported turns it off) or through Triton's ``kernel[grid](...)`` every time, which re-derives the
    specialisation and cache key from all arguments on each call. The kernels and their results are the
    same either way; only the host time per launch differs. Returns the previous setting. See
    :func:`._launch.launch`."""
    return _launch.set_direct_launch(enabled)


def _transformed(tensors: tuple) -> bool:
    """Whether any of ``tensors`` is a ``torch.func`` transform's wrapper (vmap's batched tensor, grad's
    tracking tensor): the kernels' ops write into their arguments, and PyTorch's batching fallback cannot run
    such ops, while the twins are PyTorch operators that every transform handles."""
    if not _functorch_active():
        return False
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    for t in tensors:
        for u in t if isinstance(t, (tuple, list)) else (t,):  # (an out= pair)
            if isinstance(u, torch.Tensor) and wrapped(u):
                return True
    return False


def _use_triton(x: torch.Tensor, backend: str, *others: Any, spans: tuple = (), wgrad_rows: int = 0) -> bool:
    """Whether a public op runs its Triton kernels; ``others``: its other tensor arguments (for the
    ``torch.func`` check); ``spans``: those of them the kernels index beyond per-channel vectors (activations,
    gradients, the weight), for the 32-bit offset check with ``x`` (:func:`._checks.int32_span_error`; the
    vectors are left out of it: each argument costs host time on every call), and ``wgrad_rows`` the rows of a
    weight gradient the call allocates without a weight argument."""
    if backend == "reference":
        return False
    if backend == "auto":
        # float64 (gradcheck, numerics studies) always runs on the PyTorch twins, as does an op under vmap
        try:
            return (
                x.dtype in _checks.KERNEL_DTYPES
                and kernels_available(x.device)
                and not _transformed((x, *others))
                and _checks.int32_span_error((x, *spans), wgrad_rows) is None
            )
        except AttributeError:  # not a tensor (None, a list, a number): the twin's check names it
            return False
    if backend == "triton":
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in _checks.KERNEL_DTYPES:
            hint = "; use backend='reference' (or 'auto') for float64" if x.dtype == torch.float64 else ""
            raise TypeError(f"x: backend='triton': the kernels take float32, bfloat16 or float16, got {x.dtype}{hint}")
        if not kernels_available(x.device):
            why = f"triton failed to import ({_TRITON_ERROR})" if _TRITON_ERROR is not None else (
                f"the tensor is on {x.device}; use a CUDA tensor or set TRITON_INTERPRET=1 before importing effdense"
            )
            raise RuntimeError(f"backend='triton' cannot run: {why}")
        if _transformed((x, *others)):
            raise NotImplementedError(
                "backend='triton': the kernel ops do not run under torch.func transforms (vmap, grad); "
                "backend='auto' runs the PyTorch twins there"
            )
        span = _checks.int32_span_error((x, *spans), wgrad_rows)
        if span is not None:
            raise ValueError(f"backend='triton': {span}, or use backend='auto', which runs the PyTorch twin for it")
        return True
    raise ValueError(f"backend: expected one of {_BACKENDS}, got {backend!r}")


def _alert_atomics(x: torch.Tensor, op: str) -> None:
    """PyTorch's convention for a kernel whose result can vary from run to run, under
    ``torch.use_deterministic_algorithms(True)``: an error (a warning with ``warn_only=True``). The GEMM kernels'
    cross-program sums are fp32 atomics in whatever order the programs finish: on a GPU their last bits vary.
    (Triton's CPU interpreter runs the programs one after another, in one order: it is not alerted.)"""
    if x.is_cuda and torch.are_deterministic_algorithms_enabled():
        message = (
            f"effdense.kernels.{op} does not have a deterministic implementation on CUDA (its sums across programs "
            "are fp32 atomics), but you set 'torch.use_deterministic_algorithms(True)'. Strategy 'shared' (and 'auto', "
            "which takes it then) computes the same with PyTorch operators; or pass warn_only=True to "
            "use_deterministic_algorithms to run the kernels anyway"
        )
        if torch.is_deterministic_algorithms_warn_only_enabled():
            warnings.warn(message, UserWarning, stacklevel=_stacklevel_outside_kernels())
        else:
            raise RuntimeError(message)


_KERNELS_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _stacklevel_outside_kernels() -> int:
    """The ``stacklevel`` for a ``warnings.warn`` in the caller of this function that names the first frame
    outside this package: the user's call of a public function (one to three helpers deep here), or the
    strategy's code that called the kernels (or the package's outermost frame, where there is no other: a
    backward on autograd's device thread)."""
    frame, level = sys._getframe(1), 1  # (1: the line that warns)
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_KERNELS_DIR):
        frame, level = frame.f_back, level + 1
    return level


def _zero_pair(n: int, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Two zeroed fp32 ``[n]`` sums, the rows of one buffer: one allocation and one fill (on a GPU, one
    fill kernel) instead of two."""
    return torch.zeros((2, n), dtype=torch.float32, device=like.device).unbind(0)


def _rows(weight: torch.Tensor) -> torch.Tensor:
    """The kernels read a ``(B, C)`` weight with any row stride and unit column stride: a column slice of a
    contiguous weight (a channel chunk) goes in as it is; anything else is copied."""
    return weight if (weight.stride(1) == 1 or weight.shape[1] == 1) else weight.contiguous()


def _plane_contiguous(t: torch.Tensor) -> torch.Tensor:
    """Gradients arriving from autograd may be in any layout; the kernels read (H, W) planes contiguously."""
    return t if _checks.planes_contiguous(t) else t.contiguous()


# private torch hooks behind _plain_eager; a torch without one takes the library op every time
_dispatch_modes = getattr(torch._C, "_len_torch_dispatch_stack", lambda: 1)
_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: True)


def _plain_eager(tensors: tuple) -> bool:
    """Whether a launch may skip its ``torch.library`` op: plain tensors with data (not ``meta``) in eager
    execution, with no dispatch mode (FakeTensorMode, memory or FLOP trackers), no ``torch.compile``
    tracing and no functorch transform active. Those need the op (meta tensors its fake implementation);
    plain eager calls do not, and the op's dispatch costs several times the checks and allocation around
    it (host time that small GPU steps are bound by). An ``nn.Parameter`` counts as plain (a BatchNorm's
    weight goes in as it is; the launch only reads its data): before, each BN-backward accumulation of a
    ``fused`` step took the op for its ``gamma``, ~40 us of host time more per call (timed ad hoc on a
    2-core CPU, launch stubbed). Other subclasses (DTensor, FakeTensor, functorch wrappers) take the op."""
    # the first argument is the activation: all arguments share its device
    if tensors[0].is_meta or torch.compiler.is_compiling() or _dispatch_modes() or _functorch_active():
        return False
    for t in tensors:  # (a loop: half the cost of all() over a generator, for ~430 launches per step)
        if t is not None and type(t) is not torch.Tensor and type(t) is not _Parameter:
            return False
    return True


_Parameter = torch.nn.Parameter


def _call(op, launch, *args: torch.Tensor, mutated: tuple[torch.Tensor, ...] = (), direct: bool = False) -> None:
    """Run ``launch(*args)`` through ``op`` (its ``torch.library`` op), or directly in plain eager
    execution. ``mutated``: caller-owned arguments the launch writes, whose version counters the op would
    bump (so autograd notices in-place changes to saved tensors); the direct path bumps them itself.
    ``direct``: a :class:`_StageOps` call, checked once for its pass (:func:`stage_ops`), whose written
    tensors are the stage's own scratch: launched as it is, ``mutated`` ignored."""
    if direct:
        launch(*args)
        return
    # (is_compiling first: dynamo cannot trace is_inference_mode_enabled, a graph break under fullgraph=True)
    if mutated and not torch.compiler.is_compiling() and not torch.is_inference_mode_enabled():
        for t in mutated:  # as PyTorch's in-place ops (and so the twins) refuse; the custom op's dispatch does not
            if t.is_inference():
                raise RuntimeError(
                    "Inplace update to inference tensor outside InferenceMode is not allowed: an output "
                    "argument (out=, grad=) was created under torch.inference_mode(); write into it inside "
                    "inference_mode, or pass a tensor made outside it (e.g. t.clone())"
                )
    if _plain_eager(args):
        launch(*args)
        if mutated:
            torch.autograd.graph.increment_version(mutated)
    else:
        op(*args)


# --------------------------------------------------------------------------------------------------
# torch.library ops over the Triton launches (outputs are mutated arguments)


@torch.library.custom_op(
    "effdense::channel_stats", mutates_args=("mean", "var", "part_mean", "part_m2", "part_count")
)
def _channel_stats_op(
    x: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    part_mean: torch.Tensor,
    part_m2: torch.Tensor,
    part_count: torch.Tensor,
) -> None:
    _use_triton(x, "triton")
    _stats.channel_stats_launch(x, mean, var, part_mean, part_m2, part_count)


@_channel_stats_op.register_fake
def _(x, mean, var, part_mean, part_m2, part_count) -> None:
    return None


@torch.library.custom_op("effdense::bottleneck_forward", mutates_args=("y", "y_sum", "y_sqsum", "y_ref"))
def _bottleneck_forward_op(
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    weight: torch.Tensor,
    y: torch.Tensor,
    y_sum: torch.Tensor | None,
    y_sqsum: torch.Tensor | None,
    y_ref: torch.Tensor | None,
) -> None:
    _use_triton(x, "triton")
    _bottleneck.bottleneck_forward_launch(x, scale, shift, weight, y, y_sum, y_sqsum, y_ref)


@_bottleneck_forward_op.register_fake
def _(x, scale, shift, weight, y, y_sum, y_sqsum, y_ref) -> None:
    return None


@torch.library.custom_op("effdense::bottleneck_backward_weight", mutates_args=("dw",))
def _bottleneck_backward_weight_op(
    x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, dy: torch.Tensor, dw: torch.Tensor
) -> None:
    _use_triton(x, "triton")
    _bottleneck.bottleneck_backward_weight_launch(x, scale, shift, dy, dw)


@_bottleneck_backward_weight_op.register_fake
def _(x, scale, shift, dy, dw) -> None:
    return None


@torch.library.custom_op("effdense::bottleneck_backward_input", mutates_args=("dh", "sum_dh", "sum_dh_xmu"))
def _bottleneck_backward_input_op(
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    weight: torch.Tensor,
    dy: torch.Tensor,
    mean: torch.Tensor,
    dh: torch.Tensor,
    sum_dh: torch.Tensor,
    sum_dh_xmu: torch.Tensor,
) -> None:
    _use_triton(x, "triton")
    _bottleneck.bottleneck_backward_input_launch(x, scale, shift, weight, dy, mean, dh, sum_dh, sum_dh_xmu)


@_bottleneck_backward_input_op.register_fake
def _(x, scale, shift, weight, dy, mean, dh, sum_dh, sum_dh_xmu) -> None:
    return None


@torch.library.custom_op("effdense::bn_backward_accumulate", mutates_args=("grad",))
def _bn_backward_accumulate_op(
    grad: torch.Tensor,
    x: torch.Tensor,
    dh: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    gamma: torch.Tensor,
    sum_dh: torch.Tensor | None,
    sum_dh_xmu: torch.Tensor | None,
) -> None:
    _use_triton(x, "triton")
    _bottleneck.bn_backward_accumulate_launch(grad, x, dh, mean, invstd, gamma, sum_dh, sum_dh_xmu)


@_bn_backward_accumulate_op.register_fake
def _(grad, x, dh, mean, invstd, gamma, sum_dh, sum_dh_xmu) -> None:
    return None


# FLOP formulas for torch.utils.flop_counter.FlopCounterMode (which sees these ops, not the launches inside):
# each GEMM op is a 1x1 convolution's worth, 2*N*H*W*C*B; the statistics and BN-backward ops are elementwise
# and, like PyTorch's own batch_norm, not counted.


def _gemm_flops(x_shape, weight_or_dy_shape) -> int:
    n, c, h, w = x_shape
    return 2 * n * h * w * c * weight_or_dy_shape[1 if len(weight_or_dy_shape) == 4 else 0]


def _register_flop_formulas() -> None:
    from torch.utils.flop_counter import register_flop_formula

    ops = torch.ops.effdense
    register_flop_formula(ops.bottleneck_forward)(lambda x, scale, shift, weight, *_, **__: _gemm_flops(x, weight))
    register_flop_formula(ops.bottleneck_backward_weight)(lambda x, scale, shift, dy, *_, **__: _gemm_flops(x, dy))
    register_flop_formula(ops.bottleneck_backward_input)(lambda x, scale, shift, weight, *_, **__: _gemm_flops(x, weight))


_register_flop_formulas()


# --------------------------------------------------------------------------------------------------
# Public functions


def channel_stats(
    x: torch.Tensor, *, out: tuple[torch.Tensor, torch.Tensor] | None = None, backend: Backend = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel batch mean and biased variance (divided by ``N*H*W``) of ``x``.

    Args:
        x: ``(N, C, H, W)`` float32/bfloat16/float16 (float64 too, on the twin: ``backend="triton"``
            refuses it), (H, W) plane contiguous (a channel slice is fine).
        out: optional ``(mean, var)`` to write, fp32 ``[C]`` each (fp64 for fp64 x) with unit stride (slices
            of longer vectors are fine, e.g. the block's per-channel statistics); allocated if None.
        backend: ``"auto"``, ``"triton"`` or ``"reference"``.

    Returns:
        ``(mean, var)`` (``out`` itself when given), fp32 ``[C]`` each (fp64 for fp64 x); on Triton from
        tile sums shifted by each channel's first value and merged by Chan's formula; NaN when ``x`` has no
        values per channel (``N*H*W == 0``), as ``torch.var_mean``.
    """
    if not _use_triton(x, backend, out):  # (out: two vectors; x alone is indexed)
        return reference.channel_stats(x, out=out)
    _checks.check_activation("x", x)
    if out is None:
        return _stats_into(x, None)
    mean, var = _checks.check_stats_out(out, x.shape[1], x)
    return _stats_into(x, (mean, var), mutated=(mean, var))


def _stats_into(x, out, mutated: tuple = (), direct: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The statistics launch on checked arguments: writes ``out``'s ``(mean, var)``, allocated if None."""
    if out is None:
        mean = torch.empty(x.shape[1], dtype=torch.float32, device=x.device)  # the merge kernel writes every channel
        out = (mean, torch.empty_like(mean))
    mean, var = out
    if not x.numel():  # no values (N, H or W = 0): NaN as torch.var_mean and the twin; C = 0: nothing to do
        with torch.no_grad():  # as the kernels write: into an out= that requires grad too
            mean.fill_(float("nan"))
            var.fill_(float("nan"))
        return mean, var
    splits = _stats.stats_splits(x)
    parts = torch.empty((3, splits, x.shape[1]), dtype=torch.float32, device=x.device).unbind(0)  # one allocation
    _call(_channel_stats_op, _stats.channel_stats_launch, x, mean, var, *parts, mutated=mutated, direct=direct)
    return mean, var


def bottleneck_forward(
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    weight: torch.Tensor,
    *,
    stats: bool = True,
    chunk: int | None = None,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``y = conv1x1(relu(scale*x + shift), weight)`` with BN2's batch statistics from the epilogue.

    Args:
        x: ``(N, C, H, W)``, (H, W) plane contiguous, any channel offset/stride.
        scale, shift: fp32 ``[C]``, BN1's affine (``gamma*invstd``, ``beta - mean*gamma*invstd``).
        weight: ``(B, C)`` in x.dtype.
        stats: return the statistics; ``False`` returns ``None`` for them and skips computing them (the
            kernel's epilogue reductions and atomics; the PyTorch twin's passes over ``y``).
        chunk: the PyTorch twin materialises ``relu(scale*x + shift)`` at most this many input channels
            at a time (see :func:`reference.bottleneck_forward`); the kernel never materialises it and
            ignores this (a positive int or None on both).
        backend: ``"auto"``, ``"triton"`` or ``"reference"``.

    Returns:
        ``(y, mean, var)``: ``y`` contiguous ``(N, B, H, W)`` in x.dtype (fp32 accumulation); the batch
        mean and biased variance over (N, H, W) of ``y`` as stored, fp32 ``[B]`` (``None`` if not
        ``stats``; NaN for an empty batch, as ``torch.var_mean``). The kernel sums ``d = y - y[0, :, 0]``
        and forms ``E[d²] - E[d]²``: centred on a sample of each channel, the variance keeps its digits where
        the plain ``E[y²] - E[y]²`` cancels (a channel's mean large against its spread).
    """
    if not _use_triton(x, backend, scale, shift, weight, spans=(weight,)):
        return reference.bottleneck_forward(x, scale, shift, weight, stats=stats, chunk=chunk)
    _checks.check_forward(x, scale, shift, weight, chunk, stats)  # (chunk: unused here, but as wrong as on the twin)
    return _forward(x, scale, shift, weight, stats)


def _forward(x, scale, shift, weight, stats: bool, direct: bool = False):
    """The forward launches on checked arguments: ``(y, mean, var)`` as :func:`bottleneck_forward` returns them."""
    N, C, H, W = x.shape
    B = weight.shape[0]
    y = torch.empty((N, B, H, W), dtype=x.dtype, device=x.device)
    if not stats:  # (each output element is then one program's sum: no atomics)
        _call(_bottleneck_forward_op, _bottleneck.bottleneck_forward_launch, x, scale, shift, _rows(weight), y, None, None, None,
              direct=direct)  # fmt: skip
        return y, None, None
    _alert_atomics(x, "bottleneck_forward")
    # Σd and Σd² (the rows of one buffer, which become the returned mean and var) and the reference sample,
    # zeroed and filled by the launch's first kernel. (The reference was a third row of that buffer: kept alive
    # by the statistics a layer caches, 4*B bytes per layer more than shared's, and fused measured above shared.)
    d_sum, d_sqsum = torch.empty((2, B), dtype=torch.float32, device=x.device).unbind(0)
    ref = torch.empty(B, dtype=torch.float32, device=x.device)
    _call(
        _bottleneck_forward_op, _bottleneck.bottleneck_forward_launch,
        x, scale, shift, _rows(weight), y, d_sum, d_sqsum, ref, direct=direct,
    )  # fmt: skip
    # in place on the sums (three operators): var = E[d²] - E[d]², mean = ref + E[d]
    torch._foreach_div_([d_sum, d_sqsum], N * H * W)
    var = d_sqsum.addcmul_(d_sum, d_sum, value=-1).clamp_(min=0)
    return y, d_sum.add_(ref), var


def bottleneck_backward_weight(
    x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, dy: torch.Tensor, *, backend: Backend = "auto"
) -> torch.Tensor:
    """Weight gradient of the bottleneck: ``dW = Σ_n dy[n] · h[n]^T`` with ``h`` recomputed from ``x``.

    Args:
        x, scale, shift: as in :func:`bottleneck_forward`.
        dy: ``(N, B, H, W)`` in x.dtype, gradient of ``y``.
        backend: ``"auto"``, ``"triton"`` or ``"reference"``.

    Returns:
        fp32 ``(B, C)`` (fp32 accumulation; view it as the conv weight ``(B, C, 1, 1)`` and cast as needed).
    """
    rows = dy.shape[1] if isinstance(dy, torch.Tensor) and dy.dim() == 4 else 0  # (dW: (B, C))
    if not _use_triton(x, backend, scale, shift, dy, spans=(dy,), wgrad_rows=rows):
        return reference.bottleneck_backward_weight(x, scale, shift, dy)
    _checks.check_backward_weight(x, scale, shift, dy)
    return _weight_grad(x, scale, shift, dy)


def _weight_grad(x, scale, shift, dy, direct: bool = False) -> torch.Tensor:
    """The weight-gradient launch on checked arguments: a new fp32 ``(B, C)`` dW."""
    _alert_atomics(x, "bottleneck_backward_weight")
    dw = torch.zeros((dy.shape[1], x.shape[1]), dtype=torch.float32, device=x.device)
    if x.numel() and dy.numel():  # an empty sum is the zeros (the launch's grid would divide by zero)
        _call(_bottleneck_backward_weight_op, _bottleneck.bottleneck_backward_weight_launch, x, scale, shift, dy, dw, direct=direct)
    return dw


def bottleneck_backward_input(
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    weight: torch.Tensor,
    dy: torch.Tensor,
    mean: torch.Tensor,
    out: torch.Tensor | None = None,
    *,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradient through the conv1x1 and the ReLU, with BN1-backward's two reductions in the epilogue.

    Args:
        x, scale, shift, weight: as in :func:`bottleneck_forward`.
        dy: ``(N, B, H, W)`` in x.dtype.
        mean: fp32 ``[C]``, BN1's mean (the one that ``scale``/``shift`` were formed from).
        out: optional ``(N, C, H, W)`` tensor in x.dtype for ``dh`` (a channel slice of a reused scratch
            buffer is fine; one sharing memory with another argument is refused); allocated if None.
        backend: ``"auto"``, ``"triton"`` or ``"reference"``.

    Returns:
        ``(dh, sum_dh, sum_dh_xmu)``: ``dh = (weight^T · dy) * [scale*x + shift > 0]`` (``out`` itself when
        given), and fp32 ``[C]`` ``Σ dh`` and ``Σ dh*(x - mean)`` over (N, H, W), of ``dh`` as stored.
    """
    if not _use_triton(x, backend, scale, shift, weight, dy, mean, out, spans=(weight, dy, out)):
        return reference.bottleneck_backward_input(x, scale, shift, weight, dy, mean, out)
    _checks.check_backward_input(x, scale, shift, weight, dy, mean, out)
    return _backward_input(x, scale, shift, weight, dy, mean, out)


def _backward_input(x, scale, shift, weight, dy, mean, out, direct: bool = False):
    """:func:`bottleneck_backward_input` on checked arguments: ``(dh, sum_dh, sum_dh_xmu)``."""
    N, C, H, W = x.shape
    if out is None:
        out = torch.empty((N, C, H, W), dtype=x.dtype, device=x.device)
    sum_dh, sum_dh_xmu = _zero_pair(C, x)
    _input_grad(x, scale, shift, weight, dy, mean, out, sum_dh, sum_dh_xmu, direct=direct)
    return out, sum_dh, sum_dh_xmu


def _input_grad(x, scale, shift, weight, dy, mean, dh, sum_dh, sum_dh_xmu, direct: bool = False) -> None:
    """The input-gradient launch on checked arguments: writes ``dh``, adds into the zeroed sums."""
    _alert_atomics(x, "bottleneck_backward_input")
    _call(
        _bottleneck_backward_input_op, _bottleneck.bottleneck_backward_input_launch,
        x, scale, shift, _rows(weight), dy, mean, dh, sum_dh, sum_dh_xmu, mutated=(dh,), direct=direct,
    )  # fmt: skip


def bn_backward_accumulate(
    grad: torch.Tensor,
    x: torch.Tensor,
    dh: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    gamma: torch.Tensor,
    sum_dh: torch.Tensor,
    sum_dh_xmu: torch.Tensor,
    *,
    batch_stats: bool = True,
    backend: Backend = "auto",
) -> None:
    """BN1 backward, added in place into ``grad`` in fp32. With batch statistics:
    ``grad += gamma*invstd * (dh - sum_dh/M - (x-mean)*invstd² * sum_dh_xmu/M)``, ``M = N*H*W``; with
    running statistics (``batch_stats=False``, as an eval-mode BatchNorm): ``grad += gamma*invstd * dh``.

    Args:
        grad: ``(N, C, H, W)`` in x.dtype, updated in place (a channel slice of the block's gradient buffer).
        x, dh: ``(N, C, H, W)`` in x.dtype.
        mean, invstd, gamma, sum_dh, sum_dh_xmu: fp32 ``[C]``.
        batch_stats: ``mean``/``invstd`` are the batch's statistics (training). ``False``: they are running
            statistics; ``x``, ``mean`` and the two sums are then checked but not read, so a NaN or inf in
            ``x`` does not reach ``grad``, as in PyTorch's eval-mode BatchNorm backward.
        backend: ``"auto"``, ``"triton"`` or ``"reference"``.
    """
    if not _use_triton(x, backend, grad, dh, mean, invstd, gamma, sum_dh, sum_dh_xmu, spans=(grad, dh)):
        return reference.bn_backward_accumulate(
            grad, x, dh, mean, invstd, gamma, sum_dh, sum_dh_xmu, batch_stats=batch_stats
        )
    _checks.check_accumulate(grad, x, dh, mean, invstd, gamma, sum_dh, sum_dh_xmu)  # fp32 vectors: x is a kernel dtype
    _checks.check_flag("batch_stats", batch_stats)
    if x.numel():  # else nothing to update (and M = 0 would divide by zero)
        _accumulate(grad, x, dh, mean, invstd, gamma, *((sum_dh, sum_dh_xmu) if batch_stats else (None, None)))
    return None


def _accumulate(grad, x, dh, mean, invstd, gamma, sum_dh, sum_dh_xmu, direct: bool = False) -> None:
    """The BN-backward accumulation launch on checked arguments: adds into ``grad`` (a caller's tensor, or a
    view of one: its version moves, except under ``direct``, see :func:`_call`). Sums ``None``: running
    statistics."""
    _call(
        _bn_backward_accumulate_op, _bottleneck.bn_backward_accumulate_launch,
        grad, x, dh, mean, invstd, gamma, sum_dh, sum_dh_xmu, mutated=(grad,), direct=direct,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Differentiable functional op: relu(scale*x + shift) -> conv1x1, for standalone use (the strategies call the
# functions above from their own autograd Function)


@torch.library.custom_op("effdense::bn_relu_conv1x1", mutates_args=())
def _bn_relu_conv1x1_op(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    y, _, _ = bottleneck_forward(x, scale, shift, weight, stats=False)  # y only: no BN2 sums
    return y


@_bn_relu_conv1x1_op.register_fake
def _(x, scale, shift, weight):
    return x.new_empty((x.shape[0], weight.shape[0], x.shape[2], x.shape[3]))


torch.utils.flop_counter.register_flop_formula(torch.ops.effdense.bn_relu_conv1x1)(
    lambda x, scale, shift, weight, *_, **__: _gemm_flops(x, weight)
)


def _bn_relu_conv1x1_setup(ctx, inputs, output) -> None:
    x, scale, shift, weight = inputs
    ctx.save_for_backward(x, scale, shift, weight)


def _bn_relu_conv1x1_backward(ctx, dy):
    # y = W relu(u), u = scale*x + shift:  du = (W^T dy)*[u > 0];  dx = scale*du,
    # dscale = Σ du*x,  dshift = Σ du  (the input kernel's sums with mean = 0);  dW = Σ dy h^T.
    x, scale, shift, weight = ctx.saved_tensors
    if not torch.compiler.is_compiling() and legacy_batched(dy):
        if torch.is_grad_enabled():  # (create_graph=True: the node that raises cannot take batched gradients)
            raise RuntimeError(_ONCE.decode())
        return _batched_backward(x, scale, shift, weight, dy, ctx.needs_input_grad)
    dy = _plane_contiguous(dy)
    dx = dscale = dshift = dweight = None
    if ctx.needs_input_grad[3]:
        dweight = bottleneck_backward_weight(x, scale, shift, dy).to(weight.dtype)
    if any(ctx.needs_input_grad[:3]):
        du, dshift, dscale = bottleneck_backward_input(x, scale, shift, weight, dy, torch.zeros_like(scale))
        if ctx.needs_input_grad[0]:
            dx = torch.zeros_like(x, memory_format=torch.contiguous_format)
            zero = torch.zeros_like(scale)  # dx = scale*du: BN backward with unit invstd and no batch terms
            bn_backward_accumulate(dx, x, du, zero, torch.ones_like(scale), scale, zero, zero, batch_stats=False)
        del du
    return _once_if_graph((dx, dscale, dshift, dweight), dy, ctx.saved_tensors)


def _once_if_graph(grads, dy, saved):
    if torch.is_grad_enabled():  # create_graph=True: the kernels have no backward of their own
        # the gradients as outputs of a node that raises when differentiated (gradgradcheck, gradient
        # penalties), with edges to dy and the saved tensors that require grad: without it these gradients did
        # not depend on x, scale, shift or the weight, and second derivatives came out as zero
        # (once_differentiable links its node to dy only, so a gradient w.r.t. a saved input would miss it)
        live = [t for t in (dy, *saved) if t.requires_grad]
        if live:
            return differentiable_once(grads, _ONCE, links=live)
    return grads


def _batched_backward(x, scale, shift, weight, dy, needs):
    """The backward under the autograd engine's own batching (``is_grads_batched=True``, ``jacobian(...,
    vectorize=True)``), where ``dy`` is a batched tensor: the kernels cannot read its storage, and PyTorch's
    batching can neither run the twins' writes into unbatched outputs nor einsum or a view of it. So the op
    is recomputed from PyTorch's own (batchable) ops, in fp32 (fp64 for fp64) up to ``h``, which is rounded
    to x.dtype as the kernels' GEMM sees it, and differentiated by autograd."""
    acc = _checks.stats_dtype(x.dtype)
    # (no autocast a caller has open around the backward: the kernels' backward computes in x's dtype)
    with torch.enable_grad(), torch.autocast(x.device.type, enabled=False):
        leaves = [t.detach().requires_grad_(bool(n)) for t, n in zip((x, scale, shift, weight), needs)]
        xl, sl, bl, wl = leaves
        h = torch.relu(xl.to(acc) * sl.view(-1, 1, 1) + bl.view(-1, 1, 1)).to(x.dtype)
        y = torch.nn.functional.conv2d(h, wl.view(*wl.shape, 1, 1))
        got = iter(torch.autograd.grad(y, [t for t, n in zip(leaves, needs) if n], dy))
    return tuple(next(got) if n else None for n in needs)


_ONCE = (
    b"effdense::bn_relu_conv1x1 is differentiable once: its backward runs the bottleneck kernels, "
    b"which have no backward of their own, so double backward is not supported"
)


torch.library.register_autograd(
    "effdense::bn_relu_conv1x1", _bn_relu_conv1x1_backward, setup_context=_bn_relu_conv1x1_setup
)


def bn_relu_conv1x1(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Differentiable ``conv1x1(relu(scale*x + shift), weight)`` built on the bottleneck kernels.

    Args:
        x: ``(N, C, H, W)``, (H, W) plane contiguous.
        scale, shift: fp32 ``[C]`` (fp64 for fp64 x; differentiable).
        weight: ``(B, C)`` or ``(B, C, 1, 1)`` in x.dtype (differentiable).

    Returns:
        ``(N, B, H, W)`` contiguous in x.dtype. Gradients flow to x, scale, shift and weight; the backend is
        chosen as ``"auto"`` (Triton on CUDA or under the interpreter, else the PyTorch twins).

    Differentiable once, in reverse mode (``.backward()``, ``torch.autograd.grad``, also under
    ``torch.func.vmap`` and with ``is_grads_batched=True``, which runs PyTorch's ops instead of the
    kernels): differentiating its gradients again (double backward), forward-mode AD
    (``torch.autograd.forward_ad``, ``torch.func.jvp``) and ``torch.func.grad``/``vjp``/``jacrev`` raise.

    Under ``torch.autocast`` for x's device, ``x`` and ``weight`` are cast to the autocast dtype first, as
    autocast casts a convolution's input and weight (float64 stays float64); ``scale``/``shift`` stay fp32.
    """
    if isinstance(weight, torch.Tensor) and weight.dim() == 4 and weight.shape[2:] == (1, 1):
        weight = weight.flatten(1)  # (B, C, 1, 1); a k x k kernel is refused with its own shape
    if isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor) and _autocasting(x):
        dtype = torch.get_autocast_dtype(x.device.type)
        if x.dtype != torch.float64 and (x.dtype != dtype or weight.dtype != dtype):
            x, weight = x.to(dtype), weight.to(dtype)
    _checks.check_affine(x, scale, shift)
    _checks.check_weight(weight, x)
    if _forward_ad._current_level >= 0 or _functorch_active():  # (two flag reads on the common path)
        _check_autodiff(x, scale, shift, weight)
    return _bn_relu_conv1x1_op(x, scale, shift, weight)


def _autocasting(x: torch.Tensor) -> bool:
    """Whether autocast is on for ``x``'s device type (a floating-point x; none for ``meta``, which has no
    autocast: asking raised "unknown device type for autocast")."""
    dev = x.device.type
    return x.is_floating_point() and torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev)


def _check_autodiff(*inputs: torch.Tensor) -> None:
    """Refuse the differentiation modes that the op's ``torch.library`` registration (a backward only) does
    not support, instead of a wrong answer or PyTorch's message about ``autograd.Function.setup_context``:

    * forward mode (``torch.autograd.forward_ad``, ``torch.func.jvp``/``jacfwd``/``hessian``): the op has no
      forward derivative, and PyTorch ran it on the primals alone, so tangents came out as zero (or ``None``);
    * ``torch.func.grad``/``vjp``/``jacrev``, which need an ``autograd.Function`` with ``setup_context``.

    ``torch.func.vmap`` and ordinary autograd (``.backward()``, ``torch.autograd.grad``) work."""
    if _forward_ad._current_level >= 0:  # a dual level is open: is any input a dual tensor?
        try:
            dual = any(_forward_ad.unpack_dual(t).tangent is not None for t in inputs)
        except RuntimeError:  # e.g. jvp over vmap: unpack_dual has no batching rule; assume a tangent
            dual = True
        if dual:
            raise NotImplementedError(
                "bn_relu_conv1x1: forward-mode AD (torch.autograd.forward_ad, torch.func.jvp/jacfwd/hessian) "
                "is not supported: the op has no forward derivative; use reverse mode (.backward(), "
                "torch.autograd.grad)"
            )
    # an input transformed by a grad transform: a grad-tracking wrapper, or a wrapper of one (grad over vmap);
    # a plain tensor that merely requires grad (a trainable weight captured by the function) is not
    functorch = torch._C._functorch
    if _functorch_active() and any(
        functorch.is_gradtrackingtensor(t) or (functorch.is_functorch_wrapped_tensor(t) and t.requires_grad)
        for t in inputs
    ):
        from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

        if any(i.key() == torch._C._functorch.TransformType.Grad for i in retrieve_all_functorch_interpreters()):
            raise NotImplementedError(
                "bn_relu_conv1x1: torch.func.grad/vjp/jacrev are not supported (the op's backward is registered "
                "for torch.autograd only); use .backward() or torch.autograd.grad, which also work under "
                "torch.func.vmap and torch.func.functional_call"
            )


def bottleneck_backward(
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    weight: torch.Tensor,
    dy: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    gamma: torch.Tensor,
    grad: torch.Tensor,
    *,
    batch_stats: bool = True,
    chunk: int | None = None,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The bottleneck's whole backward when BN1's statistics are local (no SyncBatchNorm): the weight
    gradient, the input gradient through ReLU and BN1 added into ``grad``, and BN1's affine gradients.

    On Triton: the weight-gradient kernel once over all channels, then per channel chunk the input-gradient
    kernel (into one ``dh`` scratch the width of a chunk, its sums into slices of one zeroed buffer) and the
    BN-backward accumulation: the kernels of :func:`bottleneck_backward_weight`,
    :func:`bottleneck_backward_input` and :func:`bn_backward_accumulate`, with one allocation of each
    output per call instead of per chunk. Under SyncBatchNorm the two BN sums must be all-reduced between
    the last two, so callers use those three functions directly.

    Args:
        x, scale, shift, weight, dy, mean: as in :func:`bottleneck_backward_input`.
        invstd, gamma: fp32 ``[C]``, BN1's ``1/sqrt(var + eps)`` and weight.
        grad: ``(N, C, H, W)`` in x.dtype, updated in place (a channel slice of the block's gradient buffer;
            it may be ``x`` itself, but must not overlap ``x`` otherwise, nor ``dy`` when working in chunks:
            both are refused).
        batch_stats: BN1 normalised with batch statistics (training); ``False``: with running statistics,
            given as ``mean``/``invstd``, and no gradient terms through them.
        chunk: at most this many input channels at a time for the input gradient (``None``: all), which
            bounds its temporaries: the kernels' ``dh`` scratch, ``(N, chunk, H, W)`` in x.dtype; the twins'
            normalised input and ``dh``. The results do not depend on it.
        backend: ``"auto"``, ``"triton"`` or ``"reference"``.

    Returns:
        ``(dW, dgamma, dbeta)``: fp32 ``(B, C)``, and fp32 ``[C]`` ``Σ dh*(x - mean)*invstd`` and ``Σ dh``.
    """
    if not _use_triton(x, backend, scale, shift, weight, dy, mean, invstd, gamma, grad, spans=(weight, dy, grad)):
        return reference.bottleneck_backward(
            x, scale, shift, weight, dy, mean, invstd, gamma, grad, batch_stats=batch_stats, chunk=chunk
        )
    _checks.check_backward(x, scale, shift, weight, dy, mean, invstd, gamma, grad, chunk, batch_stats)
    return _backward(x, scale, shift, weight, dy, mean, invstd, gamma, grad, batch_stats, chunk)


def _backward(x, scale, shift, weight, dy, mean, invstd, gamma, grad, batch_stats: bool, chunk, direct: bool = False):
    """:func:`bottleneck_backward` on checked arguments (``direct``: see :func:`stage_ops`)."""
    N, C, H, W = x.shape
    dw = _weight_grad(x, scale, shift, dy, direct)
    if not (x.numel() and dy.numel()):  # N, C, H, W or B = 0: nothing to add into grad, zero sums
        return (dw, *_zero_pair(C, x))
    sum_dh, sum_dh_xmu = _zero_pair(C, x)
    chunks = _checks.channel_chunks(C, chunk)
    if len(chunks) > 1 and not direct:  # a later chunk reads all of dy after an earlier one has added into grad
        _checks.check_disjoint("grad", grad, dy=dy)
    scratch = torch.empty((N, chunks[0][1] - chunks[0][0], H, W), dtype=x.dtype, device=x.device)  # widest first
    for c0, c1 in chunks:
        if c1 - c0 == C:  # one chunk: no slicing (each view costs host time too)
            xs, sc, sh, wc, mn, isd, gm, sd, sx, g, dh = x, scale, shift, weight, mean, invstd, gamma, sum_dh, sum_dh_xmu, grad, scratch
        else:
            xs, wc, g, dh = x[:, c0:c1], weight[:, c0:c1], grad[:, c0:c1], scratch[:, : c1 - c0]
            sc, sh, mn, isd, gm, sd, sx = (v[c0:c1] for v in (scale, shift, mean, invstd, gamma, sum_dh, sum_dh_xmu))
        _input_grad(xs, sc, sh, wc, dy, mn, dh, sd, sx, direct=direct)
        # running statistics: no terms through the mean and variance (the launch's None sums)
        _accumulate(g, xs, dh, mn, isd, gm, *((sd, sx) if batch_stats else (None, None)), direct=direct)
    del scratch
    # dgamma in place: the two rows of one buffer (an invstd that requires grad must not make it differentiable)
    return dw, sum_dh_xmu.mul_(invstd.detach() if invstd.requires_grad else invstd), sum_dh


# --------------------------------------------------------------------------------------------------
# The strategies' entry points: checked once per pass of a dense stage, not on every call


def stage_ops(buffer: torch.Tensor, params: Sequence[torch.Tensor], *others: torch.Tensor) -> type | None:
    """For the dense-stage autograd Function of strategy ``fused`` (``effdense.strategies.shared``): the
    namespace of kernel entry points that one pass of a stage (its forward, or its backward) may call instead
    of the public functions above, or None where it must call those.

    A stage's forward makes ~130 kernel calls and its backward as many, every one on tensors the Function
    made itself (slices of one contiguous block buffer, the gradient buffer like it, fp32 statistics and
    affine vectors, fresh outputs) or on the stage's parameters. The public functions check every argument
    and choose the backend on every call (tens of microseconds of host time each, on the step that small GPU
    steps are bound by: benchmarks/host_overhead.py). Here that is decided once, for the pass, from what the
    calls could differ in: the stage's block ``buffer``, in the dtype the kernels compute in; the parameters
    ``params``; ``others``, the pass's other inputs (the stage's input in forward, the incoming gradient in
    backward). :class:`_StageOps` applies when all of these hold, as the public functions would decide on
    each call:

    * the kernels run (``backend="auto"`` picks them): a kernel dtype, :func:`kernels_available` for the
      device, no ``torch.func`` transform;
    * plain eager execution (:func:`_plain_eager`): plain tensors with data, no dispatch mode, no
      ``torch.compile`` tracing, so the launches go directly, without the ``torch.library`` ops;
    * the buffer contiguous (the Function allocates it so; a saved-tensor unpack hook may give it back otherwise);
    * every parameter on the buffer's device, and each 1-D one (a BatchNorm's weight and bias, read as per-channel
      vectors) with unit stride (the Function checks their lengths, and the running statistics it hands on);
    * every tensor of the pass within the kernels' 32-bit offsets (:func:`._checks.int32_span_error`): a
      contiguous ``(N, max(C, R), H, W)`` tensor and an ``(R, C)`` weight bound all of them, for the buffer's
      ``(N, C, H, W)`` and ``R`` the most output channels of the stage's convolutions.

    The Function builds the shapes, layouts and dtypes that the per-call checks would verify; the gradients
    that reach the kernels through PyTorch's operators (a convolution's backward may answer in another memory
    format) are made plane-contiguous by :class:`_StageOps` itself."""
    x = buffer
    if not (x.dtype in _checks.KERNEL_DTYPES and kernels_available(x.device) and _plain_eager((x, *params, *others))):
        return None
    if not x.is_contiguous():  # (a saved buffer an unpack hook gave back in another layout)
        return None
    device, rows = x.device, 0
    for p in params:
        if p.device != device:
            return None
        dim = p.dim()
        if dim == 1:
            if not p.is_contiguous():
                return None
        elif dim == 0:
            return None
        elif p.shape[0] > rows:  # (a convolution's out_channels)
            rows = p.shape[0]
    for t in others:
        if t.device != device:
            return None
    N, channels, H, W = x.shape
    return _StageOps if _stage_fits_int32(N, channels, H * W, rows) else None


def _stage_fits_int32(N: int, C: int, P: int, rows: int) -> bool:
    """Whether every tensor of a stage's pass is within the kernels' 32-bit offsets (the bounds of
    :func:`._checks.int32_span_error`): ``N*P`` values per channel of its ``(N, C, H, W)`` buffer (``P = H*W``)
    and of every other activation, the channel spans of contiguous tensors of at most ``max(C, rows)``
    channels, and ``(rows, C)`` weights and weight gradients, ``rows`` the most output channels of its
    convolutions."""
    span = _checks.INT32_SPAN
    return N * P <= span and max(C, rows) * P <= span and rows * C <= span


class _StageOps:
    """The kernel entry points of :func:`stage_ops`: the public functions' signatures (without ``backend``),
    their results and kernels, without their argument checks, each launch direct. Their ``out=`` and ``grad``
    arguments must be the caller's own scratch (the stage's statistics and gradient buffers): unlike the public
    functions, they neither move those tensors' version counters nor refuse inference tensors there."""

    @staticmethod
    def channel_stats(x, *, out=None):
        return _stats_into(x, out, direct=True)

    @staticmethod
    def bottleneck_forward(x, scale, shift, weight, *, stats=True, chunk=None):
        return _forward(x, scale, shift, weight, stats, direct=True)

    @staticmethod
    def bottleneck_backward_weight(x, scale, shift, dy):
        return _weight_grad(x, scale, shift, _plane_contiguous(dy), direct=True)

    @staticmethod
    def bottleneck_backward_input(x, scale, shift, weight, dy, mean, out=None):
        return _backward_input(x, scale, shift, weight, _plane_contiguous(dy), mean, out, direct=True)

    @staticmethod
    def bn_backward_accumulate(grad, x, dh, mean, invstd, gamma, sum_dh, sum_dh_xmu, *, batch_stats=True):
        if x.numel():
            sums = (sum_dh, sum_dh_xmu) if batch_stats else (None, None)
            _accumulate(grad, x, _plane_contiguous(dh), mean, invstd, gamma, *sums, direct=True)

    @staticmethod
    def bottleneck_backward(x, scale, shift, weight, dy, mean, invstd, gamma, grad, *, batch_stats=True, chunk=None):
        return _backward(x, scale, shift, weight, _plane_contiguous(dy), mean, invstd, gamma, grad, batch_stats, chunk, direct=True)
