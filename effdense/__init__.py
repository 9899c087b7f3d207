"""effdense: memory-efficient DenseNets for PyTorch.

A drop-in replacement for torchvision's DenseNets (same names, weights and outputs) whose dense blocks
can run four ways (``strategy=``): ``naive``, ``checkpoint``, ``shared`` and ``fused``.
"""

from effdense.densenet import (
    CIFAR_PRESETS,
    IMAGENET_CONFIGS,
    MODELS,
    DenseNet,
    _DenseBlock as DenseBlock,
    _Transition as Transition,
    convert,
    densenet121,
    densenet161,
    densenet169,
    densenet201,
    densenet264,
    densenet_40,
    densenet_bc_100,
    densenet_bc_190,
    densenet_bc_250,
    densenet_cifar,
    get_model,
    load_weights,
    set_strategy,
)
from effdense.strategies import STRATEGIES, Policy, available as available_strategies

__version__ = "0.1.0"

__all__ = [
    "CIFAR_PRESETS",
    "IMAGENET_CONFIGS",
    "MODELS",
    "STRATEGIES",
    "DenseBlock",
    "DenseNet",
    "Policy",
    "Transition",
    "available_strategies",
    "convert",
    "densenet121",
    "densenet161",
    "densenet169",
    "densenet201",
    "densenet264",
    "densenet_40",
    "densenet_bc_100",
    "densenet_bc_190",
    "densenet_bc_250",
    "densenet_cifar",
    "get_model",
    "load_weights",
    "set_strategy",
]
