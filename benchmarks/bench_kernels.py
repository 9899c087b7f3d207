"""Time the bottleneck Triton kernels against cuBLAS GEMMs of the same shape (and the eager PyTorch twins).

For DenseNet-121-like bottleneck shapes (batch 64, B = 128 outputs, C input channels read as a channel slice
of a wider block buffer), each op is timed with ``triton.testing.do_bench`` (median, 20th and 80th
percentiles, in ms):

* ``forward``: fused BN1-ReLU-conv1x1 with BN2 sums vs ``torch.matmul(W (B,C), X (N,C,P))``, no prologue;
* ``backward_weight``: ``dW = Σ dy h^T`` vs ``torch.mm`` of ``(B, N*P) x (N*P, C)`` operands pre-laid-out;
* ``backward_input``: masked ``W^T dy`` with BN1 sums vs ``torch.matmul(W^T (C,B), dY (N,B,P))``;
* ``channel_stats`` / ``bn_backward_accumulate`` (memory-bound): vs the PyTorch twins (no GEMM).

``ratio`` is ``ms_cublas / ms_kernel`` (kernel throughput as a fraction of cuBLAS; target >= 0.7 forward).
``*_graph`` columns time the same calls replayed from a CUDA graph (GPU time without Python and launch
overhead, which dominates the small 14x14/7x7 problems). ``ms_reference`` is the eager PyTorch twin the kernel replaces (unfused, materialising ``h``).
Writes ``benchmarks/results/bench_kernels_<device>.json`` and ``.csv`` and prints a table. Never asserts.
The JSON's ``meta`` (``metadata`` in files recorded before 2026-11-27) is :func:`effdense.benchutil.environment`
(device, versions, commit, command line, time), as in the other benchmarks' files, plus this script's
settings; ``device`` there is the GPU's name.

Usage: ``python benchmarks/bench_kernels.py [--dtypes bf16,fp32] [--batch 64] [--quick]``
"""

from __future__ import annotations

import argparse
import pathlib
import re
import sys

from effdense.benchutil import (
    UsageError,
    dtype_list,
    environment,
    output_dir,
    positive_int,
    write_csv,
    write_json,
)

# DenseNet-121: (C, H=W) pairs a bottleneck meets (block 1 ends at C=256 at 56x56, block 2 at 512 at 28x28, ...)
SHAPES_121 = [(256, 56), (512, 28), (1024, 14), (1024, 7)]
SHAPES_QUICK = [(256, 56), (1024, 7)]
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def _parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", type=dtype_list, default=["bf16", "fp32"],
                   help="comma-separated subset of bf16, fp16, fp32 (default: bf16,fp32)")
    p.add_argument("--batch", type=positive_int, default=64, help="batch size N (default 64)")
    p.add_argument("--bottleneck", type=positive_int, default=128, help="output channels B = bn_size*growth (default 128)")
    p.add_argument("--grid", action="store_true", help="every C in {256,512,1024} x every H in {56,28,14,7}")
    p.add_argument("--quick", action="store_true", help="two shapes only (smoke run)")
    p.add_argument("--out", type=pathlib.Path, default=RESULTS, help="output folder (default benchmarks/results)")
    return p.parse_args(argv)


def metadata(args: argparse.Namespace, device, argv: list[str] | None = None) -> dict:
    """Where, with what and by which command the results were recorded: :func:`effdense.benchutil.environment`
    (as every effdense result file), the command line as given (``argv``, default ``sys.argv[1:]``), and this
    script's settings. ``device`` keeps its earlier meaning here, the GPU's name (also in ``device_name``);
    ``date`` is ``time``, under the name earlier files used."""
    env = environment(device)
    script = sys.argv[0] if argv is None else "benchmarks/bench_kernels.py"
    command = ["python", script, *(sys.argv[1:] if argv is None else argv)]
    return {
        **env,
        "device": env["device_name"],
        "command": " ".join(command),
        "date": env["time"],
        "batch": args.batch,
        "bottleneck": args.bottleneck,
        "timing": "triton.testing.do_bench median (ms), warmup 25 ms, rep 100 ms; q20/q80 for the kernel",
        "ratio": "ms_cublas / ms_kernel",
    }


