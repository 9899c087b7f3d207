"""Training-step memory: exact live-tensor tracking on CPU, FakeTensor estimates, the CUDA allocator on GPU.

What is measured: the *training-step peak*, the largest amount of live tensor memory
from the start of the forward pass to the end of the backward pass of one step. It counts

- the parameters, the buffers (BatchNorm running statistics) and the input, alive before the step starts;
- every tensor an operator creates during forward, loss and backward: activations saved for backward,
  temporaries that die at once, the labels, the loss, the gradients of activations, and the parameters'
  ``.grad`` tensors created in backward (a model's old ``.grad`` tensors are dropped first).

Each *storage* is counted once, by its ``nbytes``: views, in-place results and ``.grad`` tensors that
autograd steals from the incoming gradient add nothing. Not counted: what an optimizer step would add
(momentum, Adam state), memory an operator allocates internally without returning it as a tensor (oneDNN
or cuDNN workspaces on CPU tracking; on CUDA the caching allocator sees those), tensors made in C++
without an operator (``torch.get_rng_state()``, 5 KB each, which ``torch.utils.checkpoint`` saves per
checkpoint with ``preserve_rng_state=True``, as torchvision's ``memory_efficient=True`` does: at most 58 x 5 KB for
DenseNet-121; ``torch.tensor(list)``), and allocator rounding and fragmentation. Such a temporary can sit at the step's peak moment: ATen's CPU BatchNorm backward
allocates one the size of its input inside the operator, and the ``shared``/``fused`` peak falls inside a
BatchNorm backward, so on CPU the allocator itself reaches more than the tracked peak there (for ``naive``,
whose peak falls elsewhere, the two agree closely). The tracked number is the live-tensor memory that the
strategies control, the same on every device; the CUDA measurement includes whatever the kernels allocate.
A sparse tensor (a sparse gradient, ``nn.Embedding(..., sparse=True)``) is counted by its indices' and values'
storages, in the peak and in the breakdown (a sparse ``.grad`` in ``grads``).

Three ways to get the number, one API (:func:`measure_step`, :func:`estimate_step`):

- CPU: :class:`MemoryTracker`, a ``TorchDispatchMode`` that sees every operator's outputs, keeps the
  live untyped storages by identity and notices their release through weak references. Exact and
  deterministic.
- FakeTensor estimate: the same tracker inside ``FakeTensorMode`` (fake mode the *outer* context). No
  memory is allocated and no arithmetic is done, so configurations that do not fit anywhere (DenseNet-264
  at batch 256, a 1500-layer DenseNet-BC) are estimated in seconds, and the number equals the exact CPU
  measurement of the same configuration. Where PyTorch's fake or meta kernel claims a size that its CPU
  kernel does not allocate, the tracker counts the CPU kernel's (``_cpu_nbytes``): the saved statistics
  of BatchNorm, LayerNorm and GroupNorm, whose dtype (bf16/fp16 inputs, fp32 or low-precision parameters)
  and length (BatchNorm in eval) the meta and fake kernels get wrong; and the reduced result of
  ``mse_loss``, ``smooth_l1_loss``, ``soft_margin_loss`` and ``binary_cross_entropy``, which the CPU kernels
  return as a 0-d view of the whole elementwise loss (its storage as large as the input). Not corrected:
  GroupNorm under autocast (estimates can exceed the CPU by its input's size in fp32), recurrent layers (``nn.LSTM``/
  ``nn.GRU``: their fake and meta kernels claim far less than the CPU kernel's workspace; ``estimate_step``
  warns) and fake CUDA estimates, which take the fake kernels' sizes as they are.
- meta estimate: the same tracker over tensors on the ``meta`` device; same number, five to ten times
  faster, for code that runs on meta tensors (``estimate_step(..., backend="meta"|"auto")``).
- CUDA: ``torch.cuda.reset_peak_memory_stats()`` with model and input already on the device, then
  ``torch.cuda.max_memory_allocated()`` (the allocator's view, so cuDNN workspaces and 512-byte rounding
  are in it). The tracker runs alongside and its number is reported too (``tracked_peak``). A fake-CUDA
  estimate adds the cuBLAS/cuBLASLt workspaces that the allocator holds as well (:func:`cuda_library_workspace`,
  modelled, in ``StepMemory.workspace``).

Reference points (the project's design targets), reproduced by estimate and by exact measurement, fp32, batch 64:
torchvision DenseNet-121 at 224x224 7,979.1 MiB plain and 3,869.3 MiB ``memory_efficient=True``;
DenseNet-BC-100 at 32x32 2,138.4 MiB naive and 787.6 MiB checkpoint. These exclude the input batch
(36.75 / 0.75 MiB), which :class:`StepMemory` counts in ``peak``.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import fractions
import functools
import importlib
import math
import operator
import os
import re
import warnings
import weakref
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

MiB = 1 << 20
GiB = 1 << 30

__all__ = [
    "GiB",
    "MiB",
    "MemoryTracker",
    "StepMemory",
    "cuda_library_workspace",
    "estimate_step",
    "format_bytes",
    "format_mib",
    "measure_step",
    "mib",
    "parse_bytes",
    "storage_bytes",
    "training_step",
]


# ------------------------------------------------------------------------------------------------
# Units


def mib(nbytes: float) -> float:
    """Bytes to MiB (2^20 bytes)."""
    return nbytes / MiB


def format_mib(nbytes: float, digits: int = 1) -> str:
    """``"7,979.3 MiB"``: bytes as MiB (2^20) with thousands separators."""
    return f"{nbytes / MiB:,.{digits}f} MiB"


def format_bytes(nbytes: float) -> str:
    """Human-readable binary size: ``"512 B"``, ``"3.5 KiB"``, ``"12.0 GiB"``; the unit is the largest in
    which the *rounded* value stays below 1024 (``1048575`` is ``"1.0 MiB"``, not ``"1024.0 KiB"``).

    Raises:
        TypeError: for text (use :func:`parse_bytes`) and other non-numbers.
        ValueError: for NaN and infinities.
    """
    if isinstance(nbytes, (str, bytes)):
        raise TypeError(f"nbytes: expected a number of bytes, got {type(nbytes).__name__} {nbytes!r}; parse text with parse_bytes")
    try:
        value = float(nbytes)
    except (TypeError, ValueError):
        raise TypeError(f"nbytes: expected a number of bytes, got {type(nbytes).__name__}") from None
    if not math.isfinite(value):
        raise ValueError(f"nbytes: expected a finite number of bytes, got {value}")
    for unit, digits in (("B", 0), ("KiB", 1), ("MiB", 1), ("GiB", 1)):
        if abs(round(value, digits)) < 1024:
            return f"{value:.{digits}f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


_UNITS = {
    "": 1, "b": 1,
    "k": 1 << 10, "kib": 1 << 10, "kb": 10**3,
    "m": 1 << 20, "mib": 1 << 20, "mb": 10**6,
    "g": 1 << 30, "gib": 1 << 30, "gb": 10**9,
    "t": 1 << 40, "tib": 1 << 40, "tb": 10**12,
}  # fmt: skip


def parse_bytes(text: str) -> int:
    """Parse a memory size: ``"12GiB"``, ``"12 GB"`` (10^9), ``"800MiB"``, ``"1.5G"`` (binary), ``"1024"``.
    The number takes Python's float syntax (``"1e-3GiB"``, ``"2.e3"``, ``".5G"``), without ``inf`` and ``nan``.

    Raises:
        ValueError: naming the accepted units, for anything else (``"12XB"``, ``""``, ``"-1GiB"``).
    """
    m = re.fullmatch(r"\s*([-+]?)((?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(3).lower() if m else None
    if m is None or unit not in _UNITS:
        raise ValueError(
            f"cannot parse memory size {text!r}; expected a number and a unit such as 12GiB, 800MiB, "
            "16GB or 1.5G (binary: K/KiB, M/MiB, G/GiB, T/TiB; decimal: KB, MB, GB, TB)"
        )
    if m.group(1) == "-":  # "-1GiB", "-0"
        raise ValueError(f"memory size must be at least 1 byte, got {text!r}")
    approx = float(m.group(2)) * _UNITS[unit]  # bounds the exponent before the exact arithmetic below
    if not math.isfinite(approx) or approx >= 1 << 80:  # "1e400": float overflow; beyond any machine
        raise ValueError(f"memory size {text!r} is too large")
    if approx < 0.5:  # "1e-999999999": Fraction would build 10**999999999 first; well under a byte in any case
        raise ValueError(f"memory size must be at least 1 byte, got {text!r}")
    # exact decimal arithmetic: in floats "8.2GB" is 8199999999 bytes and "9007199254740993" loses its last digit
    value = fractions.Fraction(m.group(2)) * _UNITS[unit]
    if value < 1:  # "0", and fractions of a byte ("0.5")
        raise ValueError(f"memory size must be at least 1 byte, got {text!r}")
    return int(value)  # whole bytes, rounded down ("1.5" is 1)


# ------------------------------------------------------------------------------------------------
# The tracker


def _storage(t: torch.Tensor) -> torch.UntypedStorage | None:
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse, nested, storage-less wrapper subclasses
        return None


_SPARSE_PARTS = {  # layout -> the tensors that hold a sparse tensor's memory
    torch.sparse_coo: ("_indices", "_values"),
    torch.sparse_csr: ("crow_indices", "col_indices", "values"),
    torch.sparse_csc: ("ccol_indices", "row_indices", "values"),
    torch.sparse_bsr: ("crow_indices", "col_indices", "values"),
    torch.sparse_bsc: ("ccol_indices", "row_indices", "values"),
}


def _storages(t: torch.Tensor) -> list[torch.UntypedStorage]:
    """The storages that hold ``t``'s memory: its own, or a sparse tensor's indices and values (which have no
    storage of their own; a sparse gradient, ``nn.Embedding(..., sparse=True)``, went uncounted)."""
    parts = _SPARSE_PARTS.get(t.layout)
    if parts is not None:
        try:
            out = [st for st in (_storage(getattr(t, name)()) for name in parts) if st is not None]
        except (RuntimeError, NotImplementedError, AttributeError):  # (a subclass that says sparse, without the parts)
            pass
        else:
            return out
    st = _storage(t)
    return [] if st is None else [st]


def storage_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (each storage once; ``None`` skipped)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is None:
            continue
        for st in _storages(t):
            seen[st._cdata] = st.nbytes()
    return sum(seen.values())


class MemoryTracker(TorchDispatchMode):
    """Tracks live tensor storages through the dispatcher; ``peak`` is the exact live-tensor peak.

    Every operator output whose storage is new is counted (once, by ``nbytes``) until the storage is
    freed, which a weak reference's callback reports. Tensors that existed before the tracker was entered
    (parameters, buffers, the input) must be registered with :meth:`track`. Works on any device and with
    ``FakeTensorMode`` as the outer context (then nothing is allocated: an estimate). Operators run in
    autograd's backward are seen too: the backward engine carries the dispatch mode to its threads.

    Example::

        tracker = MemoryTracker()
        tracker.track([*model.parameters(), *model.buffers(), x])
        with tracker:
            model(x).sum().backward()
        print(format_mib(tracker.peak))
    """

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, int] = {}  # storage key -> nbytes
        self._refs: dict[int, weakref.ref] = {}
        self._born: dict[int, int] = {}  # storage key -> allocation sequence number (0: tracked)
        self._claimed: dict[int, int] = {}  # storage key -> nbytes the real CPU kernel allocates (see _cpu_nbytes)
        self.current = 0
        self.peak = 0
        self.num_allocations = 0
        self.peak_seq = 0  # num_allocations when the peak was reached

    # -- bookkeeping
    def _add(self, st: torch.UntypedStorage, key: int, nbytes: int, seq: int) -> None:
        self._live[key] = nbytes
        self._born[key] = seq
        self._refs[key] = weakref.ref(st, functools.partial(self._on_free, key))
        self.current += nbytes
        if self.current > self.peak:
            self.peak = self.current
            self.peak_seq = self.num_allocations

    def _on_free(self, key: int, _ref: Any = None) -> None:
        nbytes = self._live.pop(key, None)
        if nbytes is not None:
            self.current -= nbytes
            self._refs.pop(key, None)
            self._born.pop(key, None)
            self._claimed.pop(key, None)

    def track(self, tensors: Iterable[torch.Tensor | None] | torch.Tensor | nn.Module) -> int:
        """Count ``tensors`` (or a module's parameters and buffers) as live from now until they are freed.

        Returns the bytes newly counted (storages already tracked add nothing).
        """
        if isinstance(tensors, nn.Module):
            tensors = [*tensors.parameters(), *tensors.buffers()]
        elif isinstance(tensors, torch.Tensor):
            tensors = [tensors]
        before = self.current
        for t in tensors:
            if t is None:
                continue
            for st in _storages(t):
                if st._cdata not in self._live:
                    self._add(st, st._cdata, st.nbytes(), 0)
        return self.current - before

    def reset_peak(self) -> None:
        """Start a new peak window at the current live total."""
        self.peak = self.current
        self.peak_seq = self.num_allocations

    def is_live(self, t: torch.Tensor) -> bool:
        """Whether ``t``'s storage is being counted (a sparse tensor's: all of its parts')."""
        sts = _storages(t)
        return bool(sts) and all(st._cdata in self._live for st in sts)

    def bytes_live_at_peak(self, tensors: Iterable[torch.Tensor | None]) -> int:
        """Of the storages behind ``tensors`` that are live now, the bytes that were already live at the peak.

        A storage live now that was allocated before the peak was reached was live at the peak too.
        """
        total: dict[int, int] = {}
        for t in tensors:
            for st in [] if t is None else _storages(t):
                key = st._cdata
                born = self._born.get(key)
                if born is not None and born <= self.peak_seq:
                    total[key] = self._live[key]
        return sum(total.values())

    # -- the dispatch hook
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        input_keys: set[int] | None = None
        claims = _cpu_nbytes(func, args, kwargs, out)
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            sparse = t.layout in _SPARSE_PARTS
            for st in _storages(t):  # (a sparse tensor's indices and values)
                key = st._cdata
                if claims is not None and id(t) in claims and key not in self._live:
                    self._claimed[key] = claims[id(t)]
                nbytes = self._claimed.get(key, st.nbytes())
                known = self._live.get(key)
                if known is not None:
                    if known != nbytes:  # storage resized (resize_, out= arguments)
                        self._live[key] = nbytes
                        self.current += nbytes - known
                        if self.current > self.peak:
                            self.peak = self.current
                            self.peak_seq = self.num_allocations
                    continue
                if input_keys is None:
                    input_keys = {sa._cdata for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor) for sa in _storages(a)}
                if key in input_keys and not sparse:
                    # a view of, or in-place result on, a tensor we were not asked to count. (Not for a sparse
                    # result: an in-place sparse op, a sparse .grad accumulated with +=, gives its input new
                    # indices and values, which are new memory; those it shares with a tensor counted are live.)
                    continue
                self.num_allocations += 1
                self._add(st, key, nbytes, self.num_allocations)
        return out


