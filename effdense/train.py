"""``effdense train``: train a DenseNet on digits (bundled with scikit-learn, no download), CIFAR-10/100 or an ImageFolder.

Mixed precision (bf16, fp16 with a gradient scaler), channels_last, ``torch.compile``, checkpoint save and
exact resume (model, optimiser, scheduler, scaler, epoch and step, RNG states), a tqdm progress bar and a
per-epoch metrics log (CSV or JSONL). Distributed data parallel under ``torchrun`` (NCCL on GPU, gloo on
CPU), with ``--sync-bn``::

    effdense train                                   # DenseNet-BC on digits, about a minute on a laptop CPU
    effdense train --data cifar10 --data-dir ~/data --model densenet_bc_100 --epochs 300 --precision bf16
    torchrun --nproc-per-node 2 -m effdense.train --sync-bn

The CLI registers :func:`add_arguments` and :func:`main`; :func:`train` is the same run as a function.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import re
import signal
import tempfile
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from effdense import densenet, strategies
from effdense.strategies.shared import _acc_dtype
from effdense.benchutil import (
    DTYPES,
    AutocastInside,
    _finite,
    _replacing,
    _writing,
    append_csv,
    first_line,
    image_size_problem,
    positive_int,
)
from effdense.data import DATASETS, DEFAULT_IMAGE_SIZE, DataError, SeededSamples, ShardSampler, Subset, build_datasets

DEFAULT_DEPTH = 22
"""Depth of the default model (DenseNet-BC, k=12): ``densenet_bc_22``."""

PRECISIONS = DTYPES  # --precision: the autocast dtypes of the benchmarks' --dtype (None: plain fp32)
CHECKPOINT_VERSION = 1

DEFAULTS: dict[str, Any] = {"momentum": 0.9, "lr_milestones": "0.5,0.75", "lr_gamma": 0.1, "log_interval": 10}
"""Defaults of the options that only act in some runs (``--momentum``: SGD; ``--lr-milestones`` and
``--lr-gamma``: the step schedule; ``--log-interval``: the progress bar). They parse as ``None``, so that
giving one where it would do nothing is an error (see :func:`_reject_ineffective_options`), and
:func:`train` fills them in."""


class TrainError(Exception):
    """A problem the user can fix (bad option, data, checkpoint); ``main`` prints it on one line, exit code 2."""


class CheckpointError(TrainError):
    """A checkpoint that cannot be read or does not fit the run."""


# ------------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``effdense train`` to ``parser``."""
    g = parser.add_argument_group("data")
    g.add_argument("--data", choices=DATASETS, default="digits", help="dataset (default: %(default)s, bundled with scikit-learn)")
    g.add_argument("--data-dir", default=None, metavar="PATH", help="local folder of cifar10/cifar100/imagefolder (not digits)")
    g.add_argument("--image-size", type=int, default=None, help="square input side (default: 16 digits, 32 CIFAR, 224 imagefolder)")
    g.add_argument("--subset", type=int, default=None, metavar="N", help="train on N of the training images only (a fixed choice, the same in every run)")
    g.add_argument("--test-subset", type=int, default=None, metavar="N", help="evaluate on N of the test images only (a fixed choice, the same in every run)")
    g.add_argument("--no-augment", action="store_true", help="no random crops/flips (CIFAR, imagefolder)")
    g.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default: %(default)s)")

    g = parser.add_argument_group("model")
    g.add_argument("--model", default=None, help=f"any effdense.get_model name (default: densenet_bc_{DEFAULT_DEPTH})")
    g.add_argument("--depth", type=int, default=None, help="custom 3-block DenseNet-BC of this depth (4 + 6n)")
    g.add_argument("--growth-rate", type=positive_int, default=None, help="growth rate k of --depth or a densenet_bc_<depth> model (default 12)")
    g.add_argument("--drop-rate", type=_drop_rate, default=0.0, help="dropout after each dense layer, in [0, 1) (default: %(default)s)")
    g.add_argument("--strategy", default="auto", help=f"dense-block strategy: auto (default) or one of {strategies.STRATEGIES}")

    g = parser.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=10, help="default: %(default)s")
    g.add_argument("--batch-size", type=int, default=64, help="per-process batch size (global = this x world size; default: %(default)s)")
    g.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd", help="SGD with Nesterov momentum (default), or AdamW")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 0.1 sgd, 1e-3 adamw)")
    g.add_argument("--momentum", type=float, default=None, help=f"SGD only (default {DEFAULTS['momentum']})")
    g.add_argument("--weight-decay", type=float, default=None, help="default: 1e-4 sgd, 0.05 adamw")
    g.add_argument("--lr-schedule", choices=("cosine", "step", "constant"), default="cosine", help="stepped every iteration (default: %(default)s)")
    g.add_argument("--lr-milestones", default=None,
                   help=f"--lr-schedule step only: fractions of the steps after any warm-up (default: {DEFAULTS['lr_milestones']})")
    g.add_argument("--lr-gamma", type=float, default=None,
                   help=f"--lr-schedule step only: factor at each milestone (default: {DEFAULTS['lr_gamma']})")
    g.add_argument("--warmup-epochs", type=float, default=0.0, help="linear warm-up before the schedule (default: %(default)s)")
    g.add_argument("--label-smoothing", type=float, default=0.0,
                   help="cross-entropy label smoothing, in train_loss and test_loss alike (default: %(default)s)")

    g = parser.add_argument_group("performance")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (under torchrun: cuda:LOCAL_RANK)")
    g.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32", help="autocast dtype (default: %(default)s); fp16 uses a GradScaler")
    g.add_argument("--channels-last", action="store_true", help="model and inputs in channels_last memory format")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--sync-bn", action="store_true", help="BatchNorm statistics over the global batch (DDP)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads per process (torch.set_num_threads)")

    g = parser.add_argument_group("run")
    g.add_argument("--seed", type=_seed, default=0,
                   help="an integer in [0, 2**32); under torchrun, rank r > 0 draws dropout masks from seed + r (default: %(default)s)")
    g.add_argument("--out-dir", default="runs/train", help="checkpoint and metrics folder (default: %(default)s)")
    g.add_argument("--checkpoint", default=None, metavar="PATH", help="checkpoint file (default: OUT_DIR/checkpoint.pt)")
    g.add_argument("--save-every", type=int, default=1, metavar="EPOCHS", help="save a checkpoint every N epochs; 0: at the end only (default: %(default)s)")
    g.add_argument("--resume", default=None, metavar="PATH", help="continue from this checkpoint")
    g.add_argument("--metrics", default=None, metavar="PATH", help="per-epoch log, .csv or .jsonl (default: OUT_DIR/metrics.csv)")
    g.add_argument("--log-interval", type=int, default=None, metavar="STEPS",
                   help=f"progress-bar refresh, every N steps (default: {DEFAULTS['log_interval']})")
    g.add_argument("--no-progress", action="store_true", help="no progress bar (one line per epoch)")
    g.add_argument("--quiet", action="store_true", help="no output except errors")


def _drop_rate(text: str) -> float:
    """``--drop-rate``: a probability in [0, 1), checked here so that the error names the option (the model's
    own check names its parameter, ``drop_rate``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0 <= value < 1:  # nan too
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return value


def _seed(text: str) -> int:
    """``--seed``: an integer in [0, 2**32), the range numpy's generator takes (a traceback from
    ``np.random.seed`` after the output folder was made, before)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**32), got {text!r}") from None
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**32), got {text!r}")
    return value


