"""Pure-PyTorch twins of the Triton bottleneck kernels: the CPU path of effdense and the kernels' test oracle.

Same signatures and the same numerics contract as :mod:`effdense.kernels.ops`: statistics and reductions in
fp32, ``h = relu(scale*x + shift)`` formed in fp32 and rounded to ``x.dtype`` before the matrix product
(what autocast feeds a convolution), outputs in ``x.dtype`` except the fp32 weight gradient and sums.
Besides its outputs, each function allocates a few temporaries the size of ``x`` (or, with ``chunk=``,
of a channel chunk of it; in fp32), e.g. the matrix product and the ReLU mask at once.

Shapes: ``x`` is ``(N, C, H, W)`` with a contiguous (H, W) plane (a channel slice of a larger buffer is fine),
``weight`` is ``(B, C)``, ``dy`` is ``(N, B, H, W)``, per-channel vectors are fp32 ``[C]`` (or ``[B]``).

Like the kernels, the twins are not differentiable: they run as under ``torch.no_grad()`` whatever their
inputs (outputs never require grad; ``out``/``grad`` arguments are written even if they require grad).
Differentiable use goes through :func:`effdense.kernels.bn_relu_conv1x1`.
"""

from __future__ import annotations

import functools
from typing import Callable, TypeVar

import torch

from effdense.kernels import _checks

# channel_stats forms deviations from the mean in chunks of at most this many elements (4 MiB in fp32)
_STATS_CHUNK = 1 << 20

_F = TypeVar("_F", bound=Callable)


def _no_grad(fn: _F) -> _F:
    """Run ``fn`` with gradients off, as the kernels run: outputs do not require grad even when an input
    does, and ``out=``/in-place writes into tensors that require grad are allowed. One flag read when grad
    mode is already off (the strategies call the twins inside an ``autograd.Function``)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not torch.is_grad_enabled():
            return fn(*args, **kwargs)
        with torch.no_grad():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: True)


def _threshold_backward_into(g: torch.Tensor, pre: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """ReLU's backward, PyTorch's own (``g`` where ``pre > 0``, else 0), written into ``out`` (which may be
    ``g``). Under a ``torch.func`` transform as a new tensor copied in: vmap's batching cannot run the
    ``out=`` form."""
    if _functorch_active():
        return out.copy_(torch.ops.aten.threshold_backward(g, pre, 0))
    return torch.ops.aten.threshold_backward.grad_input(g, pre, 0, grad_input=out)


def _col(v: torch.Tensor) -> torch.Tensor:
    return v.view(1, -1, 1, 1)


def _affine(
    x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, out: torch.Tensor | None = None, dim: int = 1
) -> torch.Tensor:
    """``scale*x + shift`` per channel (``[C]`` vectors against ``dim`` of 4-D ``x``) in the vectors' precision.

    A multiply and an in-place add: on CPU ``torch.addcmul`` with a broadcast ``shift`` as its first
    argument takes a slow path, four times the time of these two passes."""
    shape = (-1,) + (1,) * (x.dim() - 1 - dim)
    scale, shift = scale.view(shape), shift.view(shape)
    y = torch.mul(x, scale) if out is None else torch.mul(x, scale, out=out)
    return y.add_(shift)


def _wmm(w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``w @ t[n]`` for each ``n`` of a ``(N, K, P)`` batch: one batched GEMM with ``w`` broadcast (batch
    stride 0). ``torch.matmul`` of a matrix and a batch instead folds the batch into one GEMM over
    ``t.mT``, which copies both ``t`` and the result (two extra passes)."""
    return torch.bmm(w.expand(t.shape[0], *w.shape), t)