_REDUCED_FLOATS = (torch.bfloat16, torch.float16)
_aten = torch.ops.aten
_NORMS = {  # op: (names of its leading arguments, the parameters among them)
    _aten.native_batch_norm.default: (("input", "weight", "bias", "running_mean", "running_var", "training"),
                                      ("weight", "bias", "running_mean", "running_var")),
    _aten.native_layer_norm.default: (("input", "normalized_shape", "weight", "bias"), ("weight", "bias")),
    _aten.native_group_norm.default: (("input", "weight", "bias"), ("weight", "bias")),
}  # fmt: skip
# losses whose CPU kernel reduces (mean, sum) into a 0-d view of the elementwise loss it computed first, whose
# storage stays as large as the (broadcast) input as long as the loss lives, through backward
_ELEMENTWISE_REDUCED_LOSSES = frozenset(
    (_aten.mse_loss.default, _aten.smooth_l1_loss.default, _aten.soft_margin_loss.default, _aten.binary_cross_entropy.default)
)


def _cpu_nbytes(func: Any, args: Sequence[Any], kwargs: dict[str, Any] | None, out: Any) -> dict[int, int] | None:
    """Where a meta or fake-CPU kernel's outputs differ in size from what the real CPU kernel allocates:
    ``{id(output): CPU nbytes}``; ``None`` elsewhere (almost always).

    The normalisations' saved statistics (``native_batch_norm``, as every ``nn.BatchNorm2d`` runs on CPU;
    ``native_layer_norm``, ``native_group_norm``): the CPU kernels (torch 2.14.1, checked against them) make
    them fp32 when a bf16/fp16 input meets fp32 parameters (autocast over an fp32 model) and else the
    input's dtype, and BatchNorm's ``C`` elements in training, none in eval. The meta kernels make BatchNorm's
    and LayerNorm's fp32 and BatchNorm's ``C`` long in eval too, the fake kernels make all of them the input's
    dtype, so that estimates of a bf16 DenseNet on meta came out 4 bytes per BatchNorm channel high, and fake
    estimates under bf16 autocast 4 bytes per channel low (16 bytes for a 4-channel BatchNorm). Fake CUDA
    tensors are left alone: the CUDA kernels' rules are not checked here.

    The reduced losses of ``_ELEMENTWISE_REDUCED_LOSSES`` (``F.mse_loss(out, target)``, the default mean, or
    a sum): the CPU kernels compute the elementwise loss and return the reduction as a 0-d view of it, so the
    result's storage holds one value per element of the broadcast input (one at least, for an empty input),
    where the meta and fake kernels make a 0-d tensor of one (a DenseNet-scale output's worth low, 14 % of a
    small model's peak in a probe's case).

    Not corrected: for a bf16/fp16 input with fp32 parameters (``nn.GroupNorm`` under autocast),
    ``native_group_norm_backward``'s meta and fake kernels return an fp32 input gradient, which autograd
    then casts to the input's dtype, where the CPU kernel returns the input's dtype at once; an estimate
    may count that extra fp32 gradient (at most 4 bytes per element of the GroupNorm's input).
    """
    if func in _ELEMENTWISE_REDUCED_LOSSES:
        if not isinstance(out, torch.Tensor) or out.dim() or len(args) < 2 or not _claims_cpu(out):
            return None
        numel = math.prod(torch.broadcast_shapes(args[0].shape, args[1].shape))
        return {id(out): max(numel, 1) * out.dtype.itemsize}
    spec = _NORMS.get(func)
    if spec is None or not isinstance(out, (tuple, list)) or len(out) != 3 or not _claims_cpu(out[0]):
        return None
    names, param_names = spec
    bound = dict(zip(names, args))
    bound.update(kwargs or {})
    inp = bound["input"]
    mixed = inp.dtype in _REDUCED_FLOATS and any(
        bound.get(name) is not None and bound[name].dtype == torch.float32 for name in param_names
    )
    itemsize = (torch.float32 if mixed else inp.dtype).itemsize
    if func is _aten.native_batch_norm.default:
        numel = inp.shape[1] if bound.get("training") else 0
        return {id(out[1]): numel * itemsize, id(out[2]): numel * itemsize}
    return {id(t): t.numel() * itemsize for t in out[1:]}


