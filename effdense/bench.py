"""``effdense bench``: every strategy on one model, with torchvision's DenseNets as reference rows.

Each row builds the model afresh from the same seed (so every row holds the same weights), measures the
peak memory of one training step (exact tracking on CPU, the CUDA allocator on a GPU; see
:mod:`effdense.memory`) and times training steps (forward, cross-entropy loss, backward; no optimizer),
reporting the median. Ratios are against the ``naive`` row, measured in the same process (without one, against
the first row that ran; the table's footer, the CSV's and the JSON's ``baseline_row`` name it).

Reference rows: torchvision's ``DenseNet`` plain and with ``memory_efficient=True`` (for the ImageNet
models torchvision builds, and for CIFAR DenseNet-BC models through torchvision's class with the CIFAR
stem swapped in), and on a GPU the plain one under ``torch.compile``. All load the effdense model's
weights, so every row computes the same function.
"""

from __future__ import annotations

import argparse
import importlib
import contextlib
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from effdense import strategies as _strategies
from effdense.benchutil import (
    DTYPES,
    AutocastInside,
    UsageError,
    add_threads_argument,
    apply_threads,
    comma_items,
    default_image_size,
    device_name,
    dtype_name,
    environment,
    error_note,
    exit_code,
    format_table,
    free_memory,
    fused_note,
    model_name,
    nonnegative_float,
    nonnegative_int,
    output_dir,
    output_path,
    positive_int,
    progress,
    quantiles,
    reject_ineffective,
    require_image_size,
    resolve_device,
    selection_tag,
    strategy_list,
    time_steps,
    write_csv,
    write_json,
)
from effdense.densenet import IMAGENET_CONFIGS, DenseNet, get_model
from effdense.memory import estimate_step, measure_step, mib

CSV_COLUMNS = (
    "row", "kind", "strategy", "status", "model", "batch_size", "image_size", "dtype", "channels_last",
    "peak_mib", "mem_ratio", "time_ms", "time_ms_p20", "time_ms_p80", "time_ratio", "timed_steps",
    "params_mib", "grads_mib", "grads_at_peak_mib", "buffers_mib", "input_mib", "activations_mib", "memory_mode",
    "baseline_row", "note",
    "device", "device_name", "torch", "torchvision", "triton", "git_commit", "command",
)  # fmt: skip


# Defaults per device. On a GPU a step of DenseNet-BC-100 takes tens of milliseconds: 20 timed steps after
# 3 warm-up steps. On a CPU it takes seconds (naive: 2.1 s on two quiet x86 cores, 10-20 s when other jobs
# share them), and the exact memory step cannot double as a timed one (it runs cold: first-touch page
# faults, oneDNN primitive creation), so a row is one memory step, which warms up, plus timed steps until
# 3 s are spent: one or two, so the default run (6 rows, 12-18 steps) takes under a minute on 2 quiet
# cores. The JSON records how many steps each median comes from (``timed_steps``); memory is exact whatever
# the timing settings.
GPU_DEFAULTS: dict[str, Any] = {"steps": 20, "warmup": 3, "max_seconds_per_row": 0.0}
CPU_DEFAULTS: dict[str, Any] = {"steps": 3, "warmup": 0, "max_seconds_per_row": 3.0}
MIN_TIMED_STEPS = 1

