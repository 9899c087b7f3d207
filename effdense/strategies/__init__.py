"""Registry of the ways a dense block can be run.

A strategy is a module ``effdense.strategies.<name>`` with a function ``run_block(block, x) -> Tensor``
that takes a :class:`effdense.densenet._DenseBlock` and its input and returns the block's output, the
concatenation of the input and every layer's new features. It may also define
``run_features(model, x) -> Tensor``, the model's whole feature extractor (stem, blocks, transitions,
``norm5``), when it runs more than the blocks its own way. All strategies read the same parameters
(torchvision's names), so a model can switch strategy at any time. This module is the one place that
knows which strategies exist and how ``"auto"`` resolves.
"""

from __future__ import annotations

import dataclasses
import sys
import warnings
from types import ModuleType
from typing import TYPE_CHECKING, Any, NoReturn

import torch

if TYPE_CHECKING:  # pragma: no cover
    from effdense.densenet import _DenseBlock

STRATEGIES: tuple[str, ...] = ("naive", "checkpoint", "shared", "fused")
"""Every strategy name, from memory-hungriest to most optimised."""

_PENDING = {
    # name -> the subject of the issue that delivers it, for the NotImplementedError message
    "shared": "Strategy `shared`: dense blocks with linear memory in pure PyTorch",
    "fused": "Strategy `fused`: Triton kernels for the bottleneck BN-ReLU-conv1x1 and its backward",
}

@dataclasses.dataclass(frozen=True)
class Policy:
    """Switches for the ``shared``/``fused`` strategies, each on its own so ablations can measure it.
    ``naive`` and ``checkpoint`` read none (a block on them keeps its policy for when it switches). A policy is
    not part of a state dict: a model built anew and loaded from one has the policy it was built with (pickling
    or ``copy.deepcopy`` of the model keeps it).

    Args:
        recompute_bottleneck: recompute the bottleneck output ``conv1(relu(bn1(x)))`` in backward
            instead of keeping it per layer.
        cache_stats: compute each channel's batch statistics once, when it is written, and reuse them
            in every later layer's BN1, and keep each layer's BN2 statistics for its backward; if False
            every layer recomputes them over all its input channels, and backward recomputes BN2's. A time
            saving: the statistics kept cost a little memory.
        shared_grad: accumulate input gradients in one shared gradient buffer per block; if False every
            layer allocates its own gradient for its input slice and it is added afterwards.
    """

    recompute_bottleneck: bool = True
    cache_stats: bool = True
    shared_grad: bool = True

    def __post_init__(self) -> None:
        # a string such as "no" would silently mean True
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, bool):
                raise TypeError(f"Policy.{field.name} must be a bool, got {value!r}")


def records_grad() -> bool:
    """Whether autograd records operations here: grad mode on, outside inference mode. ``torch.enable_grad()``
    inside ``torch.inference_mode()`` turns grad mode on, yet nothing is recorded and the tensors made there
    cannot be saved for backward: a strategy that saves (checkpoint, the shared Function) must run plainly
    there, as the plain model does. (Under torch.compile grad mode alone: dynamo cannot trace the
    inference-mode query.)"""
    if not torch.is_grad_enabled():
        return False
    return torch.compiler.is_compiling() or not torch.is_inference_mode_enabled()


def _load_runners() -> dict[str, ModuleType]:
    import importlib

    runners: dict[str, ModuleType] = {}
    for name in STRATEGIES:
        try:
            runners[name] = importlib.import_module(f"effdense.strategies.{name}")
        except ModuleNotFoundError as exc:  # not delivered yet
            if exc.name != f"effdense.strategies.{name}":
                raise
    return runners


def _runners() -> dict[str, ModuleType]:
    """Strategy name -> its module, for the strategies this installation has. A plain dict filled when
    this package is imported (bottom of the file), so ``torch.compile`` traces the dispatch as constants
    (it cannot trace ``importlib`` or into an ``lru_cache``)."""
    return _RUNNERS


def available() -> tuple[str, ...]:
    """The strategies implemented in this installation, in :data:`STRATEGIES` order."""
    runners = _runners()
    return tuple(name for name in STRATEGIES if name in runners)


def check_strategy(name: str) -> str:
    """Validate a strategy name given by a user (``"auto"`` included); return it unchanged."""
    if not isinstance(name, str) or (name not in STRATEGIES and name != "auto"):
        raise ValueError(f"unknown strategy {name!r}; expected 'auto' or one of {STRATEGIES}")
    if name != "auto" and name not in _runners():
        raise NotImplementedError(
            f"strategy {name!r} is not implemented yet (it comes with: {_PENDING.get(name, name)}); "
            f"available now: {available()}"
        )
    return name


