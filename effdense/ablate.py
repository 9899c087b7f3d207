"""``effdense ablate``: a grid over strategies x policy knobs x depth x growth rate x batch x dtype.

Every grid point is one CIFAR DenseNet-BC (``densenet_bc_<depth>``, growth rate ``k``) at one batch size
and dtype. Memory is the training-step peak, measured exactly (``--device``) or estimated without
allocating (``--estimate``); ``--time`` adds the median step time. Rows are appended to ``ablate.csv`` as
they finish, and a rerun skips the points already in it (resumable). Plots are drawn from the CSV:

- ``ablate_depth.png``: peak memory against depth, one line per strategy/policy (as in Pleiss et al.'s
  memory-efficient DenseNet report, figure 3);
- ``ablate_batch.png``: peak memory against batch size at the largest depth;
- ``ablate_time.png``: step time relative to ``naive`` against depth (with ``--time``).

Policy knobs (:class:`effdense.Policy` fields) only matter to ``shared`` and ``fused``; ``--vary`` lists
the fields that take both values, the others keep their defaults.

Options that would change nothing are errors: ``--steps``/``--warmup`` without ``--time``, ``--device``
with ``--estimate`` and no ``--time``, ``--vary`` when the grid has neither ``shared`` nor ``fused``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import itertools
import math
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from effdense import strategies as _strategies
from effdense.benchutil import (
    DTYPES,
    UsageError,
    add_threads_argument,
    append_csv,
    apply_threads,
    comma_items,
    device_name,
    dtype_list,
    environment,
    error_note,
    exit_code,
    free_memory,
    fused_note,
    int_list,
    nonnegative_int,
    output_dir,
    output_path,
    positive_int,
    progress,
    quantiles,
    reject_ineffective,
    require_image_size,
    resolve_device,
    strategy_list,
    time_steps,
    write_csv,
)
from effdense.densenet import cifar_layers_per_block, get_model
from effdense.memory import estimate_step, measure_step, mib
from effdense.strategies import Policy

POLICY_FIELDS = tuple(f.name for f in dataclasses.fields(Policy))
POLICY_STRATEGIES = ("shared", "fused")  # the strategies that read a Policy

KEY_COLUMNS = ("strategy", "policy", "depth", "growth_rate", "batch_size", "dtype", "image_size", "memory_mode", "device_type")
CSV_COLUMNS = (
    *KEY_COLUMNS, *POLICY_FIELDS, "status", "peak_mib", "activations_mib", "params_mib", "peak_bytes",
    "time_ms", "time_ms_p20", "time_ms_p80", "timed_steps", "seconds", "note", "device_name", "torch", "git_commit",
    "steps", "warmup", "command",
)  # fmt: skip
# columns that earlier versions did not write: a file with all the others gets them added (empty) on its next run
_ADDED_COLUMNS = ("steps", "warmup", "command")


TIME_DEFAULTS = {"steps": 10, "warmup": 1}
"""``--steps``/``--warmup`` when ``--time`` is given (without it they are errors: they would do nothing)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--strategies", type=strategy_list, default=None, help="'all' (default) or a comma list")
    parser.add_argument("--vary", type=_policy_fields, default=[],
                        help=f"Policy fields to try both ways for shared/fused: 'all' or a comma list of {', '.join(POLICY_FIELDS)} "
                        "(default: none, the default Policy only)")
    parser.add_argument("--depths", type=_depth_list, default=[40, 100, 160, 220],
                        help="DenseNet-BC depths (4+6n), comma list; default 40,100,160,220")
    parser.add_argument("--growth-rates", type=int_list, default=[12], help="comma list; default 12")
    parser.add_argument("--batch-sizes", type=int_list, default=[64], help="comma list; default 64")
    parser.add_argument("--dtypes", type=dtype_list, default=["fp32"], help="comma list of fp32, bf16, fp16 (default fp32)")
    parser.add_argument("--image-size", type=positive_int, default=32, help="default 32")
    parser.add_argument("--estimate", action="store_true",
                        help="estimate memory without allocating (FakeTensor/meta) instead of measuring it")
    parser.add_argument("--time", action="store_true", help="also time training steps (real runs)")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help=f"timed steps per point (with --time only); default {TIME_DEFAULTS['steps']}")
    parser.add_argument("--warmup", type=nonnegative_int, default=None,
                        help=f"untimed steps first (with --time only); default {TIME_DEFAULTS['warmup']}")
    parser.add_argument("--device", type=device_name, default=None,
                        help="auto (default: GPU if any), cpu or cuda[:N]: where memory is measured and steps timed "
                        "(with --estimate, only with --time)")
    add_threads_argument(parser)
    parser.add_argument("--out", type=output_path, default=Path("effdense_results"), help="folder of ablate.csv and the plots (default: effdense_results)")
    parser.add_argument("--no-plots", action="store_true", help="CSV only")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _policy_fields(text: str) -> list[str]:
    if text.strip() == "all":
        return list(POLICY_FIELDS)
    names = comma_items(text)
    if not names:  # as --strategies "": an empty value is a mistake, not "vary nothing" (leave --vary out for that)
        raise argparse.ArgumentTypeError(f"no Policy field in {text!r}; expected 'all' or a comma list of {', '.join(POLICY_FIELDS)}")
    for n in names:
        if n not in POLICY_FIELDS:
            raise argparse.ArgumentTypeError(f"unknown Policy field {n!r}; expected 'all' or some of {', '.join(POLICY_FIELDS)}")
    return names


