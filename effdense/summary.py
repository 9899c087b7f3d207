"""``effdense summary MODEL``: size, cost and memory of one model, with a ResNet of similar depth beside it.

- parameters;
- multiply-accumulates (MACs) of one forward pass of one image at ``--image-size`` (default: the model's),
  counted by :class:`torch.utils.flop_counter.FlopCounterMode` from the operators' shapes (convolutions and
  matrix products; BatchNorm, ReLU and pooling are not counted, as in the DenseNet paper), run on the meta
  device so no arithmetic is done;
- dense connections per block, ``L(L+1)/2`` for a block of ``L`` layers;
- the training-step peak per strategy at ``--batch-size`` and its activation part, estimated
  (:func:`effdense.memory.estimate_step`);
- depth: the convolution and fully connected layers on the longest path from input to output
  (:func:`layer_depth`), the count both the DenseNet and the ResNet papers use. Every convolution of a
  DenseNet lies on that path (each layer reads all earlier ones), so for it this is the count of all its
  convolution and linear layers (DenseNet-121: 121); a ResNet's 1x1 projection shortcuts lie beside it
  and are not counted (ResNet-50: 50, of 54 such layers). Both rows of the table are counted this way,
  from the autograd graph of one forward pass on the meta device;
- the torchvision ResNet whose depth is closest, as a reference row for parameters against depth.
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
    error_note,
    exit_code,
    format_table,
    model_name,
    output_dir,
    output_path,
    positive_int,
    progress,
    reject_ineffective,
    require_image_size,
    selection_tag,
    strategy_list,
    write_json,
)
from effdense.densenet import get_model
from effdense.memory import estimate_step, mib

RESNET_DEPTHS = (18, 34, 50, 101, 152)
"""The torchvision ResNets (``torchvision.models.resnet<depth>``); each one's :func:`layer_depth` is its depth."""

MEMORY_DEFAULTS = {"batch_size": 64, "dtype": "fp32"}
"""``--batch-size``/``--dtype`` of the memory estimates when not given (with ``--no-memory`` there are none, and
the JSON records neither)."""

DEPTH_NOTE = (
    "depth: convolution and fully connected layers on the longest input-to-output path, as the DenseNet and "
    "ResNet papers count them (for both rows; a ResNet's projection shortcuts are off that path)"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=model_name, help="model name (effdense.MODELS, densenet_bc_<depth> or densenet_<depth>)")
    parser.add_argument("--image-size", type=positive_int, default=None,
                        help="square input side; default 32 for CIFAR models, 224 for ImageNet ones")
    parser.add_argument("--batch-size", type=positive_int, default=None,
                        help=f"batch of the memory estimates (default {MEMORY_DEFAULTS['batch_size']})")
    parser.add_argument("--dtype", type=dtype_name, default=None,
                        help="dtype of the memory estimates: fp32 (default), bf16 or fp16 autocast")
    parser.add_argument("--strategies", type=strategy_list, default=None,
                        help="strategies of the memory estimates: 'all' (default) or a comma list")
    parser.add_argument("--no-memory", action="store_true",
                        help="skip the memory estimates (then --batch-size, --dtype and --strategies are errors)")
    parser.add_argument("--out", type=output_path, default=Path("effdense_results"), help="output folder (JSON; default: effdense_results)")


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


_WEIGHTED_NODES = frozenset({"ConvolutionBackward0", "AddmmBackward0", "MmBackward0"})
"""Autograd nodes of convolutions and fully connected layers (``nn.Linear`` is ``addmm`` with a bias,
``mm`` without)."""


def layer_depth(build: Callable[[], nn.Module], image_size: int) -> int:
    """Depth as the DenseNet and ResNet papers count it: convolution and fully connected layers on the
    longest path from input to output.

    Found from the autograd graph of one forward pass of one image on the meta device (no arithmetic):
    the most convolution/linear nodes on any path from the output back to the input. For a DenseNet
    that is every such layer (121 for DenseNet-121); for a torchvision ResNet it leaves out the 1x1
    projection shortcuts, which run beside the blocks they skip (18 for ResNet-18, which has 21).
    """
    with torch.device("meta"):
        model = build().eval()  # eval: BatchNorm takes a batch of one image
        x = torch.empty(1, 3, image_size, image_size)
    with torch.enable_grad():
        root = model(x).grad_fn
    if root is None:
        return 0
    depth: dict[Any, int] = {}  # node -> weighted layers on the longest path from it to the input
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:  # iterative post-order: deep models' graphs outgrow Python's recursion limit
        node, expanded = stack.pop()
        if node in depth:
            continue
        children = [n for n, _ in node.next_functions if n is not None]
        if expanded:
            depth[node] = (node.name() in _WEIGHTED_NODES) + max((depth[c] for c in children), default=0)
        else:
            stack.append((node, True))
            stack.extend((c, False) for c in children if c not in depth)
    return depth[root]


def _reject_ineffective_options(args: argparse.Namespace) -> None:
    """Memory options given with ``--no-memory`` are errors (see :func:`effdense.benchutil.reject_ineffective`)."""
    if args.no_memory:
        reject_ineffective(args, ("--strategies", "--batch-size", "--dtype"), "with --no-memory (no memory is estimated)")


