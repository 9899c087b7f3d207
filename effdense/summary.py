"""``effdense summary MODEL``: size, cost and memory of one model, with a ResNet of similar depth beside it.

- parameters;
- multiply-accumulates (MACs) of one forward pass of one image at the model's default input size,
  counted by :class:`torch.utils.flop_counter.FlopCounterMode` from the operators' shapes (convolutions and
  matrix products; BatchNorm, ReLU and pooling are not counted, as in the DenseNet paper), run on the meta
  device so no arithmetic is done;
- dense connections per block, ``L(L+1)/2`` for a block of ``L`` layers;
- the training-step peak per strategy at ``--batch-size`` and its activation part, estimated
  (:func:`effdense.memory.estimate_step`);
- the torchvision ResNet whose nominal depth is closest, as a reference row for parameters against depth.
  It is torchvision's ImageNet architecture (7x7 stride-2 stem, max-pool, four stages of 64 to 512 or
  2048 channels) with the model's number of classes, run at the same input size; it is labelled so
  (``torchvision resnet<depth> (ImageNet architecture)``), and for a CIFAR model a note says that it is
  not the CIFAR ResNet of the papers (ResNet-110: three stages of 16/32/64 channels on 32x32 maps) and that
  its MACs at 32x32 are not what those papers compare against. No CIFAR ResNet is built here.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from effdense import strategies as _strategies
from effdense.benchutil import (
    DTYPES,
    default_image_size,
    dtype_name,
    environment,
    format_table,
    model_name,
    output_dir,
    positive_int,
    progress,
    strategy_list,
    write_json,
)
from effdense.densenet import get_model
from effdense.memory import estimate_step, mib

RESNET_DEPTHS = (18, 34, 50, 101, 152)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=model_name, help="model name (effdense.MODELS or densenet_bc_<depth>)")
    parser.add_argument("--image-size", type=positive_int, default=None,
                        help="square input side; default 32 for CIFAR models, 224 for ImageNet ones")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="batch of the memory estimates (default 64)")
    parser.add_argument("--dtype", type=dtype_name, default="fp32", help="dtype of the memory estimates")
    parser.add_argument("--strategies", type=strategy_list, default=None, help="'all' (default) or a comma list")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory estimates")
    parser.add_argument("--out", type=Path, default=Path("effdense_results"), help="output folder (JSON)")


def count_macs(build: Callable[[], nn.Module], image_size: int) -> int:
    """Multiply-accumulates of one forward pass of one image, from the operators' shapes (meta device)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = build().eval()
        x = torch.empty(1, 3, image_size, image_size)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() // 2  # FlopCounterMode counts a multiply-add as two FLOPs


def resnet_final_map(image_size: int) -> int:
    """Side of the last feature map of a torchvision ResNet at ``image_size``: the 7x7 stride-2 stem
    convolution, the 3x3 stride-2 max-pool, then three stride-2 stages (32x smaller in all)."""
    side = (image_size + 2 * 3 - 7) // 2 + 1
    for _ in range(4):  # max-pool, layer2, layer3, layer4: kernel 3, stride 2, padding 1
        side = (side + 2 - 3) // 2 + 1
    return side


def layer_depth(model: nn.Module) -> int:
    """Depth as papers count it: convolution and fully connected layers."""
    return sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())


