"""Strategy ``checkpoint``: torchvision's ``memory_efficient=True``, with BatchNorm statistics updated once.

``concat -> norm1 -> relu1 -> conv1`` is run under :func:`torch.utils.checkpoint.checkpoint` and recomputed
in backward. torchvision recomputes it with ``norm1`` in training mode, so ``norm1``'s running statistics
are updated a second time (``num_batches_tracked`` ends at 2 per step). Here the recomputation
normalises with the same batch statistics but restores the running statistics afterwards: the batch
statistics depend only on the (unchanged) input, so output and gradients are identical, and the running
buffers match the ``naive`` strategy exactly. Restoring (rather than calling ``F.batch_norm`` without
running buffers) keeps whatever the module does, so ``nn.SyncBatchNorm`` recomputes its synchronised
statistics too.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Iterator, Sequence

import torch
import torch.nn as nn
from torch.nn.utils.spectral_norm import SpectralNorm as _SpectralNormHook  # old-style spectral_norm's pre-hook
from torch.utils.checkpoint import checkpoint

from effdense.strategies import naive as _naive
from effdense.strategies import _has_hooks, computes_as_batchnorm, overrides, records_grad, standard_class, warn_runs_as_naive


@contextlib.contextmanager
def frozen_running_stats(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Run BatchNorm modules of ``modules`` (recursively) and put their running statistics back after."""
    bns = [m for mod in modules for m in mod.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [
        [b.clone() for b in (bn.running_mean, bn.running_var, bn.num_batches_tracked) if b is not None] for bn in bns
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for bn, values in zip(bns, saved):
                live = [b for b in (bn.running_mean, bn.running_var, bn.num_batches_tracked) if b is not None]
                # (through .data: the values are the ones the buffers had, and a version bump here invalidated the
                # tensors an earlier recomputation's graph saved, so a second-order pass, a Hessian or
                # gradgradcheck, raised autograd's in-place error; torchvision's memory_efficient=True computes it)
                for buf, value in zip(live, values):
                    buf.data.copy_(value)


def _forward_record(
    modules: Sequence[nn.Module],
) -> tuple[list[tuple[dict, str, torch.Tensor]], list[tuple[nn.Module, bool]], list[tuple[torch.Tensor, int, str]]]:
    """What forward read of ``modules`` (recursively): every parameter and buffer as ``(the module's dict,
    name, tensor)``, every module's ``training`` flag, and with its version counter now (see
    :func:`_check_unchanged`) every parameter, and the running statistics of a BatchNorm that normalises with
    them (eval mode): the recomputation reads those again too."""
    tensors, modes, versions = [], [], []
    for mod in modules:
        for m in mod.modules():
            modes.append((m, m.training))
            for d in (m._parameters, m._buffers):
                tensors.extend((d, name, t) for name, t in d.items() if t is not None)
            versions.extend(
                (t, t._version, f"{type(m).__name__}.{name}") for name, t in m._parameters.items() if t is not None
            )
            bn = isinstance(m, nn.modules.batchnorm._BatchNorm)
            if bn and not m.training and m._buffers.get("running_mean") is not None:
                # its running statistics, which batch_norm updates without moving their version counters; a
                # training-mode forward that updates them counts the update in num_batches_tracked, in place
                t = m._buffers.get("num_batches_tracked")
                if t is not None:
                    label = f"{type(m).__name__}.num_batches_tracked, counting updates of the running statistics it normalised with"
                    versions.append((t, t._version, label))
    return tensors, modes, versions


@contextlib.contextmanager
def _as_in_forward(
    record: list[tuple[dict, str, torch.Tensor]], modes: Sequence[tuple[nn.Module, bool]] = ()
) -> Iterator[None]:
    """Put back, for the recomputation, what the forward pass ran with where the modules differ now:

    * the parameters and buffers it read: under ``torch.func.functional_call`` (MAML-style fast weights,
      swapped buffers) forward reads the tensors passed in, and the modules' own are back by the time
      backward recomputes, which then saved the wrong values for backward (silently wrong gradients, as
      torchvision's ``memory_efficient=True`` gives);
    * the modules' train/eval mode: a model switched with ``.eval()`` (or ``.train()``) between forward and
      backward recomputed a BatchNorm with the other statistics, and checkpoint refused the mismatch (a
      ``CheckpointError`` about saved tensor metadata; torchvision's ``memory_efficient=True`` too). Its
      plain model, and ``naive``, backpropagate the forward that ran."""
    swapped = []
    for d, name, t in record:
        now = d.get(name)
        if now is not t:
            swapped.append((d, name, now))
            d[name] = t
    flipped = [(m, m.training) for m, mode in modes if m.training != mode]
    for m, now in flipped:
        m.training = not now
    try:
        yield
    finally:
        for m, now in flipped:
            m.training = now
        for d, name, now in reversed(swapped):
            d[name] = now


def recompute_once(
    fn: Callable[..., torch.Tensor], modules: Sequence[nn.Module], reads: Sequence[nn.Module] | None = None
) -> Callable[..., torch.Tensor]:
    """``fn`` for :func:`checkpoint`: the first call (the forward pass) updates BatchNorm running
    statistics as usual, every recomputation leaves them as they were and reads the parameters and buffers
    of ``reads`` (default ``modules``: the modules ``fn`` runs) that the first call read.

    Traced by ``torch.compile``, a call is ``fn`` itself: the compiler traces it once, with its buffer updates,
    and recomputes (in backward) only the functional part, so the statistics are updated once anyway; the call
    counter would be a side effect that dynamo refuses inside the checkpoint. The check is made at each call,
    not when the wrapper is made: after a graph break inside the checkpointed region (a forward hook with side
    effects on a module in it), the checkpoint runs eagerly, and a bare ``fn`` made at trace time updated the
    statistics a second time in the recomputation."""
    calls = 0
    record: list[tuple[dict, str, torch.Tensor]] = []
    modes: list[tuple[nn.Module, bool]] = []
    versions: list[tuple[torch.Tensor, int, str]] = []

    def wrapped(*inputs: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return fn(*inputs)
        nonlocal calls
        calls += 1
        if calls == 1:
            out = fn(*inputs)
            # (recorded after the call: a lazy module, nn.LazyBatchNorm2d swapped in, materialises its parameters
            # in place in its first forward, which a record taken before counted as a change since forward)
            tensors, flags, read_versions = _forward_record(modules if reads is None else reads)
            record.extend(tensors)
            modes.extend(flags)
            versions.extend(read_versions)
            return out
        _check_unchanged(versions)
        with _as_in_forward(record, modes), frozen_running_stats(modules):
            return fn(*inputs)

    return wrapped


def _check_unchanged(versions: Sequence[tuple[torch.Tensor, int, str]]) -> None:
    """The recomputation would read a parameter changed in place since forward (an optimiser step between a
    forward and its backward), or running statistics that an eval-mode BatchNorm normalised with and a
    training-mode forward has updated since: autograd's error, as the plain model raises it for the tensors it
    saved (and shared/fused for those statistics), instead of gradients computed from the new values."""
    for t, version, label in versions:
        if t._version != version:
            raise RuntimeError(
                f"one of the variables needed for gradient computation has been modified by an inplace operation: "
                f"[{t.type()} {list(t.shape)}] ({label}, read again when effdense recomputes it in backward) is at "
                f"version {t._version}; expected version {version} instead. Run backward before changing the "
                "parameters in place (e.g. before optimizer.step()) or running a training-mode forward"
            )


# What is recomputed here (the ImageNet stem conv-BN-ReLU-pool; BN1-ReLU-conv1x1) draws no random numbers,
# so checkpoint need not save and restore the RNG states around the recomputation (a host cost per call on
# CUDA, and a generator-state read that CUDA graph capture may not allow). Dropout stays outside. That holds
# for the modules below only (anything else is not recomputed, see unrecomputable), and for them only while no
# forward hook fires in them: a hook may draw (feature noise, a dropout added by a hook), and the recomputation
# drew other numbers than forward's, silently other gradients, and left the RNG in another state than the plain
# model's. Then the RNG state is kept and restored, as torchvision's memory_efficient=True always does.


def _forward_hooked(modules: Sequence[nn.Module | None]) -> bool:
    """Whether a forward (pre-)hook fires when ``modules`` (or a module below one) are called: one of their
    own, or one registered for all modules (``register_module_forward_hook``)."""
    registry = nn.modules.module
    if registry._global_forward_hooks or registry._global_forward_pre_hooks:
        return True
    return any(_has_hooks(m, backward=False) for m in modules)


def _preserve_rng(modules: Sequence[nn.Module | None], custom: bool = False) -> bool:
    """``preserve_rng_state`` for a checkpoint that recomputes ``modules``: whether a forward hook fires in
    them, or (``custom``) a function of the user's own (a layer's own ``bn_function``) is recomputed, either of
    which may draw random numbers. Also while compiling (dynamo's checkpoint keeps the RNG itself, and a graph
    break inside the checkpointed part runs it eagerly with the value traced here); not while a CUDA graph is
    being captured (its RNG state cannot be read then)."""
    if not (custom or _forward_hooked(modules)):
        return False
    if torch.compiler.is_compiling():  # (a graph break in a hook runs the checkpoint eagerly with this value)
        return True
    return not (torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing())

# Modules whose output depends only on their input, parameters and buffers, and whose call changes no state:
# a recomputation gives what the forward gave and leaves the module as one call leaves it. Exact classes with
# their own forward (a subclass, a parametrized module's generated class, a forward patched on the class or
# the instance may compute otherwise). BatchNorm (running statistics put back by recompute_once), InstanceNorm
# without running statistics, torchvision's FrozenBatchNorm2d, Dropout and RReLU that draw nothing (eval mode;
# Dropout with p = 0) and weight-norm parametrizations are handled in _recomputes_exactly.
_RECOMPUTABLE = {
    cls: cls.forward
    for cls in (
        nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.Identity, nn.Sequential, nn.Flatten,
        nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish,
        nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.Softmax,
        nn.LogSoftmax, nn.Softmax2d,
        nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
        nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d,
        nn.ReplicationPad2d, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm,
    )
}  # fmt: skip
_INSTANCENORM_FORWARD = nn.modules.instancenorm._InstanceNorm.forward
# drawing random numbers in training mode only (Dropout with p = 0 draws nothing either)
_RANDOM_IN_TRAINING = {cls: cls.forward for cls in (
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout, nn.RReLU,
)}  # fmt: skip
# parametrizations that compute the weight from the module's parameters alone, and step no state
_STATELESS_PARAMETRIZATIONS = tuple(
    c for c in (getattr(torch.nn.utils.parametrizations, "_WeightNorm", None),) if c is not None
)


def stateless_parametrizations(m: nn.Module) -> bool:
    """Whether every parametrization registered on ``m`` (none counts) computes its tensor from the module's
    parameters alone and steps no state, so that reading the tensor again, as a recomputation (or the
    ``shared`` Function's forward and backward) does, gives the same value and changes nothing."""
    params = m.__dict__["_modules"].get("parametrizations")
    return params is None or all(isinstance(p, _STATELESS_PARAMETRIZATIONS) for plist in params.values() for p in plist)


def parametrize_cache_on() -> bool:
    """Whether ``torch.nn.utils.parametrize.cached()`` is active: a parametrized tensor is then computed at its
    first read and the cached value returned after, so a recomputation in backward inside the context saves
    fewer tensors than the forward did (torch.utils.checkpoint's "A different number of tensors was saved"
    error, from a probe: weight norm on the stem under shared/fused, on a layer's conv1 under checkpoint)."""
    return bool(getattr(torch.nn.utils.parametrize, "_cache_enabled", 0))


def _recomputes_exactly(m: nn.Module) -> bool:
    """Whether a second call of ``m`` (not its submodules) in backward computes what the first computed and
    changes nothing that the first did not (BatchNorm running statistics aside: recompute_once puts them
    back). Not known to for a parametrization other than weight norm (``spectral_norm`` steps its power
    iteration at each call), any parametrization under :func:`parametrize_cache_on`, the pre-hook of the
    old-style ``torch.nn.utils.spectral_norm`` (the same), a module that draws random numbers, or any module
    class not listed above. Other hooks fire again in the
    recomputation, as under torchvision's ``memory_efficient=True``."""
    d, cls = m.__dict__, type(m)
    if "forward" in d:
        return False
    if d["_modules"].get("parametrizations") is not None:
        # a generated subclass of the module's class, whose parametrizations are listed there
        if not stateless_parametrizations(m) or parametrize_cache_on():
            return False
        cls = cls.__bases__[0]  # (the class it was made from; its forward is the one that runs)
    if d["_forward_pre_hooks"] and any(isinstance(h, _SpectralNormHook) for h in d["_forward_pre_hooks"].values()):
        return False
    forward = _RECOMPUTABLE.get(cls)
    if forward is not None:
        return cls.forward is forward
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return computes_as_batchnorm(m)
    if isinstance(m, nn.modules.instancenorm._InstanceNorm):
        return cls.forward is _INSTANCENORM_FORWARD and not m.track_running_stats
    forward = _RANDOM_IN_TRAINING.get(cls)
    if forward is not None:
        return cls.forward is forward and (not m.training or getattr(m, "p", None) == 0)
    return cls.__name__ == "FrozenBatchNorm2d" and cls.__module__ == "torchvision.ops.misc"


def _all_recompute_exactly(modules: Sequence[nn.Module | None]) -> bool:
    """:func:`_recomputes_exactly` for ``modules`` and every module below them (the common case, in one pass
    without names: this runs on every forward)."""
    stack = list(modules)
    while stack:
        m = stack.pop()
        if m is None:  # (a submodule slot set to None)
            continue
        if not _recomputes_exactly(m):
            return False
        stack.extend(c for k, c in m.__dict__["_modules"].items() if k != "parametrizations")  # (checked above)
    return True


def unrecomputable(named: Sequence[tuple[str, nn.Module | None]]) -> list[str]:
    """The names (dotted, below the given ones) of the modules in ``named`` that a recomputation is not known
    to reproduce exactly (see :func:`_recomputes_exactly`): a Dropout or RReLU in training mode swapped into
    the stem, a spectral-norm parametrization, an InstanceNorm with running statistics. Recomputing those gave
    other gradients than the forward's (another random draw) or stepped their state twice per training step;
    torchvision's ``memory_efficient=True`` preserves the RNG but still steps such state twice."""
    if _all_recompute_exactly([m for _, m in named]):
        return []
    odd: list[str] = []
    stack = list(reversed(named))
    while stack:
        name, m = stack.pop()
        if m is None:
            continue
        if not _recomputes_exactly(m):
            odd.append(name)  # (not its submodules: a parametrized conv is named, not its parametrizations)
            continue
        stack.extend(reversed([(f"{name}.{sub}", c) for sub, c in m._modules.items() if sub != "parametrizations"]))
    return odd


def _needs_grad(tensors: Sequence[torch.Tensor], modules: Sequence[nn.Module]) -> bool:
    return records_grad() and (
        any(t.requires_grad for t in tensors) or any(p.requires_grad for m in modules for p in m.parameters())
    )


# (private: the message that torch.autograd.graph.disable_saved_tensors_hooks set; a torch without it: None)
_hooks_disabled_message = getattr(torch._C._autograd, "_saved_tensors_hooks_get_disabled_error_message", lambda: None)


def _no_hooks_reason() -> str:
    """Why checkpointing cannot run here, with the disabling context's own message (a torch.func transform
    disables the hooks itself: naming only ``disable_saved_tensors_hooks`` sent users looking for a call of
    theirs that was not there)."""
    return (
        "saved-tensor hooks are disabled here (torch.func transforms such as grad, vjp and jacrev disable them, as "
        f"does torch.autograd.graph.disable_saved_tensors_hooks; the disabling context says: "
        f"\"{_hooks_disabled_message()}\"), and torch.utils.checkpoint registers them"
    )


def hooks_disabled() -> bool:
    """Whether saved-tensor hooks are disabled here, which makes the non-reentrant ``torch.utils.checkpoint``
    raise the disabling context's message (torchvision's ``memory_efficient=True`` model raises it)."""
    return not torch.compiler.is_compiling() and _hooks_disabled_message() is not None


def run_recomputed(named: Sequence[tuple[str, nn.Module]], x: torch.Tensor) -> torch.Tensor:
    """Apply the ``(name, module)`` pairs' modules in order under checkpointing: only ``x`` is kept, the rest
    is recomputed in backward, BatchNorm running statistics are updated once. Runs plainly when it saves
    nothing (no gradient needed, or a single module, e.g. the CIFAR stem's lone convolution), and, with a
    warning, where saved-tensor hooks are disabled (:func:`hooks_disabled`) or a module would not recompute
    exactly (:func:`unrecomputable`): their activations are then kept."""
    modules = [m for _, m in named]

    def run(inp: torch.Tensor) -> torch.Tensor:
        for m in modules:
            inp = m(inp)
        return inp

    if len(modules) <= 1 or not _needs_grad([x], modules):
        return run(x)
    why = _no_hooks_reason() if hooks_disabled() else None
    if why is None and not torch.compiler.is_compiling():
        odd = unrecomputable(named)
        if odd:
            why = f"{_names(odd)} is not known to recompute exactly ({_how_not_exact(named)}): {_NOT_EXACT}"
    if why is not None:
        if not torch.compiler.is_compiling():
            warnings.warn(
                f"effdense: the stem ({', '.join(name for name, _ in named)}) keeps its activations instead of "
                f"recomputing them in backward, because {why}",
                stacklevel=4,
            )
        return run(x)
    return checkpoint(recompute_once(run, modules), x, use_reentrant=False, preserve_rng_state=_preserve_rng(modules))


# what checkpoint recomputes of a layer: layer.bn_function, concat -> norm1 -> relu1 -> conv1
_RECOMPUTED_PARTS = ("norm1", "relu1", "conv1")

_NOT_EXACT = (
    "effdense recomputes only modules known to compute the same again and change no state (PyTorch's "
    "convolutions, BatchNorm, activations, pools, eval-mode Dropout; weight norm the only parametrization, "
    "outside torch.nn.utils.parametrize.cached(), where a recomputation would read the cached weight)"
)


def _how_not_exact(named: Sequence[tuple[str, nn.Module | None]]) -> str:
    """Why the modules of ``named`` (and below) that :func:`unrecomputable` names are not recomputed: under
    ``parametrize.cached()``, for one whose parametrizations would recompute exactly outside it, the cache."""
    if parametrize_cache_on():
        stack = [m for _, m in named]
        while stack:
            m = stack.pop()
            if m is None:
                continue
            if m.__dict__["_modules"].get("parametrizations") is not None and stateless_parametrizations(m):
                return "under torch.nn.utils.parametrize.cached() it would read the cached weight, saving other tensors than the forward"
            stack.extend(c for k, c in m.__dict__["_modules"].items() if k != "parametrizations")
    return "it may draw other random numbers, or step its state twice"


def _names(odd: Sequence[str]) -> str:
    return ", ".join(odd[:3]) + (", ..." if len(odd) > 3 else "")


def _own_layers(block) -> list[str]:
    """The block's layers that checkpoint would not compute as they compute themselves: it calls a layer's
    ``bn_function`` and ``tail``, not its ``forward``, so a layer with a forward of its own (a subclass, an
    instance's ``layer.forward = ...``, another class such as torchvision's ``_DenseLayer``) is one."""
    layer_class = standard_class("layer")
    return [
        name for name, layer in block.named_children()
        if overrides(layer, layer_class, ("forward",)) or not (hasattr(layer, "bn_function") and hasattr(layer, "tail"))
    ]  # fmt: skip


def run_block(block, x: torch.Tensor) -> torch.Tensor:
    if hooks_disabled() and _needs_grad([x], block.layers):
        warn_runs_as_naive("'checkpoint'", _no_hooks_reason(), stacklevel=3, block=block)
        return _naive.run_block(block, x)
    odd = _own_layers(block)
    if odd:
        warn_runs_as_naive(
            "'checkpoint'",
            f"its layers {', '.join(odd[:3])}{', ...' if len(odd) > 3 else ''} have a forward of their own, which "
            "checkpoint would not call (it runs each layer's bn_function and tail); naive calls the layers",
            stacklevel=3,
            block=block,
        )
        return _naive.run_block(block, x)
    layers = block._modules
    # (only where something is recomputed: a gradient needed; none while compiling, where it is fn itself)
    if _needs_grad([x], list(layers.values())) and not torch.compiler.is_compiling() and not _all_recompute_exactly(
        [layer._modules.get(part) for layer in layers.values() for part in _RECOMPUTED_PARTS]
    ):
        named = [(f"{name}.{part}", layer._modules.get(part)) for name, layer in layers.items() for part in _RECOMPUTED_PARTS]
        odd = unrecomputable(named)
        if odd:
            warn_runs_as_naive(
                "'checkpoint'",
                f"{_names(odd)}, which checkpoint recomputes in backward, is not known to recompute exactly "
                f"({_how_not_exact(named)}): {_NOT_EXACT}; naive calls each module once",
                stacklevel=3,
                block=block,
            )
            return _naive.run_block(block, x)
    features = [x]
    layer_class = standard_class("layer")
    for layer in block.layers:
        if _needs_grad(features, [layer]):
            # what the recomputation reads: the parts bn_function runs (a bn_function of a layer's own: the whole
            # layer). Not norm2/conv2, whose gradients autograd finishes before it recomputes: an optimizer
            # step in their post-accumulate-grad hooks (optimizer-in-backward) raised the in-place error here
            # (no assignment expression here: dynamo cannot trace the cell it makes, "Read uninitialized cell",
            # and broke the compiled graph in every dense block)
            parts = layer._modules
            custom = overrides(layer, layer_class, ("bn_function",))
            if custom:
                reads = [layer]
            else:
                reads = [parts[p] for p in _RECOMPUTED_PARTS if parts.get(p) is not None]
            # (every BatchNorm the recomputation runs keeps its statistics: one swapped into relu1 or conv1's place
            # was updated a second time when only norm1's were put back)
            fn = recompute_once(lambda *inputs, layer=layer: layer.bn_function(inputs), reads)
            rng = _preserve_rng(reads, custom)
            bottleneck = checkpoint(fn, *features, use_reentrant=False, preserve_rng_state=rng)
        else:
            bottleneck = layer.bn_function(features)
        features.append(layer.tail(bottleneck))
    return torch.cat(features, 1)
