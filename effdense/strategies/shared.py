"""Strategy ``shared``: one autograd Function per dense block over a shared feature buffer.

Forward: the block input and every layer's ``k`` new channels are written into one buffer
``F`` of shape ``(N, C0 + L*k, H, W)``; layer ``l`` reads the view ``F[:, :C_l]``. Each channel's batch
statistics are computed once, when it is written, and every later BN1 only forms its affine from them.
Nothing but ``F`` (plus per-channel statistics and dropout RNG states) is kept for backward.

Backward, layers in reverse, with one gradient buffer ``G`` like ``F``: when layer ``l`` is reached every
later consumer of its channels has added its share, so ``G[:, C_l:C_l+k]`` is final. Per layer: replay
dropout, recompute the bottleneck output and BN2-ReLU, conv3x3 backward, BN2 backward, then the
bottleneck's weight and input gradients and the BN1 backward, added into ``G[:, :C_l]``.

The dense block's following transition (BN-ReLU-conv1x1-avgpool over the whole buffer) runs inside the
same Function, so the block buffer's gradient never leaves it, and the stem is recomputed in backward.

The bottleneck math goes through an ``ops`` namespace with the signatures of :mod:`effdense.kernels`:
``shared`` uses the pure-PyTorch reference twins, ``fused`` the Triton kernels (see ``fused.py``).
The Function computes what torchvision's modules compute; a stage holding other modules that a user swapped
in (a conv with a bias, an ``affine=False`` BatchNorm, another activation or pool) runs them instead, as
``naive``, with a warning naming them (``_custom_modules``).

**Under torch.compile** (``fullgraph=True`` holds, tests/test_compile.py). Dynamo traces a stage as it traces
any custom ``autograd.Function``: it runs ``forward`` and ``backward`` symbolically at trace time, so the
per-layer Python loops unroll and ``_Stage``/``_StageState`` exist only while tracing, and records one
``autograd_function_apply`` node whose forward and backward subgraphs hold the ATen ops (``shared``) or the
``effdense::*`` custom ops of the kernels (``fused``: opaque to dynamo, shapes from their fake
implementations, their in-place outputs functionalised by AOT). Running-statistics updates stay in-place
buffer mutations of the forward graph. Three branches on ``torch.compiler.is_compiling()`` make this hold,
and leave the eager path as it was: dropout keeps its bool mask (``aten.native_dropout``, which draws the
same numbers as ``F.dropout`` on CPU) instead of an RNG state that dynamo cannot capture or restore (as it
does while a CUDA graph is captured, ``_keep_dropout_mask``);
backward leaves the kept bottleneck outputs in the state (dynamo refuses mutation of forward-made state
in backward; autograd frees the compiled graph's saved tensors itself); the checkpointed ImageNet stem
runs without its call counter (see ``checkpoint.recompute_once``). The compiled graph saves for backward
what eager saves (block buffers, statistics): DenseNet-BC-100 at batch 16, 32x32, 24 MiB with parameters
vs 21 MiB. Its step peak is higher under ``aot_eager`` (70.5 vs 52.8 MiB; naive 576 vs 537 MiB; measured
at commit d588b30, before chunks widened with small planes), as
functionalisation turns each write into a block buffer into a full-buffer ``slice_scatter`` copy, which
``aot_eager`` does not re-inplace. Not made to compile: SyncBatchNorm semantics (``_sync_count`` and
``_sync_stats`` read host scalars) and ``momentum=None`` (``nn.BatchNorm2d`` itself does not compile with it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import operator
import weakref
from types import ModuleType
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import _disable_current_modes  # (private: see _same_rng_state)

from effdense._autograd import differentiable_once, legacy_batched
from effdense.strategies import (
    STEM,
    block_name,
    computes_as_batchnorm,
    overrides,
    records_grad,
    standard_class,
    warn_runs_as_naive,
)
from effdense.strategies import checkpoint as _checkpoint
from effdense.strategies import naive as _naive

# --------------------------------------------------------------------------------------------------
# BatchNorm bookkeeping: nn.BatchNorm2d semantics on cached statistics


def _uses_batch_stats(bn: torch.nn.modules.batchnorm._BatchNorm) -> bool:
    return bn.training or bn.running_mean is None


# Running statistics that a stage saved for backward (its BatchNorm normalised with them, in eval mode), by
# id with a weak reference, the number of live graphs that saved them, and a count of the stages' updates of
# them since: a backward whose statistics were updated after its forward raises, as autograd does for any saved
# tensor changed in place. The count is this module's own, not autograd's version counter, which the updates
# leave alone, as ATen's batch norm does: a plain BatchNorm in training mode also saves its running statistics
# in the graph (model.features(x) and model(x) in one step), and its backward does not read them; before, the
# updates bumped the versions of flagged statistics, and such a step failed with PyTorch's bare version error
# while an eval-mode graph was alive. A graph stops counting when its saved state is released (a backward
# without retain_graph, or the graph dropped). (Eager only: under torch.compile none of this is checked.)
_SAVED_RUNNING: dict[int, list] = {}  # id -> [weak reference, graphs, updates]


def _remember_saved_running(tensors: Sequence[torch.Tensor], owner: Any) -> list[tuple[torch.Tensor, list, int]]:
    """Flag ``tensors`` as saved until ``owner`` (the stage state the graph holds) is freed; returns, per tensor,
    ``(tensor, its entry, the entry's update count now)`` for backward's check (:func:`_updated_since`)."""
    keys, marks = [], []
    for t in tensors:
        key = id(t)
        entry = _SAVED_RUNNING.get(key)
        if entry is None or entry[0]() is not t:
            entry = _SAVED_RUNNING[key] = [weakref.ref(t, lambda ref, key=key: _forget(key, ref)), 0, 0]
        entry[1] += 1
        keys.append((key, entry[0]))
        marks.append((t, entry, entry[2]))
    weakref.finalize(owner, _release_saved_running, keys)
    return marks


def _updated_since(marks: Sequence[tuple[torch.Tensor, list, int]]) -> list[torch.Tensor]:
    """The running statistics of ``marks`` (:func:`_remember_saved_running`) that a stage updated since."""
    return [t for t, entry, count in marks if entry[2] != count]


def _forget(key: int, ref: weakref.ref) -> None:
    entry = _SAVED_RUNNING.get(key)
    if entry is not None and entry[0] is ref:
        del _SAVED_RUNNING[key]


def _release_saved_running(keys: Sequence[tuple[int, weakref.ref]]) -> None:
    for key, ref in keys:
        entry = _SAVED_RUNNING.get(key)
        if entry is not None and entry[0] is ref:
            entry[1] -= 1
            if entry[1] <= 0:
                del _SAVED_RUNNING[key]



def _update_running_stats(updates: Sequence[tuple[Any, torch.Tensor, torch.Tensor]], count: int) -> None:
    """``nn.BatchNorm2d``'s training-mode update of each ``(bn, mean, biased var)`` (statistics over
    ``count`` values), for all of a stage's BatchNorms at once: a few multi-tensor (``_foreach``) ops
    instead of six per BatchNorm, the same arithmetic (``r = (1 - f)*r + f*stat``, ``f`` the momentum or
    ``1/num_batches_tracked``; the variance made unbiased first). The statistics' versions do not move (as
    ATen's update); those a stage saved for backward count the update (see ``_SAVED_RUNNING``)."""
    todo = [(bn, m, v) for bn, m, v in updates if bn.training and bn.track_running_stats and bn.running_mean is not None]
    if not todo:
        return
    if len({id(bn) for bn, _, _ in todo}) < len(todo):
        # one BatchNorm module in several layers (tied): its updates apply one after another, in layer order,
        # as naive's forward makes them (at once, its counter advanced twice before either factor was read,
        # and the blends of one buffer listed twice summed instead of chaining)
        rounds: list[list[tuple[Any, torch.Tensor, torch.Tensor]]] = []
        seen: dict[int, int] = {}
        for item in todo:
            k = seen[id(item[0])] = seen.get(id(item[0]), -1) + 1
            if k == len(rounds):
                rounds.append([])
            rounds[k].append(item)
        for batch in rounds:
            _update_running_stats(batch, count)
        return
    eager = not torch.compiler.is_compiling()
    with torch.no_grad():
        # (a BatchNorm with running statistics but no counter, num_batches_tracked None, counts nothing and
        # with momentum=None blends with factor 0, as nn.BatchNorm2d does)
        counters = [bn.num_batches_tracked for bn, _, _ in todo if bn.num_batches_tracked is not None]
        if counters:
            torch._foreach_add_(counters, 1)
        groups: dict[float, list[tuple[Any, torch.Tensor, torch.Tensor]]] = {}
        for bn, m, v in todo:
            if bn.momentum is not None:
                factor = bn.momentum
            else:
                factor = 0.0 if bn.num_batches_tracked is None else 1.0 / float(bn.num_batches_tracked)
            groups.setdefault(factor, []).append((bn, m, v))
        if eager and _SAVED_RUNNING:  # counted for the backward of a graph that saved them (_SAVED_RUNNING)
            for bn, _, _ in todo:
                for t in (bn.running_mean, bn.running_var):
                    entry = _SAVED_RUNNING.get(id(t))
                    if entry is not None and entry[0]() is t:
                        entry[2] += 1
        for factor, group in groups.items():
            # (.data: an alias with its own version counter, so the update itself moves no version)
            means = [bn.running_mean.data if eager else bn.running_mean for bn, _, _ in group]
            variances = [bn.running_var.data if eager else bn.running_var for bn, _, _ in group]
            unbiased = torch._foreach_mul([v for _, _, v in group], count / (count - 1))
            _blend_(means, [m for _, m, _ in group], factor)
            _blend_(variances, unbiased, factor)


def _blend_(running: list[torch.Tensor], stats: list[torch.Tensor], factor: float) -> None:
    """``running[i] = (1 - factor) * running[i] + factor * stats[i]``, computed in the statistics' precision
    (float32 for half and bfloat16 models) and rounded once into each buffer, as ATen's update is: a float16
    buffer fed a batch variance above 65504 (its largest value) keeps a finite blend, where casting the
    statistic to the buffer's dtype first made it ``inf``. Buffers already in that precision blend in place."""
    if all(r.dtype == s.dtype for r, s in zip(running, stats)):
        torch._foreach_mul_(running, 1 - factor)
        torch._foreach_add_(running, stats, alpha=factor)
        return
    blended = torch._foreach_mul(stats, factor)
    torch._foreach_add_(blended, running, alpha=1 - factor)  # (a float16/bfloat16 buffer added into float32)
    torch._foreach_copy_(running, blended)