def fused_supported(x: torch.Tensor) -> bool:
    """Whether ``"auto"`` picks ``fused`` for this input: a CUDA tensor, with the Triton kernels available there.
    (Under ``TRITON_INTERPRET=1`` an explicit ``fused`` runs the kernels on CPU too, but ``"auto"`` does not
    pick the interpreter. Per call, :mod:`effdense.kernels` may still run a PyTorch twin: float64, vmap, or
    tensors past the kernels' 32-bit offsets.)"""
    if "fused" not in _runners() or not x.is_cuda:
        return False
    from effdense.strategies import fused

    return fused.kernels_available()


def resolve(name: str, x: torch.Tensor) -> str:
    """Turn ``"auto"`` into a concrete strategy for input ``x``; other names pass through."""
    if name != "auto":
        return name
    # (under torch.use_deterministic_algorithms(True) not fused, whose kernels sum across programs with atomics)
    if fused_supported(x) and not torch.are_deterministic_algorithms_enabled():
        return "fused"
    for candidate in ("shared", "checkpoint"):
        if candidate in _runners():
            return candidate
    return "naive"


# torch.compiler.is_exporting arrived in torch 2.7 (pyproject allows 2.4): before it, nothing says so
_is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)


def _runner_for(name: str, x: torch.Tensor) -> ModuleType:
    """The module that runs strategy ``name`` on ``x``."""
    if _is_exporting():
        # torch.export records ATen operators (strict or not): it inlines the shared/fused autograd Function's
        # forward and drops its backward, so the exported program could not train (in-place buffer writes,
        # batch statistics passed as running ones) or, on the kernel ops, lost every gradient silently.
        # "auto" exports the plain model, as torchvision's; checkpoint exports as torchvision's memory_efficient
        if name in ("shared", "fused"):
            raise RuntimeError(
                f"strategy {name!r} cannot be exported by torch.export (its autograd Function's backward would not "
                "be kept); call model.set_strategy('naive') (effdense.set_strategy(model, 'naive') for a model of one's own; or "
                "'auto', which exports as naive) before exporting"
            )
        return _runners()["naive" if name == "auto" else name]
    if isinstance(x, torch.fx.Proxy):
        # torch.fx symbolic tracing (torchvision's create_feature_extractor, fx quantization): only naive's
        # plain module calls trace, and they make a graph of the model's own modules
        return _runners()["naive"] if name in ("auto", "naive") else _untraceable(name, "torch.fx symbolic tracing")
    if torch.jit.is_tracing():
        # a trace records operators, not Python: "auto" records the plain model, as torchvision's traces
        # (and no branch on the traced shape here, which would only warn)
        if name in ("shared", "fused"):
            _untraceable(name, "torch.jit.trace (which torch.onnx.export(dynamo=False) uses)")
        return _runners()["naive" if name == "auto" else name]
    if x.shape[0] == 0 and name != "checkpoint":
        # an empty batch holds no activations to save memory on; naive gives it PyTorch's own semantics
        # (an empty output, BatchNorm counters advanced), as torchvision, where the shared buffers need a batch.
        # checkpoint keeps its own path, as torchvision's memory_efficient does: under SyncBatchNorm a rank
        # whose batch is empty must recompute (and all-gather) in backward as the others do, or they hang
        return _runners()["naive"]
    if not torch.compiler.is_compiling() and torch._C._functorch.peek_interpreter_stack() is not None:
        # inside a torch.func transform (grad, vmap, jacrev, ...): the shared/fused autograd Function mutates
        # its buffers and saves state through ctx, which functorch cannot transform; naive's plain operators can
        return _as_naive_inside(
            name, "a torch.func transform (grad, vmap, jacrev, ...)", "its autograd Function writes shared buffers in place"
        )
    if getattr(torch.autograd.forward_ad, "_current_level", -1) >= 0 and not torch.compiler.is_compiling():
        # inside torch.autograd.forward_ad.dual_level(): tangents need a forward-mode derivative of every op, which
        # the shared/fused Function has not (PyTorch's bare "You must implement the jvp function", or a
        # batch_norm error about running statistics with forward grads, naming neither effdense nor the way out)
        return _as_naive_inside(
            name, "forward-mode AD (torch.autograd.forward_ad.dual_level)",
            "its autograd Function has no forward-mode derivative (jvp)",
        )  # fmt: skip
    if getattr(torch.autograd.graph, "_allow_mutation_on_saved_tensors_enabled", False):
        # torch.autograd.graph.allow_mutation_on_saved_tensors(): its dispatch mode cannot follow the stage's
        # out-argument and optional-output operators (it failed with a bare KeyError/AttributeError inside)
        return _as_naive_inside(
            name, "torch.autograd.graph.allow_mutation_on_saved_tensors()",
            "its operators write into output arguments, which that mode cannot follow",
        )  # fmt: skip
    return _runners()[resolve(name, x)]


