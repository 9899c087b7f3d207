"""``shared`` and ``fused`` under ``torch.compile(fullgraph=True, backend="aot_eager")`` (one test with the
default backend, inductor) and FakeTensorMode.

fullgraph=True raises on any graph break, so every compiled call here is also the no-graph-break check;
the dynamo counters confirm one graph, compiled once for two steps. Parity with the eager ``naive``
model as in tests/test_shared.py: outputs, the input gradient, every parameter gradient and every
BatchNorm buffer, over two consecutive steps.

``fused`` runs two ways: with the PyTorch twins (``kernels_available`` patched to False, the CPU path
without Triton) and with the real Triton kernels through the interpreter (tests/conftest.py sets
``TRITON_INTERPRET=1``), where the graph must hold the ``effdense::*`` custom ops.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torchvision
from torch._dynamo.utils import counters

import effdense
from effdense.strategies import fused

RTOL = 1e-4


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _tiny_cifar() -> nn.Module:
    return effdense.densenet_cifar(16, 4)  # 3 blocks of 2 BC layers, CIFAR stem


def _two_blocks(block_config=(2, 2), **kwargs) -> nn.Module:
    return effdense.DenseNet(4, block_config, 8, bn_size=2, num_classes=3, small_inputs=True, **kwargs)


STRATEGIES = [
    pytest.param(("shared", False), id="shared"),
    pytest.param(("fused", False), id="fused-twins"),
    pytest.param(("fused", True), id="fused-triton-interpreter"),
]


@pytest.fixture
def kernels(request, monkeypatch):
    """``(strategy, triton)``: the strategy name, with fused's Triton kernels off unless ``triton``."""
    strategy, triton = request.param
    if triton:
        if not fused.kernels_available(torch.device("cpu")):
            pytest.skip("Triton kernels cannot run on CPU here (TRITON_INTERPRET unset)")
    else:
        monkeypatch.setattr(fused, "kernels_available", lambda device=None: False)
    return strategy, triton


def _pair(model: nn.Module, strategy: str, policy: effdense.Policy | None = None):
    other = copy.deepcopy(model).set_strategy(strategy, policy)
    return model.set_strategy("naive"), other


def _weights(out: torch.Tensor) -> torch.Tensor:
    return torch.linspace(-1.0, 2.0, out.numel()).view_as(out)