class _OneLineErrors(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The standalone parser of ``python -m effdense.train`` (the ``effdense`` CLI builds its own)."""
    parser = _OneLineErrors(
        prog="effdense train", description="Train a memory-efficient DenseNet (default: DenseNet-BC on digits)."
    )
    add_arguments(parser)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``effdense train`` options (``argv=None``: ``sys.argv[1:]``)."""
    return build_parser().parse_args(argv)


def main(args: argparse.Namespace) -> int:
    """Run ``effdense train``; 0 on success, 2 on a usage/data/checkpoint error, 1 out of memory, 130 when
    interrupted. A checkpoint or metrics file that cannot be written raises
    :class:`~effdense.benchutil.OutputError`, which the entry points (:func:`cli_main`, the ``effdense`` CLI) report
    in one line with exit code 1."""
    try:
        result = train(args)
    except (TrainError, DataError) as exc:
        print(f"effdense train: error: {exc}{_notes(exc)}", file=sys.stderr)
        return 2
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if not _out_of_memory(exc):
            raise
        # (c10's "[enforce fail at alloc_cpu.cpp:127] err == 0. " before the CPU allocator's own words)
        first = re.sub(r"^\[enforce fail at [^\]]*\]\s*(err == 0\.\s*)?", "", first_line(exc))
        print(
            f"effdense train: error: out of memory ({first[:200]}); try a smaller --batch-size or --image-size, "
            f"or a leaner --strategy (shared, fused){_notes(exc)}",
            file=sys.stderr,
        )
        return 1
    return 130 if result.get("interrupted") else 0


def _add_note(exc: BaseException, note: str) -> None:
    """``exc.add_note(note)`` (Python 3.11+; on 3.10 the same ``__notes__`` list, which :func:`_notes` reads)."""
    if hasattr(exc, "add_note"):
        exc.add_note(note)
    else:  # pragma: no cover - Python 3.10
        exc.__notes__ = [*getattr(exc, "__notes__", []), note]  # type: ignore[attr-defined]


def _notes(exc: BaseException) -> str:
    """The notes added to ``exc`` on its way up (what was saved before it ended the run), for its one line."""
    return "".join(f"; {note}" for note in getattr(exc, "__notes__", ()))


def _out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation failure: CUDA's ``torch.OutOfMemoryError``, or the CPU allocator's
    RuntimeError (``DefaultCPUAllocator: can't allocate memory``)."""
    return isinstance(exc, torch.OutOfMemoryError) or "can't allocate memory" in str(exc)


# ------------------------------------------------------------------------------------------------
# Distributed setup


@dataclasses.dataclass
class _Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise TrainError(f"unknown device {name!r}; expected auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainError(f"--device {name} asked for CUDA, but torch.cuda.is_available() is False")
        if device.index is None:
            device = torch.device(f"cuda:{local_rank}")
    elif device.type == "meta":
        raise TrainError("--device meta holds no values: training needs a device with memory (cpu, cuda)")
    elif device.type != "cpu":  # (mps, xpu, ...: untested here, but let those that work train)
        try:
            torch.empty(1, device=device)
        except (RuntimeError, AssertionError) as exc:
            text = str(exc).strip()
            first = text.splitlines()[0].split(". ")[0].rstrip(".") if text else type(exc).__name__
            raise TrainError(f"--device {name} cannot be used in this PyTorch: {first}") from None
    return device


def _batch_norm_problem(model: nn.Module, image_size: int, args: argparse.Namespace, ctx: "_Dist") -> str | None:
    """Whether training-mode BatchNorm gets more than one value per channel (see ``image_size_problem``).
    Every training batch is full (drop_last), so each BatchNorm sees ``--batch-size`` values per pixel in
    each process, and under ``--sync-bn`` (statistics over every process) that many times the processes."""
    seen = args.batch_size * (ctx.world_size if args.sync_bn and ctx.enabled else 1)
    problem = image_size_problem(model, image_size, args.model or "this model", batch_size=seen)
    if problem is not None and seen != args.batch_size:
        problem += f" (the batch its BatchNorms see: --batch-size {args.batch_size} in each of {ctx.world_size} processes)"
    return problem


def _env_int(name: str, default: int) -> int:
    """An integer from torchrun's environment variable ``name`` (``default`` when unset)."""
    value = os.environ.get(name)
    if value is None or not value.strip():
        return default
    try:
        return int(value)
    except ValueError:
        raise TrainError(f"environment variable {name}={value!r} is not an integer (torchrun sets it: launch with torchrun, or unset it)") from None


def _setup_distributed(device_name: str) -> tuple[_Dist, torch.device]:
    """Join the process group that torchrun describes (or one the caller already made)."""
    if dist.is_available() and dist.is_initialized():
        info = _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))
        return info, _resolve_device(device_name, info.local_rank)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    device = _resolve_device(device_name, local_rank)
    if world_size <= 1:
        return _Dist(), device
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:  # (torch's own error is a traceback from inside init_process_group)
        raise TrainError(
            f"WORLD_SIZE={world_size} asks for a distributed run, but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not set: launch with torchrun (which sets them all), or unset WORLD_SIZE"
        )
    _env_int("RANK", 0), _env_int("MASTER_PORT", 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
    return _Dist(dist.get_rank(), dist.get_world_size(), local_rank, owns_group=True), device


def _all_reduce_sum(values: list[float], ctx: _Dist, device: torch.device) -> list[float]:
    if not ctx.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


# ------------------------------------------------------------------------------------------------
# SyncBatchNorm on CPU
#
# nn.SyncBatchNorm raises "SyncBatchNorm expected input tensor to be on GPU" on CPU (torch 2.14; its kernels
# batch_norm_stats/batch_norm_gather_stats_with_counts have no CPU implementation), so a gloo run on CPU
# needs its own. Statistics are combined exactly: each rank contributes (count, mean, M2) and the global
# variance is Chan's pairwise formula, never E[x^2] - E[x]^2. Backward all-reduces sum(dy), sum(dy*x_hat):
#   dx = gamma*invstd * (dy - sum(dy)/M - x_hat * sum(dy*x_hat)/M),  M = global count,
# the gradient of the *sum* of the ranks' losses, as nn.SyncBatchNorm; DDP's gradient averaging then turns
# it into the gradient of the mean.


class _SyncBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, group, world_size):  # type: ignore[override]
        channels = x.shape[1]
        dims = [0] + list(range(2, x.dim()))
        shape = [1, channels] + [1] * (x.dim() - 2)
        acc = _acc_dtype(x.dtype)  # statistics and arithmetic: fp32, fp64 for fp64 (as the shared/fused stage's)
        xf = x.to(acc)
        count = xf.numel() // channels
        if count > 0:
            mean_local = xf.mean(dims)
            m2_local = (xf - mean_local.view(shape)).square().sum(dims)
        else:  # an empty shard still takes part in the collective
            mean_local = m2_local = xf.new_zeros(channels)
        packed = torch.cat([xf.new_tensor([float(count)]), mean_local, m2_local])
        gathered = [torch.empty_like(packed) for _ in range(world_size)]
        dist.all_gather(gathered, packed, group=group)
        stats = torch.stack(gathered)  # (world_size, 2C + 1)
        counts, means, m2s = stats[:, :1], stats[:, 1 : channels + 1], stats[:, channels + 1 :]
        total = counts.sum()
        if total < 2:
            raise ValueError(f"Expected more than 1 value per channel when training, got {int(total)} in all")
        mean = (counts * means).sum(0) / total
        m2 = (m2s + counts * (means - mean).square()).sum(0)
        invstd = torch.rsqrt(m2 / total + eps)
        if running_mean is not None:
            running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
            running_var.mul_(1 - momentum).add_((m2 / (total - 1)).to(running_var.dtype), alpha=momentum)
        y = (xf - mean.view(shape)) * invstd.view(shape)
        if weight is not None:
            y = y * weight.to(acc).view(shape) + bias.to(acc).view(shape)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.group, ctx.total = group, float(total)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x, weight, mean, invstd = ctx.saved_tensors
        channels = x.shape[1]
        dims = [0] + list(range(2, x.dim()))
        shape = [1, channels] + [1] * (x.dim() - 2)
        acc = mean.dtype  # (forward's statistics dtype: fp32, or fp64 for fp64 inputs)
        dyf = dy.to(acc)
        x_hat = (x.to(acc) - mean.view(shape)) * invstd.view(shape)
        sum_dy = dyf.sum(dims)
        sum_dy_xhat = (dyf * x_hat).sum(dims)
        dx = None
        if ctx.needs_input_grad[0]:
            combined = torch.cat([sum_dy, sum_dy_xhat])
            dist.all_reduce(combined, group=ctx.group)
            g_dy, g_dy_xhat = combined[:channels], combined[channels:]
            scale = invstd if weight is None else weight.to(acc) * invstd
            dx = scale.view(shape) * (dyf - (g_dy / ctx.total).view(shape) - x_hat * (g_dy_xhat / ctx.total).view(shape))
            dx = dx.to(x.dtype)
        dw = sum_dy_xhat.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        db = sum_dy.to(weight.dtype) if weight is not None and ctx.needs_input_grad[2] else None
        return dx, dw, db, None, None, None, None, None, None


class CPUSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """SyncBatchNorm for CPU tensors (gloo): batch statistics over every rank of ``process_group``.

    Same parameters, buffers and state-dict keys as ``nn.SyncBatchNorm``, but not a subclass of it:
    DDP refuses any ``nn.SyncBatchNorm`` in a CPU module ("SyncBatchNorm layers only work with GPU
    modules"). :func:`enable_cpu_sync_bn` turns the SyncBatchNorms of a CPU model into these in place;
    on GPUs keep ``nn.SyncBatchNorm``.
    """

    process_group: Any = None
    # what it computes is nn.SyncBatchNorm's: the shared/fused stage computes it (with its own all-reduce of
    # the cached statistics) instead of falling back to naive for a module with a forward of its own
    _effdense_computes_as_batchnorm = True

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:  # (nn.BatchNorm2d's rule)
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_batch_stats = self.training or self.running_mean is None
        running_mean = self.running_mean if not self.training or self.track_running_stats else None
        running_var = self.running_var if not self.training or self.track_running_stats else None
        world_size = 1
        if self.training and dist.is_available() and dist.is_initialized():
            group = self.process_group or dist.group.WORLD
            world_size = dist.get_world_size(group)
        if world_size <= 1:  # one rank, or this rank outside the group (-1): local statistics, as nn.SyncBatchNorm
            return F.batch_norm(
                input, running_mean, running_var, self.weight, self.bias, use_batch_stats, factor, self.eps
            )
        return _SyncBatchNormFunction.apply(
            input, self.weight, self.bias, running_mean, running_var, self.eps, factor, group, world_size
        )


def enable_cpu_sync_bn(model: nn.Module) -> int:
    """Make every ``nn.SyncBatchNorm`` of ``model`` a :class:`CPUSyncBatchNorm` (in place: parameters,
    buffers and process group kept); returns how many were changed. Call after
    ``DenseNet.set_sync_bn(True)`` and before wrapping the model in DDP."""
    changed = 0
    for m in model.modules():
        if type(m) is nn.SyncBatchNorm:
            m.__class__ = CPUSyncBatchNorm  # same state; only forward differs
            changed += 1
    return changed


# ------------------------------------------------------------------------------------------------
# Model, optimiser, schedule


def build_model(args: argparse.Namespace, num_classes: int, in_channels: int) -> densenet.DenseNet:
    """The model that ``--model/--depth/--growth-rate/--strategy`` describe, on CPU in fp32."""
    try:
        strategies.check_strategy(args.strategy)
    except (ValueError, NotImplementedError) as exc:
        raise TrainError(str(exc)) from exc
    common = dict(num_classes=num_classes, in_channels=in_channels, strategy=args.strategy, drop_rate=args.drop_rate)
    try:
        if args.depth is not None:
            if args.model is not None:
                raise TrainError("give either --model or --depth (a custom DenseNet-BC), not both")
            return densenet.densenet_cifar(args.depth, args.growth_rate or 12, **common)
        name = args.model or f"densenet_bc_{DEFAULT_DEPTH}"
        if args.growth_rate is not None:
            common["growth_rate"] = args.growth_rate
        return densenet.get_model(name, **common)
    except TypeError as exc:  # e.g. --growth-rate with an ImageNet preset
        raise TrainError(f"model {args.model!r}: {exc}") from exc
    except ValueError as exc:
        raise TrainError(str(exc)) from exc


def _lr_and_weight_decay(optimizer: str, lr: float | None, weight_decay: float | None) -> tuple[float, float]:
    """``--lr`` and ``--weight-decay``, or the optimiser's defaults where not given."""
    sgd = optimizer == "sgd"
    return (lr if lr is not None else (0.1 if sgd else 1e-3),
            weight_decay if weight_decay is not None else (1e-4 if sgd else 0.05))


def _milestone_fractions(text: str, saved: bool = False) -> list[float]:
    """``--lr-milestones`` as numbers (``"0.5,0.75"`` -> ``[0.5, 0.75]``); ValueError when one is not a number
    or is missing (``""``: a step schedule without a step; ``"0.5,,1"``), as the other comma lists refuse.
    ``saved``: a checkpoint's, whose empty items are left out, as effdense took them before it refused them
    (a run saved with ``0.5,0.75,`` resumes with ``0.5,0.75``)."""
    items = [f.strip() for f in text.split(",")]
    if saved:
        items = [f for f in items if f]
    elif not all(items):
        raise ValueError(f"an empty item in {text!r}")
    return [float(f) for f in items]


def _build_optimizer(args: argparse.Namespace, model: nn.Module) -> torch.optim.Optimizer:
    lr, wd = _lr_and_weight_decay(args.optimizer, args.lr, args.weight_decay)
    # no weight decay on BatchNorm parameters and biases (1-D tensors)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=args.momentum, nesterov=args.momentum > 0)
    return torch.optim.AdamW(groups, lr=lr)


def _warmup_steps(args: argparse.Namespace, steps_per_epoch: int) -> int:
    """The learning-rate warm-up's steps that ``--warmup-epochs`` asks for (before the schedule bounds it)."""
    return int(round(args.warmup_epochs * steps_per_epoch))


def _build_scheduler(args: argparse.Namespace, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    total = max(args.epochs * steps_per_epoch, 1)
    warmup = min(_warmup_steps(args, steps_per_epoch), total - 1)
    main_steps = total - warmup
    if args.lr_schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=main_steps)
    elif args.lr_schedule == "step":
        try:
            fractions = _milestone_fractions(args.lr_milestones)
        except ValueError as exc:
            raise TrainError(f"--lr-milestones must be comma-separated fractions like 0.5,0.75, got {args.lr_milestones!r}") from exc
        # (a list, not a set: milestones that fall on one step, 0.5,0.5 or two that round to it, decay it once
        # each, as MultiStepLR does with a repeated milestone; a set merged them, one decay silently lost)
        milestones = sorted(max(1, int(round(f * main_steps))) for f in fractions)
        sched = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=args.lr_gamma)
    else:
        sched = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    if warmup > 0:
        ramp = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0 / (warmup + 1), total_iters=warmup)
        sched = torch.optim.lr_scheduler.SequentialLR(optimizer, [ramp, sched], milestones=[warmup])
    return sched