def _as_naive_inside(name: str, where: str, why: str) -> ModuleType:
    """Inside a context that only plain operators survive: ``"auto"`` runs as naive, explicit ``shared``/``fused``
    raise saying ``why``, ``naive``/``checkpoint`` run as they are."""
    if name in ("shared", "fused"):
        raise RuntimeError(
            f"strategy {name!r} cannot run inside {where}: {why}; call model.set_strategy('naive') (effdense.set_strategy(model, "
            "'naive') for a model of one's own; or 'auto', which runs as naive there) first"
        )
    return _runners()["naive" if name == "auto" else name]


def _untraceable(name: str, tracer: str) -> NoReturn:
    raise RuntimeError(
        f"strategy {name!r} cannot be traced by {tracer} (it computes sizes from the input's shape in Python"
        f"{'' if name != 'checkpoint' else ' and branches on requires_grad'}); call model.set_strategy('naive') "
        "(effdense.set_strategy(model, 'naive') for a model of one's own; or 'auto', which traces as naive) before tracing, or use torch.compile, which runs every strategy, "
        "or torch.export (and torch.onnx.export(dynamo=True)), which exports 'auto' as naive"
    )


# ------------------------------------------------------------------------------------------------
# Module hooks. shared/fused compute a block (and the stem, transitions) without calling its modules, and
# checkpoint calls a layer's parts but not the layer; a forward or backward hook registered on any of those
# modules (by Grad-CAM, feature extraction, FLOP or shape counters) would silently not fire. Such a block
# runs as naive, whose module calls fire every hook once per forward, as torchvision's plain model does.
# Hooks registered for all modules (register_module_forward_hook) are not a reason: PyTorch's own tools
# register them to attribute work to modules (FlopCounterMode's ModuleTracker), and they should see the
# strategy as it runs (its recomputation included); they fire for the modules that the strategy calls. A global
# hook that changes values inside a block therefore does not apply under shared/fused (the README says so).


def _own_hooks(module: torch.nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks)


def _has_hooks(module: torch.nn.Module | None, backward: bool = True) -> bool:
    """Whether ``module`` or a module below it has a forward (pre-)hook or (with ``backward``) a backward
    (pre-)hook: the checks ``nn.Module.__call__`` makes on every call, over the instance dicts without recursion
    (~0.4 µs per module on a loaded 2-core CPU; DenseNet-121's features hold 431)."""
    stack = [module]
    pop, extend = stack.pop, stack.extend
    while stack:
        m = pop()
        if m is None:  # a submodule slot set to None
            continue
        d = m.__dict__
        if d["_forward_hooks"] or d["_forward_pre_hooks"] or (backward and (d["_backward_hooks"] or d["_backward_pre_hooks"])):
            return True
        extend(d["_modules"].values())
    return False


def _hook_fallback(block: "_DenseBlock", concrete: str) -> bool:
    """Whether ``block`` must run as naive so that its modules' hooks fire (and warn if so). ``checkpoint``
    calls every module of a layer, and recomputes ``norm1``/``relu1``/``conv1`` in backward, as torchvision's
    ``memory_efficient=True`` does, but not the layer itself; ``shared`` and ``fused`` call none of a block's
    modules."""
    if concrete == "naive":  # it calls every module
        return False
    skipped = _own_hooks if concrete == "checkpoint" else _has_hooks
    if not any(skipped(layer) for layer in block.values()):
        return False
    if torch.compiler.is_compiling():  # the same choice, traced; dynamo refuses warnings.warn
        return True
    hooked = [
        f"{name}.{sub}" if sub else name
        for name, layer in block.named_children()
        for sub, m in (layer.named_modules() if concrete != "checkpoint" else [("", layer)])
        if _own_hooks(m)
    ]
    names = ", ".join(hooked[:3]) + (", ..." if len(hooked) > 3 else "")
    where = block_name(block)
    # torch.nn.utils.prune re-applies its mask in a forward pre-hook: say so, and how to make it permanent
    # (a model with pruning has imported that module; not imported here otherwise)
    prune = sys.modules.get("torch.nn.utils.prune")
    pruned = prune is not None and any(
        isinstance(h, prune.BasePruningMethod)
        for layer in block.values() for m in layer.modules() for h in m._forward_pre_hooks.values()
    )  # fmt: skip
    prune_note = (" (torch.nn.utils.prune re-applies its mask in a forward pre-hook; prune.remove(module, name) makes "
                  "the pruning permanent and removes the hook)") if pruned else ""  # fmt: skip
    warnings.warn(
        f"effdense: a dense block{f' ({where})' if where else ''} runs as strategy 'naive' instead of {concrete!r}, "
        f"because module hooks are registered on {names}{prune_note} and {concrete!r} computes the block without calling "
        f"{'its dense layers' if concrete == 'checkpoint' else 'its modules'}; naive fires each hook once per "
        "forward, as torchvision's model does. The block keeps naive's memory while the hooks are registered.",
        stacklevel=2,
    )
    return True


