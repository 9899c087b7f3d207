"""Training-step memory: the FakeTensor estimate against what the device measures, for each strategy.

For every configuration and strategy, two numbers of the same training step (forward, cross-entropy,
backward; no optimizer step; parameters, buffers, input and gradients included):

* ``estimate_mib``: :func:`effdense.memory.estimate_step` (FakeTensorMode, tensors claiming to be on the
  device, so each strategy takes that device's path; nothing is allocated);
* ``measured_mib``: :func:`effdense.memory.measure_step` on the device: on CUDA the allocator's
  ``torch.cuda.max_memory_allocated()`` after one warm-up step (cuDNN/cuBLAS workspaces, Triton scratch and
  the allocator's 512-byte rounding are in it); on CPU the exact tracked peak;
* ``tracked_mib``: the live-storage tracker's own peak during the measured step (on CPU equal to
  ``measured_mib``; on CUDA what the estimate should equal, since both count the same storages);
* ``workspace_mib``: the estimate's modelled cuBLAS/cuBLASLt workspaces (in ``estimate_mib``; see
  :func:`effdense.memory.cuda_library_workspace`), and ``resident_mib``: what the allocator held before
  the measured step beyond parameters, buffers and input (the workspaces the warm-up step left), which
  checks that model.

``ratio = measured_mib / estimate_mib``. Never asserts: writes ``estimate_vs_<device>.json`` and ``.csv``
(one row per configuration and strategy) and prints a table; exits 1 if a row failed.

Usage::

    python benchmarks/estimate_vs_cuda.py                      # CUDA: DenseNet-BC-100 b64 32px, DenseNet-121 b64 224px, fp32
    python benchmarks/estimate_vs_cuda.py --device cpu --config densenet_bc_16:4:32:fp32   # a quick CPU check
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

from effdense import get_model
from effdense import strategies as _strategies
from effdense.benchutil import (
    DTYPES,
    device_name,
    environment,
    error_note,
    format_table,
    free_memory,
    image_size_problem,
    model_name,
    output_dir,
    positive_int,
    progress,
    resolve_device,
    strategy_list,
    write_csv,
    write_json,
)
from effdense.memory import estimate_step, measure_step, mib

DEFAULT_CONFIGS = ("densenet_bc_100:64:32:fp32", "densenet121:64:224:fp32")
RESULTS = Path(__file__).resolve().parent / "results"
COLUMNS = (
    "config", "model", "batch_size", "image_size", "dtype", "strategy", "status", "estimate_mib", "measured_mib",
    "ratio", "tracked_mib", "workspace_mib", "resident_mib", "measure_mode", "estimate_s", "measure_s", "note",
    "device", "device_name", "torch", "triton", "git_commit",
)  # fmt: skip


def config(text: str) -> tuple[str, int, int, str]:
    """``MODEL:BATCH:SIZE:DTYPE``, e.g. ``densenet121:64:224:fp32`` (DTYPE optional, default fp32)."""
    parts = text.split(":")
    if len(parts) not in (3, 4):
        raise argparse.ArgumentTypeError(f"expected MODEL:BATCH:SIZE[:DTYPE], e.g. densenet121:64:224:fp32, got {text!r}")
    dtype = parts[3] if len(parts) == 4 else "fp32"
    if dtype not in DTYPES:
        raise argparse.ArgumentTypeError(f"unknown dtype {dtype!r} in {text!r}; expected one of {', '.join(DTYPES)}")
    try:
        name = model_name(parts[0])
        batch, size = positive_int(parts[1]), positive_int(parts[2])
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"{exc} in {text!r} (MODEL:BATCH:SIZE[:DTYPE])") from None
    problem = image_size_problem(get_model(name, strategy="naive"), size, name, batch)
    if problem is not None:
        raise argparse.ArgumentTypeError(f"{problem} (in {text!r})")
    return name, batch, size, dtype


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", type=device_name, default="cuda", help="cuda (default), cuda:N or cpu")
    p.add_argument("--config", type=config, action="append", default=None, metavar="MODEL:BATCH:SIZE[:DTYPE]",
                   help=f"repeatable; default: {' and '.join(DEFAULT_CONFIGS)}")
    p.add_argument("--strategies", type=strategy_list, default=None,
                   help="comma list (default: every available one of naive,checkpoint,shared,fused)")
    p.add_argument("--out", type=Path, default=RESULTS, help="output folder (default benchmarks/results)")
    return p.parse_args(argv)


def run_one(name: str, strategy: str, shape: tuple[int, ...], dtype: str, device: torch.device) -> dict[str, Any]:
    autocast = DTYPES[dtype]
    start = time.perf_counter()
    est = estimate_step(name, shape, device=str(device), autocast_dtype=autocast, strategy=strategy, backend="fake")
    estimate_s = time.perf_counter() - start
    free_memory(device)
    torch.manual_seed(0)
    model = get_model(name, strategy=strategy).to(device)
    start = time.perf_counter()
    mem = measure_step(model, shape, autocast_dtype=autocast)
    measure_s = time.perf_counter() - start
    del model
    free_memory(device)
    return {
        "status": "ok",
        "estimate_mib": mib(est.peak),
        "measured_mib": mib(mem.peak),
        "ratio": mem.peak / est.peak,
        "tracked_mib": mib(mem.tracked_peak),
        "workspace_mib": mib(est.workspace),
        "resident_mib": mib(mem.workspace),
        "measure_mode": mem.mode,
        "estimate_s": round(estimate_s, 2),
        "measure_s": round(measure_s, 2),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        device = resolve_device(args.device)
        # (before the first row: a --out that cannot be a folder raised OutputError's traceback after it)
        output_dir(args.out, [f"estimate_vs_{device.type}.json", f"estimate_vs_{device.type}.csv"])
    except ValueError as exc:  # (UsageError is one)
        print(f"estimate_vs_cuda.py: error: {exc}", file=sys.stderr)
        return 2
    configs = args.config or [config(c) for c in DEFAULT_CONFIGS]
    available = _strategies.available()
    names = args.strategies or [s for s in ("naive", "checkpoint", "shared", "fused") if s in available]
    env = environment(device)
    progress(f"estimate_vs_cuda: {len(configs)} configs x {len(names)} strategies on {env['device_name']}")
    rows: list[dict[str, Any]] = []
    stem = f"estimate_vs_{device.type}"
    json_path, csv_path = args.out / f"{stem}.json", args.out / f"{stem}.csv"

    def save() -> None:
        write_json(json_path, {"meta": env, "rows": rows})
        write_csv(csv_path, rows, COLUMNS)

    for name, batch, size, dtype in configs:
        label = f"{name} b{batch} {size}px {dtype}"
        for strategy in names:
            row: dict[str, Any] = {"config": label, "model": name, "batch_size": batch, "image_size": size,
                                   "dtype": dtype, "strategy": strategy}  # fmt: skip
            start = time.perf_counter()
            if strategy not in available:
                row.update(status="skipped", note="strategy not available here")
            else:
                try:
                    row.update(run_one(name, strategy, (batch, 3, size, size), dtype, device))
                except Exception as exc:  # one failing row must not lose the others
                    free_memory(device)
                    row.update(status="error", note=error_note(exc))
            row.update({k: env[k] for k in ("device", "device_name", "torch", "triton", "git_commit")})
            rows.append(row)
            save()  # after each row: a run cut by a time limit keeps the rows it finished
            if row["status"] == "ok":
                desc = f"estimate {row['estimate_mib']:,.1f} MiB, measured {row['measured_mib']:,.1f} MiB, ratio {row['ratio']:.3f}"
            else:
                desc = f"{row['status']}: {row.get('note', '')}"
            progress(f"{label} {strategy}: {desc} ({time.perf_counter() - start:.1f} s)")
    print(format_table(rows, (
        ("config", "config", str),
        ("strategy", "strategy", str),
        ("estimate_mib", "estimate MiB", lambda v: f"{v:,.1f}"),
        ("measured_mib", "measured MiB", lambda v: f"{v:,.1f}"),
        ("ratio", "measured/estimate", lambda v: f"{v:.3f}"),
        ("tracked_mib", "tracked MiB", lambda v: f"{v:,.1f}"),
        ("workspace_mib", "modelled ws MiB", lambda v: f"{v:,.1f}"),
        ("resident_mib", "resident MiB", lambda v: f"{v:,.1f}"),
        ("status", "status", str),
        ("note", "note", str),
    )))  # fmt: skip
    save()
    print(f"wrote {json_path} and {csv_path}")
    return 0 if all(r["status"] != "error" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
