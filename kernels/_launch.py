"""Launch-time facts shared by the kernel hosts: interpreter or GPU, SM count, shared memory, dot precision.

Nothing here touches CUDA at import time; device properties are read (and cached) at the first launch.
"""

from __future__ import annotations

import functools
import os

import torch


# Triton decides interpreter or compiler when ``@triton.jit`` decorates, i.e. when the kernel modules are
# imported (effdense.kernels is imported lazily, at the first fused call); read the variable once then, with
# Triton's own spelling rules, instead of on every launch (an environment lookup costs microseconds).
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on")


def interpreting() -> bool:
    """Whether Triton kernels run in Triton's CPU interpreter: ``TRITON_INTERPRET=1`` (or ``true``/``on``) was
    set when :mod:`effdense.kernels` was imported, which is when Triton read it."""
    return _INTERPRETING


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for host-side grid arithmetic. ``triton.cdiv`` is a constexpr function whose call
    from Python costs several microseconds, a cost paid on every launch."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two ``>= n`` for ``n >= 1`` (0 for 0), as ``triton.next_power_of_2``, at host speed."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def target_programs(device: torch.device) -> int:
    """Programs a split reduction aims for: a few waves on a GPU, a handful in the interpreter (whose cost
    grows with the number of program instances)."""
    if device.type != "cuda" or interpreting():
        return 4
    return 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def max_shared_memory(index: int) -> int:
    try:
        import triton

        return int(triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"])
    except Exception:  # older/newer driver API: fall back to the conservative Ampere figure
        return 163 * 1024


def input_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` precision for fp32 operands: exact fp32 ("ieee") unless the user allowed TF32 for matmuls
    (``torch.backends.cuda.matmul.allow_tf32``, False by default), as cuBLAS would. Ignored for bf16/fp16."""
    if dtype == torch.float32 and not interpreting() and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"
