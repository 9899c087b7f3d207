"""Argument checks shared by the Triton wrappers and their reference twins.

Every entry point reads activations as ``(N, C, H, W)`` tensors whose spatial plane is contiguous
(strides ``(sN, sC, W, 1)``), which covers a contiguous NCHW tensor and any channel slice of one
(``buf[:, 16:40]``). Errors name what was expected and what was given.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch

# dtypes the Triton kernels take; the PyTorch twins also take float64 (gradcheck, numerics studies)
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FLOAT_DTYPES = KERNEL_DTYPES + (torch.float64,)


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of per-channel statistics and reductions for activations of ``dtype``: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_flag(name: str, value: object) -> None:
    """An on/off keyword (``stats``, ``batch_stats``) is a bool: a string such as ``"no"`` would read as True."""
    if value is not True and value is not False:
        raise TypeError(f"{name}: expected a bool (True or False), got {type_name(value)} {value!r}")


def type_name(value: object) -> str:
    """``value``'s type, module-qualified unless built in: numpy's bool prints as ``numpy.bool``, not ``bool``."""
    t = type(value)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


# The kernels offset a sample's values in 64 bits (``n * stride_n``), and channels, pixels and the GEMM's rows
# (``N*H*W``) in 32 bits: Triton passes an int argument below 2**31 as a 32-bit integer, and products of 32-bit
# values wrap. Past this bound (2**31 less room for one tile past the end: the interpreter's widest is 2**18
# rows) an offset could wrap, reading and writing other memory: such tensors go to the PyTorch twins
# (backend="auto") or are refused ("triton").
INT32_SPAN = 2**31 - 2**19


def int32_span_error(tensors: tuple, wgrad_rows: int = 0) -> str | None:
    """Why the tensors of one kernel call do not fit the kernels' 32-bit offsets, or None if they do.
    ``tensors``: the activation ``x`` first, then the call's other arguments that the kernels index (tuples
    among them, such as ``out=``, are looked into; non-tensors skipped). For each 4-D tensor: ``N*H*W``
    values per channel, its channel span ``(C-1)*|stride(1)| + H*W``, and ``C*H*W`` (an output allocated like
    it, e.g. ``dh``); for each 2-D weight ``(B, C)``: ``B*H*W`` (the output ``y``'s channel span) and ``B*C``;
    ``wgrad_rows``: the rows ``B`` of a ``(B, C)`` weight gradient the call allocates without a weight argument
    (``bottleneck_backward_weight``), checked as ``B*C`` with ``x``'s ``C``. Runs on every call of a public op
    (about 2.5 us for four tensors on a 2-core CPU): callers leave out the per-channel vectors."""
    if wgrad_rows and isinstance(tensors[0], torch.Tensor) and tensors[0].dim() == 4:
        if wgrad_rows * tensors[0].shape[1] > INT32_SPAN:
            return (
                f"a weight gradient of shape ({wgrad_rows}, {tensors[0].shape[1]}) has more elements than the "
                f"kernels' 32-bit offsets reach ({INT32_SPAN})"
            )
    P = 0
    for t in tensors:
        if t.__class__ is tuple or t.__class__ is list:  # (an out= pair: looked into, beside x)
            inner = int32_span_error((tensors[0], *t))
            if inner is not None:
                return inner
            continue
        if not isinstance(t, torch.Tensor):
            continue
        shape = t.shape
        n = len(shape)
        if n == 4:
            N, C, H, W = shape
            P = H * W
            if N * P > INT32_SPAN:
                split = "; split the batch" if N > 1 else ""
                return (
                    f"a tensor of shape {tuple(shape)} has N*H*W = {N * P} values per channel, more than the "
                    f"kernels' 32-bit row offsets reach ({INT32_SPAN}){split}"
                )
            sc = t.stride()[1]
            span = (C - 1) * (sc if sc >= 0 else -sc) + P
            if C * P > INT32_SPAN or span > INT32_SPAN:
                hint = "; pass it .contiguous()" if C * P <= INT32_SPAN else ""
                return (
                    f"a tensor of shape {tuple(shape)} and strides {t.stride()} spans {max(C * P, span)} elements "
                    f"across its channels, more than the kernels' 32-bit channel offsets reach ({INT32_SPAN}){hint}"
                )
        elif n == 2 and P:
            B, C = shape
            if B * P > INT32_SPAN or B * C > INT32_SPAN:
                return (
                    f"a weight of shape {tuple(shape)} gives outputs spanning {max(B * P, B * C)} elements, more than "
                    f"the kernels' 32-bit channel offsets reach ({INT32_SPAN})"
                )
    return None


def planes_contiguous(t: torch.Tensor) -> bool:
    """Whether each (H, W) plane of 4-D ``t`` is contiguous (strides ``(sN, sC, W, 1)``; a size-1 dimension's
    stride aside): the layout the kernels read, NCHW or a channel slice of an NCHW buffer."""
    H, W = t.shape[2], t.shape[3]
    return not ((W > 1 and t.stride(3) != 1) or (H > 1 and t.stride(2) != W))


def check_activation(name: str, t: torch.Tensor, *, like: torch.Tensor | None = None, channels: int | None = None) -> None:
    """``t`` is a 4-D float tensor with a contiguous (H, W) plane; optionally shaped/typed/placed like ``like``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name}: expected a 4-D tensor (N, C, H, W), got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected dtype float32, bfloat16, float16 or float64, got {t.dtype}")
    N, C, H, W = t.shape
    # (an empty tensor has no plane to read: any strides, e.g. PyTorch's for a W=0 tensor or an expanded zero gradient)
    if t.numel() and not planes_contiguous(t):
        cl = "; channels_last is not supported" if C > 1 and t.stride(1) == 1 else ""  # (a slice of one too)
        raise ValueError(
            f"{name}: expected each (H, W) plane contiguous (strides (sN, sC, {W}, 1), e.g. NCHW or a channel "
            f"slice of an NCHW buffer), got strides {t.stride()}{cl}; call .contiguous()"
        )
    if like is not None:
        if t.device != like.device:
            raise ValueError(f"{name}: expected device {like.device}, got {t.device}")
        if t.dtype != like.dtype:
            raise TypeError(f"{name}: expected dtype {like.dtype} (the dtype of x), got {t.dtype}")
        if (t.shape[0], t.shape[2], t.shape[3]) != (like.shape[0], like.shape[2], like.shape[3]):
            raise ValueError(
                f"{name}: expected N, H, W = {(like.shape[0], like.shape[2], like.shape[3])} as x, got shape {tuple(t.shape)}"
            )
    if channels is not None and C != channels:
        raise ValueError(f"{name}: expected {channels} channels, got shape {tuple(t.shape)}")


