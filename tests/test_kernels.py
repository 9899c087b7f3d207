"""The bottleneck kernels (effdense.kernels) against their PyTorch twins, and the twins against plain PyTorch.

On a machine without CUDA the Triton kernels run in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1); with CUDA, every test also runs on the GPU through the autotuned kernels, or with
``EFFDENSE_AUTOTUNE=0`` (the GPU suite's CUDA test step, which then ends in its time) through the untuned
configuration of each shape; ``test_cuda_densenet_shapes`` runs both either way.
Low-precision results are judged against an fp32 "gold" result relative to PyTorch's own error in that dtype.
"""

from __future__ import annotations

import inspect
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from effdense import kernels as K
from effdense.kernels import reference as R

try:  # the twins' tests run without triton; the kernel tests skip (_need_triton)
    import triton
    import triton.runtime.errors

    from effdense.kernels import bottleneck as KB
except ImportError:  # pragma: no cover
    triton = KB = None

# (N, C_total, offset, C, H, W, B): x = buf[:, offset:offset+C] of an (N, C_total, H, W) buffer, B outputs
SHAPES = [
    (1, 20, 0, 20, 7, 7, 24),  # batch 1, C not a multiple of 16, odd 7x7 spatial
    (2, 64, 16, 40, 13, 13, 32),  # channel slice at offset 16 of a 64-channel buffer, 13x13
    (3, 33, 0, 33, 5, 3, 16),  # C = 33, non-square 5x3, M = 45 not a multiple of any block
    (2, 160, 24, 136, 4, 4, 128),  # C > 128: several K steps (interpreter BLOCK_K = 128), B = 128 as DenseNet-BC
    (2, 24, 8, 16, 28, 28, 20),  # M = 1568 > 1024: several M tiles, a tile straddling two samples
    (4, 8, 0, 8, 1, 1, 8),  # 1x1 spatial, C < 16
]
SHAPE_IDS = ["b1-c20-7x7", "slice16-c40-13x13", "c33-5x3", "c136-b128", "m1568", "1x1-c8"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (dtype, atol, rtol) for Triton vs the twin in fp32, and the atol added to 2*err_torch in low precision
FP32_TOL = dict(atol=1e-4, rtol=1e-4)
LOW_ATOL = {torch.bfloat16: 1e-2, torch.float16: 1e-3}


def _devices() -> list:
    devs = [pytest.param("cpu", id="cpu")]
    devs.append(pytest.param("cuda", id="cuda", marks=pytest.mark.cuda))
    return devs


DEVICES = _devices()


def _need_triton(device: str) -> None:
    if not K.kernels_available(device):
        pytest.skip(f"Triton kernels do not run on {device} here (CUDA machine without TRITON_INTERPRET)")


def _case(shape, dtype, device, *, mean=0.0, std=1.0):
    """Inputs of one case: x as a channel slice of a larger buffer, plus BN1 affine, weight, dy, stats."""
    N, C_total, off, C, H, W, B = shape
    buf = (torch.randn(N, C_total, H, W, device=device) * std + mean).to(dtype)
    x = buf[:, off : off + C]
    mean_c = x.float().mean(dim=(0, 2, 3))
    var_c = x.float().var(dim=(0, 2, 3), unbiased=False)
    invstd = torch.rsqrt(var_c + 1e-5)
    gamma = torch.rand(C, device=device) + 0.5
    beta = torch.randn(C, device=device) * 0.5
    scale = gamma * invstd
    shift = beta - mean_c * scale
    weight = (torch.randn(B, C, device=device) / C**0.5).to(dtype)
    dy = torch.randn(N, B, H, W, device=device).to(dtype)
    return dict(buf=buf, x=x, scale=scale, shift=shift, weight=weight, dy=dy, mean=mean_c, invstd=invstd, gamma=gamma, beta=beta)


def _up(t):
    return t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t


def _assert_close(got, ref, gold, dtype, what):
    """fp32: got ~ ref. Low precision: |got - gold| <= 2*|ref - gold| + atol (ref: the twin in that dtype)."""
    got, ref, gold = got.float(), ref.float(), gold.float()
    if dtype == torch.float32:
        torch.testing.assert_close(got, ref, **FP32_TOL, msg=lambda m: f"{what}: {m}")
        return
    err_kernel = (got - gold).abs().max().item()
    err_torch = (ref - gold).abs().max().item()
    scale = max(1.0, gold.abs().max().item())
    assert err_kernel <= 2 * err_torch + LOW_ATOL[dtype] * scale, (
        f"{what}: kernel error {err_kernel:.3g} vs PyTorch's own {err_torch:.3g} in {dtype}"
    )


# --------------------------------------------------------------------------------------------------
# The oracle: reference twins against plain PyTorch (fp64 autograd)


def test_reference_forward_matches_pytorch():
    c = _case((2, 48, 8, 36, 7, 7, 24), torch.float32, "cpu")
    y, y_mean, y_var = R.bottleneck_forward(c["x"], c["scale"], c["shift"], c["weight"])
    x64 = c["x"].double()
    h = F.relu(F.batch_norm(x64, None, None, c["gamma"].double(), c["beta"].double(), training=True, eps=1e-5))
    y_ref = F.conv2d(h, c["weight"].double()[:, :, None, None])
    torch.testing.assert_close(y.double(), y_ref, atol=1e-4, rtol=1e-4)
    var_ref, mean_ref = torch.var_mean(y_ref, dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(y_mean.double(), mean_ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(y_var.double(), var_ref, atol=1e-5, rtol=1e-4)
    assert y.is_contiguous() and y.dtype == torch.float32


def _autograd_grads(c, batch_stats: bool = True) -> dict:
    """float64 autograd of ``conv1x1(relu(bn(x)))`` for case ``c``: the gradients of x, BN1's gamma and beta,
    and the weight. ``batch_stats=False``: BN1 with running statistics equal to the case's (mean, var)."""
    x64 = c["x"].double().requires_grad_()
    g64 = c["gamma"].double().requires_grad_()
    b64 = c["beta"].double().requires_grad_()
    w64 = c["weight"].double().requires_grad_()
    var = 1.0 / c["invstd"].double() ** 2 - 1e-5
    stats = (None, None) if batch_stats else (c["mean"].double(), var)
    h = F.relu(F.batch_norm(x64, *stats, g64, b64, training=batch_stats, eps=1e-5))
    F.conv2d(h, w64[:, :, None, None]).backward(c["dy"].double())
    return {"x": x64.grad, "gamma": g64.grad, "beta": b64.grad, "weight": w64.grad}


def test_reference_backward_matches_autograd():
    """weight grad, input grad through BN1 (batch statistics), dgamma, dbeta, composed from the twins."""
    c = _case((2, 40, 4, 30, 5, 5, 16), torch.float32, "cpu")
    x, w, dy = c["x"], c["weight"], c["dy"]
    gold = _autograd_grads(c)

    dw = R.bottleneck_backward_weight(x, c["scale"], c["shift"], dy)
    dh, sum_dh, sum_dh_xmu = R.bottleneck_backward_input(x, c["scale"], c["shift"], w, dy, c["mean"])
    grad = torch.zeros_like(x)
    R.bn_backward_accumulate(grad, x, dh, c["mean"], c["invstd"], c["gamma"], sum_dh, sum_dh_xmu)
    torch.testing.assert_close(dw.double(), gold["weight"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(grad.double(), gold["x"], atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(sum_dh.double(), gold["beta"], atol=1e-4, rtol=1e-4)  # dbeta
    torch.testing.assert_close((sum_dh_xmu * c["invstd"]).double(), gold["gamma"], atol=1e-4, rtol=1e-4)  # dgamma


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_reference_forward_in_chunks(dtype):
    """chunk=k forms h k input channels at a time; y and its sums match the one-chunk result."""
    c = _case((2, 48, 8, 37, 6, 5, 24), dtype if dtype != torch.float64 else torch.float32, "cpu")
    x, w = c["x"], c["weight"]
    scale, shift = c["scale"], c["shift"]
    if dtype == torch.float64:
        x, w, scale, shift = x.double(), w.double(), scale.double(), shift.double()
    whole = R.bottleneck_forward(x, scale, shift, w)
    parts = R.bottleneck_forward(x, scale, shift, w, chunk=10)  # 4 chunks of 10, 9, 9, 9
    tol = dict(atol=1e-4, rtol=1e-4) if dtype != torch.bfloat16 else dict(atol=3e-2, rtol=2e-2)
    for a, b in zip(parts, whole):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, **tol)
    y, none1, none2 = R.bottleneck_forward(x, scale, shift, w, chunk=10, stats=False)
    assert none1 is None and none2 is None and torch.equal(y, parts[0])
    with pytest.raises(ValueError, match="chunk"):
        R.bottleneck_forward(x, scale, shift, w, chunk=0)


@pytest.mark.parametrize("batch_stats", [True, False], ids=["batch-stats", "running-stats"])
def test_reference_whole_backward_matches_autograd(batch_stats):
    """R.bottleneck_backward (fewer passes, ATen's BN backward) into a channel slice of a gradient buffer."""
    c = _case((2, 40, 4, 30, 5, 5, 16), torch.float32, "cpu")
    x, w, dy = c["x"], c["weight"], c["dy"]
    gold = _autograd_grads(c, batch_stats)

    G = torch.randn(2, 40, 5, 5)
    before = G.clone()
    dw, dgamma, dbeta = R.bottleneck_backward(
        x, c["scale"], c["shift"], w, dy, c["mean"], c["invstd"], c["gamma"], G[:, 4:34], batch_stats=batch_stats
    )
    torch.testing.assert_close(dw.double(), gold["weight"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close((G[:, 4:34] - before[:, 4:34]).double(), gold["x"], atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(dgamma.double(), gold["gamma"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dbeta.double(), gold["beta"], atol=1e-4, rtol=1e-4)
    assert torch.equal(G[:, :4], before[:, :4]) and torch.equal(G[:, 34:], before[:, 34:])


def test_reference_whole_backward_equals_the_three_ops():
    """The fast fp32 path of R.bottleneck_backward and its composition of the three twins agree."""
    c = _case((3, 48, 8, 36, 6, 7, 24), torch.float32, "cpu")
    x, args = c["x"], (c["scale"], c["shift"], c["weight"], c["dy"])
    grad = torch.zeros_like(x)
    dw, dgamma, dbeta = R.bottleneck_backward(x, *args, c["mean"], c["invstd"], c["gamma"], grad)
    dh, sum_dh, sum_dh_xmu = R.bottleneck_backward_input(x, *args, c["mean"])
    grad_ref = torch.zeros_like(x)
    R.bn_backward_accumulate(grad_ref, x, dh, c["mean"], c["invstd"], c["gamma"], sum_dh, sum_dh_xmu)
    torch.testing.assert_close(dw, R.bottleneck_backward_weight(x, c["scale"], c["shift"], c["dy"]))
    torch.testing.assert_close(grad, grad_ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(dgamma, sum_dh_xmu * c["invstd"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(dbeta, sum_dh, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk", [None, 2 * 81 * 5], ids=["one-chunk", "chunks-of-5"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_reference_channel_stats_matches_pytorch(device, chunk, dtype, monkeypatch):
    """The twin's statistics (one kernel on CUDA in fp32/fp64; chunked two passes elsewhere) against
    float64 PyTorch, on a strided channel slice with a mean far from zero."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if chunk is not None:
        monkeypatch.setattr(R, "_STATS_CHUNK", chunk)
    x = (torch.randn(2, 48, 9, 9, device=device, dtype=torch.float64) * 3 + 1e3).to(dtype)[:, 7:30]
    mean, var = R.channel_stats(x)
    assert mean.dtype == var.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert mean.shape == var.shape == (23,)
    x64 = x.double()
    torch.testing.assert_close(mean.double(), x64.mean(dim=(0, 2, 3)), rtol=1e-6, atol=0)
    torch.testing.assert_close(var.double(), x64.var(dim=(0, 2, 3), unbiased=False), rtol=1e-3, atol=0)


# --------------------------------------------------------------------------------------------------
# Triton kernels against the twins


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_bottleneck_forward(shape, dtype, device):
    _need_triton(device)
    c = _case(shape, dtype, device)
    args = (c["x"], c["scale"], c["shift"], c["weight"])
    y, s, q = K.bottleneck_forward(*args, backend="triton")
    y_ref, s_ref, q_ref = K.bottleneck_forward(*args, backend="reference")
    gold = R.bottleneck_forward(*map(_up, args))
    assert y.shape == y_ref.shape and y.dtype == dtype and y.is_contiguous()
    assert s.dtype == q.dtype == torch.float32
    _assert_close(y, y_ref, gold[0], dtype, "y")
    # the sums are of y as stored: compare with the twin's sums, which are of its own rounded y
    torch.testing.assert_close(s, s_ref, atol=1e-3 * (1 + q_ref.max().item()) ** 0.5, rtol=1e-3)
    torch.testing.assert_close(q, q_ref, atol=1e-3, rtol=1e-2 if dtype != torch.float32 else 1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_bottleneck_backward_weight(shape, dtype, device):
    _need_triton(device)
    c = _case(shape, dtype, device)
    args = (c["x"], c["scale"], c["shift"], c["dy"])
    dw = K.bottleneck_backward_weight(*args, backend="triton")
    dw_ref = K.bottleneck_backward_weight(*args, backend="reference")
    assert dw.shape == (shape[-1], shape[3]) and dw.dtype == torch.float32
    # same rounded operands, fp32 accumulation in both: only the summation order differs
    torch.testing.assert_close(dw, dw_ref, atol=1e-4 * (1 + dw_ref.abs().max().item()), rtol=1e-4)


@pytest.mark.parametrize("N, B, C, P", [(3, 16, 24, 49), (3, 16, 24, 4), (2, 8, 5, 1), (1, 4, 4, 2)])
def test_twin_weight_gradient_sum_on_large_and_small_planes(N, B, C, P):
    """The twin's Σ_n dy[n]·h[n]^T: a batched GEMM and a sum on large planes, one 2-D GEMM on planes smaller
    than B·C/(B+C) pixels (where the batched product would be the step's largest temporary); same values."""
    g = torch.Generator().manual_seed(N * 1000 + P)
    d, h = torch.randn(N, B, P, generator=g), torch.randn(N, C, P, generator=g)
    want = torch.einsum("nbp,ncp->bc", d.double(), h.double()).float()
    torch.testing.assert_close(R._weight_grad_sum(d, h), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(R._weight_grad_sum(d.transpose(1, 2).contiguous().transpose(1, 2), h), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_bottleneck_backward_input_into_scratch_slice(shape, dtype, device):
    _need_triton(device)
    c = _case(shape, dtype, device)
    N, _, _, C, H, W, _ = shape
    args = (c["x"], c["scale"], c["shift"], c["weight"], c["dy"], c["mean"])
    scratch = torch.full((N, C + 11, H, W), 7.0, dtype=dtype, device=device)  # reused scratch, dh at offset 5
    out = scratch[:, 5 : 5 + C]
    dh, sdh, sdx = K.bottleneck_backward_input(*args, out=out, backend="triton")
    assert dh.data_ptr() == out.data_ptr()
    assert (scratch[:, :5] == 7).all() and (scratch[:, 5 + C :] == 7).all(), "wrote outside the out slice"
    dh_ref, sdh_ref, sdx_ref = K.bottleneck_backward_input(*args, backend="reference")
    gold, _, _ = R.bottleneck_backward_input(*map(_up, args))
    _assert_close(dh, dh_ref, gold, dtype, "dh")
    # sums of dh as stored: consistent with the twin's sums of its own dh
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    atol = tol * (1 + dh_ref.float().abs().sum().item() / C)
    torch.testing.assert_close(sdh, sdh_ref, atol=atol, rtol=tol)
    torch.testing.assert_close(sdx, sdx_ref, atol=atol * (1 + c["x"].float().abs().max().item()), rtol=tol)
    # out=None allocates in x.dtype
    dh2, _, _ = K.bottleneck_backward_input(*args, backend="triton")
    assert dh2.shape == (N, C, H, W) and dh2.dtype == dtype


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_bn_backward_accumulate_into_grad_slice(shape, dtype, device):
    _need_triton(device)
    c = _case(shape, dtype, device)
    N, C_total, off, C, H, W, _ = shape
    x = c["x"]
    dh = torch.randn(x.shape, device=device).to(dtype)
    sdh = dh.float().sum(dim=(0, 2, 3))
    sdx = (dh.float() * (x.float() - c["mean"][:, None, None])).sum(dim=(0, 2, 3))
    G = torch.randn(N, C_total, H, W, device=device).to(dtype)  # shared gradient buffer
    G_ref = G.clone()
    vecs = (c["mean"], c["invstd"], c["gamma"], sdh, sdx)
    K.bn_backward_accumulate(G[:, off : off + C], x, dh, *vecs, backend="triton")
    K.bn_backward_accumulate(G_ref[:, off : off + C], x, dh, *vecs, backend="reference")
    # untouched channels of the shared buffer must stay equal bit for bit
    assert torch.equal(G[:, :off], G_ref[:, :off]) and torch.equal(G[:, off + C :], G_ref[:, off + C :])
    gold_val = G_ref[:, off : off + C].float()
    if dtype == torch.float32:
        torch.testing.assert_close(G[:, off : off + C], G_ref[:, off : off + C], **FP32_TOL)
    else:  # same fp32 formula, one rounding at the store: at most one ulp apart
        ulp = torch.finfo(dtype).eps * gold_val.abs().clamp_min(1.0)
        assert ((G[:, off : off + C].float() - gold_val).abs() <= ulp).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("batch_stats", [True, False], ids=["batch-stats", "running-stats"])
@pytest.mark.parametrize("chunk", [None, 7, 1000], ids=["whole", "chunk7", "chunk-wider"])
def test_whole_bottleneck_backward(batch_stats, dtype, device, chunk):
    """Triton's whole backward against the twin's, on a channel slice of a gradient buffer; with ``chunk``
    the kernels work 7 channels at a time (6 chunks of 40, the last narrower) and the twin works whole,
    and the twin's own chunked result matches its whole one."""
    _need_triton(device)
    shape = SHAPES[1]
    c = _case(shape, dtype, device)
    N, C_total, off, C, H, W, _ = shape
    args = (c["x"], c["scale"], c["shift"], c["weight"], c["dy"], c["mean"], c["invstd"], c["gamma"])
    G = torch.randn(N, C_total, H, W, device=device).to(dtype)
    G_ref, G_ref_chunked = G.clone(), G.clone()
    got = K.bottleneck_backward(*args, G[:, off : off + C], batch_stats=batch_stats, chunk=chunk, backend="triton")
    ref = K.bottleneck_backward(*args, G_ref[:, off : off + C], batch_stats=batch_stats, backend="reference")
    ref_chunked = K.bottleneck_backward(
        *args, G_ref_chunked[:, off : off + C], batch_stats=batch_stats, chunk=chunk, backend="reference"
    )
    assert torch.equal(G[:, :off], G_ref[:, :off]) and torch.equal(G[:, off + C :], G_ref[:, off + C :])
    for what, a, b in zip(("dW", "dgamma", "dbeta", "grad"), (*got, G), (*ref, G_ref)):
        if dtype == torch.float32:
            torch.testing.assert_close(a, b, **FP32_TOL, msg=lambda m, what=what: f"{what}: {m}")
        else:  # the same math in bf16 operands: judged relative to the result's magnitude
            scale = max(1.0, b.float().abs().max().item())
            assert (a.float() - b.float()).abs().max().item() <= LOW_ATOL[dtype] * scale * 4, what
    for what, a, b in zip(("dW", "dgamma", "dbeta", "grad"), (*ref_chunked, G_ref_chunked), (*ref, G_ref)):
        tol = FP32_TOL if dtype == torch.float32 else dict(atol=LOW_ATOL[dtype] * 4, rtol=LOW_ATOL[dtype] * 4)
        torch.testing.assert_close(a, b, **tol, msg=lambda m, what=what: f"twin chunked, {what}: {m}")


def test_whole_bottleneck_backward_rejects_a_bad_chunk():
    c = _case(SHAPES[0], torch.float32, "cpu")
    args = (c["x"], c["scale"], c["shift"], c["weight"], c["dy"], c["mean"], c["invstd"], c["gamma"])
    for backend in ("reference", "triton") if K.kernels_available("cpu") else ("reference",):
        for bad, error in ((0, ValueError), (-3, ValueError), (2.5, TypeError), (True, TypeError)):
            with pytest.raises(error, match="chunk: expected a positive int or None"):
                K.bottleneck_backward(*args, torch.zeros_like(c["x"]), chunk=bad, backend=backend)


def test_on_off_keywords_must_be_bools():
    """``stats`` and ``batch_stats`` are bools: a string such as "no" is truthy and would silently mean True."""
    c = _case(SHAPES[0], torch.float32, "cpu")
    args = (c["x"], c["scale"], c["shift"], c["weight"])
    for backend in ("reference", "triton") if K.kernels_available("cpu") else ("reference",):
        with pytest.raises(TypeError, match=r"stats: expected a bool \(True or False\), got str 'yes'"):
            K.bottleneck_forward(*args, stats="yes", backend=backend)
        # numpy's bool was named "bool" in the message, as if it were one
        with pytest.raises(TypeError, match=r"stats: expected a bool \(True or False\), got numpy\.bool\w* "):
            K.bottleneck_forward(*args, stats=np.True_, backend=backend)
        with pytest.raises(TypeError, match=r"batch_stats: expected a bool \(True or False\), got str 'no'"):
            K.bottleneck_backward(*args, c["dy"], c["mean"], c["invstd"], c["gamma"], torch.zeros_like(c["x"]),
                                  batch_stats="no", backend=backend)  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_channel_stats_large_mean(dtype, device):
    """mean 1e3, std 1: naive E[x²]-E[x]² in fp32 would lose the variance entirely."""
    _need_triton(device)
    N, H, W = 3, 13, 13
    buf = torch.randn(N, 50, H, W, device=device, dtype=torch.float64) + 1e3
    x = buf[:, 9:30].to(dtype)  # channel slice at offset 9, 21 channels
    exact = x.double()
    mean_gold, var_gold = exact.mean(dim=(0, 2, 3)), exact.var(dim=(0, 2, 3), unbiased=False)
    for backend in ("triton", "reference"):
        mean, var = K.channel_stats(x, backend=backend)
        assert mean.dtype == var.dtype == torch.float32 and mean.shape == (21,)
        torch.testing.assert_close(mean.double(), mean_gold, atol=1e-3, rtol=1e-6, msg=lambda m: f"{backend}: {m}")
        torch.testing.assert_close(var.double(), var_gold, atol=1e-3, rtol=1e-3, msg=lambda m: f"{backend}: {m}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(4, 3, 8, 8), (5, 2, 70, 70)], ids=["one-tile", "several-splits"])
@pytest.mark.parametrize("mean_, std", [(1e4, 1e-2), (-1e4, 1e-2), (1e20, 1e17)])
def test_channel_stats_mean_far_above_spread(mean_, std, shape, device):
    """mean/std = 1e6 (and 1e2 at 1e20, whose square overflows fp32): against the float64 statistics of the
    same fp32 values. The fp32 rounding of a tile's (kernel) or the first pass's (twin) mean must not count
    as variance: uncorrected, it made var 1e-2 (kernel) and 2e-3 (twin) off; and a merge that squared the
    raw mean gave NaN at 1e20. The larger shape has several tiles and split programs: Chan's merges."""
    _need_triton(device)
    from effdense.kernels import stats as S

    torch.manual_seed(0)
    x = (torch.randn(*shape, dtype=torch.float64) * std + mean_).float().to(device)
    assert S.stats_splits(x) > 1 or shape[-1] == 8
    var_gold, mean_gold = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
    for backend in ("triton", "reference"):
        mean, var = K.channel_stats(x, backend=backend)
        torch.testing.assert_close(mean.double(), mean_gold, atol=0, rtol=1e-6, msg=lambda m: f"{backend}: {m}")
        torch.testing.assert_close(var.double(), var_gold, atol=0, rtol=1e-5, msg=lambda m: f"{backend}: {m}")


@pytest.mark.parametrize("device", DEVICES)
def test_channel_stats_merges_splits_including_an_empty_one(device):
    """Enough columns for several split programs (the last one possibly without a tile): their partial
    (count, mean, M2) are merged by the merge kernel, against float64 PyTorch."""
    _need_triton(device)
    from effdense.kernels import stats as S

    ramp = torch.linspace(0, 20, 129, device=device, dtype=torch.float64).view(1, 1, 129, 1)
    x = (torch.randn(1, 7, 129, 129, device=device, dtype=torch.float64) * 2 + 1e3 + ramp).float()  # splits' means differ
    splits = S.stats_splits(x)
    assert splits > 1, "the case must split the columns"
    mean, var = K.channel_stats(x, backend="triton")
    exact = x.double()
    torch.testing.assert_close(mean.double(), exact.mean(dim=(0, 2, 3)), atol=1e-3, rtol=1e-6)
    torch.testing.assert_close(var.double(), exact.var(dim=(0, 2, 3), unbiased=False), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[4]], ids=[SHAPE_IDS[0], SHAPE_IDS[4]])
def test_channel_stats_shapes(shape, device):
    _need_triton(device)
    x = _case(shape, torch.float32, device)["x"]
    m, v = K.channel_stats(x, backend="triton")
    m_ref, v_ref = K.channel_stats(x, backend="reference")
    torch.testing.assert_close(m, m_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v, v_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_channel_stats_into_slices_of_longer_vectors(backend, device):
    """``out=``: the statistics land in slices of longer vectors (the block's statistics cache), which are
    returned; nothing else in those vectors changes; the plain eager launch bumps their versions."""
    if backend == "triton":
        _need_triton(device)
    x = _case(SHAPES[1], torch.float32, device)["x"]
    C = x.shape[1]
    mean_all = torch.full((C + 10,), -7.0, device=device)
    var_all = torch.full((C + 10,), -7.0, device=device)
    out = (mean_all[4 : 4 + C], var_all[4 : 4 + C])
    version = mean_all._version
    m, v = K.channel_stats(x, out=out, backend=backend)
    assert m is out[0] and v is out[1] and mean_all._version > version
    m_ref, v_ref = K.channel_stats(x, backend="reference")
    torch.testing.assert_close(m, m_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v, v_ref, atol=1e-5, rtol=1e-5)
    for t in (mean_all, var_all):
        assert torch.all(t[:4] == -7.0) and torch.all(t[4 + C :] == -7.0)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_channel_stats_out_errors(backend):
    if backend == "triton":
        _need_triton("cpu")
    x = _case(SHAPES[0], torch.float32, "cpu")["x"]
    C = x.shape[1]
    good = torch.zeros(C)
    cases = [
        (good, TypeError, "a \\(mean, var\\) pair"),
        ((good, torch.zeros(C + 1)), ValueError, "out\\[1\\] \\(var\\): expected a 1-D tensor of shape"),
        ((good, torch.zeros(C, dtype=torch.float64)), TypeError, "out\\[1\\] \\(var\\): expected dtype torch.float32"),
        ((torch.zeros(2 * C)[::2], good), ValueError, "out\\[0\\] \\(mean\\): expected unit stride"),
        ((good, good), ValueError, "out: expected separate memory for mean and var"),
        ((torch.zeros(2 * C)[:C], torch.zeros(2 * C)[1 : C + 1]), None, None),  # separate storages: fine
    ]
    shared = torch.zeros(2 * C)
    cases.append(((shared[:C], shared[1 : C + 1]), ValueError, "out: expected separate memory for mean and var"))
    cases.append(((shared[:C], shared[C:]), None, None))  # adjacent, not overlapping: fine
    for out, exc, msg in cases:
        if exc is None:
            K.channel_stats(x, out=out, backend=backend)
            continue
        with pytest.raises(exc, match=msg):
            K.channel_stats(x, out=out, backend=backend)


# --------------------------------------------------------------------------------------------------
# Differentiable functional op


@pytest.mark.parametrize("device", DEVICES)
def test_bn_relu_conv1x1_grads(device):
    c = _case(SHAPES[1], torch.float32, device)
    x = c["x"].detach().clone().requires_grad_()
    scale = c["scale"].clone().requires_grad_()
    shift = c["shift"].clone().requires_grad_()
    w = c["weight"].clone().requires_grad_()
    y = K.bn_relu_conv1x1(x, scale, shift, w)
    y.backward(c["dy"])
    x2, s2, t2, w2 = (t.detach().clone().requires_grad_() for t in (x, scale, shift, w))
    y2 = F.conv2d(F.relu(x2 * s2[:, None, None] + t2[:, None, None]), w2[:, :, None, None])
    y2.backward(c["dy"])
    torch.testing.assert_close(y, y2, **FP32_TOL)
    for got, ref, name in ((x.grad, x2.grad, "x"), (scale.grad, s2.grad, "scale"), (shift.grad, t2.grad, "shift"), (w.grad, w2.grad, "weight")):
        torch.testing.assert_close(got, ref, atol=1e-3, rtol=1e-3, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_nan_propagates_as_pytorch_relu(backend, device):
    """A NaN input channel makes every output NaN and a NaN weight-gradient column, as conv1x1(relu(.)) in
    PyTorch does (a ReLU that dropped it would hide a NaN loss); the input gradient's mask is PyTorch's
    threshold_backward (a NaN pre-activation passes its gradient, masked positions stay 0 under a NaN dy)."""
    if backend == "triton":
        _need_triton(device)
    nan = float("nan")
    x = torch.tensor([nan, 1.0, -2.0, 0.5], device=device).view(1, 4, 1, 1).repeat(2, 1, 3, 3)
    scale, shift = torch.ones(4, device=device), torch.zeros(4, device=device)
    w = torch.linspace(0.5, 2.0, 8, device=device).view(2, 4)
    y, y_mean, y_var = K.bottleneck_forward(x, scale, shift, w, backend=backend)
    assert y.isnan().all() and y_mean.isnan().all() and y_var.isnan().all()
    dy = torch.ones(2, 2, 3, 3, device=device)
    dw = K.bottleneck_backward_weight(x, scale, shift, dy, backend=backend)
    assert dw[:, 0].isnan().all() and not dw[:, 1:].isnan().any()
    dy[0, 0, 0, 0] = nan
    dh, sum_dh, _ = K.bottleneck_backward_input(x, scale, shift, w, dy, torch.zeros(4, device=device), backend=backend)
    u = x * scale[:, None, None] + shift[:, None, None]
    g = torch.einsum("bc,nbhw->nchw", w, dy)
    ref = torch.ops.aten.threshold_backward(g, F.relu(u), 0)  # autograd's ReLU backward
    torch.testing.assert_close(dh, ref, equal_nan=True)
    assert sum_dh[2] == 0 and sum_dh[[0, 1, 3]].isnan().all()


@pytest.mark.parametrize("device", DEVICES)
def test_weight_gradient_ignores_padded_pixels_whose_h_overflows(device):
    """fp16, a channel whose every real ``relu(scale*x + shift)`` is finite but whose ``relu(shift)`` (what a
    padded pixel of the last pixel tile computes from its ``x = 0``) overflows fp16: the kernel's dW was NaN
    in every row (0 * inf at the padded pixels, whose dy is 0), in the whole backward and through autograd
    too; the twin's was finite. 3x3 and 7x7 planes: not a multiple of any pixel block."""
    _need_triton(device)
    torch.manual_seed(0)
    for H in (3, 7):
        N, C, B = 2, 3, 4
        x = (torch.rand(N, C, H, H, device=device) - 1000.0).half()  # a channel mean near -1000, spread ~0.3
        scale = torch.full((C,), 100.0, device=device)  # gamma * invstd of that spread
        shift = torch.full((C,), 100_040.0, device=device)  # beta - mean*scale: h = relu(scale*x + shift) <= ~140
        dy = torch.randn(N, B, H, H, device=device).half()
        ref = K.bottleneck_backward_weight(x, scale, shift, dy, backend="reference")
        assert ref.isfinite().all()
        got = K.bottleneck_backward_weight(x, scale, shift, dy, backend="triton")
        torch.testing.assert_close(got, ref, rtol=2e-3, atol=0.05)
        w = torch.randn(B, C, device=device).half()
        mean, invstd, gamma = torch.full((C,), -1000.0, device=device), scale.clone(), torch.ones(C, device=device)
        dw, _, _ = K.bottleneck_backward(x, scale, shift, w, dy, mean, invstd, gamma, torch.zeros_like(x), backend="triton")
        torch.testing.assert_close(dw, ref, rtol=2e-3, atol=0.05)


def test_bf16_rounding_in_the_interpreter_keeps_every_nan():
    """In the interpreter the kernels round fp32 to bf16 on the bits; a NaN with all low mantissa bits set
    (0x7FFFFFFF) carried out of the mantissa and became -0.0: a NaN shift gave y = 1 where the twin's is NaN."""
    _need_triton("cpu")
    x = torch.ones(1, 2, 2, 2, dtype=torch.bfloat16)
    shift = torch.zeros(2)
    shift.view(torch.int32)[0] = 0x7FFFFFFF
    w = torch.ones(1, 2, dtype=torch.bfloat16)
    y, _, _ = K.bottleneck_forward(x, torch.ones(2), shift, w, stats=False, backend="triton")
    assert y.isnan().all()


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_forward_statistics_keep_their_digits_at_a_large_mean(backend):
    """BN2's statistics from the forward op where each channel's mean is ~100 times its spread: the
    variance within 1e-4 of an fp64 two-pass one. Before, the op returned Σy and Σy² and the variance was
    E[y²] - E[y]² in fp32, which cancels here (errors of several percent, up to the whole variance)."""
    if backend == "triton":
        _need_triton("cpu")
    torch.manual_seed(0)
    N, C, H, W, B = 3, 24, 5, 6, 10
    x = torch.randn(N, C, H, W) * 0.01
    scale, shift = torch.ones(C), torch.full((C,), 10.0)  # h = 10 + small: y's mean ~ 100x its spread
    w = torch.rand(B, C) + 0.5
    y, mean, var = K.bottleneck_forward(x, scale, shift, w, backend=backend)
    var64, mean64 = torch.var_mean(y.double(), dim=(0, 2, 3), correction=0)  # of y as stored
    assert (mean64.abs() / var64.sqrt()).min() > 50
    torch.testing.assert_close(mean.double(), mean64, rtol=1e-6, atol=0)
    torch.testing.assert_close(var.double(), var64, rtol=1e-4, atol=0)


def test_forward_launch_initialises_its_sums():
    """The forward launch with statistics takes its three fp32 ``[B]`` buffers with any contents: a first
    kernel zeroes the sums and writes the reference sample ``y[0, :, 0]`` (once, instead of in every GEMM
    program), then the GEMM adds into the sums. Buffers holding NaN and large values before the launch give
    the statistics of zeroed ones; an empty batch gives reference 0 and zero sums."""
    _need_triton("cpu")
    torch.manual_seed(0)
    N, C, H, W, B = 2, 20, 3, 5, 12
    x = torch.randn(N, C + 4, H, W)[:, 4:]  # a channel slice at an offset
    scale, shift, w = torch.rand(C) + 0.5, torch.randn(C), torch.randn(B, C)
    y = torch.empty(N, B, H, W)
    sums = torch.full((3, B), float("nan"))
    sums[1] = 1e30
    KB.bottleneck_forward_launch(x, scale, shift, w, y, *sums.unbind(0))
    h = torch.relu(x * scale[:, None, None] + shift[:, None, None])
    y64 = torch.einsum("bc,nchw->nbhw", w.double(), h.double())
    ref = y64[0, :, 0, 0]
    torch.testing.assert_close(sums[2].double(), ref, rtol=1e-5, atol=1e-5)
    d = y.double() - sums[2].double()[None, :, None, None]
    torch.testing.assert_close(sums[0].double(), d.sum(dim=(0, 2, 3)), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sums[1].double(), (d * d).sum(dim=(0, 2, 3)), rtol=1e-4, atol=1e-4)
    empty = torch.full((3, B), float("nan"))
    KB.bottleneck_forward_launch(x[:0], scale, shift, w, y[:0], *empty.unbind(0))
    assert (empty == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_running_stats_accumulate_does_not_read_x(backend, dtype):
    """With running statistics (``batch_stats=False``) BN's backward is ``gamma*invstd*dh``: a NaN or inf in
    ``x`` must not reach ``grad``, as in PyTorch's eval-mode BatchNorm. Before, the accumulation ran the
    batch formula with zero sums, and ``(x - mean) * 0`` turned a NaN pixel's finite gradient into NaN
    (in a model: NaN gradients for earlier layers and every BatchNorm bias of an eval-mode step)."""
    if backend == "triton":
        _need_triton("cpu")
    N, C, H, W = 2, 5, 3, 3
    x = torch.randn(N, C, H, W).to(dtype)
    x[0, 1, 1, 1], x[1, 3, 0, 2] = float("nan"), float("inf")
    dh = torch.randn(N, C, H, W).to(dtype)
    mean, var = torch.randn(C), torch.rand(C) + 0.5
    invstd, gamma = torch.rsqrt(var + 1e-5), torch.randn(C)
    nan_sums = torch.full((C,), float("nan"))  # not read either
    grad0 = torch.randn(N, C, H, W).to(dtype)
    grad = grad0.clone()
    K.bn_backward_accumulate(grad, x, dh, mean, invstd, gamma, nan_sums, nan_sums, batch_stats=False, backend=backend)
    # PyTorch's own eval-mode BatchNorm backward of the same dh, added in fp32 and rounded once
    ref = torch.ops.aten.native_batch_norm_backward(
        dh.float(), x.float(), gamma, mean, var, None, None, False, 1e-5, [True, False, False]
    )[0]
    assert ref.isfinite().all() and grad.isfinite().all()
    want = (grad0.float() + ref).to(dtype)
    if dtype == torch.float32:
        torch.testing.assert_close(grad, want, rtol=1e-6, atol=1e-6)
    else:  # one rounding of the same fp32 sum: at most one ulp apart
        ulp = torch.finfo(dtype).eps * want.float().abs().clamp_min(1.0)
        assert ((grad.float() - want.float()).abs() <= ulp).all()
    with pytest.raises(TypeError, match="batch_stats: expected a bool"):
        K.bn_backward_accumulate(grad, x, dh, mean, invstd, gamma, nan_sums, nan_sums, batch_stats="no", backend=backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["kernels", "twins"])
def test_bn_relu_conv1x1_input_grad_through_a_nan_pixel(dtype):
    """``bn_relu_conv1x1``'s input gradient is ``scale * du``, finite where ``du`` is, as autograd gives for
    ``conv2d(relu(scale*x + shift))``: a NaN in ``x`` does not make its own gradient NaN (fp32 runs the
    kernels under the interpreter, fp64 the twins)."""
    if dtype == torch.float32:
        _need_triton("cpu")
    x = torch.randn(2, 4, 3, 3, dtype=dtype)
    x[1, 2, 0, 0] = float("nan")
    s, t, w = torch.rand(4, dtype=dtype) + 0.5, torch.randn(4, dtype=dtype), torch.randn(3, 4, dtype=dtype)
    dy = torch.randn(2, 3, 3, 3, dtype=dtype)
    ins = [v.clone().requires_grad_() for v in (x, s, t, w)]
    K.bn_relu_conv1x1(*ins).backward(dy)
    ref = [v.clone().requires_grad_() for v in (x, s, t, w)]
    F.conv2d(F.relu(ref[0] * ref[1][:, None, None] + ref[2][:, None, None]), ref[3][:, :, None, None]).backward(dy)
    assert ins[0].grad.isfinite().all()
    for got, want in zip(ins, ref):
        torch.testing.assert_close(got.grad, want.grad, equal_nan=True, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# torch.library integration


def test_fake_tensor_mode_shapes():
    _need_triton("cpu")
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 64, 7, 7, dtype=torch.bfloat16)[:, 8:40]
        scale, shift, mean = torch.empty(32), torch.empty(32), torch.empty(32)
        w = torch.empty(16, 32, dtype=torch.bfloat16)
        dy = torch.empty(2, 16, 7, 7, dtype=torch.bfloat16)
        y, s, q = K.bottleneck_forward(x, scale, shift, w, backend="triton")
        assert y.shape == (2, 16, 7, 7) and y.dtype == torch.bfloat16 and s.shape == q.shape == (16,)
        dw = K.bottleneck_backward_weight(x, scale, shift, dy, backend="triton")
        assert dw.shape == (16, 32) and dw.dtype == torch.float32
        dh, a, b = K.bottleneck_backward_input(x, scale, shift, w, dy, mean, backend="triton")
        assert dh.shape == (2, 32, 7, 7) and dh.dtype == torch.bfloat16 and a.dtype == b.dtype == torch.float32
        K.bn_backward_accumulate(torch.empty_like(x), x, dh, mean, scale, scale, a, b, backend="triton")
        m, v = K.channel_stats(x, backend="triton")
        assert m.shape == v.shape == (32,) and m.dtype == torch.float32
        assert K.bn_relu_conv1x1(x, scale, shift, w).shape == (2, 16, 7, 7)


def test_opcheck_forward():
    _need_triton("cpu")
    c = _case(SHAPES[0], torch.float32, "cpu")
    N, _, _, C, H, W, B = SHAPES[0]
    y = torch.empty(N, B, H, W)
    args = (c["x"], c["scale"], c["shift"], c["weight"], y, torch.zeros(B), torch.zeros(B), torch.zeros(B))
    torch.library.opcheck(
        torch.ops.effdense.bottleneck_forward.default,
        args,
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


def test_opcheck_forward_without_sums():
    """``stats=False`` passes no sum or reference buffers to the op (``None``, the kernel skips its epilogue)."""
    _need_triton("cpu")
    c = _case(SHAPES[0], torch.float32, "cpu")
    N, _, _, C, H, W, B = SHAPES[0]
    args = (c["x"], c["scale"], c["shift"], c["weight"], torch.empty(N, B, H, W), None, None, None)
    torch.library.opcheck(
        torch.ops.effdense.bottleneck_forward.default,
        args,
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


def _gemm_checks() -> dict:
    return {
        "forward": test_bottleneck_forward,
        "backward_weight": test_bottleneck_backward_weight,
        "backward_input": test_bottleneck_backward_input_into_scratch_slice,
    }


# a channel slice at an offset, several K and B tiles (C = 136, B = 128), several pixel tiles per sample
CONFIG_SHAPES = [SHAPES[1], SHAPES[3], SHAPES[4]]


@pytest.mark.slow  # ~1 minute in the interpreter; on a fresh GPU each config compiles for each case
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "kernel, index", [(kernel, i) for kernel, configs in (KB.CONFIGS if KB else {}).items() for i in range(len(configs))]
)
def test_every_autotune_config_matches_the_twin(kernel, index, dtype, device):
    """Each GEMM kernel with each of its autotuning configurations, forced (the autotuner may choose any of
    them for some shape), on awkward shapes: the tests above, with those block sizes instead of the tuned
    (CUDA) or single (interpreter) ones. On CUDA a config too large for the device's shared memory, which the
    autotuner prunes, is skipped."""
    _need_triton(device)
    config = KB.CONFIGS[kernel][index]
    with KB.forced_config(kernel, config):
        for shape in CONFIG_SHAPES:
            try:
                _gemm_checks()[kernel](shape, dtype, device)
            except triton.runtime.errors.OutOfResources as exc:
                pytest.skip(f"{config} does not fit this device: {exc}")


def test_forced_config_is_used_and_restored():
    """forced_config changes the launch (a block size that cannot compile fails) and is undone on exit."""
    _need_triton("cpu")
    c = _case(SHAPES[0], torch.float32, "cpu")
    args = (c["x"], c["scale"], c["shift"], c["weight"])
    bad = triton.Config({"BLOCK_B": 24, "BLOCK_M": 64, "BLOCK_K": 32}, num_warps=4, num_stages=2)  # not a power of 2
    with pytest.raises(triton.errors.TritonError, match="power of 2"), KB.forced_config("forward", bad):
        K.bottleneck_forward(*args, backend="triton")
    assert not KB._FORCED
    K.bottleneck_forward(*args, backend="triton")
    with pytest.raises(ValueError, match="expected one of"), KB.forced_config("fwd", bad):
        pass
    with pytest.raises(TypeError, match="triton.Config"), KB.forced_config("forward", {"BLOCK_B": 64}):
        pass


def test_tuned_launch_reuses_the_autotuners_choice(monkeypatch):
    """On a GPU the first launch of a tuning key goes through the Autotuner; later ones call the kernel
    directly with the keywords the Autotuner passes for its choice (here with stand-ins for both, since the
    Autotuner does not run in the interpreter)."""
    if KB is None:
        pytest.skip("triton missing")
    monkeypatch.setattr(KB, "_CHOSEN", {})
    chosen = triton.Config({"BLOCK_B": 64, "BLOCK_M": 128, "BLOCK_K": 32}, num_warps=4, num_stages=5)

    class Kernel:  # a JITFunction: kernel[grid](*args, **keywords)
        def __init__(self):
            self.calls = []

        def __getitem__(self, grid):
            return lambda *args, **kw: self.calls.append((grid, args, kw))

    class Tuned(Kernel):  # an Autotuner: tunes, sets best_config, launches its fn
        def __init__(self, fn, has_best=True):
            super().__init__()
            self.fn, self.has_best = fn, has_best

        def __getitem__(self, grid):
            def run(*args, **kw):
                self.calls.append((grid, args, kw))
                if self.has_best:
                    self.best_config = chosen
            return run

    grid = lambda meta: (1,)  # noqa: E731
    tuned = Tuned(Kernel())
    for _ in range(3):
        KB._launch_tuned(tuned, grid, ("x", 5), ("forward", 0, torch.bfloat16, True, 128, 256, 4096, 64), STATS=True)
    assert len(tuned.calls) == 1 and len(tuned.fn.calls) == 2
    assert tuned.fn.calls[0] == ((1,), ("x", 5), {"STATS": True, **chosen.all_kwargs()})  # the grid for the choice
    KB._launch_tuned(tuned, grid, ("x", 5), ("forward", 0, torch.bfloat16, False, 128, 256, 4096, 64), STATS=False)
    assert len(tuned.calls) == 2, "another key is tuned (or looked up) by the Autotuner first"
    untuned = Tuned(Kernel(), has_best=False)  # a Triton without best_config: the Autotuner every time
    for _ in range(2):
        KB._launch_tuned(untuned, grid, (), ("backward_input", 0, torch.float32, 128, 256, 4096, 64))
    assert len(untuned.calls) == 2 and not untuned.fn.calls


def test_untuned_launch_uses_the_first_config_the_pruning_keeps(monkeypatch):
    """With autotuning off (``set_autotune(False)``, or EFFDENSE_AUTOTUNE=0 at import) a GPU launch skips the
    Autotuner: each key gets the first configuration of the kernel's list that its autotuner's pruning keeps
    and that compiles for the device (one that runs out of resources is skipped, as the autotuner skips it),
    remembered per key and launched directly; back on, the Autotuner path again. The GPU branch is taken here
    with the interpreter check, the device's shared memory and the kernel replaced by stand-ins."""
    if KB is None:
        pytest.skip("triton missing")
    with pytest.raises(TypeError, match="expected a bool"):
        K.set_autotune("no")
    monkeypatch.setattr(KB._launch, "interpreting", lambda: False)
    monkeypatch.setattr(KB._launch, "max_shared_memory", lambda index: 200 * 1024)
    monkeypatch.setattr(KB, "_UNTUNED", {})
    # B = 20 drops BLOCK_B > max(64, 2 * 32); 200 KiB drops the configs whose bf16 operand tiles need more
    fits = [c for c in KB.CONFIGS["forward"] if c.kwargs["BLOCK_B"] <= 64
            and c.num_stages * (c.kwargs["BLOCK_B"] + c.kwargs["BLOCK_M"]) * c.kwargs["BLOCK_K"] * 2 <= 200 * 1024]
    assert len(fits) >= 2 and fits[0] is not KB.CONFIGS["forward"][0]  # the pruning decides, not the order alone
    meta = [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages) for c in fits]
    launched, tuned, refused = [], [], []

    class Kernel:  # a JITFunction whose compilation of the configs in `refused` runs out of resources
        def __getitem__(self, grid):
            def run(*args, **kw):
                if {k: kw[k] for k in meta[0]} in refused:
                    raise triton.runtime.errors.OutOfResources(300_000, 232_448, "shared memory")
                launched.append((grid, kw))
            return run

    monkeypatch.setattr(KB, "_bottleneck_fwd_kernel", Kernel())
    monkeypatch.setattr(KB, "_launch_tuned", lambda *args, **kw: tuned.append(args[-1]))
    x = torch.randn(2, 40, 6, 6, dtype=torch.bfloat16)
    w = torch.randn(20, 40, dtype=torch.bfloat16)
    y = torch.empty(2, 20, 6, 6, dtype=torch.bfloat16)
    sums = torch.zeros(3, 20)
    scale = shift = torch.ones(40)

    def launch(stats=True):
        KB.bottleneck_forward_launch(x, scale, shift, w, y, *(sums.unbind(0) if stats else (None, None, None)))

    previous = K.set_autotune(False)
    try:
        for _ in range(2):
            launch()
        refused.append(meta[0])  # another key (no sums): its first pick fails to compile, the next one runs
        launch(stats=False)
        assert [m for m in KB._UNTUNED.values()] == [meta[0], meta[1]]  # one pick per key, kept
        refused.extend(meta)
        monkeypatch.setattr(KB, "_UNTUNED", {})
        with pytest.raises(RuntimeError, match="no configuration of the forward kernel fits"):
            launch()
    finally:
        K.set_autotune(previous)
    assert len(launched) == 3 and not tuned
    for (grid, kw), m in zip(launched, (meta[0], meta[0], meta[1])):
        assert {k: kw[k] for k in m} == m
        assert grid == (KB._launch.cdiv(20, m["BLOCK_B"]) * 2 * KB._launch.cdiv(36, m["BLOCK_M"]),)
    assert [kw["STATS"] for _, kw in launched] == [True, True, False]
    launch()  # tuning on: the Autotuner path
    assert len(launched) == 3 and len(tuned) == 1


class _Compiled:  # a CompiledKernel: its launcher, function handle and packed metadata
    def __init__(self, log, refuse=False):
        self.function, self.packed_metadata, self.log, self.refuse = "function", "packed", log, refuse

    def run(self, *args):
        if self.refuse:
            raise TypeError("function takes exactly 14 arguments (15 given)")
        self.log.append(("direct", args))


class _Param:
    def __init__(self, default=inspect.Parameter.empty):
        self.default = default


class _Jit:  # a JITFunction(X, Y, n, scale, BLOCK: constexpr, FLAG: constexpr = True)
    arg_names = ["X", "Y", "n", "scale", "BLOCK", "FLAG"]

    def __init__(self, log, compiled):
        self.log, self.compiled = log, compiled
        self.params = [_Param(), _Param(), _Param(), _Param(), _Param(), _Param(True)]

    def __getitem__(self, grid):
        def run(*args, **kw):
            self.log.append(("triton", grid, args, kw))
            return self.compiled
        return run


class _Hooks:  # Triton's runtime knobs: launch hooks (an empty HookChain, or None in older Tritons)
    def __init__(self, enter=None):
        self.launch_enter_hook, self.launch_exit_hook = enter, None


@pytest.fixture
def direct_launch(monkeypatch):
    """The GPU route of ``_launch.launch`` with Triton's driver, knobs and kernel replaced by stand-ins."""
    if KB is None:
        pytest.skip("triton missing")
    L = KB._launch
    monkeypatch.setattr(L, "_INTERPRETING", False)
    monkeypatch.setattr(L, "_COMPILED", {})
    hooks = _Hooks()
    monkeypatch.setattr(L, "_DRIVER", (lambda: 0, lambda device: 1234 + device, hooks))
    monkeypatch.setattr(L, "counts", {"direct": 0, "triton": 0})
    previous = L.set_direct_launch(True)
    log: list = []
    yield L, _Jit(log, _Compiled(log)), log, hooks
    L.set_direct_launch(previous)


def test_direct_launch_cache_is_bounded(direct_launch, monkeypatch):
    """Its keys hold sizes by value, so every new input size added entries for good (multi-scale training):
    past _COMPILED_MAX it starts over, and a key launched again goes through Triton once, then directly."""
    L, fn, log, _ = direct_launch
    monkeypatch.setattr(L, "_COMPILED_MAX", 4)
    x, y = torch.zeros(16), torch.zeros(16)
    for n in range(10):  # ten sizes
        L.launch(fn, (1,), (x, y, n, 0.5), {"BLOCK": 16})
        assert 1 <= len(L._COMPILED) <= 4
    log.clear()
    L.launch(fn, (1,), (x, y, 9, 0.5), {"BLOCK": 16})  # the last size is still remembered: direct
    L.launch(fn, (1,), (x, y, 0, 0.5), {"BLOCK": 16})  # the first was dropped: through Triton, then remembered
    L.launch(fn, (1,), (x, y, 0, 0.5), {"BLOCK": 16})
    assert [e[0] for e in log] == ["direct", "triton", "direct"]


def test_direct_launch_reuses_the_compiled_kernel(direct_launch):
    """After a kernel's first launch through Triton for a specialisation, the same key launches the compiled
    kernel Triton returned through its launcher: grid padded to 3-D, the current stream, its function and
    metadata, no launch metadata, the hooks, then every parameter in order (keywords and defaults after the
    positional ones, as Triton's ``bound_args``). A new key (an int's value, a tensor's alignment or dtype, a
    keyword) goes through Triton first, as does any launch while a launch hook is installed."""
    L, fn, log, hooks = direct_launch
    buf = torch.zeros(64)
    x, y = buf[:16], buf[16:]

    def go(x=x, n=5, block=32, **kw):
        L.launch(fn, (3,), (x, y, n, 0.5), dict(BLOCK=block, num_warps=4, **kw))

    go()
    go()
    assert log[0] == ("triton", (3,), (x, y, 5, 0.5), {"BLOCK": 32, "num_warps": 4})
    assert log[1] == ("direct", (3, 1, 1, 1234, "function", "packed", None, None, None, x, y, 5, 0.5, 32, True))
    assert L.counts == {"direct": 1, "triton": 1}
    go(n=6)  # another int value
    go(x=buf[1:17])  # 4-byte aligned, not 16: another pointer specialisation
    go(x=buf.double()[:16])  # another dtype
    go(block=64)  # another constexpr
    go(FLAG=False)  # a defaulted parameter given
    assert [e[0] for e in log[2:]] == ["triton"] * 5
    go(FLAG=False)
    assert log[-1] == ("direct", (3, 1, 1, 1234, "function", "packed", None, None, None, x, y, 5, 0.5, 32, False))
    hooks.launch_enter_hook = lambda metadata: None  # e.g. a profiler's: Triton builds its metadata
    go()
    assert log[-1][0] == "triton"
    L.set_direct_launch(False)
    hooks.launch_enter_hook = None
    go()
    assert log[-1][0] == "triton"
    with pytest.raises(TypeError, match="expected a bool"):
        L.set_direct_launch(1)


def test_driver_handles_are_set_once_when_threads_launch_first(monkeypatch):
    """Two threads making their first direct launch together (nn.DataParallel's replicas): before, each
    extended a shared list, which then held six handles, and the next launch's unpacking raised."""
    if KB is None:
        pytest.skip("triton missing")
    import threading

    import triton

    L = KB._launch
    barrier = threading.Barrier(2)

    class Active:  # the driver's handles, read by both threads before either has stored them
        @property
        def get_current_device(self):
            barrier.wait(timeout=30)
            return "device"

        get_current_stream = "stream"

    monkeypatch.setattr(type(triton.runtime.driver), "active", property(lambda self: Active()))
    monkeypatch.setattr(L, "_DRIVER", None)
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(L._driver())) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(results) == 2
    device, stream, knobs = L._driver()  # three handles, whichever thread stored them
    assert (device, stream, knobs) == ("device", "stream", triton.knobs.runtime)


def test_direct_launch_takes_an_empty_hook_chain_as_no_hook(direct_launch):
    L, fn, log, hooks = direct_launch

    class HookChain:  # newer Tritons: a chain of hooks, empty by default
        def __init__(self, calls):
            self.calls = calls

    hooks.launch_enter_hook = HookChain([])
    for _ in range(2):
        L.launch(fn, (1, 2), (torch.zeros(4), torch.zeros(4), 1, 1.0), dict(BLOCK=16))
    assert [e[0] for e in log] == ["triton", "direct"] and log[1][1][:3] == (1, 2, 1)
    hooks.launch_enter_hook = HookChain([print])
    L.launch(fn, (1, 2), (torch.zeros(4), torch.zeros(4), 1, 1.0), dict(BLOCK=16))
    assert log[-1][0] == "triton"


def test_direct_launch_is_not_kept_without_what_it_needs(direct_launch):
    """A parameter that is neither given nor defaulted, a kernel without its handles, or no compiled kernel
    returned: every launch goes through Triton."""
    L, fn, log, _ = direct_launch
    args = (torch.zeros(4), torch.zeros(4), 1, 1.0)
    for _ in range(2):
        L.launch(fn, (1,), args, {})  # BLOCK missing (Triton itself would refuse; the stand-in does not)
    fn.compiled.function = None
    for _ in range(2):
        L.launch(fn, (1,), args, dict(BLOCK=8))
    fn.compiled = None
    for _ in range(2):
        L.launch(fn, (1,), args, dict(BLOCK=4))
    assert [e[0] for e in log] == ["triton"] * 6 and not L._COMPILED


def test_direct_launch_falls_back_when_the_launcher_refuses(direct_launch):
    """A launcher that refuses the arguments (a Triton whose launchers take another argument list) raises
    before launching: a warning, then this launch and all later ones through Triton."""
    L, _, log, _ = direct_launch
    fn = _Jit(log, _Compiled(log, refuse=True))
    args = (torch.zeros(4), torch.zeros(4), 1, 1.0)
    L.launch(fn, (1,), args, dict(BLOCK=8))
    with pytest.warns(RuntimeWarning, match="direct kernel launch failed"):
        L.launch(fn, (1,), args, dict(BLOCK=8))
    L.launch(fn, (1,), args, dict(BLOCK=8))
    assert [e[0] for e in log] == ["triton"] * 3 and not L._DIRECT and not L._COMPILED


def test_direct_launch_resolves_a_compilation_future(direct_launch):
    L, fn, log, _ = direct_launch

    class Future:
        def __init__(self, kernel):
            self.kernel = kernel

        def result(self):
            return self.kernel

    fn.compiled = Future(fn.compiled)
    for _ in range(2):
        L.launch(fn, (1,), (torch.zeros(4), torch.zeros(4), 1, 1.0), dict(BLOCK=8))
    assert [e[0] for e in log] == ["triton", "direct"]


@pytest.mark.parametrize("variable, code", [
    ("EFFDENSE_AUTOTUNE", "from effdense.kernels import bottleneck as M, set_autotune as s; print(M._AUTOTUNE, s(True))"),
    ("EFFDENSE_DIRECT_LAUNCH", "from effdense.kernels import _launch as M, set_direct_launch as s; print(M._DIRECT, s(True))"),
], ids=["autotune", "direct_launch"])  # fmt: skip
@pytest.mark.parametrize("value, expected", [("0", False), ("off", False), (" No ", False), ("1", True), ("", True)])
def test_switch_default_comes_from_the_environment(variable, code, value, expected):
    """Each switch's default is read from its environment variable at import; the setter returns it."""
    if KB is None:
        pytest.skip("triton missing")
    import subprocess
    import sys

    env = dict(os.environ, **{variable: value}, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.split()
    assert out == [str(expected), str(expected)]


@pytest.mark.parametrize("value", ["1", "yes", " 1", "0", "on"])
def test_interpreting_is_what_triton_decided(value):
    """Whether effdense takes the kernels for interpreted ones is what Triton's jit made of ``TRITON_INTERPRET``,
    whatever its spelling (before: read here by other rules, "yes" ran the twins where the kernels were meant,
    and " 1" took compiled kernels for interpreted ones, a "0 active drivers" error on CPU)."""
    if KB is None:
        pytest.skip("triton missing")
    import subprocess
    import sys

    code = (
        "from triton.runtime.interpreter import InterpretedFunction as I; from effdense.kernels import _launch, stats; "
        "print(_launch.interpreting(), isinstance(stats._channel_stats_kernel, I))"
    )
    env = dict(os.environ, TRITON_INTERPRET=value)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == out[1], out


@pytest.mark.parametrize("device", DEVICES)
def test_forward_without_sums_gives_the_same_output(device):
    """``stats=False`` (backward's recomputation) writes the same ``y`` and returns no sums, on the direct
    launch and through the library op alike."""
    _need_triton(device)
    c = _case(SHAPES[4], torch.float32, device)
    args = (c["x"], c["scale"], c["shift"], c["weight"])
    y, y_mean, y_var = K.bottleneck_forward(*args, backend="triton")
    assert y_mean is not None and y_var is not None
    direct = K.bottleneck_forward(*args, stats=False, backend="triton")
    with _OpLog():
        via_op = K.bottleneck_forward(*args, stats=False, backend="triton")
    for got in (direct, via_op):
        assert got[1] is None and got[2] is None
        torch.testing.assert_close(got[0], y, rtol=0, atol=0)


class _OpLog(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("device", DEVICES)
def test_plain_eager_launch_skips_the_library_op_and_agrees_with_it(device):
    """Plain eager calls launch the kernels directly; under a dispatch mode (trackers, FakeTensor) the same
    call goes through the ``effdense::*`` op, which the mode sees, with the same results."""
    _need_triton(device)
    c = _case(SHAPES[1], torch.float32, device)
    args = (c["x"], c["scale"], c["shift"], c["weight"])
    direct = K.bottleneck_forward(*args, backend="triton")
    log = _OpLog()
    with log:
        via_op = K.bottleneck_forward(*args, backend="triton")
    assert "effdense.bottleneck_forward" in log.names, log.names
    for a, b in zip(direct, via_op):
        torch.testing.assert_close(a, b, **FP32_TOL)
    log_direct = _OpLog()
    K.bottleneck_forward(*args, backend="triton")  # nothing to see: no mode is active
    assert log_direct.names == []


def test_parameters_launch_directly_other_subclasses_take_the_op(monkeypatch):
    """A BatchNorm weight (``nn.Parameter``) passed as it is keeps the direct launch (before, every BN-backward
    accumulation of a fused step took the library op for its ``gamma``: ~40 us more host time per call);
    a tensor subclass with behaviour of its own still goes through the op."""
    _need_triton("cpu")
    from effdense.kernels import ops

    class Sub(torch.Tensor):
        pass

    x = torch.randn(2, 3, 4, 4)
    assert ops._plain_eager((x, torch.nn.Parameter(torch.ones(3)), None))
    assert not ops._plain_eager((x, torch.ones(3).as_subclass(Sub)))
    c = _case(SHAPES[1], torch.float32, "cpu")
    dh, sum_dh, sum_dh_xmu = K.bottleneck_backward_input(c["x"], c["scale"], c["shift"], c["weight"], c["dy"], c["mean"])
    args = (c["x"], dh, c["mean"], c["invstd"], torch.nn.Parameter(c["gamma"].clone()), sum_dh, sum_dh_xmu)
    want = torch.zeros_like(c["x"])
    K.bn_backward_accumulate(want, *args)
    monkeypatch.setattr(ops, "_bn_backward_accumulate_op", lambda *a: pytest.fail("took the library op"))
    got = torch.zeros_like(c["x"])
    with torch.no_grad():
        K.bn_backward_accumulate(got, *args)
    torch.testing.assert_close(got, want, **FP32_TOL)


@pytest.mark.parametrize("device", DEVICES)
def test_weight_column_slice_matches_its_contiguous_copy(device):
    """A channel chunk's weight, ``w[:, c0:c1]`` of a contiguous ``(B, C)`` weight (unit column stride, row
    stride C), gives the results of its contiguous copy in the forward and input-gradient kernels."""
    _need_triton(device)
    c = _case(SHAPES[1], torch.float32, device)
    B, C = c["weight"].shape
    wide = torch.randn(B, C + 9, device=device)
    wide[:, 5 : 5 + C] = c["weight"]
    w_slice = wide[:, 5 : 5 + C]
    assert not w_slice.is_contiguous() and w_slice.stride(1) == 1
    for a, b in zip(
        K.bottleneck_forward(c["x"], c["scale"], c["shift"], w_slice, backend="triton"),
        K.bottleneck_forward(c["x"], c["scale"], c["shift"], c["weight"], backend="triton"),
    ):
        torch.testing.assert_close(a, b, **FP32_TOL)
    args = (c["x"], c["scale"], c["shift"])
    got = K.bottleneck_backward_input(*args, w_slice, c["dy"], c["mean"], backend="triton")
    ref = K.bottleneck_backward_input(*args, c["weight"], c["dy"], c["mean"], backend="triton")
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, **FP32_TOL)


@pytest.mark.parametrize("device", DEVICES)
def test_plain_eager_launch_bumps_versions_of_caller_tensors(device):
    """A direct launch writes the caller's ``out``/``grad`` in place: their version counters move, as the
    library op's would, so autograd still catches a saved tensor modified in place."""
    _need_triton(device)
    c = _case(SHAPES[1], torch.float32, device)
    out = torch.empty_like(c["x"], memory_format=torch.contiguous_format)
    v0 = out._version
    dh, sum_dh, sum_dh_xmu = K.bottleneck_backward_input(
        c["x"], c["scale"], c["shift"], c["weight"], c["dy"], c["mean"], out, backend="triton"
    )
    assert dh is out and out._version > v0
    grad = torch.zeros_like(out)
    v0 = grad._version
    K.bn_backward_accumulate(
        grad, c["x"], dh, c["mean"], c["invstd"], c["gamma"], sum_dh, sum_dh_xmu, backend="triton"
    )
    assert grad._version > v0
    leaf = torch.zeros(3, requires_grad=True)
    saved = torch.zeros_like(grad).requires_grad_()
    loss = (saved * saved).sum() + leaf.sum()
    with torch.no_grad():
        K.bn_backward_accumulate(
            saved, c["x"], dh, c["mean"], c["invstd"], c["gamma"], sum_dh, sum_dh_xmu, backend="triton"
        )
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


# --------------------------------------------------------------------------------------------------
# Dispatch and argument errors


def test_backend_dispatch():
    x = torch.randn(1, 4, 3, 3)
    with pytest.raises(ValueError, match="backend"):
        K.channel_stats(x, backend="cuda")
    assert K.kernels_available("meta") is False or K.kernels_available("cpu")
    # the device is parsed first: not a device is an error (it answered True in the interpreter), and a CUDA
    # device without CUDA is not available (it answered True)
    with pytest.raises(RuntimeError, match="bogus"):
        K.kernels_available("bogus")
    if not torch.cuda.is_available() and not K.kernels_available("cpu"):
        assert K.kernels_available("cuda") is False
    # meta tensors take the reference path under "auto" unless the interpreter is on (then the fake kernel)
    if not K.kernels_available("cpu"):
        with pytest.raises(RuntimeError, match="backend='triton'"):
            K.channel_stats(x, backend="triton")


def test_float64_runs_on_the_twins_with_fp64_statistics():
    """float64 (gradcheck, numerics studies): backend='auto' takes the twins, statistics come back in fp64."""
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    mean, var = K.channel_stats(x)
    assert mean.dtype == var.dtype == torch.float64
    torch.testing.assert_close(mean, x.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(var, x.var(dim=(0, 2, 3), correction=0))
    s, t = torch.rand(8, dtype=torch.float64) + 0.5, torch.randn(8, dtype=torch.float64)
    w = torch.randn(4, 8, dtype=torch.float64)
    y, y_mean, _ = K.bottleneck_forward(x, s, t, w)
    h = torch.relu(x * s.view(1, -1, 1, 1) + t.view(1, -1, 1, 1))
    torch.testing.assert_close(y, torch.nn.functional.conv2d(h, w.view(4, 8, 1, 1)))
    assert y_mean.dtype == torch.float64


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_argument_errors(backend):
    _need_triton("cpu") if backend == "triton" else None
    x = torch.randn(2, 8, 5, 5)
    s = torch.ones(8)
    w = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"4-D tensor \(N, C, H, W\), got shape \(8, 5, 5\)"):
        K.bottleneck_forward(x[0], s, s, w, backend=backend)
    with pytest.raises(ValueError, match="channels_last is not supported"):
        K.bottleneck_forward(x.to(memory_format=torch.channels_last), s, s, w, backend=backend)
    with pytest.raises(ValueError, match=r"got strides \(200, 25, 1, 5\); call \.contiguous\(\)"):  # (not channels_last)
        K.bottleneck_forward(x.transpose(2, 3), s, s, w, backend=backend)
    with pytest.raises(TypeError, match="scale: expected dtype torch.float32"):
        K.bottleneck_forward(x, s.half(), s, w, backend=backend)
    with pytest.raises(ValueError, match=r"shift: expected a 1-D tensor of shape \(8,\)"):
        K.bottleneck_forward(x, s, s[:5], w, backend=backend)
    with pytest.raises(TypeError, match="weight: expected dtype torch.float32"):
        K.bottleneck_forward(x, s, s, w.bfloat16(), backend=backend)
    with pytest.raises(ValueError, match=r"weight: expected shape \(B, 8\)"):
        K.bottleneck_forward(x, s, s, w[:, :5], backend=backend)
    with pytest.raises(TypeError, match="expected dtype float32, bfloat16, float16 or float64, got torch.int64"):
        K.channel_stats(x.long(), backend="reference")
    if backend == "triton":
        with pytest.raises(TypeError, match="x: backend='triton': the kernels take float32, bfloat16 or float16"):
            K.channel_stats(x.double(), backend=backend)
    with pytest.raises(TypeError, match="scale: expected dtype torch.float64"):
        K.bottleneck_forward(x.double(), s, s, w.double(), backend="reference")
    with pytest.raises(ValueError, match="dy: expected 4 channels"):
        K.bottleneck_backward_input(x, s, s, w, torch.randn(2, 5, 5, 5), s, backend=backend)
    with pytest.raises(ValueError, match=r"out: expected N, H, W"):
        K.bottleneck_backward_input(x, s, s, w, torch.randn(2, 4, 5, 5), s, out=torch.empty(2, 8, 4, 5), backend=backend)
    with pytest.raises(ValueError, match="grad: expected 8 channels"):
        K.bn_backward_accumulate(torch.empty(2, 7, 5, 5), x, x, s, s, s, s, s, backend=backend)
    dy = torch.randn(2, 4, 5, 5)
    with pytest.raises(ValueError, match="grad: expected 8 channels"):
        K.bottleneck_backward(x, s, s, w, dy, s, s, s, torch.empty(2, 7, 5, 5), backend=backend)
    with pytest.raises(ValueError, match=r"invstd: expected a 1-D tensor of shape \(8,\)"):
        K.bottleneck_backward(x, s, s, w, dy, s, s[:3], s, torch.empty_like(x), backend=backend)
    with pytest.raises(ValueError, match="dy: expected 4 channels"):
        K.bottleneck_backward(x, s, s, w, torch.randn(2, 5, 5, 5), s, s, s, torch.empty_like(x), backend=backend)


# --------------------------------------------------------------------------------------------------
# GPU only: DenseNet-sized shapes through the autotuned kernels, and untuned (whatever EFFDENSE_AUTOTUNE says)


@pytest.fixture
def autotune(request):
    previous = K.set_autotune(request.param)
    yield request.param
    K.set_autotune(previous)


@pytest.mark.cuda
@pytest.mark.parametrize("autotune", [True, False], ids=["tuned", "untuned"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_cuda_densenet_shapes(dtype, autotune):
    shape = (8, 512, 64, 288, 14, 14, 128)  # a block-3 layer: 288 of 512 channels at offset 64
    c = _case(shape, dtype, "cuda")
    fwd = (c["x"], c["scale"], c["shift"], c["weight"])
    y, s, q = K.bottleneck_forward(*fwd)
    y_ref, s_ref, q_ref = K.bottleneck_forward(*fwd, backend="reference")
    _assert_close(y, y_ref, R.bottleneck_forward(*map(_up, fwd))[0], dtype, "y")
    torch.testing.assert_close(s, s_ref, atol=1e-1, rtol=1e-2)
    dw = K.bottleneck_backward_weight(c["x"], c["scale"], c["shift"], c["dy"])
    dw_ref = R.bottleneck_backward_weight(c["x"], c["scale"], c["shift"], c["dy"])
    torch.testing.assert_close(dw, dw_ref, atol=1e-2, rtol=1e-3)
    bi = (*fwd, c["dy"], c["mean"])
    dh, a, b = K.bottleneck_backward_input(*bi)
    dh_ref, a_ref, b_ref = K.bottleneck_backward_input(*bi, backend="reference")
    _assert_close(dh, dh_ref, R.bottleneck_backward_input(*map(_up, bi))[0], dtype, "dh")
    torch.testing.assert_close(a, a_ref, atol=1e-1, rtol=1e-2)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_cuda_direct_launch_matches_triton_launch(dtype):
    """Every kernel launched through Triton and then through the compiled kernel's launcher (the second call
    of each entry point with the same specialisation) gives the same results, on two slices of one buffer
    whose alignments differ, with untuned configs (the choice is then the same on both routes)."""
    from effdense.kernels import _launch as L

    previous_tune = K.set_autotune(False)
    try:
        for shape in ((4, 96, 16, 40, 13, 13, 32), (2, 72, 1, 33, 7, 5, 24)):  # offset 1: 2- or 4-byte aligned
            c = _case(shape, dtype, "cuda")
            fwd = (c["x"], c["scale"], c["shift"], c["weight"])
            bi = (*fwd, c["dy"], c["mean"])

            def run_all():
                y, s, q = K.bottleneck_forward(*fwd)
                dw = K.bottleneck_backward_weight(c["x"], c["scale"], c["shift"], c["dy"])
                dh, a, b = K.bottleneck_backward_input(*bi)
                grad = torch.zeros_like(c["x"])
                K.bn_backward_accumulate(grad, c["x"], dh, c["mean"], c["invstd"], c["gamma"], a, b)
                mean, var = K.channel_stats(c["x"])
                return [y, s, q, dw, dh, a, b, grad, mean, var]

            previous = L.set_direct_launch(False)
            try:
                launches = L.counts["triton"]
                want = run_all()
                launches = L.counts["triton"] - launches  # 7: the forward's reference-sample kernel since 88280aa
            finally:
                L.set_direct_launch(previous)
            L.set_direct_launch(True)
            try:
                run_all()  # through Triton once per new key, kept
                before = L.counts["direct"], L.counts["triton"]
                got = run_all()
                assert launches >= 6 and (L.counts["direct"] - before[0], L.counts["triton"] - before[1]) == (launches, 0), \
                    f"all {launches} kernel launches take the direct route"
            finally:
                L.set_direct_launch(previous)
            torch.cuda.synchronize()
            for name, g, w in zip(("y", "y_mean", "y_var", "dw", "dh", "sum_dh", "sum_dh_xmu", "grad", "mean", "var"), got, want):
                # the sums and dW use fp32 atomics (order, hence last bits, vary); the rest is exact
                exact = name in ("y", "dh", "mean", "var")
                torch.testing.assert_close(g, w, rtol=0 if exact else 1e-5, atol=0 if exact else 1e-4, msg=lambda m: f"{shape} {name}: {m}")
    finally:
        K.set_autotune(previous_tune)


def test_launch_hosts_run_on_the_tensors_gpu(monkeypatch):
    """Triton (and the direct launch) launch on the *current* CUDA device: a model on cuda:1 run from a thread
    whose current device is cuda:0 launched there, unordered against the work queued on cuda:1. Every launch
    host now enters its tensor's device when it is not the current one (CUDA calls stubbed: no GPU needed)."""
    from effdense.kernels import _launch as L

    entered, seen = [], []

    class _Guard:
        def __init__(self, index):
            self.index = index

        def __enter__(self):
            entered.append(self.index)

        def __exit__(self, *exc):
            entered.append(None)

    class _OnGPU:  # stands for a CUDA tensor: what the guard reads of one
        def __init__(self, index):
            self.is_cuda, self.index = True, index

        def get_device(self):
            return self.index

    host = L.on_tensor_device(lambda x, *rest: seen.append((x, rest, list(entered))))
    monkeypatch.setattr(torch.cuda, "device", _Guard)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    a, b = _OnGPU(1), _OnGPU(0)
    host(a, 7)
    host(b, 8)
    assert seen[0] == (a, (7,), [1]) and entered == [1, None], "cuda:1 launched under torch.cuda.device(1)"
    assert seen[1] == (b, (8,), [1, None]), "the current device: no guard"

    def no_cuda():
        raise AssertionError("a CPU tensor asked for the current CUDA device")

    monkeypatch.setattr(torch.cuda, "current_device", no_cuda)
    x = torch.zeros(1)
    host(x)
    assert seen[2][0] is x
    if KB is not None:  # the five hosts that every public op's launches go through carry it
        from effdense.kernels import stats as KS

        for fn in (KS.channel_stats_launch, KB.bottleneck_forward_launch, KB.bottleneck_backward_weight_launch,
                   KB.bottleneck_backward_input_launch, KB.bn_backward_accumulate_launch):  # fmt: skip
            assert fn.__code__ is L.on_tensor_device(lambda: None).__code__, fn.__name__


@pytest.mark.cuda
def test_kernels_on_a_gpu_that_is_not_the_current_one():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    c = _case(SHAPES[1], torch.float32, "cuda:1")
    assert torch.cuda.current_device() == 0
    for backend in ("triton", "reference"):
        got = K.bottleneck_forward(c["x"], c["scale"], c["shift"], c["weight"], backend=backend)
        stats = K.channel_stats(c["x"], backend=backend)
        if backend == "triton":
            want = got, stats
    torch.testing.assert_close(want[0][0], got[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(want[1], stats, rtol=1e-4, atol=1e-4)


def _wide_view(N, C, H, W, channel_stride, device="meta"):
    """An (N, C, H, W) view with the given channel stride (planes contiguous): a channel-major view."""
    storage = torch.empty((C - 1) * channel_stride + N * H * W, device=device)
    return storage.as_strided((N, C, H, W), (H * W, channel_stride, W, 1))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_channels_that_overlap_in_memory(backend):
    """Channels closer than a plane apart (channel stride < H*W, planes contiguous: the checks accept it) give
    what a contiguous copy gives, on the twins too (before: their .view raised PyTorch's internal stride error)."""
    if backend == "triton":
        _need_triton("cpu")
    torch.manual_seed(0)
    N, C, H, W, B = 2, 3, 2, 3, 4
    x = _wide_view(N, C, H, W, 2, device="cpu")
    x.as_strided((x.untyped_storage().nbytes() // 4,), (1,)).copy_(torch.randn(x.untyped_storage().nbytes() // 4))
    xc = x.contiguous()
    scale, shift, w, dy = torch.rand(C) + 0.5, torch.randn(C), torch.randn(B, C), torch.randn(N, B, H, W)
    for got, want in (
        (K.bottleneck_forward(x, scale, shift, w, backend=backend), K.bottleneck_forward(xc, scale, shift, w, backend=backend)),
        (K.bottleneck_backward_weight(x, scale, shift, dy, backend=backend),
         K.bottleneck_backward_weight(xc, scale, shift, dy, backend=backend)),
    ):  # fmt: skip
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", ["channel-span", "rows"])
def test_tensors_past_32_bit_offsets_take_the_twins(case, monkeypatch):
    """The kernels offset channels and the GEMM's rows in 32 bits (samples in 64): a channel-major view whose
    channel stride spans 2**31 elements wrapped (the interpreter read a value 2**31 elements before the one
    asked for, and compiled code does the same arithmetic), as would N*H*W >= 2**31. 'triton' refuses them,
    'auto' runs the twin (meta tensors: the check reads sizes and strides only)."""
    if not K.kernels_available("meta"):
        pytest.skip("the dispatch check runs where the kernels would (interpreter or CUDA)")
    if case == "channel-span":
        x = _wide_view(1, 3, 2, 2, 2**30)
        match = "channel offsets"
    else:
        x = torch.empty(2**16, 2, 2**8, 2**7 + 1, device="meta")
        match = "row offsets"
    C = x.shape[1]
    scale, shift, w = torch.ones(C, device="meta"), torch.zeros(C, device="meta"), torch.ones(4, C, device="meta")
    with pytest.raises(ValueError, match=match):
        K.channel_stats(x, backend="triton")
    with pytest.raises(ValueError, match=match):
        K.bottleneck_forward(x, scale, shift, w, backend="triton")
    called = []
    monkeypatch.setattr(R, "channel_stats", lambda x, out=None: called.append("stats") or (None, None))
    K.channel_stats(x)
    assert called == ["stats"]
    # an output that spans too much counts as well (out= of the input gradient)
    small = torch.empty(1, 3, 2, 2, device="meta")
    dy = torch.empty(1, 4, 2, 2, device="meta")
    with pytest.raises(ValueError, match="channel offsets"):
        K.bottleneck_backward_input(small, scale[:3], shift[:3], w[:, :3], dy, scale[:3], _wide_view(1, 3, 2, 2, 2**30),
                                    backend="triton")  # fmt: skip
    assert _checks_span(small) is None
    # an output the op allocates: y has the weight's B channels of H*W values (x, one channel, fits)
    x1 = torch.empty(1, 1, 2**15, 2**15, device="meta")
    one = torch.ones(1, device="meta")
    with pytest.raises(ValueError, match=r"weight of shape \(4, 1\) gives outputs spanning 4294967296"):
        K.bottleneck_forward(x1, one, one, torch.ones(4, 1, device="meta"), backend="triton")
    assert _checks_span(x1) is None
    # what is not past them: 46341 channels (C*C was taken for a weight gradient's size), a non-tensor (its own
    # argument error, not an AttributeError from the check)
    C = 46341
    xc, vc = torch.empty(1, C, 1, 1, device="meta"), torch.empty(C, device="meta")
    K.bn_backward_accumulate(torch.empty_like(xc), xc, torch.empty_like(xc), vc, vc, vc, vc, vc, backend="triton")
    with pytest.raises(TypeError, match="dy: expected a torch.Tensor"):
        v3 = torch.empty(3, device="meta")
        K.bottleneck_backward_weight(small, v3, v3, np.zeros((1, 2, 2, 2), np.float32), backend="triton")
    with pytest.raises(ValueError, match=r"weight gradient of shape \(65536, 65536\)"):
        big = torch.empty(1, 2**16, 1, 1, device="meta")
        K.bottleneck_backward_weight(big, torch.empty(2**16, device="meta"), torch.empty(2**16, device="meta"), big,
                                     backend="triton")  # fmt: skip


def _checks_span(t):
    from effdense.kernels import _checks

    return _checks.int32_span_error((t,))


def test_autotuned_launches_tune_one_thread_at_a_time(monkeypatch):
    """triton.autotune's Autotuner keeps per-call state on itself and times with the GIL released: two threads
    tuning at once (nn.DataParallel's replicas in their first step) could time with each other's arguments.
    One tunes while the other waits, then launches the config the first chose, without the Autotuner."""
    if KB is None:
        pytest.skip("triton missing")
    import threading
    import time

    from effdense.kernels import _launch as L

    inside, most, tuned_calls, direct = [0], [0], [], []

    class _Config:
        def all_kwargs(self):
            return {"BLOCK": 64}

    class _Tuned:
        fn = "kernel"
        best_config = None

        def __getitem__(self, grid):
            def run(*args, **kw):
                inside[0] += 1
                most[0] = max(most[0], inside[0])
                time.sleep(0.05)
                tuned_calls.append(args)
                self.best_config = _Config()
                inside[0] -= 1

            return run

    monkeypatch.setattr(KB, "_CHOSEN", {})
    monkeypatch.setattr(L, "launch", lambda fn, grid, args, kwargs: direct.append((fn, grid, args, kwargs)))
    tuned = _Tuned()
    threads = [threading.Thread(target=KB._launch_tuned, args=(tuned, lambda meta: (meta["BLOCK"],), (i,), ("key",)))
               for i in range(2)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most[0] == 1 and len(tuned_calls) == 1, "one thread tuned, alone"
    assert len(direct) == 1 and direct[0][0] == "kernel" and direct[0][1] == (64,) and direct[0][3] == {"BLOCK": 64}


def test_host_grid_arithmetic_matches_triton():
    """The launches' grid arithmetic (``_launch.cdiv``/``next_power_of_2``, plain Python because Triton's
    constexpr functions cost microseconds per call from the host) agrees with Triton's."""
    triton = pytest.importorskip("triton")
    from effdense.kernels import _launch

    for n in range(0, 3000):
        assert _launch.next_power_of_2(n) == triton.next_power_of_2(n), n
        for d in (1, 3, 16, 64, 1000):
            assert _launch.cdiv(n, d) == triton.cdiv(n, d), (n, d)
    assert _launch.next_power_of_2(2**40 + 1) == triton.next_power_of_2(2**40 + 1)


def test_meta_tensors_take_the_library_op_in_plain_eager():
    """Meta tensors (shape-only runs, ``estimate_step(backend="meta")`` without a tracker) have no data to
    launch on: the entry points go through the op's fake implementation instead of the direct launch."""
    _need_triton("cpu")
    N, C, H, W, B = 2, 40, 5, 5, 24
    x = torch.empty(N, C + 8, H, W, device="meta")[:, 4 : 4 + C]
    v = torch.empty(C, device="meta")
    w = torch.empty(B, C, device="meta")
    dy = torch.empty(N, B, H, W, device="meta")
    y, y_mean, y_var = K.bottleneck_forward(x, v, v, w, backend="triton")
    assert (y.shape, y_mean.shape, y_var.shape) == ((N, B, H, W), (B,), (B,)) and y.is_meta
    mean, var = K.channel_stats(x, backend="triton")
    assert mean.shape == var.shape == (C,) and mean.is_meta
    assert K.bottleneck_backward_weight(x, v, v, dy, backend="triton").shape == (B, C)
    dh, s1, s2 = K.bottleneck_backward_input(x, v, v, w, dy, v, backend="triton")
    assert dh.shape == (N, C, H, W) and s1.shape == s2.shape == (C,)
    grad = torch.empty(N, C, H, W, device="meta")
    K.bn_backward_accumulate(grad, x, dh, v, v, v, s1, s2, backend="triton")


# --------------------------------------------------------------------------------------------------
# Unusual and wrong inputs: both backends work and agree, or both name the argument


def _need_backend(backend: str) -> None:
    if backend == "triton":
        _need_triton("cpu")


def _small(N=2, C=8, H=5, W=5, B=4, dtype=torch.float32):
    x = torch.randn(N, C, H, W).to(dtype)
    scale, shift = torch.rand(C) + 0.5, torch.randn(C) * 0.5
    weight = (torch.randn(B, C) / max(C, 1) ** 0.5).to(dtype)
    dy = torch.randn(N, B, H, W).to(dtype)
    mean = x.float().mean(dim=(0, 2, 3)) if x.numel() else torch.zeros(C)
    return x, scale, shift, weight, dy, mean


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_strided_per_channel_vectors_are_refused(backend):
    # before: the kernels read every vector at unit stride, so a strided view (a column of a (C, 2)
    # matrix, t[::2], an expand) silently gave wrong results on Triton (y off by ~9), while the twins
    # read it correctly
    _need_backend(backend)
    x, s, t, w, dy, m = _small()
    column = torch.stack([s, torch.zeros_like(s)], dim=1)[:, 0]
    with pytest.raises(ValueError, match=r"scale: expected unit stride .* got stride 2"):
        K.bottleneck_forward(x, column, t, w, backend=backend)
    with pytest.raises(ValueError, match=r"shift: expected unit stride"):
        K.bottleneck_backward_weight(x, s, torch.randn(16)[::2], dy, backend=backend)
    with pytest.raises(ValueError, match=r"mean: expected unit stride .* got stride 0"):
        K.bottleneck_backward_input(x, s, t, w, dy, torch.zeros(1).expand(8), backend=backend)
    with pytest.raises(ValueError, match=r"gamma: expected unit stride .* got stride 0"):
        K.bn_backward_accumulate(torch.zeros_like(x), x, x, m, s, torch.ones(1).expand(8), s, s, backend=backend)
    with pytest.raises(ValueError, match=r"invstd: expected unit stride"):
        K.bottleneck_backward(x, s, t, w, dy, m, column, s, torch.zeros_like(x), backend=backend)
    # a contiguous slice of a longer vector is fine, and a single channel has no stride to speak of
    ys = K.bottleneck_forward(x[:, 2:3], torch.randn(16)[::2][2:3], t[2:3], w[:, 2:3].contiguous(), backend=backend)
    assert ys[0].shape == (2, 4, 5, 5)


@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("x", [None, [[1.0]], 3.0], ids=["None", "list", "float"])
def test_non_tensor_x_is_named(backend, x):
    # before: AttributeError "'NoneType' object has no attribute 'dtype'" (auto) or "... 'device'" (triton)
    _need_backend(backend)
    with pytest.raises(TypeError, match=r"x: expected a torch.Tensor, got (NoneType|list|float)"):
        K.channel_stats(x, backend=backend)
    with pytest.raises(TypeError, match=r"x: expected a torch.Tensor"):
        K.bottleneck_forward(x, torch.ones(1), torch.ones(1), torch.ones(1, 1), backend=backend)


def test_triton_integer_x_message_has_no_float64_hint():
    _need_triton("cpu")
    with pytest.raises(TypeError, match=r"take float32, bfloat16 or float16, got torch.int64$"):
        K.channel_stats(torch.ones(1, 2, 3, 3, dtype=torch.long), backend="triton")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_entry_points_are_not_differentiable_on_either_backend(backend):
    # before, on the twins: bottleneck_forward/channel_stats/bottleneck_backward_weight returned outputs
    # that required grad (the kernels' do not), bottleneck_backward_input/bottleneck_backward raised
    # "functions with out=... arguments don't support automatic differentiation", and writing into a
    # grad/out that requires grad raised "a leaf Variable that requires grad is being used in an in-place
    # operation" (the kernels write it)
    _need_backend(backend)
    x, s, t, w, dy, m = _small()
    xr, sr, wr = x.clone().requires_grad_(), s.clone().requires_grad_(), w.clone().requires_grad_()
    outs = [
        *K.channel_stats(xr, backend=backend),
        *K.bottleneck_forward(xr, sr, t, wr, backend=backend),
        K.bottleneck_backward_weight(xr, sr, t, dy, backend=backend),
        *K.bottleneck_backward_input(xr, sr, t, wr, dy, m, backend=backend),
        *K.bottleneck_backward(xr, sr, t, wr, dy, m, s, s, torch.zeros_like(x), backend=backend),
    ]
    assert not any(o.requires_grad for o in outs)
    ref = K.bottleneck_backward_input(x, s, t, w, dy, m, backend="reference")
    out = torch.empty_like(x).requires_grad_()
    K.bottleneck_backward_input(xr, sr, t, wr, dy, m, out=out, backend=backend)
    torch.testing.assert_close(out.detach(), ref[0], **FP32_TOL)
    grad = torch.zeros_like(x).requires_grad_()
    K.bn_backward_accumulate(grad, xr, ref[0], m, s, s, ref[1], ref[2], backend=backend)
    assert grad.detach().abs().sum() > 0
    mean, var = torch.empty(8).requires_grad_(), torch.empty(8)
    K.channel_stats(xr, out=(mean, var), backend=backend)
    torch.testing.assert_close(mean.detach(), x.mean(dim=(0, 2, 3)), **FP32_TOL)


# (N, C, H, W, B) with one of them zero
EMPTY = [(0, 8, 5, 5, 4), (2, 0, 5, 5, 4), (2, 8, 0, 5, 4), (2, 8, 5, 5, 0)]


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("shape", EMPTY, ids=["N0", "C0", "H0", "B0"])
def test_empty_dims(backend, shape):
    # before: Triton raised ZeroDivisionError (bn_backward_accumulate with N*H*W = 0, the weight gradient
    # with B or C = 0, channel_stats with C = 0), channel_stats gave 0 where the twin gives NaN (N*H*W = 0),
    # the twin's channel_stats raised "torch.cat(): expected a non-empty list" (C = 0), and the twin's
    # bottleneck_backward killed the process with SIGFPE in ATen's BatchNorm backward (N or C = 0)
    _need_backend(backend)
    N, C, H, W, B = shape
    x, s, t, w, dy, m = _small(N, C, H, W, B)
    M = N * H * W
    mean, var = K.channel_stats(x, backend=backend)
    assert mean.shape == var.shape == (C,)
    if M == 0:
        assert torch.isnan(mean).all() and torch.isnan(var).all()
    y, y_mean, y_var = K.bottleneck_forward(x, s, t, w, backend=backend)
    assert y.shape == (N, B, H, W) and not y.any() and y_mean.shape == y_var.shape == (B,)
    if M == 0:  # no values: NaN, as torch.var_mean (and channel_stats above)
        assert torch.isnan(y_mean).all() and torch.isnan(y_var).all()
    else:
        assert not y_mean.any() and not y_var.any()
    assert torch.equal(K.bottleneck_backward_weight(x, s, t, dy, backend=backend), torch.zeros(B, C))
    dh, sum_dh, sum_dh_xmu = K.bottleneck_backward_input(x, s, t, w, dy, m, backend=backend)
    assert dh.shape == x.shape and not dh.any() and not sum_dh.any() and not sum_dh_xmu.any()
    grad = torch.randn_like(x)
    before = grad.clone()
    K.bn_backward_accumulate(grad, x, dh, m, s, s, sum_dh, sum_dh_xmu, backend=backend)
    assert torch.equal(grad, before)
    for batch_stats in (True, False):
        dw, dgamma, dbeta = K.bottleneck_backward(x, s, t, w, dy, m, s, s, grad, batch_stats=batch_stats, backend=backend)
        assert (dw.shape, dgamma.shape, dbeta.shape) == ((B, C), (C,), (C,))
        assert not dw.any() and not dgamma.any() and not dbeta.any() and torch.equal(grad, before)
    xr = x.clone().requires_grad_()
    y = K.bn_relu_conv1x1(xr, s, t, w)
    y.backward(torch.ones_like(y))
    assert xr.grad.shape == x.shape and not xr.grad.any()


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_one_by_one_spatial_and_many_channels_agree(backend):
    """1x1 planes and C = 4100 with tiny N, H, W (several channel tiles, one pixel each): both backends
    against the fp32 twin, including the whole backward in chunks."""
    _need_backend(backend)
    for N, C, H, W, B in ((3, 8, 1, 1, 4), (1, 4100, 2, 2, 3)):
        x, s, t, w, dy, m = _small(N, C, H, W, B)
        for got, ref in zip(K.bottleneck_forward(x, s, t, w, backend=backend), R.bottleneck_forward(x, s, t, w)):
            torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
        g, g_ref = torch.zeros_like(x), torch.zeros_like(x)
        got = K.bottleneck_backward(x, s, t, w, dy, m, s, s, g, chunk=1000, backend=backend)
        ref = R.bottleneck_backward(x, s, t, w, dy, m, s, s, g_ref)
        for a, b in zip((*got, g), (*ref, g_ref)):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_out_overlapping_x_or_dy_is_refused(backend):
    # before: out=x gave a wrong sum_dh_xmu on the twin (off by ~40: x overwritten by dh before it was
    # read), and out overlapping dy races on a GPU (every program reads all of dy's channels)
    _need_backend(backend)
    x, s, t, w, dy, m = _small(B=8)
    for name, out, kw in (("x", x.clone(), "x"), ("dy", dy.clone(), "dy")):
        args = dict(x=x, dy=dy)
        args[kw] = out
        with pytest.raises(ValueError, match=f"out: expected memory separate from {name}"):
            K.bottleneck_backward_input(args["x"], s, t, w, args["dy"], m, out=out, backend=backend)
    buf = torch.randn(2, 20, 5, 5)
    xb = buf[:, 4:12]
    with pytest.raises(ValueError, match="out: expected memory separate from x"):
        K.bottleneck_backward_input(xb, s, t, w, dy, m, out=buf[:, 8:16], backend=backend)
    # a disjoint channel slice of the same buffer is fine, and gives what a separate buffer gets
    ref = K.bottleneck_backward_input(xb.clone(), s, t, w, dy, m, backend=backend)
    got = K.bottleneck_backward_input(xb, s, t, w, dy, m, out=buf[:, 12:20], backend=backend)
    assert got[0].data_ptr() == buf[:, 12:20].data_ptr()
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, **FP32_TOL)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_whole_backward_in_chunks_refuses_grad_overlapping_dy(backend):
    # before: with B == C and grad=dy, later chunks read dy after earlier ones had added into it (dW off
    # by ~7 on the twin, dgamma/dbeta on both); grad=x works (each chunk reads only its own channels)
    _need_backend(backend)
    x, s, t, w, dy, m = _small(B=8)
    with pytest.raises(ValueError, match="grad: expected memory separate from dy"):
        K.bottleneck_backward(x, s, t, w, dy, m, s, s, dy, chunk=3, backend=backend)
    g_ref = x.clone()
    ref = K.bottleneck_backward(x, s, t, w, dy, m, s, s, g_ref, backend="reference")
    xx = x.clone()
    got = K.bottleneck_backward(xx, s, t, w, dy, m, s, s, xx, chunk=3, backend=backend)
    for a, b in zip((*got, xx), (*ref, g_ref)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_overlap_test_matches_brute_force():
    """``check_disjoint``'s arithmetic for views of one buffer against marking the elements one by one."""
    from effdense.kernels import _checks

    def brute(a, b):
        mark = torch.zeros(a.untyped_storage().nbytes() // 4)
        flat = torch.empty(0).set_(a.untyped_storage())
        idx = torch.arange(flat.numel(), dtype=torch.float32)
        ia = torch.as_strided(idx, a.shape, a.stride(), a.storage_offset())
        ib = torch.as_strided(idx, b.shape, b.stride(), b.storage_offset())
        mark[ia.long().flatten()] = 1
        return bool(mark[ib.long().flatten()].any())

    for N, Ct, H, W in ((1, 12, 3, 2), (3, 12, 3, 2), (2, 7, 1, 1)):
        buf = torch.zeros(N, Ct, H, W)
        slices = [buf[:, i:j] for i in range(Ct) for j in range(i + 1, Ct + 1)]
        for a in slices:
            for b in slices:
                if a.shape[0] and b.shape[0]:
                    assert _checks._planes_overlap(a, b) == brute(a, b), (a.storage_offset(), a.shape, b.storage_offset(), b.shape)
    flat = torch.zeros(2 * 6 * 3 * 2)  # same storage, different layouts: conservative where not exact
    a, b = flat[:36].view(2, 3, 3, 2), flat[36:].view(2, 3, 3, 2)
    assert not _checks._planes_overlap(a, b) and _checks._planes_overlap(a, flat[6:42].view(2, 3, 3, 2))


@pytest.mark.parametrize("chunk, error", [(0, ValueError), (-1, ValueError), (True, TypeError), (1.5, TypeError), ("4", TypeError)])
def test_triton_forward_checks_chunk_as_the_twin_does(chunk, error):
    # before: the kernel path ignored chunk without looking at it, so chunk=0 or "4" passed on Triton only
    _need_triton("cpu")
    x, s, t, w, _, _ = _small()
    for backend in ("reference", "triton"):
        with pytest.raises(error, match="chunk: expected a positive int or None"):
            K.bottleneck_forward(x, s, t, w, chunk=chunk, backend=backend)


def test_bn_relu_conv1x1_names_a_kxk_weight_by_its_shape():
    # before: a 3x3 weight was flattened to (B, 9C) first: "expected shape (B, 8) ..., got shape (4, 72)"
    x, s, t, _, _, _ = _small()
    with pytest.raises(ValueError, match=r"weight: expected shape \(B, 8\).*got shape \(4, 8, 3, 3\)"):
        K.bn_relu_conv1x1(x, s, t, torch.randn(4, 8, 3, 3))
    assert K.bn_relu_conv1x1(x, s, t, torch.randn(4, 8, 1, 1)).shape == (2, 4, 5, 5)


# --------------------------------------------------------------------------------------------------
# Differentiation modes of bn_relu_conv1x1 beyond first-order reverse mode


def _brc_inputs(dtype=torch.float64):
    x, s, t, w, _, _ = _small(N=2, C=5, H=3, W=2, B=3)
    s, t = s.to(dtype), (t * 0.3).to(dtype)
    return [a.to(dtype).requires_grad_() for a in (x, s, t, w)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64-twin", "fp32-auto"])
def test_bn_relu_conv1x1_double_backward_raises(dtype):
    # before: with create_graph=True the gradients came back without a graph (the kernels and twins have
    # no backward), so a second derivative was silently zero: gradgradcheck failed "Numerical gradient for
    # function expected to be zero", and torch.autograd.grad of a gradient said "appears to not have been
    # used in the graph" (or, with allow_unused=True, gave None: zero)
    ins = _brc_inputs(dtype)
    first = torch.autograd.grad(K.bn_relu_conv1x1(*ins).square().sum(), ins)
    grads = torch.autograd.grad(K.bn_relu_conv1x1(*ins).square().sum(), ins, create_graph=True)
    for a, b in zip(grads, first):  # first order unchanged
        assert a.requires_grad
        torch.testing.assert_close(a.detach(), b, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="bn_relu_conv1x1 is differentiable once"):
        torch.autograd.grad(grads[3].sum(), ins[0], allow_unused=True)  # d(dW)/dx: through the saved x
    with pytest.raises(RuntimeError, match="bn_relu_conv1x1 is differentiable once"):
        grads[0].sum().backward()
    if dtype == torch.float64:
        with pytest.raises(RuntimeError, match="bn_relu_conv1x1 is differentiable once"):
            torch.autograd.gradgradcheck(K.bn_relu_conv1x1, _brc_inputs(dtype))
    # gradcheck (first order) still passes on the twin
    assert dtype != torch.float64 or torch.autograd.gradcheck(K.bn_relu_conv1x1, _brc_inputs(dtype))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64-twin", "fp32-auto"])
def test_bn_relu_conv1x1_batched_backward(dtype):
    # before: is_grads_batched=True (and jacobian(..., vectorize=True)) hands the backward a batched dy,
    # whose storage the Triton launch cannot read ("Cannot access storage of BatchedTensorImpl") and which
    # the twins' out= ops cannot take ("Batching rule not implemented for aten::threshold_backward.grad_input")
    ins = _brc_inputs(dtype)
    vs = torch.randn(2, *K.bn_relu_conv1x1(*ins).shape, dtype=dtype)
    looped = [torch.autograd.grad(K.bn_relu_conv1x1(*ins), ins, v) for v in vs]
    for wanted in (range(4), [3], [0, 2]):  # all, the weight alone, x and shift
        got = torch.autograd.grad(K.bn_relu_conv1x1(*ins), [ins[i] for i in wanted], vs, is_grads_batched=True)
        for g, i in zip(got, wanted):
            torch.testing.assert_close(g, torch.stack([lp[i] for lp in looped]), msg=lambda m: f"input {i}: {m}")
    y = K.bn_relu_conv1x1(*ins)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # (a caller's autocast around the backward: not applied)
        got = torch.autograd.grad(y, ins, vs, is_grads_batched=True)
    for i, g in enumerate(got):
        torch.testing.assert_close(g, torch.stack([lp[i] for lp in looped]), msg=lambda m: f"autocast, input {i}: {m}")
    with pytest.raises(RuntimeError, match="bn_relu_conv1x1 is differentiable once"):
        torch.autograd.grad(K.bn_relu_conv1x1(*ins), ins, vs, is_grads_batched=True, create_graph=True)
    x, s, t, w = ins
    jac = torch.autograd.functional.jacobian(lambda a: K.bn_relu_conv1x1(x, s, t, a), w, vectorize=True)
    for v, lp in zip(vs, looped):  # v^T J is the weight gradient for v
        torch.testing.assert_close(torch.tensordot(v, jac, dims=v.dim()), lp[3])


def test_bn_relu_conv1x1_forward_mode_and_func_grad_are_refused():
    # before: forward-mode AD ran the op on the primals alone (a torch.library op has no forward
    # derivative): torch.func.jvp returned a zero tangent and forward_ad.unpack_dual a None tangent;
    # torch.func.grad/jacrev failed with PyTorch's "an autograd.Function ... must override the
    # setup_context staticmethod"
    import torch.autograd.forward_ad as fwAD

    x, s, t, w = (a.detach() for a in _brc_inputs(torch.float32))
    fwd = "forward-mode AD .* is not supported"
    with pytest.raises(NotImplementedError, match=fwd):
        torch.func.jvp(lambda a: K.bn_relu_conv1x1(x, s, t, a), (w,), (torch.ones_like(w),))
    with pytest.raises(NotImplementedError, match=fwd):
        torch.func.jacfwd(lambda a: K.bn_relu_conv1x1(a, s, t, w))(x)
    with fwAD.dual_level():
        with pytest.raises(NotImplementedError, match=fwd):
            K.bn_relu_conv1x1(x, s, fwAD.make_dual(t, torch.ones_like(t)), w)
        y = K.bn_relu_conv1x1(x, s, t, w)  # no dual input: fine
    with pytest.raises(NotImplementedError, match=r"torch.func.grad/vjp/jacrev are not supported"):
        torch.func.grad(lambda a: K.bn_relu_conv1x1(x, s, t, a).sum())(w)
    # what works: tangents/gradients that do not pass through the op, vmap, and autograd under vmap
    a = torch.tensor(2.0)
    _, tangent = torch.func.jvp(lambda a: K.bn_relu_conv1x1(x, s, t, w).sum() * a, (a,), (torch.tensor(1.0),))
    torch.testing.assert_close(tangent, y.sum())
    torch.testing.assert_close(torch.func.grad(lambda a: K.bn_relu_conv1x1(x, s, t, w).sum() * a)(a), y.sum())
    # a trainable weight captured by the function is not transformed: before, its requires_grad was refused
    wg = w.clone().requires_grad_()
    torch.testing.assert_close(torch.func.grad(lambda a: K.bn_relu_conv1x1(x, s, t, wg).sum() * a)(a), y.sum())
    xs = torch.stack([x, 2 * x])
    ys = torch.func.vmap(lambda b: K.bn_relu_conv1x1(b, s, t, w))(xs)
    torch.testing.assert_close(ys[1], K.bn_relu_conv1x1(2 * x, s, t, w), **FP32_TOL)


# --------------------------------------------------------------------------------------------------
# More unusual inputs


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_broadcast_grad_and_out_are_refused(backend):
    # before: an expanded (stride-0) grad or out was written by the kernels from several programs at once
    # (bn_backward_accumulate's result off by ~5 in the interpreter, a race on a GPU), while the twins
    # raised PyTorch's "more than one element of the written-to tensor refers to a single memory location"
    _need_backend(backend)
    x, s, t, w, dy, m = _small()
    dh, sum_dh, sum_dh_xmu = K.bottleneck_backward_input(x, s, t, w, dy, m, backend="reference")
    msg = r"{}: expected a tensor with memory of its own for each element .* broadcast view"
    for bcast in (torch.zeros(1, 8, 5, 5).expand(2, 8, 5, 5), torch.zeros(2, 1, 5, 5).expand(2, 8, 5, 5)):
        with pytest.raises(ValueError, match=msg.format("grad")):
            K.bn_backward_accumulate(bcast, x, dh, m, s, s, sum_dh, sum_dh_xmu, backend=backend)
        with pytest.raises(ValueError, match=msg.format("grad")):
            K.bottleneck_backward(x, s, t, w, dy, m, s, s, bcast, backend=backend)
        with pytest.raises(ValueError, match=msg.format("out")):
            K.bottleneck_backward_input(x, s, t, w, dy, m, out=bcast, backend=backend)
    # a broadcast x (read only) is fine, and a single sample or channel has no stride to speak of
    xb = x[:1].expand(2, 8, 5, 5)
    for a, b in zip(K.bottleneck_forward(xb, s, t, w, backend=backend), R.bottleneck_forward(xb.contiguous(), s, t, w)):
        torch.testing.assert_close(a, b, **FP32_TOL)
    g1 = torch.zeros(1, 8, 5, 5).expand(1, 8, 5, 5)
    K.bn_backward_accumulate(g1, x[:1], dh[:1], m, s, s, sum_dh, sum_dh_xmu, backend=backend)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_vectors_requiring_grad_are_read_as_data(backend):
    # before, on Triton: bottleneck_backward with an invstd that requires grad raised "A view was created
    # in no_grad mode and is being modified inplace with grad mode enabled" (dgamma is formed in place),
    # and channel_stats of an empty x into an out= mean that requires grad raised "a leaf Variable that
    # requires grad is being used in an in-place operation"; the twins ran
    _need_backend(backend)
    x, s, t, w, dy, m = _small()
    invstd = s.clone().requires_grad_()
    g, g_ref = torch.zeros_like(x), torch.zeros_like(x)
    got = K.bottleneck_backward(x, s, t, w, dy, m, invstd, s, g, backend=backend)
    ref = R.bottleneck_backward(x, s, t, w, dy, m, s, s, g_ref)
    for a, b in zip((*got, g), (*ref, g_ref)):
        assert not a.requires_grad
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    mean, var = torch.empty(8, requires_grad=True), torch.empty(8)
    K.channel_stats(torch.randn(0, 8, 5, 5), out=(mean, var), backend=backend)
    assert torch.isnan(mean.detach()).all() and torch.isnan(var).all()


@pytest.mark.parametrize("device", DEVICES)
def test_flop_counter_counts_the_kernels_as_their_twins(device) -> None:
    # FlopCounterMode sees the effdense::* ops, not the launches inside; without their formulas a fused
    # step's bottleneck GEMMs counted 0 FLOPs
    from torch.utils.flop_counter import FlopCounterMode

    _need_triton(device)
    case = _case(SHAPES[1], torch.float32, device)
    x, scale, shift, weight, dy, mean = (case[k] for k in ("x", "scale", "shift", "weight", "dy", "mean"))
    N, C, H, W = x.shape
    gemm = 2 * N * H * W * C * weight.shape[0]
    calls = {
        "forward": (lambda b: K.bottleneck_forward(x, scale, shift, weight, backend=b), gemm),
        "weight": (lambda b: K.bottleneck_backward_weight(x, scale, shift, dy, backend=b), gemm),
        "input": (lambda b: K.bottleneck_backward_input(x, scale, shift, weight, dy, mean, backend=b), gemm),
    }
    for name, (call, expected) in calls.items():
        for backend in ("triton", "reference"):
            with FlopCounterMode(display=False) as counter:
                call(backend)
            assert counter.get_total_flops() == expected, (name, backend)
    xg, wg = x.detach().requires_grad_(), weight.detach().requires_grad_()
    with FlopCounterMode(display=False) as counter:
        K.bn_relu_conv1x1(xg, scale, shift, wg).sum().backward()
    assert counter.get_total_flops() == 3 * gemm  # forward, weight gradient, input gradient


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # fp32: the kernels (interpreter); fp64: the twins
def test_bn_relu_conv1x1_output_takes_in_place_ops(dtype) -> None:
    # before: the twins returned y as a view of their GEMM's output, so the op's output was a view and an
    # in-place ReLU after it (nn.ReLU(inplace=True)) raised in backward on CPU and for fp64 anywhere
    x, s, t, w, _, _ = _small(dtype=dtype)
    s, t = s.to(R._checks.stats_dtype(dtype)), t.to(R._checks.stats_dtype(dtype))
    grads = []
    for fn in (K.bn_relu_conv1x1, lambda *a: F.conv2d(torch.relu(a[0] * _bc(a[1]) + _bc(a[2])), a[3][..., None, None])):
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fn(xg, s, t, wg)
        assert not y._is_view()
        (torch.nn.ReLU(inplace=True)(y) + 1).square().sum().backward()
        grads.append((xg.grad, wg.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-4, atol=1e-4)


def _bc(v):
    return v.view(1, -1, 1, 1)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_empty_tensors_pass_the_layout_check(backend) -> None:
    # before: an empty gradient with zero strides (the backward of .sum() over an empty output) and a
    # contiguous W=0 tensor were refused as "channels_last"; an empty tensor has no plane to read
    _need_backend(backend)
    x, s, t, w, _, m = _small(N=0)
    dy = torch.zeros(()).expand(0, w.shape[0], 5, 5)
    assert not K.bottleneck_backward_weight(x, s, t, dy, backend=backend).any()
    dh, sum_dh, _ = K.bottleneck_backward_input(x, s, t, w, dy, m, backend=backend)
    assert dh.shape == x.shape and not sum_dh.any()
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    K.bn_relu_conv1x1(xg, s, t, wg).sum().backward()
    assert wg.grad.shape == w.shape and not wg.grad.any()
    empty_w = torch.randn(2, 8, 3, 0)
    assert empty_w.is_contiguous()
    mean, var = K.channel_stats(empty_w, backend=backend)
    assert mean.isnan().all() and var.isnan().all()


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_inference_tensor_outputs_are_refused_outside_inference_mode(backend) -> None:
    # before: the direct kernel launch wrote into them, where PyTorch (and the twins) refuse
    _need_backend(backend)
    x, s, t, w, _, m = _small()
    with torch.inference_mode():
        out = (torch.empty(8), torch.empty(8))
        grad = torch.zeros_like(x)
    with pytest.raises(RuntimeError, match="Inplace update to inference tensor outside InferenceMode"):
        K.channel_stats(x, out=out, backend=backend)
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False), pytest.raises(RuntimeError, match="Inplace update to inference tensor"):
        K.channel_stats(x, out=out, backend=backend)  # (through the library op, which a dispatch mode takes)
    dh = torch.randn_like(x)
    sums = (torch.randn(8), torch.randn(8))
    with pytest.raises(RuntimeError, match="Inplace update to inference tensor outside InferenceMode"):
        K.bn_backward_accumulate(grad, x, dh, m, torch.ones(8), torch.ones(8), *sums, backend=backend)
    with torch.inference_mode():  # inside, both write
        K.channel_stats(x, out=out, backend=backend)
        K.bn_backward_accumulate(grad, x, dh, m, torch.ones(8), torch.ones(8), *sums, backend=backend)
    torch.testing.assert_close(out[0], x.mean(dim=(0, 2, 3)))
    assert grad.any()


def test_vmap_over_the_kernel_ops_runs_their_twins() -> None:
    # before: on the kernel path vmap failed with PyTorch's "Batching rule not implemented" (the kernel ops
    # write into their arguments), while the twins worked: what ran on a CPU failed on CUDA
    _need_triton("cpu")
    xs = torch.randn(3, 2, 8, 3, 3)
    _, s, t, w, _, _ = _small(C=8, H=3, W=3)
    y = torch.func.vmap(lambda a: K.bottleneck_forward(a, s, t, w)[0])(xs)
    mean = torch.func.vmap(lambda a: K.channel_stats(a)[0])(xs)
    for i in range(3):
        torch.testing.assert_close(y[i], K.bottleneck_forward(xs[i], s, t, w, stats=False)[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mean[i], xs[i].mean(dim=(0, 2, 3)))
    with pytest.raises(NotImplementedError, match="torch.func transforms"):
        torch.func.vmap(lambda a: K.channel_stats(a, backend="triton")[0])(xs)
    dys = torch.randn(3, 2, 4, 3, 3)  # batched over dy only
    dw = torch.func.vmap(lambda d: K.bottleneck_backward_weight(xs[0], s, t, d))(dys)
    torch.testing.assert_close(dw[1], K.bottleneck_backward_weight(xs[0], s, t, dys[1]), rtol=1e-5, atol=1e-5)
    # the input gradient and the whole backward (their twins wrote ReLU's backward with an out= operator, which
    # vmap's batching cannot run), and statistics into given outputs (the overlap check asked a batched
    # tensor for its storage): all failed under vmap before
    m = xs[0].mean(dim=(0, 2, 3))
    invstd, gamma = torch.rand(8) + 0.5, torch.randn(8)
    dh, sdh, sdx = torch.func.vmap(lambda d: K.bottleneck_backward_input(xs[0], s, t, w, d, m))(dys)
    one = K.bottleneck_backward_input(xs[0], s, t, w, dys[2], m)
    for got, want in zip((dh[2], sdh[2], sdx[2]), one):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for batch_stats in (True, False):
        grads = torch.zeros(3, 2, 8, 3, 3)

        def whole(d, g):
            return K.bottleneck_backward(xs[0], s, t, w, d, m, invstd, gamma, g, batch_stats=batch_stats, chunk=3)

        outs = torch.func.vmap(whole)(dys, grads)
        g1 = torch.zeros(2, 8, 3, 3)
        want = whole(dys[1], g1)
        torch.testing.assert_close(grads[1], g1, rtol=1e-5, atol=1e-5)
        for got, w1 in zip(outs, want):
            torch.testing.assert_close(got[1], w1, rtol=1e-5, atol=1e-5)
    means, variances = torch.zeros(3, 8), torch.zeros(3, 8)
    torch.func.vmap(lambda a, mo, vo: K.channel_stats(a, out=(mo, vo)))(xs, means, variances)
    var0, mean0 = torch.var_mean(xs[0], dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(means[0], mean0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(variances[0], var0, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_out_overlapping_a_vector_it_reads_is_refused(backend):
    # an fp32 out sharing storage with mean: the twin wrote out before reading mean (sum_dh_xmu off by 245),
    # the kernel read it per tile; neither said anything
    _need_backend(backend)
    N, C, H, W, B = 2, 6, 3, 3, 4
    x, s, t, w, dy, _ = _small(N, C, H, W, B)
    storage = torch.randn(N * C * H * W + C)
    out, mean = storage[: N * C * H * W].view(N, C, H, W), storage[-C - 1 : -1]
    with pytest.raises(ValueError, match="out: expected memory separate from mean"):
        K.bottleneck_backward_input(x, s, t, w, dy, mean, out=out, backend=backend)
    right_after = storage[-C:]  # the same storage, right after out: allowed, and read as it was
    expected = K.bottleneck_backward_input(x, s, t, w, dy, right_after.clone(), backend=backend)
    got = K.bottleneck_backward_input(x, s, t, w, dy, right_after, out=out, backend=backend)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)
    # the weight too (from a probe: the kernel's programs wrote dh over weight rows later ones read, dh and the
    # sums off by ~3 against the twin's, which reads all of weight first; both accepted it)
    storage = torch.randn(N * C * H * W + B * C)
    out, w_shared = storage[: N * C * H * W].view(N, C, H, W), storage[-B * C - 1 : -1].view(B, C)
    with pytest.raises(ValueError, match="out: expected memory separate from weight"):
        K.bottleneck_backward_input(x, s, t, w_shared, dy, mean.clone(), out=out, backend=backend)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_grad_overlapping_a_vector_it_reads_is_refused(backend):
    """``grad`` written where a per-channel vector it reads lies (gamma viewed from the same storage): the
    kernel's later channel programs read gamma after earlier ones had added into it (grad off by 1.0 in 6
    channels against the twin), silently. Refused now, as ``bottleneck_backward_input``'s ``out``."""
    _need_backend(backend)
    N, C, H, W, B = 1, 70, 1, 1, 4
    big = torch.zeros(2 * C)
    gamma, grad = big[:C], big[10 : 10 + C].view(N, C, H, W)
    x, dh, z, one = torch.randn(N, C, H, W), torch.ones(N, C, H, W), torch.zeros(C), torch.ones(C)
    with pytest.raises(ValueError, match="grad: expected memory separate from gamma"):
        K.bn_backward_accumulate(grad, x, dh, z, one, gamma, z, z, batch_stats=False, backend=backend)
    s, t, w, dy = torch.rand(C) + 0.5, torch.randn(C), torch.randn(B, C), torch.randn(N, B, H, W)
    with pytest.raises(ValueError, match="grad: expected memory separate from gamma"):
        K.bottleneck_backward(x, s, t, w, dy, z, one, gamma, grad, backend=backend)
    with pytest.raises(ValueError, match="grad: expected memory separate from gamma"):  # a BatchNorm's weight as it is
        K.bn_backward_accumulate(grad, x, dh, z, one, torch.nn.Parameter(gamma), z, z, batch_stats=False, backend=backend)
    storage = torch.zeros(N * C * H * W + C)  # the vector right after grad in one storage: allowed
    grad2, gamma2 = storage[:C].view(N, C, H, W), storage[C:].fill_(1.0)
    K.bn_backward_accumulate(grad2, x, dh, z, one, gamma2, z, z, batch_stats=False, backend=backend)
    torch.testing.assert_close(grad2, dh)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_grad_partly_overlapping_x_is_refused(backend):
    """``grad`` may be ``x`` itself (or separate from it): one partly overlapping it made the result depend
    on the chunk size (and on the order of the writes), silently, on both backends."""
    _need_backend(backend)
    N, C, H, W, B = 2, 10, 3, 3, 4
    buf = torch.randn(N, C + 1, H, W)
    x, grad = buf[:, :C], buf[:, 1:]
    s, t, w = torch.rand(C) + 0.5, torch.randn(C), torch.randn(B, C)
    dy, m, invstd, gamma = torch.randn(N, B, H, W), torch.randn(C), torch.rand(C) + 0.5, torch.randn(C)
    for chunk in (None, 4):
        with pytest.raises(ValueError, match="grad: expected x itself or memory separate from it"):
            K.bottleneck_backward(x, s, t, w, dy, m, invstd, gamma, grad, chunk=chunk, backend=backend)
    dh = torch.randn(N, C, H, W)
    with pytest.raises(ValueError, match="grad: expected dh itself or memory separate from it"):
        K.bn_backward_accumulate(grad, torch.randn(N, C, H, W), buf[:, :C], m, invstd, gamma, m, m, backend=backend)
    # x itself, as before
    before = x.clone()
    K.bottleneck_backward(x, s, t, w, dy, m, invstd, gamma, x, chunk=4, backend=backend)
    g = before.clone()
    K.bottleneck_backward(before, s, t, w, dy, m, invstd, gamma, g, chunk=4, backend=backend)
    torch.testing.assert_close(x, g, rtol=1e-5, atol=1e-5)
    K.bn_backward_accumulate(dh, torch.randn(N, C, H, W), dh, m, invstd, gamma, m, m, backend=backend)


def test_bn_relu_conv1x1_under_autocast_casts_as_a_convolution() -> None:
    """Under torch.autocast, x and weight are cast to the autocast dtype as a convolution's would be (before:
    an fp32 weight with the bf16 output of an autocast layer was refused, and fp32 inputs ran in fp32)."""
    x, s, t, w, _, _ = _small(C=8, B=4)
    w = w.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = K.bn_relu_conv1x1(x, s, t, w)
        y2 = K.bn_relu_conv1x1(x.bfloat16(), s, t, w)  # as a previous autocast layer hands it on
    assert y.dtype == y2.dtype == torch.bfloat16
    torch.testing.assert_close(y, K.bn_relu_conv1x1(x.bfloat16(), s, t, w.detach().bfloat16()))
    y.float().sum().backward()
    assert w.grad is not None and w.grad.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float64 is left alone, as autocast leaves it
        assert K.bn_relu_conv1x1(x.double(), s.double(), t.double(), w.detach().double()).dtype == torch.float64


def test_bn_relu_conv1x1_computes_no_statistics() -> None:
    # before: its forward asked the bottleneck op for BN2's statistics and threw them away
    calls = []
    original = K.ops.bottleneck_forward

    def spy(*args, **kwargs):
        calls.append(kwargs.get("stats", True))
        return original(*args, **kwargs)

    x, s, t, w, _, _ = _small()
    K.ops.bottleneck_forward = spy
    try:
        K.bn_relu_conv1x1(x, s, t, w)
    finally:
        K.ops.bottleneck_forward = original
    assert calls == [False]


@pytest.mark.cuda
def test_deterministic_algorithms_alert_on_the_atomic_kernels() -> None:
    # before: the kernels' atomics ran silently under torch.use_deterministic_algorithms(True)
    x, s, t, w, dy, m = (v.cuda() for v in _small())
    was, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        with pytest.raises(RuntimeError, match="does not have a deterministic implementation"):
            K.bottleneck_forward(x, s, t, w, backend="triton")
        with pytest.raises(RuntimeError, match="does not have a deterministic implementation"):
            K.bottleneck_backward_weight(x, s, t, dy, backend="triton")
        K.bottleneck_forward(x, s, t, w, stats=False, backend="triton")  # one program per output: no atomics
        torch.use_deterministic_algorithms(True, warn_only=True)
        with pytest.warns(UserWarning, match="does not have a deterministic implementation") as caught:
            K.bottleneck_backward_input(x, s, t, w, dy, m, backend="triton")
        assert [r.filename for r in caught] == [__file__]  # the caller's line (before: a line inside ops.py)
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn_only)


def test_the_atomics_warning_names_the_callers_line() -> None:
    """Under use_deterministic_algorithms(True, warn_only=True) the warning points at the first frame outside
    kernels/ (the caller of the public function), not at a line of ops.py (its stacklevel was fixed, and the
    check moved one to three helpers deep). A CUDA tensor is all the alert reads of x: a stand-in here."""
    import types

    was, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        torch.use_deterministic_algorithms(True, warn_only=True)
        with pytest.warns(UserWarning, match="does not have a deterministic implementation") as caught:
            K.ops._alert_atomics(types.SimpleNamespace(is_cuda=True), "bottleneck_forward")
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn_only)
    assert [r.filename for r in caught] == [__file__]


def test_deterministic_algorithms_are_not_alerted_in_the_interpreter() -> None:
    # the interpreter runs the programs one after another, in one order
    _need_triton("cpu")
    x, s, t, w, dy, _ = _small()
    was, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        a = K.bottleneck_forward(x, s, t, w, backend="triton")
        b = K.bottleneck_forward(x, s, t, w, backend="triton")
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn_only)
    for u, v in zip(a, b):
        assert torch.equal(u, v)