def _depth_list(text: str) -> list[int]:
    depths = int_list(text)
    for d in depths:
        try:
            cifar_layers_per_block(d, bottleneck=True)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return depths


def policy_label(policy: Policy | None) -> str:
    """``"-"`` (no policy), ``"default"`` or the fields that differ from the default: ``"cache_stats=0"``."""
    if policy is None:
        return "-"
    changed = [f"{n}={int(getattr(policy, n))}" for n in POLICY_FIELDS if getattr(policy, n) != getattr(Policy(), n)]
    return ",".join(changed) or "default"


def grid(args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    """Every grid point as a dict of the key columns (plus ``policy_obj`` and ``available``)."""
    available = _strategies.available()
    names = args.strategies if args.strategies is not None else list(available)
    policies = [Policy()]
    for values in itertools.product((True, False), repeat=len(args.vary)):
        if args.vary:
            policies.append(Policy(**dict(zip(args.vary, values))))
    policies = list(dict.fromkeys(policies))
    for s, depth, k, batch, dtype in itertools.product(names, args.depths, args.growth_rates, args.batch_sizes, args.dtypes):
        for policy in policies if s in POLICY_STRATEGIES else [None]:
            yield {
                "strategy": s, "policy": policy_label(policy), "depth": depth, "growth_rate": k,
                "batch_size": batch, "dtype": dtype, "image_size": args.image_size,
                "policy_obj": policy, "available": s in available,
            }  # fmt: skip


def _key(row: dict[str, Any]) -> tuple[str, ...]:
    return tuple(str(row[c]) for c in KEY_COLUMNS)


def read_rows(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    try:
        with path.open(newline="") as f:
            return list(csv.DictReader(f))
    except UnicodeDecodeError as exc:  # (read for the points already done, before any point runs)
        raise _not_text(path, exc) from None


def _not_text(path: Path, exc: UnicodeDecodeError) -> UsageError:
    return UsageError(
        f"{path} is not a CSV file that ablate writes (not text: {exc.reason} at byte {exc.start}); give another "
        "--out, or move the file away"
    )


def _check_header(path: Path) -> None:
    """An ``ablate.csv`` already in ``--out`` gets rows appended: its header must be this version's columns.
    (Another file's header took the rows under its own names, and an older version's gave ragged rows.) A
    file of the version before ``steps``, ``warmup`` and ``command`` were recorded is rewritten with them,
    empty in its rows."""
    if not path.exists() or path.stat().st_size == 0:
        return
    try:
        with path.open(newline="") as f:
            header = next(csv.reader(f), [])
    except UnicodeDecodeError as exc:  # (past the header: read_rows says it)
        raise _not_text(path, exc) from None
    if header == [c for c in CSV_COLUMNS if c not in _ADDED_COLUMNS]:
        rows = read_rows(path)
        write_csv(path, rows, CSV_COLUMNS)  # (replaces the file in one step: an interrupt loses no row)
        progress(f"{path}: added the columns {', '.join(_ADDED_COLUMNS)} (empty in its {len(rows)} earlier rows)")
        return
    if header != list(CSV_COLUMNS):
        missing = [c for c in CSV_COLUMNS if c not in header]
        extra = [c for c in header if c not in CSV_COLUMNS]
        what = "; ".join(x for x in (f"missing {', '.join(missing)}" if missing else "",
                                      f"unknown {', '.join(extra)}" if extra else "") if x) or "in another order"
        raise UsageError(
            f"{path} has other columns than this version of ablate writes ({what}); give another --out, or move "
            "the file away (ablate appends to its own CSV and skips the points already in it)"
        )


def _device_type(args: argparse.Namespace, device: torch.device) -> str:
    """Where a row is measured: estimates on the CPU, times (and exact memory) on ``--device``. (Before, a
    GPU-timed ``--estimate`` row said cpu, and a later CPU-timed run took its GPU times for its own.)"""
    return "cpu" if args.estimate and not args.time else device.type


def _run_point(point: dict[str, Any], args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    shape = (point["batch_size"], 3, point["image_size"], point["image_size"])
    autocast = DTYPES[point["dtype"]]
    name = f"densenet_bc_{point['depth']}"
    kwargs = dict(strategy=point["strategy"], growth_rate=point["growth_rate"])
    policy = point["policy_obj"]
    out: dict[str, Any] = {}
    if args.estimate:
        mem = estimate_step(name, shape, autocast_dtype=autocast, policy=policy, backend="auto", **kwargs)
    else:
        free_memory(device)
        torch.manual_seed(0)
        model = get_model(name, policy=policy, **kwargs).to(device)
        x = torch.randn(shape, device=device)
        mem = measure_step(model, x, autocast_dtype=autocast)
        del model, x
    out.update(peak_bytes=mem.peak, peak_mib=mib(mem.peak), activations_mib=mib(mem.activations), params_mib=mib(mem.params))
    if args.time:
        free_memory(device)
        torch.manual_seed(0)
        model = get_model(name, policy=policy, **kwargs).to(device)
        x = torch.randn(shape, device=device)
        times = time_steps(model, x, steps=args.steps, warmup=args.warmup, autocast_dtype=autocast)
        out.update(quantiles(times), timed_steps=len(times))
        del model, x
    free_memory(device)
    return out


def _reject_ineffective_options(args: argparse.Namespace) -> None:
    """Options given that would change nothing are errors (see :func:`effdense.benchutil.reject_ineffective`)."""
    if not args.time:
        reject_ineffective(args, ("--steps", "--warmup", "--threads"), "without --time (nothing is timed)")
        if args.estimate:
            reject_ineffective(args, ("--device",), "with --estimate unless --time is given (estimates run on the CPU)")
    if args.vary:
        names = args.strategies if args.strategies is not None else list(_strategies.available())
        if not set(names) & set(POLICY_STRATEGIES):
            raise UsageError(
                f"--vary has no effect: Policy fields matter only to {' and '.join(POLICY_STRATEGIES)}, "
                f"and the grid has {', '.join(names) or 'no strategy'}"
            )


def main(args: argparse.Namespace) -> int:
    _reject_ineffective_options(args)
    for key, value in TIME_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.device is None:
        args.device = "auto"
    apply_threads(args)
    device = resolve_device(args.device)
    # every grid model is a 3-block DenseNet-BC, whatever its depth and growth rate: one probe says how small
    # an input they take (before: each point failed on its own, the run exited 0 with a CSV of errors)
    require_image_size(
        get_model(f"densenet_bc_{min(args.depths)}", strategy="naive"), args.image_size, "DenseNet-BC",
        batch_size=min(args.batch_sizes), batch_option="--batch-sizes",
    )  # fmt: skip
    points = list(grid(args))
    if not points:
        raise UsageError("the grid is empty: give at least one strategy, depth, growth rate, batch size and dtype")
    runnable = [p for p in points if p["available"]]
    if not runnable:
        raise UsageError(
            f"no strategy of the grid is available ({', '.join(sorted({p['strategy'] for p in points}))}); "
            f"available now: {', '.join(_strategies.available())}"
        )
    mode = "estimate" if args.estimate else "exact"
    for p in points:
        p.update(memory_mode=mode, device_type=_device_type(args, device))
        for f in POLICY_FIELDS:
            p[f] = "" if p["policy_obj"] is None else int(getattr(p["policy_obj"], f))
    if not args.no_plots:  # (before any point runs: it was a traceback after the whole grid)
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UsageError(
                "the plots need matplotlib, which is not installed: pip install 'effdense[plot]' (or matplotlib), "
                "or pass --no-plots for the CSV alone"
            ) from None
    output_dir(args.out, ("ablate.csv",) + (() if args.no_plots else ("ablate_depth.png", "ablate_batch.png", "ablate_time.png")))
    csv_path = args.out / "ablate.csv"
    _check_header(csv_path)
    env = environment(device)
    timing = {"steps": args.steps, "warmup": args.warmup} if args.time else {"steps": "", "warmup": ""}
    # a point is done when a row of it was measured by this code (commit) and torch, and timed as this run
    # times (a point measured without --time, with other --steps/--warmup, or on another device, GPU model or
    # CPU thread count, device_name, is not done for a timed run): the rest runs again, and the newer row wins
    # (in the plots too). Judged on each point's newest row: one that failed since runs again (before, an older
    # ok row kept it done, and the plots, which draw the newest row, left it out for good)
    newest = {_key(r): r for r in read_rows(csv_path)}  # (each point's newest row, which the plots draw)
    done = {
        key for key, r in newest.items()
        if r.get("git_commit") == env["git_commit"] and r.get("torch") == env["torch"]
        and (r.get("status") == "skipped" or (r.get("status") == "ok" and (not args.time or (
            r.get("time_ms") and r.get("steps") == str(args.steps) and r.get("warmup") == str(args.warmup)
            and r.get("device_name") == env["device_name"]))))
    }  # fmt: skip
    todo = [p for p in points if _key(p) not in done]
    progress(
        f"effdense ablate: {len(points)} grid point{'s' * (len(points) != 1)}, {len(points) - len(todo)} already in {csv_path}, "
        f"{len(todo)} to run ({mode} memory{', timed' if args.time else ''}, {env['device_name']})"
    )
    bar = _progress_bar(len(todo), disable=args.no_progress)
    failed: list[str] = []
    for p in todo:
        label = f"{p['strategy']}[{p['policy']}] d={p['depth']} k={p['growth_rate']} b={p['batch_size']} {p['dtype']}"
        bar.set_description(label)
        row = {**p, **timing, "device_name": env["device_name"], "torch": env["torch"],
               "git_commit": env["git_commit"], "command": env["command"]}  # fmt: skip
        start = time.perf_counter()
        if not p["available"]:
            row.update(status="skipped", note="not implemented yet")
        else:
            try:
                row.update(status="ok", **_run_point(p, args, device))
                if p["strategy"] == "fused" and (args.time or not args.estimate):  # (an estimate runs no kernel)
                    row["note"] = fused_note(device)  # (as bench notes it)
            except Exception as exc:  # one point failing (out of memory, say) must not end the grid
                free_memory(device)
                row.update(status="error", note=error_note(exc))
                failed.append(label)
        row["seconds"] = round(time.perf_counter() - start, 2)
        append_csv(csv_path, row, CSV_COLUMNS)
        bar.update(1)
        if row["status"] != "ok":
            bar.write(f"{label}: {row['status']} {row.get('note', '')}")
    bar.close()
    print(f"wrote {csv_path}" if todo else f"{csv_path}: " + (f"all {len(points)} grid points" if len(points) != 1 else "its one grid point") + " already there; nothing run")
    if not args.no_plots:
        written = plot(csv_path, args.out, keys={_key(p) for p in points})
        for path in written:
            print(f"wrote {path}")
        names = {p.name for p in written}
        reasons = [("ablate_depth.png", "its x axis needs two or more depths measured at one batch size"),
                   ("ablate_batch.png", "its x axis needs two or more batch sizes measured at one depth")]
        if args.time:
            reasons.append(("ablate_time.png", "it needs naive in the grid (times are relative to naive's) and two "
                            "or more depths timed"))
        for name, why in reasons:
            if name not in names:
                stale = " (the file there is from an earlier run)" if (args.out / name).exists() else ""
                print(f"{name} not drawn: {why}{stale}")
    return exit_code("ablate", failed, len(todo), ("grid point", "grid points"))


class _LineBar:
    """Stand-in for tqdm: a line per point on stderr."""

    def __init__(self, total: int, disable: bool) -> None:
        self.total, self.n, self.disable, self.desc = total, 0, disable, ""

    def set_description(self, desc: str) -> None:
        self.desc = desc

    def update(self, n: int) -> None:
        self.n += n
        if not self.disable:
            progress(f"[{self.n}/{self.total}] {self.desc}")

    def write(self, text: str) -> None:
        progress(text)

    def close(self) -> None:
        pass


def _progress_bar(total: int, disable: bool) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:
        return _LineBar(total, disable)
    return tqdm(total=total, disable=disable, unit="point", dynamic_ncols=True)


# ------------------------------------------------------------------------------------------------
# Plots (from the CSV alone)


def _series_label(r: dict[str, str]) -> str:
    return r["strategy"] if r["policy"] in ("-", "default") else f"{r['strategy']} ({r['policy']})"


def _common(rows: list[dict[str, str]], column: str) -> str:
    """The most frequent value of ``column`` (the slice a plot shows)."""
    values = [r[column] for r in rows]
    return max(dict.fromkeys(values), key=values.count)


_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
_LINESTYLES = ("-", "--", "-.", ":")


_NUMBER_COLUMNS = ("depth", "growth_rate", "batch_size", "image_size", "peak_mib", "time_ms")


def _check_numbers(csv_path: Path, n: int, r: dict[str, str]) -> None:
    """An ok row's numbers, which the plots read, are numbers (``time_ms`` may be empty): a value edited or
    corrupted by hand is named, where the plot step ended in a traceback after the whole grid had run."""
    for column in _NUMBER_COLUMNS:
        value = r.get(column) or ""
        if column == "time_ms" and not value:
            continue
        try:
            float(value)
        except ValueError:
            raise UsageError(
                f"{csv_path}: data row {n} ({r.get('strategy')} depth {r.get('depth')} batch {r.get('batch_size')}) has "
                f"{column}={value!r}, not a number; correct or delete the row (plots are drawn from the CSV), or give "
                "another --out"
            ) from None


def _widest_slice(rows: list[dict[str, str]], k: str, dtype: str, fixed: str, x: str) -> str:
    """The value of column ``fixed`` (among rows of growth rate ``k`` and ``dtype``) at which a plot over ``x``
    is drawn: the largest at which two or more values of ``x`` were measured, else the largest."""
    xs: dict[str, set[str]] = {}
    for r in rows:
        if r["growth_rate"] == k and r["dtype"] == dtype:
            xs.setdefault(r[fixed], set()).add(r[x])
    return max(xs, key=lambda v: (len(xs[v]) >= 2, float(v)))


def plot(csv_path: Path, out_dir: Path, keys: set[tuple[str, ...]] | None = None) -> list[Path]:
    """Draw the ablation plots from ``csv_path`` into ``out_dir``; returns the files written.

    ``keys``: only the rows of these grid points (the grid just run; earlier grids in the same CSV, at
    another image size say, would mix into its lines). A point with several rows is drawn from the last (not at
    all when the last is not ``ok``: it failed since). A plot whose x axis would hold one value (one depth, one batch size) is not drawn.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    latest: dict[tuple[str, ...], tuple[int, dict[str, str]]] = {}
    for n, r in enumerate(read_rows(csv_path), start=1):
        latest[_key(r)] = (n, r)  # the newest row of each point, whatever its status: a point that failed in
        # the latest run is not drawn from an older ok row (before, the plot showed that row's figure)
    rows = []
    for key, (n, r) in latest.items():
        if r.get("status") == "ok" and (keys is None or key in keys):
            _check_numbers(csv_path, n, r)
            rows.append(r)
    if not rows:
        return []
    written: list[Path] = []
    mode = _common(rows, "memory_mode")
    rows = [r for r in rows if r["memory_mode"] == mode]
    # (growth rate and dtype together: the most common of each alone might share no row)
    pairs = [(r["growth_rate"], r["dtype"]) for r in rows]
    k, dtype = max(dict.fromkeys(pairs), key=pairs.count)
    size = _common(rows, "image_size")
    # each plot's fixed value: the largest batch (depth) at which two or more depths (batch sizes) were measured,
    # else the largest (before, the largest alone: one failed corner of the grid, the largest depth at the
    # largest batch, left each plot a single x value, and neither was drawn)
    batch = _widest_slice(rows, k, dtype, "batch_size", "depth")
    device = _common(rows, "device_type")
    what = "estimated" if mode == "estimate" else f"measured, {device}"

    def series(xcol: str, ycol: str, fixed: dict[str, str]) -> dict[str, list[tuple[float, float]]]:
        out: dict[str, list[tuple[float, float]]] = {}
        for r in rows:
            if all(r[c] == v for c, v in fixed.items()) and r.get(ycol):
                out.setdefault(_series_label(r), []).append((float(r[xcol]), float(r[ycol])))
        return {label: sorted(pts) for label, pts in out.items()}

    def draw(data, xlabel, ylabel, title, name, logy=False, hline=None) -> None:
        if len({x for pts in data.values() for x, _ in pts}) < 2:  # no series, or one x value: no line to draw
            return
        many = len(data) > 6  # the legend beside the axes, not over the lines
        fig, ax = plt.subplots(figsize=(10, 4.5) if many else (7, 4.5))
        for i, (label, pts) in enumerate(data.items()):
            # a (colour, marker) pair of its own for each of up to 40 series (10 colours x 8 markers), and the
            # line style changes every 10: series drawn in matplotlib's default cycle repeated after 10
            ax.plot(
                [p[0] for p in pts], [p[1] for p in pts], label=label, color=f"C{i % 10}",
                marker=_MARKERS[i % len(_MARKERS)], linestyle=_LINESTYLES[(i // 10) % len(_LINESTYLES)],
            )  # fmt: skip
        if hline is not None:
            ax.axhline(hline, color="grey", linestyle=":", linewidth=1)
        if logy:
            ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # depths and batch sizes
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3)
        if many:
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
        else:
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)

    by_depth = series("depth", "peak_mib", {"growth_rate": k, "batch_size": batch, "dtype": dtype})
    draw(by_depth, "depth (layers)", "peak training-step memory (MiB)",
         f"Peak memory vs depth: DenseNet-BC, k={k}, batch {batch}, {size}x{size}, {dtype} ({what})", "ablate_depth.png")
    depth_max = _widest_slice(rows, k, dtype, "depth", "batch_size")
    by_batch = series("batch_size", "peak_mib", {"growth_rate": k, "depth": depth_max, "dtype": dtype})
    draw(by_batch, "batch size (images)", "peak training-step memory (MiB)",
         f"Peak memory vs batch: DenseNet-BC-{depth_max}, k={k}, {size}x{size}, {dtype} ({what})", "ablate_batch.png")

    timed = [r for r in rows if r.get("time_ms")]
    if timed:
        base = {
            (r["depth"], r["growth_rate"], r["batch_size"], r["dtype"]): float(r["time_ms"])
            for r in timed if r["strategy"] == "naive"
        }  # fmt: skip
        data: dict[str, list[tuple[float, float]]] = {}
        for r in timed:
            if (r["growth_rate"], r["batch_size"], r["dtype"]) != (k, batch, dtype):
                continue
            ref = base.get((r["depth"], r["growth_rate"], r["batch_size"], r["dtype"]))
            value = float(r["time_ms"]) / ref if ref else math.nan
            if not math.isnan(value):
                data.setdefault(_series_label(r), []).append((float(r["depth"]), value))
        data = {label: sorted(pts) for label, pts in data.items()}
        draw(data, "depth (layers)", "step time relative to naive (x)",
             f"Time overhead vs depth: DenseNet-BC, k={k}, batch {batch}, {dtype} ({timed[0]['device_type']})",
             "ablate_time.png", hline=1.0)
    return written
