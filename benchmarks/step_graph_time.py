"""Training-step GPU time with and without host overhead: each row timed eagerly and replayed from a CUDA graph.

One step is forward (under autocast for bf16/fp16), cross-entropy against fixed labels and backward; no
optimizer. ``eager_ms``: the median of ``--steps`` eager steps (CUDA events around each). ``graph_ms``: the
same step captured once into a CUDA graph (after warm-up steps on a side stream, as PyTorch's whole-network
capture recipe does) and replayed ``--steps`` times. A replay runs no Python, dispatch or launch code, so
``graph_ms`` is the GPU's own work and ``eager_ms - graph_ms`` the host overhead that the eager step could
not hide. For ``fused``, ``eager_triton_launch_ms`` is the eager step again with every kernel launched
through Triton's ``kernel[grid](...)`` instead of its compiled kernel's launcher (``set_direct_launch(False)``). A row whose step cannot be captured records the error and keeps its eager time.

Rows: effdense ``naive``, ``shared`` and ``fused`` (``--strategies``), and torchvision's ``DenseNet`` with the
same weights, plain and ``memory_efficient=True`` (``--reference``), where torchvision can express the model. Never asserts; writes
``step_graph_<model>_b<batch>_<size>px_<dtype>_<device>.json`` and prints a table. Needs CUDA.

    python benchmarks/step_graph_time.py --model densenet121 --batch-size 64 --image-size 224 --dtype bf16 --out DIR
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any, Callable

import torch

from effdense import get_model
from effdense.bench import measure_builds, reference_list, same_weight_builds, training_step
from effdense.benchutil import (
    DTYPES,
    UsageError,
    dtype_name,
    environment,
    error_note,
    format_table,
    model_name,
    output_dir,
    positive_int,
    progress,
    strategy_list,
    write_json,
)


def _reference_rows(text: str) -> list[str]:
    rows = reference_list(text)
    if "compile" in rows:
        raise argparse.ArgumentTypeError("the compile row is effdense bench's (--reference compile); here: plain, memory_efficient")
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=model_name, default="densenet121")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--image-size", type=positive_int, default=224)
    p.add_argument("--dtype", type=dtype_name, default="bf16", help="fp32, bf16 (autocast, default) or fp16")
    p.add_argument("--strategies", type=strategy_list, default=["naive", "shared", "fused"],
                   help="comma list (default naive,shared,fused)")
    p.add_argument("--reference", type=_reference_rows, default=["plain", "memory_efficient"],
                   help="torchvision rows: a comma list of plain, memory_efficient (default both)")
    p.add_argument("--no-reference", action="store_true", help="leave out the torchvision rows")
    p.add_argument("--steps", type=positive_int, default=20, help="timed steps, eager and replays (default 20)")
    p.add_argument("--warmup", type=positive_int, default=3, help="untimed eager steps first (default 3)")
    p.add_argument("--out", type=Path, default=None, help="folder for the JSON (default: print only)")
    return p.parse_args(argv)


def _median_ms(run: Callable[[], None], steps: int) -> float:
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_row(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, autocast: torch.dtype | None,
             steps: int, warmup: int, triton_launch: bool = False) -> dict[str, Any]:
    """``triton_launch``: also time the eager step with every kernel launched through Triton's
    ``kernel[grid](...)`` (``set_direct_launch(False)``) as ``eager_triton_launch_ms`` (for ``fused``)."""
    model.train()
    step = training_step(model, x, target, autocast)

    def eager() -> None:
        model.zero_grad(set_to_none=True)
        step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream: autotuning, cuDNN plans, workspaces
        for _ in range(warmup):
            eager()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    row: dict[str, Any] = {"eager_ms": _median_ms(eager, steps)}
    if triton_launch:
        from effdense.kernels import set_direct_launch

        previous = set_direct_launch(False)
        try:
            row["eager_triton_launch_ms"] = _median_ms(eager, steps)
        finally:
            set_direct_launch(previous)
    try:
        graph = torch.cuda.CUDAGraph()
        model.zero_grad(set_to_none=True)  # the captured backward allocates .grad from the graph's pool
        with torch.cuda.graph(graph):
            step()
        torch.cuda.synchronize()
        row["graph_ms"] = _median_ms(graph.replay, steps)
        row["host_overhead_ms"] = row["eager_ms"] - row["graph_ms"]
        row["status"] = "ok"
        del graph
    except Exception as exc:  # a step that cannot be captured: keep its eager time, say why
        row.update(status="no graph", note=error_note(exc))
    model.zero_grad(set_to_none=True)
    return row


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("step_graph_time.py: error: needs a CUDA device (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    if args.out is not None:
        try:
            output_dir(args.out)
        except UsageError as exc:
            print(f"step_graph_time.py: error: {exc}", file=sys.stderr)
            return 2
    device = torch.device("cuda")
    autocast = DTYPES[args.dtype]
    env = environment(device)
    env["command"] = " ".join(["python", *sys.argv])
    torch.manual_seed(0)
    base = get_model(args.model, strategy="naive")
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    target = torch.randint(0, base.classifier.out_features, (args.batch_size,), device=device)
    label = f"{args.model} b{args.batch_size} {args.image_size}px {args.dtype}"
    path = None
    if args.out is not None:
        path = args.out / f"step_graph_{args.model}_b{args.batch_size}_{args.image_size}px_{args.dtype}_{device.type}.json"
    meta = {**env, "settings": {k: v for k, v in vars(args).items() if k != "out"}}
    done: list[dict] = []

    def on_row(row: dict) -> None:
        progress(
            f"{label} {row['row']}: " + ", ".join(f"{k} {row[k]:.2f}" for k in ("eager_ms", "graph_ms") if k in row)
            + f" ({row['status']})"
        )  # fmt: skip
        done.append(row)
        if path is not None:  # (after each row: a run cut by the GPU suite's time limit keeps what it measured)
            write_json(path, {"meta": meta, "complete": False, "rows": done})

    rows = measure_builds(
        same_weight_builds(args.model, base, args.strategies, () if args.no_reference else args.reference),
        lambda name, model: time_row(model, x, target, autocast, args.steps, args.warmup, triton_launch=name.endswith("fused")),
        device,
        on_row=on_row,
        model=args.model, batch_size=args.batch_size, image_size=args.image_size, dtype=args.dtype,
    )  # fmt: skip
    print(format_table(rows, (
        ("row", "row", str),
        ("eager_ms", "eager ms", lambda v: f"{v:,.2f}"),
        ("graph_ms", "graph ms", lambda v: f"{v:,.2f}"),
        ("host_overhead_ms", "host ms", lambda v: f"{v:,.2f}"),
        ("eager_triton_launch_ms", "eager ms, Triton launches", lambda v: f"{v:,.2f}"),
        ("status", "status", str),
        ("note", "note", str),
    )))  # fmt: skip
    if path is not None:
        write_json(path, {"meta": meta, "complete": True, "rows": rows})
        print(f"wrote {path}")
    return 0 if all(r["status"] in ("ok", "no graph", "skipped") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