def check_written(name: str, t: torch.Tensor) -> None:
    """``t``, a 4-D tensor that a kernel writes (after :func:`check_activation`), has no broadcast dimension:
    no stride 0 over more than one sample or channel, as an ``expand``ed view has. PyTorch refuses to write
    such a tensor in place (so the twins did, with "more than one element of the written-to tensor refers to
    a single memory location"); the kernels' programs would write one address from several places at once."""
    if (t.stride(1) == 0 and t.shape[1] > 1) or (t.stride(0) == 0 and t.shape[0] > 1):
        raise ValueError(
            f"{name}: expected a tensor with memory of its own for each element (it is written in place), got "
            f"a broadcast view (shape {tuple(t.shape)}, strides {t.stride()}); pass a separate buffer, e.g. .clone()"
        )


def check_vector(
    name: str, v: torch.Tensor, length: int, device: torch.device, dtype: torch.dtype = torch.float32
) -> None:
    """``v`` is a 1-D tensor of ``length`` elements on ``device`` in ``dtype`` (:func:`stats_dtype` of the
    activations), with unit stride: the kernels read ``v[c]`` at ``ptr + c``, so a strided view (``t[::2]``,
    a column of a matrix, an ``expand``) is refused by the twins too."""
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(v).__name__}")
    if v.dim() != 1 or v.shape[0] != length:
        raise ValueError(f"{name}: expected a 1-D tensor of shape ({length},), got shape {tuple(v.shape)}")
    if v.dtype != dtype:
        raise TypeError(
            f"{name}: expected dtype {dtype} (per-channel statistics are fp32, fp64 for fp64 activations), got {v.dtype}"
        )
    if v.device != device:
        raise ValueError(f"{name}: expected device {device}, got {v.device}")
    if not v.is_contiguous():  # 1-D: unit stride (or at most one element); cheaper to ask than stride(0)
        raise ValueError(f"{name}: expected unit stride (a contiguous vector or a slice of one), got stride {v.stride(0)}")