def _sync_stats(mean: torch.Tensor, var: torch.Tensor, count: int, group: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine per-rank (mean, biased var, count) into the global mean and biased var (Chan et al.), as
    SyncBatchNorm. (The global count is the stage's, from :func:`_sync_count`: reading it here again cost a
    device-to-host copy per call.)"""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    local = torch.cat([mean, var, mean.new_full((1,), float(count))])
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local, group=group)
    c = mean.numel()
    stacked = torch.stack(gathered)
    means, vars_, counts = stacked[:, :c], stacked[:, c : 2 * c], stacked[:, 2 * c :]
    total = counts.sum()
    g_mean = (means * counts).sum(0) / total
    g_var = ((vars_ + (means - g_mean) ** 2) * counts).sum(0) / total
    return g_mean, g_var


def _all_reduce_(tensors: Sequence[torch.Tensor], group: Any) -> None:
    import torch.distributed as dist

    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def _bcast(v: torch.Tensor) -> torch.Tensor:
    return v.view(1, -1, 1, 1)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics and accumulation dtype: fp32 for fp32/bf16/fp16 buffers, fp64 for fp64 (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32  # torch.promote_types is a dispatched op


def _acc(t: torch.Tensor) -> torch.Tensor:
    return _cast(t, _acc_dtype(t.dtype))


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``, skipping the call when ``t`` has that dtype already (the result is the same: ``t``
    itself). The per-layer code casts parameters and statistics ~2,000 times per DenseNet-121 step, most of
    them to the dtype they have, and each call's argument parsing alone costs about a microsecond."""
    return t if t.dtype == dtype else t.to(dtype)


# Submodules and parameters are read from the modules' dicts: nn.Module.__getattr__, which ``layer.norm1`` and
# ``bn.weight`` go through, costs about a microsecond per access, ~3,500 times per DenseNet-121 step.


def _grad_like(g: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``g``, a gradient holding ``p``'s elements in contiguous order, viewed with ``p``'s strides where they
    address the same elements: a 1x1 convolution's weight in channels_last has strides (C, 1, C, C) where
    the contiguous gradient has (C, 1, 1, 1), and DDP warned of (and copied) each such gradient per step."""
    g = g.view_as(p)
    if g.stride() != p.stride() and p.is_contiguous():  # (contiguous up to the strides of size-1 dims)
        g = g.as_strided(p.shape, p.stride())
    return g


def _parts(layer) -> tuple[Any, Any, Any, Any]:
    """A dense layer's ``(norm1, conv1, norm2, conv2)``; the last two None for a non-bottleneck layer."""
    m = layer._modules
    return m["norm1"], m["conv1"], m.get("norm2"), m.get("conv2")


def _weight(module) -> torch.Tensor:
    w = module._parameters.get("weight")
    return w if w is not None else module.weight  # e.g. a parametrized weight (torch.nn.utils.parametrize)


def _bias(module) -> torch.Tensor:
    b = module._parameters.get("bias")
    return b if b is not None else module.bias


class _AsSaved:
    """A stage's BatchNorm or convolution as its forward saw it, for backward: the parameters (and, for a
    BatchNorm that normalised with them, the running statistics) are the tensors forward used, autograd's
    saved tensors, not whatever the module holds when backward runs. They differ when forward ran under
    ``torch.func.functional_call`` (MAML-style fast weights, swapped buffers), which puts the module's own
    tensors back before backward; reading the module then gave silently wrong gradients. Backward reads
    ``_weight``/``_bias``, ``eps``, ``out_channels`` and the running statistics, all set here."""

    __slots__ = ("_parameters", "eps", "out_channels", "running_mean", "running_var")

    def __init__(self, module, params: dict[str, torch.Tensor], running: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        self._parameters = params
        self.eps = getattr(module, "eps", None)
        self.out_channels = getattr(module, "out_channels", None)
        self.running_mean, self.running_var = running if running is not None else (None, None)


# --------------------------------------------------------------------------------------------------
# The stage: a dense block, optionally followed by its transition


@dataclasses.dataclass
class _Stage:
    """Everything the Function needs besides tensors; built from the modules at each call."""

    block: Any  # _DenseBlock
    transition: Any  # _Transition or None
    ops: ModuleType
    policy: Any
    dtype: torch.dtype
    sync_group: Any  # process group when SyncBatchNorm semantics are on, else None
    sync: bool
    # The bottleneck ops run on channel chunks of chunk_width channels (the block's bottleneck width
    # times a factor): the reference twins materialise the normalised input chunk by chunk (forward
    # and backward), and the BN1 backward needs a dh scratch only as wide as a chunk, so a layer's
    # workspace stays a few bottleneck outputs wide however deep the block. (The Triton forward kernel
    # never materialises the normalised input and ignores the forward's chunk.)
    chunk_width: int = 64
    # ``ops`` is the namespace of the pass running now (forward, or backward): the stage's own (``own_ops``,
    # the twins or the kernels' public functions), or what ``stage_ops`` (given by ``fused``:
    # effdense.kernels.ops.stage_ops) returns for the pass, the kernels checked once for it (see _pass_ops)
    own_ops: ModuleType | None = None
    stage_ops: Any = None

    @property
    def layers(self) -> list:
        return self.block.layers

    def params(self) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        for layer in self.layers:
            norm1, conv1, norm2, conv2 = _parts(layer)
            out += [_weight(norm1), _bias(norm1), _weight(conv1)]
            if layer.bottleneck:
                out += [_weight(norm2), _bias(norm2), _weight(conv2)]
        if self.transition is not None:
            t = self.transition._modules
            out += [_weight(t["norm"]), _bias(t["norm"]), _weight(t["conv"])]
        return out


class _StageState:
    """Per-channel statistics of the block buffer, and what forward keeps for backward when ``keep``."""

    def __init__(self, keep: bool, count: int) -> None:
        self.keep = keep
        self.count = count  # values per channel behind batch statistics: N*H*W (summed over ranks under sync)
        # forward's running-statistics updates (bn, mean, var), applied together at the end of the stage
        self.updates: list[tuple[Any, torch.Tensor, torch.Tensor]] = []
        self.mean: torch.Tensor | None = None  # fp32 [C_total] cached batch means (biased statistics)
        self.var: torch.Tensor | None = None
        # per layer: how backward finds its dropout mask, or None without dropout: ("rng", (rate, RNG state
        # before the dropout, the memory layout its mask was drawn in, RNG state after it)) replayed in backward
        # (eager; the state after checks the replay), or ("mask", (bool mask, rate)) kept (under torch.compile
        # and CUDA-graph capture)
        self.rng: list[Any] = []
        self.y1: list[torch.Tensor | None] = []  # per layer: bottleneck output, when kept
        # per layer: BN2's batch statistics (mean, biased var; fp32 [B] each) when cached, else None
        self.bn2: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        # per layer: BN1's affine as forward formed it, (scale, shift, mean, invstd) fp32 [c] each, when batch
        # statistics are cached (backward then uses it as is instead of forming it again: four operators
        # fewer per layer, a few vectors of c floats kept), else None; the transition's in ``transition_affine``
        self.affine1: list[tuple[torch.Tensor, ...] | None] = []
        self.transition_affine: tuple[torch.Tensor, ...] | None = None
        # per layer: whether (BN1, BN2) normalised with batch statistics in forward (BN2 False without a
        # bottleneck), and the transition's BN: backward follows forward's choice, not the modules' mode when
        # it runs (a model switched with .train()/.eval() between forward and backward, as autograd does)
        self.batch: list[tuple[bool, bool]] = []
        self.transition_batch = False

    def save(self, value: Any, *, which: str) -> None:
        if self.keep:
            getattr(self, which).append(value)


def _channel_stats(stage: _Stage, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean, var = stage.ops.channel_stats(x)
    if stage.sync:
        mean, var = _sync_stats(mean, var, x.shape[0] * x.shape[2] * x.shape[3], stage.sync_group)
    return mean, var


def _cache_channel_stats(stage: _Stage, state: "_StageState", Fbuf: torch.Tensor, c0: int, c1: int) -> None:
    """Batch statistics of the buffer's channels ``c0:c1`` into the cache (written in place by the op)."""
    if stage.sync:  # all-reduced first, then stored
        state.mean[c0:c1], state.var[c0:c1] = _channel_stats(stage, Fbuf[:, c0:c1])
    else:
        stage.ops.channel_stats(Fbuf[:, c0:c1], out=(state.mean[c0:c1], state.var[c0:c1]))


def _bn_stats(bn, mean: torch.Tensor | None, var: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, biased var) in fp32 (fp64 for fp64) for ``bn``: the batch statistics if given, else the running ones."""
    if mean is None:
        mean, var = bn.running_mean, bn.running_var
    acc = _acc_dtype(mean.dtype)
    return _cast(mean, acc), _cast(var, acc)


def _bn_affine(
    bn, mean: torch.Tensor | None, var: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scale, shift, mean, invstd) in fp32 for ``bn``: batch statistics if given, else running ones."""
    mean, var = _bn_stats(bn, mean, var)
    acc = mean.dtype
    invstd = torch.rsqrt(var + bn.eps)
    scale = _cast(_weight(bn), acc) * invstd
    shift = torch.addcmul(_cast(_bias(bn), acc), mean, scale, value=-1)
    return scale, shift, mean, invstd


def _check_count(count: int, shape: torch.Size) -> None:
    if count <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {torch.Size(shape)}")  # (PyTorch's words)


def _bn1_stats(stage: _Stage, state: _StageState, bn, Fbuf: torch.Tensor, c: int, update: bool, batch: bool):
    """Batch statistics of ``F[:, :c]`` for a BN over it (cached or recomputed) when ``batch``, else
    ``(None, None)`` (running statistics)."""
    if not batch:
        return None, None
    if state.mean is not None:
        mean, var = state.mean[:c], state.var[:c]
    else:
        mean, var = _channel_stats(stage, Fbuf[:, :c])
    if update:
        N, _, H, W = Fbuf.shape
        _check_count(state.count, (N, c, H, W))
        state.updates.append((bn, mean, var))
    return mean, var


def _bn2_stats(
    stage: _Stage, state: _StageState, bn, mean: torch.Tensor, var: torch.Tensor, shape, update: bool, batch: bool
):
    """BN2's batch statistics when ``batch`` (the bottleneck's local mean and biased variance, fp32, from the
    forward op's epilogue; all-reduced under SyncBatchNorm semantics), else ``(None, None)`` (running
    statistics)."""
    if not batch:
        return None, None
    local = shape[0] * shape[2] * shape[3]
    if stage.sync:
        mean, var = _sync_stats(mean, var, local, stage.sync_group)
    if update:
        _check_count(state.count, shape)
        state.updates.append((bn, mean, var))
    return mean, var


def _bn_relu(y: torch.Tensor, bn, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """relu(bn(y)) normalised with ``mean``/``var`` (fp32, or fp64 for fp64; batch or running statistics),
    by the kernel that computes nn.BatchNorm2d's output: ATen's batch norm in its inference form, given them
    as its statistics. In fp32 for a bf16/fp16 ``y``, stored in y's dtype as under autocast. Its rounding is
    nn.BatchNorm2d's: on CPU ATen folds the affine into ``y*alpha + beta`` (with |mean| >> std that loses
    digits that centring first would keep, as it does for nn.BatchNorm2d; checked: fp32 y at mean 1e5, std
    1, errors ~3e-3), on CUDA it centres first. Two operators, where the formula written out costs seven
    (four arithmetic, three broadcast views)."""
    acc = mean.dtype
    out = torch.batch_norm(
        y, _cast(_weight(bn), acc), _cast(_bias(bn), acc), mean, var, False, 0.0, bn.eps, torch.backends.cudnn.enabled
    )
    return out.relu_()


def _keep_dropout_mask(device: torch.device) -> bool:
    """Whether forward keeps dropout's bool mask for backward instead of the RNG state to replay it from:
    under torch.compile (dynamo cannot capture or restore RNG states) and while a CUDA graph is being
    captured on the current stream (a state read on the host at capture stays what it was, while each replay's
    dropout draws new numbers: backward would replay another mask than forward's), and on devices other than
    the CPU and CUDA (MPS, XPU: their dropout draws from their own generator, which the replay does not set)."""
    if torch.compiler.is_compiling():
        return True
    if device.type not in ("cpu", "cuda", "meta"):  # (MPS, XPU, ...: no replay here draws their generator's numbers)
        return True
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _save_rng(device: torch.device) -> Any:
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


def _dropout_layout(out: torch.Tensor) -> torch.memory_format:
    """The memory layout dropout's mask is drawn in for ``out``: the mask is allocated like ``out`` and its
    numbers drawn in memory order, so a channels_last ``out`` (a channels_last model's convolution) gets
    another mask from the same RNG state than a contiguous one."""
    if out.dim() == 4 and not out.is_contiguous() and out.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _same_rng_state(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two generator states (host byte tensors: comparing them syncs no device) are equal, compared
    outside any dispatch mode: under FakeTensorMode (estimates, ``tests/test_compile.py``) the states are real
    tensors, which the mode refuses as inputs (it raised there), and fake dropout draws nothing on either side."""
    with _disable_current_modes():
        return torch.equal(a, b)


def _dropout_replay(
    g: torch.Tensor, p: float, rng_state: Any, layout: torch.memory_format, after: Any = None
) -> torch.Tensor:
    """Apply the forward's dropout mask (same RNG state, shape, dtype and memory layout) to the gradient ``g``.
    (Replayed on a contiguous ``g`` for a channels_last forward, the mask was another: wrong gradients.)
    ``after``: the RNG state that forward's draw left; a replay that leaves another drew other numbers, which
    happens when another thread used the generator while forward drew its mask: that raises, instead of the
    silently wrong gradients it gave (torch.utils.checkpoint's RNG replay has the same race).

    On CPU the replay draws from a private generator set to forward's state, with ``F.dropout``'s own steps
    (``bernoulli_(1 - p)`` into an ``empty_like`` of the input, scaled by ``1 / (1 - p)``; nothing drawn at
    ``p = 1``): backward leaves the global generator alone, where setting it back and restoring it (as
    ``fork_rng`` does) raced other threads' draws, handing them forward's numbers again and undoing their
    advance. CUDA's dropout draws in a fused kernel from the default generator only, so there the replay
    sets that generator back inside ``fork_rng``."""
    device = g.device
    gi = g.contiguous(memory_format=layout)
    if device.type in ("cpu", "meta"):  # (meta estimates stand for the CPU; other devices keep the mask)
        generator = torch.Generator()
        generator.set_state(rng_state)
        if p >= 1:
            out = gi * 0.0
        else:
            noise = torch.empty_like(gi).bernoulli_(1 - p, generator=generator)
            out = gi * noise.div_(1 - p)
        replayed_to = generator.get_state()
    else:
        if gi.data_ptr() % 128:
            # CUDA's dropout kernel picks its vector width from its input's address (16 bytes and up), and each
            # width maps the random numbers to elements differently (same generator offset after: the check
            # below cannot tell).
            # Forward's input was a fresh allocation; a channel slice of the gradient buffer, contiguous as it
            # is at batch 1, can start anywhere: draw on a fresh copy, aligned as forward's (the allocator's 512)
            gi = gi.clone(memory_format=layout)
        with torch.random.fork_rng(devices=[device], device_type=device.type):
            torch.cuda.set_rng_state(rng_state, device)
            out = F.dropout(gi, p=p, training=True)
            replayed_to = _save_rng(device)
    if after is not None and not _same_rng_state(replayed_to, after):
        raise RuntimeError(
            "effdense: a dense layer's dropout mask cannot be replayed in backward: the random number generator "
            f"of {device} was used elsewhere (another thread) while this layer's forward drew the mask"
            f"{', or while backward replayed it' if device.type == 'cuda' else ''}, so the replay would apply another "
            "mask. Strategies 'shared' and 'fused' replay dropout masks from the RNG state, as "
            "torch.utils.checkpoint does: run a model's forward and backward from one thread at a time, or use "
            "strategy 'naive' or 'checkpoint', which keep dropout's mask"
        )
    return out


def _bottleneck_forward(
    stage: _Stage, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, w: torch.Tensor, stats: bool = True
):
    """``ops.bottleneck_forward``, the normalised input formed ``chunk_width`` channels at a time by the
    twins. Returns ``(y, mean, var)``, BN2's local batch statistics ``None`` when not ``stats`` (running
    statistics, or backward with cached ones)."""
    return stage.ops.bottleneck_forward(x, scale, shift, w, stats=stats, chunk=stage.chunk_width)


def _bottleneck_backward(
    stage: _Stage,
    G: torch.Tensor,
    x: torch.Tensor,
    bn,
    affine: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    batch_stats: bool,
    count: int,
    w: torch.Tensor,
    dy: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of ``y = W · relu(bn(x))`` given ``dy``: adds the input gradient into ``G`` (the gradient
    slice matching ``x``) and returns (dW fp32 (B, C), dgamma, dbeta). Works on channel chunks (inside
    ``ops.bottleneck_backward`` when BN statistics are local): each chunk's masked ``dh``, BN sums and BN
    backward depend only on its own channels, so its temporaries are a chunk wide."""
    scale, shift, mean, invstd = affine
    gamma = _cast(_weight(bn), invstd.dtype)
    target = G if stage.policy.shared_grad else torch.zeros_like(G)  # ablation: a per-layer gradient tensor
    if not stage.sync:
        dw, dgamma, dbeta = stage.ops.bottleneck_backward(
            x, scale, shift, w, dy, mean, invstd, gamma, target, batch_stats=batch_stats, chunk=stage.chunk_width
        )
        if target is not G:
            G.add_(target)
        return dw, dgamma, dbeta
    # (imported here, not at import: effdense.kernels imports triton; nor above: an import statement costs
    # host time on each of the ~60 calls per step)
    from effdense.kernels._checks import channel_chunks

    parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (dW, dgamma, dbeta) per chunk
    for c0, c1 in channel_chunks(x.shape[1], stage.chunk_width):
        xs, sc, sh, wc = x[:, c0:c1], scale[c0:c1], shift[c0:c1], w[:, c0:c1]  # the twins copy it, the kernels need not
        # SyncBatchNorm semantics: BN1's sums are all-reduced between the input gradient and the BN backward
        dwc = stage.ops.bottleneck_backward_weight(xs, sc, sh, dy)
        dh, sum_dh, sum_dh_xmu = stage.ops.bottleneck_backward_input(xs, sc, sh, wc, dy, mean[c0:c1])
        parts.append((dwc, *_bn_backward_into(
            stage, target[:, c0:c1], xs, dh, gamma[c0:c1], mean[c0:c1], invstd[c0:c1], batch_stats, sum_dh, sum_dh_xmu, count
        )))
        del dh
    dw, dgamma, dbeta = (torch.cat(t, dim=-1) if len(t) > 1 else t[0] for t in zip(*parts))
    if target is not G:
        G.add_(target)
    return dw, dgamma, dbeta


def _layer_forward(stage: _Stage, state: _StageState, layer, Fbuf: torch.Tensor, c: int):
    """Run layer ``l`` reading ``F[:, :c]``; returns its k new channels (not yet written)."""
    dtype = stage.dtype
    norm1, conv1, norm2, conv2 = _parts(layer)
    x = Fbuf[:, :c]
    batch1 = _uses_batch_stats(norm1)
    batch2 = layer.bottleneck and _uses_batch_stats(norm2)
    state.save((batch1, batch2), which="batch")
    mean1, var1 = _bn1_stats(stage, state, norm1, Fbuf, c, update=True, batch=batch1)
    if layer.bottleneck:
        affine1 = _bn_affine(norm1, mean1, var1)
        state.save(affine1 if stage.policy.cache_stats else None, which="affine1")
        w1 = _cast(_weight(conv1), dtype).view(conv1.out_channels, c)
        y1, y_mean, y_var = _bottleneck_forward(stage, x, affine1[0], affine1[1], w1, stats=batch2)
        mean2, var2 = _bn2_stats(stage, state, norm2, y_mean, y_var, y1.shape, update=True, batch=batch2)
        state.save((mean2, var2) if mean2 is not None and stage.policy.cache_stats else None, which="bn2")
        state.save(None if stage.policy.recompute_bottleneck else y1, which="y1")
        z = _bn_relu(y1, norm2, *_bn_stats(norm2, mean2, var2))
        del y1
        out = F.conv2d(z, _cast(_weight(conv2), dtype), padding=1)
    else:
        for which in ("affine1", "bn2", "y1"):  # one entry per layer in each list, whatever the layer
            state.save(None, which=which)
        h = _bn_relu(x, norm1, *_bn_stats(norm1, mean1, var1))
        out = F.conv2d(h, _cast(_weight(conv1), dtype), padding=1)
    # (saved with the mask or RNG state: backward applies this rate, whatever the layer's then; a number, as a
    # 0-d tensor set by a schedule drew its replay through another bernoulli_ overload than forward's dropout)
    p = layer.drop_rate
    p = float(p) if isinstance(p, torch.Tensor) else p
    if p > 0 and layer.training:
        if state.keep and _keep_dropout_mask(out.device):
            # dynamo and CUDA-graph capture cannot save and restore RNG states: keep the mask (1 byte per new
            # value). The CPU kernel draws the same Bernoulli numbers as F.dropout's, so the masks agree with eager.
            out, mask = torch.ops.aten.native_dropout(out, p, True)
            state.save(("mask", (mask, p)), which="rng")
        else:
            if state.keep:
                before, layout = _save_rng(out.device), _dropout_layout(out)
            out = F.dropout(out, p=p, training=True)
            if state.keep:  # (the state after too: backward checks that its replay drew the same numbers)
                # none for a fake or meta draw (an estimate), which takes no numbers: another thread's draws in
                # between moved the real generator, and the check took that for a broken replay
                drew = out.device.type != "meta" and not isinstance(out, FakeTensor)
                state.save(("rng", (p, before, layout, _save_rng(out.device) if drew else None)), which="rng")
    else:
        state.save(None, which="rng")
    return out


def _transition_forward(stage: _Stage, state: _StageState, Fbuf: torch.Tensor) -> torch.Tensor:
    t = stage.transition
    c = Fbuf.shape[1]
    batch = _uses_batch_stats(t.norm)
    mean, var = _bn1_stats(stage, state, t.norm, Fbuf, c, update=True, batch=batch)
    affine = _bn_affine(t.norm, mean, var)
    if state.keep:
        state.transition_batch = batch
        if stage.policy.cache_stats:
            state.transition_affine = affine
    w = _cast(t.conv.weight, stage.dtype).view(t.conv.out_channels, c)
    # no BatchNorm follows the transition's conv: no epilogue sums (their zeroed buffer and atomics)
    y, _, _ = _bottleneck_forward(stage, Fbuf, affine[0], affine[1], w, stats=False)
    return F.avg_pool2d(y, kernel_size=2, stride=2)


def _pass_ops(
    stage: _Stage,
    buffer: torch.Tensor,
    norms: Sequence[tuple[Any, bool]],
    params: Sequence[torch.Tensor],
    *others: torch.Tensor,
) -> Any:
    """The ops namespace for one pass (forward or backward) of ``stage`` over its block ``buffer``, with
    ``params`` and the pass's other inputs ``others``: what the stage's ``stage_ops`` returns for them (the
    kernels with their argument checks made once for the pass instead of on each of its ~130 calls), else
    the stage's own ops. ``norms``: each BN1 and then the transition's BatchNorm as the pass reads them
    (module or :class:`_AsSaved`), with whether it normalises with its running statistics: their tensors reach
    the kernels as per-channel vectors, and :func:`_norm_vectors_fit` checks them here, as the per-call checks
    did. (Not under torch.compile, where dynamo refuses the stage's mutation and the kernels go through their
    torch.library ops: the stage keeps its own.)"""
    if stage.stage_ops is not None and _norm_vectors_fit(stage, norms, buffer.device):
        ops = stage.stage_ops(buffer, params, *others)
        if ops is not None:
            return ops
    return stage.own_ops


def _norm_vectors_fit(stage: _Stage, norms: Sequence[tuple[Any, bool]], device: torch.device) -> bool:
    """Whether each BatchNorm tensor that a pass hands the kernels as a per-channel vector is one that the
    kernels' per-call checks accept: a BN1's (and the transition's) weight and bias, and its running mean and
    variance when it normalises with them, each 1-D with one element per channel it normalises, unit stride,
    on ``device`` and not float64 (the vectors formed from them would be). The modules' declared sizes do not
    ensure it: a parameter or buffer replaced by one of another size or layout (naive then raises PyTorch's
    error, or runs) went to the kernels unchecked, which read past its end."""
    block = stage.block
    C0, k = block.num_input_features, block.growth_rate
    last = len(norms) - 1
    for i, (bn, running) in enumerate(norms):
        channels = block.num_output_features if (i == last and stage.transition is not None) else C0 + i * k
        for t in (_weight(bn), _bias(bn), *((bn.running_mean, bn.running_var) if running else ())):
            if t.dim() != 1 or t.shape[0] != channels or not t.is_contiguous() or t.dtype == torch.float64 or t.device != device:
                return False
    return True


def _stage_forward(
    stage: _Stage, x: torch.Tensor, keep: bool, params: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor | None, _StageState]:
    """Fill the block buffer and run the transition. Returns (F, transition output or None, state).
    ``params``: the stage's parameters (:meth:`_Stage.params`), for :func:`_pass_ops`."""
    block, k = stage.block, stage.block.growth_rate
    N, C0, H, W = x.shape
    c_total = block.num_output_features
    bns = [layer._modules["norm1"] for layer in stage.layers] + ([stage.transition.norm] if stage.transition is not None else [])
    batch1 = any(_uses_batch_stats(bn) for bn in bns)  # BN1s and the transition's: the buffer's cached statistics
    batch = batch1 or any(
        _uses_batch_stats(n) for layer in stage.layers if (n := layer._modules.get("norm2")) is not None
    )
    # the global count only where batch statistics are formed: in eval mode no collective runs (a rank may
    # evaluate alone, as with nn.SyncBatchNorm, which all-reduces in training only)
    count = N * H * W if not (stage.sync and batch) else _sync_count(stage, N * H * W, x.device)
    state = _StageState(keep, count)
    Fbuf = torch.empty((N, c_total, H, W), dtype=stage.dtype, device=x.device)
    if not torch.compiler.is_compiling():
        stage.ops = _pass_ops(stage, Fbuf, [(bn, not _uses_batch_stats(bn)) for bn in bns], params, x)
    Fbuf[:, :C0].copy_(x)
    cache = stage.policy.cache_stats and batch1
    if cache:
        state.mean = torch.empty(c_total, dtype=_acc_dtype(stage.dtype), device=x.device)
        state.var = torch.empty_like(state.mean)
        _cache_channel_stats(stage, state, Fbuf, 0, C0)
    for l, layer in enumerate(stage.layers):
        c = C0 + l * k
        new = _layer_forward(stage, state, layer, Fbuf, c)
        Fbuf[:, c : c + k].copy_(new)
        del new
        if cache:
            _cache_channel_stats(stage, state, Fbuf, c, c + k)
    out = _transition_forward(stage, state, Fbuf) if stage.transition is not None else None
    _update_running_stats(state.updates, state.count)
    state.updates = []
    return Fbuf, out, state


# --------------------------------------------------------------------------------------------------
# Backward pieces


def _bn_backward_into(
    stage: _Stage,
    grad: torch.Tensor,
    x: torch.Tensor,
    dh: torch.Tensor,
    gamma: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    batch_stats: bool,
    sum_dh: torch.Tensor,
    sum_dh_xmu: torch.Tensor,
    count: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BN backward of ``dh`` (grad of the BN output, ReLU mask applied) added into ``grad``.
    Returns (dgamma, dbeta). With batch statistics:
    ``dx = gamma*invstd*(dh - Σdh/M - (x-mean)*invstd²*Σdh(x-mean)/M)``; with running ones ``gamma*invstd*dh``."""
    # affine gradients from the local sums, as nn.SyncBatchNorm: DDP averages them across ranks
    dgamma = sum_dh_xmu * invstd
    dbeta = sum_dh.clone()
    if stage.sync and batch_stats:
        _all_reduce_([sum_dh, sum_dh_xmu], stage.sync_group)
    if batch_stats:
        # the op divides by the local N*H*W; scale the sums so that the global count is used under sync
        local = x.shape[0] * x.shape[2] * x.shape[3]
        sdh, sdx = sum_dh * (local / count), sum_dh_xmu * (local / count)
    else:  # running statistics: the op reads neither sum (nor x)
        sdh, sdx = sum_dh, sum_dh_xmu
    stage.ops.bn_backward_accumulate(grad, x, dh, mean, invstd, gamma, sdh, sdx, batch_stats=batch_stats)
    return dgamma, dbeta


def _bn_backward_whole(
    stage: _Stage,
    dzm: torch.Tensor,
    y: torch.Tensor,
    bn,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    batch_stats: bool,
    count: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of ``bn(y)`` over a whole tensor ``y`` (BN2) given the gradient ``dzm`` of its output and
    the (fp32) statistics it was normalised with: ``(dy in y's dtype, dgamma, dbeta)``, the affine gradients
    from the local sums (as nn.SyncBatchNorm: DDP averages them across ranks)."""
    gamma = _cast(_weight(bn), invstd.dtype)
    if not stage.sync and y.is_contiguous() and dzm.is_contiguous():
        # nn.BatchNorm2d's own backward kernel: one fused pass for the sums, one for dy (fp32 statistics and
        # accumulation; a bf16/fp16 y, as under autocast, is read and dy written in its dtype)
        if batch_stats:
            return torch.ops.aten.native_batch_norm_backward(
                dzm, y, gamma, None, None, mean, invstd, True, bn.eps, [True, True, True]
            )
        # (the running statistics in fp32 like gamma: a bf16/fp16 model's own are refused by the CPU kernel)
        return torch.ops.aten.native_batch_norm_backward(
            dzm, y, gamma, _cast(bn.running_mean, gamma.dtype), _cast(bn.running_var, gamma.dtype), None, None,
            False, bn.eps, [True, True, True],
        )
    # SyncBatchNorm semantics (the sums all-reduced before dy), or strided tensors: the formula in fp32
    dzm = _acc(dzm)
    xmu = _acc(y) - _bcast(mean)
    sum_dz = dzm.sum(dim=(0, 2, 3))
    sum_dz_xmu = (dzm * xmu).sum(dim=(0, 2, 3))
    dgamma, dbeta = sum_dz_xmu * invstd, sum_dz.clone()
    if stage.sync and batch_stats:
        _all_reduce_([sum_dz, sum_dz_xmu], stage.sync_group)
    coef = gamma * invstd
    if batch_stats:
        dy = _bcast(coef) * (dzm - _bcast(sum_dz / count) - xmu * _bcast(invstd * invstd * sum_dz_xmu / count))
    else:
        dy = dzm * _bcast(coef)
    return _cast(dy, y.dtype), dgamma, dbeta


def _layer_backward(
    stage: _Stage, state: _StageState, l: int, layer, parts: tuple, Fbuf: torch.Tensor, G: torch.Tensor, c: int, k: int
) -> list[torch.Tensor]:
    """Layer ``l``'s backward: adds its input gradient into ``G[:, :c]``, returns its parameters' gradients.
    ``parts``: its ``(norm1, conv1, norm2, conv2)`` as forward saw them (:func:`_modules_as_saved`)."""
    dtype = stage.dtype
    x = Fbuf[:, :c]
    dout = G[:, c : c + k]
    if state.rng[l] is not None:  # forward's dropout, at forward's rate (a schedule may have changed the layer's)
        kind, saved = state.rng[l]
        if kind == "mask":
            mask, p = saved  # (p = 1, set by a schedule: every value dropped, as F.dropout's zero gradient)
            dout = torch.ops.aten.native_dropout_backward(dout, mask, 1.0 / (1.0 - p) if p < 1 else 0.0)
        else:
            dout = _dropout_replay(dout, *saved)
    bn1, conv1, bn2, conv2 = parts
    batch1, batch2 = state.batch[l]  # forward's choice, whatever the modules' mode now
    count = state.count
    if layer.bottleneck:
        affine1 = state.affine1[l]  # forward's, when it kept it
        if affine1 is None:
            affine1 = _bn_affine(bn1, *_bn1_stats(stage, state, bn1, Fbuf, c, update=False, batch=batch1))
        scale1, shift1 = affine1[0], affine1[1]
        w1 = _cast(_weight(conv1), dtype).view(conv1.out_channels, c)
        cached = state.bn2[l]  # BN2's batch statistics from forward, or None (running stats, or not cached)
        if stage.policy.recompute_bottleneck:
            y1, y_mean, y_var = _bottleneck_forward(stage, x, scale1, shift1, w1, stats=cached is None and batch2)
        else:
            y1 = state.y1[l]
            y_var = y_mean = None
            if cached is None and batch2:  # (two passes: accurate where E[y²] - E[y]² cancels)
                y_var, y_mean = torch.var_mean(_acc(y1), dim=(0, 2, 3), correction=0)
        if cached is not None:
            mean2, var2 = cached
        else:
            mean2, var2 = _bn_stats(bn2, *_bn2_stats(stage, state, bn2, y_mean, y_var, y1.shape, update=False, batch=batch2))
        z = _bn_relu(y1, bn2, mean2, var2)
        w2 = _cast(_weight(conv2), dtype)
        dz, dw2, _ = torch.ops.aten.convolution_backward(
            dout.contiguous(), z, w2, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [True, True, False]
        )
        dzm = torch.ops.aten.threshold_backward(dz, z, 0)  # ReLU's mask from its output, z > 0
        del dout, dz, z
        invstd2 = torch.rsqrt(var2 + bn2.eps)
        dy1, dgamma2, dbeta2 = _bn_backward_whole(stage, dzm, y1, bn2, mean2, invstd2, batch2, count)
        del dzm, y1
        dw1, dgamma1, dbeta1 = _bottleneck_backward(stage, G[:, :c], x, bn1, affine1, batch1, count, w1, dy1)
        del dy1
        return [
            _cast(dgamma1, _weight(bn1).dtype),
            _cast(dbeta1, _bias(bn1).dtype),
            _cast(_grad_like(dw1, _weight(conv1)), _weight(conv1).dtype),
            _cast(dgamma2, _weight(bn2).dtype),
            _cast(dbeta2, _bias(bn2).dtype),
            _cast(dw2, _weight(conv2).dtype),
        ]
    # original DenseNet layer: BN-ReLU-conv3x3 over the concatenation, all in PyTorch ops
    mean1, var1 = _bn_stats(bn1, *_bn1_stats(stage, state, bn1, Fbuf, c, update=False, batch=batch1))  # batch or running
    invstd1 = torch.rsqrt(var1 + bn1.eps)
    h = _bn_relu(x, bn1, mean1, var1)
    dh, dw, _ = torch.ops.aten.convolution_backward(
        dout.contiguous(), h, _cast(_weight(conv1), dtype), None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [True, True, False]
    )
    dh = torch.ops.aten.threshold_backward(dh, h, 0)  # ReLU mask from the output (one pass; a bool mask is slower)
    del h
    grad = G[:, :c]
    target = grad if stage.policy.shared_grad else torch.zeros_like(grad)
    # BN1's sums with one fp32 temporary, (x - mean) promoted and multiplied by dh in place, and Σdh
    # accumulated in fp32 without a copy: before, dh and x were widened to fp32 copies, and their difference
    # and product made two more, and under bf16 autocast a DenseNet-40 step peaked 1.29x above checkpoint's
    # (183.1 against 142.2 MiB at batch 64; now 118.2).
    sum_dh = dh.sum(dim=(0, 2, 3), dtype=_acc_dtype(dtype))
    sum_dh_xmu = torch.sub(x, _bcast(mean1)).mul_(dh).sum(dim=(0, 2, 3))  # (fp32 by promotion: mean1 is)
    dgamma1, dbeta1 = _bn_backward_into(
        stage, target, x, dh, _cast(_weight(bn1), invstd1.dtype), mean1, invstd1, batch1, sum_dh, sum_dh_xmu, count
    )
    del dh
    if target is not grad:
        grad.add_(target)
    return [_cast(dgamma1, _weight(bn1).dtype), _cast(dbeta1, _bias(bn1).dtype), _cast(dw, _weight(conv1).dtype)]


def _count_device(group: Any, device: torch.device) -> torch.device:
    """Where a stage whose input is on ``device`` all-reduces its batch count over ``group``: NCCL reduces CUDA
    tensors only, on the input's GPU (as nn.SyncBatchNorm: a rank that never called torch.cuda.set_device has
    cuda:0 current, and every rank reducing there is NCCL's duplicate-GPU error); gloo takes CPU ones."""
    import torch.distributed as dist

    if dist.get_backend(group) != "nccl":
        return torch.device("cpu")
    return device if device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())


def _sync_count(stage: _Stage, local: int, device: torch.device) -> int:
    """The global batch count of a stage whose input (on ``device``) holds ``local`` values per channel."""
    import torch.distributed as dist

    device = _count_device(stage.sync_group, device)
    t = torch.tensor([float(local)], device=device)
    dist.all_reduce(t, group=stage.sync_group)
    return int(round(float(t)))


def _avg_pool2_backward(dout: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """Gradient of ``avg_pool2d(kernel=2, stride=2)`` for an (H, W) input: each output gradient spread
    over its 2x2 window (/4); the last row/column of an odd size gets zero."""
    N, C, Ho, Wo = dout.shape
    dy = torch.mul(dout[:, :, :, None, :, None].expand(N, C, Ho, 2, Wo, 2), 0.25).view(N, C, 2 * Ho, 2 * Wo)
    if (2 * Ho, 2 * Wo) != (H, W):
        dy = F.pad(dy, (0, W - 2 * Wo, 0, H - 2 * Ho))
    return dy


def _transition_backward(
    stage: _Stage, state: _StageState, parts: tuple, Fbuf: torch.Tensor, G: torch.Tensor, dout: torch.Tensor
) -> list[torch.Tensor]:
    """The transition's backward (``parts``: its ``(norm, conv)`` as forward saw them): adds into ``G``."""
    norm, conv = parts
    N, c, H, W = Fbuf.shape
    batch = state.transition_batch  # forward's choice, whatever the module's mode now
    affine = state.transition_affine  # forward's, when it kept it
    if affine is None:
        affine = _bn_affine(norm, *_bn1_stats(stage, state, norm, Fbuf, c, update=False, batch=batch))
    weight = _weight(conv)
    w = _cast(weight, stage.dtype).view(conv.out_channels, c)
    dy = _avg_pool2_backward(dout.to(stage.dtype), H, W)
    dw, dgamma, dbeta = _bottleneck_backward(stage, G, Fbuf, norm, affine, batch, state.count, w, dy)
    del dy
    return [dgamma.to(_weight(norm).dtype), dbeta.to(_bias(norm).dtype), _grad_like(dw, weight).to(weight.dtype)]


def _differentiable_once(backward):
    """``torch.autograd.function.once_differentiable`` with a message that names the way out: the backward
    runs without grad, and under ``create_graph=True`` its gradients are outputs of a node that raises when
    they are differentiated again (gradient penalties, ``gradgradcheck``). Unlike PyTorch's, the node is made
    whenever the Function's inputs need gradients, not only when the incoming gradient requires grad: a
    block followed by a parameter-free loss gets a constant incoming gradient, and its input gradient then
    came back without a graph, so a penalty on it silently contributed nothing.

    The node has edges to every tensor the gradients depend on, so that any second derivative that would pass
    through them reaches it and raises: the incoming gradients that require grad, and the Function's own
    node (through its saved ``token`` output), whose edges lead to the block's input and parameters. With
    edges to the incoming gradient only, ``torch.autograd.grad(penalty, params)``, ``backward(inputs=...)``
    and ``torch.autograd.functional.hvp`` pruned the node, raised nothing, and left out the block's part of
    the second derivative (zero, or None for its parameters)."""

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        with torch.no_grad():
            outputs = backward(ctx, *grads)
        if not torch.is_grad_enabled() or not any(ctx.needs_input_grad):
            return outputs
        token = ctx.saved_tensors[-1]
        links = [g for g in grads if g is not None and g.requires_grad] + ([token] if token.requires_grad else [])
        return differentiable_once(
            outputs,
            b"effdense: strategies 'shared' and 'fused' are differentiable once (their dense-block backward runs "
            b"without autograd), so a double backward (create_graph=True, then a gradient of those gradients, "
            b"e.g. a gradient penalty) is not supported: call model.set_strategy('naive') or 'checkpoint' first "
            b"(effdense.set_strategy(model, ...) for a model of one's own)",
            links=links,
        )

    return wrapper


def _normalised_with_running_stats(stage: _Stage, state: _StageState) -> list[Any]:
    """The stage's BatchNorms that normalised with their running statistics in forward (eval mode, or no
    batch statistics), in a fixed order."""
    out: list[Any] = []
    for layer, (batch1, batch2) in zip(stage.layers, state.batch):
        norm1, _, norm2, _ = _parts(layer)
        for bn, batch in ((norm1, batch1), (norm2, batch2)):
            if bn is not None and not batch and bn.running_mean is not None:
                out.append(bn)
    if stage.transition is not None and not state.transition_batch:
        bn = stage.transition._modules["norm"]
        if bn.running_mean is not None:
            out.append(bn)
    return out


def _running_stats_used(stage: _Stage, state: _StageState) -> list[torch.Tensor]:
    """The running means and variances that forward normalised with, which backward reads again."""
    return [t for bn in _normalised_with_running_stats(stage, state) for t in (bn.running_mean, bn.running_var)]


def _same(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(map(operator.is_, a, b))


def _modules_as_saved(
    stage: _Stage, state: _StageState, params: Sequence[torch.Tensor], running: Sequence[torch.Tensor]
) -> tuple[list[tuple[Any, Any, Any, Any]], tuple[Any, Any] | None]:
    """Each layer's ``(norm1, conv1, norm2, conv2)`` and the transition's ``(norm, conv)`` as :class:`_AsSaved`
    over forward's tensors: ``params`` in :meth:`_Stage.params` order, ``running`` in
    :func:`_running_stats_used` order (read from the modules' structure, which backward cannot change).
    The modules themselves when they still hold exactly those tensors, the usual case (a quarter of the
    host time: ~0.2 ms against ~0.9 ms per DenseNet-121 backward on a 2-core CPU)."""
    t = stage.transition
    if _same(params, stage.params()) and _same(running, _running_stats_used(stage, state)):
        return [_parts(layer) for layer in stage.layers], (t._modules["norm"], t._modules["conv"]) if t is not None else None
    stats = dict(zip(map(id, _normalised_with_running_stats(stage, state)), zip(running[0::2], running[1::2])))
    it = iter(params)

    def bn(m):
        return _AsSaved(m, {"weight": next(it), "bias": next(it)}, stats.get(id(m)))

    def conv(m):
        return _AsSaved(m, {"weight": next(it)}, None)

    layers = []
    for layer in stage.layers:
        norm1, conv1, norm2, conv2 = _parts(layer)
        first = (bn(norm1), conv(conv1))
        layers.append(first + ((bn(norm2), conv(conv2)) if layer.bottleneck else (None, None)))
    return layers, (bn(t._modules["norm"]), conv(t._modules["conv"])) if t is not None else None


def _output_modified_error(stage: _Stage) -> RuntimeError:
    """The error for a block run on its own (no transition in the stage: a slice of ``model.features``, a hook
    on it) whose output was changed in place after forward. That output is the block's feature buffer,
    which backward recomputes from (as ``torch.sigmoid``'s backward needs its output), so PyTorch's version
    check refuses it; torchvision's block returns a fresh ``torch.cat`` instead."""
    block = stage.block
    return RuntimeError(
        f"effdense shared/fused: the output of a dense block ({len(stage.layers)} layers, "
        f"{block.num_input_features} input channels) was modified in place before backward: an "
        "nn.ReLU(inplace=True) or another in-place op after it (a following module whose first step passes its "
        "input through, such as a transition whose norm is nn.Identity), or a forward hook that edits the output. "
        "With strategy 'shared' and 'fused' that tensor is the block's feature buffer, which backward needs; apply "
        "the op out of place, .clone() the output first, or use strategy 'checkpoint' or 'naive' "
        "(model.set_strategy(...), or effdense.set_strategy(model, ...) for a model of one's own)"
    )


def _running_stats_updated_error(changed: Sequence[torch.Tensor]) -> RuntimeError:
    """The error for running statistics that an eval-mode forward normalised with and that were changed in place
    before its backward, which reads them again (a training-mode forward in between updates them): PyTorch's
    bare version-check message named only a shape."""
    shapes = ", ".join(f"[{t.type()} {list(t.shape)}]" for t in changed[:4]) + (" ..." if len(changed) > 4 else "")
    return RuntimeError(
        "effdense shared/fused: BatchNorm running statistics that a dense block's forward normalised with (its "
        "BatchNorms in eval mode) were modified by an inplace operation before that forward's backward "
        f"({len(changed)} running_mean/running_var tensors: {shapes}); a training-mode forward in between updates "
        "them in place. Backward reads them again, so it refuses, as PyTorch does for any tensor it saved "
        "(torchvision's model instead computes these gradients from the new statistics). Run the eval-mode "
        "forward's backward before the training-mode forward, or keep the model in one mode between a forward "
        "and its backward"
    )


class _DenseStageFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, stage: _Stage, x: torch.Tensor, *params: torch.Tensor):  # type: ignore[override]
        Fbuf, out, state = _stage_forward(stage, x, keep=True, params=params)
        ctx.stage = stage
        ctx.state = state
        ctx.x_meta = (x.dtype, x.shape)
        ctx.has_transition = out is not None
        # the parameters, and the running statistics that normalised in forward: backward computes with these
        # tensors (not the modules', which may have been swapped since, see _AsSaved), and autograd's version
        # check makes one changed in place before backward (an optimiser step between a forward and its
        # backward) raise, as it does for torchvision's model
        ctx.n_params = len(params)
        running = _running_stats_used(stage, state)
        if running and not torch.compiler.is_compiling():
            ctx.running_updates = _remember_saved_running(running, state)  # (the stages' updates, checked in backward)
            ctx.running_versions = [(t, t._version) for t in running]  # (other changes: for backward's error message)
        # token: an empty second output, saved, through which backward's double-backward guard links to this
        # node (and so to x and the parameters) without keeping any tensor of forward alive
        token = Fbuf.new_empty(0)
        ctx.set_materialize_grads(False)  # (the token's gradient stays None: no zeros made for it)
        ctx.save_for_backward(Fbuf, *params, *running, token)
        return Fbuf if out is None else out, token

    @staticmethod
    @_differentiable_once
    def backward(ctx, grad_out: torch.Tensor | None, _grad_token: torch.Tensor | None):  # type: ignore[override]
        if grad_out is None:  # (gradients are not materialised: an undefined one is zero, so are the results)
            return (None,) * (2 + ctx.n_params)
        if not torch.compiler.is_compiling() and legacy_batched(grad_out):  # (dynamo cannot trace the check)
            raise RuntimeError(
                "effdense: strategies 'shared' and 'fused' ('auto', the default, runs one of them) cannot run a "
                "batched backward (torch.autograd.grad(..., is_grads_batched=True), torch.autograd.functional.jacobian(..., "
                "vectorize=True)): their dense-block backward writes into shared buffers, which PyTorch's batching "
                "cannot follow; call model.set_strategy('naive') or 'checkpoint' first (effdense.set_strategy(model, "
                "...) for a model of one's own), or use vectorize=False"
            )
        # PyTorch's own errors: a second backward without retain_graph, a saved tensor modified in place
        try:
            saved = ctx.saved_tensors
        except RuntimeError as exc:
            if "modified by an inplace operation" in str(exc):
                if not ctx.has_transition and "output 0 of" in str(exc):
                    raise _output_modified_error(ctx.stage) from exc
                changed = [t for t, version in getattr(ctx, "running_versions", ()) if t._version != version]
                if changed:
                    raise _running_stats_updated_error(changed) from exc
            raise
        changed = _updated_since(getattr(ctx, "running_updates", ()))
        if changed:  # (a training-mode forward's update, which moves no version)
            raise _running_stats_updated_error(changed)
        Fbuf = saved[0]
        from effdense.kernels._checks import planes_contiguous  # (not at import: effdense.kernels imports triton)

        if Fbuf.numel() and not planes_contiguous(Fbuf):
            # a saved-tensor unpack hook gave the buffer back in another layout (channels_last): backward reads it
            # plane by plane (the kernels only so), and a copy in that layout costs nothing when none was made
            Fbuf = Fbuf.contiguous()
        stage: _Stage = ctx.stage
        state: _StageState = ctx.state
        if state.y1 is None:
            raise RuntimeError(
                "effdense shared/fused: a second backward through a dense block with "
                "Policy(recompute_bottleneck=False) is not supported: the kept bottleneck outputs are freed by "
                "the first backward (retain_graph=True does not keep them); use recompute_bottleneck=True"
            )
        block, k = stage.block, stage.block.growth_rate
        C0 = block.num_input_features
        n = ctx.n_params
        layer_parts, transition_parts = _modules_as_saved(stage, state, saved[1 : 1 + n], saved[1 + n : -1])
        if not torch.compiler.is_compiling():
            norms = [(parts[0], not batch[0]) for parts, batch in zip(layer_parts, state.batch)]
            if transition_parts is not None:
                norms.append((transition_parts[0], not state.transition_batch))
            stage.ops = _pass_ops(stage, Fbuf, norms, saved[1 : 1 + n], grad_out)
        with _autocast_off(Fbuf.device.type):
            grads: list[torch.Tensor] = []
            if ctx.has_transition:
                G = torch.zeros_like(Fbuf)
                t_grads = _transition_backward(stage, state, transition_parts, Fbuf, G, grad_out)
            else:
                G = grad_out.to(dtype=Fbuf.dtype, memory_format=torch.contiguous_format, copy=True)
                t_grads = []
            del grad_out
            layer_grads: list[list[torch.Tensor]] = []
            for l in reversed(range(len(stage.layers))):
                c = C0 + l * k
                layer_grads.append(_layer_backward(stage, state, l, stage.layers[l], layer_parts[l], Fbuf, G, c, k))
            for lg in reversed(layer_grads):
                grads += lg
            grads += t_grads
            x_dtype, _ = ctx.x_meta
            dx = G[:, :C0].to(x_dtype, copy=True)
        del G
        # the kept bottleneck outputs are the only large state: free them now. The rest (per-channel
        # statistics, RNG states) stays with the graph while it may run again (retain_graph=True, gradcheck);
        # after a backward that frees the graph's saved tensors it goes too, as they do: a graph the user keeps
        # alive (running_loss += loss) held ~0.5 MB of it per DenseNet-121 step, where naive's holds nothing.
        # (Under torch.compile the kept outputs are the compiled graph's saved activations, which autograd
        # frees itself; dynamo refuses a backward that mutates state made in forward.)
        if not torch.compiler.is_compiling():
            if not _keeps_graph():
                ctx.state = None
            elif any(y is not None for y in state.y1):  # (recompute_bottleneck=False kept some: no others)
                state.y1 = None
        return (None, dx, *grads)


def _keeps_graph() -> bool:
    """Whether the running backward keeps the graph (``retain_graph=True``, or ``create_graph=True``): then
    forward's state must stay for another backward. (Private, as aot_autograd uses it; without it: True.)"""
    keep = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if keep is None else bool(keep())


def _has_autocast(device_type: str) -> bool:
    """Whether autocast exists for the device type (not for ``meta``, which memory estimates use)."""
    return torch.amp.is_autocast_available(device_type)


def _autocast_off(device_type: str) -> Any:
    return torch.autocast(device_type, enabled=False) if _has_autocast(device_type) else contextlib.nullcontext()


def _autocasting(x: torch.Tensor) -> bool:
    dev = x.device.type
    return _has_autocast(dev) and torch.is_autocast_enabled(dev)


def _autocast_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the stage computes in: autocast's for a tensor autocast would cast, else ``x``'s. Autocast
    leaves float64 alone (an fp64 model under autocast runs in fp64, as naive's modules do)."""
    dev = x.device.type
    if x.dtype != torch.float64 and _has_autocast(dev) and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


_LOCAL = object()


def _stage_norms(block, transition) -> list[Any]:
    """The stage's BatchNorms: each layer's norm1 (and norm2), then the transition's, read from ``_modules``
    directly (nn.Module.__getattr__ costs a microsecond per access)."""
    norms = [m for layer in block._modules.values() for m in (layer._modules["norm1"], layer._modules.get("norm2")) if m is not None]
    if transition is not None:
        norms.append(transition._modules["norm"])
    return norms


def _sync_semantics(block, transition) -> tuple[bool, Any]:
    """Whether the stage's BatchNorms synchronise their batch statistics, and over which process group.

    ``DenseNet.set_sync_bn`` says so on the block. Without it the modules decide, as they would for
    ``naive``: ``nn.SyncBatchNorm.convert_sync_batchnorm(model)``, PyTorch's own recipe, makes every
    BatchNorm synchronised (a module with a ``process_group``: ``nn.SyncBatchNorm``, or
    ``effdense.train.CPUSyncBatchNorm``, its stand-in on CPU)."""
    if getattr(block, "sync_bn", False):
        return True, getattr(block, "sync_group", None)
    norms = _stage_norms(block, transition)
    # the attribute is an instance attribute (nn.SyncBatchNorm) or a class one (CPUSyncBatchNorm): looked up
    # without nn.Module.__getattr__, whose AttributeError for a plain BatchNorm costs microseconds each
    groups = [m.__dict__.get("process_group", getattr(type(m), "process_group", _LOCAL)) for m in norms]
    if all(g is _LOCAL for g in groups):
        return False, None
    if any(g is _LOCAL for g in groups) or any(g is not groups[0] for g in groups):
        raise ValueError(
            f"strategies 'shared' and 'fused' synchronise all of a dense block's BatchNorms over one process group or "
            f"none, but {sum(g is not _LOCAL for g in groups)} of this block's {len(groups)} are synchronised "
            f"(over {len({id(g) for g in groups if g is not _LOCAL})} group(s)); convert every BatchNorm with "
            "nn.SyncBatchNorm.convert_sync_batchnorm(model) or DenseNet.set_sync_bn, or use strategy 'naive'"
        )
    return True, groups[0]


def _syncs_in_this_mode(block, transition) -> bool | None:
    """Under SyncBatchNorm semantics, whether the stage synchronises its batch statistics in the modules'
    present modes. ``nn.SyncBatchNorm`` all-reduces in training mode only: a BatchNorm in eval mode without
    running statistics normalises with its own rank's batch statistics (and runs no collective, so a rank may
    evaluate alone). True when every BatchNorm that normalises with batch statistics is training, False when
    none of those is training or none normalises with batch statistics (nothing to reduce: the local path, whose
    backward is not split into the synchronised one's chunks), None when they mix: the stage's one set of
    cached statistics cannot be both (the caller runs the modules themselves, as naive)."""
    modes = {bn.training for bn in _stage_norms(block, transition) if _uses_batch_stats(bn)}
    if len(modes) > 1:
        return None
    return modes == {True}


def _make_stage(
    block,
    transition,
    ops: ModuleType,
    x: torch.Tensor,
    chunk_factor: int = 1,
    chunk_values: int | None = None,
    stage_ops: Any = None,
) -> _Stage | None:
    """The stage of ``block`` (and ``transition``) for input ``x``; None where its synchronised BatchNorms mix
    modes (:func:`_syncs_in_this_mode`), which the Function does not compute."""
    import torch.distributed as dist

    sync, group = False, None
    if dist.is_available() and dist.is_initialized():  # else nothing to synchronise with: skip the scan
        sync, group = _sync_semantics(block, transition)
        sync = sync and dist.get_world_size(group) > 1
        if sync:
            sync = _syncs_in_this_mode(block, transition)
            if sync is None:
                return None
    return _Stage(
        block=block,
        transition=transition,
        ops=ops,
        policy=block.policy,
        dtype=_autocast_dtype(x),
        sync_group=group,
        sync=sync,
        chunk_width=_stage_chunk_width(block, x, chunk_factor, chunk_values, sync),
        own_ops=ops,
        stage_ops=stage_ops,
    )


def _stage_chunk_width(block, x: torch.Tensor, chunk_factor: int, chunk_values: int | None, sync: bool) -> int:
    """The stage's chunk width. Under SyncBatchNorm semantics, ``chunk_factor`` bottleneck widths only: the
    input gradient all-reduces BN1's sums once per chunk, so every rank must cut the same chunks, and the
    byte and model-wide allowances follow the local batch (N*H*W), which ranks need not share."""
    if sync:
        return _chunk_width(block, 0, chunk_factor, per_rank=False)
    return _chunk_width(block, x.shape[0] * x.shape[2] * x.shape[3], chunk_factor, chunk_values)


# A chunk's temporaries may be widened to this size (fp32 bytes of one chunk-wide activation) when its
# planes are small: late blocks and small inputs then run in fewer, larger ops, the peak unchanged.
_CHUNK_BYTES = 4 << 20


def _chunk_width(block, plane: int, chunk_factor: int, chunk_values: int | None = None, per_rank: bool = True) -> int:
    """Channels per chunk for a block whose input has ``plane`` = N*H*W values per channel:
    ``chunk_factor`` bottleneck widths, or more while a chunk-wide fp32 temporary stays within
    ``_CHUNK_BYTES``, or while a chunk holds at most ``chunk_values`` values (see :func:`_widest_chunk`);
    without ``per_rank``, the bottleneck widths only."""
    width = chunk_factor * max(16, _bottleneck_width(block))
    if not per_rank:
        return width
    width = max(width, _CHUNK_BYTES // max(1, plane * 4))
    if chunk_values is not None:
        width = max(width, chunk_values // max(1, plane))
    return width


def _bottleneck_width(block) -> int:
    """Output channels of the block's first conv1, or 64 where there is none to read: no layers, or a
    module a user swapped in (whose stage then runs as naive, see ``_custom_modules``)."""
    first = next(iter(block._modules.values()), None)
    conv1 = first._modules.get("conv1") if isinstance(first, torch.nn.Module) else None
    width = getattr(conv1, "out_channels", None)
    return width if isinstance(width, int) else 64


def _widest_chunk(blocks: Sequence[Any], x: torch.Tensor, chunk_factor: int) -> int:
    """The most values (N * channels * H * W) that one chunk holds anywhere in a network whose dense
    blocks, in order, get ``x`` first and then a plane halved by each transition (2x2 average pool), under
    :func:`_chunk_width`'s rule. ``fused`` gives every stage chunks this large (``chunk_values``): a stage
    with smaller planes then covers more, often all, of its channels in one chunk, where each further chunk
    costs two kernel launches and a dozen views on the host, while the largest chunk temporary of the step
    stays the size it was. (DenseNet-121 at batch 64, 224x224: every input gradient in one chunk, 83 fewer
    chunks per step; the FakeTensor estimate of the bf16 step's peak is unchanged.)"""
    N, _, H, W = x.shape
    widest = 0
    for block in blocks:
        plane = N * H * W
        channels = min(getattr(block, "num_output_features", 0), _chunk_width(block, plane, chunk_factor))
        widest = max(widest, channels * plane)
        H, W = H // 2, W // 2
    return widest


def run_stage(
    block, transition, x: torch.Tensor, ops: ModuleType, where: str = "", **stage_options: Any
) -> torch.Tensor:
    """Run ``block`` (and ``transition`` if given) on ``x`` with the shared buffers; returns the block
    buffer, or the transition's pooled output when a transition is given. ``where``: the block's name in
    the model, for warnings. ``stage_options`` are ``chunk_factor`` and ``chunk_values`` (see :class:`_Stage`
    and :func:`_chunk_width`), and ``stage_ops`` (see :func:`_pass_ops`)."""
    _check_block_input(block, x)
    # The plain modules, as naive, for an empty batch, which has no statistics for the shared buffers (as a
    # model does for every strategy but checkpoint, strategies._runner_for, with PyTorch's semantics: an empty output, zero
    # gradients, BatchNorm counters advanced and running statistics kept), for modules the Function would
    # not compute as they compute themselves (a conv with a bias, a non-affine BatchNorm, another activation,
    # ...), rather than silently other values, and for layers whose channel counts are not the block's (a
    # layer deleted or inserted after construction: the buffer's layout would be another's than the modules'),
    # and for synchronised BatchNorms in mixed modes (_make_stage gives None)
    odd = _custom_modules(block, transition) if x.shape[0] else []
    if odd:
        _warn_custom_modules(odd, where)
    else:
        odd = _layout_mismatch(block, transition) if x.shape[0] else []
        if odd:
            _warn_layout_mismatch(block, odd, where)
    stage = None if odd or x.shape[0] == 0 else _make_stage(block, transition, ops, x, **stage_options)
    if stage is None:
        if not odd and x.shape[0]:
            _warn_mixed_sync_modes(where)
        out = _naive.run_block(block, x)
        return out if transition is None else transition(out)
    params = stage.params()
    dtypes = {p.dtype for p in params}  # (one pass over the parameters: this runs on every stage's forward)
    if dtypes != {x.dtype}:
        _check_param_dtypes(stage, x.dtype, dtypes, autocast=_autocasting(x))
    if records_grad() and (x.requires_grad or any(p.requires_grad for p in params)):
        with _autocast_off(x.device.type):
            return _DenseStageFunction.apply(stage, x, *params)[0]
    with torch.no_grad(), _autocast_off(x.device.type):
        Fbuf, out, _ = _stage_forward(stage, x, keep=False, params=params)
    return Fbuf if out is None else out


def _check_param_dtypes(stage: _Stage, dtype: torch.dtype, dtypes: set, autocast: bool = False) -> None:
    """Outside autocast the modules run in the input's dtype, as naive's do: a convolution whose weight has
    another dtype is an error there (so is a BatchNorm's, except fp32 parameters for a bf16/fp16 input, the
    "BatchNorm in fp32" recipe). The stage casts parameters for autocast's sake; without this check it cast
    these too, and a layer put in fp64 by ``layer.double()`` computed in fp32 without a word (``dtypes``: the
    stage's parameter dtypes, more than ``dtype`` alone). Under autocast
    (``autocast=True``) only an fp64 convolution weight in a model whose input is not fp64 is an error, as
    for naive: autocast casts fp32 weights, and leaves fp64 ones alone."""
    if autocast:  # (the usual mixed-precision step, fp32 weights and bf16/fp16 activations: one pass, no error)
        if dtype == torch.float64 or torch.float64 not in dtypes:
            return
        for name, layer in stage.block._modules.items():
            for part, m in zip(("conv1", "conv2"), _parts(layer)[1::2]):
                if m is not None and _weight(m).dtype == torch.float64:
                    raise RuntimeError(
                        f"effdense: {name}.{part} of a dense block has torch.float64 parameters but the block's input "
                        f"is {dtype}, and autocast leaves fp64 weights alone (naive and torchvision raise here too): "
                        "put the model in one dtype with model.float(), or feed it fp64 inputs"
                    )
        return
    reduced = dtype in (torch.bfloat16, torch.float16)
    named = [(f"{name}.{part}", m) for name, layer in stage.block._modules.items()
             for part, m in zip(("norm1", "conv1", "norm2", "conv2"), _parts(layer)) if m is not None]
    if stage.transition is not None:
        named += [(f"(transition).{part}", stage.transition._modules[part]) for part in ("norm", "conv")]
    for name, m in named:
        is_bn = isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
        for p in (_weight(m), _bias(m)) if is_bn else (_weight(m),):
            if p.dtype != dtype and not (is_bn and reduced and p.dtype == torch.float32):
                raise RuntimeError(
                    f"effdense: {name} of a dense block has {p.dtype} parameters but the block's input is {dtype} "
                    f"(outside autocast a model computes in one dtype; naive and torchvision raise here too): put "
                    f"the model in one dtype with model.to({dtype}), or run it under torch.autocast"
                )


def _check_block_input(block, x: torch.Tensor) -> None:
    if x.dim() != 4 or x.shape[1] != block.num_input_features:
        name = block_name(block)  # (which of a model's blocks: its name, where it was given one)
        raise ValueError(
            f"dense block{f' {name}' if name else ''} expects input (N, {block.num_input_features}, H, W), got shape "
            f"{tuple(x.shape)}"
        )
    if not x.is_floating_point():  # (the dtype check below advised model.to(torch.int64), or autocast)
        name = block_name(block)
        raise TypeError(
            f"dense block{f' {name}' if name else ''} expects a floating-point input, got dtype {x.dtype}; convert "
            "with x.float()"
        )


# What the Function computes in place of a stage's modules: affine BatchNorms (any _BatchNorm: BatchNorm2d,
# SyncBatchNorm, ...), ReLUs, bias-free Conv2d of torchvision's geometry, a 2x2 average pool. A user may swap
# in others (a conv with a bias, affine=False, another activation); such a stage runs its modules, as naive.
_BN, _RELU = "bn", "relu"
_CONV1X1 = ((1, 1), (1, 1), (0, 0), (1, 1), 1, "zeros")  # kernel_size, stride, padding, dilation, groups, padding_mode
_CONV3X3 = ((3, 3), (1, 1), (1, 1), (1, 1), 1, "zeros")
_LAYER_PARTS = {
    True: (("norm1", _BN), ("relu1", _RELU), ("conv1", _CONV1X1), ("norm2", _BN), ("relu2", _RELU), ("conv2", _CONV3X3)),
    False: (("norm1", _BN), ("relu1", _RELU), ("conv1", _CONV3X3)),
}
_TRANSITION_PARTS = (("norm", _BN), ("relu", _RELU), ("conv", _CONV1X1))
# a layer computes as the Function computes it while these are _DenseLayer's (a class with its own tail
# or forward, or an instance with one patched in, runs as naive)
_LAYER_METHODS = ("forward", "bn_function", "tail")


# A subclass computes as its base only if it keeps the base's forward: one that overrides it (a clipped ReLU)
# would otherwise be computed as plain ReLU, silently (BatchNorm: strategies.computes_as_batchnorm).


def _has_tensor(m: Any, name: str) -> bool:
    """Whether module ``m`` has a ``name`` tensor: a parameter, or (not among its parameters) a parametrized
    weight or a buffer. ``nn.BatchNorm2d(C, bias=False)`` registers its ``bias`` as None, as does setting
    ``bn.weight = None``."""
    params = m._parameters
    if name in params:
        return params[name] is not None
    return getattr(m, name, None) is not None


def _computes_as_module(m: Any, kind: Any) -> bool:
    if m is None or "forward" in m.__dict__:  # a missing part, or an instance's own forward (m.forward = ...)
        return False
    if kind is _BN:
        # (a parametrized weight or bias is read several times per step here, once by naive: one with state,
        # or random, would give other values, so only those known stateless (weight norm) are computed; checked
        # before the tensors are read)
        return (
            computes_as_batchnorm(m)
            and _checkpoint.stateless_parametrizations(m)
            and m.affine
            and _has_tensor(m, "weight")
            and _has_tensor(m, "bias")
        )
    if kind is _RELU:
        return isinstance(m, torch.nn.ReLU) and type(m).forward is torch.nn.ReLU.forward
    return (
        type(m) is torch.nn.Conv2d
        and "_conv_forward" not in m.__dict__  # (its forward's helper, patched on the instance)
        and m._parameters["bias"] is None
        and (m.kernel_size, m.stride, _conv_padding(m), m.dilation, m.groups, m.padding_mode) == kind
    )


def _conv_padding(m: torch.nn.Conv2d) -> Any:
    """A convolution's padding as a pair: ``padding='valid'`` is (0, 0) and ``'same'`` (stride 1) half the
    dilated kernel where that is whole, as torchvision's ``padding=1`` for a 3x3 (``convert()`` copies a source's
    conv spelled so: before, its block ran as naive)."""
    if m.padding == "valid":
        return (0, 0)
    if m.padding == "same":
        span = [d * (k - 1) for k, d in zip(m.kernel_size, m.dilation)]
        return tuple(v // 2 for v in span) if all(v % 2 == 0 for v in span) else m.padding
    return m.padding


def _custom_modules(block, transition) -> list[str]:
    """Names of the stage's modules that the Function would not compute as they compute themselves; empty
    for torchvision's modules (one pass over the layers' module dicts, no nn.Module.__getattr__)."""
    odd = []
    layer_class = standard_class("layer")
    for name, layer in block._modules.items():
        parts = _LAYER_PARTS.get(layer.__dict__.get("bottleneck"))
        if parts is None or overrides(layer, layer_class, _LAYER_METHODS):
            odd.append(name)
            continue
        mods = layer._modules
        for part, kind in parts:
            if not _computes_as_module(mods.get(part), kind):
                odd.append(f"{name}.{part}")
    if transition is not None:
        odd += _custom_transition_modules(transition)
    return odd


def _custom_transition_modules(transition) -> list[str]:
    mods = transition._modules
    if list(mods) != ["norm", "relu", "conv", "pool"] or overrides(transition, torch.nn.Sequential, ("forward",)):
        return ["transition"]
    odd = [f"transition.{part}" for part, kind in _TRANSITION_PARTS if not _computes_as_module(mods[part], kind)]
    pool = mods["pool"]
    if not (
        type(pool) is torch.nn.AvgPool2d
        and "forward" not in pool.__dict__
        and tuple(map(_pair, (pool.kernel_size, pool.stride, pool.padding))) == ((2, 2), (2, 2), (0, 0))
        and not pool.ceil_mode
        and pool.divisor_override is None
    ):
        odd.append("transition.pool")
    return odd


def _warn_custom_modules(odd: list[str], where: str = "") -> None:
    names = ", ".join(odd[:3]) + (", ..." if len(odd) > 3 else "")
    warn_runs_as_naive(
        "'shared'/'fused'",
        f"its modules {names} are not what those strategies compute (affine BatchNorm, whose parameters may be "
        "weight-normed; ReLU; bias-free Conv2d of torchvision's geometry with plain parameters, no parametrization; "
        "2x2 average pool; and the layers' and transition's own forwards); naive calls the modules themselves",
        stacklevel=3,
        where=where,
    )


def _warn_mixed_sync_modes(where: str = "") -> None:
    warn_runs_as_naive(
        "'shared'/'fused'",
        "its synchronised BatchNorms that normalise with batch statistics are some in training mode (statistics "
        "all-reduced over the ranks, as nn.SyncBatchNorm) and some in eval mode without running statistics (this "
        "rank's own), and the block's one set of cached statistics cannot be both; naive calls the modules themselves",
        stacklevel=3,
        where=where,
    )


def _layout_mismatch(block, transition) -> list[str]:
    """The channel counts of a stage's (standard) modules that are not a dense block's: layer ``i`` (from 0)
    reads ``C0 + i*k`` channels and adds ``k``, its bottleneck's parts agree on their width, and the
    transition reads all ``C0 + L*k``. The shared buffer is laid out so; a layer deleted, inserted or
    replaced by one of another width after construction breaks it (naive then runs what the modules say, or
    raises PyTorch's shape error as torchvision's model does; the Function read uninitialised channels).
    (Runs on every stage's forward: one pass of plain comparisons, the messages only for a mismatch.)"""
    C0, k = block.num_input_features, block.growth_rate
    c = C0
    for layer in block._modules.values():
        m = layer._modules
        conv1 = m["conv1"]
        if m["norm1"].num_features != c or conv1.in_channels != c:
            break
        if layer.__dict__["bottleneck"]:
            conv2 = m["conv2"]
            if not (m["norm2"].num_features == conv2.in_channels == conv1.out_channels and conv2.out_channels == k):
                break
        elif conv1.out_channels != k:
            break
        c += k
    else:
        if transition is None:
            return []
        m = transition._modules
        if m["norm"].num_features == c and m["conv"].in_channels == c:
            return []
    return _layout_details(block, transition)


def _layout_details(block, transition) -> list[str]:
    """What :func:`_layout_mismatch` found, one ``module.attribute = value, expected value`` each."""
    C0, k = block.num_input_features, block.growth_rate
    wrong = []
    for i, (name, layer) in enumerate(block._modules.items()):
        m, c = layer._modules, C0 + i * k
        width = m["conv1"].out_channels
        if layer.__dict__["bottleneck"]:
            expected = (("norm1", "num_features", c), ("conv1", "in_channels", c), ("norm2", "num_features", width),
                        ("conv2", "in_channels", width), ("conv2", "out_channels", k))  # fmt: skip
        else:
            expected = (("norm1", "num_features", c), ("conv1", "in_channels", c), ("conv1", "out_channels", k))
        wrong += [f"{name}.{part}.{attr} = {getattr(m[part], attr)}, expected {want}"
                  for part, attr, want in expected if getattr(m[part], attr) != want]  # fmt: skip
    if transition is not None:
        m, c = transition._modules, block.num_output_features
        wrong += [f"transition.{part}.{attr} = {getattr(m[part], attr)}, expected {c}"
                  for part, attr in (("norm", "num_features"), ("conv", "in_channels")) if getattr(m[part], attr) != c]  # fmt: skip
    return wrong


def _warn_layout_mismatch(block, wrong: list[str], where: str = "") -> None:
    details = "; ".join(wrong[:3]) + ("; ..." if len(wrong) > 3 else "")
    warn_runs_as_naive(
        "'shared'/'fused'",
        f"its modules' channel counts are not those of a dense block of {block.num_input_features} input channels "
        f"and growth rate {block.growth_rate} with {len(block._modules)} layer{'s' if len(block._modules) != 1 else ''} (layer i reads "
        f"{block.num_input_features} + (i-1)*{block.growth_rate} channels and adds {block.growth_rate}): {details} "
        "(a layer deleted, inserted or replaced after construction?); naive runs the modules as they are",
        stacklevel=3,
        where=where,
    )


def reference_ops() -> ModuleType:
    """The pure-PyTorch twins of the bottleneck kernels: the ops of the ``shared`` strategy."""
    from effdense.kernels import reference

    return reference


def run_block(block, x: torch.Tensor) -> torch.Tensor:
    return run_stage(block, None, x, reference_ops(), where=block_name(block))


def run_features(
    model, x: torch.Tensor, ops: ModuleType | None = None, widest_chunks: bool = False, **stage_options: Any
) -> torch.Tensor:
    """The whole feature extractor: recomputed stem, then (block + transition) stages, then norm5.
    ``widest_chunks``: every stage's chunks as large as the network's largest (:func:`_widest_chunk`)."""
    ops = ops or reference_ops()
    stem = [(name, m) for name, m in model.features.named_children() if name in STEM]
    x = _checkpoint.run_recomputed(stem, x)
    children = dict(model.features.named_children())
    n_blocks = len(model.block_config)
    blocks = [children[f"denseblock{i}"] for i in range(1, n_blocks + 1)]
    if widest_chunks and x.dim() == 4:  # (a wrong input shape is named by the first stage's check)
        stage_options["chunk_values"] = _widest_chunk(blocks, x, stage_options.get("chunk_factor", 1))
    for i, block in enumerate(blocks, 1):
        transition = children.get(f"transition{i}")
        x = run_stage(block, transition, x, ops, where=f"features.denseblock{i}", **stage_options)
    return children["norm5"](x)
