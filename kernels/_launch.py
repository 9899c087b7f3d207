"""Launch-time facts shared by the kernel hosts (interpreter or GPU, SM count, shared memory, dot precision),
and :func:`launch`, through which every kernel launch goes (compiled kernels launched directly after their first
launch for a specialisation).

Nothing here touches CUDA at import time; device properties are read (and cached) at the first launch.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import inspect
import os
import threading

import torch


def _jit_probe():  # (decorated once below, to ask Triton which kind of function its jit makes)
    pass


def _triton_interprets() -> bool:
    """Whether ``@triton.jit`` makes interpreted functions now: asked of Triton itself, by decorating a function
    and looking at what comes back. Its reading of ``TRITON_INTERPRET`` has changed across versions (``"1"``
    only in older ones; ``"yes"``, not ``" 1"``, in newer ones), and a spelling read otherwise here took the
    compiled kernels for interpreted ones (a "0 active drivers" error on CPU) or the reverse (the twins run
    where the real kernels were meant to be tested). Without Triton, the variable as Triton reads it now."""
    try:
        import triton
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # (no kernels to run then; effdense.kernels.ops reports the import error)
        return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes", "y")
    return isinstance(triton.jit(_jit_probe), InterpretedFunction)


# Triton decides interpreter or compiler when ``@triton.jit`` decorates, i.e. when the kernel modules are
# imported (effdense.kernels is imported lazily, at the first fused call, and this module with them): asked
# once then, instead of on every launch (an environment lookup costs microseconds).
_INTERPRETING = _triton_interprets()


def env_switch(name: str) -> bool:
    """An on/off setting from environment variable ``name``: off for "0", "false", "off" or "no" (any case,
    surrounding spaces ignored), on otherwise and when unset."""
    return os.environ.get(name, "1").strip().lower() not in ("0", "false", "off", "no")


def require_bool(enabled: object) -> None:
    """The argument of an on/off setter (``set_autotune``, ``set_direct_launch``) is a bool."""
    if not isinstance(enabled, bool):
        from effdense.kernels._checks import type_name  # (_checks imports torch alone: no cycle)

        raise TypeError(f"enabled: expected a bool (True or False), got {type_name(enabled)} {enabled!r}")


def interpreting() -> bool:
    """Whether Triton kernels run in Triton's CPU interpreter: ``TRITON_INTERPRET=1`` (or ``true``/``on``) was
    set when :mod:`effdense.kernels` was imported, which is when Triton read it."""
    return _INTERPRETING


def on_tensor_device(host):
    """Decorator for a launch host whose first argument is the tensor every launch reads: its kernels run on
    that tensor's GPU. Triton launches on the *current* CUDA device (and its stream), and so does the direct
    launch: a model on ``cuda:1`` run from a thread whose current device is ``cuda:0`` (no
    ``torch.cuda.set_device(1)``) would launch on GPU 0, unordered against the allocations and fills queued on
    GPU 1's stream. (Autograd's backward threads and ``nn.DataParallel``'s replicas set the device already;
    a plain forward does not.) The guard is entered only when the devices differ: one ``current_device()``
    call per launch host otherwise."""

    @functools.wraps(host)
    def guarded(x, *args, **kwargs):
        if x.is_cuda:
            index = x.get_device()
            if index != torch.cuda.current_device():
                with torch.cuda.device(index):
                    return host(x, *args, **kwargs)
        return host(x, *args, **kwargs)

    return guarded


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


# --------------------------------------------------------------------------------------------------
# Direct launches of compiled kernels
#
# ``fn[grid](*args, **kwargs)`` goes through Triton's ``JITFunction.run`` on every call: it binds and
# specialises every argument, builds the kernel-cache key (``str`` of the options dict included), reads its
# knobs, checks the globals the kernel uses, and only then calls the compiled kernel's C launcher. Measured
# with real launches on an H200 (benchmarks/results/gpu-nvidia-h200/2026-11-26_c2e934d/), a kernel entry
# point costs ~55 us of host time per call, against 12-60 us for the same wrapper with the launch stubbed out
# on the 2-core CPU here, and a DenseNet-121 fused step launches ~430 kernels. After a kernel's first launch
# for a given specialisation, :func:`launch` keeps the compiled kernel Triton returned and calls its launcher
# itself. The key is at least as fine as Triton's specialisation: each int argument by value (Triton
# specialises on ``== 1``, divisibility by 16 and the int width), each tensor by dtype and 16-byte alignment
# of its data pointer (Triton's pointer specialisation), anything else (float, bool, None, str) by value,
# all keyword arguments (constexprs, num_warps, num_stages, ...) by value, and the current device. Any
# launch with a launch hook installed (e.g. a profiler's) goes through Triton, which builds the hook's
# metadata. EFFDENSE_DIRECT_LAUNCH=0 in the environment (read at import) or :func:`set_direct_launch`
# turns it off; it never runs in the interpreter, whose kernels are not compiled.

_DIRECT = env_switch("EFFDENSE_DIRECT_LAUNCH")
# (fn, device, argument key, keyword items) -> (launcher, function handle, packed metadata, trailing arguments).
# Its keys hold every int argument by value (sizes, strides), so each new input size adds a few hundred entries
# (~1 KB each) for a DenseNet-121; a multi-scale or detection run sees many sizes. Past _COMPILED_MAX entries it
# starts over: the next launch of each key goes through Triton once more (Triton's own cache keeps the
# compiled kernels), and is remembered again.
_COMPILED: dict[tuple, tuple] = {}
_COMPILED_MAX = 8192
# launches by route since import (tests and benchmarks read them): "direct", "triton" (through fn[grid])
counts = {"direct": 0, "triton": 0}
# (get_current_device, get_current_stream, runtime knobs), set at the first direct launch (one assignment: two
# threads launching first, as nn.DataParallel's replicas do, each set the same tuple; list.extend doubled it)
_DRIVER: tuple | None = None


def set_direct_launch(enabled: bool) -> bool:
    """Launch compiled kernels directly after their first launch (``True``, the default unless
    ``EFFDENSE_DIRECT_LAUNCH=0`` was set at import) or always through Triton's ``kernel[grid](...)``
    (``False``). Returns the previous setting. A process-wide setting (threads share it)."""
    global _DIRECT
    require_bool(enabled)
    previous, _DIRECT = _DIRECT, enabled
    return previous


_Tensor = torch.Tensor


def _hook_idle(hook) -> bool:
    """No launch hook: ``None`` (older Triton) or a hook chain with no hooks in its ``calls`` list (newer)."""
    return hook is None or (isinstance(getattr(hook, "calls", None), list) and not hook.calls)


def _driver() -> tuple:
    global _DRIVER
    if _DRIVER is None:
        import triton

        active = triton.runtime.driver.active
        _DRIVER = (active.get_current_device, active.get_current_stream, triton.knobs.runtime)
    return _DRIVER


# Triton's interpreter keeps one launch's state process-wide (triton.language patched for the launch and put back
# after it, the program id on a global builder): two threads launching at once broke each other's launch
# ("Did you forget to add @triton.jit?"), so interpreted launches take turns
_INTERPRETER_LOCK = threading.Lock()


def launch(fn, grid: tuple, args: tuple, kwargs: dict) -> None:
    """``fn[grid](*args, **kwargs)`` for a ``@triton.jit`` function ``fn`` and a grid tuple: through Triton
    the first time for its key (compiling it if needed), then by calling the compiled kernel's launcher."""
    if not _DIRECT or _INTERPRETING:
        counts["triton"] += 1
        with _INTERPRETER_LOCK if _INTERPRETING else contextlib.nullcontext():
            fn[grid](*args, **kwargs)
        if _INTERPRETING:
            # Triton's interpreter holds the launch's tensor storages in reference cycles (its recursive
            # argument-copying closures), freed at the garbage collector's next pass: a tensor deleted after
            # the launch stayed allocated until then, and the exact CPU memory of a fused step depended on
            # when that was (+17% over the estimate at worst, different with gc disabled). The young
            # generations hold them: collected here, at a cost of microseconds beside the interpreter's.
            gc.collect(1)
        return
    get_device, get_stream, knobs = _driver()
    device = get_device()
    # each argument's part of the key: an int by value, a tensor by dtype and 16-byte alignment, anything else by
    # value (written inline: a helper called per argument cost a quarter of the ~4 us a GEMM's ~20 arguments take)
    key = (
        fn,
        device,
        tuple([a if type(a) is int else ((a.dtype, not a.data_ptr() & 15) if isinstance(a, _Tensor) else a) for a in args]),
        tuple(kwargs.items()),
    )
    entry = _COMPILED.get(key)
    enter, exit_ = knobs.launch_enter_hook, knobs.launch_exit_hook
    if entry is not None and _hook_idle(enter) and _hook_idle(exit_):
        run, function, packed, tail = entry
        n = len(grid)
        try:
            run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, get_stream(device), function, packed,
                None, enter, exit_, *args, *tail)
        except TypeError as exc:  # the launcher refused the arguments (before launching): Triton's way from now on
            _COMPILED.clear()
            set_direct_launch(False)
            import warnings

            warnings.warn(f"effdense: direct kernel launch failed ({exc}); launching through Triton from now on", RuntimeWarning, stacklevel=2)
            launch(fn, grid, args, kwargs)
            return
        counts["direct"] += 1
        return
    counts["triton"] += 1
    kernel = fn[grid](*args, **kwargs)
    if entry is None:
        _remember(fn, key, kernel, args, kwargs)


def _remember(fn, key: tuple, kernel, args: tuple, kwargs: dict) -> None:
    """Keep what a direct launch needs of the compiled kernel Triton just launched, if it has it all."""
    if hasattr(kernel, "result"):  # a compilation future (asynchronous compile mode), already resolved by the launch
        kernel = kernel.result()
    run, function, packed = (getattr(kernel, a, None) for a in ("run", "function", "packed_metadata"))
    names, params = getattr(fn, "arg_names", None), getattr(fn, "params", None)
    if run is None or function is None or packed is None or names is None or params is None:
        return
    tail = []
    for param, name in zip(params[len(args):], names[len(args):]):
        if name in kwargs:
            tail.append(kwargs[name])
        elif getattr(param, "default", inspect.Parameter.empty) is not inspect.Parameter.empty:
            tail.append(param.default)
        else:
            return
    _store(key, (run, function, packed, tuple(tail)))


def _store(key: tuple, entry: tuple) -> None:
    if len(_COMPILED) >= _COMPILED_MAX:
        _COMPILED.clear()
    _COMPILED[key] = entry