def _claims_cpu(t: torch.Tensor) -> bool:
    """A meta tensor (meta estimates stand for the CPU) or a fake tensor on the CPU."""
    return t.device.type == "meta" or (_is_fake(t) and t.fake_device.type == "cpu")


# ------------------------------------------------------------------------------------------------
# One training step


@dataclasses.dataclass
class StepMemory:
    """Memory of one training step (forward, loss, backward), in bytes.

    Attributes:
        peak: the training-step peak (see the module docstring). On CUDA the allocator's
            ``max_memory_allocated()``; elsewhere the tracker's exact peak.
        params: parameters (distinct storages).
        buffers: buffers (BatchNorm running statistics).
        input: the input batch.
        grads: the parameters' ``.grad`` tensors at the end of backward.
        grads_at_peak: the part of ``grads`` already allocated when the peak was reached.
        activations: ``peak - params - buffers - input - grads_at_peak``: saved activations, temporaries,
            activation gradients and workspaces live at the peak.
        mode: ``"exact"`` (tracked on CPU), ``"estimate"`` (tracked under FakeTensorMode) or ``"cuda"``.
        device: the device the step ran on, or stood for: ``"cpu"`` for a step on ``meta`` tensors (whose
            estimate is the CPU's, as ``estimate_step(backend="meta")`` and ``"auto"`` make it), the fake
            tensors' device for a fake estimate.
        tracked_peak: the tracker's peak (equal to ``peak`` except on CUDA).
        baseline: live bytes before the forward pass (CUDA: ``memory_allocated()``; else tracked bytes).
        workspace: memory in ``peak`` that no tensor owns: CUDA libraries' workspaces. Measured on CUDA:
            what the allocator held before the step beyond parameters, buffers and input (the cuBLAS and
            cuBLASLt workspaces that the warm-up step left, plus anything else already on the device).
            In a fake-CUDA estimate: :func:`cuda_library_workspace`, modelled and added to the tracked
            peak. Zero elsewhere.

    ``peak_mib`` gives the peak in MiB, :meth:`as_dict` every field (with a ``*_mib`` companion of each byte
    field), and ``str()`` a one-line summary: the peak and its parts, which add up to it (``grads`` there is
    ``grads_at_peak``).
    """

    peak: int
    params: int
    buffers: int
    input: int
    grads: int
    grads_at_peak: int
    activations: int
    mode: str
    device: str
    tracked_peak: int
    baseline: int
    workspace: int = 0

    @property
    def peak_mib(self) -> float:
        """``peak`` in MiB (2**20 bytes)."""
        return mib(self.peak)

    def as_dict(self) -> dict[str, Any]:
        """Plain dict with bytes and, for each byte field, a ``*_mib`` companion."""
        d = dataclasses.asdict(self)
        for name in ("peak", "params", "buffers", "input", "grads", "grads_at_peak", "activations", "tracked_peak",
                     "baseline", "workspace"):
            d[f"{name}_mib"] = round(mib(d[name]), 3)
        return d

    def __str__(self) -> str:
        return (
            f"peak {format_mib(self.peak)} ({self.mode}, {self.device}): params {format_mib(self.params)}, "
            f"grads {format_mib(self.grads_at_peak)}, buffers {format_mib(self.buffers)}, input {format_mib(self.input)}, "
            f"activations {format_mib(self.activations)}"
            # (the parts of the peak, which add up to it: the gradients live at the peak, not all of them)
        )


def _loss(out: Any, loss: str | Callable[[Any], torch.Tensor]) -> torch.Tensor:
    if callable(loss):
        return loss(out)
    if loss == "sum":  # every floating-point tensor the model returns (a tuple, list or dict of them too)
        # (before: a tuple's first item alone, so the backward of what fed the others, a second head or a
        # skip output, was not run or counted)
        outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
        if not outputs:
            raise TypeError(
                f"loss='sum' needs the model to return floating-point tensors (alone, or in a tuple, list or dict), "
                f"got {type(out).__name__}; pass loss=<callable> that reduces the output to a scalar"
            )
        total = outputs[0].float().sum()  # (not sum(...), whose int start added a tensor to every step)
        for t in outputs[1:]:
            total = total + t.float().sum()
        return total
    if isinstance(out, (tuple, list)) and out:  # e.g. Inception-style aux outputs: the main one is classified
        out = out[0]
    if loss == "cross_entropy" and not isinstance(out, torch.Tensor):
        raise TypeError(
            f"loss={loss!r} needs the model to return a tensor (or a tuple/list whose first item is one), got "
            f"{type(out).__name__}; pass loss=<callable> that reduces the output to a scalar, e.g. "
            "lambda out: out['logits'].sum()"
        )
    if loss == "cross_entropy":
        if out.dim() != 2:
            raise ValueError(f"loss='cross_entropy' needs (N, classes) outputs, got shape {tuple(out.shape)}; use loss='sum'")
        target = torch.randint(0, out.shape[1], (out.shape[0],), device=out.device)
        return F.cross_entropy(out, target)
    raise ValueError(f"unknown loss {loss!r}; expected 'cross_entropy', 'sum' or a callable")


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    if dtype not in (torch.bfloat16, torch.float16):  # torch.autocast would warn and run in fp32
        raise ValueError(f"autocast_dtype must be torch.bfloat16, torch.float16, torch.float32 or None, got {dtype!r}")
    return torch.autocast(device_type=device.type, dtype=dtype)


def training_step(
    model: nn.Module,
    x: torch.Tensor,
    *,
    autocast_dtype: torch.dtype | None = None,
    loss: str | Callable[[Any], torch.Tensor] = "cross_entropy",
) -> None:
    """One forward (under autocast if asked), loss and backward; no optimizer step. Grads are accumulated.

    Raises:
        TypeError: ``loss`` (a callable) returned something other than a one-element floating-point tensor.
        ValueError: the loss does not require grad, so there would be no backward pass to run.
    """
    with _autocast(x.device, autocast_dtype):
        out = model(x)
        value = _loss(out, loss)
    del out
    _check_loss_value(value, loss)
    value.backward()


