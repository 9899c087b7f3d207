"""DenseNet models with torchvision's module names, parameters and outputs, and a pluggable block strategy.

The modules mirror ``torchvision.models.densenet`` name for name (``features.denseblock1.denselayer1.norm1``,
``features.transition1.conv``, ``features.norm5``, ``classifier``), so a torchvision state dict loads with
``strict=True``. How a dense block runs is not in these modules but in :mod:`effdense.strategies`.
"""

from __future__ import annotations

import copy
import functools
import http.client
import math
import numbers
import operator
import os
import re
import sys
import urllib.error
import warnings
from collections import OrderedDict
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from effdense import strategies
from effdense.strategies import Policy


_MEMORY_EFFICIENT = (
    "effdense dense layers have no memory_efficient switch (torchvision's per-layer checkpointing): the strategy "
    "of the model or block decides, e.g. model.set_strategy('checkpoint') for torchvision's memory_efficient=True"
)


class _DenseLayer(nn.Module):
    """One layer of a dense block: ``BN-ReLU-conv1x1(bn_size*k)-BN-ReLU-conv3x3(k)`` (DenseNet-BC) or,
    with ``bottleneck=False``, ``BN-ReLU-conv3x3(k)`` (the original DenseNet)."""

    def __init__(
        self,
        num_input_features: int,
        growth_rate: int,
        bn_size: int,
        drop_rate: float,
        bottleneck: bool = True,
    ) -> None:
        super().__init__()
        self.bottleneck = bottleneck = _check_flag("bottleneck", bottleneck)
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        if bottleneck:
            self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, kernel_size=1, stride=1, bias=False)
            self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
            self.relu2 = nn.ReLU(inplace=True)
            self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, kernel_size=3, stride=1, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(num_input_features, growth_rate, kernel_size=3, stride=1, padding=1, bias=False)
        self.drop_rate = float(drop_rate)

    @property
    def memory_efficient(self) -> bool:
        raise AttributeError(_MEMORY_EFFICIENT)

    @memory_efficient.setter
    def memory_efficient(self, value: bool) -> None:
        # torchvision's per-layer switch; here the block's strategy decides, and an attribute set on a layer
        # would be silently ignored
        raise AttributeError(_MEMORY_EFFICIENT)

    def bn_function(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """concat -> norm1 -> relu1 -> conv1: the part whose memory grows with depth."""
        # one input needs no copy; torch.fx records the cat anyway, so graphs have torchvision's node names
        # (``features.denseblock1.denselayer1.cat`` for create_feature_extractor)
        one = len(inputs) == 1 and not isinstance(inputs[0], torch.fx.Proxy)
        concated = inputs[0] if one else torch.cat(list(inputs), 1)
        return self.conv1(self.relu1(self.norm1(concated)))

    def tail(self, bottleneck_output: torch.Tensor) -> torch.Tensor:
        """norm2 -> relu2 -> conv2 -> dropout (just dropout without a bottleneck)."""
        out = bottleneck_output
        if self.bottleneck:
            out = self.conv2(self.relu2(self.norm2(out)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return out

    def forward(self, inputs: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        if isinstance(inputs, torch.Tensor):
            inputs = [inputs]
        return self.tail(self.bn_function(inputs))


def _check_policy(policy: Any, what: str = "policy") -> Policy:
    if not isinstance(policy, Policy):
        hint = ": make one with effdense.Policy(**fields)" if isinstance(policy, Mapping) else ""
        raise TypeError(f"{what} must be an effdense.Policy, got {type(policy).__name__}{hint}")
    return policy


class _DenseBlock(nn.ModuleDict):
    """``num_layers`` dense layers; output is the input concatenated with every layer's new features
    (``num_input_features + num_layers * growth_rate`` channels). Public as ``effdense.DenseBlock``, for
    architectures of one's own (FC-DenseNet's down and up paths, a backbone feeding an FPN): it runs on its
    ``strategy`` wherever it sits, and :func:`effdense.set_strategy` sets that for every block of a model.

    The layers are children named ``denselayer1``..``denselayerL`` (torchvision's names); the block's
    ``strategy`` and ``policy`` attributes say how :mod:`effdense.strategies` runs it.

    Args:
        num_layers: dense layers in the block.
        num_input_features: channels of the block's input.
        bn_size: bottleneck width multiplier (each layer's 1x1 conv outputs ``bn_size * growth_rate``).
        growth_rate: channels each layer adds (``k``).
        drop_rate: dropout after each layer, in ``[0, 1)``.
        memory_efficient: torchvision's sixth argument; ``True`` means ``strategy="checkpoint"``.
        bottleneck: ``False`` gives the original layer (BN-ReLU-conv3x3 on the concatenation). Keyword-only,
            as are the two below (torchvision's block has none of them).
        strategy: ``"auto"`` or one of :data:`effdense.STRATEGIES`.
        policy: :class:`effdense.Policy` of the ``shared``/``fused`` strategies (``None``: the default).

    Under ``shared``/``fused`` the output is the block's feature buffer, which backward reads: change it out of
    place (or ``.clone()`` it first), as the README says.
    """

    _version = 2

    def __init__(
        self,
        num_layers: int,
        num_input_features: int,
        bn_size: int,
        growth_rate: int,
        drop_rate: float,
        memory_efficient: bool = False,
        *,
        bottleneck: bool = True,
        strategy: str = "auto",
        policy: Policy | None = None,
    ) -> None:
        super().__init__()
        # (checked as DenseNet's constructor checks them: public as effdense.DenseBlock, built on its own)
        num_layers = _check_positive_int("num_layers", num_layers)
        num_input_features = _check_positive_int("num_input_features", num_input_features)
        bn_size = _check_positive_int("bn_size", bn_size)
        growth_rate = _check_positive_int("growth_rate", growth_rate)
        bottleneck = _check_flag("bottleneck", bottleneck)
        p = _real(drop_rate)
        if p is None or not 0.0 <= p < 1.0:
            raise ValueError(f"drop_rate must be a number in [0, 1), got {drop_rate!r}")
        # (torchvision's sixth argument: its checkpointing, effdense's 'checkpoint')
        if _check_flag("memory_efficient", memory_efficient):
            if strategy not in ("auto", "checkpoint"):
                raise ValueError(f"memory_efficient=True means strategy='checkpoint'; it conflicts with strategy={strategy!r}")
            strategy = "checkpoint"
        strategies.check_strategy(strategy)
        policy = Policy() if policy is None else _check_policy(policy, "a dense block's policy")
        for i in range(num_layers):
            layer = _DenseLayer(num_input_features + i * growth_rate, growth_rate, bn_size, drop_rate, bottleneck)
            self.add_module(f"denselayer{i + 1}", layer)
        self.num_input_features = num_input_features
        self.growth_rate = growth_rate
        self.strategy = strategy
        self.policy = policy
        # SyncBatchNorm semantics for the shared/fused strategies: None (local statistics) or
        # a torch.distributed process group (see DenseNet.set_sync_bn)
        self.sync_bn = False
        self.sync_group: Any = None

    @property
    def layers(self) -> list[_DenseLayer]:
        return list(self.values())  # type: ignore[arg-type]

    @property
    def num_output_features(self) -> int:
        """Channels of the block's output: its input's and ``growth_rate`` per layer it holds now (a layer
        appended or deleted after construction counts; the shared strategies size their buffer by it)."""
        return self.num_input_features + len(self._modules) * self.growth_rate

    @num_output_features.setter
    def num_output_features(self, value: int) -> None:
        if value != self.num_output_features:
            raise AttributeError(
                f"a dense block's num_output_features is {self.num_output_features}, counted from the layers it "
                f"holds ({self.num_input_features} input channels + {len(self._modules)} layers x growth rate "
                f"{self.growth_rate}); it cannot be set to {value}: add or delete layers instead"
            )

    @property
    def strategy(self) -> str:
        """How this block runs: ``"auto"`` or one of :data:`effdense.STRATEGIES` (the model's
        :meth:`DenseNet.set_strategy` sets every block's; a block may be given its own)."""
        return self._strategy

    @strategy.setter
    def strategy(self, strategy: str) -> None:
        # checked here, as the model's: a typo used to surface as a bare KeyError at the next forward
        self._strategy = strategies.check_strategy(strategy)

    @property
    def policy(self) -> Policy:
        """The :class:`effdense.Policy` this block runs with: the model's (:meth:`DenseNet.set_strategy`
        with a policy sets every block's), or one given to the block itself."""
        return self._policy

    @policy.setter
    def policy(self, policy: Policy) -> None:
        # checked here, as the model's: a dict or None used to fail deep in the next forward (AttributeError)
        self._policy = _check_policy(policy, "a dense block's policy")

    def __setstate__(self, state: dict[str, Any]) -> None:
        # a block pickled before ``strategy`` and ``policy`` became properties kept them in its instance dict
        if "strategy" in state:  # (checked, as the setter checks: it was assigned unchecked then)
            state["_strategy"] = strategies.check_strategy(state.pop("strategy"))
        if "policy" in state:
            state["_policy"] = _check_policy(state.pop("policy"), "a dense block's policy")
        state.pop("num_output_features", None)  # (an attribute until it became a property of the layers held)
        super().__setstate__(state)

    def forward(self, init_features: torch.Tensor) -> torch.Tensor:
        return strategies.run_block(self._strategy, self, init_features)


strategies.register_standard_classes(_DenseLayer, _DenseBlock)


class _Transition(nn.Sequential):
    """BN-ReLU-conv1x1-avgpool2x2 between two dense blocks, torchvision's; public as ``effdense.Transition``.
    Placed right after a dense block in an effdense ``DenseNet``'s ``features``, ``shared``/``fused`` run it
    with the block (on the block's buffer, without materialising its normalised input).

    Args:
        num_input_features: channels in (the dense block's output: its input channels plus layers x growth rate).
        num_output_features: channels out (a DenseNet-BC compresses: ``int(num_input_features * compression)``).
    """

    def __init__(self, num_input_features: int, num_output_features: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(num_input_features, num_output_features, kernel_size=1, stride=1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


def _check_positive_int(name: str, value: Any) -> int:
    """``value`` as a Python int if it is a positive integer (an ``int``, or an integer scalar such as
    ``numpy.int64`` or a 0-d integer tensor, as torchvision accepts them); else a ValueError naming ``name``."""
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and (value.dim() or value.dtype == torch.bool)):
        index = None  # True is not a size; nor is a 1-element tensor (operator.index accepts both)
    else:
        try:
            index = operator.index(value)
        except TypeError:
            index = None
    if index is None or index <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return index


def _check_flag(name: str, value: Any) -> bool:
    """``value`` if it is a bool (a numpy bool as a Python one); else a TypeError naming ``name``: a string
    such as "False" or "no" would silently mean True, and an int is not taken for a switch."""
    if type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_"):
        value = bool(value)
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def _real(value: Any) -> float | None:
    """``value`` as a Python float if it is a real number (an int or float, a numpy scalar, a 0-d tensor, as
    torchvision accepts them), else None (also for a bool)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, torch.Tensor):
        ok = value.dim() == 0 and value.dtype != torch.bool and not value.is_complex()
        return float(value) if ok else None
    return float(value) if isinstance(value, numbers.Real) else None


def _pair(v: Any, dim: int) -> int:
    return v[dim] if isinstance(v, tuple) else v


def _pooled_size(m: nn.Module, size: int, dim: int) -> int:
    """Output side ``dim`` of a Conv2d, MaxPool2d or AvgPool2d for input side ``size`` (0 if none is left),
    by PyTorch's rules (string paddings, and ceil mode's last window dropped when it starts in the padding)."""
    k, s, p = (_pair(getattr(m, a), dim) for a in ("kernel_size", "stride", "padding"))
    if p == "same":  # stride 1 (Conv2d refuses others): the size is kept
        return size
    p = 0 if p == "valid" else p
    s = k if s is None else s
    d = _pair(getattr(m, "dilation", 1), dim)
    span = size + 2 * p - d * (k - 1) - 1
    if span < 0:
        return 0
    if not getattr(m, "ceil_mode", False):
        return span // s + 1
    out = -(-span // s) + 1
    return out - 1 if (out - 1) * s >= size + p else out


class DenseNet(nn.Module):
    r"""Densely connected network (Huang et al., 2017), a drop-in for ``torchvision.models.DenseNet``.

    Args:
        growth_rate: channels each layer adds (``k``).
        block_config: number of layers in each dense block.
        num_init_features: channels produced by the stem convolution.
        bn_size: bottleneck width multiplier (the 1x1 conv outputs ``bn_size * k`` channels).
        drop_rate: dropout rate after each dense layer.
        num_classes: number of classification classes.
        memory_efficient: torchvision's flag; ``True`` means ``strategy="checkpoint"``.
        compression: transition layers keep ``floor(compression * C)`` channels, in ``(0, 1]``.
        bottleneck: ``False`` gives the original DenseNet layer (BN-ReLU-conv3x3 on the concatenation).
        small_inputs: CIFAR stem (one 3x3 convolution, no pooling) instead of the ImageNet stem.
        strategy: how dense blocks run: ``"auto"`` or one of :data:`effdense.STRATEGIES`.
        policy: switches of the ``shared``/``fused`` strategies (:class:`effdense.Policy`).
        in_channels: channels of the input image.
    """

    def __init__(
        self,
        growth_rate: int = 32,
        block_config: Sequence[int] = (6, 12, 24, 16),
        num_init_features: int = 64,
        bn_size: int = 4,
        drop_rate: float = 0.0,
        num_classes: int = 1000,
        memory_efficient: bool = False,
        *,
        compression: float = 0.5,
        bottleneck: bool = True,
        small_inputs: bool = False,
        strategy: str = "auto",
        policy: Policy | None = None,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        growth_rate = _check_positive_int("growth_rate", growth_rate)
        num_init_features = _check_positive_int("num_init_features", num_init_features)
        bn_size = _check_positive_int("bn_size", bn_size)
        num_classes = _check_positive_int("num_classes", num_classes)
        in_channels = _check_positive_int("in_channels", in_channels)
        bottleneck = _check_flag("bottleneck", bottleneck)
        small_inputs = _check_flag("small_inputs", small_inputs)
        # a sequence, or a 1-d array or tensor of layer counts (their elements are integer scalars)
        sequence = isinstance(block_config, Sequence) or getattr(block_config, "ndim", None) == 1
        if not sequence or isinstance(block_config, (str, bytes)):
            raise TypeError(
                f"block_config must be a sequence of layer counts, one per dense block (e.g. (6, 12, 24, 16)), "
                f"got {block_config!r}"
            )
        block_config = tuple(_check_positive_int(f"block_config[{i}]", n) for i, n in enumerate(block_config))
        if not block_config:
            raise ValueError("block_config must name at least one dense block, got an empty sequence")
        c, p = _real(compression), _real(drop_rate)
        if c is None or not 0.0 < c <= 1.0:
            raise ValueError(f"compression must be a number in (0, 1], got {compression!r}")
        if p is None or not 0.0 <= p < 1.0:
            raise ValueError(f"drop_rate must be a number in [0, 1), got {drop_rate!r}")
        compression, drop_rate = c, p
        memory_efficient = _check_flag("memory_efficient", memory_efficient)
        if memory_efficient and strategy not in ("auto", "checkpoint"):
            raise ValueError(
                f"memory_efficient=True means strategy='checkpoint'; it conflicts with strategy={strategy!r}"
            )
        if memory_efficient:
            strategy = "checkpoint"
        strategies.check_strategy(strategy)
        if policy is not None:
            _check_policy(policy)

        self.growth_rate = growth_rate
        self.block_config = block_config
        self.compression = float(compression)
        self.small_inputs = small_inputs
        self.in_channels = in_channels
        self._strategy = strategy  # (the properties below; no blocks yet)
        self._policy = policy or Policy()

        if small_inputs:
            stem = [("conv0", nn.Conv2d(in_channels, num_init_features, kernel_size=3, stride=1, padding=1, bias=False))]
        else:
            stem = [
                ("conv0", nn.Conv2d(in_channels, num_init_features, kernel_size=7, stride=2, padding=3, bias=False)),
                ("norm0", nn.BatchNorm2d(num_init_features)),
                ("relu0", nn.ReLU(inplace=True)),
                ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
            ]
        self.features = nn.Sequential(OrderedDict(stem))

        num_features = num_init_features
        for i, num_layers in enumerate(block_config):
            block = _DenseBlock(
                num_layers=num_layers,
                num_input_features=num_features,
                bn_size=bn_size,
                growth_rate=growth_rate,
                drop_rate=drop_rate,
                bottleneck=bottleneck,
                strategy=strategy,
                policy=self.policy,
            )
            self.features.add_module(f"denseblock{i + 1}", block)
            block._effdense_where = f"features.denseblock{i + 1}"  # (named in warnings: strategies.block_name)
            num_features = block.num_output_features
            if i != len(block_config) - 1:
                out_features = int(math.floor(num_features * compression))
                if out_features < 1:
                    raise ValueError(f"compression={compression} leaves no channels after dense block {i + 1}")
                self.features.add_module(f"transition{i + 1}", _Transition(num_features, out_features))
                num_features = out_features

        self.features.add_module("norm5", nn.BatchNorm2d(num_features))
        self.classifier = nn.Linear(num_features, num_classes)
        self.num_features = num_features

        # torchvision's initialisation
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)

    # ----------------------------------------------------------------------------------------------
    @property
    def dense_blocks(self) -> list[_DenseBlock]:
        return [m for m in self.features if isinstance(m, _DenseBlock)]

    @property
    def strategy(self) -> str:
        """How the dense blocks run. Assigning it is :meth:`set_strategy` (every block follows)."""
        return self._strategy

    @strategy.setter
    def strategy(self, strategy: str) -> None:
        self.set_strategy(strategy)

    @property
    def policy(self) -> Policy:
        """The :class:`effdense.Policy` of the blocks. Assigning it gives it to the model and every dense
        block, and leaves the blocks' strategies as they are (a block given a strategy of its own keeps it,
        as assigning :attr:`strategy` keeps the blocks' policies)."""
        return self._policy

    @policy.setter
    def policy(self, policy: Policy) -> None:
        self._policy = _check_policy(policy)
        for block in self._every_dense_block():
            block.policy = policy

    def _every_dense_block(self) -> list[_DenseBlock]:
        """Every dense block the model holds, at any depth: :attr:`dense_blocks` and any a subclass or a
        user's surgery put elsewhere (``self.aux``, a block wrapped in an ``nn.Sequential``), which
        :meth:`set_strategy` and :attr:`policy` missed (an ablation silently ran a mixed model)."""
        return [m for m in self.modules() if isinstance(m, _DenseBlock)]

    def set_strategy(self, strategy: str, policy: Policy | None = None) -> "DenseNet":
        """Switch how dense blocks run, on a live model (parameters are untouched). Returns ``self``.

        Args:
            strategy: ``"auto"`` or one of :data:`effdense.STRATEGIES`, for every dense block.
            policy: new :class:`effdense.Policy` for the model and every dense block; ``None`` keeps each
                block's current one (the model's, or one a block was given of its own).
        """
        strategies.check_strategy(strategy)
        if policy is not None:
            _check_policy(policy)
        self._strategy = strategy
        if policy is not None:
            self._policy = policy
        for block in self._every_dense_block():
            block.strategy = strategy
            if policy is not None:
                block.policy = policy
        return self

    def set_sync_bn(self, enabled: bool = True, process_group: Any = None) -> "DenseNet":
        """Batch statistics all-reduced across the ranks of ``process_group`` (SyncBatchNorm semantics).

        Every ``nn.BatchNorm2d`` becomes an ``nn.SyncBatchNorm`` (same names and state-dict keys), and the
        ``shared``/``fused`` strategies all-reduce their cached per-channel statistics. Call it after
        ``torch.distributed.init_process_group`` and before wrapping the model in DDP. Returns ``self``.
        (PyTorch's ``nn.SyncBatchNorm.convert_sync_batchnorm(model)`` has the same effect: every strategy
        follows its modules.)

        Args:
            enabled: turn synchronisation on or off. Off makes every synchronised BatchNorm of the model
                an ``nn.BatchNorm2d`` again, holding the same parameter and buffer tensors.
            process_group: the group to reduce over (a ``torch.distributed.ProcessGroup``, e.g. from
                ``torch.distributed.new_group``); ``None`` means the default (world) group. Only with
                ``enabled=True``: there is nothing to reduce over when synchronisation is off.
        """
        if not isinstance(enabled, bool):
            raise TypeError(f"set_sync_bn: enabled must be True or False, got {enabled!r}")
        if process_group is not None:
            if not enabled:
                raise ValueError(
                    "set_sync_bn: a process_group was given with enabled=False; synchronisation off reduces "
                    "over no group (call set_sync_bn(False) alone)"
                )
            _check_process_group(process_group)
        if enabled:
            converted = nn.SyncBatchNorm.convert_sync_batchnorm(self.features, process_group)
            if converted is not self.features:  # pragma: no cover - only when features itself is a BN
                self.features = converted
        else:
            _local_batchnorms(self.features)
        for block in self.dense_blocks:
            block.sync_bn = bool(enabled)
            block.sync_group = process_group if enabled else None
        return self

    def min_input_size(self) -> int:
        """Smallest square input side for which every stage keeps at least one pixel (1 when the stem's
        modules were replaced by ones whose output size is not known here)."""
        size = 1
        while self._final_spatial(size) < 1:
            size += 1
        return size

    def _final_spatial(self, size: int, dim: int = 0) -> int:
        """Side ``dim`` (0: height, 1: width) of the last dense block's input for an input side ``size``,
        computed from the live stem modules (a user may replace ``conv0`` or ``pool0``, as with torchvision's
        model); ``size`` itself where a stem module's output size is not known here (its own error, if any,
        is then PyTorch's)."""
        stem = self.features._modules
        for name in ("conv0", "pool0"):
            m = stem.get(name)
            if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
                size = _pooled_size(m, size, dim)
            elif m is not None and not isinstance(m, nn.Identity):
                return size
        for _ in range(len(self.block_config) - 1):
            size //= 2  # transition pools
        return size

    def _check_input(self, x: Any) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor input, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"expected 4-D input (N, C, H, W), got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"expected a floating-point input, got dtype {x.dtype}; convert with x.float()")
        conv0 = self.features._modules.get("conv0")
        channels = conv0.in_channels if isinstance(conv0, nn.Conv2d) else None  # the live stem's, not the constructor's
        if channels is not None and x.shape[1] != channels:
            raise ValueError(
                f"expected {channels} input channels (N, {channels}, H, W), got {x.shape[1]} in shape {tuple(x.shape)}"
            )
        # (the sizes as they are: int() of a symbolic size under torch.export specialised it to the example's, and an
        # export with a dynamic height or width failed with "your code specialized it to be a constant")
        h, w = x.shape[2], x.shape[3]
        if self._final_spatial(h, 0) < 1 or self._final_spatial(w, 1) < 1:
            raise ValueError(
                f"input spatial size {h}x{w} is too small for this model: it needs at least "
                f"{self.min_input_size()}x{self.min_input_size()}"
            )

    def __prepare_scriptable__(self) -> "DenseNet":
        # torch.jit.script calls this first: fail with the way out instead of a TorchScript parse error
        raise RuntimeError(
            "effdense.DenseNet cannot be compiled by torch.jit.script: its dense blocks dispatch to Python "
            f"strategies (strategy={self.strategy!r}). Use torch.compile, torch.jit.trace with strategy 'naive' "
            "(or 'checkpoint' under torch.no_grad()), or load model.state_dict() into torchvision.models.DenseNet for TorchScript"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (isinstance(x, torch.fx.Proxy) or torch.jit.is_tracing()):  # traces record ops, not these checks
            self._check_input(x)
        features = strategies.run_features(self.strategy, self, x)
        # in place (as torchvision) on norm5's fresh output; without a BatchNorm there (norm5 replaced or
        # removed), features may be the last block's shared buffer, which shared/fused keep for backward
        fresh = isinstance(self.features._modules.get("norm5"), nn.modules.batchnorm._BatchNorm)
        out = F.relu(features, inplace=fresh)
        out = F.adaptive_avg_pool2d(out, (1, 1))
        out = torch.flatten(out, 1)
        return self.classifier(out)


# ------------------------------------------------------------------------------------------------
# Configurations: the one table every builder reads.

IMAGENET_CONFIGS: dict[str, dict[str, Any]] = {
    "densenet121": dict(growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64),
    "densenet161": dict(growth_rate=48, block_config=(6, 12, 36, 24), num_init_features=96),
    "densenet169": dict(growth_rate=32, block_config=(6, 12, 32, 32), num_init_features=64),
    "densenet201": dict(growth_rate=32, block_config=(6, 12, 48, 32), num_init_features=64),
    "densenet264": dict(growth_rate=32, block_config=(6, 12, 64, 48), num_init_features=64),
}

CIFAR_PRESETS: dict[str, dict[str, Any]] = {
    "densenet_40": dict(depth=40, growth_rate=12, bottleneck=False, compression=1.0),
    "densenet_bc_100": dict(depth=100, growth_rate=12),
    "densenet_bc_250": dict(depth=250, growth_rate=24),
    "densenet_bc_190": dict(depth=190, growth_rate=40),
}

_LEGACY_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)


def _upgrade_legacy_keys(state_dict: Mapping[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    """torchvision's pre-0.3 checkpoints name ``norm1`` as ``norm.1``; rename them."""
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, value in state_dict.items():
        m = _LEGACY_KEY.match(key)
        out[m.group(1) + m.group(2) if m else key] = value
    return out


# Wrappers a training checkpoint puts around the state dict: ``{"state_dict": ...}`` (Lightning and many
# scripts), ``{"model": ...}`` (``effdense train``), ``{"model_state_dict": ...}`` (PyTorch's tutorial on
# saving a checkpoint).
_CHECKPOINT_KEYS = ("state_dict", "model", "model_state_dict")


def _unwrap_checkpoint(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    for key in _CHECKPOINT_KEYS:
        if key in obj and isinstance(obj[key], Mapping):
            return obj[key]
    return obj


# What wrappers put before every key of the wrapped model's state dict: ``nn.DataParallel`` and
# ``DistributedDataParallel`` (``module.``), ``torch.compile``'s OptimizedModule (``_orig_mod.``).
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _strip_wrapper_prefix(state_dict: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """A state dict saved from a wrapped model (``ddp.state_dict()``, ``torch.compile(model).state_dict()``,
    or both nested) has every key prefixed ``module.`` or ``_orig_mod.``: strip them, outermost first, as
    timm's checkpoint loader does. Only a prefix that every key has, so a model's own submodule named
    ``module`` is left alone."""
    while state_dict:
        prefix = next(
            (p for p in _WRAPPER_PREFIXES if all(isinstance(k, str) and k.startswith(p) for k in state_dict)), None
        )
        if prefix is None:
            break
        state_dict = OrderedDict((k[len(prefix) :], v) for k, v in state_dict.items())
    return state_dict


def _is_weights_enum(weights: Any) -> bool:
    """A torchvision ``WeightsEnum`` member, or anything with its surface (``meta``, ``get_state_dict``)."""
    return hasattr(weights, "get_state_dict") and hasattr(weights, "meta")


def _weights_enum_class(arch: str) -> Any:
    """torchvision's weights enum for ``arch`` (``DenseNet121_Weights``), or None (no torchvision, or
    torchvision has no weights for it, as for densenet264)."""
    try:
        from torchvision import models
    except ImportError:  # pragma: no cover - torchvision is optional
        return None
    return getattr(models, f"DenseNet{arch[len('densenet'):]}_Weights", None)


def _verify_weights_enum(arch: str, weights: Any) -> Any:
    """What torchvision's ``WeightsEnum.verify`` does, before anything is downloaded: a member name
    (``"DEFAULT"``, ``"IMAGENET1K_V1"``, ``"DenseNet121_Weights.IMAGENET1K_V1"``) that is not an existing
    file becomes the member; a torchvision ``WeightsEnum`` of another model is a ``TypeError``."""
    if isinstance(weights, (str, os.PathLike)) and not os.path.exists(os.fspath(weights)):
        cls = _weights_enum_class(arch)
        if cls is None:  # no member names to try: the file does not exist
            try:
                import torchvision  # noqa: F401
            except ImportError:
                has_enum = arch in ("densenet121", "densenet161", "densenet169", "densenet201")  # (torchvision's)
                why = (f"torchvision, which has {arch}'s weights enum, is not installed (pip install torchvision); the "
                       "enums give names" if has_enum else f"{arch} has no torchvision weights enum, which gives names")
            else:
                why = f"{arch} has no torchvision weights enum, which gives names"
            raise FileNotFoundError(
                f"weights file {os.fspath(weights)!r} does not exist ({why} such as 'DEFAULT' their meaning: a string "
                "is a file path here)"
            )
        name = os.fspath(weights).replace(cls.__name__ + ".", "")
        if name in cls.__members__:
            return cls[name]
        raise FileNotFoundError(
            f"weights file {os.fspath(weights)!r} does not exist, and it is not a member of {cls.__name__} "
            f"either ({', '.join(cls.__members__)})"
        )
    enum_base = getattr(sys.modules.get("torchvision.models"), "WeightsEnum", None)
    if enum_base is not None and isinstance(weights, enum_base):
        cls = _weights_enum_class(arch)
        if cls is None:
            raise TypeError(f"torchvision has no weights for {arch}; got {weights!r}")
        if not isinstance(weights, cls):
            raise TypeError(f"{arch}() expects weights from {cls.__name__}, got {weights!r}")
    return weights


def _resolve_weights(weights: Any, progress: bool) -> Mapping[str, torch.Tensor] | None:
    if weights is None:
        return None
    if isinstance(weights, Mapping):
        return _unwrap_checkpoint(weights)
    if isinstance(weights, (str, os.PathLike)):
        path = os.fspath(weights)
        if not os.path.isfile(path):
            problem = "is not a file" if os.path.exists(path) else "does not exist"
            raise FileNotFoundError(
                f"weights file {path!r} {problem} (a string is a file path, or, for densenet121/161/169/201, "
                "a member name of torchvision's weights enum such as 'DEFAULT')"
            )
        with open(path, "rb") as f:
            head = f.read(4)
        if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # torch.save's zip archive, or a pickle
            raise ValueError(
                f"weights file {path!r} is empty" if not head else
                f"weights file {path!r} is not in a format torch.save writes today (a zip archive, or a pickle of "
                f"protocol 2 or later; it begins with {head!r})"
            )
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            first_line = (str(exc).strip().splitlines() or [""])[0]
            raise ValueError(
                f"weights file {path!r} could not be read as a state dict by "
                f"torch.load(weights_only=True): {type(exc).__name__}: {first_line} "
                "(a whole pickled model is not loaded: save model.state_dict() instead)"
            ) from exc
        if isinstance(obj, Mapping):
            obj = _unwrap_checkpoint(obj)
        if not isinstance(obj, Mapping):
            raise TypeError(f"weights file {path!r} holds a {type(obj).__name__}, expected a state dict")
        return obj
    if _is_weights_enum(weights):  # a torchvision WeightsEnum member
        try:
            return weights.get_state_dict(progress=progress, check_hash=True)
        except (urllib.error.URLError, ConnectionError, TimeoutError, http.client.HTTPException) as exc:
            # (no network: torchvision's bare URLError named neither the file nor the way out)
            url = getattr(weights, "url", "")
            where = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url)) if url else "torch's hub cache"
            raise OSError(
                f"{weights}: the weights file is not in torch's hub cache, and downloading it failed ({exc}); "
                f"without a network, copy the file from {url or 'torchvision'} to {where}, or pass a state dict "
                "or a file path as weights="
            ) from exc
    raise TypeError(
        "weights must be None, a torchvision WeightsEnum, a state dict or a file path, "
        f"got {type(weights).__name__}"
    )


def load_weights(model: DenseNet, weights: Any, progress: bool = True) -> DenseNet:
    """Load ``weights`` into ``model`` strictly: a torchvision ``WeightsEnum``, a state dict or a file path
    (a checkpoint dict holding the state dict under ``"state_dict"``, ``"model_state_dict"`` or ``"model"``
    is unwrapped; the ``module.`` prefix of a state dict saved from an ``nn.DataParallel``/
    ``DistributedDataParallel``-wrapped model and the ``_orig_mod.`` prefix of one saved from a
    ``torch.compile``-d model are stripped when every key has them, as is the attribute name of a module that
    held the model (a Lightning module's ``model.``) when the keys left are exactly the model's; legacy key
    names are accepted)."""
    state_dict = _resolve_weights(weights, progress)
    if state_dict is not None:
        state_dict = _strip_owner_prefix(model, _upgrade_legacy_keys(_strip_wrapper_prefix(state_dict)))
        try:
            model.load_state_dict(state_dict, strict=True)
        except RuntimeError as exc:  # PyTorch's message lists every key: tens of KB for a checkpoint dict
            raise RuntimeError(_misfit_message(model, state_dict, exc)) from None
    return model


def _strip_owner_prefix(model: nn.Module, state_dict: "OrderedDict[str, Any]") -> "OrderedDict[str, Any]":
    """A state dict of a module that held the model as an attribute (a Lightning module's ``model.``) has
    every key prefixed with that attribute's name: stripped when the keys left are exactly the model's."""
    own = model.state_dict().keys()
    if set(state_dict) == set(own) or not state_dict:
        return state_dict
    heads = {k.split(".", 1)[0] if isinstance(k, str) and "." in k else None for k in state_dict}
    if len(heads) == 1 and None not in heads:
        cut = len(next(iter(heads))) + 1
        stripped = OrderedDict((k[cut:], v) for k, v in state_dict.items())
        if set(stripped) == set(own):
            return stripped
    return state_dict


def _misfit_message(model: nn.Module, state_dict: Mapping[str, Any], exc: RuntimeError, show: int = 4) -> str:
    """A short account of why ``state_dict`` does not load into ``model``: how many keys are missing and
    unexpected with the first few of each, PyTorch's size mismatches, and a hint for a checkpoint dict."""
    own_state = model.state_dict()
    own = list(own_state.keys())
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]

    def some(keys: list) -> str:
        more = f", ... ({len(keys) - show} more)" if len(keys) > show else ""
        return ", ".join(repr(k) for k in keys[:show]) + more

    parts = []
    if missing:
        parts.append(f"Missing key(s) ({len(missing)} of the model's {len(own)}): {some(missing)}")
    if unexpected:
        parts.append(f"Unexpected key(s) ({len(unexpected)}): {some(unexpected)}")
    sizes = [line.strip().rstrip(".") for line in str(exc).splitlines() if line.strip().startswith("size mismatch")]
    if sizes:
        more = f"; ... ({len(sizes) - 2} more)" if len(sizes) > 2 else ""
        parts.append("; ".join(sizes[:2]) + more)
    text = f"weights do not fit this {type(model).__name__}: " + ("; ".join(parts) or str(exc).strip().splitlines()[0])
    head, own_head = state_dict.get("classifier.weight"), own_state.get("classifier.weight")
    if (
        sizes and all(line.startswith("size mismatch for classifier.") for line in sizes)
        and isinstance(head, torch.Tensor) and isinstance(own_head, torch.Tensor) and head.dim() == own_head.dim() == 2
        and head.shape[1] == own_head.shape[1] and head.shape[0] != own_head.shape[0]
    ):  # (only the class count differs: before, said also of another architecture's weights)  # fmt: skip
        text += (f". The weights are for {head.shape[0]} classes: build the model with num_classes={head.shape[0]}, "
                 "load them, then replace model.classifier")
    not_tensors = [k for k in unexpected if not isinstance(state_dict[k], torch.Tensor)]
    if not_tensors:
        text += (
            f". It holds entries that are not tensors ({some(not_tensors)}): a training checkpoint? Pass its "
            "entry that holds the model's state dict (state_dict, model and model_state_dict are found by themselves)"
        )
    else:
        owned = set(own)
        prefixes = {k.split(".", 1)[0] + "." for k in unexpected if isinstance(k, str) and k.split(".", 1)[-1] in owned}
        if prefixes and len(prefixes) <= 3:
            text += (f". Its keys carry a prefix ({', '.join(map(repr, sorted(prefixes)))}) before the model's own, as "
                     "a prefix of another wrapper or owner module would: strip it, or load the module it was saved from")
    return text


def _densenet(arch: str, weights: Any, progress: bool, **kwargs: Any) -> DenseNet:
    config = dict(IMAGENET_CONFIGS[arch])
    overlap = (set(config) | {"bottleneck", "compression"}) & set(kwargs)  # (both make another network)
    if overlap:
        raise TypeError(f"{arch}() fixes {sorted(overlap)}; build effdense.DenseNet directly to change them")
    if "pretrained" in kwargs:  # torchvision's deprecated flag, handled as torchvision does
        pretrained = kwargs.pop("pretrained")
        if weights is not None:
            raise ValueError(
                f"{arch}() got both weights= and the deprecated pretrained={pretrained!r}; pass weights= only"
            )
        warnings.warn(
            f"{arch}(pretrained=...) is deprecated, as in torchvision: use weights='DEFAULT' or weights=None",
            UserWarning,
            stacklevel=4,
        )
        if pretrained:
            cls = _weights_enum_class(arch)
            if cls is None:
                raise ValueError(f"pretrained=True: torchvision has no weights for {arch}")
            weights = cls.DEFAULT
    weights = _verify_weights_enum(arch, weights)
    if _is_weights_enum(weights):
        # as torchvision: the weights fix the number of classes, checked before anything is downloaded
        categories = len(weights.meta.get("categories", [None] * 1000))
        if kwargs.setdefault("num_classes", categories) != categories:
            raise ValueError(
                f"{weights!r} has {categories} classes, got num_classes={kwargs['num_classes']!r}; "
                "leave num_classes out, or load the weights and replace model.classifier"
            )
    return load_weights(DenseNet(**config, **kwargs), weights, progress)


def _legacy_interface(builder):
    """torchvision's legacy calling conventions for a model builder, each with its deprecation warning:
    ``weights`` (then ``progress``) given positionally, and a bool for ``weights`` (the old positional
    ``pretrained``: ``densenet121(True)``), which means ``pretrained=`` that bool."""
    arch = builder.__name__

    @functools.wraps(builder)
    def wrapper(*args: Any, **kwargs: Any) -> DenseNet:
        if args:
            if len(args) > 2:
                raise TypeError(f"{arch}() takes at most 2 positional arguments (weights, progress), got {len(args)}")
            for name, value in zip(("weights", "progress"), args):
                if name in kwargs:
                    raise TypeError(f"{arch}() got multiple values for argument {name!r}")
                kwargs[name] = value
            warnings.warn(
                f"{arch}(): passing {' and '.join(('weights', 'progress')[: len(args)])} positionally is deprecated, "
                "as in torchvision: use keyword arguments",
                UserWarning,
                stacklevel=2,
            )
        if isinstance(kwargs.get("weights"), bool):  # torchvision reads a bool here as the legacy pretrained flag
            if "pretrained" in kwargs:
                raise TypeError(f"{arch}() got a bool weights={kwargs['weights']!r} and pretrained=; pass weights= only")
            kwargs["pretrained"] = kwargs.pop("weights")
        return builder(**kwargs)

    return wrapper


@_legacy_interface
def densenet121(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> DenseNet:
    """DenseNet-121 (k=32, blocks 6-12-24-16). ``kwargs`` go to :class:`DenseNet` (``strategy=`` among them).

    ``weights``: a torchvision ``DenseNet121_Weights`` member or its name (``"DEFAULT"``), a state dict or
    a file path (see :func:`load_weights`: training checkpoints are unwrapped, DataParallel/DDP's
    ``module.`` and torch.compile's ``_orig_mod.`` prefixes stripped), or None."""
    return _densenet("densenet121", weights, progress, **kwargs)


@_legacy_interface
def densenet161(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> DenseNet:
    """DenseNet-161 (k=48, blocks 6-12-36-24, 96 stem features)."""
    return _densenet("densenet161", weights, progress, **kwargs)


@_legacy_interface
def densenet169(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> DenseNet:
    """DenseNet-169 (k=32, blocks 6-12-32-32)."""
    return _densenet("densenet169", weights, progress, **kwargs)


@_legacy_interface
def densenet201(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> DenseNet:
    """DenseNet-201 (k=32, blocks 6-12-48-32)."""
    return _densenet("densenet201", weights, progress, **kwargs)


@_legacy_interface
def densenet264(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> DenseNet:
    """DenseNet-264 (k=32, blocks 6-12-64-48); torchvision has no weights for it."""
    return _densenet("densenet264", weights, progress, **kwargs)


def _check_depth_type(depth: Any) -> int:
    """``depth`` as a Python int (an integer scalar such as numpy.int64 or a 0-d integer tensor too, as the
    other sizes take); a TypeError for anything else, a bool and a float such as 40.0 included."""
    try:
        if not isinstance(depth, bool):
            return operator.index(depth)
    except TypeError:
        pass
    raise TypeError(f"depth must be an integer, got {type(depth).__name__} {depth!r}")


def cifar_layers_per_block(depth: int, bottleneck: bool) -> int:
    """Layers per dense block for a 3-block CIFAR DenseNet of ``depth`` (Huang et al.'s rule)."""
    bottleneck = _check_flag("bottleneck", bottleneck)
    per_layer = 2 if bottleneck else 1  # convolutions per dense layer
    depth = _check_depth_type(depth)
    if depth < 4 or (depth - 4) % (3 * per_layer):
        kind = "DenseNet-BC (bottleneck=True)" if bottleneck else "DenseNet (bottleneck=False)"
        raise ValueError(
            f"depth={depth!r} is not a valid {kind} depth: it must be 4 + {3 * per_layer}*n "
            f"for a positive n (e.g. {4 + 3 * per_layer * 16})"
        )
    n = (depth - 4) // (3 * per_layer)
    if n < 1:
        raise ValueError(f"depth={depth} gives no layers per block; use at least {4 + 3 * per_layer}")
    return n


def densenet_cifar(
    depth: int,
    growth_rate: int,
    *,
    bottleneck: bool = True,
    compression: float | None = None,
    num_classes: int = 10,
    drop_rate: float = 0.0,
    strategy: str = "auto",
    weights: Any = None,
    **kwargs: Any,
) -> DenseNet:
    """A 3-block CIFAR DenseNet (32x32 inputs) of the given depth, as in Huang et al. (2017).

    Args:
        depth: total depth; ``4 + 6n`` with a bottleneck (DenseNet-BC), ``4 + 3n`` without.
        growth_rate: channels each layer adds (``k``).
        bottleneck: use the BC bottleneck layer.
        compression: transition compression in ``(0, 1]``; default 0.5 with a bottleneck (DenseNet-BC), 1.0
            without (the paper's DenseNet, which has none; its DenseNet-C is ``bottleneck=False,
            compression=0.5``).
        num_classes: number of classes.
        drop_rate: dropout rate after each layer.
        strategy: block strategy (see :class:`DenseNet`).
        weights: a state dict or a file path to load (see :func:`load_weights`: training checkpoints are
            unwrapped, DataParallel/DDP's ``module.`` and
            torch.compile's ``_orig_mod.`` prefixes stripped), or None.
        **kwargs: further :class:`DenseNet` keyword arguments (``policy``, ``in_channels``).
    """
    fixed = sorted({"block_config", "small_inputs"} & set(kwargs))
    if fixed:  # (before: "DenseNet() got multiple values for keyword argument 'block_config'")
        raise TypeError(f"a CIFAR DenseNet's depth sets its block_config, and its stem is small_inputs=True; got "
                        f"{', '.join(fixed)}: build effdense.DenseNet directly to change them")
    n = cifar_layers_per_block(depth, bottleneck)  # (which checks bottleneck is a bool)
    growth_rate = _check_positive_int("growth_rate", growth_rate)
    if compression is None:
        compression = 0.5 if bottleneck else 1.0
    num_init_features = 2 * growth_rate if bottleneck else 16
    model = DenseNet(
        growth_rate=growth_rate,
        block_config=(n, n, n),
        num_init_features=kwargs.pop("num_init_features", num_init_features),
        bn_size=kwargs.pop("bn_size", 4),
        drop_rate=drop_rate,
        num_classes=num_classes,
        compression=compression,
        bottleneck=bottleneck,
        small_inputs=True,
        strategy=strategy,
        **kwargs,
    )
    if _is_weights_enum(weights):
        raise TypeError(f"torchvision has no weights for CIFAR DenseNets; got {weights!r}")
    return load_weights(model, weights)


def _cifar_name(depth: Any, bottleneck: Any) -> str:
    return f"densenet_bc_{depth}" if bottleneck else f"densenet_{depth}"


def _check_name_fixes(name: str, fixed: Mapping[str, Any], kwargs: dict[str, Any]) -> None:
    """A CIFAR model name fixes ``depth`` and ``bottleneck``: a keyword that contradicts it is an error
    (it would silently build another model); one equal to it is dropped from ``kwargs``."""
    if "bottleneck" in kwargs:  # (a string such as 'yes' named no model: the switch's own error)
        kwargs["bottleneck"] = _check_flag("bottleneck", kwargs["bottleneck"])
    if "depth" in kwargs:  # (a string or a float named a model that is no model, or the one asked for)
        kwargs["depth"] = _check_depth_type(kwargs["depth"])
    for key, value in fixed.items():
        if key in kwargs and kwargs[key] != value:
            wanted = {**fixed, key: kwargs[key]}
            fixes = " and ".join(f"{k}={v!r}" for k, v in fixed.items())
            try:  # the name that builds what was asked for, if there is one
                cifar_layers_per_block(wanted["depth"], wanted["bottleneck"])
            except ValueError as exc:
                raise ValueError(f"{name} fixes {fixes}; got {key}={kwargs[key]!r}, and there is no such model: {exc}") from None
            raise ValueError(
                f"{name} fixes {fixes}; got {key}={kwargs[key]!r}: ask for the model by its own name "
                f"({_cifar_name(wanted['depth'], wanted['bottleneck'])!r}), or build it with "
                "effdense.densenet_cifar(depth, growth_rate, bottleneck=...)"
            )
        kwargs.pop(key, None)


def _cifar_preset(name: str, **kwargs: Any) -> DenseNet:
    """A CIFAR preset: its name fixes ``depth`` and ``bottleneck``; ``growth_rate`` and ``compression``
    are defaults that ``kwargs`` may change (as for any ``densenet_bc_<depth>``)."""
    preset = dict(CIFAR_PRESETS[name])
    fixed = {"depth": preset.pop("depth"), "bottleneck": preset.pop("bottleneck", True)}
    _check_name_fixes(name, fixed, kwargs)
    preset.update(kwargs)
    return densenet_cifar(fixed["depth"], preset.pop("growth_rate"), bottleneck=fixed["bottleneck"], **preset)


def densenet_40(**kwargs: Any) -> DenseNet:
    """DenseNet (L=40, k=12), no bottleneck, no compression."""
    return _cifar_preset("densenet_40", **kwargs)


def densenet_bc_100(**kwargs: Any) -> DenseNet:
    """DenseNet-BC (L=100, k=12)."""
    return _cifar_preset("densenet_bc_100", **kwargs)


def densenet_bc_250(**kwargs: Any) -> DenseNet:
    """DenseNet-BC (L=250, k=24)."""
    return _cifar_preset("densenet_bc_250", **kwargs)


def densenet_bc_190(**kwargs: Any) -> DenseNet:
    """DenseNet-BC (L=190, k=40)."""
    return _cifar_preset("densenet_bc_190", **kwargs)


MODELS = {
    "densenet121": densenet121,
    "densenet161": densenet161,
    "densenet169": densenet169,
    "densenet201": densenet201,
    "densenet264": densenet264,
    "densenet_40": densenet_40,
    "densenet_bc_100": densenet_bc_100,
    "densenet_bc_250": densenet_bc_250,
    "densenet_bc_190": densenet_bc_190,
}


def get_model(name: str, **kwargs: Any) -> DenseNet:
    """Build a model by name (see :data:`MODELS`); ``densenet_bc_<depth>`` / ``densenet_<depth>`` also work
    for any depth the paper's rule allows (k=12). Names are case-insensitive, as torchvision's.

    A CIFAR name fixes the depth and whether layers have a bottleneck: ``depth=`` or ``bottleneck=``
    other than the name's is a ``ValueError``. ``growth_rate=`` (default: the preset's ``k``, else 12) and
    ``compression=`` may be changed; other ``kwargs`` go to the builder (``num_classes``, ``strategy``, ...)."""
    if not isinstance(name, str):
        raise TypeError(f"model name must be a str, got {type(name).__name__}")
    name = name.lower()
    if name in MODELS:
        return MODELS[name](**kwargs)
    m = re.fullmatch(r"densenet_(bc_)?([0-9]+)", name)  # (ASCII digits: \d took "densenet_bc_１００")
    if m:
        kwargs.setdefault("growth_rate", 12)
        depth, bc = int(m.group(2)), m.group(1) is not None
        _check_name_fixes(name, {"depth": depth, "bottleneck": bc}, kwargs)
        return densenet_cifar(depth, kwargs.pop("growth_rate"), bottleneck=bc, **kwargs)
    raise ValueError(f"unknown model {name!r}; expected one of {', '.join(sorted(MODELS))}, densenet_bc_<depth> or densenet_<depth>")


# what to do with a model that holds no effdense dense block (set_strategy, estimate_step's strategy=)
_OWN_MODEL_HINT = (
    "in a model of one's own, effdense.DenseBlock and effdense.Transition take the places of torchvision's "
    "_DenseBlock and _Transition (the same arguments and state-dict keys: load_state_dict the torchvision ones' "
    "weights into them)"
)
NO_BLOCKS_HINT = "a torchvision DenseNet is converted with effdense.convert(model, strategy=...); " + _OWN_MODEL_HINT


def set_strategy(module: nn.Module, strategy: str, policy: Policy | None = None) -> nn.Module:
    """Set how every dense block in ``module`` runs: an effdense :class:`DenseNet` (as its
    :meth:`DenseNet.set_strategy`, and any block it holds elsewhere), or any model of one's own built with
    :class:`effdense.DenseBlock` (a Tiramisu, a backbone with heads). Returns ``module``.

    Args:
        module: an ``nn.Module`` holding dense blocks (at any depth).
        strategy: ``"auto"`` or one of :data:`effdense.STRATEGIES`.
        policy: new :class:`effdense.Policy` for every block; ``None`` keeps each block's own.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"set_strategy: expected an nn.Module holding dense blocks, got {type(module).__name__}")
    strategies.check_strategy(strategy)
    if policy is not None:
        _check_policy(policy)
    named = list(module.named_modules())
    blocks = [(name, m) for name, m in named if isinstance(m, _DenseBlock)]
    if not blocks:
        raise ValueError(f"set_strategy: {type(module).__name__} holds no effdense dense block (effdense.DenseBlock); {NO_BLOCKS_HINT}")
    for _, m in named:
        if isinstance(m, DenseNet):  # (the module itself or one inside: its own strategy and policy follow too)
            m.set_strategy(strategy, policy)
    for name, block in blocks:  # (all of them, in any module, each given the name its warnings use)
        block._effdense_where = name or type(block).__name__  # (the name its warnings give: strategies.block_name)
        block.strategy = strategy
        if policy is not None:
            block.policy = policy
    return module


def _check_process_group(group: Any) -> None:
    """Refuse a ``process_group`` that is not one (a string, a rank list), here rather than at the first
    training step's all-reduce."""
    import torch.distributed as dist

    if dist.is_available() and not isinstance(group, dist.ProcessGroup):
        raise TypeError(
            f"set_sync_bn: process_group must be a torch.distributed.ProcessGroup (e.g. from "
            f"torch.distributed.new_group) or None for the default group, got {type(group).__name__}"
        )


def _local_batchnorms(module: nn.Module) -> None:
    """Replace, in place below ``module``, every synchronised BatchNorm (one with a ``process_group``:
    ``nn.SyncBatchNorm``, ``effdense.train.CPUSyncBatchNorm``) by an ``nn.BatchNorm2d`` that holds the same
    parameters and buffers (so an optimizer's references stay valid) and mode."""
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and hasattr(child, "process_group"):
            local = nn.BatchNorm2d(
                child.num_features, child.eps, child.momentum, affine=False, track_running_stats=False, device="meta"
            )
            local.affine, local.track_running_stats = child.affine, child.track_running_stats
            for key in ("weight", "bias"):
                setattr(local, key, getattr(child, key))
            for key in ("running_mean", "running_var", "num_batches_tracked"):
                local.register_buffer(key, getattr(child, key))
            local.train(child.training)
            setattr(module, name, local)
        else:
            _local_batchnorms(child)


def _source_sync_bn(model: nn.Module, features: nn.Sequential) -> tuple[bool, Any]:
    """Whether ``convert()``'s source has SyncBatchNorm semantics, and over which process group: an
    effdense DenseNet's :meth:`DenseNet.set_sync_bn` state, or a DenseNet (torchvision's or effdense's) whose
    BatchNorms are all ``nn.SyncBatchNorm`` (``nn.SyncBatchNorm.convert_sync_batchnorm``) or all
    ``effdense.train.CPUSyncBatchNorm`` over one group."""
    if isinstance(model, DenseNet) and model.dense_blocks[0].sync_bn:
        block = model.dense_blocks[0]
        return True, block.sync_group
    # (an effdense source too: nn.SyncBatchNorm.convert_sync_batchnorm(model), PyTorch's recipe, has the effect of
    # set_sync_bn; so has effdense.train.CPUSyncBatchNorm, its CPU stand-in, a module with a process_group)
    norms = [m for m in features.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    synced = [m for m in norms if isinstance(m, nn.SyncBatchNorm) or hasattr(type(m), "process_group")]
    if not synced:
        return False, None
    groups = {id(m.process_group) for m in synced}
    if len(synced) != len(norms) or len(groups) > 1:
        raise ValueError(
            f"convert() cannot carry the source's SyncBatchNorm layers: {len(synced)} of its {len(norms)} "
            f"BatchNorms are nn.SyncBatchNorm, over {len(groups)} process group(s), but an effdense DenseNet "
            "synchronises all of its BatchNorms over one group or none (DenseNet.set_sync_bn); convert the "
            "model without nn.SyncBatchNorm and call set_sync_bn on the result"
        )
    return True, synced[0].process_group


def _source_stem(features: nn.Sequential) -> list[str]:
    """The names of a ``convert()`` source's stem modules: ``conv0`` (always) and any of ``norm0``, ``relu0``,
    ``pool0``, in that order, before ``denseblock1``; anything else there is refused."""
    names = list(features._modules)
    first_block = names.index("denseblock1") if "denseblock1" in names else len(names)
    stem = names[:first_block]
    if not stem or stem[0] != "conv0" or stem != [n for n in strategies.STEM if n in stem]:
        raise TypeError(
            f"convert() expects a torchvision DenseNet stem (features.conv0, then any of norm0, relu0, pool0 in "
            f"that order) before features.denseblock1, got {stem}"
        )
    if names[first_block:] != strategies.stage_names(sum(n.startswith("denseblock") for n in names)):
        raise TypeError(
            "convert() rebuilds a torchvision DenseNet's features (stem, denseblock1, transition1, ..., norm5), "
            f"but this model's hold {names[first_block:]} after the stem; convert a model without the added "
            "modules and add them to the converted model's features"
        )
    return stem


def _source_compression(features: nn.Sequential, stated: float | None = None) -> float:
    """A compression ``c`` for which ``floor(C_in * c)`` (the builder's rule) gives every transition's output
    channels: ``stated`` (an effdense source's own ``compression``) if it does, else the middle of the interval
    that all transitions allow (0.5 for torchvision's models). Transitions swapped for other widths may follow
    no single ``c``: the copy's transitions are then rebuilt with the source's widths (:func:`_rebuild_stages`),
    and ``c`` is ``stated`` or the first transition's. A source whose transition gives other channels than the
    next block reads (which cannot run) is refused, naming them."""
    children = list(features.named_children())
    widths = [(m.conv.in_channels, m.conv.out_channels) for name, m in children if name.startswith("transition")]
    if stated is not None and all(int(math.floor(cin * stated)) == out for cin, out in widths):
        return stated
    if all(out == cin // 2 for cin, out in widths):
        return 0.5
    low = max(out / cin for cin, out in widths)
    high = min((out + 1) / cin for cin, out in widths)
    c = min(1.0, (low + high) / 2)
    if low < high and all(int(math.floor(cin * c)) == out for cin, out in widths):
        return c
    for (name, m), following in zip(children, children[1:]):
        if name.startswith("transition") and following[0].startswith("denseblock"):
            reads = _block_shape(following[1])[1]
            if m.conv.out_channels != reads:
                raise ValueError(
                    f"convert() cannot rebuild the source: its {name} gives {m.conv.out_channels} channels where "
                    f"{following[0]} reads {reads} (the source itself cannot run)"
                )
    if stated is not None:
        return stated
    cin, out = widths[0]
    return min(1.0, (2 * out + 1) / (2 * cin))  # (the middle of the first transition's interval)


def _match_untracked_batchnorms(clone: nn.Module, source: nn.Module) -> None:
    """BatchNorms of ``source`` without running statistics (``track_running_stats=False``) become so in
    ``clone`` before its state dict is loaded (which then has no running-statistics entries for them)."""
    src = dict(source.named_modules())
    for name, module in clone.named_modules():
        other = src.get(name)
        if (
            isinstance(module, nn.modules.batchnorm._BatchNorm)
            and isinstance(other, nn.modules.batchnorm._BatchNorm)
            and other.running_mean is None
        ):
            module.track_running_stats = False
            for key in ("running_mean", "running_var", "num_batches_tracked"):
                module.register_buffer(key, None)


def _copy_swapped_leaves(clone: nn.Module, source: nn.Module) -> None:
    """Modules without children that a user swapped into ``source``'s blocks and transitions (an ``nn.SiLU`` for
    a ReLU, ``nn.MaxPool2d`` for the transition's pool, ``torchvision.ops.FrozenBatchNorm2d``, or a module given a
    ``forward`` of its own on the instance) replace the ones
    ``clone`` was built with, as copies: a state dict does not carry a module's class, and a parameter-free swap
    was silently lost (the copy computed other outputs). The strategies then run those stages as naive, with
    their warning. A container swapped in for such a module (``nn.Sequential(nn.BatchNorm2d(c), nn.Dropout2d(p))``
    for ``norm1``) is copied whole, its children with it."""
    src = dict(source.named_modules())
    for name, module in list(clone.features.named_modules(prefix="features")):
        other = src.get(name)
        if other is None or module._modules:
            continue
        if (
            not other._modules and type(other) is type(module) and not _own_methods(other)
            and _same_slots(other, module) and _same_settings(other, module)
        ):  # fmt: skip
            continue  # the same leaf (an instance's own forward, other tensors or other settings: copied)
        parent, _, child = name.rpartition(".")
        setattr(clone.get_submodule(parent), child, _copy_module(other, name))


def _same_slots(a: nn.Module, b: nn.Module) -> bool:
    """Whether two modules of one class hold the same parameters and buffers by name (None ones aside): an
    ``affine=False`` BatchNorm (no weight, no bias) or a convolution with a bias does not hold what the one
    a DenseNet builds does (before, convert() kept the built one and failed on the state dict, naming keys)."""

    def slots(m: nn.Module) -> tuple[set[str], set[str]]:
        d = m.__dict__
        return {k for k, v in d["_parameters"].items() if v is not None}, {k for k, v in d["_buffers"].items() if v is not None}

    return slots(a) == slots(b)


def _own_methods(m: nn.Module) -> bool:
    """Whether a module has functions set on the instance (``m.forward = ...``, or a helper such as a
    convolution's ``_conv_forward``, which the strategies take for a customisation too): before, only ``forward``
    was seen, and convert() dropped a patched ``_conv_forward`` with the module it kept."""
    return any(callable(v) and not isinstance(v, (type, nn.Module, torch.Tensor)) for v in m.__dict__.values())


def _same_settings(a: nn.Module, b: nn.Module) -> bool:
    """Whether two modules of one class have equal public attributes besides ``training`` (a pool's
    ``kernel_size``, ``padding`` and ``divisor_override``, a convolution's ``padding_mode``, a BatchNorm's
    ``track_running_stats``, ``momentum`` and ``eps``): before, convert() kept the module it built for a source's
    module of the same class with other settings, and computed other outputs (an ``AvgPool2d(3, 2, padding=1)``
    transition pool became ``AvgPool2d(2, 2)``; a BatchNorm with ``track_running_stats=False`` tracked them)."""

    def settings(m: nn.Module) -> dict[str, Any]:
        return {k: v for k, v in m.__dict__.items() if not k.startswith("_") and k != "training"}

    sa, sb = settings(a), settings(b)
    if sa.keys() != sb.keys():
        return False
    for key, x in sa.items():
        y = sb[key]
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if x is not y:
                return False
            continue
        try:
            if type(x) is not type(y) or not bool(x == y):
                return False
        except Exception:  # (a value whose == does not give one truth value)
            return False
    return True


# the module hooks that change what a call computes or sees (forward, forward pre-, backward hooks)
_HOOK_DICTS = (
    "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks",
)  # fmt: skip


def _copy_hooks(module: nn.Module, source: nn.Module) -> None:
    """Register ``source``'s forward, forward pre- and backward hooks on ``module`` (the same functions), where
    ``module`` was built rather than copied (a copied stem, head or swapped module has its own copies). Before,
    convert() dropped the hooks on every dense block, layer, transition and their modules (a forward hook that
    scaled an output changed the source's outputs and not the copy's) and kept the stem's and the head's."""
    d = source.__dict__
    if not any(d.get(k) for k in _HOOK_DICTS) or any(module.__dict__.get(k) for k in _HOOK_DICTS):
        return
    for k in _HOOK_DICTS:
        if k in d:
            setattr(module, k, type(d[k])(d[k]))  # (new dicts: the source's handles remove from the source's only)
    module._is_full_backward_hook = d.get("_is_full_backward_hook")


def _refuse_pruned(model: nn.Module) -> None:
    """``torch.nn.utils.prune`` replaces a module's ``weight`` with ``weight_orig`` and ``weight_mask`` and a
    forward pre-hook that multiplies them: a state dict a DenseNet does not take. Said so, with the way out
    (before: the state-dict difference, naming no pruning)."""
    from torch.nn.utils import prune

    pruned = [
        name or "model" for name, m in model.named_modules()
        if any(isinstance(h, prune.BasePruningMethod) for h in m._forward_pre_hooks.values())
    ]  # fmt: skip
    if pruned:
        raise TypeError(
            f"convert(): the model is pruned with torch.nn.utils.prune ({', '.join(pruned[:3])}"
            f"{', ...' if len(pruned) > 3 else ''}), whose modules hold weight_orig and weight_mask in place of "
            "weight; call torch.nn.utils.prune.remove(module, name) on each pruned module first (the pruned "
            "weights stay zero), convert, and prune the converted model again if it needs the masks"
        )


# the modules whose classes convert() rebuilds (model, features, blocks, layers, transitions), where methods come from
_REBUILT_CLASS_MODULES = ("torchvision.models.densenet", "effdense.densenet", "torch.nn.modules.container")
# methods of the base classes that a subclass may override without changing what the copy would compute
_HARMLESS_METHODS = frozenset({"__init__", "extra_repr", "_get_name", "__repr__", "__str__", "__getstate__", "__setstate__",
                               "__dir__", "_compiled_call_impl"})  # fmt: skip


def _refuse_own_code(model: nn.Module, features: nn.Module) -> None:
    """The modules that :func:`convert` rebuilds from its own classes (the model, ``features``, the dense blocks,
    their layers and the transitions) must compute what those classes do: a subclass's method (a ``forward``
    returning ``super().forward(x) / T``, a dense layer's ``bn_function``) or a function set on the instance
    (``model.forward = ...``) is a ``TypeError`` naming it. Before, the copy silently dropped it and computed
    other outputs. Only what overrides the base class's own (``forward``, ``bn_function``, ``state_dict``, ...)
    counts: a helper method of a subclass (``freeze_features``) computes nothing the copy misses. A module of a
    class of one's own that derives from ``nn.Module`` alone is held to ``nn.Module``'s methods (its ``forward``);
    one of PyTorch's other classes in a rebuilt module's place is left to the structure checks. (Leaves and
    modules swapped into the blocks are copied as they are: see convert.)"""
    rebuilt = [("model", model), ("features", features)]
    for name, m in features._modules.items():
        if name.startswith(("denseblock", "transition")) and isinstance(m, nn.Module):
            rebuilt.append((f"features.{name}", m))
            if name.startswith("denseblock"):
                rebuilt += [(f"features.{name}.{lname}", layer) for lname, layer in m._modules.items()]
    for path, m in rebuilt:
        mro = type(m).__mro__
        base = next((i for i, cls in enumerate(mro) if cls.__module__ in _REBUILT_CLASS_MODULES), None)
        if base is None:
            if type(m).__module__.startswith("torch."):  # another kind of module: the structure checks name it
                continue
            base = mro.index(nn.Module)

        def overrides(names: Any) -> list[str]:
            return [k for k in names if k not in _HARMLESS_METHODS and hasattr(mro[base], k)]

        own = overrides(k for k, v in m.__dict__.items() if callable(v) and not isinstance(v, (type, nn.Module, torch.Tensor)))
        where = f"set on the instance ({', '.join(own)})" if own else None
        for cls in mro[:base]:
            methods = overrides(k for k, v in vars(cls).items() if callable(v) or isinstance(v, (staticmethod, classmethod)))
            if methods and where is None:
                where = f"{', '.join(methods)} of {cls.__qualname__}"
        if where is not None:
            raise TypeError(
                f"convert(): the source's {path!r} ({type(m).__name__}) has code of its own, {where}, which the "
                f"copy (built from effdense's classes) would not run; load the weights into an effdense model "
                f"instead (effdense.densenet121(weights=model.state_dict()), or effdense.DenseNet(...) for other "
                f"shapes) and put the change on that (wrap it, or subclass effdense.DenseNet)"
            )


def _copy_module(module: nn.Module, name: str) -> nn.Module:
    """``copy.deepcopy(module)`` that shares, not copies, the process groups its SyncBatchNorms reduce over:
    a group is a handle on the job's communicators, which cannot be copied (deepcopy raised "cannot pickle
    'ProcessGroup' object" for a SyncBatchNorm stem, with the source's group, which the copy must use too).
    A module deepcopy cannot copy (an attribute holding a lock, say) is a ``TypeError`` naming ``name``, the
    source's module (the bare deepcopy error named none)."""
    memo = {id(g): g for m in module.modules() if (g := getattr(m, "process_group", None)) is not None}
    try:
        return copy.deepcopy(module, memo)
    except (MemoryError, torch.OutOfMemoryError):
        raise
    except Exception as exc:
        raise TypeError(f"convert(): cannot copy the source's '{name}' ({type(module).__name__}): {exc}") from exc


def _check_source_parts(features: nn.Sequential) -> None:
    """What :func:`convert` reads of the source to build its copy (the first layer's widths, each transition's
    channels) is there: a dense block, layer or transition replaced by another kind of module raises
    ``TypeError`` naming it (they raised ``AttributeError`` or an empty ``StopIteration`` from the reading)."""

    def width(m: Any) -> bool:
        return isinstance(getattr(m, "in_channels", None), int) and isinstance(getattr(m, "out_channels", None), int)

    def refuse(path: str, m: nn.Module, what: str) -> None:
        raise TypeError(f"convert(): the source's 'features.{path}' ({type(m).__name__}) {what}; a DenseNet cannot hold it")

    for name, m in features.named_children():
        if name.startswith("denseblock"):
            layers = list(m.named_children())
            if not layers:
                refuse(name, m, "holds no dense layers")
            for lname, layer in layers[:1]:  # (the first layer's widths make the copy; the others are compared later)
                if not isinstance(layer._modules.get("norm1"), nn.Module) or not width(layer._modules.get("conv1")):
                    refuse(f"{name}.{lname}", layer, "is not a dense layer (a norm1 and a conv1 convolution)")
                if "conv2" in layer._modules and not width(layer._modules["conv2"]):
                    refuse(f"{name}.{lname}.conv2", layer._modules["conv2"], "is not a convolution with channel counts")
        elif name.startswith("transition") and not width(m._modules.get("conv") if isinstance(m, nn.Module) else None):
            refuse(name, m, "is not a transition (a conv convolution with channel counts)")


def _structure_difference(clone: nn.Module, source: nn.Module) -> str | None:
    """The first module path where ``source`` has other submodules than the DenseNet built from it, said in a
    sentence; None if they have the same modules."""
    built = dict(clone.named_modules())
    for name, module in source.named_modules():
        mine = built.get(name)
        if mine is None:
            return f"the source has a module {name!r} ({type(module).__name__}) that a DenseNet built from it does not"
        if set(module._modules) != set(mine._modules):
            return (
                f"the source's {name or 'model'!r} ({type(module).__name__}) has children {sorted(module._modules)}, "
                f"where a DenseNet has {sorted(mine._modules)}"
            )
    return None


def _copy_placement(clone: nn.Module, source: nn.Module) -> None:
    """Give each of ``clone``'s parameters and buffers the dtype, device and memory layout (strides) of the
    ``source`` tensor of its name, before the state dict is copied in (which keeps the destination's). Each
    tensor its own: the whole copy was cast to the dtype and moved to the device of the source's first
    parameter, which rounded the fp32 BatchNorms of a bf16 model (and its statistics) to bf16 and an fp64
    head to fp32; and a source moved to ``channels_last`` gave a copy with contiguous weights (and the slower
    convolutions of a mixed layout). Tensors already placed as the source's (the copied stem, head and swapped
    modules, whose values no state dict may restore) are left alone."""
    # (every name of a tied tensor: the clone's slot under a tie's second name is placed too, before the load)
    theirs = {**dict(source.named_parameters(remove_duplicate=False)), **dict(source.named_buffers(remove_duplicate=False))}
    for prefix, module in clone.named_modules():
        for slots in (module._parameters, module._buffers):
            for key, t in slots.items():
                other = theirs.get(f"{prefix}.{key}" if prefix else key)
                if t is None or not isinstance(other, torch.Tensor) or other.shape != t.shape:
                    continue  # (the state dict's load names what differs)
                if other.dtype != t.dtype or other.device != t.device or other.stride() != t.stride():
                    new = torch.empty_like(other)  # (preserve_format: other's strides)
                    # a new tensor in the slot (not .data =, which a meta or other-device tensor cannot take);
                    # nothing holds the clone's own yet
                    slots[key] = nn.Parameter(new, t.requires_grad) if isinstance(t, nn.Parameter) else new


def _block_shape(block: nn.Module) -> tuple[int, int, int, int, bool]:
    """A dense block's ``(num_layers, num_input_features, bn_size, growth_rate, bottleneck)``, read from its
    first layer's convolutions (a torchvision block keeps none of them as attributes)."""
    layers = list(block.children())
    first = layers[0]._modules
    bottleneck = "conv2" in first
    growth_rate = (first["conv2"] if bottleneck else first["conv1"]).out_channels
    bn_size = max(1, first["conv1"].out_channels // growth_rate) if bottleneck else 4
    return len(layers), first["conv1"].in_channels, bn_size, growth_rate, bottleneck


def _rebuild_stages(clone: "DenseNet", features: nn.Sequential) -> None:
    """Rebuild each of ``clone``'s dense blocks and transitions whose widths are not the ``source``'s: a
    DenseNet takes one growth rate and bn_size (block 1's), but a source may have a block swapped for one of
    another growth rate, or input width. Before, such a block kept the first block's settings with the source's
    convolutions copied in, and ran as naive with the channel-count warning (losing the memory savings); or,
    for an effdense source whose ``compression`` no longer described its transitions, failed at its first
    forward."""
    built = clone.features._modules
    for name, src in features.named_children():
        mine = built.get(name)
        if name.startswith("denseblock") and isinstance(mine, _DenseBlock):
            shape = _block_shape(src)
            if shape != _block_shape(mine):
                n, cin, bn_size, growth_rate, bottleneck = shape
                drop_rate = float(getattr(next(iter(src.children())), "drop_rate", 0.0))
                block = _DenseBlock(
                    n, cin, bn_size, growth_rate, drop_rate, bottleneck=bottleneck, strategy=mine.strategy, policy=mine.policy
                )
                block._effdense_where = f"features.{name}"  # (named in warnings, as the DenseNet names its own)
                setattr(clone.features, name, block)
        elif name.startswith("transition") and isinstance(mine, _Transition):
            cin, cout = src.conv.in_channels, src.conv.out_channels
            if (cin, cout) != (mine.conv.in_channels, mine.conv.out_channels):
                setattr(clone.features, name, _Transition(cin, cout))


def convert(model: nn.Module, strategy: str = "auto", policy: Policy | None = None) -> DenseNet:
    """Build an effdense :class:`DenseNet` from a torchvision DenseNet, with a copy of its parameters
    and buffers (each with its values, dtype, device and memory layout) and the given strategy. Blocks and
    transitions are built with the source's widths, block by block (a block swapped for one of another growth
    rate keeps it). A replaced stem (``conv0``, ``pool0``)
    and head (any ``classifier`` module: a bias-free ``nn.Linear``, ``nn.Identity`` for a backbone, an
    ``nn.Sequential``) are copied as they are.

    Other modules swapped into the source's blocks and transitions (an activation, a pool, a frozen
    BatchNorm, an ``nn.Sequential`` in a module's place) are copied as they are too; the strategies run such a
    stage as ``naive``, with a warning. A source whose blocks a DenseNet cannot hold (a dense layer replaced
    by another kind of module) raises ``TypeError`` naming the first module where it differs, as does a model
    pruned with ``torch.nn.utils.prune`` (call ``prune.remove`` first), and one whose model, ``features``, blocks,
    layers or transitions (the modules the copy rebuilds from effdense's classes) have code of their own: a
    subclass's override of its base class's methods (``forward``), such a function set on the instance.

    The copy also keeps what the state dict does not carry: train/eval flags, ``requires_grad``, BatchNorm
    momentum and eps, each dense layer's ``drop_rate``, ties (a module reached under two names, a parameter or
    buffer held by two modules: tied in the copy too), forward and backward hooks registered on the source's
    modules (the same functions, registered anew: the source's handles do not remove them from the copy; a
    hooked dense layer makes its block run as naive, see the README), and SyncBatchNorm semantics: a source with
    :meth:`DenseNet.set_sync_bn` on (or a DenseNet whose BatchNorms are all ``nn.SyncBatchNorm``, or all
    ``effdense.train.CPUSyncBatchNorm``, over one process group) gives a copy with
    ``set_sync_bn(True, <the same process group>)`` (and the CPU stand-in's class where the source had it).

    Args:
        model: a ``torchvision.models.DenseNet`` (or an effdense one).
        strategy: block strategy of the new model.
        policy: :class:`effdense.Policy` of the new model and its blocks; ``None`` keeps an effdense source's
            (the model's, and each block's own where a block was given one; the default ``Policy()`` for a
            torchvision source).
    """
    if not isinstance(model, nn.Module):  # (a model name, None: model.modules() below raised AttributeError)
        hint = f": build it with effdense.get_model({model!r}) instead" if isinstance(model, str) else ""
        raise TypeError(f"convert() expects a torchvision DenseNet (an nn.Module), got {type(model).__name__}{hint}")
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        raise TypeError(
            f"convert() expects a torchvision DenseNet, got a {type(model).__name__} wrapper: pass model.module"
        )
    if isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
        raise TypeError(
            f"convert() expects a torchvision DenseNet, got the torch.compile wrapper {type(model).__name__}: pass "
            "model._orig_mod (and compile the converted model)"
        )
    features = getattr(model, "features", None)
    classifier = getattr(model, "classifier", None)
    if not isinstance(features, nn.Sequential):
        tv_blocks = any(type(m).__name__ == "_DenseBlock" and not isinstance(m, _DenseBlock) for m in model.modules())
        raise TypeError(
            f"convert() expects a torchvision DenseNet, got {type(model).__name__}"
            + (f"; it holds torchvision dense blocks: {_OWN_MODEL_HINT}" if tv_blocks else "")
        )
    if not isinstance(classifier, nn.Module):
        raise TypeError(
            f"convert() expects a torchvision DenseNet with a classifier module (any head: nn.Linear, nn.Identity "
            f"for a backbone, an nn.Sequential), got classifier {type(classifier).__name__}"
        )
    blocks = [m for name, m in features.named_children() if name.startswith("denseblock")]
    if not blocks:
        raise TypeError("convert() found no dense blocks (features.denseblock1, ...) in the model")
    _refuse_pruned(model)  # (before any module is copied: a pruned module's deepcopy fails on its own)
    _check_source_parts(features)
    _refuse_own_code(model, features)
    first = next(iter(blocks[0].children()))
    bottleneck = hasattr(first, "conv2")
    growth_rate = (first.conv2 if bottleneck else first.conv1).out_channels
    bn_size = first.conv1.out_channels // growth_rate if bottleneck else 4
    conv0 = features.conv0
    stem = _source_stem(features)
    compression = _source_compression(features, model.compression if isinstance(model, DenseNet) else None)
    sync_bn, sync_group = _source_sync_bn(model, features)
    keep_block_policies = policy is None and isinstance(model, DenseNet)
    if keep_block_policies:
        policy = model.policy
    clone = DenseNet(
        growth_rate=growth_rate,
        block_config=tuple(len(list(b.children())) for b in blocks),
        num_init_features=conv0.out_channels,
        bn_size=bn_size,
        drop_rate=float(getattr(first, "drop_rate", 0.0)),
        num_classes=classifier.out_features if isinstance(classifier, nn.Linear) else 1,  # (the source's head below)
        compression=compression,
        bottleneck=bottleneck,
        small_inputs=stem == ["conv0"],
        strategy=strategy,
        policy=policy,
        in_channels=conv0.in_channels,
    )
    # the source's stem modules themselves (copies): a torchvision model whose conv0 or pool0 a user replaced
    # (a 3x3 conv0 for small images, pool0 = nn.Identity, another input channel count) keeps them
    for name in list(clone.features._modules):
        if name in strategies.STEM and name not in stem:
            delattr(clone.features, name)
    for name in stem:
        setattr(clone.features, name, _copy_module(features._modules[name], f"features.{name}"))
    # and its head as it is (a copy): a bias-free nn.Linear, nn.Identity for a backbone, Sequential(Dropout, Linear)
    clone.classifier = _copy_module(classifier, "classifier")
    _rebuild_stages(clone, features)
    if sync_bn:
        clone.set_sync_bn(True, sync_group)
        if any(getattr(type(m), "_effdense_computes_as_batchnorm", False) for m in model.modules()):
            from effdense.train import enable_cpu_sync_bn  # the source's CPU stand-in, as DDP on CPU needs

            enable_cpu_sync_bn(clone)
    _match_untracked_batchnorms(clone, model)
    _copy_swapped_leaves(clone, model)
    _copy_placement(clone, model)
    try:
        clone.load_state_dict(model.state_dict(), strict=True)
    except RuntimeError as exc:  # a source whose structure a DenseNet cannot take: name where it differs
        where = _structure_difference(clone, model)
        raise TypeError(f"convert(): {where or f'the state dicts differ: {exc}'}") from None
    # what a state dict does not carry, module by module: train/eval flags (a backbone whose BatchNorms
    # were put in eval mode for fine-tuning), frozen parameters, BatchNorm momentum and eps
    source = dict(model.named_modules())
    for name, module in clone.named_modules():
        src = source.get(name)
        if src is None:
            continue
        module.training = src.training
        if keep_block_policies and isinstance(module, _DenseBlock) and isinstance(src, _DenseBlock):
            module.policy = src.policy  # (a block given a policy of its own keeps it)
        if isinstance(module, _DenseLayer) and "drop_rate" in src.__dict__:  # each layer's own (set per layer)
            module.drop_rate = float(src.drop_rate)
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and isinstance(src, nn.modules.batchnorm._BatchNorm):
            module.momentum, module.eps = src.momentum, src.eps
        _copy_hooks(module, src)
    source_params = dict(model.named_parameters())
    for name, p in clone.named_parameters():
        src_p = source_params.get(name)
        if src_p is not None:
            p.requires_grad_(src_p.requires_grad)
    _copy_ties(clone, model)
    return clone


def _copy_ties(clone: nn.Module, source: nn.Module) -> None:
    """Tie in ``clone`` what is tied in ``source``: a module reached under two names (one BatchNorm as two
    layers' ``norm2``), and a parameter or buffer held by two modules (a weight shared by two convolutions).
    The copy is built module by module and loaded from a state dict, which lists a tied tensor under each of
    its names: without this, each name got a tensor of its own, silently untied (other gradients, and a shared
    BatchNorm's statistics no longer updated twice per step)."""
    first: dict[int, str] = {}
    for name, m in source.named_modules(remove_duplicate=False):
        seen = first.setdefault(id(m), name)
        if seen != name:
            parent, _, attr = name.rpartition(".")
            setattr(clone.get_submodule(parent), attr, clone.get_submodule(seen))
    for named in (source.named_parameters, source.named_buffers):
        first.clear()
        for name, t in named(remove_duplicate=False):
            seen = first.setdefault(id(t), name)
            if seen != name:
                owner, _, attr = name.rpartition(".")
                holder, _, seen_attr = seen.rpartition(".")
                target = getattr(clone.get_submodule(holder), seen_attr)
                module = clone.get_submodule(owner)
                if getattr(module, attr) is not target:  # (already shared where the modules are)
                    if isinstance(target, nn.Parameter):
                        setattr(module, attr, target)
                    else:
                        module._buffers[attr] = target