EPILOG = f"""\
Each row: build the model (same seed, same weights), one training step with memory measured (exact
tracking on CPU, torch.cuda.max_memory_allocated() on CUDA after a warm-up step), then the timed steps
(forward, cross-entropy, backward; no optimizer; median, 20/80 % quantiles).

default                 GPU     CPU
--steps                 {GPU_DEFAULTS['steps']:<8}{CPU_DEFAULTS['steps']}
--warmup                {GPU_DEFAULTS['warmup']:<8}{CPU_DEFAULTS['warmup']} (the memory step warms up)
--max-seconds-per-row   {'none':<8}{CPU_DEFAULTS['max_seconds_per_row']:g} (seconds of timed steps; at least {MIN_TIMED_STEPS} step is timed)

These three time steps; with --memory estimate or --no-timing nothing is timed, and giving them is an error.

With these, `effdense bench` (DenseNet-BC-100, batch 64, 32x32, fp32, 6 rows) took 48-54 s on two quiet x86
cores (several minutes when other jobs share them). CPU step times are for orientation only; compare
memory there, and time on a GPU.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--model", type=model_name, default="densenet_bc_100",
                        help="model name (effdense.MODELS, densenet_bc_<depth> or densenet_<depth>); default densenet_bc_100")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="default 64")
    parser.add_argument("--image-size", type=positive_int, default=None,
                        help="square input side; default 32 for CIFAR models, 224 for ImageNet ones")
    parser.add_argument("--strategies", type=strategy_list, default=None,
                        help="'all' (default: every available strategy) or a comma list, e.g. naive,checkpoint")
    parser.add_argument("--dtype", type=dtype_name, default="fp32", help="fp32 (default), or bf16/fp16 autocast")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help=f"most timed steps per row (median reported); default {GPU_DEFAULTS['steps']} on GPU, "
                        f"{CPU_DEFAULTS['steps']} on CPU")
    parser.add_argument("--warmup", type=nonnegative_int, default=None,
                        help=f"untimed steps before timing; default {GPU_DEFAULTS['warmup']} on GPU, "
                        f"{CPU_DEFAULTS['warmup']} on CPU (the memory step before it warms up)")
    parser.add_argument("--max-seconds-per-row", type=nonnegative_float, default=None,
                        help=f"stop timing a row once its timed steps took this long (at least "
                        f"{MIN_TIMED_STEPS} step); default: no limit on GPU, {CPU_DEFAULTS['max_seconds_per_row']:g} "
                        "on CPU; 0 means no limit")
    parser.add_argument("--device", type=device_name, default="auto", help="auto (GPU if any), cpu or cuda[:N]")
    add_threads_argument(parser)
    parser.add_argument("--memory", choices=("exact", "estimate"), default="exact",
                        help="exact (default): measured (tracked on CPU, allocator on CUDA); estimate: FakeTensor, no time")
    parser.add_argument("--reference", type=reference_list, default=None,
                        help="which torchvision rows: 'all' (default: every one the device runs, 'compile' on a GPU "
                        f"only) or a comma list of {', '.join(REFERENCE_ROWS)}")
    parser.add_argument("--no-reference", action="store_true", help="leave out the torchvision rows")
    parser.add_argument("--compile", action="store_true",
                        help="GPU only: also each effdense strategy under torch.compile (default mode), as rows "
                        "'effdense <strategy> compile' after the others")
    parser.add_argument("--no-timing", action="store_true", help="memory only")
    parser.add_argument("--channels-last", action="store_true", help="channels_last model and input")
    parser.add_argument("--out", type=output_path, default=Path("effdense_results"), help="output folder (JSON and CSV; default: effdense_results)")


# the torchvision rows --reference can choose, in the order they run
REFERENCE_ROWS = ("plain", "memory_efficient", "compile")


def reference_list(text: str) -> list[str]:
    """``all`` (``["all"]``: every row the device runs, as the default) or a comma list of
    :data:`REFERENCE_ROWS`, for ``--reference``."""
    if text.strip() == "all":
        return ["all"]  # (before: all three, and on a CPU the compiled row, which it cannot run, was an error)
    names = comma_items(text)
    if not names:
        raise argparse.ArgumentTypeError(f"no torchvision row in {text!r}; expected 'all' or e.g. plain,memory_efficient")
    for name in names:
        if name not in REFERENCE_ROWS:
            raise argparse.ArgumentTypeError(
                f"unknown torchvision row {name!r}; expected 'all' or a comma list of {', '.join(REFERENCE_ROWS)}"
            )
    return list(dict.fromkeys(names))


# ------------------------------------------------------------------------------------------------
# torchvision reference models


def torchvision_twin(model: DenseNet, memory_efficient: bool) -> nn.Module | None:
    """torchvision's ``DenseNet`` computing the same function as ``model``, with its weights, or ``None``
    when torchvision's class cannot express the model (no bottleneck, other compression)."""
    try:
        import torchvision
    except ImportError:
        return None
    blocks = model.dense_blocks
    first = blocks[0].layers[0]
    if not first.bottleneck or abs(model.compression - 0.5) > 1e-9:
        return None
    conv0 = model.features.conv0
    twin = torchvision.models.DenseNet(
        growth_rate=model.growth_rate,
        block_config=model.block_config,
        num_init_features=conv0.out_channels,
        bn_size=first.conv1.out_channels // model.growth_rate,
        drop_rate=first.drop_rate,
        num_classes=model.classifier.out_features,
        memory_efficient=memory_efficient,
    )
    if model.small_inputs:  # CIFAR stem: one 3x3 convolution, no norm/relu/pool
        twin.features.conv0 = nn.Conv2d(conv0.in_channels, conv0.out_channels, 3, padding=1, bias=False)
        del twin.features.norm0, twin.features.relu0, twin.features.pool0
    twin.load_state_dict(model.state_dict(), strict=True)
    return twin