def _check_loss_value(value: Any, loss: Any) -> None:
    what = "the loss callable" if callable(loss) else f"loss={loss!r}"
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"loss: expected {what} to return a scalar tensor, got {type(value).__name__}")
    if value.numel() != 1 or not value.is_floating_point():
        raise TypeError(
            f"loss: expected {what} to return a scalar floating-point tensor, got a {value.dtype} tensor of shape "
            f"{tuple(value.shape)}" + ("; reduce it, e.g. lambda out: out.sum()" if value.numel() != 1 else "")
        )
    if not value.requires_grad:
        raise ValueError(
            f"loss: the value of {what} does not require grad, so there is no backward pass to measure: the model "
            "has no parameters that require grad and the input does not require grad, or the loss was detached"
        )


def _input_shape(shape: Any) -> tuple[int, ...]:
    """``shape`` as a tuple of positive ints, or a ``ValueError`` that shows it."""
    dims = None if isinstance(shape, (str, bytes)) else shape
    try:
        dims = tuple(operator.index(d) for d in dims)  # ints only: 2.5 or "2" are not sizes
    except TypeError:
        dims = None
    if not dims or any(d < 1 for d in dims) or any(isinstance(d, bool) for d in shape):  # (True is not a size)
        several = "measure a wrapper module whose forward builds the others from the one input (or holds them as buffers)"
        if isinstance(shape, dict):  # (the message showed the tensors' values)
            what = "pass the tensor itself" if len(shape) == 1 else f"for a model whose forward takes several, {several}"
            raise ValueError(f"a step takes one input (a shape or a tensor), got a dict of {len(shape)}: {what}")
        parts = list(shape) if isinstance(shape, (tuple, list)) else []
        if parts and all(isinstance(d, (tuple, list)) or (isinstance(d, torch.Tensor) and d.dim() > 0) for d in parts):
            if len(parts) == 1:  # (one tensor or shape in a tuple or list: the message showed its values)
                raise ValueError(
                    f"a step takes one input (a shape or a tensor), got a {type(shape).__name__} holding one: pass "
                    f"the {'tensor' if isinstance(parts[0], torch.Tensor) else 'shape'} itself"
                )
            raise ValueError(  # (several inputs: the message showed their values, and said nothing of the limit)
                f"a step takes one input (a shape or a tensor), got {len(shape)}: for a model whose forward takes several, {several}"
            )
        shown = repr(shape) if len(repr(shape)) <= 200 else f"{repr(shape)[:200]}... ({type(shape).__name__})"
        raise ValueError(f"input shape must be a sequence of positive ints such as (64, 3, 32, 32), got {shown}")
    return dims


def _prepare(
    model: nn.Module,
    input_shape_or_tensor: Sequence[int] | torch.Tensor,
    device: torch.device | str | None,
    channels_last: bool,
) -> tuple[nn.Module, torch.Tensor]:
    if isinstance(input_shape_or_tensor, torch.Tensor):
        x = input_shape_or_tensor
        if not x.numel():  # as a shape with a 0 is refused
            raise ValueError(f"the input has no elements (shape {tuple(x.shape)}); a training step needs a batch of at least 1")
        if device is not None:
            x = x.to(device)
        else:
            _check_same_device(model, x)
        if _storage_is_not_its_own(x):
            # a batch sliced from a larger tensor (x = dataset[:8]): the step's input is the batch, not the
            # dataset behind it, which the tracker counted whole (an estimate, made from the shape, does not);
            # and a broadcast one (x = row.expand(8, -1)), whose storage holds one row: counted as that row
            x = x.clone(memory_format=torch.contiguous_format)
        if not x.is_leaf:
            # the step's own leaf (a tensor computed from others, or the copy made above): its backward stops at
            # the input, as a leaf input's does, instead of running on into the caller's graph (whose leaves'
            # .grad it changed, and whose backward it counted); an estimate's input is a leaf too
            x = x.detach().requires_grad_(input_shape_or_tensor.requires_grad)
    else:
        shape = _input_shape(input_shape_or_tensor)
        if device is None:
            device = _model_device(model)
        x = torch.randn(shape, device=device, dtype=_model_dtype(model))
    if channels_last and x.dim() != 4:
        raise ValueError(f"channels_last=True needs a 4-D input (N, C, H, W), got shape {tuple(x.shape)}")
    tensors = [*model.parameters(), *model.buffers()]
    if device is not None and any(t.device != x.device for t in tensors):
        if x.device.type == "meta":
            raise ValueError(
                "device='meta' would move the model's parameters to the meta device, discarding their values; "
                "estimate_step(model, ..., backend='meta') estimates on a meta copy and leaves the model alone"
            )
        model.to(x.device)
    if channels_last:
        _to_channels_last(model)
        x = x.contiguous(memory_format=torch.channels_last)
    model.train()
    model.zero_grad(set_to_none=True)
    return model, x


def _check_same_device(model: nn.Module, x: torch.Tensor) -> None:
    """Without ``device=``, an input on another device than all of the model's tensors is named here (PyTorch's
    own error comes from deep inside the first layer, naming neither)."""
    devices = {t.device for t in (*model.parameters(), *model.buffers())}
    if len(devices) == 1 and x.device not in devices and not _is_fake(x):
        (where,) = devices
        hint = (
            "; a meta input has no values to step on: estimate with estimate_step(model, x.shape, backend='meta')"
            if x.device.type == "meta" else f"; pass device={str(x.device)!r} (the model is moved there) or move the input"
        )
        raise ValueError(f"the input is on {x.device} and the model on {where}{hint}")


def _storage_is_not_its_own(x: torch.Tensor) -> bool:
    """Whether ``x``'s storage holds other bytes than ``x``'s elements: more (a view into a larger tensor) or
    fewer (a broadcast view, ``expand``: elements sharing storage). The step's input is then a batch of its own."""
    storage = _storage(x)
    return storage is not None and not _is_fake(x) and x.device.type != "meta" and storage.nbytes() != x.numel() * x.element_size()


def _model_device(model: nn.Module) -> torch.device:
    """Where a step on ``model`` runs by default: its first parameter's device (the CPU without any)."""
    ref = next(iter(model.parameters()), None)
    return ref.device if ref is not None else torch.device("cpu")


def _model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of an input made from a shape: the model's first floating-point parameter's (or buffer's),
    so that an fp64 or bf16 model gets an input it can take; the default dtype for a model without any."""
    for t in (*model.parameters(), *model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.get_default_dtype()


def _to_channels_last(model: nn.Module) -> None:
    """``model.to(memory_format=torch.channels_last)``, fake models included: ``Module._apply`` replaces a
    tensor subclass's parameters with ``torch.utils.swap_tensors``, which fails on fake tensors (their mode
    holds weak references to them), so those are converted as ``_apply`` converts plain ones."""
    if not any(_is_fake(t) for t in [*model.parameters(), *model.buffers()]):
        model.to(memory_format=torch.channels_last)
        return
    for mod in model.modules():
        for p in mod._parameters.values():
            if p is not None and p.dim() == 4:
                p.data = p.data.contiguous(memory_format=torch.channels_last)
        for name, b in mod._buffers.items():
            if b is not None and b.dim() == 4:
                mod._buffers[name] = b.contiguous(memory_format=torch.channels_last)


def _breakdown(
    model: nn.Module, x: torch.Tensor, tracker: MemoryTracker, peak: int, mode: str, baseline: int, workspace: int = 0
) -> StepMemory:
    """The step's breakdown; ``workspace``: the modelled one of a fake-CUDA estimate (measured on CUDA here)."""
    params = list(model.parameters())
    grads = [p.grad for p in params]
    n_params = storage_bytes(params)
    n_buffers = storage_bytes([*params, *model.buffers()]) - n_params  # (a buffer in a parameter's storage: once)
    n_input = storage_bytes([x])
    n_grads = storage_bytes(grads)
    grads_at_peak = tracker.bytes_live_at_peak(grads)
    if mode == "cuda":  # the tracker's peak is not the allocator's peak: assume every grad was live
        grads_at_peak = n_grads
        # what the allocator held before the step beyond the model and input: library workspaces
        workspace = max(0, baseline - n_params - n_buffers - n_input)
    return StepMemory(
        peak=int(peak),
        params=n_params,
        buffers=n_buffers,
        input=n_input,
        grads=n_grads,
        grads_at_peak=grads_at_peak,
        activations=int(peak) - n_params - n_buffers - n_input - grads_at_peak,
        mode=mode,
        device="cpu" if x.device.type == "meta" else str(x.device),  # (meta stands for the CPU: _claims_cpu)
        tracked_peak=tracker.peak,
        baseline=int(baseline),
        workspace=int(workspace),
    )