def run_block(name: str, block: "_DenseBlock", x: torch.Tensor) -> torch.Tensor:
    """Run ``block`` on ``x`` with strategy ``name`` (``"auto"`` resolved for ``x``); as ``naive`` if hooks
    are registered on the block's layers or their modules, so that they fire."""
    module = _runner_for(name, x)
    if _hook_fallback(block, module.__name__.rsplit(".", 1)[-1]):
        module = _runners()["naive"]
    return module.run_block(block, x)


# ------------------------------------------------------------------------------------------------
# Modules with a computation of their own. The strategies compute a dense layer (and shared/fused a block's
# stage, its transition and the model's features) from its parts without calling the module's forward: a
# subclass or an instance that overrides it (``layer.forward = ...``, a layer class with its own ``tail``) runs
# through its modules instead, as on torchvision's model, where every container calls its children.

# "layer", "block": effdense.densenet's _DenseLayer and _DenseBlock, registered by that module when it is
# imported (it imports this package, so this one cannot import it). Filled before any model exists: a dict filled
# lazily at the first forward made torch.compile guard on its emptiness and compile every model twice.
_STANDARD: dict[str, type] = {}


# the standard classes' methods as defined: a method patched on the class later (``_DenseLayer.forward = f``)
# is then told apart from the original, as a subclass's or an instance's own method is
_ORIGINAL_METHODS: dict[tuple[type, str], Any] = {}


def register_standard_classes(layer: type, block: type) -> None:
    """Called once by :mod:`effdense.densenet` with its dense layer and block classes."""
    _STANDARD.update(layer=layer, block=block)
    for cls in (layer, block):
        _ORIGINAL_METHODS.update({(cls, n): v for n, v in vars(cls).items() if callable(v)})


def standard_class(kind: str) -> type:
    """``effdense.densenet._DenseLayer`` (``kind="layer"``) or ``_DenseBlock`` (``"block"``)."""
    return _STANDARD[kind]


def block_name(block: Any) -> str:
    """The name a dense block was given in its model (``features.denseblock2``: by the DenseNet that built it,
    or by :func:`effdense.set_strategy` in a model of one's own), for warnings; "" if none. Informational: a
    block moved elsewhere afterwards keeps the name it had."""
    return block.__dict__.get("_effdense_where", "") if block is not None else ""


def warn_runs_as_naive(instead_of: str, because: str, stacklevel: int, where: str = "", block: Any = None) -> None:
    """The warning of a dense block that runs as naive instead of ``instead_of`` ``because`` of what it holds
    (none while dynamo traces: it refuses ``warnings.warn``, and traces the modules as they are).
    ``stacklevel``: as for :func:`warnings.warn` called in the caller's place; ``where``: the block's name in
    its model, where the caller knows it (every block has a ``denselayer3``), else :func:`block_name` of
    ``block``."""
    if torch.compiler.is_compiling():
        return
    where = where or block_name(block)
    block = f"dense block ({where})" if where else "dense block"
    warnings.warn(
        f"effdense: a {block} runs as strategy 'naive' instead of {instead_of}, because {because}. The block "
        "keeps naive's memory.",
        stacklevel=stacklevel + 1,
    )


# A subclass computes as its base only if it keeps the base's forward: one that overrides it (a BatchNorm that
# rescales its output) would otherwise be computed (or recomputed) as plain BatchNorm, silently. A BatchNorm
# class that computes nn.SyncBatchNorm's function with a forward of its own says so with the class attribute
# ``_effdense_computes_as_batchnorm`` (effdense.train.CPUSyncBatchNorm, the CPU stand-in).
_BN_FORWARDS = (torch.nn.modules.batchnorm._BatchNorm.forward, torch.nn.SyncBatchNorm.forward)


