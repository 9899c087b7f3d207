"""Where an eager training step's host time goes, per row: host and GPU time, a profiled step, a Python profile.

A small eager GPU step is bound by the host: the fused DenseNet-121 step (batch 64, bf16) took 96.1 ms on an
H200 while its work replayed from a CUDA graph took 35.2 ms (benchmarks/results/gpu-nvidia-h200/). This script
records, for each row (effdense strategies, and torchvision's DenseNet with the same weights), what that host
time is made of:

* ``host_ms``: host time from the step's start until backward returns, before synchronising (median of
  ``--steps`` steps); ``step_ms``: until the device has finished too. With little GPU work behind it,
  ``host_ms`` close to ``step_ms`` means the host is what the step waits for.
* One step under ``torch.profiler`` (CPU activity; CUDA too on a GPU): each event name (ATen operator,
  CUDA runtime or driver call such as a kernel launch, an allocation or a synchronisation, autograd node)
  with its count and self host time, the ``--top`` largest; totals per kind; the device's kernel time; and
  the runtime calls that make the host wait for the device (``*Synchronize``, blocking ``cudaMemcpy``,
  ``cudaFree``, ``cudaMalloc``), which should be none in a training step.
* One step under ``cProfile``: Python self time by where the code lives (effdense and its kernels'
  hosts, torch's Python, Triton's Python, C functions). cProfile adds its own cost to every Python call,
  so these are shares to compare, not the step's times.

Never asserts. Writes ``profile_step_<model>_b<batch>_<size>px_<dtype>_<device>.json`` (``--trace``: also
each row's Chrome trace) and prints a table.

    python benchmarks/profile_step.py --out DIR        # on a GPU: DenseNet-121 b64 224px bf16, fused, naive, torchvision
    python benchmarks/profile_step.py --device cpu --model densenet_bc_16 --batch-size 2 --image-size 8
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import os
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch.autograd import DeviceType

from effdense import get_model
from effdense.bench import measure_builds, same_weight_builds, training_step
from effdense.benchutil import (
    DTYPES,
    UsageError,
    dtype_name,
    environment,
    format_table,
    model_name,
    output_dir,
    positive_int,
    progress,
    require_image_size,
    strategy_list,
    synchronize,
    write_json,
)

# runtime calls after which the host has waited for the device (or may have: cudaFree and cudaMalloc
# synchronise implicitly; a plain cudaMemcpy from pageable memory blocks until the copy is done)
_WAITS = ("Synchronize", "cudaMemcpy", "cuMemcpyDtoH", "cuMemcpyHtoD", "cudaFree", "cudaMalloc")
_FINAL_WAIT = "profile_step: waiting for the device after the step"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=model_name, default="densenet121")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--image-size", type=positive_int, default=224)
    p.add_argument("--dtype", type=dtype_name, default="bf16", help="fp32, bf16 (autocast, default) or fp16")
    p.add_argument("--strategies", type=strategy_list, default=["fused", "naive"], help="comma list (default fused,naive)")
    p.add_argument("--no-reference", action="store_true", help="leave out the torchvision row")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=positive_int, default=5, help="timed steps per row (median; default 5)")
    p.add_argument("--warmup", type=positive_int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--top", type=positive_int, default=25, help="profiler events listed per row (default 25)")
    p.add_argument("--trace", action="store_true", help="also write each row's Chrome trace (large) to --out")
    p.add_argument("--out", type=Path, default=None, help="folder for the JSON (default: print only)")
    return p.parse_args(argv)


def _kind(name: str) -> str:
    if name.startswith("aten::"):
        return "aten"
    if name.startswith("effdense::"):
        return "effdense"
    if name.startswith("cuda") or (name.startswith("cu") and name[2:3].isupper()):
        return "runtime"
    if name.startswith("triton") or name.startswith("_bottleneck") or name.startswith("_channel") or name.startswith("_merge"):
        return "triton"
    return "other"


def profile_events(step: Callable[[], None], device: torch.device, top: int, trace: Path | None) -> dict[str, Any]:
    """One step under torch.profiler: per event name count and self host time, totals per kind, device time."""
    from torch.profiler import ProfilerActivity, profile, record_function

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronize(device)
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        step()
        host = time.perf_counter() - t0
        with record_function(_FINAL_WAIT):  # the device's kernels finish inside the profiled region
            synchronize(device)
    if trace is not None:
        prof.export_chrome_trace(str(trace))
    # the final wait is this script's, not the step's: its events are taken out of the counts and times
    left_count: collections.Counter[str] = collections.Counter()
    left_us: collections.Counter[str] = collections.Counter()
    marks = [e for e in prof.events() if e.name == _FINAL_WAIT]
    for e in prof.events():
        if any(e.thread == m.thread and m.time_range.start <= e.time_range.start and e.time_range.end <= m.time_range.end
               for m in marks):  # fmt: skip
            left_count[e.name] += 1
            left_us[e.name] += e.self_cpu_time_total
    host_events = []
    device_us = 0.0
    for e in prof.key_averages():
        # the device's own events alone (kernels, copies): a CPU operator's self device time is its kernels'
        # again, and adding both counted the GPU time about twice (87.8 ms of a 79.1 ms step at 1a95410)
        if getattr(e, "device_type", None) == DeviceType.CUDA and not getattr(e, "is_user_annotation", False):
            device_us += float(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)) or 0.0)
        count, self_us = int(e.count) - left_count[e.key], float(e.self_cpu_time_total) - left_us[e.key]
        if count > 0 and self_us > 0:
            host_events.append({"name": e.key, "kind": _kind(e.key), "count": count, "self_host_us": self_us})
    by_kind: dict[str, dict[str, float]] = {}
    for e in host_events:
        k = by_kind.setdefault(e["kind"], {"count": 0, "self_host_ms": 0.0})
        k["count"] += e["count"]
        k["self_host_ms"] += e["self_host_us"] / 1e3
    waits = [e for e in host_events if e["kind"] == "runtime" and any(w in e["name"] for w in _WAITS)]
    host_events.sort(key=lambda e: -e["self_host_us"])
    return {
        "profiled_host_ms": host * 1e3,
        "device_kernel_ms": device_us / 1e3,
        "by_kind": by_kind,
        "waits": waits,
        "top": host_events[:top],
    }


def python_profile(step: Callable[[], None], device: torch.device) -> dict[str, float]:
    """Python self time (ms, cProfile's) of one step by where the code lives."""
    repo = str(Path(__file__).resolve().parents[1]).replace(os.sep, "/")
    prof = cProfile.Profile()
    synchronize(device)
    prof.enable()
    step()
    prof.disable()
    synchronize(device)
    groups: dict[str, float] = {}
    for (filename, _, func), (_, _, tottime, _, _) in pstats.Stats(prof).stats.items():  # type: ignore[attr-defined]
        path = filename.replace(os.sep, "/")
        installed = "site-packages/" in path or "dist-packages/" in path
        if installed and ("-packages/torch/" in path or "-packages/torchvision/" in path):
            group = "torch python"
        elif installed and "-packages/triton/" in path:
            group = "triton python"
        elif filename == "~":
            group = "C functions (torch)" if ("torch" in func or "Tensor" in func) else "C functions (other)"
        elif not installed and path.startswith(repo):
            group = "effdense python"
        else:
            group = "other python"
        groups[group] = groups.get(group, 0.0) + tottime * 1e3
    return dict(sorted(groups.items(), key=lambda kv: -kv[1]))


def profile_row(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, autocast: torch.dtype | None,
                steps: int, warmup: int, top: int, trace: Path | None) -> dict[str, Any]:
    model.train()
    device = x.device
    step = training_step(model, x, target, autocast, zero_grad=True)
    for _ in range(warmup):  # autotuning, cuDNN plans, caches
        step()
    synchronize(device)
    host, full = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        t1 = time.perf_counter()
        synchronize(device)
        t2 = time.perf_counter()
        host.append((t1 - t0) * 1e3)
        full.append((t2 - t0) * 1e3)
    row: dict[str, Any] = {"host_ms": statistics.median(host), "step_ms": statistics.median(full)}
    row["profile"] = profile_events(step, device, top, trace)
    row["python_ms_cprofile"] = python_profile(step, device)
    model.zero_grad(set_to_none=True)
    return row


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("profile_step.py: error: --device cuda needs a CUDA device (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    try:
        if args.out is not None:
            output_dir(args.out)
        elif args.trace:
            raise UsageError("--trace writes into --out; give --out")
        torch.manual_seed(0)
        base = get_model(args.model, strategy="naive")
        require_image_size(base, args.image_size, args.model, batch_size=args.batch_size)
    except UsageError as exc:
        print(f"profile_step.py: error: {exc}", file=sys.stderr)
        return 2
    autocast = DTYPES[args.dtype]
    env = environment(device)
    env["command"] = " ".join(["python", "benchmarks/profile_step.py", *(sys.argv[1:] if argv is None else argv)])
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    target = torch.randint(0, base.classifier.out_features, (args.batch_size,), device=device)

    stem = f"{args.model}_b{args.batch_size}_{args.image_size}px_{args.dtype}_{device.type}"

    def measure(name: str, model: torch.nn.Module) -> dict[str, Any]:
        trace = args.out / f"trace_{stem}_{name.replace(' ', '_')}.json" if args.trace else None
        return {**profile_row(model, x, target, autocast, args.steps, args.warmup, args.top, trace), "status": "ok"}

    path = args.out / f"profile_step_{stem}.json" if args.out is not None else None
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"}
    finished: list[dict[str, Any]] = []

    def on_row(row: dict[str, Any]) -> None:
        progress(f"{row['row']}: " + (
            f"host {row['host_ms']:.2f} ms, step {row['step_ms']:.2f} ms" if "host_ms" in row else row["status"]))
        finished.append(row)
        if path is not None:  # after each row: a run cut by a time limit keeps the rows it finished
            write_json(path, {"meta": {**env, "settings": settings}, "rows": finished})

    rows = measure_builds(
        same_weight_builds(args.model, base, args.strategies, () if args.no_reference else ("plain",)), measure, device,
        on_row=on_row,
    )  # fmt: skip

    def kind_ms(kind: str) -> Callable[[dict[str, Any]], str]:
        return lambda p: f"{p['by_kind'].get(kind, {}).get('self_host_ms', 0.0):,.2f}" if p else "-"

    table = [dict(r, p=r.get("profile")) for r in rows]
    print(format_table(table, (
        ("row", "row", str),
        ("host_ms", "host ms", lambda v: f"{v:,.2f}"),
        ("step_ms", "step ms", lambda v: f"{v:,.2f}"),
        ("p", "aten self ms", kind_ms("aten")),
        ("p", "runtime self ms", kind_ms("runtime")),
        ("p", "device ms", lambda p: f"{p['device_kernel_ms']:,.2f}" if p else "-"),
        ("p", "waits", lambda p: str(sum(w["count"] for w in p["waits"])) if p else "-"),
        ("status", "status", str),
    )))  # fmt: skip
    for r in rows:
        if "profile" in r:
            print(f"\n{r['row']}: largest self host times (one profiled step)")
            for e in r["profile"]["top"][:12]:
                print(f"  {e['name'][:60]:60s} {e['count']:6d} x {e['self_host_us'] / 1e3:8.2f} ms")
            print("  cProfile, Python self ms by origin: "
                  + ", ".join(f"{k} {v:.1f}" for k, v in r["python_ms_cprofile"].items()))
    if path is not None:
        write_json(path, {"meta": {**env, "settings": settings}, "rows": rows})
        print(f"\nwrote {path}")
    return 0 if all(r["status"] in ("ok", "skipped") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