def same_weight_builds(
    model_name: str, base: DenseNet, strategies: list[str], references: Sequence[str] = ("plain",)
) -> list[tuple[str, Callable[[], nn.Module | None]]]:
    """``(label, build)`` per row of the step scripts (``benchmarks/step_graph_time.py``, ``profile_step.py``):
    ``model_name`` under each strategy with ``base``'s weights, then torchvision's ``DenseNet`` with them, for
    each of ``references``: ``"plain"`` (row ``torchvision``) and ``"memory_efficient"`` (row ``torchvision
    memory_efficient``, its checkpointed model); those builds return None where torchvision's class cannot
    express the model."""
    unknown = [r for r in references if r not in ("plain", "memory_efficient")]
    if unknown:
        raise ValueError(f"references: expected 'plain' and/or 'memory_efficient', got {unknown}")
    def effdense_model(strategy: str) -> nn.Module:
        model = get_model(model_name, strategy=strategy)
        model.load_state_dict(base.state_dict())
        return model

    builds: list[tuple[str, Callable[[], nn.Module | None]]] = [
        (f"effdense {s}", lambda s=s: effdense_model(s)) for s in strategies
    ]
    for r in references:
        efficient = r == "memory_efficient"
        label = "torchvision memory_efficient" if efficient else "torchvision"
        builds.append((label, lambda efficient=efficient: torchvision_twin(base, memory_efficient=efficient)))
    return builds


def training_step(
    model: nn.Module, x: torch.Tensor, target: torch.Tensor, autocast: torch.dtype | None, zero_grad: bool = False
) -> Callable[[], None]:
    """One training step of the step scripts: forward (under autocast in ``autocast`` on x's device, unless
    None), cross-entropy in fp32 against ``target``, backward; no optimizer. ``zero_grad``: clear the
    gradients first (``set_to_none``); off where the caller clears them outside what it captures or times."""
    autocast_ctx = (lambda: torch.autocast(x.device.type, dtype=autocast)) if autocast is not None else contextlib.nullcontext

    def step() -> None:
        if zero_grad:
            model.zero_grad(set_to_none=True)
        with autocast_ctx():
            loss = F.cross_entropy(model(x).float(), target)
        loss.backward()

    return step


def measure_builds(
    builds: list[tuple[str, Callable[[], nn.Module | None]]],
    measure: Callable[[str, nn.Module], dict[str, Any]],
    device: torch.device,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    **fields: Any,
) -> list[dict[str, Any]]:
    """One row per build: ``{"row": label, **fields}`` updated with ``measure(label, model on device)``
    (which sets ``status``), or status ``skipped`` (no model) or ``error`` (the exception, first line): one
    failing row does not lose the others. Memory is freed between rows; ``on_row`` sees each finished row."""
    rows: list[dict[str, Any]] = []
    for name, build in builds:
        row: dict[str, Any] = {"row": name, **fields}
        model = None
        try:
            model = build()
            if model is None:
                row.update(status="skipped", note="torchvision's DenseNet class cannot express this model")
            else:
                row.update(measure(name, model.to(device)))
        except Exception as exc:
            row.update(status="error", note=error_note(exc))
        model = None  # a row that failed half-way frees its model too
        free_memory(device)
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows


# ------------------------------------------------------------------------------------------------
# Rows


# each torchvision row: its label, and the effdense strategy that computes as it does
_REFERENCE = {"plain": ("torchvision", "naive"), "memory_efficient": ("torchvision memory_efficient", "checkpoint"),
              "compile": ("torchvision compile", "naive")}  # fmt: skip


def _reference_unavailable(model_name: str) -> str | None:
    """Why torchvision's rows cannot run for ``model_name``, or None when they can."""
    try:
        importlib.import_module("torchvision")
    except ImportError:
        return "torchvision is not installed (pip install torchvision)"
    if model_name not in IMAGENET_CONFIGS and torchvision_twin(get_model(model_name, strategy="naive"), False) is None:
        return "torchvision's DenseNet class cannot express this model (no bottleneck, or a compression other than 0.5)"
    return None