def main(args: argparse.Namespace) -> int:
    size = args.image_size or default_image_size(args.model)
    model = get_model(args.model, strategy="naive")
    if model._final_spatial(size) < 1:
        from effdense.benchutil import UsageError

        raise UsageError(f"--image-size {size} is too small for {args.model}: it needs at least {model.min_input_size()}")
    output_dir(args.out)
    num_classes = model.classifier.out_features
    blocks = [len(b.layers) for b in model.dense_blocks]
    connections = [n * (n + 1) // 2 for n in blocks]
    depth = layer_depth(model)
    params = sum(p.numel() for p in model.parameters())
    del model
    macs = count_macs(lambda: get_model(args.model, strategy="naive"), size)

    rows: list[dict[str, Any]] = [{
        "model": args.model, "depth": depth, "params": params, "params_m": params / 1e6, "macs": macs, "gmacs": macs / 1e9,
        "input": f"{size}x{size}", "num_classes": num_classes,
    }]  # fmt: skip
    resnet_depth = min(RESNET_DEPTHS, key=lambda d: (abs(d - depth), d))
    cifar_model = default_image_size(args.model) == 32
    notes: list[str] = []
    try:
        import torchvision

        build = getattr(torchvision.models, f"resnet{resnet_depth}")
        ref = build(num_classes=num_classes)
        ref_params = sum(p.numel() for p in ref.parameters())
        final = resnet_final_map(size)
        note = (f"torchvision.models.resnet{resnet_depth}, the ImageNet architecture (7x7 stride-2 stem, max-pool, "
                f"4 stages of 64-{ref.fc.in_features} channels) with {num_classes} classes, run at {size}x{size} "
                f"input (last feature map {final}x{final}); the torchvision depth nearest to {depth}.")
        notes.append(f"reference row: {note}")
        if cifar_model:
            cifar_note = (f"It is not a CIFAR ResNet (e.g. the papers' ResNet-110: 3 stages of 16/32/64 channels "
                          f"on 32x32 maps): its parameters are the ImageNet network's, and its MACs at {size}x{size} "
                          f"are not what CIFAR papers compare against.")
            notes.append(cifar_note)
            note += " " + cifar_note
        rows.append({
            "model": f"torchvision resnet{resnet_depth} (ImageNet architecture)", "depth": resnet_depth,
            "params": ref_params, "params_m": ref_params / 1e6,
            "macs": count_macs(lambda: build(num_classes=num_classes), size),
            "input": f"{size}x{size}", "num_classes": num_classes,
            "reference": f"torchvision.models.resnet{resnet_depth}", "architecture": "imagenet", "note": note,
        })  # fmt: skip
        rows[-1]["gmacs"] = rows[-1]["macs"] / 1e9
        del ref
    except ImportError:
        notes.append("reference row: none (torchvision is not installed)")
    print(format_table(rows, (
        ("model", "model", str),
        ("depth", "depth", str),
        ("params_m", "params (M)", lambda v: f"{v:.3f}"),
        ("gmacs", "GMACs", lambda v: f"{v:.3f}"),
        ("input", "input", str),
    )))  # fmt: skip
    for line in notes:
        print(line)
    print(f"\ndense blocks: {len(blocks)}, layers per block {blocks}, dense connections per block L(L+1)/2 = "
          f"{connections} (total {sum(connections)})")

    memory: list[dict[str, Any]] = []
    if not args.no_memory:
        available = _strategies.available()
        names = args.strategies if args.strategies is not None else list(available)
        shape = (args.batch_size, 3, size, size)
        progress(f"estimating training-step memory at batch {args.batch_size}, {size}x{size}, {args.dtype} ...")
        for s in names:
            row: dict[str, Any] = {"strategy": s}
            if s not in available:
                row.update(status="skipped")
            else:
                try:
                    est = estimate_step(args.model, shape, strategy=s, autocast_dtype=DTYPES[args.dtype], backend="auto")
                    row.update(status="ok", peak_mib=mib(est.peak), activations_mib=mib(est.activations),
                               params_grads_mib=mib(est.params + est.grads))
                except Exception as exc:
                    row.update(status=f"error: {type(exc).__name__}")
            memory.append(row)
        naive = next((r for r in memory if r["strategy"] == "naive" and r["status"] == "ok"), None)
        for r in memory:
            if naive and r["status"] == "ok":
                r["ratio"] = r["activations_mib"] / naive["activations_mib"]
        print(f"\nfeature-map memory of a training step (estimate, batch {args.batch_size}, {size}x{size}, {args.dtype}):")
        print(format_table(memory, (
            ("strategy", "strategy", str),
            ("peak_mib", "peak MiB", lambda v: f"{v:,.1f}"),
            ("activations_mib", "activations MiB", lambda v: f"{v:,.1f}"),
            ("ratio", "activations x naive", lambda v: f"{v:.3f}"),
            ("params_grads_mib", "params+grads MiB", lambda v: f"{v:,.1f}"),
            ("status", "status", str),
        )))  # fmt: skip
    env = environment(torch.device("cpu"))
    path = args.out / f"summary_{args.model}.json"
    write_json(path, {
        "meta": {**env, "model": args.model, "image_size": size, "batch_size": args.batch_size, "dtype": args.dtype},
        "models": rows, "blocks": blocks, "dense_connections_per_block": connections, "memory": memory,
    })  # fmt: skip
    print(f"wrote {path}")
    return 0