def measure_step(
    model: nn.Module,
    input_shape_or_tensor: Sequence[int] | torch.Tensor,
    *,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    loss: str | Callable[[Any], torch.Tensor] = "cross_entropy",
    warmup: int | None = None,
    keep_grads: bool = False,
    tracked: bool = True,
) -> StepMemory:
    """Peak memory of one training step of ``model`` (forward, loss, backward; no optimizer step).

    The model is put in training mode for the step (each module's train/eval flag is restored afterwards),
    moved to ``device`` (if given) and its ``.grad`` tensors are dropped first; the step updates BatchNorm
    running statistics as training does. It runs with autograd on (also under ``torch.no_grad()``; inside
    ``torch.inference_mode()`` it raises), leaves the global RNG states (CPU, and the CUDA device it runs
    on) as they were (it restores them: another thread drawing from them during the step draws numbers again),
    and leaves an input tensor's ``.grad`` as it was. On CUDA the number is
    the allocator's ``max_memory_allocated()`` (after ``warmup`` steps, default 1, so that one-time
    library workspaces are not in it); elsewhere the exact tracked peak (``warmup`` default 0). Called
    under ``FakeTensorMode`` with a fake model it returns the estimate (see :func:`estimate_step`).

    Args:
        model: the module to step.
        input_shape_or_tensor: an input tensor, or its shape (filled with ``torch.randn`` in the dtype of
            the model's floating-point parameters). A tensor that is a view into a larger one (a batch sliced
            from a dataset) is stepped on as a copy of itself, so the storage behind it is not counted.
        device: where to run; default: where the model's parameters are. Not ``"meta"`` for a model with
            data (its values would be lost): estimate with :func:`estimate_step` instead.
        autocast_dtype: ``torch.bfloat16``/``torch.float16`` to run forward and loss under autocast;
            ``None`` or ``torch.float32`` for plain fp32. Backward runs outside autocast, as in PyTorch's AMP
            recipe; an autocast context around this call covers backward too (its cache of cast weights lives
            until the context exits) and can give a slightly different peak.
        channels_last: convert model and input to ``torch.channels_last``.
        loss: ``"cross_entropy"`` against random labels (of the first output, for a model returning a
            tuple or list), ``"sum"`` of the outputs (every floating-point tensor in a tuple, list or dict the
            model returns), or a callable taking the model's output and returning a scalar tensor that requires
            grad.
        warmup: untracked steps run first (their grads dropped): an int >= 0.
        keep_grads: leave the step's ``.grad`` tensors on the model (default: set them to ``None``).
        tracked: on CUDA, also run the tracker (``tracked_peak``, ``grads_at_peak``); turn it off for
            ``torch.compile``d models, which a dispatch mode would push back to eager execution.
    """
    if not isinstance(model, nn.Module):
        hint = " (build it with effdense.get_model(name), or estimate by name with estimate_step)" if isinstance(model, str) else ""
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}{hint}")
    _check_flags(channels_last=channels_last, keep_grads=keep_grads, tracked=tracked)
    if torch.is_inference_mode_enabled():
        raise RuntimeError(_in_inference_mode("measure_step"))
    _check_initialised(model, "measure_step")
    if device is not None:
        dev = _parse_device(device)
        if dev.type not in ("cpu", "cuda", "meta"):  # before: PyTorch's bare AssertionError for xpu, mps, ...
            raise ValueError(f"device={device!r}: effdense measures on 'cpu', 'cuda' (or 'meta' for estimates)")
        if dev.type == "cuda" and not torch.cuda.is_available():  # before: PyTorch's "Found no NVIDIA driver" at the first .to()
            raise ValueError(
                f"device={device!r} needs a CUDA device and driver, and this machine has none; measure with device='cpu'"
            )
    given = input_shape_or_tensor if isinstance(input_shape_or_tensor, torch.Tensor) else None
    if not tracked:  # (refused before anything runs: checked after the warm-up steps, it left their BatchNorm updates)
        where = device if device is not None else given.device if given is not None else _model_device(model)
        if _fake_mode_active() or _parse_device(where).type != "cuda":  # (where _prepare runs the step)
            raise ValueError(_TRACKED_FALSE)
    if warmup is not None:
        try:  # any integer (a numpy one too), but not a bool
            steps = -1 if isinstance(warmup, bool) else operator.index(warmup)
        except TypeError:
            steps = -1
        if steps < 0:
            raise ValueError(f"warmup: expected a number of steps >= 0 or None, got {warmup!r}")
        warmup = steps
    modes = [(m, m.training) for m in model.modules()]
    # a leaf input tensor that the step runs on as it is keeps its .grad (set aside for the step, as the model's
    # grads are dropped: the step allocates its own, then it comes back); an input computed from others, and
    # a copy (to another device, of a view), is stepped on as a leaf of the step's own (see _prepare)
    given = given if given is not None and given.is_leaf and given.requires_grad else None
    given_grad = given.grad if given is not None else None
    if given_grad is not None:
        given.grad = None
    with contextlib.ExitStack() as stack:
        if not _fake_mode_active():  # the step's random input, labels and dropout leave the caller's RNG state alone
            stack.enter_context(torch.random.fork_rng(devices=_cuda_devices(model, device), device_type="cuda"))
        stack.enter_context(torch.enable_grad())  # a training step, also when called under torch.no_grad()
        try:
            return _measure(model, input_shape_or_tensor, device, autocast_dtype, channels_last, loss, warmup, keep_grads, tracked)
        finally:  # the step ran in training mode; the caller's train/eval flags come back
            for m, training in modes:
                m.training = training
            if given is not None:
                given.grad = given_grad


_LAZY_HINT = (
    "has lazy modules ({names}) whose parameters are not made yet (they are at the first forward): run one forward "
    "pass first, e.g. model(x), then measure"
)


def _check_initialised(model: nn.Module, caller: str) -> None:
    """Refuse a model with uninitialised lazy parameters (``nn.LazyLinear`` before its first forward), which
    PyTorch's errors named only as an 'uninitialized parameter' in a method of effdense's."""
    from torch.nn.parameter import is_lazy

    lazy = sorted({
        type(m).__name__ for m in model.modules()
        if any(is_lazy(t) for t in (*m._parameters.values(), *m._buffers.values()) if t is not None)
    })
    if lazy:
        raise ValueError(f"{caller}: the model " + _LAZY_HINT.format(names=", ".join(lazy)))


def _in_inference_mode(caller: str) -> str:
    return (
        f"{caller}: called inside torch.inference_mode(); a training step needs autograd (and inference tensors "
        "cannot be saved for backward): call it outside inference_mode"
    )


_TRACKED_FALSE = "tracked=False only makes sense on CUDA, where the allocator measures the peak"


def _check_flags(**flags: Any) -> None:
    """Each named on/off argument is a bool: a string such as ``"no"`` is true, and silently kept the gradients
    or converted the model to channels_last (as :class:`effdense.Policy` refuses its fields)."""
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name}: expected a bool (True or False), got {type(value).__name__} {value!r}")


def _fake_mode_active() -> bool:
    from torch._guards import detect_fake_mode

    return detect_fake_mode() is not None


def _cuda_devices(model: nn.Module, device: Any) -> list[int]:
    """The CUDA devices whose RNG a step on ``model`` (moved to ``device``, if given) draws from."""
    if not torch.cuda.is_available():
        return []
    dev = torch.device(device) if device is not None else _model_device(model)
    if dev.type != "cuda":
        return []
    return [dev.index if dev.index is not None else torch.cuda.current_device()]


def _measure(model, input_shape_or_tensor, device, autocast_dtype, channels_last, loss, warmup, keep_grads, tracked) -> StepMemory:
    model, x = _prepare(model, input_shape_or_tensor, device, channels_last)
    try:
        return _measure_steps(model, x, autocast_dtype, loss, warmup, keep_grads, tracked)
    except BaseException:
        # a step that failed in backward (out of memory, say, under a batch-size search) left the gradients of
        # half a backward: gone, as a finished step's are (a training loop that steps before zero_grad would
        # fold them into its first update). (An argument refused before any step leaves the caller's alone.)
        model.zero_grad(set_to_none=True)
        raise


