"""``effdense max-depth``: the deepest DenseNet-BC whose training step fits a memory budget, per strategy.

Depths follow the paper's rule for 3-block DenseNet-BC, ``depth = 4 + 6n`` (``n`` layers per block). The
peak of a training step grows with ``n`` (quadratically for ``naive``: every layer keeps its own
concatenation; for the others nearly linearly, plus the parameters, which grow as ``n^2 k^2``), so the
search is a bracketing search on ``n`` guided by a quadratic fit through the estimates made so far:
three cheap estimates at small ``n`` give a first guess, each estimate near the budget refines the fit,
and bisection takes over where the fit stops helping. About six estimates per strategy, of which three
or four are of deep models. Every estimate runs without allocating (see :func:`effdense.memory.estimate_step`).
On a GPU the estimates use fake CUDA tensors, so each strategy takes its CUDA path, and the depth found
is then built and measured for real (``--no-verify`` to skip).

Cost: an estimate costs about a millisecond of CPU per operator, whatever the tensor sizes. ``naive`` and
``checkpoint`` run ``O(L)`` operators per layer; ``shared`` on CPU runs its bottleneck over channel chunks,
so its operator count grows with depth squared too (recorded timings: benchmarks/results/).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from effdense import strategies as _strategies
from effdense.benchutil import (
    DTYPES,
    UsageError,
    byte_size,
    device_name,
    dtype_name,
    environment,
    error_note,
    exit_code,
    format_table,
    free_memory,
    output_dir,
    output_path,
    positive_int,
    progress,
    require_image_size,
    resolve_device,
    selection_tag,
    strategy_list,
    write_csv,
    write_json,
)
from effdense.densenet import get_model
from effdense.memory import GiB, estimate_step, format_bytes, measure_step, mib

CSV_COLUMNS = (
    "strategy", "status", "max_depth", "layers_per_block", "peak_mib", "next_depth", "next_peak_mib", "budget_mib",
    "estimates", "seconds", "verified_peak_mib", "verified_fits", "growth_rate", "batch_size", "image_size", "dtype",
    "note", "device_name", "torch", "git_commit", "command",
)  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--budget", type=byte_size, default=12 * GiB,
                        help="memory budget for one training step, with its unit: e.g. 12GiB (default), 80GB, 500MiB")
    parser.add_argument("--growth-rate", type=positive_int, default=12, help="default 12")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="default 64")
    parser.add_argument("--image-size", type=positive_int, default=32, help="default 32")
    parser.add_argument("--dtype", type=dtype_name, default="fp32", help="fp32 (default), or bf16/fp16 autocast")
    parser.add_argument("--strategies", type=strategy_list, default=None, help="'all' (default) or a comma list")
    parser.add_argument("--depth-limit", type=positive_int, default=10_000,
                        help="search no deeper than this (default 10000)")
    parser.add_argument("--estimate-limit", type=positive_int, default=None,
                        help="estimate no model deeper than this (at least 22); beyond it, use a quadratic fit through "
                        "the three deepest estimates (result marked 'extrapolated'; its error grows with the distance "
                        "from the limit: give the deepest limit the time allows); an estimate's time grows with depth, "
                        "so large budgets (12GiB), whose search reaches thousands of layers, need it")
    parser.add_argument("--backend", choices=("auto", "meta", "fake"), default="auto",
                        help="estimate backend: meta (fastest), fake (FakeTensorMode) or auto (the default: meta, "
                        "else fake)")
    parser.add_argument("--device", type=device_name, default="auto",
                        help="with a GPU, the depth found is checked for real there (auto: GPU if any)")
    parser.add_argument("--no-verify", action="store_true",
                        help="do not check the result for real on the GPU (GPU runs only: on a CPU nothing is checked, and "
                        "the option is an error)")
    parser.add_argument("--out", type=output_path, default=Path("effdense_results"), help="output folder (JSON and CSV; default: effdense_results)")


def depth_of(n: int) -> int:
    return 4 + 6 * n


def _largest_fitting(coeffs: np.ndarray, budget: float, lo: int, hi: int) -> int | None:
    """Largest integer ``n`` in ``(lo, hi)`` with ``poly(n) <= budget`` by the fitted polynomial."""
    poly = np.poly1d(coeffs)
    roots = [r.real for r in (poly - budget).roots if abs(r.imag) < 1e-9 and lo < r.real < hi]
    if not roots:
        return None
    return int(math.floor(min(roots)))


def search(
    peak_of: Callable[[int], int], budget: int, n_max: int, on_estimate: Callable[[int, int], None] | None = None
) -> tuple[int, dict[int, int]]:
    """Largest ``n`` in ``[0, n_max]`` with ``peak_of(n) <= budget`` (0: not even ``n=1`` fits), assuming the
    peak grows with ``n``. Returns it and every estimate made (``{n: bytes}``)."""
    evals: dict[int, int] = {}

    def fits(n: int) -> bool:
        if n not in evals:
            evals[n] = peak_of(n)
            if on_estimate:
                on_estimate(n, evals[n])
        return evals[n] <= budget

    lo, hi = 0, n_max + 1  # lo fits (0: nothing yet), hi does not (n_max + 1: beyond the limit)
    for n in (1, 4, 8):  # cheap points that seed the fit
        if n >= hi:
            break
        if fits(n):
            lo = n
        else:
            hi = n
            break
    stalled = 0
    while hi - lo > 1:
        points = sorted(evals)
        # the three estimates closest to the bracket carry the local curvature best
        near = sorted(points, key=lambda n: min(abs(n - lo), abs(n - hi)))[:3]
        guess = None
        if len(near) >= 3 and stalled < 2:
            xs = np.array(near, dtype=float)
            ys = np.array([evals[n] for n in near], dtype=float)
            guess = _largest_fitting(np.polyfit(xs, ys, 2), budget, lo, hi)
            if guess is None and evals.get(lo, 0) < budget:
                guess = hi - 1 if hi <= n_max else None
        if guess is None or stalled >= 2:
            guess = (lo + hi) // 2 if hi <= n_max else min(n_max, max(2 * lo, lo + 1))
            stalled = 0
        n = min(max(guess, lo + 1), hi - 1)
        if fits(n):
            # a guess that fits tends to be just under the crossing: test one step further at once
            stalled = stalled + 1 if n - lo < (hi - lo) / 4 else 0
            lo = n
            if n + 1 < hi and fits(n + 1):
                lo = n + 1
            elif n + 1 < hi:
                hi = n + 1
        else:
            stalled = stalled + 1 if hi - n < (hi - lo) / 4 else 0
            hi = n
    return lo, evals


def main(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    available = _strategies.available()
    names = args.strategies if args.strategies is not None else list(available)
    n_max = (args.depth_limit - 4) // 6
    if n_max < 1:
        raise UsageError(f"--depth-limit {args.depth_limit} allows no DenseNet-BC; it must be at least 10")
    if args.no_verify and device.type != "cuda":  # as the other options with no effect
        raise UsageError(f"--no-verify has no effect on {device.type}: only a GPU run checks the depth found for real")
    if args.estimate_limit is not None and args.estimate_limit < depth_of(1):
        raise UsageError(f"--estimate-limit {args.estimate_limit} allows no DenseNet-BC; it must be at least {depth_of(1)}")
    if args.estimate_limit is not None and args.estimate_limit >= depth_of(n_max):
        raise UsageError(
            f"--estimate-limit {args.estimate_limit} has no effect with --depth-limit {args.depth_limit}: no model "
            f"searched is deeper than {depth_of(n_max)}, so every one is estimated"
        )
    if args.estimate_limit is not None and args.estimate_limit < depth_of(3):
        # (below it the fit had fewer than three points, and the search estimated past the limit)
        raise UsageError(
            f"--estimate-limit {args.estimate_limit} leaves fewer than the three estimated models that deeper ones "
            f"are fitted through (depths {depth_of(1)}, {depth_of(2)}, {depth_of(3)}); it must be at least {depth_of(3)}"
        )
    # the shallowest model stands for all: the same input size at every depth
    require_image_size(
        get_model(f"densenet_bc_{depth_of(1)}", strategy="naive"), args.image_size, "DenseNet-BC", batch_size=args.batch_size
    )
    if args.backend == "meta" and DTYPES[args.dtype] is not None:
        raise UsageError(
            f"--backend meta cannot estimate --dtype {args.dtype} (autocast has no meta device); use --backend auto or fake"
        )
    # whole MiB name the file in MiB, other budgets in bytes (so budgets under 1 MiB get distinct names)
    budget = f"{args.budget >> 20}MiB" if args.budget % (1 << 20) == 0 else f"{args.budget}B"
    # (a GPU run, or one of some strategies, is named so: it does not overwrite a CPU run, or one of all of them)
    stem = (f"max_depth_{budget}_k{args.growth_rate}_b{args.batch_size}_{args.image_size}px_{args.dtype}"
            + ("_cuda" if device.type == "cuda" else "") + selection_tag(names, available))
    output_dir(args.out, (f"{stem}.json", f"{stem}.csv"))
    env = environment(device)
    settings = {
        "budget_bytes": args.budget, "budget_mib": mib(args.budget), "growth_rate": args.growth_rate,
        "batch_size": args.batch_size, "image_size": args.image_size, "dtype": args.dtype,
        "depth_limit": args.depth_limit, "estimate_limit": args.estimate_limit, "backend": args.backend,
        "strategies": names,
    }  # fmt: skip
    shape = (args.batch_size, 3, args.image_size, args.image_size)
    autocast = DTYPES[args.dtype]
    # on a GPU, fake CUDA tensors: strategies take their CUDA paths (fused: the Triton kernels' fake ops)
    estimate_device = str(device) if device.type == "cuda" else "cpu"
    progress(
        f"effdense max-depth: budget {format_bytes(args.budget)}, DenseNet-BC k={args.growth_rate}, batch "
        f"{args.batch_size}, {args.image_size}x{args.image_size}, {args.dtype}; strategies {', '.join(names)}"
    )
    results: list[dict[str, Any]] = []
    for s in names:
        row: dict[str, Any] = {"strategy": s, **settings}
        if s not in available:
            row.update(status="skipped", note="not implemented yet")
            results.append(row)
            progress(f"{s}: skipped (not implemented yet)")
            continue
        start = time.perf_counter()

        exact: dict[int, int] = {}

        def peak_of(n: int, s: str = s) -> int:
            if n in exact:
                return exact[n]
            if args.estimate_limit and depth_of(n) > args.estimate_limit and len(exact) >= 3:
                deepest = sorted(exact)[-3:]
                coeffs = np.polyfit(np.array(deepest, float), np.array([exact[m] for m in deepest], float), 2)
                return int(np.poly1d(coeffs)(n))
            t = time.perf_counter()
            est = estimate_step(
                f"densenet_bc_{depth_of(n)}", shape, strategy=s, growth_rate=args.growth_rate,
                autocast_dtype=autocast, backend=args.backend, device=estimate_device,
            )  # fmt: skip
            progress(f"  {s}: depth {depth_of(n)}: {format_bytes(est.peak)} ({time.perf_counter() - t:.1f} s)")
            exact[n] = est.peak
            return est.peak

        try:
            if args.estimate_limit:  # anchor the fit at the deepest affordable models, not at tiny ones
                n_lim = min(n_max, (args.estimate_limit - 4) // 6)
                for m in sorted({max(1, n_lim // 2), max(1, 3 * n_lim // 4), n_lim}):
                    if peak_of(m) > args.budget:
                        break
            n, evals = search(peak_of, args.budget, n_max)
        except Exception as exc:
            row.update(status="error", note=error_note(exc))
            results.append(row)
            progress(f"{s}: error {row['note']}")
            continue
        row.update(
            status="ok" if n else "none fits",
            max_depth=depth_of(n) if n else None,
            layers_per_block=n or None,
            peak_mib=mib(evals[n]) if n else None,
            next_depth=depth_of(n + 1) if n + 1 in evals else None,
            next_peak_mib=mib(evals[n + 1]) if n + 1 in evals else None,
            estimates=len(evals),
            seconds=round(time.perf_counter() - start, 1),
        )
        if n == n_max:
            row["note"] = f"reached --depth-limit {args.depth_limit}"
        if n and (n not in exact or (n + 1 <= n_max and n + 1 not in exact)):
            row["status"] = "extrapolated"
            fit = (f"fit through estimates at depths {[depth_of(m) for m in sorted(exact)[-3:]]}; "
                   f"deeper models not estimated (--estimate-limit {args.estimate_limit})")
            # (both notes: before, the fit's replaced the depth limit's, and the files lost "deeper may fit")
            row["note"] = f"{row['note']}; {fit}" if row.get("note") else fit
        row["estimates"] = len(exact)
        if n and device.type == "cuda" and not args.no_verify:
            row.update(_verify(s, depth_of(n), args, device, shape, autocast))
        results.append(row)
        if n:
            found = f"max depth {row['max_depth']} ({row['peak_mib']:,.1f} MiB)"
            if row["status"] == "extrapolated":  # (the line read as a measured result; the table said otherwise)
                found += (f", extrapolated past depth {depth_of(max(exact))}" if n not in exact
                          else ", the next depth's memory extrapolated")
            if n == n_max:  # the search stopped at the limit, not at the budget
                found += f", the deepest that --depth-limit {args.depth_limit} allows: deeper may fit too"
        else:
            shallowest = f", needs {mib(evals[1]):,.1f} MiB" if 1 in evals else ""
            found = f"no depth fits the budget (the shallowest, depth {depth_of(1)}{shallowest})"
        progress(f"{s}: {found}, {row['estimates']} estimates in {row['seconds']} s")
    for r in results:
        r.update({k: env[k] for k in ("device_name", "torch", "git_commit", "command")})
    print(format_table(results, (
        ("strategy", "strategy", str),
        ("max_depth", "max depth", str),
        ("peak_mib", "peak MiB", lambda v: f"{v:,.1f}"),
        ("next_peak_mib", "next depth MiB", lambda v: f"{v:,.1f}"),
        ("estimates", "estimates", str),
        ("seconds", "s", str),
        ("verified_peak_mib", "GPU MiB", lambda v: f"{v:,.1f}"),
        ("status", "status", str),
        ("note", "note", str),  # (a depth capped by --depth-limit, an extrapolation: the status alone said ok)
    )))  # fmt: skip
    json_path, csv_path = args.out / f"{stem}.json", args.out / f"{stem}.csv"
    write_json(json_path, {"meta": {**env, **settings}, "rows": results})
    write_csv(csv_path, results, CSV_COLUMNS)
    print(f"wrote {json_path} and {csv_path}")
    return exit_code("max-depth", [r["strategy"] for r in results if r["status"] == "error"], len(results), ("strategy", "strategies"))


def _verify(strategy: str, depth: int, args: argparse.Namespace, device: torch.device, shape, autocast) -> dict[str, Any]:
    """Build the model found and measure its step on the GPU."""
    free_memory(device)
    try:
        model = get_model(f"densenet_bc_{depth}", strategy=strategy, growth_rate=args.growth_rate).to(device)
        mem = measure_step(model, torch.randn(shape, device=device), autocast_dtype=autocast)
        del model
        return {"verified_peak_mib": mib(mem.peak), "verified_fits": mem.peak <= args.budget}
    except torch.cuda.OutOfMemoryError:
        return {"verified_peak_mib": None, "verified_fits": False, "note": "out of memory on the GPU"}
    finally:
        free_memory(device)
