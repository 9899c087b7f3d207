"""Strategy ``naive``: a list of feature maps and a ``torch.cat`` in every layer.

The correctness reference and the memory baseline: every layer keeps its own concatenation, BN1 output
and ReLU output for backward, so activation memory grows quadratically with depth.
"""

from __future__ import annotations

import torch


def run_block(block, x: torch.Tensor) -> torch.Tensor:
    features = [x]
    for layer in block.layers:
        features.append(layer(features))
    return torch.cat(features, 1)