def _bench(fn):
    import triton

    fn()  # first call autotunes / compiles
    med, lo, hi = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
    return med, lo, hi


def _bench_graph(fn):
    """GPU time alone: the op replayed from a CUDA graph, so Python/launch overhead is not counted."""
    import triton

    try:
        fn()
        return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
    except Exception as exc:  # capture can fail (e.g. an op that syncs); report the row without it
        print(f"  (cuda graph timing unavailable: {type(exc).__name__}: {exc})", file=sys.stderr)
        return None


def _tflops(flops: float, ms: float | None) -> float | None:
    return None if ms is None else flops / (ms * 1e-3) / 1e12


def run(args: argparse.Namespace, on_shape=None) -> list[dict]:
    """Every shape's rows; ``on_shape(rows so far)`` after each shape (the result files are rewritten then:
    a run cut by the GPU suite's time limit keeps what it measured)."""
    import torch

    if args.quick:
        shapes = SHAPES_QUICK
    elif args.grid:
        shapes = [(c, h) for c in (256, 512, 1024) for h in (56, 28, 14, 7)]
    else:
        shapes = SHAPES_121
    rows = []
    for dname in args.dtypes:
        for C, S in shapes:
            rows += _shape_rows(dname, args.batch, C, args.bottleneck, S)
            torch.cuda.empty_cache()  # the shape's tensors went with _shape_rows' frame
            if on_shape is not None:
                on_shape(rows)
    return rows


def _shape_rows(dname: str, N: int, C: int, B: int, S: int) -> list[dict]:
    """Every op timed at one shape and dtype: one row each (also printed as it is measured)."""
    import torch

    from effdense import kernels as K
    from effdense.kernels import reference as R

    dev = torch.device("cuda")
    dtype = getattr(torch, DTYPES[dname])
    P, M = S * S, N * S * S
    buf = torch.randn(N, C + 32, S, S, device=dev).to(dtype)  # a wider block buffer
    x = buf[:, :C]
    scale = torch.rand(C, device=dev) + 0.5
    shift = torch.randn(C, device=dev) * 0.1
    mean = torch.randn(C, device=dev) * 0.1
    invstd = torch.rand(C, device=dev) + 0.5
    w = (torch.randn(B, C, device=dev) / C**0.5).to(dtype)
    dy = torch.randn(N, B, S, S, device=dev).to(dtype)
    scratch = torch.empty(N, C, S, S, device=dev, dtype=dtype)
    grad = torch.zeros(N, C + 32, S, S, device=dev, dtype=dtype)[:, :C]
    sums = torch.randn(C, device=dev), torch.randn(C, device=dev)
    # cuBLAS operands, contiguous, same GEMM shapes, no prologue/epilogue
    x3 = torch.randn(N, C, P, device=dev).to(dtype)
    dy3 = dy.view(N, B, P)
    dy2 = torch.randn(B, M, device=dev).to(dtype)
    h2 = torch.randn(M, C, device=dev).to(dtype)
    flops = 2.0 * B * C * M
    shape = f"N={N} C={C} B={B} HxW={S}x{S}"
    cases = [
        ("forward", flops,
         lambda: K.bottleneck_forward(x, scale, shift, w),
         lambda: torch.matmul(w, x3),
         lambda: R.bottleneck_forward(x, scale, shift, w)),
        ("backward_weight", flops,
         lambda: K.bottleneck_backward_weight(x, scale, shift, dy),
         lambda: torch.mm(dy2, h2),
         lambda: R.bottleneck_backward_weight(x, scale, shift, dy)),
        ("backward_input", flops,
         lambda: K.bottleneck_backward_input(x, scale, shift, w, dy, mean, out=scratch),
         lambda: torch.matmul(w.t(), dy3),
         lambda: R.bottleneck_backward_input(x, scale, shift, w, dy, mean, out=scratch)),
        ("channel_stats", None,
         lambda: K.channel_stats(x),
         None,
         lambda: R.channel_stats(x)),
        ("bn_backward_accumulate", None,
         lambda: K.bn_backward_accumulate(grad, x, scratch, mean, invstd, scale, *sums),
         None,
         lambda: R.bn_backward_accumulate(grad, x, scratch, mean, invstd, scale, *sums)),
    ]  # fmt: skip
    from effdense.kernels import bottleneck as _bottleneck

    tuned = {"forward": _bottleneck._fwd_tuned, "backward_weight": _bottleneck._bwd_weight_tuned,
             "backward_input": _bottleneck._bwd_input_tuned}  # fmt: skip
    rows = []
    for op, fl, kernel, cublas, ref in cases:
        k_med, k_lo, k_hi = _bench(kernel)
        # the autotuner's choice for this shape (its last call was this op's): data for pruning the config lists
        config = getattr(tuned[op], "best_config", None) if op in tuned else None
        c_med = _bench(cublas)[0] if cublas is not None else None
        r_med = _bench(ref)[0]
        k_graph = _bench_graph(kernel)
        c_graph = _bench_graph(cublas) if cublas is not None else None
        row = {
            "op": op, "shape": shape, "dtype": dname, "ms_kernel": k_med, "ms_kernel_q20": k_lo, "ms_kernel_q80": k_hi,
            "ms_cublas": c_med, "ms_reference": r_med,
            "tflops_kernel": _tflops(fl, k_med) if fl else None,
            "tflops_cublas": _tflops(fl, c_med) if fl else None,
            "ratio": (c_med / k_med) if c_med is not None else None,
            "speedup_vs_reference": r_med / k_med,
            "ms_kernel_graph": k_graph,
            "ms_cublas_graph": c_graph,
            "ratio_graph": (c_graph / k_graph) if (c_graph and k_graph) else None,
            "config": str(config) if config is not None else None,
        }  # fmt: skip
        rows.append(row)
        print(_fmt_row(row), flush=True)
    return rows


