"""Host-side cost of a training step: dispatched operators per step, and the kernel wrappers' own time.

A small GPU step (DenseNet-BC-100 at batch 64, 32x32) is bound by the host: every operator costs
microseconds of Python and dispatch before its kernel is queued, whatever the kernel's size. Two
measurements of that cost, both runnable on a CPU:

* **operators per step**: every ATen operator (and ``effdense::*`` kernel op) dispatched by one training
  step (forward, loss, backward), counted by a ``TorchDispatchMode``; on a CPU on ``meta`` tensors, so any
  shape is free to count, with ``--device cuda`` on the GPU's real tensors. Grouped into views (no
  kernel), allocations, fills, kernel ops and the rest (compute). ``fused`` is counted on its Triton path
  (on a CPU TRITON_INTERPRET=1 is set here before effdense.kernels is imported), the path it takes on a
  GPU; each ``effdense::channel_stats`` launches two kernels.
* **wrapper time**: microseconds of host time per call of each public kernel entry point (argument
  checks, allocation, dispatch) with the Triton launch itself replaced by a no-op, median over repeats;
  with ``--device cuda``, the real launches on tiny shapes (the whole host cost of a call, launch included),
  once with the direct launch of compiled kernels (the default) and once through Triton's ``kernel[grid]``.

    python benchmarks/host_overhead.py                              # BC-100, batch 64, 32x32
    python benchmarks/host_overhead.py --out benchmarks/results     # also write host_overhead_<model>_b<N>_<S>px.json
    python benchmarks/host_overhead.py --device cuda --out DIR      # on a GPU (..._cuda.json)

Counts are exact and repeatable; wrapper times depend on this machine's CPU and load.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch  # noqa: E402

if not torch.cuda.is_available():  # before effdense.kernels is imported: fused takes its kernel path on CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import effdense  # noqa: E402
from effdense.benchutil import (  # noqa: E402
    UsageError,
    environment,
    format_table,
    model_name,
    output_dir,
    positive_int,
    strategy_list,
    write_json,
)

VIEW_OPS = {
    "view", "_unsafe_view", "slice", "select", "expand", "alias", "detach", "t", "transpose", "permute",
    "unsqueeze", "squeeze", "as_strided", "split", "split_with_sizes", "unbind", "unflatten", "flatten",
    "reshape", "narrow",
}  # fmt: skip
ALLOC_OPS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}
FILL_OPS = {"zeros", "zeros_like", "zero_", "fill_", "full", "full_like", "ones", "ones_like", "new_zeros"}


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def _kind(name: str) -> str:
    namespace, _, op = name.partition(".")
    if namespace != "aten":
        return "kernel_ops"
    if op in VIEW_OPS:
        return "views"
    if op in ALLOC_OPS:
        return "allocations"
    if op in FILL_OPS:
        return "fills"
    return "compute"


def count_ops(model_name: str, strategy: str, shape: tuple[int, ...], device: str = "meta") -> dict[str, Any]:
    """Operators dispatched by one training step (after one uncounted step) on ``device``: ``meta`` tensors
    (no data, any shape; on CPU), or real CUDA tensors on a GPU machine, where fused runs its kernels."""
    with torch.device(device):
        model = effdense.get_model(model_name, strategy=strategy)
        x = torch.randn(shape) if device != "meta" else torch.empty(shape)
    target = torch.zeros(shape[0], dtype=torch.long, device=device)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), target).backward()

    step()  # first-call effects (lazy imports, caches) stay out of the count
    counter = _OpCounter()
    with counter:
        step()
    by_kind: collections.Counter[str] = collections.Counter()
    for name, n in counter.counts.items():
        by_kind[_kind(name)] += n
    return {
        "strategy": strategy,
        "total": sum(counter.counts.values()),
        **{k: by_kind[k] for k in ("views", "allocations", "fills", "compute", "kernel_ops")},
        "ops": dict(counter.counts.most_common()),
    }


def _stub_launches() -> list[tuple[Any, str, Callable[..., None]]]:
    """Replace the Triton launches with no-ops; returns ``(module, name, original)`` to restore."""
    from effdense.kernels import bottleneck as _b
    from effdense.kernels import stats as _s

    saved = []
    for module, names in (
        (_b, ("bottleneck_forward_launch", "bottleneck_backward_weight_launch",
              "bottleneck_backward_input_launch", "bn_backward_accumulate_launch")),
        (_s, ("channel_stats_launch",)),
    ):  # fmt: skip
        for name in names:
            saved.append((module, name, getattr(module, name)))
            setattr(module, name, lambda *args: None)
    return saved


def wrapper_times(repeats: int, calls: int, device: str = "cpu") -> dict[str, float]:
    """Median host microseconds per call of each kernel entry point.

    ``device="cpu"``: the launches are stubbed out, so the figure is the wrapper's own time (checks,
    allocation, dispatch), on the shapes of a late DenseNet-BC layer (a 200-channel slice of a buffer, batch
    64 at 16x16, 48 bottleneck channels). ``device="cuda"``: the kernels really launch, on shapes so small
    (batch 2 at 8x8) that the GPU finishes each before the host has issued the next, so the figure is the
    whole host cost of a call, Triton's launch included (synchronised once per repeat)."""
    from effdense import kernels as K

    on_gpu = device == "cuda"
    N, C, H, W, B = (2, 200, 8, 8, 48) if on_gpu else (64, 200, 16, 16, 48)
    with torch.device(device):
        buf = torch.randn(N, C + 12, H, W)
        x = buf[:, :C]
        scale, shift, mean = torch.rand(C), torch.randn(C), torch.zeros(C)
        w = torch.randn(B, C)
        dy = torch.randn(N, B, H, W)
        grad = torch.zeros_like(buf)[:, :C]
    cases: dict[str, Callable[[], Any]] = {
        "channel_stats (12 channels)": lambda: K.channel_stats(buf[:, C:]),
        "bottleneck_forward": lambda: K.bottleneck_forward(x, scale, shift, w),
        "bottleneck_forward stats=False": lambda: K.bottleneck_forward(x, scale, shift, w, stats=False),
        "bottleneck_backward_weight": lambda: K.bottleneck_backward_weight(x, scale, shift, dy),
        "bottleneck_backward_input": lambda: K.bottleneck_backward_input(x, scale, shift, w, dy, mean),
        "bottleneck_backward (all three)": lambda: K.bottleneck_backward(x, scale, shift, w, dy, mean, scale, scale, grad),
    }
    # the entry points strategy fused calls inside a dense stage, its arguments checked once per pass
    # (effdense.kernels.ops.stage_ops): the same launches without the per-call checks
    from effdense.kernels.ops import stage_ops

    S = stage_ops(buf, (w, scale, shift))
    if S is not None:
        cases.update({
            "stage: channel_stats (12 channels)": lambda: S.channel_stats(buf[:, C:]),
            "stage: bottleneck_forward": lambda: S.bottleneck_forward(x, scale, shift, w),
            "stage: bottleneck_forward stats=False": lambda: S.bottleneck_forward(x, scale, shift, w, stats=False),
            "stage: bottleneck_backward (all three)": lambda: S.bottleneck_backward(x, scale, shift, w, dy, mean, scale, scale, grad),
        })  # fmt: skip
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    saved = [] if on_gpu else _stub_launches()
    try:
        for fn in cases.values():
            for _ in range(min(calls, 50)):  # on a GPU also the autotuning of each kernel for these shapes
                fn()
        sync()
        # the repeats go round the cases in turn, so that a change in the machine's load reaches every case alike
        # (one case's repeats after another's compared the public and stage entry points under different loads)
        samples: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(repeats):
            for name, fn in cases.items():
                t0 = time.perf_counter()
                for _ in range(calls):
                    fn()
                sync()
                samples[name].append((time.perf_counter() - t0) / calls * 1e6)
        return {name: statistics.median(s) for name, s in samples.items()}
    finally:
        for module, name, fn in saved:
            setattr(module, name, fn)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=model_name, default="densenet_bc_100")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--image-size", type=positive_int, default=32)
    p.add_argument("--strategies", type=strategy_list, default="naive,checkpoint,shared,fused")
    p.add_argument("--repeats", type=positive_int, default=None, help="timed repeats per wrapper (median; default 7)")
    p.add_argument("--calls", type=positive_int, default=None, help="calls per repeat (default 2000)")
    p.add_argument("--no-wrapper-times", action="store_true", help="count operators only")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu: operators counted on meta tensors, wrapper times with the launches stubbed (Triton's "
                        "interpreter); cuda: both on the GPU, real launches on tiny shapes (default: cuda if present)")
    p.add_argument("--out", default=None, help="folder for the JSON (default: print only)")
    args = p.parse_args(argv)
    if args.no_wrapper_times and (args.repeats is not None or args.calls is not None):
        p.error("--repeats and --calls time the kernel wrappers, which --no-wrapper-times leaves out: they would do nothing")
    args.repeats = 7 if args.repeats is None else args.repeats
    args.calls = 2000 if args.calls is None else args.calls
    model, strategies = args.model, args.strategies
    if args.device == "cuda" and not torch.cuda.is_available():
        print("host_overhead.py: error: --device cuda needs a CUDA device (torch.cuda.is_available() is False)",
              file=sys.stderr)
        return 2
    if args.device == "cpu" and torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        print("host_overhead.py: error: --device cpu on a CUDA machine needs TRITON_INTERPRET=1 in the environment "
              "(the kernels' CPU path); or use --device cuda", file=sys.stderr)
        return 2
    if args.out:  # (before the counting: a --out that cannot be a folder lost the results in a traceback)
        try:
            output_dir(Path(args.out))
        except UsageError as exc:
            print(f"host_overhead.py: error: {exc}", file=sys.stderr)
            return 2
    count_device = "meta" if args.device == "cpu" else "cuda"
    shape = (args.batch_size, 3, args.image_size, args.image_size)

    from effdense.kernels import kernels_available

    rows = []
    for s in strategies:
        print(f"counting {s} ...", file=sys.stderr, flush=True)
        rows.append(count_ops(model, s, shape, count_device))
    print(f"\nOperators per training step, {model}, input {shape} ({count_device} tensors):")
    count = "{:,}".format
    print(format_table(rows, [
        ("strategy", "strategy", str), ("total", "total", count), ("views", "views", count),
        ("allocations", "allocations", count), ("fills", "fills", count), ("compute", "compute", count),
        ("kernel_ops", "effdense ops", count),
    ]))  # fmt: skip
    times: dict[str, float] = {}
    triton_times: dict[str, float] = {}
    if not args.no_wrapper_times:
        times = wrapper_times(args.repeats, args.calls, args.device)
        what = "launch stubbed" if args.device == "cpu" else "real CUDA launches, batch 2 at 8x8"
        if args.device == "cuda":  # the same calls with every launch through Triton's kernel[grid](...)
            from effdense.kernels import set_direct_launch

            previous = set_direct_launch(False)
            try:
                triton_times = wrapper_times(args.repeats, args.calls, args.device)
            finally:
                set_direct_launch(previous)
        print(f"\nKernel wrapper host time, {what} (us per call, median):")
        for name, us in times.items():
            extra = f"   through Triton's launch path: {triton_times[name]:7.1f}" if name in triton_times else ""
            print(f"  {name:34s} {us:7.1f}{extra}")
    payload = {
        "benchmark": "host_overhead",
        "meta": {  # (recorded as "environment" before 2026-11-27; "meta" as in the other benchmarks' files)
            **environment(torch.device(args.device)),
            "command": " ".join(["python", "benchmarks/host_overhead.py", *(sys.argv[1:] if argv is None else argv)]),
        },
        "model": model,
        "input_shape": list(shape),
        "counted_on": count_device,
        "fused_counted_on_triton_path": kernels_available(args.device),
        "op_counts": rows,
        "wrapper_device": args.device,
        "wrapper_launches": "stubbed" if args.device == "cpu" else "real",
        "wrapper_us_per_call": times,
        # --device cuda: the same calls launched through Triton's kernel[grid](...) every time (set_direct_launch(False))
        "wrapper_us_per_call_triton_launch": triton_times,
    }
    if args.out:
        out = Path(args.out)
        path = out / f"host_overhead_{model}_b{args.batch_size}_{args.image_size}px{'_cuda' if args.device == 'cuda' else ''}.json"
        write_json(path, payload)
        print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
