"""Autograd plumbing shared by the strategies and the kernels' differentiable op."""

from __future__ import annotations

from typing import Sequence

import torch


def differentiable_once(
    grads: Sequence[torch.Tensor | None], message: bytes, links: Sequence[torch.Tensor] = ()
) -> tuple[torch.Tensor | None, ...]:
    """``grads`` (a backward's results, ``None`` entries kept) as outputs of one node that raises ``message``
    when they are differentiated: the mechanism of ``torch.autograd.function.once_differentiable`` (a
    ``DelayedError`` node), for a backward run under ``create_graph=True``. ``links``, tensors that require
    grad, get edges from the node too, so a gradient with respect to them reaches it as well."""
    present = [g for g in grads if g is not None]
    made = torch._C._functions.DelayedError(message, len(present) + len(links))(
        *[g.detach().requires_grad_() for g in present], *links
    )
    made = iter((made,) if isinstance(made, torch.Tensor) else made)
    return tuple(None if g is None else next(made) for g in grads)