def _fmt(v, spec=".3f") -> str:
    return "-" if v is None else format(v, spec)


HEADER = f"{'op':<24}{'shape':<30}{'dtype':<6}{'ms_kern':>9}{'ms_cublas':>10}{'TF_kern':>9}{'TF_cublas':>10}{'ratio':>7}{'vs_ref':>8}{'ratio_graph':>12}"


def _fmt_row(r: dict) -> str:
    return (
        f"{r['op']:<24}{r['shape']:<30}{r['dtype']:<6}{_fmt(r['ms_kernel']):>9}{_fmt(r['ms_cublas']):>10}"
        f"{_fmt(r['tflops_kernel'], '.1f'):>9}{_fmt(r['tflops_cublas'], '.1f'):>10}{_fmt(r['ratio'], '.2f'):>7}"
        f"{_fmt(r['speedup_vs_reference'], '.2f'):>8}{_fmt(r['ratio_graph'], '.2f'):>12}"
    )


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    import torch

    if not torch.cuda.is_available():
        print("bench_kernels: needs a CUDA GPU (the kernels are timed against cuBLAS); nothing to do here.", file=sys.stderr)
        return 2
    try:
        output_dir(args.out)  # before the work: a --out that cannot be a folder is said at once
    except UsageError as exc:
        print(f"bench_kernels.py: error: {exc}", file=sys.stderr)
        return 2

    meta = metadata(args, torch.device("cuda"), argv)
    name = meta["device"]
    print(HEADER)
    slug = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower()
    json_path = args.out / f"bench_kernels_{slug}.json"
    csv_path = args.out / f"bench_kernels_{slug}.csv"
    meta_columns = ("device", "torch", "triton", "git_commit", "command")  # as effdense bench's CSV, per row

    def write(rows: list[dict], complete: bool) -> None:  # ("complete": False while shapes remain)
        write_json(json_path, {"meta": meta, "complete": complete, "rows": rows})
        write_csv(csv_path, [{**r, **{k: meta[k] for k in meta_columns}} for r in rows], [*rows[0].keys(), *meta_columns])

    rows = run(args, on_shape=lambda rows: write(rows, complete=False))
    if rows:
        write(rows, complete=True)
    print()
    print(f"{name} | torch {meta['torch']} | triton {meta['triton']} | commit {meta['git_commit'][:10]}")
    print(f"command: {meta['command']}")
    print(HEADER)
    for r in rows:
        print(_fmt_row(r))
    print(f"\nwrote {json_path} and {csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