def _measure_steps(model, x, autocast_dtype, loss, warmup, keep_grads, tracked) -> StepMemory:
    is_cuda = x.device.type == "cuda"
    fake = _is_fake(x)
    for _ in range(1 if warmup is None and is_cuda and not fake else (warmup or 0)):
        training_step(model, x, autocast_dtype=autocast_dtype, loss=loss)
        model.zero_grad(set_to_none=True)
    tracker = MemoryTracker()
    tracker.track(model)
    tracker.track(x)
    if not tracked and not (is_cuda and not fake):  # (fake tensors outside a fake mode: not refused before)
        raise ValueError(_TRACKED_FALSE)
    if is_cuda and not fake:
        torch.cuda.synchronize(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
        baseline = torch.cuda.memory_allocated(x.device)
    else:
        baseline = tracker.current
    # autocast keeps its weight casts until the outermost autocast exits: inside a caller's open autocast, a
    # second measurement found the first's casts there, untracked, and measured less (27,096 against 32,620 bytes
    # for a small MLP); a step's own casts are part of its peak, and each measurement makes them anew
    torch.clear_autocast_cache()
    with tracker if tracked else contextlib.nullcontext():
        training_step(model, x, autocast_dtype=autocast_dtype, loss=loss)
    workspace = 0
    if is_cuda and not fake:
        torch.cuda.synchronize(x.device)
        peak, mode = torch.cuda.max_memory_allocated(x.device), "cuda"
    else:
        peak, mode = tracker.peak, ("estimate" if fake or x.device.type == "meta" else "exact")
        if fake and is_cuda:  # the allocator would also hold the math libraries' workspaces
            workspace = cuda_library_workspace(x.device)
            peak += workspace
    result = _breakdown(model, x, tracker, peak, mode, baseline, workspace)
    if not keep_grads:
        model.zero_grad(set_to_none=True)
    return result


_CUBLAS_CONFIG = re.compile(r":(\d+):(\d+)")


def _cublas_workspace(capability: tuple[int, int]) -> int:
    """One cuBLAS handle's workspace, as PyTorch sizes it: ``CUBLAS_WORKSPACE_CONFIG`` (``:SIZE:COUNT``
    pairs, SIZE in KiB) if set, else 32 MiB on Hopper (sm90) and 8 MiB + 128 KiB elsewhere."""
    config = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    if config is not None:
        pairs = _CUBLAS_CONFIG.findall(config)
        if pairs:
            return sum(int(size) * int(count) for size, count in pairs) * 1024
    if capability == (9, 0):
        return 4096 * 8 * 1024
    return 4096 * 1024 * 2 + 16 * 1024 * 8


def cuda_library_workspace(device: torch.device | str | int | None = None) -> int:
    """Bytes that PyTorch's CUDA math libraries keep in the caching allocator once a training step has
    run, on ``device``, by PyTorch's defaults (read from its sources around 2.11,
    ``aten/src/ATen/cuda/CublasHandlePool.cpp``; later versions may differ):

    - a cuBLAS workspace per handle, created at a handle's first GEMM and kept: one handle per host thread,
      so two in a training step (the Python thread's forward GEMMs, the autograd engine's device thread's
      backward ones), each 32 MiB on Hopper (sm90) and 8 MiB + 128 KiB elsewhere, or as
      ``CUBLAS_WORKSPACE_CONFIG`` sets;
    - a cuBLASLt workspace (``addmm`` with a bias, as ``nn.Linear``'s forward), ``CUBLASLT_WORKSPACE_SIZE``
      KiB, 1 MiB by default.

    Transient workspaces (cuDNN convolution and BatchNorm) live only inside one operator and are not
    modelled. Fake-CUDA estimates (:func:`estimate_step` with ``device="cuda"``) add this to the tracked
    peak, since ``torch.cuda.max_memory_allocated()`` counts it. An H100 measurement of DenseNet-BC-100
    (torch 2.11) exceeded the tracked peak by 65 MiB for ``shared``, 2 x 32 + 1 by this model.

    ``device``: a CUDA device (``None``: the current one); another device is a ``ValueError`` (its libraries
    keep no such workspace: ``StepMemory.workspace`` is zero there). The device's compute capability is read,
    so CUDA must be available.
    """
    dev = torch.device(device if device is not None else "cuda")
    if dev.type != "cuda":
        raise ValueError(f"cuda_library_workspace: expected a CUDA device, got {dev} (no CUDA library workspace there)")
    index = dev.index
    capability = torch.cuda.get_device_capability(index if index is not None else torch.cuda.current_device())
    try:
        lt_kib = int(os.environ.get("CUBLASLT_WORKSPACE_SIZE", "1024"))
    except ValueError:
        lt_kib = 1024
    return 2 * _cublas_workspace(tuple(capability)) + max(0, lt_kib) * 1024


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


def estimate_step(
    model: str | Callable[[], nn.Module] | nn.Module,
    input_shape: Sequence[int] | torch.Tensor,
    *,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    loss: str | Callable[[Any], torch.Tensor] = "cross_entropy",
    strategy: str | None = None,
    policy: Any = None,
    backend: str = "fake",
    **model_kwargs: Any,
) -> StepMemory:
    """Training-step peak of a configuration, estimated without allocating anything.

    Equal to what :func:`measure_step` measures exactly on CPU for the same configuration: the same
    operators produce storages of the same sizes, only their contents are missing. The model is built
    inside the estimating context, so pass a builder (a name for :func:`effdense.get_model`, or a
    zero-argument callable); an existing module is copied parameter by parameter (its own tensors are
    left alone).

    Two backends give the same number (the tests check it):

    - ``"fake"``: ``FakeTensorMode`` as the outer context, the tracker inside. Tensors claim to be on
      ``device``, so strategies take that device's path. ``"cuda"`` needs a CUDA device and driver (on
      this torch, building modules under fake CUDA initialises the CUDA context) but allocates nothing.
    - ``"meta"``: tensors on the ``meta`` device, tracked the same way. Five to ten times faster (meta
      kernels run in C++, no tensor subclass), which the depth search of ``effdense max-depth`` needs;
      strategies see a non-CUDA device and take their CPU path (every effdense strategy runs on meta;
      other code that queries the device, or reads a value with ``.item()``, may refuse it).
    - ``"auto"``: ``"meta"`` for CPU, falling back to ``"fake"`` where the model cannot run on meta, or where
      meta would count otherwise than the measurement: a model that calls ``scaled_dot_product_attention``
      or ``nn.MultiheadAttention`` (on meta PyTorch takes its math path, the whole attention matrix; the CPU,
      flash attention), that holds an ``nn.EmbeddingBag`` (whose meta kernel claims tensors the CPU's does not
      allocate) or whose parameters and buffers share storage (a meta copy gives each its own);
      ``backend="meta"`` warns of these. ``"fake"`` under autocast (``autocast_dtype``, or a ``torch.autocast`` the caller has open), which
      ``"meta"`` cannot run.

    Args:
        model: model name (``"densenet_bc_100"``), a zero-argument builder, or an ``nn.Module``.
        input_shape: ``(N, C, H, W)``, or a tensor standing for its shape, dtype, memory layout and
            ``requires_grad`` (its values are not read).
            A model given by name is built in a tensor's floating-point dtype (``torch.float64``: an fp64
            model); a module or builder keeps its own, which must take the tensor.
        device: the device fake tensors claim to be on (``backend="fake"`` only): ``"cpu"`` or ``"cuda[:N]"``.
        autocast_dtype: as in :func:`measure_step`.
        channels_last: as in :func:`measure_step`.
        loss: as in :func:`measure_step`.
        strategy: for effdense models, the block strategy (``model.set_strategy``).
        policy: for effdense models, the :class:`effdense.Policy`.
        backend: ``"fake"``, ``"meta"`` or ``"auto"``.
        **model_kwargs: passed to :func:`effdense.get_model` when ``model`` is a name (a ``TypeError`` with a
            module or builder, which are built already or build themselves).
    """
    misplaced = sorted(set(model_kwargs) & {"warmup", "keep_grads", "tracked"})
    if misplaced:  # (measure_step's options; they fell into the model builder's keywords)
        raise TypeError(
            f"estimate_step takes no {', '.join(k + '=' for k in misplaced)}: {'they are' if len(misplaced) > 1 else 'it is'} "
            "measure_step's (an estimate runs one step on tensors without storage: nothing to warm up, keep or track)"
        )
    if backend not in ("fake", "meta", "auto"):
        raise ValueError(f"unknown estimate backend {backend!r}; expected 'fake', 'meta' or 'auto'")
    _check_flags(channels_last=channels_last)
    if torch.is_inference_mode_enabled():  # (before: measure_step's message, which the caller did not call)
        raise RuntimeError(_in_inference_mode("estimate_step"))
    given_device = device
    expected = "the device whose step is estimated, 'cpu' or 'cuda[:N]'"
    device = _parse_device(device, expected)
    if device.type not in ("cpu", "cuda", "meta"):  # "meta" gets its own message below
        raise ValueError(f"device: expected {expected}, got {given_device!r}")
    if device.type == "cpu":  # "cpu:0" is the CPU: tensors report "cpu", and a fake model could not be moved
        device = torch.device("cpu")
    elif device.type == "meta":
        raise ValueError(
            f"device: expected the device whose step is estimated ('cpu' or 'cuda'), got {given_device!r}; for an "
            "estimate on meta tensors pass device='cpu' with backend='meta' (or 'auto')"
        )
    if model_kwargs and not isinstance(model, str):  # before: ignored, the estimate was of the model as given
        kind = "module" if isinstance(model, nn.Module) else "builder" if callable(model) else type(model).__name__
        raise TypeError(
            f"model keyword arguments ({', '.join(model_kwargs)}) apply only to a model name, which they build with "
            f"effdense.get_model; got a {kind}: build it with them"
        )
    if isinstance(input_shape, torch.Tensor):  # stands for its shape and dtype; its values are not read
        shape, in_dtype = tuple(input_shape.shape), input_shape.dtype
    else:  # the dtype of the model's parameters, once it is built
        shape, in_dtype = _input_shape(input_shape), None
    low_precision = autocast_dtype is not None and autocast_dtype != torch.float32
    # an autocast the caller has open runs the step in low precision too (autocast_dtype=None adds none of its
    # own), and meta tensors are outside any autocast: "meta" would estimate an fp32 step
    ambient = device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type)
    if backend == "auto":
        kwargs = dict(
            device=given_device, autocast_dtype=autocast_dtype, channels_last=channels_last, loss=loss,
            strategy=strategy, policy=policy, **model_kwargs,
        )  # fmt: skip
        if device.type == "cpu" and not low_precision and not ambient:  # autocast has no meta device
            strict = _META_STRICT.set(True)
            try:
                return estimate_step(model, input_shape, backend="meta", **kwargs)
            except Exception:  # code that cannot run on meta tensors (autocast queries, .item()), or whose meta
                pass  # estimate would differ from the measurement (_MetaDiffers): fake mode can
            finally:
                _META_STRICT.reset(strict)
        return estimate_step(model, input_shape, backend="fake", **kwargs)
    if backend == "meta":
        if device.type != "cpu":
            raise ValueError(f"backend='meta' cannot pretend to be on {given_device!r}; use backend='fake'")
        if low_precision or ambient:
            what = f"autocast_dtype={autocast_dtype}" if low_precision else "the torch.autocast context that is open here"
            raise ValueError(
                f"backend='meta' cannot run autocast ({what}): autocast has no meta device, so the estimate would be "
                "of an fp32 step; use backend='fake' or 'auto'"
            )
        context: Any = torch.device("meta")
        device = "meta"
        copy_module = _meta_copy
    else:
        from torch._subclasses.fake_tensor import FakeTensorMode

        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(
                f"estimating on device={given_device!r} needs a CUDA device and driver (building modules under fake CUDA "
                "initialises CUDA), and this machine has none; estimate with device='cpu'"
            )
        context = FakeTensorMode(allow_non_fake_inputs=False)
        copy_module = functools.partial(_fake_copy, fake_mode=context, device=device)
    # PyTorch's meta convolution imports torch._dynamo on its first call (torch._compile's disable wrapper): inside
    # the step, the import's frames (held in a reference cycle while the step pauses the garbage collector) kept the
    # step's tensors in their locals alive, and a process's first meta estimate came out a few KB above the rest
    importlib.import_module("torch._dynamo")
    if isinstance(model, nn.Module):
        _check_initialised(model, "estimate_step")
        module = copy_module(model)  # outside the context: the real tensors are read, not faked
    # the model is built on ``device`` from the start: moving fake parameters afterwards is not possible
    with context, torch.device(device), _gc_paused():
        if isinstance(model, str):
            from effdense.densenet import get_model

            with _default_dtype(in_dtype):  # a tensor's dtype is the step's: the named model is built in it
                module = get_model(model, **model_kwargs)
        elif isinstance(model, nn.Module):
            pass
        elif callable(model):
            try:
                module = model()
            except Exception as exc:
                from torch._subclasses.fake_tensor import DataDependentOutputException

                if isinstance(exc, DataDependentOutputException):  # (an initialiser reading values: trunc_normal_)
                    raise RuntimeError(
                        "estimate_step: the model builder reads a tensor's value (an initialiser such as "
                        "nn.init.trunc_normal_ calls .any()/.item()), which fake tensors do not hold; pass the built "
                        "nn.Module (it is copied), or use backend='meta' or 'auto'"
                    ) from exc
                if isinstance(exc, RuntimeError) and "UninitializedParameter" in str(exc):
                    raise RuntimeError(
                        "estimate_step: the model builder makes lazy modules (nn.LazyLinear, ...), whose parameters "
                        "cannot be made under fake tensors; pass the built nn.Module after one forward pass (it is copied)"
                    ) from exc
                if not isinstance(exc, RuntimeError) or "Couldn't swap" not in str(exc):
                    raise
                raise RuntimeError(
                    f"the model builder converted a module ({exc}): the builder runs on fake tensors, whose "
                    ".to()/.double()/.half()/.cuda() PyTorch cannot apply to modules; build the model in the wanted "
                    "dtype (torch.set_default_dtype, dtype=...) or pass the built nn.Module, which is copied"
                ) from exc
        else:
            raise TypeError(f"model must be a name, a builder or an nn.Module, got {type(model).__name__}")
        if not isinstance(module, nn.Module):
            raise TypeError(f"the model builder returned a {type(module).__name__} object, not an nn.Module")
        if strategy is not None or policy is not None:
            _set_strategy(module, strategy, policy)
        recurrent = [type(m).__name__ for m in module.modules() if isinstance(m, nn.RNNBase)]
        if recurrent:
            warnings.warn(
                f"estimate_step: the model has recurrent layers ({', '.join(sorted(set(recurrent)))}), whose fake and "
                "meta kernels claim other sizes than the CPU kernel allocates (an LSTM's far less: its workspace), "
                "so the estimate can be off, low for an LSTM (measure it with measure_step)",
                UserWarning,
                stacklevel=2,
            )
        if any(isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse for m in module.modules()):
            warnings.warn(
                "estimate_step: the model has an embedding with sparse=True, whose sparse gradient the fake and meta "
                "kernels form around a view of the output's gradient, where the CPU kernel allocates its values: the "
                "estimate is low (measure it with measure_step)",
                UserWarning,
                stacklevel=2,
            )
        if backend == "meta" and any(isinstance(m, nn.EmbeddingBag) for m in module.modules()):
            # (torch 2.14.1: mode="sum" 8 bytes per index above the CPU kernel, an offset2bag it does not allocate)
            _meta_caveat("PyTorch's meta kernel of nn.EmbeddingBag claims tensors the CPU kernel does not allocate", 2)
        if in_dtype is None:
            in_dtype = _model_dtype(module)
        if isinstance(input_shape, torch.Tensor) and input_shape.numel() and not _storage_is_not_its_own(input_shape) and (
            _dense(input_shape)  # (a meta or fake view: as a real one's copy)
        ):
            # in its memory layout (channels_last, say), as measure_step steps on it; one that does not own its
            # storage (a view) is stepped on as a contiguous copy (see _prepare). (Before: always contiguous.)
            x = torch.empty_strided(shape, input_shape.stride(), dtype=in_dtype, device=device)
        else:
            x = torch.empty(shape, dtype=in_dtype, device=device)  # fake or meta: no values to fill in
        if isinstance(input_shape, torch.Tensor) and input_shape.requires_grad and x.is_floating_point():
            x.requires_grad_()  # a step that also computes the input's gradient (as measure_step of that tensor)
        attention = _AttentionSeen() if backend == "meta" else contextlib.nullcontext()
        try:
            with attention:
                result = measure_step(
                    module, x, device=device, autocast_dtype=autocast_dtype, channels_last=channels_last, loss=loss, warmup=0
                )
        except Exception as exc:
            _explain_estimate_failure(exc, backend)
            raise
        if getattr(attention, "seen", False):
            _meta_caveat(
                "the model calls scaled_dot_product_attention (or nn.MultiheadAttention), which PyTorch computes on "
                "meta tensors by its math path (the whole attention matrix), where the CPU runs its flash kernel", 2
            )
        return result