def _reschedule(
    args: argparse.Namespace, optimizer: torch.optim.Optimizer, steps_per_epoch: int, epochs_done: int,
    schedule_epochs: int | None,
):
    """The learning-rate schedule of ``schedule_epochs`` epochs (``args.epochs`` if None) of
    ``steps_per_epoch`` steps, advanced to the end of epoch ``epochs_done``, on ``optimizer`` (its state
    loaded from a checkpoint, whose param groups keep their ``initial_lr``): for a run resumed with another
    number of processes than the checkpoint's, whose steps per epoch differ."""
    for group in optimizer.param_groups:
        group["lr"] = group.get("initial_lr", group["lr"])
    length = argparse.Namespace(**{**vars(args), "epochs": schedule_epochs or args.epochs})
    with warnings.catch_warnings():  # (stepped before any optimizer.step(), which PyTorch warns about)
        warnings.simplefilter("ignore", UserWarning)
        scheduler = _build_scheduler(length, optimizer, steps_per_epoch)
        for _ in range(epochs_done * steps_per_epoch):
            scheduler.step()
    return scheduler


def _reject_ineffective_options(args: argparse.Namespace) -> None:
    """Options given that would change nothing are errors, as in the other ``effdense`` subcommands: an
    option that sets a value the run never uses (``--momentum`` with AdamW) is an error, not ignored.
    Switches that turn off what is already off (``--no-augment`` on digits) are accepted."""
    checks = (
        (("momentum",), args.optimizer != "sgd", f"with --optimizer {args.optimizer} (only SGD has a momentum to set)"),
        (("lr_milestones", "lr_gamma"), args.lr_schedule != "step",
         f"with --lr-schedule {args.lr_schedule} (only --lr-schedule step has milestones)"),
        (("log_interval",), args.no_progress or args.quiet,
         f"with {'--quiet' if args.quiet else '--no-progress'} (there is no progress bar to refresh)"),
        (("data_dir",), args.data == "digits", "with --data digits (the digits are bundled)"),
    )
    for names, inert, reason in checks:
        given = [f"--{n.replace('_', '-')}" for n in names if getattr(args, n, None) is not None]
        if inert and given:
            raise TrainError(f"{' and '.join(given)} {'has' if len(given) == 1 else 'have'} no effect {reason}")


def _with_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """A copy of ``args`` with :data:`DEFAULTS` filled in where an option was not given."""
    args = argparse.Namespace(**vars(args))
    for name, value in DEFAULTS.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    return args


