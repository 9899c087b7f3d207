"""Pure-PyTorch twins of the Triton bottleneck kernels: the CPU path of effdense and the kernels' test oracle.

Same signatures and the same numerics contract as :mod:`effdense.kernels.ops`: statistics and reductions in
fp32, ``h = relu(scale*x + shift)`` formed in fp32 and rounded to ``x.dtype`` before the matrix product
(what autocast feeds a convolution), outputs in ``x.dtype`` except the fp32 weight gradient and sums.
Each function allocates at most one activation-sized fp32 temporary at a time, besides its outputs.

Shapes: ``x`` is ``(N, C, H, W)`` with a contiguous (H, W) plane (a channel slice of a larger buffer is fine),
``weight`` is ``(B, C)``, ``dy`` is ``(N, B, H, W)``, per-channel vectors are fp32 ``[C]`` (or ``[B]``).
"""

from __future__ import annotations

import torch

from effdense.kernels import _checks

# channel_stats upcasts low-precision inputs in chunks of at most this many elements
_STATS_CHUNK = 1 << 24


def _col(v: torch.Tensor) -> torch.Tensor:
    return v.view(1, -1, 1, 1)


def _relu_affine(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``relu(scale*x + shift)`` in fp32 (type promotion: fp32 vectors), as a fresh NCHW tensor."""
    return torch.addcmul(_col(shift), x, _col(scale)).relu_()


def _check_affine(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> None:
    _checks.check_activation("x", x)
    acc = _checks.stats_dtype(x.dtype)
    _checks.check_vector("scale", scale, x.shape[1], x.device, acc)
    _checks.check_vector("shift", shift, x.shape[1], x.device, acc)


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel batch mean and biased variance of ``x`` over (N, H, W), fp32 ``[C]`` each (fp64 for fp64 ``x``)."""
    _checks.check_activation("x", x)
    if x.dtype in (torch.float32, torch.float64):
        var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)  # Welford in ATen: safe for large means
        return mean, var
    N, C, H, W = x.shape
    mean = torch.empty(C, dtype=torch.float32, device=x.device)
    var = torch.empty_like(mean)
    step = max(1, _STATS_CHUNK // max(1, N * H * W))
    for c0 in range(0, C, step):
        var[c0 : c0 + step], mean[c0 : c0 + step] = torch.var_mean(
            x[:, c0 : c0 + step].float(), dim=(0, 2, 3), correction=0
        )
    return mean, var


def bottleneck_forward(
    x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``y = conv1x1(relu(scale*x + shift), weight)`` in x.dtype, with fp32 ``Σy`` and ``Σy²`` per output channel."""
    _check_affine(x, scale, shift)
    _checks.check_weight(weight, x)
    N, C, H, W = x.shape
    B = weight.shape[0]
    h = _relu_affine(x, scale, shift)
    if h.dtype != x.dtype:
        h = h.to(x.dtype)
    y = torch.matmul(weight, h.view(N, C, H * W))  # (N, B, P), fp32 accumulation inside the GEMM
    del h
    acc = _checks.stats_dtype(x.dtype)
    yf = y if y.dtype == acc else y.to(acc)
    y_sum = yf.sum(dim=(0, 2))
    y_sqsum = yf.square().sum(dim=(0, 2))
    return y.view(N, B, H, W), y_sum, y_sqsum


def bottleneck_backward_weight(
    x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, dy: torch.Tensor
) -> torch.Tensor:
    """``dW = Σ_n dy[n] · h[n]^T`` as fp32 ``(B, C)``, with ``h`` recomputed (rounded to x.dtype) from ``x``."""
    _check_affine(x, scale, shift)
    _checks.check_activation("dy", dy, like=x)
    N, C, H, W = x.shape
    B = dy.shape[1]
    # h laid out (C, N, P) so that the N*P reduction is one GEMM with no further copy
    acc = _checks.stats_dtype(x.dtype)
    if torch.compiler.is_compiling():
        # torch.compile's functionalization gives an out= result the layout of its inputs (here x's
        # transposed one) while believing it has out's: let the compiler lay h out and copy if it must
        h = torch.addcmul(shift.view(-1, 1, 1, 1), x.transpose(0, 1), scale.view(-1, 1, 1, 1)).relu_()
    else:
        h = torch.empty((C, N, H, W), dtype=acc, device=x.device)
        torch.addcmul(shift.view(-1, 1, 1, 1), x.transpose(0, 1), scale.view(-1, 1, 1, 1), out=h).relu_()
    if x.dtype != acc:
        h = h.to(x.dtype).float()  # the kernel's GEMM sees h in x.dtype; products of those are exact in fp32
    dy_t = dy.transpose(0, 1).to(acc).reshape(B, -1)  # one copy, whatever the dtype
    return torch.mm(dy_t, h.reshape(C, -1).t())  # a view in eager (h is contiguous)


def bottleneck_backward_input(
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    weight: torch.Tensor,
    dy: torch.Tensor,
    mean: torch.Tensor,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``dh = (weight^T · dy) * [scale*x + shift > 0]`` into ``out`` (x.dtype), with fp32 ``Σdh`` and ``Σdh·(x-mean)``."""
    _check_affine(x, scale, shift)
    _checks.check_weight(weight, x)
    N, C, H, W = x.shape
    B = weight.shape[0]
    _checks.check_dy(dy, x, B)
    acc = _checks.stats_dtype(x.dtype)
    _checks.check_vector("mean", mean, C, x.device, acc)
    if out is None:
        out = torch.empty((N, C, H, W), dtype=x.dtype, device=x.device)
    else:
        _checks.check_activation("out", out, like=x, channels=C)
    g = torch.matmul(weight.t(), dy.reshape(N, B, H * W)).view(N, C, H, W)
    positive = torch.addcmul(_col(shift), x, _col(scale)) > 0
    torch.where(positive, g, g.new_zeros(()), out=out)
    del g, positive
    dh = out if out.dtype == acc else out.to(acc)
    sum_dh = dh.sum(dim=(0, 2, 3))
    xmu = torch.sub(x, _col(mean))  # fp32 by promotion
    sum_dh_xmu = xmu.mul_(dh).sum(dim=(0, 2, 3))
    return out, sum_dh, sum_dh_xmu


def bn_backward_accumulate(
    grad: torch.Tensor,
    x: torch.Tensor,
    dh: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    gamma: torch.Tensor,
    sum_dh: torch.Tensor,
    sum_dh_xmu: torch.Tensor,
) -> None:
    """``grad += gamma*invstd * (dh - Σdh/M - (x-mean)*invstd²*Σdh(x-mean)/M)``, in fp32, in place."""
    _checks.check_activation("x", x)
    C = x.shape[1]
    _checks.check_activation("grad", grad, like=x, channels=C)
    _checks.check_activation("dh", dh, like=x, channels=C)
    for name, v in (("mean", mean), ("invstd", invstd), ("gamma", gamma), ("sum_dh", sum_dh), ("sum_dh_xmu", sum_dh_xmu)):
        _checks.check_vector(name, v, C, x.device, _checks.stats_dtype(x.dtype))
    M = x.shape[0] * x.shape[2] * x.shape[3]
    t = torch.sub(x, _col(mean))  # fp32 by promotion
    t.mul_(_col(invstd * invstd * sum_dh_xmu / M)).neg_().add_(dh).sub_(_col(sum_dh / M))
    grad.add_(t.mul_(_col(gamma * invstd)))