def _dense(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements fill its span of memory exactly once (any dimension order: channels_last too)."""
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _set_strategy(module: nn.Module, strategy: str | None, policy: Any) -> None:
    """estimate_step's ``strategy``/``policy`` on the copy: an effdense DenseNet's own, or every dense block's in
    any model built from them (as :func:`effdense.set_strategy`; before, only a DenseNet was taken)."""
    from effdense.densenet import NO_BLOCKS_HINT, DenseNet, _DenseBlock, set_strategy

    if not any(isinstance(m, _DenseBlock) for m in module.modules()):
        raise TypeError(
            f"strategy/policy need a model holding effdense dense blocks, and {type(module).__name__} holds none; "
            + NO_BLOCKS_HINT
        )
    if strategy is not None:
        set_strategy(module, strategy, policy)  # (a DenseNet's own set_strategy too, for every DenseNet held)
    else:  # a policy alone: every DenseNet's and every block's, each block's strategy kept
        for m in module.modules():
            if isinstance(m, (DenseNet, _DenseBlock)):
                m.policy = policy


def _explain_estimate_failure(exc: Exception, backend: str) -> None:
    """Raise, from ``exc``, an error that says why an estimate cannot run a step that ``measure_step`` can,
    where PyTorch's own message names only an internal cause; return for anything else."""
    from torch._subclasses.fake_tensor import DataDependentOutputException

    from torch._subclasses.fake_tensor import DynamicOutputShapeException

    text = str(exc)
    if isinstance(exc, DataDependentOutputException) or "data-dependent" in text.lower() or (
        backend == "meta" and ("cannot be called on meta tensors" in text or "Cannot copy out of meta tensor" in text)
    ):  # (meta's .item(), .tolist())
        why = "the step reads a tensor's value (.item(), .tolist(), a Python branch on a tensor), which an estimate does not have"
    elif isinstance(exc, DynamicOutputShapeException) or (
        backend == "meta" and isinstance(exc, NotImplementedError) and re.search(r"(aten::|torch\.)_?(nonzero|unique|masked_select|repeat_interleave)", text)
    ):
        why = (
            "the step calls an operator whose output's size depends on the values (boolean-mask indexing x[x > 0], "
            "nonzero, unique, masked_select, ctc_loss), which an estimate, having no values, cannot size"
        )
    elif (isinstance(exc, AssertionError) and "convert all Tensors to FakeTensors" in text) or (
        backend == "meta" and isinstance(exc, RuntimeError)
        and re.search(r"device (meta|\S+) is not on the expected device (meta|\S+)", text) and "meta" in text
    ):
        why = (
            f"the step used a tensor that is not a {backend} one, and an estimate computes on {backend} tensors only: "
            "one made outside the estimate (a target captured by the loss callable, a tensor the model holds outside "
            "its parameters and buffers) or on an explicit device; make such tensors in the step, where the output "
            "is (e.g. torch.zeros(n, dtype=torch.long, device=out.device))"
        )
    else:
        return
    raise RuntimeError(f"estimate_step: {why}; measure_step measures it for real ({type(exc).__name__}: {text.splitlines()[0][:150]})") from exc


def _parse_device(device: Any, expected: str = "a device such as 'cpu', 'cuda' or 'cuda:1'") -> torch.device:
    """``torch.device(device)``, or a ``ValueError`` that names the value and ``expected`` (PyTorch's lists
    every device type it knows, most of which effdense never runs on)."""
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device: expected {expected}, got {device!r}") from None


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype | None):
    """``torch.set_default_dtype(dtype)`` for the block, when ``dtype`` is one it takes (fp16, bf16, fp32,
    fp64; else no change): modules build their parameters in it. Under fake tensors a built module cannot be converted
    with ``.to(dtype)``, so the dtype has to be there from the start."""
    if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64) or dtype == torch.get_default_dtype():
        yield
        return
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@contextlib.contextmanager
def _gc_paused():
    """Pause the cyclic garbage collector: a deep model's autograd graph makes its passes quadratic (~25%
    of an estimate's time at 600 layers). Reference counting still frees every tensor on time."""
    import gc

    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class _MetaDiffers(Exception):
    """Raised inside ``backend="auto"``'s meta attempt where a meta estimate would differ from the measurement:
    auto then estimates with fake tensors."""