def check_stats_out(out: object, length: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``channel_stats``'s ``out``: a ``(mean, var)`` pair of unit-stride 1-D statistics vectors for ``x``."""
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise TypeError(f"out: expected a (mean, var) pair of tensors, got {type(out).__name__}")
    for name, v in zip(("out[0] (mean)", "out[1] (var)"), out):
        check_vector(name, v, length, x.device, stats_dtype(x.dtype))
    mean, var = out
    if _comparable(mean) and _comparable(var) and _same_storage(mean, var) and _spans_meet(mean, var):
        raise ValueError(
            f"out: expected separate memory for mean and var, got vectors that overlap (storage offsets "
            f"{mean.storage_offset()} and {var.storage_offset()}, {length} elements each)"
        )
    return mean, var


def check_vectors(length: int, device: torch.device, dtype: torch.dtype, **vectors: torch.Tensor) -> None:
    """:func:`check_vector` for each named vector (keyword order is the order checked)."""
    for name, v in vectors.items():
        check_vector(name, v, length, device, dtype)


def check_accumulate(
    grad: torch.Tensor,
    x: torch.Tensor,
    dh: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    gamma: torch.Tensor,
    sum_dh: torch.Tensor,
    sum_dh_xmu: torch.Tensor,
) -> None:
    """The arguments of ``bn_backward_accumulate`` (Triton entry point and twin alike)."""
    check_activation("x", x)
    C = x.shape[1]
    check_activation("grad", grad, like=x, channels=C)
    check_written("grad", grad)
    check_activation("dh", dh, like=x, channels=C)
    check_vectors(
        C, x.device, stats_dtype(x.dtype), mean=mean, invstd=invstd, gamma=gamma, sum_dh=sum_dh, sum_dh_xmu=sum_dh_xmu
    )
    check_in_place("grad", grad, x=x, dh=dh)
    check_apart_from_vectors("grad", grad, mean=mean, invstd=invstd, gamma=gamma, sum_dh=sum_dh, sum_dh_xmu=sum_dh_xmu)


def check_weight(weight: torch.Tensor, x: torch.Tensor) -> None:
    """``weight`` is the 1x1 convolution's ``(B, C)`` matrix in x's dtype (a ``(B, C, 1, 1)`` view is not accepted)."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight: expected a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(
            f"weight: expected shape (B, {x.shape[1]}) (use conv.weight.view(B, C)), got shape {tuple(weight.shape)}"
        )
    if weight.dtype != x.dtype:
        raise TypeError(f"weight: expected dtype {x.dtype} (the dtype of x), got {weight.dtype}")
    if weight.device != x.device:
        raise ValueError(f"weight: expected device {x.device}, got {weight.device}")


def check_dy(dy: torch.Tensor, x: torch.Tensor, B: int) -> None:
    check_activation("dy", dy, like=x, channels=B)


_functorch_wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", lambda t: False)


def _comparable(t: torch.Tensor) -> bool:
    """Whether ``t`` has storage whose overlap with another tensor's can be asked: a plain, non-empty tensor
    with data in eager execution (tracing has no storages, and must not break the graph; meta/fake have none;
    nor have a ``torch.func`` transform's wrappers, e.g. vmap's batched tensors)."""
    return (
        not torch.compiler.is_compiling() and type(t) is torch.Tensor and not t.is_meta and t.numel() > 0
        and not _functorch_wrapped(t)
    )


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _span(t: torch.Tensor) -> tuple[int, int]:
    """The ``[first, last + 1)`` element offsets that a non-empty tensor covers in its storage."""
    lo = t.storage_offset()
    return lo, lo + 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))


def _spans_meet(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the element ranges of two tensors on one storage meet (exact for unit-stride vectors)."""
    (la, ha), (lb, hb) = _span(a), _span(b)
    return ha > lb and hb > la


def _planes_overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two plane-contiguous 4-D tensors on one storage share an element: exact for views with the
    same ``(N, ·, H, W)`` shape and strides (channel slices of one NCHW buffer), else whether their spans meet."""
    if not _spans_meet(a, b):
        return False
    la, lb = a.storage_offset(), b.storage_offset()
    N, Ca, H, W = a.shape
    Cb = b.shape[1]
    s0, s1 = a.stride(0), a.stride(1)
    if (b.shape[0], b.shape[2], b.shape[3]) != (N, H, W) or (b.stride(0), b.stride(1)) != (s0, s1):
        return True
    if s1 < H * W or (lb - la) % s1 or (N > 1 and s0 % s1):
        return True
    # plane (n, c) of a starts at la + (n*R + c)*s1, of b at la + (n*R + k + c)*s1: planes of H*W <= s1
    # elements meet only where those indices are equal, i.e. for some j = n - m in (-N, N), the channel
    # ranges [0, Ca) of a and [k + j*R, k + j*R + Cb) of b intersect
    k = (lb - la) // s1
    if N == 1:
        return k < Ca and k + Cb > 0
    R = s0 // s1
    if R == 0:
        return True
    j_lo = max(-(N - 1), -((Cb + k - 1) // R))  # smallest j with k + j*R + Cb > 0
    j_hi = min(N - 1, (Ca - 1 - k) // R)  # largest j with k + j*R < Ca
    return j_lo <= j_hi


_Parameter = torch.nn.Parameter  # (a BatchNorm's weight goes in as gamma as it is)


def _sharing(t: torch.Tensor, read: dict[str, torch.Tensor], meet) -> Iterator[tuple[str, torch.Tensor]]:
    """The named tensors of ``read`` that share storage with ``t`` and ``meet(t, o)``: the loop of the
    overlap checks below (tensors with data in eager execution only, see :func:`_comparable`)."""
    if not _comparable(t):
        return
    base = t.untyped_storage().data_ptr()  # (once: each storage lookup costs host time on every op call)
    for other, o in read.items():
        # (_comparable(o) without its is_compiling(): t passed it)
        if (
            (type(o) is torch.Tensor or type(o) is _Parameter) and not o.is_meta and o.numel() > 0 and not _functorch_wrapped(o)
            and o.untyped_storage().data_ptr() == base and meet(t, o)
        ):  # fmt: skip
            yield other, o


def _partly_overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors on one storage share elements without being the same elements."""
    same = a.storage_offset() == b.storage_offset() and a.shape == b.shape and a.stride() == b.stride()
    return not same and _planes_overlap(a, b)


def check_in_place(name: str, t: torch.Tensor, **read: torch.Tensor) -> None:
    """``t``, updated element by element where the named tensors are read: each of them is ``t``'s very
    elements (an in-place update of that input, which is allowed) or shares none with it. A partial overlap
    would make the result depend on the order the elements are visited in (a channel of ``x`` read after a
    neighbouring channel of ``grad`` was written to it). Checked as :func:`check_disjoint`."""
    for other, o in _sharing(t, read, _partly_overlap):
        raise ValueError(
            f"{name}: expected {other} itself or memory separate from it, got a tensor that partly overlaps it "
            f"(shapes {tuple(t.shape)} and {tuple(o.shape)}, storage offsets {t.storage_offset()} and "
            f"{o.storage_offset()}): the result would depend on the order of the writes; pass a separate buffer"
        )


def check_apart_from_vectors(name: str, t: torch.Tensor, **vectors: torch.Tensor) -> None:
    """``t``, written by a kernel, covers no element of the named per-channel vectors it reads (a vector
    viewed from the same storage as an output buffer): whether their storage spans meet."""
    for other, _ in _sharing(t, vectors, _spans_meet):
        raise ValueError(
            f"{name}: expected memory separate from {other} (it is written while {other} is read), got a tensor "
            f"whose storage span meets it; pass a separate buffer"
        )


def check_disjoint(name: str, t: torch.Tensor, **read: torch.Tensor) -> None:
    """``t``, written by a kernel, shares no element with the named tensors it reads (checked on tensors
    with data in eager execution; plane-contiguous 4-D tensors, as :func:`check_activation` leaves them)."""
    for other, o in _sharing(t, read, _planes_overlap):
        raise ValueError(
            f"{name}: expected memory separate from {other} (it is written while {other} is read), got a tensor "
            f"that overlaps it (shapes {tuple(t.shape)} and {tuple(o.shape)}, storage offsets {t.storage_offset()} "
            f"and {o.storage_offset()}); pass a separate buffer"
        )


# Whole-argument checks of each entry point, shared by the Triton wrappers (ops.py) and their twins
# (reference.py): one contract, one place.


def check_affine(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """``x`` an activation, ``scale``/``shift`` its per-channel affine in :func:`stats_dtype`."""
    check_activation("x", x)
    acc = stats_dtype(x.dtype)
    check_vector("scale", scale, x.shape[1], x.device, acc)
    check_vector("shift", shift, x.shape[1], x.device, acc)


def check_chunk(chunk: int | None) -> None:
    """A channel-chunk width: None, or a positive int (a bool or float is a ``TypeError``, ``< 1`` a ``ValueError``)."""
    if chunk is None:
        return
    if isinstance(chunk, bool) or not isinstance(chunk, int):
        raise TypeError(f"chunk: expected a positive int or None, got {type(chunk).__name__} {chunk!r}")
    if chunk < 1:
        raise ValueError(f"chunk: expected a positive int or None, got {chunk!r}")


def channel_chunks(channels: int, width: int | None) -> list[tuple[int, int]]:
    """Split ``channels`` into near-equal ``(start, stop)`` ranges of at most ``width`` (None: one range)."""
    if width is None or width >= channels:
        return [(0, channels)]
    n = math.ceil(channels / max(1, width))
    step = math.ceil(channels / n)
    return [(c0, min(c0 + step, channels)) for c0 in range(0, channels, step)]


def check_forward(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, weight: torch.Tensor,
                  chunk: int | None, stats: bool) -> None:  # fmt: skip
    """The arguments of ``bottleneck_forward``."""
    check_affine(x, scale, shift)
    check_weight(weight, x)
    check_chunk(chunk)
    check_flag("stats", stats)


def check_backward_weight(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, dy: torch.Tensor) -> None:
    """The arguments of ``bottleneck_backward_weight``."""
    check_affine(x, scale, shift)
    check_activation("dy", dy, like=x)


def check_backward_input(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, weight: torch.Tensor,
                         dy: torch.Tensor, mean: torch.Tensor, out: torch.Tensor | None) -> None:  # fmt: skip
    """The arguments of ``bottleneck_backward_input``."""
    check_affine(x, scale, shift)
    check_weight(weight, x)
    C = x.shape[1]
    check_dy(dy, x, weight.shape[0])
    check_vector("mean", mean, C, x.device, stats_dtype(x.dtype))
    if out is not None:
        check_activation("out", out, like=x, channels=C)
        check_written("out", out)
        check_disjoint("out", out, x=x, dy=dy)
        check_apart_from_vectors("out", out, mean=mean, scale=scale, shift=shift, weight=weight)


def check_backward(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, weight: torch.Tensor,
                   dy: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor, gamma: torch.Tensor,
                   grad: torch.Tensor, chunk: int | None, batch_stats: bool) -> None:  # fmt: skip
    """The arguments of ``bottleneck_backward`` (which, with several chunks, also refuses a ``grad``
    overlapping ``dy``: see there)."""
    check_affine(x, scale, shift)
    check_weight(weight, x)
    C = x.shape[1]
    check_dy(dy, x, weight.shape[0])
    check_activation("grad", grad, like=x, channels=C)
    check_written("grad", grad)
    check_in_place("grad", grad, x=x)
    check_vectors(C, x.device, stats_dtype(x.dtype), mean=mean, invstd=invstd, gamma=gamma)
    check_apart_from_vectors("grad", grad, scale=scale, shift=shift, mean=mean, invstd=invstd, gamma=gamma, weight=weight)
    check_chunk(chunk)
    check_flag("batch_stats", batch_stats)