def train_step(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Forward, loss, backward: compiled whole (``torch.compile(train_step)``) or run eagerly."""
    out = model(x)
    (out * _weights(out)).sum().backward()
    return out.detach()


def _assert_close(name: str, got: torch.Tensor, want: torch.Tensor, scale: float, atol: float = 0.0) -> None:
    err = (got - want).abs().max().item()
    assert err <= RTOL * scale + atol, f"{name}: error {err:.3g} (scale {scale:.3g})"


def assert_same_state(ref: nn.Module, other: nn.Module, x_ref: torch.Tensor | None, x_other: torch.Tensor | None) -> None:
    """Input gradient, every parameter gradient and every BatchNorm buffer as in tests/test_shared.py."""
    if x_ref is not None:
        _assert_close("input gradient", x_other.grad, x_ref.grad, x_ref.grad.abs().max().item())
        gmax = max(p.grad.abs().max().item() for p in ref.parameters())
        for (name, p), q in zip(ref.named_parameters(), other.parameters()):
            assert q.grad is not None, f"{name}: no gradient"
            _assert_close(name, q.grad, p.grad, p.grad.abs().max().item(), 1e-6 * gmax)
    for (name, a), b in zip(ref.named_buffers(), other.buffers()):
        if "num_batches" in name:
            assert torch.equal(a, b), name
        else:
            assert torch.allclose(a, b, rtol=RTOL, atol=1e-6), f"{name}: running statistics differ"


def run_steps(ref: nn.Module, other: nn.Module, step, x: torch.Tensor, steps: int = 2) -> None:
    """``steps`` training steps of the eager ``ref`` and of ``step(x)`` (which trains ``other``), same seeds;
    outputs compared at every step, gradients and buffers after each."""
    for i in range(steps):
        x_ref, x_other = x.clone().requires_grad_(), x.clone().requires_grad_()
        ref.zero_grad(set_to_none=True)
        other.zero_grad(set_to_none=True)
        torch.manual_seed(i)
        out_ref = train_step(ref, x_ref)
        torch.manual_seed(i)
        out = step(x_other)
        _assert_close(f"step {i} output", out, out_ref, out_ref.abs().max().item())
        assert_same_state(ref, other, x_ref, x_other)


def assert_one_graph() -> None:
    """Dynamo compiled one frame into one graph (no graph break, no recompilation across the steps)."""
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


class _OpRecorder:
    """A backend: aot_eager, recording every operator of dynamo's graph (subgraphs of higher-order ops
    included, e.g. the traced forward and backward of an autograd.Function)."""

    def __init__(self) -> None:
        self.ops: set[str] = set()

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        for sub in gm.modules():
            if isinstance(sub, torch.fx.GraphModule):
                self.ops.update(str(n.target) for n in sub.graph.nodes if n.op == "call_function")
        from torch._dynamo.backends.debugging import aot_eager

        return aot_eager(gm, example_inputs)


def _check_kernel_ops(recorder: _OpRecorder, triton: bool) -> None:
    theirs = {op for op in recorder.ops if op.startswith("effdense.")}
    if triton:  # forward, weight/input gradients, BN backward and statistics all in the graph
        assert {"effdense.bottleneck_forward.default", "effdense.bottleneck_backward_weight.default",
                "effdense.bottleneck_backward_input.default", "effdense.bn_backward_accumulate.default",
                "effdense.channel_stats.default"} <= theirs, theirs  # fmt: skip
    else:
        assert not theirs, theirs


# --------------------------------------------------------------------------------------------------
# Training steps


@pytest.mark.parametrize("kernels", STRATEGIES[::2], indirect=True)
def test_compiled_training_step_matches_naive(kernels) -> None:
    """``torch.compile(train_step)``: forward, loss and backward in one graph (dynamo traces
    ``Tensor.backward`` with ``trace_autograd_ops``), on a model with two blocks and a transition.
    (``fused`` on the twins runs ``shared``'s code; the other tests run it.)"""
    strategy, triton = kernels
    torch.manual_seed(0)
    ref, other = _pair(_two_blocks(), strategy)
    recorder = _OpRecorder()
    compiled = torch.compile(train_step, fullgraph=True, backend=recorder)
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        run_steps(ref, other, lambda x: compiled(other, x), torch.randn(2, 3, 8, 8))
    assert_one_graph()
    _check_kernel_ops(recorder, triton)


@pytest.mark.parametrize("kernels", STRATEGIES[1:2], indirect=True)
def test_compiled_model_matches_naive(kernels) -> None:
    """``torch.compile(model)`` with backward outside: the model's forward and its AOT backward."""
    strategy, _ = kernels
    torch.manual_seed(0)
    ref, other = _pair(_tiny_cifar(), strategy)
    compiled = torch.compile(other, fullgraph=True, backend="aot_eager")
    run_steps(ref, other, lambda x: train_step(compiled, x), torch.randn(2, 3, 9, 9))
    assert_one_graph()


@pytest.mark.parametrize("kernels", STRATEGIES[2:], indirect=True)
def test_inductor_compiled_model_matches_naive(kernels) -> None:
    """The default backend (inductor, which generates code: C++ on CPU) over a ``fused`` model on the Triton
    kernels: the ``effdense::*`` ops in its graphs, the elementwise work around them generated, forward and
    AOT backward; two steps against eager ``naive``. (Inductor's compile takes most of this test's time.)"""
    strategy, _ = kernels
    torch.manual_seed(0)
    ref, other = _pair(_two_blocks(), strategy)
    compiled = torch.compile(other, fullgraph=True)
    run_steps(ref, other, lambda x: train_step(compiled, x), torch.randn(2, 3, 8, 8))
    assert_one_graph()


def test_compiled_dropout_kept_bottleneck_and_checkpointed_stem() -> None:
    """The paths with state besides the buffer: dropout (the compiled graph keeps its mask; CPU draws
    the same numbers as eager ``F.dropout``), kept bottleneck outputs, and the ImageNet stem that
    ``shared`` recomputes under ``torch.utils.checkpoint``."""
    torch.manual_seed(0)
    model = effdense.DenseNet(4, (2, 1), 8, bn_size=2, num_classes=3, drop_rate=0.2)
    ref, other = _pair(model, "shared", effdense.Policy(recompute_bottleneck=False, cache_stats=False))
    compiled = torch.compile(other, fullgraph=True, backend="aot_eager")
    run_steps(ref, other, lambda x: train_step(compiled, x), torch.randn(2, 3, 29, 29))
    assert_one_graph()


def test_compiled_dropout_at_rate_one_set_by_a_schedule() -> None:
    """The constructor refuses ``drop_rate=1.0``, a schedule may still set it: the compiled graph's kept mask
    scaled its gradient by 1 / (1 - p) in Python (ZeroDivisionError). Every new feature dropped: naive's."""
    torch.manual_seed(0)
    model = effdense.DenseNet(4, (2, 1), 8, bn_size=2, num_classes=3, drop_rate=0.2)
    for layer in model.modules():
        if isinstance(layer, effdense.densenet._DenseLayer):
            layer.drop_rate = 1.0
    ref, other = _pair(model, "shared")
    compiled = torch.compile(other, fullgraph=True, backend="aot_eager")
    run_steps(ref, other, lambda x: train_step(compiled, x), torch.randn(2, 3, 29, 29))


def test_compiled_model_fires_hooks_as_eager() -> None:
    """Hooks under torch.compile: as in eager, hooks on a transition, a block and ``features`` fire (the plain
    modules run), and a block with a hook on one of its layers' modules runs as naive (no warning inside
    dynamo); before, the compiled shared path skipped every hook but norm5's."""
    torch.manual_seed(0)
    ref, other = _pair(effdense.DenseNet(4, (2, 2), 8, bn_size=2, num_classes=3), "shared")
    calls = {"eager": [], "compiled": []}
    names = ("features.transition1", "features.denseblock2", "features.denseblock1.denselayer2.conv1", "features")
    for key, model in (("eager", ref), ("compiled", other)):
        for name in names:
            model.get_submodule(name).register_forward_hook(lambda mod, i, o, key=key, name=name: calls[key].append(name))
    compiled = torch.compile(other, fullgraph=True, backend="aot_eager")
    run_steps(ref, other, lambda x: train_step(compiled, x), torch.randn(2, 3, 29, 29))
    assert calls["compiled"] == calls["eager"] and sorted(set(calls["eager"])) == sorted(names)
    # no graph break (the hooks' appends to a list can recompile the second step: not asserted)
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_compiled_checkpoint_with_a_hook_in_the_checkpointed_part_updates_statistics_once() -> None:
    """A forward hook with side effects on a module inside checkpoint's recomputed part breaks the graph there,
    and the checkpoint then runs eagerly: its recomputation updated norm1's running statistics a second time
    (num_batches_tracked 2), since the wrapper that freezes them had been left out at trace time."""
    torch.manual_seed(0)
    ref = _two_blocks()
    other = copy.deepcopy(ref).set_strategy("checkpoint")
    seen = []
    for model in (ref, other):
        model.features.denseblock1.denselayer1.conv1.register_forward_hook(lambda mod, i, o: seen.append(o.shape))
    x = torch.randn(2, 3, 8, 8)
    ref(x).sum().backward()
    torch.compile(other, backend="aot_eager")(x).sum().backward()
    assert counters["graph_break"]  # (the case: a break inside the checkpointed part)
    for (name, a), b in zip(ref.named_buffers(), other.buffers()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


# --------------------------------------------------------------------------------------------------
# Inference


@pytest.mark.parametrize("kernels", STRATEGIES[1:], indirect=True)
def test_compiled_no_grad_and_eval_match_naive(kernels) -> None:
    """Under ``torch.no_grad()``: training mode (batch statistics, running statistics updated) for two
    calls, then eval mode (running statistics)."""
    strategy, _ = kernels
    torch.manual_seed(0)
    ref, other = _pair(_two_blocks((1, 2)), strategy)
    compiled = torch.compile(other, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 3, 8, 8)
    for training in (True, True, False):
        ref.train(training), other.train(training)
        with torch.no_grad():
            out_ref, out = ref(x), compiled(x)
        assert out.grad_fn is None
        _assert_close(f"output (training={training})", out, out_ref, out_ref.abs().max().item())
        assert_same_state(ref, other, None, None)
    assert not counters["graph_break"], dict(counters["graph_break"])


# --------------------------------------------------------------------------------------------------
# FakeTensorMode


def test_fused_training_step_under_fake_tensor_mode() -> None:
    """A ``fused`` training step with fake tensors (what memory estimates run): on CPU through the
    interpreter's kernel ops (their fake implementations), else on the twins."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        model = effdense.densenet_cifar(40, 12, strategy="fused", drop_rate=0.1)
        x = torch.randn(8, 3, 32, 32, requires_grad=True)
        out = model(x)
        out.sum().backward()
    assert out.shape == (8, 10)
    assert x.grad.shape == x.shape
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.shape == p.shape, name


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_compiled_whole_backward_in_chunks(backend) -> None:
    """``kernels.bottleneck_backward`` working on several channel chunks (as fused layers of realistic width
    do) traces with ``fullgraph=True``: its eager-only argument checks (storage overlap) stay out of the
    graph, and the compiled result equals the eager one."""
    from effdense import kernels as K

    if backend == "triton" and not K.kernels_available("cpu"):
        pytest.skip("Triton kernels cannot run on CPU here (TRITON_INTERPRET unset)")
    torch.manual_seed(0)
    N, C, H, W, B = 2, 20, 5, 5, 8
    x, dy = torch.randn(N, C, H, W), torch.randn(N, B, H, W)
    scale, shift, weight = torch.rand(C) + 0.5, torch.randn(C), torch.randn(B, C)
    mean, invstd, gamma = torch.randn(C), torch.rand(C) + 0.5, torch.rand(C)

    def backward(x: torch.Tensor, grad: torch.Tensor):
        return K.bottleneck_backward(x, scale, shift, weight, dy, mean, invstd, gamma, grad, chunk=7, backend=backend)

    grad = torch.randn(N, C, H, W)
    grad_eager = grad.clone()
    got = torch.compile(backward, fullgraph=True, backend="aot_eager")(x, grad)
    ref = backward(x, grad_eager)
    for a, b in zip((*got, grad), (*ref, grad_eager)):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=1e-4)


@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
def test_export_runs_auto_as_naive_and_refuses_shared_fused(strict) -> None:
    """torch.export inlines an autograd Function's forward and drops its backward: "auto" exports the plain
    model (whose program trains, with the gradients of eager naive), shared/fused raise naming the fix.
    Before, they exported a program that failed in training mode or backward, and on the kernels' path
    returned no gradient for 45 of 55 parameters, silently."""
    torch.manual_seed(0)
    model = effdense.densenet_cifar(16, 4)
    x = torch.randn(2, 3, 8, 8)
    ref = copy.deepcopy(model).set_strategy("naive")
    prog = torch.export.export(copy.deepcopy(model).set_strategy("auto"), (x,), strict=strict).module()
    grads = []
    for m in (ref, prog):
        m(x).square().sum().backward()
        grads.append([p.grad for p in m.parameters()])
    assert len(grads[0]) == len(grads[1]) and all(g is not None for g in grads[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    for strategy in ("shared", "fused"):
        with pytest.raises(Exception, match=f"strategy '{strategy}' cannot be exported by torch.export"):
            torch.export.export(copy.deepcopy(model).set_strategy(strategy), (x,), strict=strict)


def test_export_with_a_dynamic_image_size_as_torchvision() -> None:
    """A dynamic height and width (ONNX deployment's usual export): the input check's int() of the symbolic
    sizes specialised them to the example's, and the export failed ("your code specialized it to be a constant");
    torchvision's model exports. The program then runs other sizes with torchvision's outputs."""
    torch.manual_seed(0)
    tv = torchvision.models.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, num_classes=5).eval()
    ours = effdense.convert(tv).eval()
    dims = {"x": {2: torch.export.Dim("h", min=32, max=256), 3: torch.export.Dim("w", min=32, max=256)}}
    prog = torch.export.export(ours, (torch.randn(2, 3, 64, 64),), dynamic_shapes=dims).module()
    x = torch.randn(2, 3, 96, 80)
    torch.testing.assert_close(prog(x), tv(x))


def test_checkpoint_under_compile_recomputes_a_random_hook_with_forwards_numbers() -> None:
    """A forward hook that draws and has a side effect (a graph break inside the checkpointed part): dynamo then
    runs the checkpoint eagerly with the preserve_rng_state it traced, which was False under compile, and the
    recomputation drew other numbers than forward's (gradients 0.09 off naive's)."""
    seen = []

    def noisy(module, inputs, output):
        seen.append(1)  # the side effect that breaks the graph
        return nn.functional.dropout(output, p=0.5, training=True)

    torch.manual_seed(0)
    base = effdense.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, small_inputs=True, num_classes=3, strategy="naive")
    x = torch.randn(2, 3, 8, 8)
    grads = []
    for strategy, compiled in (("naive", False), ("checkpoint", True)):
        model = copy.deepcopy(base).set_strategy(strategy)
        model.features.denseblock1.denselayer2.relu1.register_forward_hook(noisy)
        run = torch.compile(model, backend="aot_eager") if compiled else model
        torch.manual_seed(7)
        run(x).square().sum().backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_checkpoint_compiles_into_one_graph() -> None:
    """``checkpoint`` under ``torch.compile(fullgraph=True)``: no graph break, naive's gradients and statistics
    (d70c9bc broke the graph in every dense block: an assignment expression in a comprehension is a cell that
    dynamo cannot read; with the checkpoint running eagerly, a compiled torch.utils.checkpoint around the model
    then updated the running statistics twice per step)."""
    torch.manual_seed(0)
    ref, other = _pair(_two_blocks(), "checkpoint")
    compiled = torch.compile(other, fullgraph=True, backend="aot_eager")
    run_steps(ref, other, lambda x: train_step(compiled, x), torch.randn(2, 3, 8, 8))
    assert_one_graph()
