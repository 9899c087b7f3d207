"""Strategy ``fused``: the ``shared`` block Function with the bottleneck on Triton kernels.

Same buffers, statistics and backward as :mod:`effdense.strategies.shared`; the BN1-ReLU-conv1x1
bottleneck of every layer and transition (forward, weight gradient, input gradient with the BN1-backward
reductions) and the per-channel statistics run as the kernels of :mod:`effdense.kernels`, which never
materialise the normalised input. They run on CUDA, and on CPU through Triton's interpreter when
``TRITON_INTERPRET=1`` was set before import; anywhere else ``fused`` runs the kernels' PyTorch twins,
which is exactly ``shared``.
"""

from __future__ import annotations

from typing import Any

import torch

from effdense.strategies import block_name, shared

# The input gradient works on channel chunks of this many bottleneck widths (the weight gradient is one
# launch over all channels): the kernels hold only a dh scratch per chunk (the twins also a normalised
# input), so wider chunks than ``shared``'s cost no extra memory and re-read the output gradient fewer times.
_CHUNK_FACTOR = 2


def kernels_available(device: torch.device | str | None = None) -> bool:
    """Whether ``fused`` runs its Triton kernels for tensors on ``device``."""
    try:
        from effdense.kernels import kernels_available as available
    except ImportError:  # triton missing
        return False
    return available(device)


def _options(x: torch.Tensor) -> dict[str, Any]:
    if kernels_available(x.device):
        import effdense.kernels as ops
        from effdense.kernels.ops import stage_ops

        # stage_ops: each pass of a stage checks its kernel calls' arguments once, not on every call (host time)
        return dict(ops=ops, chunk_factor=_CHUNK_FACTOR, stage_ops=stage_ops)
    return dict(ops=shared.reference_ops())


def run_block(block, x: torch.Tensor) -> torch.Tensor:
    options = _options(x)
    return shared.run_stage(block, None, x, where=block_name(block), **options)


def run_features(model, x: torch.Tensor) -> torch.Tensor:
    options = _options(x)
    # on the kernels, a whole model's stages share its largest chunk size (shared._widest_chunk): fewer
    # input-gradient launches in the blocks with small planes, the largest chunk temporary unchanged
    return shared.run_features(model, x, widest_chunks="chunk_factor" in options, **options)
