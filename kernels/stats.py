"""Per-channel batch statistics (mean, biased variance) of an NCHW channel slice: Triton kernel and host launch.

Numerics: each program walks a contiguous range of ``N*H*W`` columns in tiles. A tile's mean and centred
sum of squares are exact two-pass values (the tile sits in registers); tiles are merged into a running
(count, mean, M2) with Chan et al.'s formula, and the per-program partials are merged the same way by a
second, one-program-per-channel-block kernel (two launches in all: a host-side merge took a dozen small
operators, which dominated the op's time on a GPU). Every program first subtracts the same value from a
channel, its first element (a shift, which leaves the variance as it is), so the tile means that Chan's
formula merges are of the spread about that value, not of the mean: a channel with mean 1e4 and std 1e-2
keeps its variance to about 1e-5 relative (unshifted, the fp32 rounding of each tile's mean added up to 1%),
and values clustered near fp32's largest cannot overflow the merge. A tile's sum of shifted values must stay
within fp32's range, though: a first element far from the rest overflows it (4e35 ahead of 999 zeros: mean
-inf and variance NaN, where ``torch.var_mean`` gives 4e32 and inf; the twins form the mean without the
shift). The price: the mean is formed as
``(mean - x0) + x0``, so a first element far from the rest (an outlier of 1e4 among values near 0) costs the
mean about 6e-8·|x0 - mean| absolute (fp32 rounding at the outlier's scale), against which the variance such
an outlier brings is large. Nothing ever forms ``E[x²] - E[x]²`` on raw values.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from effdense.kernels import _launch


@triton.jit
def _channel_shift(X_ptr, offs_c, mask_c, M, stride_xc):
    """Each channel's first element ``x[0, c, 0]``, fp32: the shift that both kernels subtract; 0 where it
    is not finite (an inf there would turn every shifted value into NaN, and the mean with it) or M = 0."""
    first = tl.load(X_ptr + offs_c * stride_xc, mask=mask_c & (M > 0), other=0.0).to(tl.float32)
    return tl.where(first - first == 0.0, first, 0.0)


@triton.jit
def _channel_stats_kernel(
    X_ptr,  # (N, C, P) view: x[n, c, p] at n*stride_xn + c*stride_xc + p
    PartMean_ptr,  # (SPLIT, C) fp32: mean of each program's column range, less the channel's first element
    PartM2_ptr,  # (SPLIT, C) fp32: centred sum of squares of that range
    PartCount_ptr,  # (SPLIT, C) fp32: number of columns in that range
    C,
    P,
    M,  # N*P
    stride_xn,
    stride_xc,
    BLOCK_C: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    pid_c = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    tiles = tl.cdiv(M, BLOCK_M)
    per_split = tl.cdiv(tiles, n_splits)
    t_begin = split * per_split
    t_end = tl.minimum(t_begin + per_split, tiles)

    shift = _channel_shift(X_ptr, offs_c, mask_c, M, stride_xc)  # (the means are stored relative to it)
    count = tl.zeros([BLOCK_C], dtype=tl.float32)
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for t in range(t_begin, t_end):
        offs_m = t * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        n = offs_m // P
        p = offs_m - n * P
        ptrs = X_ptr + n.to(tl.int64)[None, :] * stride_xn + offs_c[:, None] * stride_xc + p[None, :]
        mask = mask_c[:, None] & mask_m[None, :]
        x = tl.where(mask, tl.load(ptrs, mask=mask, other=0.0).to(tl.float32) - shift[:, None], 0.0)
        cnt_t = tl.minimum(M - t * BLOCK_M, BLOCK_M).to(tl.float32)
        mean_t = tl.sum(x, axis=1) / cnt_t
        d = tl.where(mask, x - mean_t[:, None], 0.0)
        m2_t = tl.sum(d * d, axis=1)
        # Chan: merge (count, mean, m2) with (cnt_t, mean_t, m2_t)
        total = count + cnt_t
        delta = mean_t - mean
        mean += delta * (cnt_t / total)
        m2 += m2_t + delta * (delta * (count * cnt_t / total))
        count = total

    out = split * C + offs_c
    tl.store(PartMean_ptr + out, mean, mask=mask_c)
    tl.store(PartM2_ptr + out, m2, mask=mask_c)
    tl.store(PartCount_ptr + out, count, mask=mask_c)


@triton.jit
def _merge_stats_kernel(
    X_ptr,  # the input, for the shift: x[0, c, 0] at c*stride_xc
    PartMean_ptr,  # (SPLIT, C) fp32, as written by _channel_stats_kernel
    PartM2_ptr,
    PartCount_ptr,
    Mean_ptr,  # (C,) fp32 out
    Var_ptr,  # (C,) fp32 out: biased variance
    C,
    M,  # N*H*W
    stride_xc,
    SPLITS,
    BLOCK_C: tl.constexpr,
):
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    shift = _channel_shift(X_ptr, offs_c, mask_c, M, stride_xc)
    count = tl.zeros([BLOCK_C], dtype=tl.float32)
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for s in range(0, SPLITS):
        cnt_s = tl.load(PartCount_ptr + s * C + offs_c, mask=mask_c, other=0.0)
        mean_s = tl.load(PartMean_ptr + s * C + offs_c, mask=mask_c, other=0.0)
        m2_s = tl.load(PartM2_ptr + s * C + offs_c, mask=mask_c, other=0.0)
        total = count + cnt_s
        # a split with no tiles has count 0: it leaves (count, mean, m2) as they are
        weight = tl.where(total > 0, cnt_s / tl.maximum(total, 1.0), 0.0)
        delta = mean_s - mean
        mean += delta * weight
        m2 += m2_s + delta * (delta * (count * weight))
        count = total
    tl.store(Mean_ptr + offs_c, mean + shift, mask=mask_c)
    tl.store(Var_ptr + offs_c, m2 / tl.maximum(count, 1.0), mask=mask_c)


def stats_splits(x: torch.Tensor) -> int:
    """How many column ranges the statistics of ``x`` are split into (rows of the partial workspaces)."""
    N, C, H, W = x.shape
    block_c, block_m = _stats_blocks(x)
    tiles_m = _launch.cdiv(N * H * W, block_m)
    programs_c = _launch.cdiv(C, block_c)
    want = _launch.target_programs(x.device) // programs_c
    return max(1, min(tiles_m, want))


def _stats_blocks(x: torch.Tensor) -> tuple[int, int]:
    C = x.shape[1]
    if _launch.interpreting():
        block_c = min(64, _launch.next_power_of_2(C))
        return block_c, min(4096, (1 << 18) // block_c)
    return min(32, _launch.next_power_of_2(C)), 256


@_launch.on_tensor_device
def channel_stats_launch(
    x: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    part_mean: torch.Tensor,
    part_m2: torch.Tensor,
    part_count: torch.Tensor,
) -> None:
    """Fill ``mean`` and ``var`` (fp32 ``[C]``) from ``x``; the ``part_*`` workspaces are ``(stats_splits(x), C)`` fp32."""
    N, C, H, W = x.shape
    M = N * H * W
    splits = part_mean.shape[0]
    block_c, block_m = _stats_blocks(x)
    grid = (_launch.cdiv(C, block_c), splits)
    _launch.launch(
        _channel_stats_kernel, grid,
        (x, part_mean, part_m2, part_count, C, H * W, M, x.stride(0), x.stride(1)),
        dict(BLOCK_C=block_c, BLOCK_M=block_m, num_warps=4),
    )  # fmt: skip
    merge_block = min(1024 if not _launch.interpreting() else 4096, _launch.next_power_of_2(C))
    _launch.launch(
        _merge_stats_kernel, (_launch.cdiv(C, merge_block),),
        (x, part_mean, part_m2, part_count, mean, var, C, M, x.stride(1), splits),
        dict(BLOCK_C=merge_block, num_warps=4),
    )  # fmt: skip