# set by backend="auto" around its meta attempt: a caveat raises _MetaDiffers there (fake mode is taken instead);
# an explicit backend="meta" warns
_META_STRICT = contextvars.ContextVar("effdense_meta_strict", default=False)


def _meta_caveat(why: str, stacklevel: int) -> None:
    """``stacklevel``: as for :func:`warnings.warn` called in the caller's place."""
    if _META_STRICT.get():
        raise _MetaDiffers(why)
    warnings.warn(
        f"estimate_step(backend='meta'): {why}, so the estimate differs from measure_step's; backend='fake' (or "
        "'auto', which takes it here) estimates such a model as measured",
        UserWarning,
        stacklevel=stacklevel + 1,
    )


class _AttentionSeen(torch.overrides.TorchFunctionMode):
    """Notes a call of ``F.scaled_dot_product_attention``: on meta tensors PyTorch computes it by its math path
    (the whole attention matrix), where the CPU runs its flash kernel: a meta estimate of a transformer was
    ~3x the measured step (torchvision's ViT)."""

    seen = False
    # (nn.MultiheadAttention goes through F.multi_head_attention_forward, whose inner SDPA call the mode does not
    # see: its handler runs with the mode off)
    _ATTENTION = (F.scaled_dot_product_attention, F.multi_head_attention_forward, torch._native_multi_head_attention)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self._ATTENTION:
            self.seen = True
        return func(*args, **(kwargs or {}))


def _meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` on the meta device (ties kept). Tensors that share storage (a buffer in a parameter's
    storage, parameters that are views of one flat tensor) are copied each on its own storage, which a meta
    estimate then counts otherwise than the measurement does: said (:func:`_meta_caveat`)."""
    tensors = [t for t in {id(t): t for t in [*model.parameters(), *model.buffers()]}.values() if t.device.type != "meta"]
    # each tensor's own bytes (what the meta copy holds) against its storages' (what the measurement counts): the
    # same for tensors of their own storage, and for parameters that split one flat tensor exactly
    if sum(t.numel() * t.element_size() for t in tensors) != storage_bytes(tensors):
        _meta_caveat("the model's parameters or buffers share storage (views of one tensor), which its meta copy does not", 3)
    return _fake_copy(model, convert=lambda t: t.detach().to("meta"))


def _fake_copy(
    model: nn.Module,
    fake_mode: Any = None,
    convert: Callable[[torch.Tensor], torch.Tensor] | None = None,
    device: torch.device | None = None,
) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers are fake tensors of the same shapes (ties kept), on
    ``device`` (default: where each one is)."""
    import copy

    def to_fake(t: torch.Tensor) -> torch.Tensor:
        if device is not None and t.device.type != device.type:  # a model on meta (or elsewhere): fake it where estimated
            with fake_mode:
                return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device)
        return fake_mode.from_tensor(t.detach())

    convert = convert or to_fake

    tensors = [*model.parameters(), *model.buffers()]
    # the module tree is copied with placeholders instead of tensors; real data is never duplicated
    memo: dict[int, Any] = {id(t): None for t in tensors}
    # a tensor attribute that autograd made (torch.nn.utils.weight_norm's and spectral_norm's ``weight``, which
    # their forward pre-hooks compute again at each call) cannot be deep-copied ("Only Tensors created explicitly
    # by the user ... support the deepcopy protocol"): the copy holds it detached, until its hook replaces it
    for m in model.modules():
        recomputed = {h.name for h in m._forward_pre_hooks.values() if type(h).__name__ in ("WeightNorm", "SpectralNorm")}
        for name in recomputed:  # (only those: another computed attribute, not replaced, would be a real tensor in
            value = vars(m).get(name)  # a meta copy, which meta operators accept: a silently wrong estimate)
            if isinstance(value, torch.Tensor) and value.grad_fn is not None:
                memo[id(value)] = value.detach()
    clone = copy.deepcopy(model, memo=memo)
    fakes: dict[int, torch.Tensor] = {}

    def fake(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in fakes:
            f = convert(t)
            fakes[id(t)] = nn.Parameter(f, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else f
        return fakes[id(t)]

    for name, mod in model.named_modules(remove_duplicate=False):
        twin = clone.get_submodule(name)
        for attr, p in mod._parameters.items():
            twin._parameters[attr] = None if p is None else fake(p)
        for attr, b in mod._buffers.items():
            twin._buffers[attr] = None if b is None else fake(b)
        if isinstance(twin, nn.RNNBase) and hasattr(twin, "_init_flat_weights"):
            twin._init_flat_weights()  # an RNN reads its weights from a list made at init (None in the copy)
    return clone