def main(args: argparse.Namespace) -> int:
    _reject_ineffective_options(args)
    for key, value in MEMORY_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    size = args.image_size or default_image_size(args.model)
    model = get_model(args.model, strategy="naive")
    # the memory estimates take a training step at --batch-size; the rest runs one image in eval mode
    require_image_size(model, size, args.model, batch_size=None if args.no_memory else args.batch_size)
    # the settings that change the file's contents are in its name: a run at another image size, batch, dtype
    # or strategy selection does not overwrite this one (only a rerun of the same settings does)
    available = _strategies.available()
    names = args.strategies if args.strategies is not None else list(available)
    stem = f"summary_{args.model}_{size}px" + (
        "_nomemory" if args.no_memory else f"_b{args.batch_size}_{args.dtype}" + selection_tag(names, available)
    )
    output_dir(args.out, (f"{stem}.json",))
    num_classes = model.classifier.out_features
    blocks = [len(b.layers) for b in model.dense_blocks]
    connections = [n * (n + 1) // 2 for n in blocks]
    depth = layer_depth(lambda: get_model(args.model, strategy="naive"), size)
    params = sum(p.numel() for p in model.parameters())
    del model
    macs = count_macs(lambda: get_model(args.model, strategy="naive"), size)

    rows: list[dict[str, Any]] = [{
        "model": args.model, "depth": depth, "params": params, "params_m": params / 1e6, "macs": macs, "gmacs": macs / 1e9,
        "input": f"{size}x{size}", "num_classes": num_classes,
    }]  # fmt: skip
    resnet_depth = min(RESNET_DEPTHS, key=lambda d: (abs(d - depth), d))
    cifar_model = default_image_size(args.model) == 32
    notes: list[str] = [DEPTH_NOTE]
    try:
        import torchvision

        build = getattr(torchvision.models, f"resnet{resnet_depth}")
        ref = build(num_classes=num_classes)
        ref_depth = layer_depth(lambda: build(num_classes=num_classes), size)  # the same rule as the model's
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
            "model": f"torchvision resnet{resnet_depth} (ImageNet architecture)", "depth": ref_depth,
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
    print("MACs: convolutions and linear layers only (BatchNorm, ReLU and pooling are not counted)")
    for line in notes:
        print(line)
    print(f"\ndense blocks: {len(blocks)}, layers per block {blocks}, dense connections per block L(L+1)/2 = "
          f"{connections} (total {sum(connections)})")

    memory: list[dict[str, Any]] = []
    failed: list[str] = []
    if not args.no_memory:
        shape = (args.batch_size, 3, size, size)
        progress(f"estimating training-step memory at batch {args.batch_size}, {size}x{size}, {args.dtype} ...")
        for s in names:
            row: dict[str, Any] = {"strategy": s}
            if s not in available:
                row.update(status="skipped", note="not implemented yet")
            else:
                try:
                    est = estimate_step(args.model, shape, strategy=s, autocast_dtype=DTYPES[args.dtype], backend="auto")
                    row.update(status="ok", peak_mib=mib(est.peak), activations_mib=mib(est.activations),
                               params_grads_at_peak_mib=mib(est.params + est.grads_at_peak),
                               buffers_input_mib=mib(est.buffers + est.input))  # (the four parts add up to the peak)
                except Exception as exc:  # one strategy failing does not lose the others; the exit code says it
                    row.update(status="error", note=error_note(exc))
                    failed.append(s)
            memory.append(row)
        naive = next((r for r in memory if r["strategy"] == "naive" and r["status"] == "ok"), None)
        for r in memory:
            if naive and r["status"] == "ok":
                r["ratio"] = r["activations_mib"] / naive["activations_mib"]
        print(f"\ntraining-step memory (estimate, batch {args.batch_size}, {size}x{size}, {args.dtype}):")
        print(format_table(memory, (
            ("strategy", "strategy", str),
            ("peak_mib", "peak MiB", lambda v: f"{v:,.1f}"),
            ("activations_mib", "activations MiB", lambda v: f"{v:,.1f}"),
            ("ratio", "activations x naive", lambda v: f"{v:.3f}"),
            ("params_grads_at_peak_mib", "params+grads at peak MiB", lambda v: f"{v:,.1f}"),
            ("buffers_input_mib", "buffers+input MiB", lambda v: f"{v:,.1f}"),
            ("status", "status", str),
            *((("note", "note", str),) if any(r.get("note") for r in memory) else ()),
        )))  # fmt: skip
        if naive is None:
            print("activations x naive: - (naive is not in --strategies, or did not run)")
    env = environment(torch.device("cpu"))
    path = args.out / f"{stem}.json"
    write_json(path, {
        "meta": {
            **env, "model": args.model, "image_size": size, "memory": not args.no_memory,
            **({} if args.no_memory else {"batch_size": args.batch_size, "dtype": args.dtype, "strategies": names}),
        },
        "models": rows, "blocks": blocks, "dense_connections_per_block": connections, "memory": memory,
    })  # fmt: skip
    print(f"wrote {path}")
    return exit_code("summary", failed, len(memory), ("strategy", "strategies"))