def computes_as_batchnorm(m: torch.nn.Module) -> bool:
    """Whether ``m`` is a BatchNorm whose class computes PyTorch's BatchNorm (the strategies compute it
    themselves under shared/fused, and recompute it under checkpoint and the recomputed stem)."""
    cls = type(m)
    return isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and (
        cls.forward in _BN_FORWARDS or getattr(cls, "_effdense_computes_as_batchnorm", False)
    )


def overrides(module: torch.nn.Module, base: type, names: tuple[str, ...]) -> bool:
    """Whether ``module`` computes other than ``base``'s methods ``names``: an instance attribute of one of
    those names (a patched ``module.forward``), or a class whose method is not ``base``'s (a subclass with a
    forward of its own, or another class altogether, such as torchvision's ``_DenseLayer``), or, for effdense's
    own classes, a method patched on the class itself after import."""
    d, cls = module.__dict__, type(module)
    for n in names:
        if n in d or getattr(cls, n, None) is not _ORIGINAL_METHODS.get((base, n), getattr(base, n)):
            return True
    return False


def _plain_containers(model: torch.nn.Module) -> bool:
    """Whether ``model.features`` and its dense blocks compute as their classes' forwards do (an
    ``nn.Sequential``, a ``_DenseBlock`` running its strategy): a strategy's ``run_features`` calls neither."""
    features = model.features
    if overrides(features, torch.nn.Sequential, ("forward",)):
        return False
    block = standard_class("block")
    mods = features._modules
    return not any(overrides(mods[f"denseblock{i}"], block, ("forward",)) for i in range(1, len(model.block_config) + 1))


def run_features(name: str, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run ``model.features`` on ``x`` with strategy ``name``: the strategy's own ``run_features`` if it
    has one, else the plain module (whose dense blocks call :func:`run_block`). With hooks on any module
    of ``model.features``, a block whose own ``strategy`` differs from ``name``, or a ``features`` or block
    with a forward of its own, the plain module, so that the stem, transitions and blocks are called (each block
    then on its own strategy, or as ``naive`` when its own layers hold the hooks)."""
    module = _runner_for(name, x)
    if (
        hasattr(module, "run_features")
        and _standard_layout(model)
        and _blocks_follow(model, name)
        and _plain_containers(model)
        and not _has_hooks(model.features)
    ):
        return module.run_features(model, x)
    return model.features(x)


def _blocks_follow(model: torch.nn.Module, name: str) -> bool:
    """Whether every dense block's own ``strategy`` is the model's: a block set to another one (``block.strategy =
    'naive'``) runs on it, through the plain module, instead of the model strategy's ``run_features``."""
    mods = model.features._modules
    return all(mods[f"denseblock{i}"].__dict__.get("_strategy") == name for i in range(1, len(model.block_config) + 1))


# The children of a DenseNet's ``features``, in order: the stem modules (any of them, conv0 first), then the
# stages. What the strategies' ``run_features`` runs, and what ``convert()`` rebuilds.
STEM = ("conv0", "norm0", "relu0", "pool0")


def stage_names(n_blocks: int) -> list[str]:
    """``denseblock1``, ``transition1``, ..., ``denseblock<n_blocks>``, ``norm5``."""
    names = [f"denseblock{i // 2 + 1}" if i % 2 == 0 else f"transition{i // 2 + 1}" for i in range(2 * n_blocks - 1)]
    return names + ["norm5"]


def _standard_layout(model: torch.nn.Module) -> bool:
    """Whether ``model.features`` holds what a strategy's ``run_features`` runs, in its order: stem modules
    (``conv0``, ``norm0``, ``relu0``, ``pool0``, any of them), then ``denseblock1``, ``transition1``, ...,
    ``denseblock<n>`` and ``norm5``. A module a user added to (or removed from) ``model.features`` would be
    skipped (or missed) by it: the plain ``nn.Sequential`` runs instead, its dense blocks still on the strategy."""
    names = list(model.features._modules)
    stem = [n for n in names[: len(STEM)] if n in STEM]
    if stem != [n for n in STEM if n in stem]:
        return False
    return names[len(stem):] == stage_names(len(model.block_config))


# after everything above exists: the strategy modules import this package
_RUNNERS: dict[str, ModuleType] = _load_runners()