def _reference_rows(args: argparse.Namespace, device: torch.device) -> list[str]:
    """The torchvision rows asked for: ``--no-reference`` none; ``--reference`` those it names (``compile`` on a
    GPU only: an error when named explicitly elsewhere); else all, the compiled one on a GPU only."""
    chosen = getattr(args, "reference", None)
    if getattr(args, "no_reference", False):
        return []
    if chosen is None or chosen == ["all"]:
        return [r for r in REFERENCE_ROWS if r != "compile" or device.type == "cuda"]
    return chosen


def _rows(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """The rows to run: label, kind, strategy, builder (None: skipped, with a note)."""
    available = _strategies.available()
    names = args.strategies if args.strategies is not None else list(available)

    def effdense_builder(strategy: str) -> Callable[[], nn.Module]:
        return lambda: get_model(args.model, strategy=strategy)

    rows: list[dict[str, Any]] = []
    for s in names:
        row = {"row": f"effdense {s}", "kind": "effdense", "strategy": s, "build": None, "note": ""}
        if s in available:
            row["build"] = effdense_builder(s)
            if s == "fused" and args.memory != "estimate":  # (an estimate runs no kernel, nor times one)
                row["note"] = fused_note(device)
        else:
            row["note"] = "not implemented yet"
        rows.append(row)
    reference = _reference_rows(args, device)
    why_not = _reference_unavailable(args.model) if reference else None
    if why_not is not None and getattr(args, "reference", None) is not None:  # (asked for: an error, before any row)
        raise UsageError(f"--reference {','.join(args.reference)}: {why_not}; leave --reference out")

    def tv_builder(me: bool, compiled: bool = False) -> Callable[[], nn.Module]:
        def build() -> nn.Module:
            twin = torchvision_twin(get_model(args.model, strategy="naive"), me)
            return _compiled(twin, args.dtype) if compiled else twin

        return build

    note = "" if args.model in IMAGENET_CONFIGS else "torchvision DenseNet class, CIFAR stem"
    for name in (n for n in REFERENCE_ROWS if n in reference):
        label, strategy = _REFERENCE[name]
        if why_not is not None:  # listed, skipped with the reason
            build, row_note = None, why_not
        else:
            build = tv_builder(name == "memory_efficient", compiled=name == "compile")
            row_note = "torch.compile, default mode" if name == "compile" else note
        rows.append({"row": label, "kind": "torchvision", "strategy": strategy, "build": build, "note": row_note})
    if getattr(args, "compile", False):  # last: a run cut short (compilation takes minutes) keeps the rows above
        for s in names:
            if s in available:
                rows.append({"row": f"effdense {s} compile", "kind": "effdense", "strategy": s,
                             "build": (lambda s=s: _compiled(get_model(args.model, strategy=s), args.dtype)),
                             "note": "torch.compile, default mode"})
    return rows


def _compiled(model: nn.Module, dtype: str) -> nn.Module:
    """``torch.compile(model)``; for a bf16/fp16 row with autocast entered inside the compiled call, which the
    row then measures and times without an autocast of its own (around the call, the shared/fused rows failed
    in dynamo: see :class:`effdense.benchutil.AutocastInside`)."""
    amp = DTYPES[dtype]
    if amp is not None:
        model = AutocastInside(model, lambda x: torch.autocast(x.device.type, dtype=amp))
    return torch.compile(model)


def _run_row(
    row: dict[str, Any], args: argparse.Namespace, device: torch.device, size: int, say: Callable[[str], None]
) -> dict[str, Any]:
    shape = (args.batch_size, 3, size, size)
    autocast = DTYPES[args.dtype]
    out: dict[str, Any] = {k: v for k, v in row.items() if k != "build"}
    if args.memory == "estimate":
        est = estimate_step(row["build"], shape, autocast_dtype=autocast, channels_last=args.channels_last, backend="auto")
        out.update(status="ok", memory_mode="estimate", **_memory_fields(est))
        return out
    free_memory(device)
    torch.manual_seed(0)
    model = row["build"]().to(device)
    x = torch.randn(shape, device=device)
    compiled = hasattr(model, "_orig_mod")
    if compiled and isinstance(model._orig_mod, AutocastInside):
        autocast = None  # entered inside the compiled model
    mem = measure_step(
        model, x, autocast_dtype=autocast, channels_last=args.channels_last,
        warmup=2 if compiled else None,  # compilation happens in the first steps, not in the measured one
        tracked=not compiled,
    )  # fmt: skip
    out.update(status="ok", memory_mode=mem.mode, **_memory_fields(mem))
    if not args.no_timing:  # --memory estimate returned above
        limit = f", at most {args.max_seconds_per_row:g} s" if args.max_seconds_per_row else ""
        say(f"{mib(mem.peak):,.1f} MiB ({mem.mode}); timing up to {args.steps} steps{limit}")
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        try:
            times = time_steps(
                model, x, steps=args.steps, warmup=args.warmup, autocast_dtype=autocast,
                max_seconds=args.max_seconds_per_row or None, min_steps=MIN_TIMED_STEPS,
            )  # fmt: skip
        except Exception as exc:  # the peak measured above stays in the row (it was lost with the row before)
            out.update(status="error", note=f"timing: {error_note(exc)}")
        else:
            out.update(quantiles(times), timed_steps=len(times))
    del model, x
    free_memory(device)
    return out


def _memory_fields(mem: Any) -> dict[str, Any]:
    """The step's memory (see :class:`effdense.memory.StepMemory`): ``grads_mib`` the parameter gradients at the
    end of the step, ``grads_at_peak_mib`` those live at the peak; params + buffers + input + grads at peak +
    activations = peak."""
    return {
        "peak_bytes": mem.peak,
        "peak_mib": mib(mem.peak),
        "params_mib": mib(mem.params),
        "grads_mib": mib(mem.grads),
        "grads_at_peak_mib": mib(mem.grads_at_peak),
        "buffers_mib": mib(mem.buffers),
        "input_mib": mib(mem.input),
        "activations_mib": mib(mem.activations),
    }


def _add_ratios(results: list[dict[str, Any]]) -> None:
    ok = [r for r in results if r.get("status") == "ok"]
    base = next((r for r in ok if r["row"] == "effdense naive"), ok[0] if ok else None)
    if base is None:
        return
    for r in ok:
        r["mem_ratio"] = r["peak_mib"] / base["peak_mib"]
        if r.get("time_ms") is not None and base.get("time_ms"):
            r["time_ratio"] = r["time_ms"] / base["time_ms"]
        r["baseline_row"] = base["row"]


TABLE_COLUMNS = (
    ("row", "row", str),
    ("peak_mib", "peak MiB", lambda v: f"{v:,.1f}"),
    ("mem_ratio", "x mem", lambda v: f"{v:.3f}"),
    ("time_ms", "ms/step", lambda v: f"{v:,.1f}"),
    ("time_ratio", "x time", lambda v: f"{v:.2f}"),
    ("timed_steps", "steps", str),
    ("status", "status", str),
    ("note", "note", str),
)


def _reject_ineffective_options(args: argparse.Namespace) -> None:
    """Timing options given for a run that times nothing are errors (see :func:`effdense.benchutil.reject_ineffective`)."""
    timing_options = ("--steps", "--warmup", "--max-seconds-per-row", "--threads")
    if args.memory == "estimate":
        reject_ineffective(args, timing_options, "with --memory estimate (nothing is timed)")
        if args.no_timing:  # (a flag: reject_ineffective looks for options given with a value)
            raise UsageError("--no-timing has no effect with --memory estimate (nothing is timed)")
    if args.no_timing:
        reject_ineffective(args, timing_options, "with --no-timing")


def result_stem(args: argparse.Namespace, rows: list[dict[str, Any]], device: torch.device, size: int) -> str:
    """The result files' name without extension. Settings that change what a row measures, or which rows there
    are, are in it: a run with them does not overwrite the default run's files (only a rerun of the same
    selection does)."""
    reference = sorted(_reference_rows(args, device), key=REFERENCE_ROWS.index)  # (one name for one set of rows)
    default_reference = _reference_rows(argparse.Namespace(), device)
    strategies = list(dict.fromkeys(r["strategy"] for r in rows if r["kind"] == "effdense"))  # (--compile: 2 rows each)
    return (
        f"bench_{args.model}_b{args.batch_size}_{size}px_{args.dtype}_{device.type}"
        + ("_estimate" if args.memory == "estimate" else "")
        + ("_channels-last" if args.channels_last else "")
        + ("_compile" if getattr(args, "compile", False) else "")
        + selection_tag(strategies, _strategies.available())
        + selection_tag(["ref", *reference] if reference else [], ["ref", *default_reference], none="noref")
    )


def main(args: argparse.Namespace) -> int:
    _reject_ineffective_options(args)
    if getattr(args, "compile", False) and (args.memory == "estimate" or args.no_timing):
        raise UsageError("--compile adds timed rows: it has no effect with --memory estimate or --no-timing")
    chosen = getattr(args, "reference", None)
    if getattr(args, "no_reference", False) and chosen is not None:
        raise UsageError("--reference and --no-reference contradict each other; give one")
    apply_threads(args)
    device = resolve_device(args.device)
    compile_reference = chosen is not None and "compile" in chosen
    if compile_reference and device.type != "cuda":
        raise UsageError(f"--reference compile times torchvision under torch.compile on a GPU only (device is {device})")
    if compile_reference and (args.memory == "estimate" or args.no_timing):
        raise UsageError("--reference compile adds a timed row: it has no effect with --memory estimate or --no-timing")
    if getattr(args, "compile", False) and device.type != "cuda":
        raise UsageError(f"--compile times compiled rows on a GPU only (device is {device}); torchvision's compiled "
                         "row is GPU-only as well")
    if args.dtype == "fp16" and device.type == "cpu":
        progress("note: fp16 autocast on CPU is slow and rarely used; bf16 is the CPU's low precision")
    cuda = device.type == "cuda"
    # nothing timed: the step settings stay None (null in the JSON), so that the record says no step was timed
    timing = args.memory != "estimate" and not args.no_timing
    if timing:
        for key, value in (GPU_DEFAULTS if cuda else CPU_DEFAULTS).items():
            if getattr(args, key) is None:
                setattr(args, key, value)
    run_start = time.perf_counter()
    size = args.image_size or default_image_size(args.model)
    require_image_size(get_model(args.model, strategy="naive"), size, args.model, batch_size=args.batch_size)
    rows = _rows(args, device)
    if not rows:
        raise UsageError("nothing to run: no strategy selected and no torchvision row")
    stem = result_stem(args, rows, device, size)
    output_dir(args.out, (f"{stem}.json", f"{stem}.csv"))
    env = environment(device)
    settings = {
        "model": args.model, "batch_size": args.batch_size, "image_size": size, "dtype": args.dtype,
        "channels_last": args.channels_last, "steps": args.steps, "warmup": args.warmup,
        "max_seconds_per_row": args.max_seconds_per_row, "memory": args.memory, "timing": timing,
    }  # fmt: skip
    progress(
        f"effdense bench: {args.model}, batch {args.batch_size}, {size}x{size}, {args.dtype}, on {env['device_name']}; "
        f"{len(rows)} row{'' if len(rows) == 1 else 's'}"
    )
    json_path, csv_path = args.out / f"{stem}.json", args.out / f"{stem}.csv"

    def save(complete: bool) -> float:
        # rewritten after every row, so that an interrupted run (a time limit, Ctrl-C) keeps the rows it finished
        _add_ratios(results)
        for r in results:
            r.update({k: env[k] for k in ("device", "device_name", "torch", "torchvision", "triton", "git_commit", "command")})
        elapsed = time.perf_counter() - run_start
        meta = {**env, **settings, "elapsed_s": round(elapsed, 1), "complete": complete}
        write_json(json_path, {"meta": meta, "rows": results})
        write_csv(csv_path, results, CSV_COLUMNS)
        return elapsed

    results: list[dict[str, Any]] = []
    for i, row in enumerate(rows, 1):
        start = time.perf_counter()
        base = {**{k: v for k, v in row.items() if k != "build"}, **settings}

        def say(message: str, i: int = i, label: str = row["row"], start: float = start) -> None:
            progress(f"[{i}/{len(rows)}] {label}: {message} ({time.perf_counter() - start:.1f} s)")

        if row["build"] is None:
            result = {**base, "status": "skipped"}
        else:
            try:
                result = {**base, **_run_row(row, args, device, size, say)}
            except Exception as exc:  # one failing row must not lose the others
                if cuda and isinstance(exc, torch.cuda.OutOfMemoryError):
                    free_memory(device)
                result = {**base, "status": "error", "note": error_note(exc)}
        results.append(result)
        desc = f"{result.get('peak_mib', 0):,.1f} MiB" if result["status"] == "ok" else result["status"]
        if result.get("time_ms") is not None:
            steps = result["timed_steps"]
            desc += f", {result['time_ms']:,.1f} ms/step ({steps} step{'s' if steps != 1 else ''})"
        say(desc)
        save(complete=False)
    elapsed = save(complete=True)
    print(format_table(results, TABLE_COLUMNS))
    baseline = next((r["baseline_row"] for r in results if r.get("baseline_row")), None)
    if baseline is not None:
        print(f"x mem and x time: against {baseline}")
    print(f"wrote {json_path} and {csv_path} ({elapsed:.0f} s)")
    return exit_code("bench", [r["row"] for r in results if r["status"] == "error"], len(results))