def _validate(args: argparse.Namespace) -> None:
    # "~" left to effdense by the shell (--data-dir=~/data: no expansion after "="): the home folder, as
    # torchvision's datasets take it (it was a folder named "~", missing, or made under the working folder)
    for name in ("data_dir", "out_dir", "checkpoint", "resume", "metrics"):
        value = getattr(args, name, None)
        if isinstance(value, str) and value.startswith("~"):
            setattr(args, name, os.path.expanduser(value))
    _reject_ineffective_options(args)
    for name in ("epochs", "batch_size"):
        v = getattr(args, name)
        if v is None or v <= 0:
            raise TrainError(f"--{name.replace('_', '-')} must be a positive integer, got {v}")
    if args.image_size is not None and args.image_size <= 0:  # (None: the dataset's default)
        raise TrainError(f"--image-size must be a positive integer, got {args.image_size}")
    for name in ("subset", "test_subset", "log_interval"):
        v = getattr(args, name)
        if v is not None and v <= 0:
            raise TrainError(f"--{name.replace('_', '-')} must be a positive integer, got {v}")
    if args.threads is not None and args.threads <= 0:
        raise TrainError(f"--threads must be a positive integer, got {args.threads}")
    for name in ("workers", "save_every"):
        v = getattr(args, name)
        if v < 0:
            raise TrainError(f"--{name.replace('_', '-')} must be an integer >= 0, got {v}")
    if args.metrics and not args.metrics.endswith((".csv", ".jsonl")):
        raise TrainError(f"--metrics must end in .csv or .jsonl, got {args.metrics!r}")
    # numbers torch would reject with a traceback (lr, momentum; label smoothing only at the first step) or
    # take silently (a negative weight decay, gamma or warm-up, a nan learning rate)
    for name, value, ok, expected in (
        ("lr", args.lr, lambda v: v >= 0, "a number >= 0"),
        ("momentum", args.momentum, lambda v: 0 <= v < 1, "a number in [0, 1)"),
        ("weight_decay", args.weight_decay, lambda v: v >= 0, "a number >= 0"),
        ("lr_gamma", args.lr_gamma, lambda v: v > 0, "a number > 0"),
        ("warmup_epochs", args.warmup_epochs, lambda v: v >= 0, "a number >= 0"),
        ("label_smoothing", args.label_smoothing, lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    ):
        if value is not None and not (math.isfinite(value) and ok(value)):
            raise TrainError(f"--{name.replace('_', '-')} must be {expected}, got {value}")
    # (before: shortened to the run, silently; a resumed run's schedule is the checkpoint's, which may be longer)
    if args.warmup_epochs and args.warmup_epochs > args.epochs and not args.resume:
        raise TrainError(f"--warmup-epochs {args.warmup_epochs:g} is longer than the run (--epochs {args.epochs})")
    if args.lr_schedule == "step" and args.lr_milestones is not None:
        try:
            fractions = _milestone_fractions(args.lr_milestones)
        except ValueError:
            fractions = [math.nan]
        if not all(0 < f <= 1 for f in fractions):
            raise TrainError(f"--lr-milestones must be comma-separated fractions of training in (0, 1] like 0.5,0.75, "
                             f"got {args.lr_milestones!r}")


def _output_file(path: str, option: str, created: list[str]) -> None:
    """Create the folder of an output file before any work, or raise :class:`TrainError` saying why it cannot
    be written there (before: a traceback at the first metrics row or checkpoint, after the epoch's work).
    Appends the folders it creates to ``created`` (:func:`_remove_empty_folders`)."""
    if os.path.isdir(path):
        raise TrainError(f"{option}: {path!r} is a folder, not a file")
    folder = os.path.dirname(os.path.abspath(path))
    missing, up = [], folder
    while not os.path.exists(up):
        missing.append(up)
        up = os.path.dirname(up)
    try:
        for new in reversed(missing):  # outermost first, one at a time: only the folders this run makes are its own
            try:
                os.mkdir(new)
            except FileExistsError:  # (another process made it meanwhile)
                continue
            created.append(new)
    except OSError as exc:
        raise TrainError(f"{option}: cannot create the folder {folder!r} for {path!r}: {exc.strerror or exc}") from None
    if not os.path.isdir(folder):
        raise TrainError(f"{option}: {folder!r}, the folder for {path!r}, is a file")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise TrainError(f"{option}: the folder {folder!r} for {path!r} is not writable")
    try:  # os.access answers for the permission bits, and root passes them where no file can be made (/proc)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise TrainError(f"{option}: cannot write files in the folder {folder!r} for {path!r}: {exc.strerror or exc}") from None


def _remove_empty_folders(folders: Sequence[str]) -> None:
    """Remove those of ``folders`` that are still empty, innermost first: the output folders of a run that failed
    before writing anything there (before: a data error left the ``--out-dir`` tree it had created)."""
    for folder in sorted(set(folders), key=lambda f: f.count(os.sep), reverse=True):
        try:
            os.rmdir(folder)
        except OSError:  # not empty (a checkpoint, another process's files), or gone
            pass


# ------------------------------------------------------------------------------------------------
# Checkpoints: only tensors, numbers, strings and containers, so they load with weights_only=True.


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


def save_checkpoint(path: str, state: dict[str, Any]) -> None:
    """Write ``state`` atomically (a temporary file, then rename; see :func:`effdense.benchutil._replacing`), so
    an interrupted save never leaves a truncated checkpoint behind. An ``OSError`` (a full disk, a folder that
    cannot be made) is an :class:`~effdense.benchutil.OutputError` naming ``path``: one line and exit code 1 from
    the CLI."""
    handling = sys.exc_info()[1]  # (called from an except clause: that error is no part of this save's)
    with _writing(Path(path)), _replacing(Path(path)) as tmp:
        try:
            with tmp.open("wb") as f:  # (a Python file: a failed write is an OSError, where torch.save given a
                torch.save(state, f)  # path writes in C++, whose full disk was a RuntimeError naming nothing)
        except RuntimeError as exc:  # the zip writer's "unexpected pos" at close, after the file's error
            cause = exc.__context__
            while cause is not None and cause is not handling and not isinstance(cause, (OSError, KeyboardInterrupt)):
                cause = cause.__context__
            if cause is None or cause is handling:
                raise
            raise cause from None  # (an OSError: one line naming the file; a Ctrl-C inside a write: itself)


def _first_sentence(text: str, limit: int = 120) -> str:
    """The first sentence of ``text`` (its first line, up to a full stop followed by a space), at most
    ``limit`` characters, without terminal colour codes or C++ assertion prefixes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", text).strip()
    text = re.sub(r"^\[enforce fail at [^\]]*\]\s*\.?\s*", "", text)  # c10 asserts: "[enforce fail at x.cc:1] . msg"
    line = text.splitlines()[0].strip() if text else ""
    match = re.match(r"(.+?[.!?])(\s|$)", line)
    sentence = match.group(1) if match else line
    return sentence if len(sentence) <= limit else sentence[: limit - 3].rstrip() + "..."


RESUME_OPTIONS = ("data", "image_size", "subset", "no_augment", "drop_rate", "batch_size", "optimizer", "lr", "momentum",
                  "weight_decay", "lr_schedule", "lr_milestones", "lr_gamma", "warmup_epochs", "label_smoothing", "seed")
"""Options that shape the training trajectory. ``--resume`` refuses a run that gives them other values than
the checkpoint's config: the optimiser and scheduler states would silently override a new ``--lr``, and a new
``--seed``, ``--batch-size`` or ``--subset`` would shuffle the rest of the run differently (mid-epoch: skip or
repeat images). Others may change (``--strategy``, ``--precision``, ``--workers``, ``--out-dir``, ...);
``--epochs`` may be fewer, not more with a cosine schedule (checked once the checkpoint is loaded)."""


def _effective_options(config: dict[str, Any]) -> dict[str, Any]:
    """The :data:`RESUME_OPTIONS` of ``config`` (a checkpoint's, or ``vars(args)``), defaults filled in."""
    opts = {k: config[k] for k in RESUME_OPTIONS if k in config}
    if config.get("data") == "digits":  # (no augmentation to turn off: --no-augment changes nothing there)
        opts.pop("no_augment", None)
    opts["lr"], opts["weight_decay"] = _lr_and_weight_decay(
        config.get("optimizer", "sgd"), config.get("lr"), config.get("weight_decay"))
    if opts.get("image_size") is None and config.get("data") in DEFAULT_IMAGE_SIZE:
        opts["image_size"] = DEFAULT_IMAGE_SIZE[config["data"]]
    if isinstance(opts.get("lr_milestones"), str):  # "0.5,0.75" and ".5, .75" are one schedule
        try:
            opts["lr_milestones"] = tuple(_milestone_fractions(opts["lr_milestones"], saved=True))
        except ValueError:
            pass  # refused with its own message when the schedule is built
    return opts


# the options that build the model (build_model): a checkpoint's weights load into the model they describe
MODEL_OPTIONS = ("model", "depth", "growth_rate")


def _misfit(args: argparse.Namespace, state: dict[str, Any], exc: BaseException) -> str:
    """Why a checkpoint's states do not load into this run's model and optimiser: PyTorch's first line, and
    the model options where the checkpoint's config differs (a resume that did not repeat ``--model``)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    first = lines[0] if lines else type(exc).__name__
    if first.startswith("Error(s) in loading state_dict") and len(lines) > 1:  # the header alone says nothing
        detail = lines[1].rstrip(".")
        first = f"{first} {detail[:240]}{'...' if len(detail) > 240 else ''}"
        if "size mismatch for classifier." in detail:
            first += "; the checkpoint's data had another number of classes"
    changed = _changed_options(MODEL_OPTIONS, state.get("config", {}), vars(args))
    if changed:
        return (f"checkpoint {args.resume!r} holds another model: it was saved by a run with {', '.join(changed)}; "
                f"resume with the checkpoint's model options ({first})")
    return f"checkpoint {args.resume!r} does not fit this run: {first}"


def _changed_options(keys: Sequence[str], saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``--option <saved> (this run: <now>)`` for each of ``keys`` the checkpoint's config ``saved`` holds with
    another value than ``now``, the run's options."""

    def show(v: Any) -> str:
        return "not given" if v is None or v is False else "given" if v is True else str(v)

    return [f"--{k.replace('_', '-')} {show(saved[k])} (this run: {show(now.get(k))})"
            for k in keys if k in saved and saved[k] != now.get(k)]


def _class_difference(saved: tuple[str, ...], now: tuple[str, ...]) -> str:
    """How the class names of a checkpoint's data (``saved``) and of this run's (``now``) differ, in a few words."""
    def few(names: Sequence[str]) -> str:
        return ", ".join(repr(n) for n in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")

    in_saved, in_now = set(saved), set(now)
    only_saved = [c for c in saved if c not in in_now]
    only_now = [c for c in now if c not in in_saved]
    if not (only_saved or only_now):
        return f"the same {len(now)} names in another order (labels would change meaning)"
    parts = ([f"{few(only_saved)} only there"] if only_saved else []) + ([f"{few(only_now)} only here"] if only_now else [])
    return "; ".join(parts)


def check_resume_options(path: str, config: dict[str, Any], args: argparse.Namespace) -> None:
    """Raise :class:`CheckpointError` when ``args`` (defaults filled in) would continue the run that saved the
    checkpoint ``path`` (its ``config``) differently from how it started; see :data:`RESUME_OPTIONS`."""
    changed = _changed_options(RESUME_OPTIONS, _effective_options(config), _effective_options(vars(args)))
    if changed:
        raise CheckpointError(
            f"checkpoint {path!r} was saved by a run with other options: {', '.join(changed)}; resume with the "
            f"checkpoint's options, or start a new run without --resume"
        )


def _load_failure(path: str, exc: BaseException) -> str:
    """Why ``torch.load`` could not read ``path``, in a few words: the exception type and the first
    sentence of its message. torch's weights-only refusal is a page of advice; its cause is the line
    after ``WeightsUnpickler error:`` (an unsupported pickle operand: not a torch file; an unsupported
    global: a file holding Python objects other than tensors and containers)."""
    if os.path.getsize(path) == 0:
        return "the file is empty"
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError as os_exc:  # (unreadable: permissions)
        return f"{type(os_exc).__name__}: {os_exc.strerror or os_exc}"
    if not (head == b"PK" or head[:1] == b"\x80"):  # torch.save's zip archive, or its legacy pickle (protocol 2+)
        return "it is not a file written by torch.save"
    message = str(exc)
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", message)
    if refused:
        return f"{type(exc).__name__}: it holds a {refused.group(1)}, which a weights-only load refuses"
    detail = re.search(r"WeightsUnpickler error:\s*(.+)", message, flags=re.DOTALL)
    reason = _first_sentence(detail.group(1) if detail else message)
    return f"{type(exc).__name__}: {reason}" if reason else type(exc).__name__


def load_checkpoint(path: str) -> dict[str, Any]:
    """Read a checkpoint written by ``effdense train``; :class:`CheckpointError` when it cannot be used."""
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path!r} is a folder; give the checkpoint file (e.g. {os.path.join(path, 'checkpoint.pt')!r})")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4" from a file that is no checkpoint
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"cannot read checkpoint {path!r}: it is not an effdense train checkpoint ({_load_failure(path, exc)})"
        ) from exc
    required = {"version", "model", "optimizer", "scheduler", "epoch", "step", "rng"}
    if not isinstance(state, dict):
        raise CheckpointError(f"{path!r} is not an effdense train checkpoint (it holds a {type(state).__name__}, not a dict)")
    if not required <= set(state):
        raise CheckpointError(f"{path!r} is not an effdense train checkpoint (missing {sorted(required - set(state))})")
    version = state["version"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"{path!r} is not an effdense train checkpoint (its format version is {version!r})")
    if version > CHECKPOINT_VERSION:
        raise CheckpointError(
            f"checkpoint {path!r} has format version {version}, which this effdense (format {CHECKPOINT_VERSION}) "
            "does not know: it was written by a newer effdense; resume it with that version"
        )
    return state


# ------------------------------------------------------------------------------------------------
# Interrupts: Ctrl-C (SIGINT) or SIGTERM (what torchrun's agent and cluster schedulers send to stop a run)
# sets a flag; the loop stops after the current step, every rank agreeing, and saves a checkpoint.


class _StopRequested(Exception):
    """Every rank agreed to stop after this step (Ctrl-C seen by at least one)."""


def _stop_agreed(flag: "_InterruptFlag", ctx: "_Dist", device: torch.device) -> bool:
    """Whether to stop here: a stop was asked for (on any rank: every rank stops at the same point, or
    collectives would hang)."""
    stop = flag.requested
    if ctx.enabled:
        t = torch.tensor([int(stop)], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        stop = bool(t.item())
    return stop


class _InterruptFlag:
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, announce: bool) -> None:
        self.requested = False
        self.announce = announce
        self._previous: dict[int, Any] = {}

    def _handler(self, signum, frame) -> None:
        if self.requested:  # a second signal: give up at once, without a checkpoint
            raise KeyboardInterrupt
        self.requested = True
        if self.announce:
            name = signal.Signals(signum).name
            print(f"\n{name}: finishing this step (or the epoch's evaluation) and saving a checkpoint (send it again to "
                  "stop at once)", file=sys.stderr)

    def __enter__(self) -> "_InterruptFlag":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


# ------------------------------------------------------------------------------------------------
# Metrics


def _peak_memory_mib(device: torch.device) -> tuple[float, str]:
    """(peak, kind): CUDA allocator peak since the last reset, or the process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_allocated"
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_max_rss"  # KiB on Linux
    except (ImportError, OSError):  # pragma: no cover - Windows
        return float("nan"), "unavailable"


class _MetricsLog:
    """The per-epoch log: started afresh with ``history``, the rows of the epochs a resumed run has done.
    Appending to the file instead repeated the rows written after the checkpoint (a run killed with
    ``--save-every 2`` in epoch 4 of 4, resumed from epoch 2: rows 1, 2, 3, 3, 4), and a resumed run with
    another ``--metrics`` path lacked the rows before it."""

    def __init__(self, path: str | None, history: list[dict[str, Any]]) -> None:
        self.path = path
        self.history = list(history)
        self.started = False  # the earlier file is replaced at this run's first row, not before: a run that
        # fails before finishing an epoch (a corrupt image) left an earlier run's checkpoint without its log
        if path:
            with _writing(Path(path)):  # (a folder that cannot be made: one line naming the file, exit code 1)
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def start(self) -> None:
        """Replace the earlier file with this run's rows so far (a resumed run's before it): at the first row
        this run writes, or when it saves a checkpoint before one (the log then matches the checkpoint)."""
        if self.started or not self.path:
            return
        self.started = True
        with _writing(Path(self.path)):
            if os.path.exists(self.path):
                os.remove(self.path)
        for earlier in self.history:
            self._append(earlier)

    def write(self, row: dict[str, Any]) -> None:
        if not self.path:
            return
        self.start()
        self._append(row)

    def _append(self, row: dict[str, Any]) -> None:
        path = Path(self.path)
        with _writing(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.endswith(".jsonl"):
                with path.open("a") as f:  # (a diverged run's NaN loss as null: JSON has no NaN, strict parsers refuse it)
                    f.write(json.dumps(_finite(row), allow_nan=False) + "\n")
                return
        flat = {k: (";".join(f"{x:.1f}" for x in v) if isinstance(v, list) else v) for k, v in row.items()}
        append_csv(path, flat, list(flat))


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is in the `train` extra
        return None
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)


# ------------------------------------------------------------------------------------------------
# The run


def _ignore_sigint(worker_id: int) -> None:
    # Ctrl-C reaches the whole process group; workers must outlive it so the main process can finish
    # its step and save a checkpoint
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _loader(
    dataset, sampler, batch_size: int, workers: int, device: torch.device, drop_last: bool, seed: int
) -> DataLoader:
    # its own generator: the loader never draws from the global RNG, whose stream (dropout) a mid-epoch resume
    # then continues exactly; augmentation draws from per-image seeds (SeededSamples), whatever the worker
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        worker_init_fn=_ignore_sigint if workers > 0 else None,
        generator=generator,
    )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager],
    channels_last: bool,
    ctx: _Dist | None = None,
    *,
    label_smoothing: float = 0.0,
) -> tuple[float, float]:
    """(mean loss, accuracy) of ``model`` over ``loader``, summed over ranks; the loss is the training's
    criterion (cross-entropy with its ``label_smoothing``, as torchvision's reference scripts evaluate)."""
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    for x, y in loader:
        x = x.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = y.to(device, non_blocking=True)
        with autocast():
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum", label_smoothing=label_smoothing)
        correct += (logits.argmax(1) == y).sum()
        count += y.numel()
    loss_sum, correct, count = _all_reduce_sum([float(loss_sum), float(correct), float(count)], ctx or _Dist(), device)
    return loss_sum / max(count, 1), correct / max(count, 1)


def train(args: argparse.Namespace, *, on_step: Callable[[int, int, float], None] | None = None) -> dict[str, Any]:
    """Run ``effdense train`` with parsed ``args`` (see :func:`parse_args`) and return a summary:
    ``history`` (one metrics row per epoch), ``step_losses`` (this rank's loss per step), ``model`` (the
    trained, unwrapped model), ``test_acc``, ``wall_s``, ``checkpoint``, ``interrupted``, ``metrics`` (the
    per-epoch log's path), ``rank`` and ``world_size``.

    Args:
        args: the options, as :func:`parse_args` returns them.
        on_step: called as ``on_step(epoch, step, loss)`` after every optimiser step (tests use it).
    """
    t_start = time.perf_counter()
    _validate(args)
    args = _with_defaults(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    ctx, device = _setup_distributed(args.device)
    created: list[str] = []  # the output folders this run creates
    try:
        return _train(args, ctx, device, on_step, t_start, created)
    except BaseException:
        _remove_empty_folders(created)
        raise
    finally:
        if ctx.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _train(args, ctx: _Dist, device: torch.device, on_step, t_start: float, created: list[str]) -> dict[str, Any]:
    say = (lambda *a: None) if (args.quiet or not ctx.is_main) else (lambda *a: print(*a, flush=True))
    out_dir = args.out_dir or "."
    ckpt_path = args.checkpoint or os.path.join(out_dir, "checkpoint.pt")
    metrics_path = args.metrics if args.metrics is not None else os.path.join(out_dir, "metrics.csv")
    if ctx.is_main:  # the rank that writes them
        _output_file(ckpt_path, "--checkpoint" if args.checkpoint else "--out-dir", created)
        if metrics_path:  # --metrics "": no log
            _output_file(metrics_path, "--metrics" if args.metrics is not None else "--out-dir", created)

    resume_state = load_checkpoint(args.resume) if args.resume else None
    if resume_state is not None:
        check_resume_options(args.resume, resume_state.get("config", {}), args)

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    spec = build_datasets(args.data, args.data_dir, args.image_size, augment=not args.no_augment)
    # random crops and flips as a function of (seed, epoch, image): the same for any --workers, and after a resume
    seeded = SeededSamples(spec.train, args.seed) if spec.augmented else None
    train_set = seeded if seeded is not None else spec.train
    train_set = Subset(train_set, args.subset) if args.subset else train_set
    test_set = Subset(spec.test, args.test_subset) if args.test_subset else spec.test
    for note in spec.notes:
        say(f"note: {note}")
    if spec.num_classes == 1:
        say(f"note: {spec.name} has one class: every prediction is right (loss 0, accuracy 1), whatever the model learns")
    for option, n, full in (("--subset", args.subset, spec.train), ("--test-subset", args.test_subset, spec.test)):
        if n and n > len(full):  # (Subset takes them all)
            say(f"note: {option} {n} is more than the {len(full):,} images there: all of them are used")

    model = build_model(args, spec.num_classes, spec.in_channels)
    problem = _batch_norm_problem(model, spec.image_size, args, ctx)
    if problem is not None:
        raise TrainError(problem)
    if args.sync_bn:
        if not ctx.enabled:
            say("note: --sync-bn has no effect in a single process")
        else:
            model.set_sync_bn(True)
            if device.type == "cpu":
                enable_cpu_sync_bn(model)
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if ctx.rank > 0:
        # each rank its own stream from here on (dropout masks): the model above was built alike on every rank
        # from --seed, and rank 0 goes on with that stream, as a single process does; rank r > 0 draws from
        # seed + r. Before, every rank drew the same masks for its i-th image: two processes had one's noise
        torch.manual_seed(args.seed + ctx.rank)

    global_batch = args.batch_size * ctx.world_size
    train_sampler = ShardSampler(len(train_set), ctx.world_size, ctx.rank, shuffle=True, seed=args.seed)
    steps_per_epoch = len(train_sampler) // args.batch_size
    if steps_per_epoch == 0:
        raise TrainError(
            f"{len(train_set)} training images give no full batch of {args.batch_size} per process "
            f"({ctx.world_size} process{'es' if ctx.world_size != 1 else ''}); lower --batch-size"
        )
    test_sampler = ShardSampler(len(test_set), ctx.world_size, ctx.rank, shuffle=False, pad=False)
    test_loader = _loader(test_set, test_sampler, args.batch_size, args.workers, device, False, args.seed)

    if args.warmup_epochs and not args.resume and _warmup_steps(args, steps_per_epoch) == 0:
        raise TrainError(
            f"--warmup-epochs {args.warmup_epochs:g} rounds to no step ({steps_per_epoch} steps per epoch): it would "
            f"have no effect; give at least {1 / steps_per_epoch:.3g} (one step)"
        )
    optimizer = _build_optimizer(args, model)
    scheduler = _build_scheduler(args, optimizer, steps_per_epoch)
    amp_dtype = PRECISIONS[args.precision]
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")

    def autocast() -> contextlib.AbstractContextManager:
        if amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=amp_dtype)

    start_epoch, start_step, global_step = 0, 0, 0
    history: list[dict[str, Any]] = []
    # this epoch's running sums: loss*images, correct, images, training seconds
    progress: dict[str, float] = {}
    # wall seconds of the earlier processes of this run (a resumed run's elapsed_s continues from them, so one
    # log's column stays monotonic; the time between the checkpoint and an interruption is not counted)
    elapsed_before = 0.0
    # the learning-rate schedule's length in epochs: this run's, or a resumed run's first one (its scheduler
    # state keeps that length, whatever --epochs a resume gives; saved as such, so a later resume checks
    # against it: before, a resume with fewer epochs saved those, and the run could not be finished)
    schedule_epochs = args.epochs
    if resume_state is not None:
        try:
            model.load_state_dict(resume_state["model"])
            optimizer.load_state_dict(resume_state["optimizer"])
            scheduler.load_state_dict(resume_state["scheduler"])
            if "scaler" in resume_state and resume_state["scaler"]:
                scaler.load_state_dict(resume_state["scaler"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(_misfit(args, resume_state, exc)) from exc
        start_epoch, start_step = int(resume_state["epoch"]), int(resume_state["step"])
        saved_world = int(resume_state.get("world_size", 1))
        saved_classes = resume_state.get("train_classes")
        saved_images = resume_state.get("train_images")
        saved_total = resume_state.get("train_images_total")  # (the dataset's, before --subset chose from it)
        other_data = None
        if saved_classes is not None and tuple(saved_classes) != spec.classes:
            # (another dataset of as many images: the count below does not tell them apart)
            other_data = f"on other classes: {_class_difference(tuple(saved_classes), spec.classes)}"
        elif saved_images is not None and int(saved_images) != len(train_set):
            # (the data's path is not a trajectory option: a moved dataset resumes. Another one does not: the
            # steps per epoch, and with them the schedule's length, the shuffles and a mid-epoch position, follow
            # the number of images; before, a resume on other data ran a cosine schedule past its end)
            other_data = f"over {int(saved_images):,} training images; this run has {len(train_set):,}"
        elif saved_total is not None and int(saved_total) != len(spec.train):
            # (--subset N chooses N of the dataset's images by their positions in it: of another number of
            # images, other ones, which a resume took without a word)
            other_data = (
                f"with --subset over a dataset of {int(saved_total):,} training images; this one has "
                f"{len(spec.train):,}, of which --subset chooses other images"
            )
        if other_data is not None:
            raise CheckpointError(
                f"checkpoint {args.resume!r} was saved by a run {other_data} ({args.data}"
                f"{f' in {args.data_dir}' if args.data_dir else ''}): resume on the checkpoint's data, or start a new "
                f"run without --resume"
            )
        if start_step > 0 and saved_world != ctx.world_size:
            saved_steps = len(ShardSampler(len(train_set), saved_world, 0, shuffle=True, seed=args.seed)) // args.batch_size
            where = (
                f"after the last training step of epoch {start_epoch + 1}, before its evaluation"
                if start_step >= saved_steps else "mid-epoch"
            )  # (interrupted then: the epoch's row and its end-of-epoch checkpoint are not written yet)
            raise CheckpointError(
                f"checkpoint {args.resume!r} was saved {where} by {saved_world} process(es); resume it with "
                f"{saved_world} (this run has {ctx.world_size}), or from an end-of-epoch checkpoint"
            )
        saved_epochs = resume_state.get("schedule_epochs", resume_state.get("config", {}).get("epochs"))
        if saved_epochs is not None:
            schedule_epochs = int(saved_epochs)
        if saved_epochs is not None and args.epochs > saved_epochs and args.lr_schedule == "cosine":
            # CosineAnnealingLR past T_max rises again, to the peak lr at twice its length
            raise CheckpointError(
                f"checkpoint {args.resume!r} is of a {saved_epochs}-epoch run, whose cosine learning-rate schedule "
                f"ends at epoch {saved_epochs}; past it the schedule would rise again: resume with --epochs "
                f"{saved_epochs} or fewer, or start a new run without --resume"
            )
        if start_epoch > args.epochs or (start_epoch == args.epochs and start_step > 0):
            # the loop below would not run: the run would end at once, reporting the checkpoint's old figures
            done = f"{start_epoch} epoch(s)" + (f" and {start_step} step(s) of the next" if start_step else "")
            raise CheckpointError(
                f"checkpoint {args.resume!r} has trained {done}, and this run asks for --epochs {args.epochs}: "
                f"resume with more epochs (up to the checkpoint's run length with a cosine schedule), or start a "
                f"new run without --resume"
            )
        if start_epoch == args.epochs:
            say(f"note: the checkpoint's run has finished its {args.epochs} epochs; nothing is left to train")
        if saved_epochs is not None and saved_epochs != args.epochs:
            say(f"note: the learning-rate schedule keeps the checkpoint's length ({saved_epochs} epochs)")
        if saved_world != ctx.world_size:  # (at an epoch's end: mid-epoch is refused above)
            # the checkpoint's schedule counts the steps of its run's epochs, which another number of processes
            # takes in other numbers: continued as saved, a cosine schedule reached 0 early and rose again, or
            # ended above 0. The schedule is rebuilt for this run's steps, at the end of the epochs trained.
            scheduler = _reschedule(args, optimizer, steps_per_epoch, start_epoch, saved_epochs)
            say(f"note: the checkpoint's run had {saved_world} process(es), this one {ctx.world_size}: "
                f"{steps_per_epoch} steps per epoch, global batch {global_batch}; the learning-rate schedule goes on "
                f"from the end of epoch {start_epoch} counted in this run's steps")
        global_step = int(resume_state.get("global_step", start_epoch * steps_per_epoch + start_step))
        history = list(resume_state.get("history", []))
        # checkpoints written before it was saved: the last logged epoch's figure, the best there is
        elapsed_before = float(resume_state.get("elapsed_s", history[-1].get("elapsed_s", 0.0) if history else 0.0))
        if ctx.is_main:  # global sums of the interrupted epoch's first steps; other ranks add theirs from 0
            progress = dict(resume_state.get("progress", {}))
        rng = resume_state["rng"]
        own = isinstance(rng, list) and ctx.rank < len(rng)  # one per rank of the run that saved it
        _set_rng_state(rng[ctx.rank] if own else rng[0] if isinstance(rng, list) else rng)
        if not own and ctx.rank > 0:
            # a checkpoint without this rank's state (rank 0's alone: saved by one process, or by one rank on an
            # error or interrupt; or by fewer processes): a stream of this rank's own, as at a start, where the
            # state given to every rank drew the same dropout masks on each
            torch.manual_seed(args.seed + ctx.rank + 1_000_003 * global_step)
        if start_epoch < args.epochs:  # (a finished run has said so above: there is no epoch to continue in)
            say(f"resumed from {args.resume}: epoch {start_epoch + 1}, step {start_step}")

    train_model: nn.Module = model
    if ctx.enabled:
        ids = [device.index] if device.type == "cuda" else None
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    step_autocast = autocast  # the context the training step's forward runs in, around the model call
    if args.compile:
        if amp_dtype is not None:
            # autocast entered inside the compiled call: entered around it, dynamo's retrace of the shared/fused
            # autograd Function fails ("Global autocast(cpu)_enabled state changed while dynamo tracing"; README)
            train_model = AutocastInside(train_model, lambda x: autocast())
            step_autocast = contextlib.nullcontext
        train_model = torch.compile(train_model)

    metrics = _MetricsLog(metrics_path if ctx.is_main else None, history)
    n_params = sum(p.numel() for p in model.parameters())
    say(
        f"{spec.name}: {len(train_set)} train / {len(test_set)} test images, {spec.image_size}x{spec.image_size}, "
        f"{spec.num_classes} class{'es' if spec.num_classes != 1 else ''} | model {args.model or (f'densenet_bc depth {args.depth}' if args.depth else f'densenet_bc_{DEFAULT_DEPTH}')} "
        f"({n_params / 1e6:.3f} M params), strategy {args.strategy} -> "
        f"{strategies.resolve(args.strategy, torch.empty(0, device=device))} | device {device}, "
        f"{ctx.world_size} process(es), global batch {global_batch}, {args.precision}"
        f"{', channels_last' if args.channels_last else ''}{', compiled' if args.compile else ''}"
        f"{', sync_bn' if args.sync_bn and ctx.enabled else ''}"
    )

    def elapsed() -> float:
        """The run's wall seconds so far, over all its processes (see elapsed_before)."""
        return elapsed_before + time.perf_counter() - t_start

    def checkpoint_state(epoch: int, step: int, collective: bool = True) -> dict[str, Any]:
        rng: Any = _rng_state()
        partial = dict(progress)
        if ctx.enabled and collective:  # every rank's RNG, so each resumes its own stream
            gathered: list[Any] = [None] * ctx.world_size
            dist.all_gather_object(gathered, rng)
            rng = gathered
            keys = sorted(partial)
            partial = dict(zip(keys, _all_reduce_sum([partial[k] for k in keys], ctx, device)))
        return {
            "version": CHECKPOINT_VERSION,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else {},
            "epoch": epoch,
            "step": step,
            "global_step": global_step,
            "rng": rng,
            "history": history,
            "progress": partial if step > 0 else {},
            "elapsed_s": elapsed(),
            "config": {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, type(None)))},
            "schedule_epochs": schedule_epochs,
            "world_size": ctx.world_size,
            "train_images": len(train_set),  # (a resume on other data is refused: see above)
            "train_images_total": len(spec.train),
            "train_classes": list(spec.classes),
        }

    def write_checkpoint(state: dict[str, Any]) -> None:
        """The main rank's save, and the log made this run's (not an earlier run's beside this checkpoint)."""
        save_checkpoint(ckpt_path, state)
        metrics.start()

    def save(epoch: int, step: int) -> None:
        state = checkpoint_state(epoch, step)  # collective under DDP: every rank takes part
        if ctx.is_main:
            write_checkpoint(state)

    step_losses: list[float] = []
    epoch_losses: list[torch.Tensor] = []  # this epoch's, turned into floats at its end (no per-step sync)
    interrupted = False
    epoch, step = start_epoch, start_step
    in_step = False  # from the step's forward to the end of its optimiser update
    progress_tensors: Any = None  # (loss_sum, correct, seen, seconds) after the last completed step
    last_saved = None
    flag = _InterruptFlag(announce=ctx.is_main and not args.quiet)
    try:
        with flag:
            for epoch in range(start_epoch, args.epochs):
                step0 = step = start_step if epoch == start_epoch else 0
                train_sampler.set_epoch(epoch, start=step0 * args.batch_size)
                if seeded is not None:
                    seeded.epoch = epoch
                loader = _loader(
                    train_set, train_sampler, args.batch_size, args.workers, device, True, args.seed * 100_003 + epoch
                )
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                train_model.train()
                bar = _progress(steps_per_epoch, f"epoch {epoch + 1}/{args.epochs}", ctx.is_main and not (args.no_progress or args.quiet))
                if bar is not None:
                    bar.update(step0)
                if epoch != start_epoch or not progress:
                    progress = {"loss_sum": 0.0, "correct": 0.0, "seen": 0.0, "train_time": 0.0}
                loss_sum = torch.full((), progress["loss_sum"], dtype=torch.float64, device=device)
                correct = torch.full((), progress["correct"], dtype=torch.float64, device=device)
                seen = int(progress["seen"])
                time_before = progress["train_time"]
                t_epoch = time.perf_counter()
                t_window, seen_window = t_epoch, 0
                step = step0
                for x, y in loader:
                    x = x.to(device, non_blocking=True)
                    if args.channels_last:
                        x = x.contiguous(memory_format=torch.channels_last)
                    y = y.to(device, non_blocking=True)
                    in_step = True
                    with step_autocast():
                        logits = train_model(x)
                        loss = F.cross_entropy(logits.float(), y, label_smoothing=args.label_smoothing)
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                    scheduler.step()
                    step += 1
                    global_step += 1
                    loss_d = loss.detach()
                    epoch_losses.append(loss_d)
                    loss_sum += loss_d.double() * y.numel()
                    correct += (logits.detach().argmax(1) == y).sum()
                    seen += y.numel()
                    seen_window += y.numel()
                    progress_tensors = (loss_sum, correct, seen, time_before + time.perf_counter() - t_epoch)
                    in_step = False  # (a step boundary again: parameters, count and progress all say this step)
                    if on_step is not None:
                        on_step(epoch, step, float(loss_d))
                    if bar is not None and (step % args.log_interval == 0 or step == steps_per_epoch):
                        now = time.perf_counter()
                        rate = seen_window * ctx.world_size / max(now - t_window, 1e-9)
                        t_window, seen_window = now, 0
                        mem, _ = _peak_memory_mib(device)
                        bar.set_postfix(
                            loss=f"{float(loss_sum) / seen:.3f}",
                            acc=f"{float(correct) / seen:.3f}",
                            img_s=f"{rate:.0f}",
                            mem=f"{mem:.0f}MiB",
                            refresh=False,
                        )
                        bar.update(step - bar.n)
                    if _stop_agreed(flag, ctx, device):
                        raise _StopRequested
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                train_time = time_before + time.perf_counter() - t_epoch
                if bar is not None:
                    bar.close()
                step_losses.extend(float(v) for v in epoch_losses)
                epoch_losses = []
                tl, tc, tn = _all_reduce_sum([float(loss_sum), float(correct), float(seen)], ctx, device)
                try:
                    test_loss, test_acc = evaluate(
                        model, test_loader, device, autocast, args.channels_last, ctx, label_smoothing=args.label_smoothing
                    )
                except Exception as exc:
                    # the epoch's training is done: keep it (whatever --save-every says), so that --resume
                    # goes on with the next epoch instead of training this one again. Without collectives:
                    # under DDP the failure may be this rank's alone, and the others would not join one.
                    if ctx.is_main:
                        write_checkpoint(checkpoint_state(epoch + 1, 0, collective=False))
                        _add_note(
                            exc,
                            f"evaluation after epoch {epoch + 1} failed; the epoch's training is saved to {ckpt_path} "
                            f"(no test metrics for it): continue with --resume {ckpt_path}",
                        )
                    raise
                peak, peak_kind = _peak_memory_mib(device)
                peaks = [peak]
                if ctx.enabled:
                    gathered: list[Any] = [None] * ctx.world_size
                    dist.all_gather_object(gathered, peak)
                    peaks = [float(p) for p in gathered]
                row = {
                    "epoch": epoch + 1,
                    "step": global_step,
                    "lr": optimizer.param_groups[0]["lr"],
                    "train_loss": tl / max(tn, 1),
                    "train_acc": tc / max(tn, 1),
                    "test_loss": test_loss,
                    "test_acc": test_acc,
                    "img_per_s": tn / max(train_time, 1e-9),
                    "epoch_time_s": train_time,
                    "elapsed_s": elapsed(),
                    "peak_mem_mib": max(peaks),
                    "peak_mem_kind": peak_kind,
                    "peak_mem_mib_per_rank": peaks,
                    "world_size": ctx.world_size,
                }
                history.append(row)
                metrics.write(row)
                say(
                    f"epoch {epoch + 1}/{args.epochs}  loss {row['train_loss']:.4f}  acc {row['train_acc']:.4f}  "
                    f"test_loss {test_loss:.4f}  test_acc {test_acc:.4f}  {row['img_per_s']:.0f} img/s  "
                    f"peak {' / '.join(f'{p:.0f}' for p in peaks)} MiB ({peak_kind})  lr {row['lr']:.2e}"
                )
                is_last = epoch + 1 == args.epochs
                if is_last or (args.save_every and (epoch + 1) % args.save_every == 0):
                    save(epoch + 1, 0)
                    last_saved = ckpt_path
                if not is_last and _stop_agreed(flag, ctx, device):  # (asked during the evaluation or the save)
                    raise _StopRequested
    except (KeyboardInterrupt, _StopRequested) as exc:
        interrupted = True
        if progress_tensors is not None:
            ls, cs, sn, tt = progress_tensors
            progress = {"loss_sum": float(ls), "correct": float(cs), "seen": float(sn), "train_time": tt}
        step_losses.extend(float(v) for v in epoch_losses)
        # this epoch's row is in the history (its training and evaluation are done: the stop came during its
        # metrics, checkpoint or later): the checkpoint is of the next epoch's start, as the epoch's own save.
        # (Before, a second Ctrl-C there saved this epoch's last step with its row, and --resume evaluated and
        # logged the epoch twice.)
        epoch_done = bool(history) and history[-1]["epoch"] == epoch + 1
        if epoch_done:
            epoch, step = epoch + 1, 0
        if isinstance(exc, KeyboardInterrupt) and ctx.enabled:
            # only this rank was interrupted: the others are not at a collective, so save without one
            if ctx.is_main and not in_step:
                write_checkpoint(checkpoint_state(epoch, step, collective=False))
                last_saved = ckpt_path
                say(f"interrupted: checkpoint saved to {ckpt_path}; continue with --resume {ckpt_path}")
        elif in_step:
            # a raw KeyboardInterrupt inside a step (a second Ctrl-C, or no signal handler: not the main thread):
            # its forward has already moved the BatchNorm statistics and the random generator (dropout), its
            # update may have half-changed the parameters: no state of a step boundary exists to save (saved,
            # it resumed into another run than the uninterrupted one)
            kept = f"; the last one is {last_saved}" if last_saved else ""
            say(f"interrupted inside a training step: no checkpoint saved{kept}")
        else:
            save(epoch, step)
            last_saved = ckpt_path
            where = f"after epoch {epoch}" if epoch_done else f"at epoch {epoch + 1}, step {step}"
            say(f"interrupted {where}: checkpoint saved to {ckpt_path}; continue with --resume {ckpt_path}")

    wall = time.perf_counter() - t_start
    final = history[-1] if history else {}
    if not interrupted:
        metrics.start()  # (a resumed run that had no epoch left to run: its log holds the history all the same)
        say(f"done in {wall:.1f} s: test accuracy {final.get('test_acc', float('nan')):.4f}"
            + (f", checkpoint {last_saved}" if last_saved else "") + (f", metrics {metrics_path}" if metrics_path else ""))
    return {
        "history": history,
        "step_losses": step_losses,
        "model": model,
        "test_acc": final.get("test_acc"),
        "wall_s": wall,
        "checkpoint": last_saved,
        "metrics": metrics_path,
        "interrupted": interrupted,
        "world_size": ctx.world_size,
        "rank": ctx.rank,
    }


def cli_main(argv: list[str] | None = None) -> int:
    """``python -m effdense.train [options]`` (torchrun's entry): exit codes and messages as ``effdense train``
    (:func:`effdense.cli.main`), Ctrl-C outside the training loop (data loading, model building) included:
    130 with one line, not a traceback; a closed stdout (``... | head -2``): 141 quietly."""
    from effdense.cli import run_entry

    return run_entry(lambda: parse_args(argv), main, command="train")


if __name__ == "__main__":
    sys.exit(cli_main())
