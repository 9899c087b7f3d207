"""Launch-time facts shared by the kernel hosts: interpreter or GPU, SM count, shared memory, dot precision.

Nothing here touches CUDA at import time; device properties are read (and cached) at the first launch.
"""

from __future__ import annotations

import functools
import os

import torch


def interpreting() -> bool:
    """Whether Triton kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


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
