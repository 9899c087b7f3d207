"""DenseNet-BC bottleneck ``BN1 -> ReLU -> conv1x1`` and its backward: Triton kernels and host launches.

All kernels see an activation as a ``(N, C, P)`` array with ``P = H*W`` contiguous and arbitrary batch and
channel strides (a channel slice of the block's feature buffer). The ``N*P`` pixels are the GEMMs' ``M``
dimension, cut into tiles along one sample's ``P`` pixels: the sample index is a scalar per tile, so the
compiler sees contiguous pixel offsets and vectorises and pipelines the loads. Against tiles that straddled
samples (``(m // P, m % P)`` per element), CUDA-graph timings on an H100 (bf16, N=64, B=128) went, as a
fraction of cuBLAS: forward 14x14 0.34 -> 0.68, 7x7 0.62 -> 0.95, 56x56 0.66 -> 0.61 (noise level);
weight backward 0.10-0.72 -> 0.25-0.90. The price is a padded last tile per sample at small spatial sizes. Accumulators and statistics are fp32; GEMM operands are in the activation dtype.

The hosts below only launch: argument checks, allocation and backend dispatch live in :mod:`.ops`.
On a GPU each GEMM kernel is autotuned (configs pruned to the device's shared memory, keyed on the
power-of-two buckets of C and M, the exact B, and the dtypes), or with :func:`set_autotune` off launched
with the first config the pruning keeps; under ``TRITON_INTERPRET=1`` a single large-block
config is used, since the interpreter's cost grows with the number of program instances.

Reductions across programs (Σy, Σy², dW's split over M, Σdh, Σdh·(x-mean)) use fp32 atomics, so their
summation order, and hence their last bits, can vary from run to run.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from typing import Iterator

import torch
import triton
import triton.language as tl

from effdense.kernels import _launch


@triton.jit
def _mma(a, b, acc, INPUT_PRECISION: tl.constexpr, BF16_INTERP: tl.constexpr):
    """``acc + a @ b``. Triton's interpreter (3.8) mis-multiplies bfloat16 operands (kept as raw uint16),
    so there they are widened to fp32 first: the same result, as bf16 products are exact in fp32."""
    if BF16_INTERP:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


@triton.jit
def _relu(u):
    """``max(u, 0)`` with NaN kept, as ``torch.relu`` (``tl.maximum``'s default returns 0 for a NaN ``u``,
    which would hide a NaN input behind a finite output)."""
    return tl.maximum(u, 0.0, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _downcast(x, DTYPE: tl.constexpr, BF16_INTERP: tl.constexpr):
    """fp32 ``x`` rounded to nearest-even in ``DTYPE``. The interpreter truncates fp32 -> bf16, so there
    the rounding is done on the bits first (the final cast is then exact). A NaN is left to the cast, which
    keeps it a NaN: rounding its bits could carry out of the mantissa (0x7FFFFFFF + 0x8000 wraps to -0.0)."""
    if BF16_INTERP:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
        x = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
    return x.to(DTYPE)


@triton.jit
def _affine_relu(x, scale_ptrs, shift_ptrs, mask_c, CHANNEL_AXIS: tl.constexpr):
    """The forward's prologue: ``relu(scale*x + shift)`` in fp32 for a loaded tile ``x`` whose channels run
    along ``CHANNEL_AXIS``; padded channels (``mask_c`` off) load scale = shift = 0, so their h is 0."""
    scale = tl.expand_dims(tl.load(scale_ptrs, mask=mask_c, other=0.0), 1 - CHANNEL_AXIS)
    shift = tl.expand_dims(tl.load(shift_ptrs, mask=mask_c, other=0.0), 1 - CHANNEL_AXIS)
    return _relu(x.to(tl.float32) * scale + shift)


@triton.jit
def _reference_sample(X_ptr, Scale_ptr, Shift_ptr, W_ptr, offs_b, mask_b, C, stride_xc, stride_wb,
                      BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """``y[0, b, 0]`` in fp32 (before rounding to y's dtype) for the channels ``offs_b``: the output at the
    first pixel of the first sample, which the forward's BN2 sums are centred on."""
    offs_k = tl.arange(0, BLOCK_K)
    r = tl.zeros([BLOCK_B], dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        mask_k = (k0 + offs_k) < C
        x = tl.load(X_ptr + (k0 + offs_k) * stride_xc, mask=mask_k, other=0.0)
        h = _relu(x.to(tl.float32) * tl.load(Scale_ptr + k0 + offs_k, mask=mask_k, other=0.0)
                  + tl.load(Shift_ptr + k0 + offs_k, mask=mask_k, other=0.0))  # padded channels: relu(0) = 0
        w = tl.load(W_ptr + offs_b[:, None] * stride_wb + (k0 + offs_k)[None, :],
                    mask=mask_b[:, None] & mask_k[None, :], other=0.0)
        r += tl.sum(w.to(tl.float32) * h[None, :], axis=1)
    return r


@triton.jit
def _add_channel_sums(y, mask, ref, sum_ptrs, sqsum_ptrs, mask_b, PIXEL_AXIS: tl.constexpr):
    """The forward's epilogue: BN2's batch sums of the stored tile ``y`` over its pixels (along
    ``PIXEL_AXIS``), centred on the reference sample ``ref`` (one value per channel): Σ(y - ref) and
    Σ(y - ref)², added atomically. Centred, ``E[d²] - E[d]²`` keeps the variance's digits where
    ``E[y²] - E[y]²`` cancels (a channel's mean large against its spread). Padded pixels (``mask`` off)
    hold relu(shift)·w and are left out."""
    d = tl.where(mask, y.to(tl.float32) - tl.expand_dims(ref, PIXEL_AXIS), 0.0)
    tl.atomic_add(sum_ptrs, tl.sum(d, axis=PIXEL_AXIS), mask=mask_b)
    tl.atomic_add(sqsum_ptrs, tl.sum(d * d, axis=PIXEL_AXIS), mask=mask_b)


@triton.jit
def _forward_sums_init_kernel(
    X_ptr, Scale_ptr, Shift_ptr, W_ptr, YSum_ptr, YSqSum_ptr, YRef_ptr, C, B, stride_xc, stride_wb,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, HAS_SAMPLE: tl.constexpr,
):
    """Before a forward with statistics: its BN2 sums zeroed and their reference sample ``y[0, :, 0]``
    written (0 for an empty batch, ``HAS_SAMPLE`` off), once for all of the GEMM's programs. Computed in
    each GEMM program instead (e9a844a to d837e33), it cost a second pass over the program's weight rows
    ahead of its main loop: the forward kernel replayed 0.114 against 0.090 ms at 56x56 (N=64, C=256,
    B=128, bf16) on an H200, cuBLAS unchanged."""
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    if HAS_SAMPLE:
        ref = _reference_sample(X_ptr, Scale_ptr, Shift_ptr, W_ptr, offs_b, mask_b, C, stride_xc, stride_wb,
                                BLOCK_B, BLOCK_K)
    else:
        ref = tl.zeros([BLOCK_B], dtype=tl.float32)
    tl.store(YRef_ptr + offs_b, ref, mask=mask_b)
    tl.store(YSum_ptr + offs_b, tl.zeros([BLOCK_B], dtype=tl.float32), mask=mask_b)
    tl.store(YSqSum_ptr + offs_b, tl.zeros([BLOCK_B], dtype=tl.float32), mask=mask_b)


# --------------------------------------------------------------------------------------------------
# Forward: Y[n] (B x P) = W (B x C) . relu(scale*X[n] + shift) (C x P), with Σy and Σy² per output channel


@triton.jit
def _bottleneck_fwd_kernel(
    X_ptr,  # (N, C, P): x[n, c, p] at n*stride_xn + c*stride_xc + p
    Scale_ptr,  # (C,) fp32
    Shift_ptr,  # (C,) fp32
    W_ptr,  # (B, C), x.dtype, w[b, c] at b*stride_wb + c
    Y_ptr,  # (N, B, P), x.dtype
    YSum_ptr,  # (B,) fp32, zeroed: Σ_{n,p} (y - ref) (not touched unless STATS)
    YSqSum_ptr,  # (B,) fp32, zeroed: Σ_{n,p} (y - ref)² (not touched unless STATS)
    YRef_ptr,  # (B,) fp32: ref = y[0, :, 0] in fp32, from _forward_sums_init_kernel (not read unless STATS)
    C,
    B,
    P,
    M,  # N*P
    stride_xn,
    stride_xc,
    stride_wb,
    stride_yn,
    stride_yb,
    C_KEY,  # autotune keys only: power-of-two buckets of C and M
    M_KEY,
    BLOCK_B: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    STATS: tl.constexpr,  # accumulate BN2's centred sums (False: backward's recomputation, statistics cached)
    INPUT_PRECISION: tl.constexpr,
    BF16_INTERP: tl.constexpr,
    W_FIRST: tl.constexpr = False,  # the GEMM's orientation, an autotuned choice (see below)
):
    # Tiles run along one sample's P pixels (n is a scalar per program), so the compiler can prove the
    # pixel offsets contiguous and vectorise/pipeline the X loads; the price is a padded last tile per
    # sample (7x7: 49 of 64 columns). By default the GEMM is computed transposed, Y^T (P x B) = h^T (P x C)
    # . W^T, so that h, formed in registers by the prologue, is the A operand (wgmma takes A from registers);
    # W_FIRST configs compute Y = W . h, which loads and stores along the pixels without a transposed layout.
    # Consecutive programs share one X tile (pid_b varies fastest), so X is read ~once from DRAM.
    pid = tl.program_id(0)
    n_b = tl.cdiv(B, BLOCK_B)
    tiles_p = tl.cdiv(P, BLOCK_M)
    pid_b = pid % n_b
    tile = pid // n_b
    n = (tile // tiles_p).to(tl.int64)
    pid_p = tile % tiles_p

    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_p = pid_p * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    mask_b = offs_b < B
    mask_p = offs_p < P
    if STATS:
        ref = tl.load(YRef_ptr + offs_b, mask=mask_b, other=0.0)

    if W_FIRST:
        # Y (B x P) = W (B x C) . h (C x P): h is the B operand, in X's own layout (pixels contiguous along
        # the tile's rows), staged through shared memory; Y's tile is stored along its contiguous pixels.
        # Which orientation is faster depends on the shape and device: both are autotuning configurations.
        x_ptrs = X_ptr + n * stride_xn + offs_k[:, None] * stride_xc + offs_p[None, :]  # (BLOCK_K, BLOCK_M)
        w_ptrs = W_ptr + offs_b[:, None] * stride_wb + offs_k[None, :]  # (BLOCK_B, BLOCK_K)
        acc_t = tl.zeros([BLOCK_B, BLOCK_M], dtype=tl.float32)
        for k0 in range(0, C, BLOCK_K):
            mask_k = (k0 + offs_k) < C
            x = tl.load(x_ptrs, mask=mask_k[:, None] & mask_p[None, :], other=0.0)
            h = _affine_relu(x, Scale_ptr + k0 + offs_k, Shift_ptr + k0 + offs_k, mask_k, 0)
            w = tl.load(w_ptrs, mask=mask_b[:, None] & mask_k[None, :], other=0.0)
            acc_t = _mma(w, _downcast(h, w.dtype, BF16_INTERP), acc_t, INPUT_PRECISION, BF16_INTERP)
            x_ptrs += BLOCK_K * stride_xc
            w_ptrs += BLOCK_K
        y_t = _downcast(acc_t, Y_ptr.dtype.element_ty, BF16_INTERP)
        mask_t = mask_b[:, None] & mask_p[None, :]
        tl.store(Y_ptr + n * stride_yn + offs_b[:, None] * stride_yb + offs_p[None, :], y_t, mask=mask_t)
        if STATS:
            _add_channel_sums(y_t, mask_t, ref, YSum_ptr + offs_b, YSqSum_ptr + offs_b, mask_b, 1)
    else:
        x_ptrs = X_ptr + n * stride_xn + offs_p[:, None] + offs_k[None, :] * stride_xc  # (BLOCK_M, BLOCK_K)
        wt_ptrs = W_ptr + offs_b[None, :] * stride_wb + offs_k[:, None]  # W^T tile (BLOCK_K, BLOCK_B)
        acc = tl.zeros([BLOCK_M, BLOCK_B], dtype=tl.float32)
        for k0 in range(0, C, BLOCK_K):
            mask_k = (k0 + offs_k) < C
            x = tl.load(x_ptrs, mask=mask_p[:, None] & mask_k[None, :], other=0.0)
            h = _affine_relu(x, Scale_ptr + k0 + offs_k, Shift_ptr + k0 + offs_k, mask_k, 1)
            wt = tl.load(wt_ptrs, mask=mask_k[:, None] & mask_b[None, :], other=0.0)
            acc = _mma(_downcast(h, wt.dtype, BF16_INTERP), wt, acc, INPUT_PRECISION, BF16_INTERP)
            x_ptrs += BLOCK_K * stride_xc
            wt_ptrs += BLOCK_K

        y = _downcast(acc, Y_ptr.dtype.element_ty, BF16_INTERP)
        mask = mask_p[:, None] & mask_b[None, :]
        tl.store(Y_ptr + n * stride_yn + offs_p[:, None] + offs_b[None, :] * stride_yb, y, mask=mask)
        if STATS:
            _add_channel_sums(y, mask, ref, YSum_ptr + offs_b, YSqSum_ptr + offs_b, mask_b, 0)


# --------------------------------------------------------------------------------------------------
# Backward, weight: dW (B x C) = Σ_m dY[:, m] . h[:, m]^T, M split across programs


@triton.jit
def _bottleneck_bwd_weight_kernel(
    X_ptr,  # (N, C, P)
    Scale_ptr,  # (C,) fp32
    Shift_ptr,  # (C,) fp32
    DY_ptr,  # (N, B, P), x.dtype: dy[n, b, p] at n*stride_dyn + b*stride_dyb + p
    DW_ptr,  # (B, C) fp32, zeroed
    C,
    B,
    P,
    M,
    stride_xn,
    stride_xc,
    stride_dyn,
    stride_dyb,
    C_KEY,
    M_KEY,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_M: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BF16_INTERP: tl.constexpr,
):
    # y = W h  =>  dW = dy h^T, summed over all pixels m = (n, p); h recomputed from x as in the forward.
    # Program (tile, split) reduces its share of the pixel tiles and adds the partial dW atomically.
    # Pixel tiles run along one sample (n scalar per step: provably contiguous loads, see the forward),
    # and dW^T (C x B) = h (C x M) . dy^T is formed so that the recomputed h is the A operand.
    pid = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    n_b = tl.cdiv(B, BLOCK_B)
    pid_b = pid % n_b
    pid_c = pid // n_b
    tiles_p = tl.cdiv(P, BLOCK_M)
    tiles = tiles_p * (M // P)
    per_split = tl.cdiv(tiles, n_splits)
    t_begin = split * per_split
    t_end = tl.minimum(t_begin + per_split, tiles)

    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_b = offs_b < B
    mask_c = offs_c < C
    scale = tl.load(Scale_ptr + offs_c, mask=mask_c, other=0.0)
    shift = tl.load(Shift_ptr + offs_c, mask=mask_c, other=0.0)
    acc = tl.zeros([BLOCK_C, BLOCK_B], dtype=tl.float32)
    for t in range(t_begin, t_end):
        n = (t // tiles_p).to(tl.int64)
        offs_p = (t % tiles_p) * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_p = offs_p < P
        # padded pixels load dy = 0, and their h (relu(shift)) is zeroed too: rounded to fp16 a large shift
        # is inf, and 0 * inf would put NaN into every dW entry of its channel
        dyt = tl.load(
            DY_ptr + n * stride_dyn + offs_p[:, None] + offs_b[None, :] * stride_dyb,
            mask=mask_p[:, None] & mask_b[None, :],
            other=0.0,
        )  # dy^T tile (BLOCK_M, BLOCK_B)
        x = tl.load(
            X_ptr + n * stride_xn + offs_p[None, :] + offs_c[:, None] * stride_xc,
            mask=mask_c[:, None] & mask_p[None, :],
            other=0.0,
        )  # (BLOCK_C, BLOCK_M)
        h = tl.where(mask_p[None, :], _relu(x.to(tl.float32) * scale[:, None] + shift[:, None]), 0.0)
        acc = _mma(_downcast(h, dyt.dtype, BF16_INTERP), dyt, acc, INPUT_PRECISION, BF16_INTERP)

    tl.atomic_add(
        DW_ptr + offs_b[None, :] * C + offs_c[:, None], acc, mask=mask_c[:, None] & mask_b[None, :]
    )


# --------------------------------------------------------------------------------------------------
# Backward, input: dh = (W^T dY) * [scale*x + shift > 0], with Σdh and Σdh·(x-mean) per input channel


@triton.jit
def _bottleneck_bwd_input_kernel(
    X_ptr,  # (N, C, P)
    Scale_ptr,  # (C,) fp32
    Shift_ptr,  # (C,) fp32
    Mean_ptr,  # (C,) fp32: BN1's batch mean
    W_ptr,  # (B, C), x.dtype
    DY_ptr,  # (N, B, P), x.dtype
    DH_ptr,  # (N, C, P), x.dtype: output, dh[n, c, p] at n*stride_dhn + c*stride_dhc + p
    SumDH_ptr,  # (C,) fp32, zeroed
    SumDHXmu_ptr,  # (C,) fp32, zeroed
    C,
    B,
    P,
    M,
    stride_xn,
    stride_xc,
    stride_wb,
    stride_dyn,
    stride_dyb,
    stride_dhn,
    stride_dhc,
    C_KEY,
    M_KEY,
    BLOCK_C: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BF16_INTERP: tl.constexpr,
):
    # y = W h, h = relu(u), u = scale*x + shift  =>  dh_u = (W^T dy) * [u > 0] (the grad w.r.t. BN1's output).
    # BN1 backward then needs Σ_m dh_u and Σ_m dh_u (x - mean): formed here from the tile in registers,
    # on dh as stored (rounded to x.dtype), so the elementwise step sees consistent values.
    # pixel tiles along one sample (n scalar: provably contiguous loads and stores, see the forward)
    pid = tl.program_id(0)
    n_c = tl.cdiv(C, BLOCK_C)
    tiles_p = tl.cdiv(P, BLOCK_M)
    pid_c = pid % n_c
    tile = pid // n_c
    n = (tile // tiles_p).to(tl.int64)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_m = (tile % tiles_p) * BLOCK_M + tl.arange(0, BLOCK_M)  # pixel offsets p within sample n
    offs_k = tl.arange(0, BLOCK_K)
    mask_c = offs_c < C
    mask_m = offs_m < P
    p = offs_m

    wt_ptrs = W_ptr + offs_c[:, None] + offs_k[None, :] * stride_wb  # W^T tile (BLOCK_C, BLOCK_K)
    dy_ptrs = DY_ptr + n * stride_dyn + p[None, :] + offs_k[:, None] * stride_dyb
    acc = tl.zeros([BLOCK_C, BLOCK_M], dtype=tl.float32)
    for k0 in range(0, B, BLOCK_K):
        mask_k = (k0 + offs_k) < B
        wt = tl.load(wt_ptrs, mask=mask_c[:, None] & mask_k[None, :], other=0.0)
        dy = tl.load(dy_ptrs, mask=mask_k[:, None] & mask_m[None, :], other=0.0)
        acc = _mma(wt, dy, acc, INPUT_PRECISION, BF16_INTERP)
        wt_ptrs += BLOCK_K * stride_wb
        dy_ptrs += BLOCK_K * stride_dyb

    mask = mask_c[:, None] & mask_m[None, :]
    x = tl.load(X_ptr + n * stride_xn + p[None, :] + offs_c[:, None] * stride_xc, mask=mask, other=0.0)
    x = x.to(tl.float32)
    scale = tl.load(Scale_ptr + offs_c, mask=mask_c, other=0.0)
    shift = tl.load(Shift_ptr + offs_c, mask=mask_c, other=0.0)
    mean = tl.load(Mean_ptr + offs_c, mask=mask_c, other=0.0)
    # ReLU's backward as PyTorch's threshold_backward: zero where the pre-activation is <= 0, the gradient
    # elsewhere (a NaN pre-activation passes it, as relu(NaN) = NaN does)
    nonpositive = (x * scale[:, None] + shift[:, None]) <= 0.0
    dh = _downcast(tl.where(mask, tl.where(nonpositive, 0.0, acc), 0.0), DH_ptr.dtype.element_ty, BF16_INTERP)
    tl.store(DH_ptr + n * stride_dhn + p[None, :] + offs_c[:, None] * stride_dhc, dh, mask=mask)
    dhf = dh.to(tl.float32)
    tl.atomic_add(SumDH_ptr + offs_c, tl.sum(dhf, axis=1), mask=mask_c)
    tl.atomic_add(SumDHXmu_ptr + offs_c, tl.sum(dhf * (x - mean[:, None]), axis=1), mask=mask_c)


# --------------------------------------------------------------------------------------------------
# BN1 backward, elementwise, accumulated into the shared gradient buffer


@triton.jit
def _bn_backward_accumulate_kernel(
    G_ptr,  # (N, C, P), grad's dtype: updated in place
    X_ptr,  # (N, C, P)
    DH_ptr,  # (N, C, P)
    Mean_ptr,  # (C,) fp32
    Invstd_ptr,  # (C,) fp32
    Gamma_ptr,  # (C,) fp32
    SumDH_ptr,  # (C,) fp32 (read only if BATCH_STATS)
    SumDHXmu_ptr,  # (C,) fp32 (read only if BATCH_STATS)
    C,
    P,
    M,
    inv_M,  # 1 / M, fp32
    stride_gn,
    stride_gc,
    stride_xn,
    stride_xc,
    stride_dhn,
    stride_dhc,
    BLOCK_C: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BATCH_STATS: tl.constexpr,  # False: running statistics, no terms through the mean and variance
    BF16_INTERP: tl.constexpr,
):
    # x_hat = (x - mean)*invstd, u = gamma*x_hat + beta. With batch statistics,
    # dx = gamma*invstd * (du - mean(du) - x_hat*mean(du*x_hat))
    #    = gamma*invstd * (dh - Σdh/M - (x - mean)*invstd² * Σdh(x - mean)/M);
    # with running statistics dx = gamma*invstd * dh, x not read (a NaN in x must not reach dx, as in
    # PyTorch's eval-mode BatchNorm backward: a zero coefficient times NaN would).
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_c = offs_c < C
    mask = mask_c[:, None] & (offs_m < M)[None, :]
    n = (offs_m // P).to(tl.int64)
    p = offs_m % P

    invstd = tl.load(Invstd_ptr + offs_c, mask=mask_c, other=0.0)
    coef = tl.load(Gamma_ptr + offs_c, mask=mask_c, other=0.0) * invstd

    g_ptrs = G_ptr + (n * stride_gn + p)[None, :] + offs_c[:, None] * stride_gc
    dh = tl.load(DH_ptr + (n * stride_dhn + p)[None, :] + offs_c[:, None] * stride_dhc, mask=mask, other=0.0)
    g = tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32)
    if BATCH_STATS:
        mean = tl.load(Mean_ptr + offs_c, mask=mask_c, other=0.0)
        mean_dh = tl.load(SumDH_ptr + offs_c, mask=mask_c, other=0.0) * inv_M
        coef_x = invstd * invstd * tl.load(SumDHXmu_ptr + offs_c, mask=mask_c, other=0.0) * inv_M
        x = tl.load(X_ptr + (n * stride_xn + p)[None, :] + offs_c[:, None] * stride_xc, mask=mask, other=0.0)
        dx = dh.to(tl.float32) - mean_dh[:, None] - (x.to(tl.float32) - mean[:, None]) * coef_x[:, None]
    else:
        dx = dh.to(tl.float32)
    g += coef[:, None] * dx
    tl.store(g_ptrs, _downcast(g, G_ptr.dtype.element_ty, BF16_INTERP), mask=mask)


# --------------------------------------------------------------------------------------------------
# Configurations: one large-block config in the interpreter, pruned autotune lists on a GPU


def _cfg(num_warps: int, num_stages: int, **blocks: int) -> triton.Config:
    return triton.Config(blocks, num_warps=num_warps, num_stages=num_stages)


_FWD_CONFIGS = [
    _cfg(8, 3, BLOCK_B=128, BLOCK_M=128, BLOCK_K=64),
    _cfg(4, 4, BLOCK_B=128, BLOCK_M=128, BLOCK_K=64),
    _cfg(8, 3, BLOCK_B=128, BLOCK_M=256, BLOCK_K=64),
    _cfg(8, 4, BLOCK_B=128, BLOCK_M=256, BLOCK_K=32),
    _cfg(4, 4, BLOCK_B=64, BLOCK_M=256, BLOCK_K=64),
    _cfg(4, 4, BLOCK_B=64, BLOCK_M=128, BLOCK_K=64),
    _cfg(4, 4, BLOCK_B=128, BLOCK_M=64, BLOCK_K=64),
    _cfg(4, 5, BLOCK_B=128, BLOCK_M=128, BLOCK_K=32),
    _cfg(8, 3, BLOCK_B=256, BLOCK_M=128, BLOCK_K=64),
    # Y = W . h instead of Y^T = h^T . W^T (W_FIRST): the autotuner picked them at 56x56 and 28x28 on an H100
    # (1a95410) and an H200 (d837e33)
    _cfg(4, 5, BLOCK_B=128, BLOCK_M=128, BLOCK_K=32, W_FIRST=True),
    _cfg(8, 3, BLOCK_B=128, BLOCK_M=128, BLOCK_K=64, W_FIRST=True),
    _cfg(8, 3, BLOCK_B=128, BLOCK_M=256, BLOCK_K=64, W_FIRST=True),
    _cfg(4, 4, BLOCK_B=64, BLOCK_M=256, BLOCK_K=64, W_FIRST=True),
]
_BWD_WEIGHT_CONFIGS = [
    _cfg(8, 3, BLOCK_B=128, BLOCK_C=128, BLOCK_M=64),
    _cfg(4, 4, BLOCK_B=128, BLOCK_C=128, BLOCK_M=32),
    _cfg(8, 3, BLOCK_B=128, BLOCK_C=256, BLOCK_M=64),
    _cfg(4, 4, BLOCK_B=64, BLOCK_C=128, BLOCK_M=64),
    _cfg(4, 4, BLOCK_B=128, BLOCK_C=64, BLOCK_M=64),
    _cfg(4, 4, BLOCK_B=64, BLOCK_C=64, BLOCK_M=64),
    _cfg(8, 2, BLOCK_B=128, BLOCK_C=128, BLOCK_M=128),
]
_BWD_INPUT_CONFIGS = [
    _cfg(8, 3, BLOCK_C=128, BLOCK_M=128, BLOCK_K=64),
    _cfg(4, 4, BLOCK_C=128, BLOCK_M=128, BLOCK_K=64),
    _cfg(8, 3, BLOCK_C=128, BLOCK_M=256, BLOCK_K=64),
    _cfg(4, 4, BLOCK_C=64, BLOCK_M=256, BLOCK_K=64),
    _cfg(4, 4, BLOCK_C=64, BLOCK_M=128, BLOCK_K=64),
    _cfg(4, 4, BLOCK_C=128, BLOCK_M=64, BLOCK_K=64),
    _cfg(4, 5, BLOCK_C=128, BLOCK_M=128, BLOCK_K=32),
    _cfg(8, 3, BLOCK_C=256, BLOCK_M=128, BLOCK_K=64),
]


def _prune(tile: tuple[str, str], operands: tuple[tuple[str, str], ...], x_arg: str, rows_arg: str):
    """Drop configs whose pipelined operand tiles exceed the device's shared memory, or whose ``tile[0]``
    block is more than twice the problem's ``rows_arg`` dimension."""

    def prune(configs, named_args, **kwargs):
        x = named_args[x_arg]
        size = x.element_size()
        limit = _launch.max_shared_memory(x.device.index if x.device.index is not None else 0)
        rows = named_args[rows_arg]
        kept = []
        for cfg in configs:
            kw = cfg.kwargs
            smem = cfg.num_stages * sum(kw[a] * kw[b] for a, b in operands) * size
            if smem > limit or kw[tile[0]] > max(64, 2 * _launch.next_power_of_2(rows)):
                continue
            if size == 4 and kw[tile[0]] * kw[tile[1]] > 128 * 128:  # fp32 FMA/tf32 tiles: keep registers sane
                continue
            kept.append(cfg)
        return kept or [min(configs, key=lambda c: c.num_stages * sum(c.kwargs[a] * c.kwargs[b] for a, b in operands))]

    return prune


def _autotune_bench(fn, quantiles):
    """Autotuning's timing of one config: 5 ms of warm-up and 25 ms of repetitions (Triton's default is 25 and
    100). Tuning only ranks configs, and a fresh GPU machine tunes every (B, C, M, P) key of a DenseNet-121 step
    before its first step ends: at the default, the fused DenseNet-121 b64 bf16 row of ``effdense bench`` did
    not finish within 170 s on an H200 (benchmarks/results/gpu-nvidia-h200/)."""
    return triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles)


# ``cache_results``: the choice per key is kept in Triton's on-disk cache (keyed by Triton, the GPU target, the
# kernel source, the configs and the tuning key), so the processes of one session (the GPU suite's steps, a
# bench after the tests) tune each shape once instead of once each. Both options are looked up: a Triton
# without them (not seen; 3.8 here has both) tunes its default way. Neither acts in the interpreter.
_TUNING = {
    name: value
    for name, value in (("do_bench", _autotune_bench), ("cache_results", True))
    if name in inspect.signature(triton.autotune).parameters
}

# per GEMM kernel: the pruning its autotuner applies (and the untuned launch picks from)
_PRUNE = {
    "forward": _prune(("BLOCK_B", "BLOCK_M"), (("BLOCK_B", "BLOCK_K"), ("BLOCK_K", "BLOCK_M")), "X_ptr", "B"),
    "backward_weight": _prune(("BLOCK_B", "BLOCK_C"), (("BLOCK_B", "BLOCK_M"), ("BLOCK_C", "BLOCK_M")), "X_ptr", "B"),
    "backward_input": _prune(("BLOCK_C", "BLOCK_M"), (("BLOCK_C", "BLOCK_K"), ("BLOCK_K", "BLOCK_M")), "X_ptr", "C"),
}

_fwd_tuned = triton.autotune(
    configs=_FWD_CONFIGS,
    key=["B", "C_KEY", "M_KEY", "P"],
    prune_configs_by={"early_config_prune": _PRUNE["forward"]},
    reset_to_zero=["YSum_ptr", "YSqSum_ptr"],
    **_TUNING,
)(_bottleneck_fwd_kernel)
_bwd_weight_tuned = triton.autotune(
    configs=_BWD_WEIGHT_CONFIGS,
    key=["B", "C_KEY", "M_KEY", "P"],
    prune_configs_by={"early_config_prune": _PRUNE["backward_weight"]},
    reset_to_zero=["DW_ptr"],
    **_TUNING,
)(_bottleneck_bwd_weight_kernel)
_bwd_input_tuned = triton.autotune(
    configs=_BWD_INPUT_CONFIGS,
    key=["B", "C_KEY", "M_KEY", "P"],
    prune_configs_by={"early_config_prune": _PRUNE["backward_input"]},
    reset_to_zero=["SumDH_ptr", "SumDHXmu_ptr"],
    **_TUNING,
)(_bottleneck_bwd_input_kernel)


# One configuration per GEMM kernel, set by :func:`forced_config`, used instead of the autotuner (or of the
# interpreter's single config): for tests that run every configuration, and for comparing configurations.
_FORCED: dict[str, triton.Config] = {}
CONFIGS = {"forward": _FWD_CONFIGS, "backward_weight": _BWD_WEIGHT_CONFIGS, "backward_input": _BWD_INPUT_CONFIGS}


@contextlib.contextmanager
def forced_config(kernel: str, config: triton.Config) -> Iterator[None]:
    """Within the block, launch GEMM kernel ``kernel`` (a key of :data:`CONFIGS`: ``"forward"``,
    ``"backward_weight"``, ``"backward_input"``) with ``config``, one of its autotuning configurations or any
    other, instead of the autotuned choice; in the interpreter, instead of its single large-block config
    (the block sizes apply there, the warps and stages do not). Not pruned: a config that does not fit the
    device's shared memory fails to launch (Triton's ``OutOfResources``). Not thread-safe."""
    if kernel not in CONFIGS:
        raise ValueError(f"kernel: expected one of {sorted(CONFIGS)}, got {kernel!r}")
    if not isinstance(config, triton.Config):
        raise TypeError(f"config: expected a triton.Config, got {type(config).__name__}")
    previous = _FORCED.get(kernel)
    _FORCED[kernel] = config
    try:
        yield
    finally:
        if previous is None:
            _FORCED.pop(kernel, None)
        else:
            _FORCED[kernel] = previous


def _forced(kernel: str) -> dict | None:
    """The forced config's launch keywords (block sizes, warps, stages), or None."""
    cfg = _FORCED.get(kernel)
    if cfg is None:
        return None
    return dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


# The autotuner's choice per tuning key, once made: (kernel, device index, dtype, flags, B, C_KEY, M_KEY, P) ->
# the chosen config's launch keywords (block sizes, warps, stages, ...). Only the first launch of a key goes
# through triton.autotune's Autotuner (tuning it, or reading its disk cache); later launches call the
# kernel with the keywords the Autotuner would pass, skipping its per-call work (it rebuilds its key from
# every argument, ``str(dtype)`` of each tensor included): ~23 us of host time per launch on the 2-core
# CPU here against ~2 us for this lookup, for ~240 tuned launches per DenseNet-121 step.
_CHOSEN: dict[tuple, dict] = {}
# Held around every launch through an Autotuner: its run() keeps per-call state on the shared object
# (``nargs``, read while it times configs and reset to None after; ``best_config``) and tunes with the GIL
# released, so two threads launching the same kernel at once (nn.DataParallel's replicas, in their first
# step) could time with each other's arguments, zero each other's sums (``reset_to_zero``) or read the
# other's choice. Once a key is chosen its launches skip the Autotuner, and the lock.
_TUNING_LOCK = threading.Lock()

# Autotuning times every configuration of a GEMM kernel for each new key (the first fused DenseNet-121 b64
# bf16 step on a fresh H200 spent 77 s in it, benchmarks/results/gpu-nvidia-h200/2026-11-26_c2e934d/). Off,
# each key launches the first configuration of the kernel's list that its autotuner's pruning keeps for the
# device and shape (one compilation, no timing; speed not measured). Read from EFFDENSE_AUTOTUNE at import
# ("0", "false", "off" or "no": off), changed by :func:`set_autotune`.
_AUTOTUNE = _launch.env_switch("EFFDENSE_AUTOTUNE")
_UNTUNED: dict[tuple, dict] = {}


def set_autotune(enabled: bool) -> bool:
    """Autotune the GEMM kernels on a GPU (``True``, the default unless ``EFFDENSE_AUTOTUNE=0`` was set when
    effdense.kernels was imported) or launch each shape with a fixed configuration (``False``: the first
    of the kernel's configurations that fits the device, chosen without timing). Returns the previous
    setting. Keys tuned before keep their choice while tuning is on. No effect in Triton's interpreter,
    which runs one large-block configuration, nor on a :func:`forced_config`. Not thread-safe."""
    global _AUTOTUNE
    _launch.require_bool(enabled)
    previous, _AUTOTUNE = _AUTOTUNE, enabled
    return previous


def _launch_untuned(fn, grid, args: tuple, kernel: str, key: tuple, named_args: dict, **constexprs) -> None:
    """Launch JITFunction ``fn`` with ``kernel``'s untuned configuration for ``key``: the first config its
    autotuner's pruning keeps that compiles for the device (one that runs out of registers or shared memory
    fails before it runs, as the autotuner skips it, and the next is tried), remembered per key."""
    meta = _UNTUNED.get(key)
    if meta is not None:
        _launch.launch(fn, grid(meta), args, {**meta, **constexprs})
        return
    for cfg in _PRUNE[kernel](CONFIGS[kernel], named_args):
        meta = dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        try:
            _launch.launch(fn, grid(meta), args, {**meta, **constexprs})
        except triton.runtime.errors.OutOfResources:
            continue
        _UNTUNED[key] = meta
        return
    raise RuntimeError(f"effdense: no configuration of the {kernel} kernel fits this device for {key}; set_autotune(True)")


def _launch_tuned(tuned, grid, args: tuple, key: tuple, **constexprs) -> None:
    """Launch ``tuned`` (a ``triton.autotune`` wrapper of a JITFunction) with the config it chose for
    ``key``, which must determine the Autotuner's own key (the kernel's tuning arguments and the dtypes of
    its tensor arguments). A Triton without ``best_config`` launches through the Autotuner every time."""
    chosen = _CHOSEN.get(key)
    if chosen is None:
        with _TUNING_LOCK:
            chosen = _CHOSEN.get(key)  # (another thread may have tuned it while this one waited)
            if chosen is None:
                tuned[grid](*args, **constexprs)
                config = getattr(tuned, "best_config", None)  # set by Autotuner.run to the config it launched
                if config is not None:
                    _CHOSEN[key] = dict(config.all_kwargs())
                return
    _launch.launch(tuned.fn, grid(chosen), args, {**constexprs, **chosen})


def _launch_gemm(kernel: str, fn, tuned, grid, args: tuple, key: tuple, named_args: dict, interp_meta, **constexprs) -> None:
    """Launch GEMM ``kernel`` (JITFunction ``fn``, its autotuner ``tuned``) with: a :func:`forced_config`;
    else in Triton's interpreter the single large-block config ``interp_meta()``; else, autotuning off, the
    untuned config for ``key`` (the pruning sees ``named_args``); else the autotuned one."""
    meta = _forced(kernel)
    if meta is None and _launch.interpreting():
        meta = interp_meta()
    if meta is not None:
        _launch.launch(fn, grid(meta), args, {**meta, **constexprs})
    elif not _AUTOTUNE:
        _launch_untuned(fn, grid, args, kernel, key, named_args, **constexprs)
    else:
        _launch_tuned(tuned, grid, args, key, **constexprs)


def _p2(v: int, cap: int, floor: int = 16) -> int:
    return max(floor, min(cap, _launch.next_power_of_2(v)))


def _bf16_interp(x: torch.Tensor) -> bool:
    return _launch.interpreting() and x.dtype == torch.bfloat16


def _keys(C: int, M: int) -> tuple[int, int]:
    return _launch.next_power_of_2(C), _launch.next_power_of_2(M)


# --------------------------------------------------------------------------------------------------
# Host launches: shapes already checked, outputs already allocated (and sums zeroed) by the caller


@_launch.on_tensor_device
def bottleneck_forward_launch(x, scale, shift, weight, y, y_sum, y_sqsum, y_ref) -> None:
    """``y_sum``/``y_sqsum``/``y_ref``: fp32 ``[B]``, any contents, for BN2's sums centred on ``y_ref``
    (written here: the sums zeroed and ``y[0, :, 0]``, then the GEMM's epilogue adds into the sums), or all
    three ``None`` to skip them."""
    N, C, H, W = x.shape
    B, P, M = weight.shape[0], H * W, N * H * W
    stats = y_sum is not None
    if stats:
        if _launch.interpreting():
            bb, bk, warps = _p2(B, 128), _p2(C, 128), 4
        else:  # a few programs, each a few iterations over C: a short kernel ahead of the GEMM
            bb, bk, warps = 32, 256, 4
        _launch.launch(
            _forward_sums_init_kernel, (_launch.cdiv(B, bb),),
            (x, scale, shift, weight, y_sum, y_sqsum, y_ref, C, B, x.stride(1), weight.stride(0)),
            {"BLOCK_B": bb, "BLOCK_K": bk, "HAS_SAMPLE": M > 0, "num_warps": warps},
        )  # fmt: skip
    else:  # never dereferenced (STATS=False); the autotuner's reset_to_zero may zero y, which is then written
        y_sum = y_sqsum = y_ref = y
    args = (
        x, scale, shift, weight, y, y_sum, y_sqsum, y_ref,
        C, B, P, M, x.stride(0), x.stride(1), weight.stride(0), y.stride(0), y.stride(1), *_keys(C, M),
    )
    prec, up = _launch.input_precision(x.dtype), _bf16_interp(x)
    grid = lambda meta: (_launch.cdiv(B, meta["BLOCK_B"]) * N * _launch.cdiv(P, meta["BLOCK_M"]),)  # noqa: E731
    _launch_gemm(
        "forward", _bottleneck_fwd_kernel, _fwd_tuned, grid, args,
        ("forward", x.device.index, x.dtype, stats, B, *args[-2:], P), {"X_ptr": x, "B": B},
        lambda: dict(BLOCK_B=_p2(B, 128), BLOCK_M=_p2(P, 1024), BLOCK_K=_p2(C, 128)),
        STATS=stats, INPUT_PRECISION=prec, BF16_INTERP=up,
    )  # fmt: skip


def _weight_splits(device: torch.device, tiles: int, tiles_m: int) -> int:
    # enough programs to fill the GPU, but >= 16 pixel tiles each: every split ends in BLOCK_B*BLOCK_C atomics
    min_per_split = 1 if _launch.interpreting() else 16
    return max(1, min(tiles_m // min_per_split, _launch.cdiv(_launch.target_programs(device), tiles)))


@_launch.on_tensor_device
def bottleneck_backward_weight_launch(x, scale, shift, dy, dw) -> None:
    N, C, H, W = x.shape
    B, P, M = dy.shape[1], H * W, N * H * W
    args = (x, scale, shift, dy, dw, C, B, P, M, x.stride(0), x.stride(1), dy.stride(0), dy.stride(1), *_keys(C, M))
    prec, up = _launch.input_precision(x.dtype), _bf16_interp(x)

    def grid(meta):
        tiles = _launch.cdiv(B, meta["BLOCK_B"]) * _launch.cdiv(C, meta["BLOCK_C"])
        return (tiles, _weight_splits(x.device, tiles, N * _launch.cdiv(P, meta["BLOCK_M"])))

    _launch_gemm(
        "backward_weight", _bottleneck_bwd_weight_kernel, _bwd_weight_tuned, grid, args,
        ("backward_weight", x.device.index, x.dtype, B, *args[-2:], P), {"X_ptr": x, "B": B},
        lambda: dict(BLOCK_B=_p2(B, 128), BLOCK_C=_p2(C, 128), BLOCK_M=_p2(P, 1024)),
        INPUT_PRECISION=prec, BF16_INTERP=up,
    )  # fmt: skip


@_launch.on_tensor_device
def bottleneck_backward_input_launch(x, scale, shift, weight, dy, mean, dh, sum_dh, sum_dh_xmu) -> None:
    N, C, H, W = x.shape
    B, P, M = weight.shape[0], H * W, N * H * W
    args = (
        x, scale, shift, mean, weight, dy, dh, sum_dh, sum_dh_xmu,
        C, B, P, M, x.stride(0), x.stride(1), weight.stride(0), dy.stride(0), dy.stride(1),
        dh.stride(0), dh.stride(1), *_keys(C, M),
    )
    prec, up = _launch.input_precision(x.dtype), _bf16_interp(x)
    grid = lambda meta: (_launch.cdiv(C, meta["BLOCK_C"]) * N * _launch.cdiv(P, meta["BLOCK_M"]),)  # noqa: E731
    _launch_gemm(
        "backward_input", _bottleneck_bwd_input_kernel, _bwd_input_tuned, grid, args,
        ("backward_input", x.device.index, x.dtype, B, *args[-2:], P), {"X_ptr": x, "C": C},
        lambda: dict(BLOCK_C=_p2(C, 128), BLOCK_M=_p2(P, 1024), BLOCK_K=_p2(B, 128)),
        INPUT_PRECISION=prec, BF16_INTERP=up,
    )  # fmt: skip


@_launch.on_tensor_device
def bn_backward_accumulate_launch(grad, x, dh, mean, invstd, gamma, sum_dh, sum_dh_xmu) -> None:
    """``sum_dh``/``sum_dh_xmu``: BN1's backward sums (batch statistics), or both ``None`` for running
    statistics (``grad += gamma*invstd*dh``; ``x`` and ``mean`` are then not read)."""
    N, C, H, W = x.shape
    batch_stats = sum_dh is not None
    if not batch_stats:  # never dereferenced (BATCH_STATS=False)
        sum_dh = sum_dh_xmu = mean
    P, M = H * W, N * H * W
    if _launch.interpreting():
        bc = _p2(C, 64, floor=1)
        bm, warps = _p2(M, (1 << 18) // bc, floor=1), 4
    else:
        bc, bm, warps = 4, 1024, 4
    grid = (_launch.cdiv(M, bm), _launch.cdiv(C, bc))
    _launch.launch(
        _bn_backward_accumulate_kernel, grid,
        (grad, x, dh, mean, invstd, gamma, sum_dh, sum_dh_xmu,
         C, P, M, 1.0 / M, grad.stride(0), grad.stride(1), x.stride(0), x.stride(1), dh.stride(0), dh.stride(1)),
        dict(BLOCK_C=bc, BLOCK_M=bm, BATCH_STATS=batch_stats, BF16_INTERP=_bf16_interp(x), num_warps=warps),
    )  # fmt: skip
