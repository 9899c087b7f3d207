"""Triton kernels for the DenseNet-BC bottleneck (BN1-ReLU-conv1x1) and its backward (installed as effdense.kernels).

Layers, top-down: :mod:`.ops` (public functions, backend dispatch, ``torch.library`` ops ``effdense::*``),
:mod:`.bottleneck` and :mod:`.stats` (Triton kernels and their host launches), :mod:`.reference` (the
PyTorch twins: the CPU path and the test oracle). Importing this package never touches CUDA.
"""

from effdense.kernels import reference
from effdense.kernels.ops import (
    Backend,
    bn_backward_accumulate,
    bn_relu_conv1x1,
    bottleneck_backward,
    bottleneck_backward_input,
    bottleneck_backward_weight,
    bottleneck_forward,
    channel_stats,
    kernels_available,
    set_autotune,
    set_direct_launch,
)

__all__ = [
    "Backend",
    "bn_backward_accumulate",
    "bn_relu_conv1x1",
    "bottleneck_backward",
    "bottleneck_backward_input",
    "bottleneck_backward_weight",
    "bottleneck_forward",
    "channel_stats",
    "kernels_available",
    "reference",
    "set_autotune",
    "set_direct_launch",
]
