"""A training step captured into a CUDA graph and replayed gives what the eager step gives.

Replaying a captured step runs no Python, dispatch or launch code, which is what bounds a small eager
``fused`` step on a GPU (``benchmarks/step_graph_time.py`` times both). The capture here is PyTorch's
whole-network recipe, as in that benchmark: warm-up steps on a side stream (autotuning, cuDNN plans), then
forward, loss and backward captured once with ``torch.cuda.graph``, the input refilled in place before each
replay. CUDA only.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

import effdense

pytestmark = pytest.mark.cuda


def _step(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor) -> None:
    F.cross_entropy(model(x), target).backward()


def _capture(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.cuda.CUDAGraph:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            _step(model, x, target)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    model.zero_grad(set_to_none=True)  # the captured backward allocates .grad in the graph's pool
    with torch.cuda.graph(graph):
        _step(model, x, target)
    return graph


@pytest.mark.parametrize("strategy", ["naive", "shared", "fused"])
def test_replayed_step_matches_eager(strategy) -> None:
    torch.manual_seed(0)
    model = effdense.DenseNet(6, (3, 2), 12, num_classes=4, small_inputs=True, strategy=strategy).cuda()
    x = torch.randn(4, 3, 12, 12, device="cuda")
    target = torch.randint(0, 4, (4,), device="cuda")
    graph = _capture(model, x, target)
    torch.cuda.synchronize()
    ref = copy.deepcopy(model)  # after the warm-up: the same running statistics; capture ran nothing
    for _ in range(2):
        new = torch.randn_like(x)
        x.copy_(new)
        graph.replay()
        ref.zero_grad(set_to_none=True)
        _step(ref, new, target)
        torch.cuda.synchronize()
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}.grad: {m}")
        for (name, b), c in zip(model.named_buffers(), ref.buffers()):
            torch.testing.assert_close(b, c, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("strategy", ["shared", "fused"])
def test_replayed_step_with_dropout_draws_a_new_mask_each_replay(strategy) -> None:
    # under capture forward keeps dropout's mask for backward (an RNG state read at capture would not follow
    # the replays): the step captures, its gradients are finite, and each replay draws new masks
    torch.manual_seed(0)
    model = effdense.DenseNet(6, (3, 2), 12, num_classes=4, small_inputs=True, drop_rate=0.5, strategy=strategy).cuda()
    x = torch.randn(4, 3, 12, 12, device="cuda")
    target = torch.randint(0, 4, (4,), device="cuda")
    graph = _capture(model, x, target)
    grads = []
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.isfinite(g).all() for g in grads[0] + grads[1])
    assert any(not torch.equal(a, b) for a, b in zip(*grads))