def _relu_affine(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``relu(scale*x + shift)`` in fp32 (type promotion: fp32 vectors), as a fresh NCHW tensor."""
    return _affine(x, scale, shift).relu_()


# (the argument checks shared with the Triton wrappers live in _checks; these names are kept for callers)
_check_affine = _checks.check_affine
check_chunk = _checks.check_chunk
channel_chunks = _checks.channel_chunks


@_no_grad
def channel_stats(
    x: torch.Tensor, *, out: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel batch mean and biased variance of ``x`` over (N, H, W), fp32 ``[C]`` each (fp64 for fp64
    ``x``); written into ``out = (mean, var)`` and returned when given.

    Numerically safe for means large against the spread. (Its sums are fp32: values whose sum over
    ``N*H*W`` passes fp32's range, near 3e38 each, give an inf mean, where ``torch.var_mean`` and the Triton
    kernel do not overflow.) On CUDA, fp32/fp64: ``torch.var_mean`` (Welford; one kernel).
    Elsewhere two passes (the mean, then the mean squared deviation from it, less the square of the mean
    deviation, which is the first mean's rounding error: the corrected two-pass formula) over channel chunks of at
    most ``_STATS_CHUNK`` elements, so the deviation temporary stays small: on CPU several times faster
    than ``torch.var_mean`` over a strided slice of a block buffer; in bf16/fp16 accumulated in fp32."""
    _checks.check_activation("x", x)
    if out is not None:
        _checks.check_stats_out(out, x.shape[1], x)
    acc = _checks.stats_dtype(x.dtype)
    if x.device.type == "cuda" and x.dtype == acc:
        var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    else:
        mean, var = _two_pass_stats(x, acc)
    if out is None:
        return mean, var
    out[0].copy_(mean)
    out[1].copy_(var)
    return out[0], out[1]


def _two_pass_stats(x: torch.Tensor, acc: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    N, C, H, W = x.shape
    M = N * H * W
    step = max(1, _STATS_CHUNK // max(1, M))
    parts = []
    for c0 in range(0, C, step):
        part = x[:, c0 : c0 + step]
        m = part.sum(dim=(0, 2, 3), dtype=acc).div_(M)
        d = torch.sub(part, m.view(-1, 1, 1))  # acc by promotion
        # corrected two-pass: the mean deviation e is the rounding error of m, which E[d²] alone counts as
        # variance (2e-3 relative at mean 1e4, std 1e-2 in fp32); E[d²] - e² removes it
        e = d.sum(dim=(0, 2, 3)).div_(M)
        var = d.mul_(d).sum(dim=(0, 2, 3)).div_(M).sub_(e * e).clamp_(min=0)
        parts.append((m.add_(torch.where(m.isfinite(), e, 0)), var))  # (an inf mean stays inf, as the kernel's)
        del d
    if len(parts) == 1:
        return parts[0]
    if not parts:  # C = 0
        return x.new_empty(0, dtype=acc), x.new_empty(0, dtype=acc)
    return torch.cat([m for m, _ in parts]), torch.cat([v for _, v in parts])


@_no_grad
def bottleneck_forward(
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    weight: torch.Tensor,
    *,
    stats: bool = True,
    chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``y = conv1x1(relu(scale*x + shift), weight)`` in x.dtype, with the fp32 batch mean and biased
    variance per output channel of ``y`` as stored (two passes; ``None`` for both when not ``stats``, NaN
    for an empty batch).

    ``chunk``: form ``h`` (fp32, the size of ``x``) at most that many input channels at a time, so the
    temporary stays a few bottleneck outputs wide however wide ``x`` is. The chunks' products are summed in
    fp32 (fp64 for fp64; in place into ``y``: ``baddbmm_``); for bf16/fp16 each chunk's GEMM accumulates in
    fp32 but returns its product in x.dtype, as PyTorch's GEMMs in that dtype do, so a chunked ``y`` carries
    one rounding per chunk where an unchunked one (and the Triton kernel's) carries one in all. On CPU,
    chunks of about the output width are also faster than one wide ``h``, which falls out of cache."""
    _checks.check_forward(x, scale, shift, weight, chunk, stats)
    N, C, H, W = x.shape
    B = weight.shape[0]
    acc = _checks.stats_dtype(x.dtype)
    y = None
    for c0, c1 in channel_chunks(C, chunk):
        h = _relu_affine(x[:, c0:c1], scale[c0:c1], shift[c0:c1]).reshape(N, c1 - c0, H * W)  # (a copy only for overlapping channels)
        w = weight[:, c0:c1].contiguous()
        if y is None:  # fp32 accumulation inside the GEMM; in x.dtype for a single chunk
            y = _wmm(w, h if h.dtype == x.dtype else h.to(x.dtype))
            if c1 < C and y.dtype != acc:
                y = y.to(acc)
        elif x.dtype == acc:
            y.baddbmm_(w.expand(N, *w.shape), h)
        else:  # low precision: each chunk's GEMM sees h rounded to x.dtype, as the kernel's does
            y.add_(_wmm(w, h.to(x.dtype)))
        del h
    # reshaped without becoming a view: an autograd op's output that is a view (bn_relu_conv1x1's, on the
    # twins) refuses in-place changes, such as a ReLU(inplace=True) after it
    y = torch.ops.aten._unsafe_view(y.to(x.dtype), (N, B, H, W))
    if not stats:
        return y, None, None
    if not y.numel():  # (torch.var_mean warns about an empty reduction)
        nan = torch.full((B,), float("nan"), dtype=acc, device=x.device)
        return y, nan, nan.clone()
    var, mean = torch.var_mean(y if y.dtype == acc else y.to(acc), dim=(0, 2, 3), correction=0)
    return y, mean, var


@_no_grad
def bottleneck_backward_weight(
    x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, dy: torch.Tensor
) -> torch.Tensor:
    """``dW = Σ_n dy[n] · h[n]^T`` as fp32 ``(B, C)``, with ``h`` recomputed (rounded to x.dtype) from ``x``."""
    _checks.check_backward_weight(x, scale, shift, dy)
    N, C, H, W = x.shape
    B = dy.shape[1]
    acc = _checks.stats_dtype(x.dtype)
    h = _relu_affine(x, scale, shift)  # (N, C, H, W) in acc
    if x.dtype != acc:
        h = h.to(x.dtype).to(acc)  # the kernel's GEMM sees h in x.dtype; products of those are exact in fp32
    return _weight_grad_sum(dy.reshape(N, B, H * W).to(acc), h.reshape(N, C, H * W))


def _weight_grad_sum(d: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``Σ_n d[n] · h[n]^T`` for ``d`` (N, B, P) and ``h`` (N, C, P): ``(B, C)``. With planes of at least
    B·C/(B+C) pixels, one batched GEMM over n and the sum over n (an (N, B, C) temporary, no copy of d or h);
    with smaller planes (late blocks of an ImageNet model on small inputs), where that temporary would be the
    largest of the step (N·B·C against N·P·(B+C): 128 MiB of 184 at peak for DenseNet-121 b64 at 29x29),
    one 2-D GEMM over (n, pixel) after copying d and h into (B, N·P) and (C, N·P)."""
    N, B, P = d.shape
    C = h.shape[1]
    if P * (B + C) >= B * C:
        return torch.matmul(d, h.transpose(1, 2)).sum(dim=0)
    return torch.mm(d.transpose(0, 1).reshape(B, N * P), h.transpose(0, 1).reshape(C, N * P).t())


@_no_grad
def bottleneck_backward_input(
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    weight: torch.Tensor,
    dy: torch.Tensor,
    mean: torch.Tensor,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``dh = (weight^T · dy) * [scale*x + shift > 0]`` into ``out`` (x.dtype), with fp32 ``Σdh`` and ``Σdh·(x-mean)``.
    The mask is ReLU's backward in PyTorch (``threshold_backward``): a NaN pre-activation passes its gradient."""
    _checks.check_backward_input(x, scale, shift, weight, dy, mean, out)
    N, C, H, W = x.shape
    B = weight.shape[0]
    acc = _checks.stats_dtype(x.dtype)
    g = _wmm(weight.contiguous().t(), dy.reshape(N, B, H * W)).view(N, C, H, W)
    # ReLU's backward, PyTorch's own: zero where the (fp32) pre-activation is <= 0, g elsewhere (a NaN
    # pre-activation passes g, and a NaN in g stays out of the masked positions), written into out
    pre = _affine(x, scale, shift)
    if out is None and _functorch_active():  # a new tensor: under vmap g may be batched, an empty out would not be
        out = torch.ops.aten.threshold_backward(g, pre, 0).to(x.dtype)
    else:
        if out is None:
            out = torch.empty((N, C, H, W), dtype=x.dtype, device=x.device)
        _threshold_backward_into(g, pre, out)
    del pre
    del g
    dh = out if out.dtype == acc else out.to(acc)
    sum_dh = dh.sum(dim=(0, 2, 3))
    xmu = torch.sub(x, _col(mean))  # fp32 by promotion
    # (in place unless a torch.func transform runs: under vmap dh may be batched where xmu is not)
    sum_dh_xmu = (xmu * dh if _functorch_active() else xmu.mul_(dh)).sum(dim=(0, 2, 3))
    return out, sum_dh, sum_dh_xmu


@_no_grad
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
) -> None:
    """``grad += gamma*invstd * (dh - Σdh/M - (x-mean)*invstd²*Σdh(x-mean)/M)``, in fp32, in place; with
    ``batch_stats=False`` (running statistics) ``grad += gamma*invstd * dh``, ``x`` not read."""
    _checks.check_accumulate(grad, x, dh, mean, invstd, gamma, sum_dh, sum_dh_xmu)
    _checks.check_flag("batch_stats", batch_stats)
    a = gamma * invstd
    if not batch_stats:  # fp32 by promotion, rounded once into grad
        grad.add_(torch.mul(dh, _col(a)))
        return
    M = x.shape[0] * x.shape[2] * x.shape[3]
    # per channel: grad += a*dh + b*(x-mean) + c, formed in fp32 and rounded once into grad (4 passes)
    b = -a * invstd * invstd * sum_dh_xmu / M
    c = -a * sum_dh / M
    t = torch.sub(x, _col(mean))  # fp32 by promotion
    grad.add_(t.mul_(_col(b)).add_(_col(c)).addcmul_(dh, _col(a)))


@_no_grad
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The whole backward of ``y = weight · relu(bn(x))`` on statistics local to this process: the input
    gradient added into ``grad``; returns ``(dW fp32 (B, C), dgamma, dbeta)``. ``bn`` uses the batch
    statistics ``(mean, invstd)`` if ``batch_stats``, else the same vectors as running statistics.
    ``chunk``: at most this many channels at a time (each chunk's results depend only on its channels),
    which bounds the temporaries below to a chunk's width.

    Equals :func:`bottleneck_backward_weight`, :func:`bottleneck_backward_input` and
    :func:`bn_backward_accumulate` in turn (their path for low precision and running statistics). For
    fp32/fp64 with batch statistics it runs in fewer passes: ``h`` is formed once for both GEMMs, the ReLU
    mask is one ``threshold_backward``, and BatchNorm's backward is ATen's own kernel (on a contiguous copy
    of the ``x`` slice: its strided path is several times slower on CPU)."""
    _checks.check_backward(x, scale, shift, weight, dy, mean, invstd, gamma, grad, chunk, batch_stats)
    N, C, H, W = x.shape
    B = weight.shape[0]
    acc = _checks.stats_dtype(x.dtype)
    chunks = channel_chunks(C, chunk)
    if len(chunks) > 1:
        _checks.check_disjoint("grad", grad, dy=dy)  # a later chunk reads all of dy after grad was updated
        parts = [
            bottleneck_backward(
                x[:, c0:c1], scale[c0:c1], shift[c0:c1], weight[:, c0:c1], dy, mean[c0:c1], invstd[c0:c1],
                gamma[c0:c1], grad[:, c0:c1], batch_stats=batch_stats,
            )
            for c0, c1 in chunks
        ]
        return tuple(torch.cat(t, dim=-1) for t in zip(*parts))  # type: ignore[return-value]
    if not (batch_stats and x.dtype == acc and x.numel()):  # (ATen's BN backward crashes on empty input)
        return _three_step_backward(x, scale, shift, weight, dy, mean, invstd, gamma, grad, batch_stats)
    xc = x.contiguous()
    h = _relu_affine(xc, scale, shift)
    d = dy.reshape(N, B, H * W)
    dw = _weight_grad_sum(d, h.view(N, C, H * W))
    g = _wmm(weight.contiguous().t(), d).view(N, C, H, W)  # (a strided slice would cost a copy of g)
    # relu's mask, in place: h > 0 exactly where scale*x + shift > 0
    dh = _threshold_backward_into(g, h, g)
    del h
    dx, dgamma, dbeta = torch.ops.aten.native_batch_norm_backward(
        dh, xc, gamma, None, None, mean, invstd, True, 0.0, [True, True, True]
    )
    grad.add_(dx)
    return dw, dgamma, dbeta


def _three_step_backward(
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    weight: torch.Tensor,
    dy: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    gamma: torch.Tensor,
    grad: torch.Tensor,
    batch_stats: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``bottleneck_backward`` as its three twins in turn: :func:`bottleneck_backward_weight`,
    :func:`bottleneck_backward_input` and :func:`bn_backward_accumulate`."""
    dw = bottleneck_backward_weight(x, scale, shift, dy)
    dh, sum_dh, sum_dh_xmu = bottleneck_backward_input(x, scale, shift, weight, dy, mean)
    dgamma, dbeta = sum_dh_xmu * invstd, sum_dh  # accumulate reads the sums, never writes them
    bn_backward_accumulate(grad, x, dh, mean, invstd, gamma, sum_dh, sum_dh_xmu, batch_stats=batch_stats)
    return dw, dgamma, dbeta
