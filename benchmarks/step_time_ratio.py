"""Training-step time of one strategy relative to another, measured in alternation.

On a shared, noisy machine one row after another (``effdense bench``) drifts with the load. Here the two
models take steps in turn (A B A B ...), each pair gives one ratio B/A, and the median ratio is the
figure: a load change between pairs moves both steps of a pair alike.

    python benchmarks/step_time_ratio.py                       # shared vs naive, DenseNet-BC-100, batch 16, CPU
    python benchmarks/step_time_ratio.py --candidate checkpoint --pairs 20 --out benchmarks/results

Writes ``step_ratio_<model>_b<batch>_<size>px_<candidate>_vs_<baseline>_<device>.json`` with every pair's times.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import effdense
from effdense.benchutil import (
    UsageError,
    device_name,
    environment,
    model_name,
    nonnegative_int,
    output_dir,
    positive_int,
    require_image_size,
    resolve_device,
    write_json,
)


def _step(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor) -> float:
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    t0 = time.perf_counter()
    model.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(x), target).backward()
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=model_name, default="densenet_bc_100")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--image-size", type=positive_int, default=32)
    p.add_argument("--baseline", default="naive")
    p.add_argument("--candidate", default="shared", help="default shared; the baseline's own strategy times an A/A pair (the noise)")
    p.add_argument("--pairs", type=positive_int, default=10, help="timed pairs (default 10)")
    p.add_argument("--warmup", type=nonnegative_int, default=1, help="untimed pairs first (default 1)")
    p.add_argument("--device", type=device_name, default="cpu", help="cpu (default), cuda[:N] or auto")
    p.add_argument("--threads", type=nonnegative_int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--out", default=None, help="folder for the JSON (default: print only)")
    args = p.parse_args(argv)
    for s in (args.baseline, args.candidate):
        if s not in effdense.STRATEGIES:
            p.error(f"unknown strategy {s!r}; expected one of {effdense.STRATEGIES}")
    try:
        device = resolve_device(args.device)
        require_image_size(effdense.get_model(args.model, strategy="naive"), args.image_size, args.model,
                           batch_size=args.batch_size)  # fmt: skip
        if args.out:  # (before the pairs: a --out that cannot be a folder lost them all in a traceback)
            output_dir(Path(args.out))
    except UsageError as exc:
        p.error(str(exc))
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    base = effdense.get_model(args.model, strategy=args.baseline).to(device)
    cand = effdense.get_model(args.model, strategy=args.candidate).to(device)
    cand.load_state_dict(base.state_dict())
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    target = torch.randint(0, base.classifier.out_features, (args.batch_size,), device=device)

    pairs = []
    for i in range(args.warmup + args.pairs):
        a, b = _step(base, x, target), _step(cand, x, target)
        if i >= args.warmup:
            pairs.append((a, b))
            print(f"pair {i - args.warmup + 1}/{args.pairs}: {args.baseline} {a * 1e3:.1f} ms, "
                  f"{args.candidate} {b * 1e3:.1f} ms, ratio {b / a:.3f}", flush=True)
    ratios = [b / a for a, b in pairs]
    result = {
        "meta": {**environment(device), "command": " ".join(["python", *sys.argv])},
        "settings": vars(args),
        "baseline_ms_median": statistics.median(a for a, _ in pairs) * 1e3,
        "candidate_ms_median": statistics.median(b for _, b in pairs) * 1e3,
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "pairs_ms": [[a * 1e3, b * 1e3] for a, b in pairs],
    }
    print(f"{args.candidate} / {args.baseline} step time: median ratio {result['ratio_median']:.3f} "
          f"(min {result['ratio_min']:.3f}, max {result['ratio_max']:.3f}, {args.pairs} pair{'s' * (args.pairs != 1)})")
    if args.out:
        out = Path(args.out)
        stem = f"step_ratio_{args.model}_b{args.batch_size}_{args.image_size}px_{args.candidate}_vs_{args.baseline}"
        path = out / f"{stem}_{device.type}.json"
        write_json(path, result)  # (replaced at once: an interrupted write keeps the old file)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
