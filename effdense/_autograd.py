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


def legacy_batched(t: torch.Tensor) -> bool:
    """Whether ``t`` is a batched tensor of the autograd engine's own vmap (``torch.autograd.grad(...,
    is_grads_batched=True)``, ``torch.autograd.functional.jacobian(..., vectorize=True)``), which runs outside
    torch.func, so a forward's torch.func check does not see it. (Call it outside ``torch.compile``: dynamo
    cannot trace it.)"""
    check = getattr(torch._C._functorch, "is_legacy_batchedtensor", None)
    return check is not None and bool(check(t))
