"""Strategies ``shared`` and ``fused`` against ``naive``: outputs, every gradient, BatchNorm buffers.

``fused`` runs the real Triton kernels here: on CPU through Triton's interpreter (tests/conftest.py sets
``TRITON_INTERPRET=1`` when CUDA is absent), so its cases are small.
"""

from __future__ import annotations

import copy
import random
import re
import types
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import effdense
from effdense.strategies import shared

# fp32: |a - b| <= 1e-4 * (largest magnitude of the reference tensor) + 2e-6 * (largest gradient of the
# model), the second term for near-zero, cancellation-dominated gradients (norm0's weight, followed by
# more BatchNorms, is ~1e-6 where other gradients are ~1; a convolution's bias ahead of a BatchNorm, whose
# exact gradient is 0, ~3e-6 with random BatchNorm parameters)
RTOL = 1e-4


def _step(model: nn.Module, x: torch.Tensor, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    out = model(x)
    w = torch.linspace(-1.0, 2.0, out.numel(), device=out.device).view_as(out)
    (out * w).sum().backward()
    return out.detach()


def assert_matches(ref: nn.Module, other: nn.Module, x: torch.Tensor, steps: int = 2) -> None:
    x_ref = x.clone().requires_grad_()
    x_other = x.clone().requires_grad_()
    for step in range(steps):
        for m in (ref, other):
            m.zero_grad(set_to_none=True)
        x_ref.grad = x_other.grad = None
        out_ref = _step(ref, x_ref, seed=step)
        out = _step(other, x_other, seed=step)
        tol = RTOL * out_ref.abs().max().item()
        assert (out - out_ref).abs().max().item() <= tol, "outputs differ"
    gmax = max(p.grad.abs().max().item() for p in ref.parameters())
    tol = RTOL * x_ref.grad.abs().max().item()
    assert (x_other.grad - x_ref.grad).abs().max().item() <= tol, "input gradients differ"
    for (name, p), q in zip(ref.named_parameters(), other.parameters()):
        assert q.grad is not None, f"{name}: no gradient"
        err = (q.grad - p.grad).abs().max().item()
        assert err <= RTOL * p.grad.abs().max().item() + 2e-6 * gmax, f"{name}: gradient error {err:.3g}"
    for (name, a), b in zip(ref.named_buffers(), other.buffers()):
        if "num_batches" in name:
            assert torch.equal(a, b), name
        else:
            assert torch.allclose(a, b, rtol=RTOL, atol=1e-6), f"{name}: running statistics differ"


def _random_batchnorms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every BatchNorm's weight, bias and running statistics drawn at random (in place; returns ``model``):
    a freshly built model's are 1, 0, 0 and 1, under which a strategy that ignored BN's affine or an
    eval-mode BN's statistics would compute the same as naive (a mutation audit found the equivalence tests
    blind to that). A BatchNorm a test has set up otherwise (not at those values) is left as it is."""
    g = torch.Generator().manual_seed(seed)

    def fresh(m) -> bool:
        tensors = [(m.weight, 1.0), (m.bias, 0.0), (m.running_mean, 0.0), (m.running_var, 1.0)]
        return all(t is None or bool((t == v).all()) for t, v in tensors)

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and "parametrizations" not in m._modules and fresh(m):
                if m.weight is not None:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.5)
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.2)
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


def _pair(model: nn.Module, strategy: str, policy: effdense.Policy | None = None):
    _random_batchnorms(model)
    other = copy.deepcopy(model).set_strategy(strategy, policy)
    return model.set_strategy("naive"), other


def _random_configs(n: int, seed: int = 1234):
    """Random small models over the axes that matter: depth, growth, bn_size, compression, bottleneck,
    stem, odd spatial sizes, batch 1, dropout."""
    rng = random.Random(seed)
    for i in range(n):
        bottleneck = rng.random() < 0.7
        small = rng.random() < 0.6
        cfg = dict(
            growth_rate=rng.choice([3, 5, 8, 12]),
            block_config=tuple(rng.randint(1, 4) for _ in range(rng.randint(1, 3))),
            num_init_features=rng.choice([6, 10, 16]),
            bn_size=rng.choice([1, 2, 4]),
            compression=rng.choice([0.5, 0.7, 1.0]),
            bottleneck=bottleneck,
            small_inputs=small,
            drop_rate=rng.choice([0.0, 0.0, 0.2]),
            num_classes=rng.choice([3, 10]),
        )
        batch = rng.choice([1, 2, 3])
        side = rng.choice([7, 9, 13, 16] if small else [29, 33, 45])
        # BatchNorm over fewer than ~8 values per channel (batch 1, last block 1x2) turns fp32 rounding
        # into errors beyond the tolerance for naive and shared alike: grow the image until it is not
        probe = effdense.DenseNet(**{**cfg, "growth_rate": 1, "num_init_features": 2, "block_config": (1,) * len(cfg["block_config"])})
        while batch * probe._final_spatial(side) ** 2 < 8:
            side += 4
        yield pytest.param(cfg, (batch, 3, side, side + rng.choice([0, 2])), id=f"cfg{i}")


@pytest.mark.parametrize("cfg, shape", list(_random_configs(10)))
def test_shared_matches_naive_random_sweep(cfg, shape) -> None:
    torch.manual_seed(0)
    model = effdense.DenseNet(**cfg)
    x = torch.randn(shape)
    assert_matches(*_pair(model, "shared"), x)


@pytest.mark.parametrize(
    "builder, shape",
    [
        (lambda: effdense.densenet_cifar(16, 4), (2, 3, 9, 9)),  # BC, CIFAR stem, odd size
        (lambda: effdense.DenseNet(4, (2, 2), 8, bn_size=2, num_classes=3, drop_rate=0.2), (1, 3, 45, 37)),  # batch 1, ImageNet stem, dropout
        (lambda: effdense.densenet_cifar(13, 4, bottleneck=False, compression=1.0), (2, 3, 9, 9)),  # no bottleneck
    ],
    # every last block sees at least 8 values per channel: a BatchNorm over 2 values (batch 2, 1x1) has an
    # input gradient that is zero in exact arithmetic, so both sides would compare amplified rounding noise
    ids=["bc-cifar-odd", "imagenet-batch1-dropout", "no-bottleneck"],
)
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_fused_matches_naive_with_real_kernels(builder, shape, device) -> None:
    from effdense.strategies import fused

    if not fused.kernels_available(torch.device(device)):
        pytest.skip(f"Triton kernels cannot run on {device} here (TRITON_INTERPRET unset)")
    torch.manual_seed(0)
    ref, other = _pair(builder().to(device), "fused")
    assert_matches(ref, other, torch.randn(shape, device=device))  # (TF32 off: conftest's _no_tf32)


def _count_checked_calls(monkeypatch) -> dict[str, int]:
    """Spy on the public kernel functions' per-call checks: calls of ``_use_triton`` and ``_checks.check_*``."""
    from effdense.kernels import _checks
    from effdense.kernels import ops as kops

    calls = {"checks": 0}

    def counted(fn):
        def spy(*args, **kwargs):
            calls["checks"] += 1
            return fn(*args, **kwargs)

        return spy

    monkeypatch.setattr(kops, "_use_triton", counted(kops._use_triton))
    for name in ("check_forward", "check_backward", "check_backward_weight", "check_backward_input", "check_accumulate",
                 "check_activation", "check_stats_out"):  # fmt: skip
        monkeypatch.setattr(_checks, name, counted(getattr(_checks, name)))
    return calls


def test_fused_stage_checks_its_kernel_calls_once_per_pass(monkeypatch) -> None:
    """A fused stage calls the kernels through effdense.kernels.ops.stage_ops: their arguments checked once
    per forward and backward pass, not on each of the ~130 calls of a pass (host time, which a small GPU step
    is bound by). A training step then runs none of the public functions' per-call checks, every kernel
    still launches, and the results match naive (outputs, gradients, running statistics)."""
    from effdense.kernels import bottleneck as kb
    from effdense.strategies import fused

    if not fused.kernels_available(torch.device("cpu")):
        pytest.skip("Triton kernels cannot run on cpu here (TRITON_INTERPRET unset)")
    torch.manual_seed(0)
    ref, other = _pair(effdense.DenseNet(4, (2, 2), 8, bn_size=2, num_classes=3, drop_rate=0.2), "fused")
    calls = _count_checked_calls(monkeypatch)
    launches = {"n": 0}
    launch = kb.bottleneck_forward_launch

    def counted(*args):
        launches["n"] += 1
        return launch(*args)

    monkeypatch.setattr(kb, "bottleneck_forward_launch", counted)
    assert_matches(ref, other, torch.randn(2, 3, 37, 29), steps=2)
    assert calls["checks"] == 0
    # per step: forward over 4 layers and 1 transition, backward's recomputation of the 4 bottleneck outputs
    assert launches["n"] == 2 * (5 + 4)


def test_fused_stage_takes_the_checked_functions_where_a_pass_may_not_skip_them(monkeypatch) -> None:
    """Under a dispatch mode (here a pass-through TorchDispatchMode, as memory and FLOP trackers are) the
    launches must go through the torch.library ops, and the public functions check each call: a fused step
    there takes them, with the same results."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from effdense.strategies import fused

    if not fused.kernels_available(torch.device("cpu")):
        pytest.skip("Triton kernels cannot run on cpu here (TRITON_INTERPRET unset)")

    class _PassThrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    ref, other = _pair(effdense.densenet_cifar(10, 4, num_classes=3), "fused")
    calls = _count_checked_calls(monkeypatch)
    x = torch.randn(2, 3, 8, 8)
    with _PassThrough():
        assert_matches(ref, other, x, steps=1)
        # each pass decides for itself: forward and backward both take the checked functions
        before = calls["checks"]
        loss = other(x).sum()
        forward = calls["checks"] - before
        loss.backward()
        backward = calls["checks"] - before - forward
    assert forward > 0 and backward > 0, (forward, backward)


def _strided_running_means(model: nn.Module) -> None:
    for bn in model.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_mean = torch.zeros(2 * bn.num_features)[::2]
    model.eval()


def _one_value_weight(model: nn.Module, shape: tuple[int, ...] = (1,)) -> None:
    bn = model.features.denseblock3.denselayer1.norm1
    bn.weight = nn.Parameter(torch.full(shape, 1.5))


def _one_value_running_var(model: nn.Module) -> None:
    model.features.denseblock3.denselayer1.norm1.running_var = torch.tensor([0.7])
    model.eval()


@pytest.mark.parametrize(
    "setup, message",
    [
        (_strided_running_means, "mean: expected unit stride"),
        (_one_value_weight, r"gamma: expected a 1-D tensor of shape \(5,\), got shape \(1,\)"),
        (lambda m: _one_value_weight(m, ()), r"gamma: expected a 1-D tensor of shape \(5,\), got shape \(\)"),
        (_one_value_running_var, r"invstd: expected a 1-D tensor of shape \(5,\)"),
    ],
    ids=["strided-running-mean", "one-value-weight", "0-dim-weight", "one-value-running-var"],
)
def test_fused_stage_checks_what_reaches_its_kernels(setup, message) -> None:
    """What a stage hands the kernels without building it itself is checked as the per-call checks did
    (a probe found it unchecked at 0d4db56, read past its end, and gave silently wrong gradients, or an
    IndexError): BatchNorm parameters and running statistics (read as per-channel vectors) replaced by ones
    of another size or layout. The stage's pass takes the checked functions, which name the tensor."""
    from effdense.strategies import fused

    if not fused.kernels_available(torch.device("cpu")):
        pytest.skip("Triton kernels cannot run on cpu here (TRITON_INTERPRET unset)")
    torch.manual_seed(0)
    model = effdense.densenet_cifar(10, 4, num_classes=3, strategy="fused")
    x = torch.randn(2, 3, 8, 8)
    setup(model)
    with pytest.raises((ValueError, TypeError), match=message):
        model(x).square().sum().backward()


@pytest.mark.parametrize("strategy", ["shared", "fused"])
def test_a_buffer_an_unpack_hook_gives_back_channels_last_is_read_as_it_is(strategy) -> None:
    """A saved-tensor unpack hook that returns a block's buffer in channels_last: backward copies it back to
    planes and gives naive's gradients (before: the kernels' layout error, naming a .contiguous() that the
    user cannot call there)."""
    torch.manual_seed(0)
    ref = effdense.densenet_cifar(10, 4, num_classes=3, strategy="naive")
    model = copy.deepcopy(ref).set_strategy(strategy)
    x = torch.randn(2, 3, 8, 8)

    def unpack(t):
        return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 and t.shape[1] > 1 else t

    for m in (ref, model):
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, unpack):
            out = m(x)
        out.square().sum().backward()
    for (name, p), q in zip(ref.named_parameters(), model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_stage_ops_refuses_what_a_direct_launch_could_not_take() -> None:
    """effdense.kernels.ops.stage_ops: the once-checked kernel calls for a stage's pass, or None (the public
    functions, which check each call and pick the backend) wherever one of the pass's calls would not run the
    kernels directly: float64, a parameter on another device or a strided vector, a tensor that is not a
    plain one (meta, a subclass), a buffer in another layout, past the kernels' 32-bit offsets."""
    from effdense.kernels import ops as kops
    from effdense.strategies import fused

    if not fused.kernels_available(torch.device("cpu")):
        pytest.skip("Triton kernels cannot run on cpu here (TRITON_INTERPRET unset)")
    buf, w, v = torch.zeros(2, 12, 4, 4), torch.zeros(8, 12, 1, 1), torch.ones(12)
    assert kops.stage_ops(buf, (w, v, torch.nn.Parameter(v.clone()))) is kops._StageOps
    assert kops.stage_ops(buf.double(), (w.double(), v.double())) is None
    assert kops.stage_ops(buf, (w, torch.ones(24)[::2])) is None  # a BatchNorm weight read with unit stride
    assert kops.stage_ops(buf, (w.to("meta"), v)) is None
    assert kops.stage_ops(buf, (w, v), torch.zeros(2, 3, device="meta")) is None
    assert kops.stage_ops(buf.to("meta"), (w, v)) is None
    assert kops.stage_ops(buf.contiguous(memory_format=torch.channels_last), (w, v)) is None

    class _Sub(torch.Tensor):  # a tensor subclass (DTensor, a tracing wrapper): the library ops' dispatch
        pass

    assert kops.stage_ops(buf.as_subclass(_Sub), (w, v)) is None
    assert kops.stage_ops(buf, (w, v.as_subclass(_Sub))) is None
    assert kops.stage_ops(buf, (w, v), torch.zeros(2, 3).as_subclass(_Sub)) is None
    assert kops.stage_ops(buf, (w, torch.tensor(1.0))) is None  # a 0-dim parameter (its per-call check names it)
    # the 32-bit bound (tensors that large would need gigabytes: the bound's arithmetic alone): N*H*W values
    # per channel, a channel span (the buffer's, or an output of a conv's rows), a weight's rows x channels
    fits = kops._stage_fits_int32
    span = 2**31 - 2**19
    assert fits(2**15, 12, 2**16 - 16, 8) and not fits(2**15, 12, 2**16, 8)
    assert fits(1, span // 2**20, 2**20, 64) and not fits(1, span // 2**20 + 1, 2**20, 64)
    assert not fits(1, 12, 2**24, 2**8) and fits(1, 12, 2**24, 2**6)
    assert fits(1, 2**15, 1, 2**16 - 16) and not fits(1, 2**16, 1, 2**16)


def test_a_pruned_conv_falls_back_naming_pruning() -> None:
    """torch.nn.utils.prune re-applies its mask in a forward pre-hook, which makes shared/fused run the block
    as naive: the warning says it is the pruning, and how to make it permanent (from a probe: it named only
    "module hooks", which the user had not registered). The results are naive's."""
    import torch.nn.utils.prune as prune

    torch.manual_seed(0)
    ref, other = _pair(effdense.densenet_cifar(10, 4, num_classes=3), "shared")
    for m in (ref, other):
        prune.l1_unstructured(m.features.denseblock1.denselayer1.conv1, "weight", amount=0.3)
    with pytest.warns(UserWarning, match=r"denselayer1\.conv1 \(torch\.nn\.utils\.prune re-applies its mask in a forward "
                                         r"pre-hook; prune\.remove\(module, name\) makes the pruning permanent"):
        assert_matches(ref, other, torch.randn(2, 3, 8, 8), steps=1)


def test_fused_chunks_are_the_models_widest(monkeypatch) -> None:
    """On the kernels, every stage takes chunks as large as the model's largest (shared._widest_chunk).
    With chunks forced narrow (no byte allowance: two bottleneck widths, 32 channels here), the first block
    (8x8 planes) takes its input gradients in chunks of 32 channels and the second (4x4 planes, so 4x more
    channels in a chunk of the same size) in one each; results still match naive."""
    from effdense.kernels import bottleneck as kb
    from effdense.strategies import fused

    if not fused.kernels_available(torch.device("cpu")):
        pytest.skip("Triton kernels cannot run on cpu here (TRITON_INTERPRET unset)")
    monkeypatch.setattr(shared, "_CHUNK_BYTES", 0)
    widths: list[int] = []  # channels of each input-gradient launch, in launch order
    launch = kb.bottleneck_backward_input_launch

    def counted(x, *args):
        widths.append(x.shape[1])
        return launch(x, *args)

    monkeypatch.setattr(kb, "bottleneck_backward_input_launch", counted)
    torch.manual_seed(0)
    model = effdense.DenseNet(4, (8, 8), 8, bn_size=4, num_classes=3, small_inputs=True)  # bottleneck width 16
    ref, other = _pair(model, "fused")
    assert_matches(ref, other, torch.randn(2, 3, 8, 8), steps=1)
    # backward, stage by stage from the last: its transition (if any) over all channels, then its layers in
    # reverse. Block 1: layers over 8 + 4l channels (l = 0..7), transition over 40 (20 go on); block 2 at 4x4:
    # layers over 20 + 4l, no transition
    block1 = [n for c in [40, *range(36, 7, -4)] for n in _chunk_sizes(c, 32)]
    block2 = [n for c in range(48, 19, -4) for n in _chunk_sizes(c, 4 * 32)]
    assert widths == block2 + block1
    assert len(block1) > 9 and len(block2) == 8  # block 1 in chunks (40 and 36 channels in two), block 2 not


def test_sync_batchnorm_chunks_do_not_depend_on_the_local_batch() -> None:
    """Under SyncBatchNorm semantics the input gradient all-reduces BN1's sums once per channel chunk, so
    ranks with different local batches (N*H*W) must cut the same chunks; without sync the chunks widen with
    smaller planes (the byte allowance, and fused's model-wide chunk)."""
    block = effdense.densenet_cifar(100, 12).features.denseblock1  # 24 + 16*12 = 216 channels, bottleneck 48
    widths = {
        sync: {shared._stage_chunk_width(block, torch.empty(n, 24, 32, 32, device="meta"), 2, 96 * 8 * 32 * 32, sync)
               for n in (1, 5, 8, 64)}
        for sync in (True, False)
    }  # fmt: skip
    assert widths[True] == {96}
    assert len(widths[False]) > 1


def _chunk_sizes(channels: int, width: int) -> list[int]:
    from effdense.kernels.reference import channel_chunks

    return [c1 - c0 for c0, c1 in channel_chunks(channels, width)]


def test_fused_widest_chunks_keep_the_peak() -> None:
    """The model-wide chunk size leaves the largest chunk temporary of a step as it was, and the step's peak
    with it: DenseNet-121 at batch 64, 224x224 on the kernel path (estimated on meta tensors), where it
    removes every second-and-later chunk."""
    from effdense.memory import estimate_step
    from effdense.strategies import fused

    if not fused.kernels_available(torch.device("cpu")):
        pytest.skip("the kernel path needs TRITON_INTERPRET=1 on CPU")
    wide = estimate_step("densenet121", (64, 3, 224, 224), strategy="fused", backend="meta").peak
    original = shared.run_features
    try:
        shared.run_features = lambda model, x, ops=None, widest_chunks=False, **kw: original(model, x, ops, **kw)
        per_stage = estimate_step("densenet121", (64, 3, 224, 224), strategy="fused", backend="meta").peak
    finally:
        shared.run_features = original
    assert wide <= per_stage


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_fused_step_flops_equal_shareds(device) -> None:
    # FlopCounterMode over a training step: the Triton path's effdense::* ops carry FLOP formulas, so fused
    # counts the GEMMs shared's twins run (before: its bottleneck GEMMs counted 0)
    from torch.utils.flop_counter import FlopCounterMode

    from effdense.strategies import fused

    if not fused.kernels_available(torch.device(device)):
        pytest.skip(f"Triton kernels cannot run on {device} here (TRITON_INTERPRET unset)")
    counts = {}
    for strategy in ("shared", "fused"):
        torch.manual_seed(0)
        model = effdense.densenet_cifar(10, 4, num_classes=10, strategy=strategy).to(device)
        with FlopCounterMode(display=False) as counter:
            _step(model, torch.randn(2, 3, 12, 12, device=device), seed=0)
        counts[strategy] = counter.get_total_flops()
    assert counts["fused"] == counts["shared"] > 0


@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("cache", [True, False])
@pytest.mark.parametrize("shared_grad", [True, False])
def test_every_policy_matches_naive(recompute, cache, shared_grad) -> None:
    torch.manual_seed(0)
    policy = effdense.Policy(recompute_bottleneck=recompute, cache_stats=cache, shared_grad=shared_grad)
    model = effdense.DenseNet(6, (3, 2), 12, num_classes=4, small_inputs=True, drop_rate=0.1)
    assert_matches(*_pair(model, "shared", policy), torch.randn(3, 3, 10, 10))


@pytest.mark.parametrize("momentum", [None, 0.3])
def test_batchnorm_momentum_and_eval(momentum) -> None:
    torch.manual_seed(0)
    model = effdense.densenet_cifar(16, 4)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = momentum
    ref, other = _pair(model, "shared")
    x = torch.randn(3, 3, 8, 8)
    assert_matches(ref, other, x, steps=3)
    # eval mode: running statistics, nothing updated, same gradients
    ref.eval(), other.eval()
    assert_matches(ref, other, x, steps=1)


def test_batchnorm_momenta_mixed_within_a_block() -> None:
    """A stage's running-statistics updates run together, grouped by factor: BatchNorms with different
    momenta (None: cumulative average, with num_batches_tracked started at different counts) in one block
    still match nn.BatchNorm2d one by one; so do BatchNorms with running statistics and no counter
    (num_batches_tracked None: nothing counted, factor 0 with momentum None; before, a TypeError)."""
    torch.manual_seed(0)
    model = effdense.densenet_cifar(16, 4)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for i, m in enumerate(bns):
        m.momentum = (None, 0.3, 0.1, None)[i % 4]
        m.num_batches_tracked.fill_(i % 3)
        if i % 5 in (0, 3):  # (momentum None and 0.3 among them)
            m.register_buffer("num_batches_tracked", None)
    ref, other = _pair(model, "shared")
    assert_matches(ref, other, torch.randn(3, 3, 8, 8), steps=3)


def test_track_running_stats_false_is_honoured() -> None:
    torch.manual_seed(0)
    model = effdense.densenet_cifar(16, 4)
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.BatchNorm2d):
            m.track_running_stats = False
            m.running_mean = m.running_var = m.num_batches_tracked = None
    ref, other = _pair(model, "shared")
    x = torch.randn(2, 3, 8, 8)
    assert_matches(ref, other, x)
    ref.eval(), other.eval()  # batch statistics even in eval mode
    assert_matches(ref, other, x, steps=1)


def test_mixed_train_eval_layers() -> None:
    """A frozen (eval-mode) BN inside a training model uses its running statistics, as nn.BatchNorm2d."""
    torch.manual_seed(0)
    model = effdense.densenet_cifar(16, 4)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    model.features.denseblock1.denselayer1.norm1.eval()
    model.features.transition1.norm.eval()
    model.features.denseblock2.denselayer2.norm2.eval()
    ref, other = _pair(model, "shared")
    assert_matches(ref, other, torch.randn(2, 3, 8, 8))


def _with_random_running_stats(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model


@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
@pytest.mark.parametrize("strategy", ["checkpoint", "shared", "fused"])
@pytest.mark.parametrize("forward_mode, backward_mode", [("eval", "train"), ("train", "eval")])
def test_mode_switched_between_forward_and_backward(strategy, forward_mode, backward_mode, stem) -> None:
    """model.train()/.eval() between a forward and its backward: the gradient is that of the forward that
    ran (batch or running statistics as forward chose), as autograd gives for torchvision's model. The
    ImageNet stem (conv-BN-ReLU-pool) and checkpoint's bottlenecks are recomputed in backward: before, the
    recomputation ran in the new mode and checkpoint refused it (CheckpointError)."""
    torch.manual_seed(0)
    if stem == "cifar":
        model, x = effdense.densenet_cifar(16, 4), torch.randn(2, 3, 8, 8)
    else:
        model, x = effdense.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, num_classes=5), torch.randn(2, 3, 32, 32)
    model = _with_random_running_stats(model)
    ref, other = _pair(model, strategy)
    grads = []
    for m in (ref, other):
        xx = x.clone().requires_grad_()
        getattr(m, forward_mode)()
        out = m(xx)
        getattr(m, backward_mode)()
        (out * torch.linspace(-1.0, 2.0, out.numel()).view_as(out)).sum().backward()
        grads.append([xx.grad] + [p.grad for p in m.parameters()])
    for (name, _), a, b in zip([("input", None)] + list(ref.named_parameters()), *grads):
        # (the ImageNet stem's BN gradients in training mode are sums that cancel to ~1e-5: fp32 noise ~2e-7)
        assert (a - b).abs().max().item() <= RTOL * a.abs().max().item() + 1e-6, name


@pytest.mark.parametrize("strategy", ["shared", "fused"])
def test_eval_mode_nan_sample_stays_its_own(strategy) -> None:
    """In eval mode (running statistics) the samples are independent: a NaN pixel in one sample, with a loss
    over the others, leaves every input gradient and every BatchNorm bias gradient finite, as in the naive
    model. Before, BN1's backward ran the batch formula with zero sums, ``(x - mean) * 0`` made the NaN
    sample's gradient NaN, and the NaN spread through the shared gradient buffer into earlier layers' sums
    (and into BatchNorm biases). ``fused`` runs the real kernels where the interpreter is set."""
    torch.manual_seed(0)
    model = _with_random_running_stats(effdense.densenet_cifar(16, 4))
    ref, other = _pair(model, strategy)
    x = torch.randn(3, 3, 8, 8)
    x[0, 0, 2, 2] = float("nan")
    grads = []
    for m in (ref.eval(), other.eval()):
        xx = x.clone().requires_grad_()
        m(xx)[1:].sum().backward()
        grads.append([("input", xx.grad)] + [(n, p.grad) for n, p in m.named_parameters()])
    assert grads[0][0][1].isfinite().all()
    for (name, a), (_, b) in zip(*grads):
        assert torch.equal(a.isnan(), b.isnan()), f"{name}: NaN where the naive model has none, or the reverse"
        ok = a.isfinite()  # (a weight gradient summed over the NaN sample is NaN in both)
        if ok.any():
            assert (a[ok] - b[ok]).abs().max().item() <= RTOL * a[ok].abs().max().item() + 1e-7, name


@pytest.mark.parametrize("strategy", ["checkpoint", "shared", "fused"])
@pytest.mark.parametrize("swapped", ["parameters", "running_stats"])
@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
def test_functional_call_gradients_use_the_tensors_passed_in(strategy, swapped, stem) -> None:
    """``torch.func.functional_call`` with other tensors (MAML fast weights; eval-mode running statistics
    swapped in): the gradient is that of the forward that ran with them, as for ``naive``. Before, backward
    (shared, fused) or its recomputation (checkpoint, as torchvision's memory_efficient=True still does) read
    the module's own tensors, back in place by then: gradients off by up to ~90%, silently."""
    from torch.func import functional_call

    torch.manual_seed(0)
    if stem == "cifar":
        model, x = effdense.densenet_cifar(16, 4), torch.randn(3, 3, 8, 8)
    else:
        model, x = effdense.DenseNet(4, (2, 2), 8, bn_size=2, num_classes=5), torch.randn(3, 3, 40, 40)
    ref, other = _pair(_with_random_running_stats(model), strategy)
    grads = []
    for m in (ref, other):
        if swapped == "parameters":
            new = {n: (p.detach() * 1.1).requires_grad_() for n, p in m.named_parameters()}
        else:
            m.eval()
            new = {n: b * 1.5 if "running_var" in n else b + 0.1 for n, b in m.named_buffers() if "running" in n}
        xx = x.clone().requires_grad_()
        out = functional_call(m, new, (xx,))
        wrt = [xx] + (list(new.values()) if swapped == "parameters" else list(m.parameters()))
        grads.append(torch.autograd.grad((out * torch.linspace(-1.0, 2.0, out.numel()).view_as(out)).sum(), wrt))
    gmax = max(g.abs().max().item() for g in grads[0])  # (norm0's weight gradient is cancellation noise, see RTOL)
    for i, (a, b) in enumerate(zip(*grads)):
        assert (a - b).abs().max().item() <= RTOL * a.abs().max().item() + 1e-6 * gmax, f"gradient {i} differs"


@pytest.mark.parametrize("strategy", ["shared", "fused"])
def test_features_and_model_in_one_graph(strategy) -> None:
    """``model.features(x)`` and ``model(x)`` in one step (distillation, auxiliary losses), all in training
    mode: as naive. Before, the stage's running-statistics update bumped the versions of the statistics that
    the first call's plain transition BatchNorm had saved, and backward raised "modified by an inplace
    operation" (ATen's own update moves no version; only statistics a stage saved in eval mode must)."""
    torch.manual_seed(0)
    ref, other = _pair(effdense.DenseNet(3, (2, 3), 5, bn_size=2, small_inputs=True, num_classes=5), strategy)
    x = torch.randn(2, 3, 8, 8)
    grads = []
    for m in (ref, other):
        (m.features(x).mean() + m(x).square().sum()).backward()
        grads.append([p.grad for p in m.parameters()])
    for (name, _), a, b in zip(ref.named_parameters(), *grads):
        assert (a - b).abs().max().item() <= RTOL * a.abs().max().item() + 1e-7, name
    for (name, a), b in zip(ref.named_buffers(), other.buffers()):
        assert torch.allclose(a.float(), b.float(), rtol=RTOL, atol=1e-6), name


@pytest.mark.parametrize("strategy", ["shared", "fused"])
def test_bn2_statistics_accurate_at_a_large_mean(strategy) -> None:
    """BN1 biases of 100 make BN2's input mean far larger than its spread: gradients and BN2's running variance
    as close to an fp64 run as naive's (within 10x). Before, BN2's variance was E[y²] - E[y]² from fp32
    sums: input gradient ~1e-1 (shared) and ~5e-3 (fused) off, naive ~3e-6."""
    torch.manual_seed(0)
    model = effdense.DenseNet(4, (3,), 8, bn_size=4, small_inputs=True, num_classes=5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm1.bias"):
                p.fill_(100.0)
    x = torch.randn(4, 3, 8, 8)
    runs = {}
    for key, s, dtype in (("naive", "naive", torch.float32), ("ours", strategy, torch.float32), ("fp64", "naive", torch.float64)):
        m = copy.deepcopy(model).set_strategy(s).to(dtype)
        xx = x.to(dtype, copy=True).requires_grad_()
        (m(xx) * torch.linspace(-1.0, 2.0, 20, dtype=dtype).view(4, 5)).sum().backward()
        runs[key] = [xx.grad] + [p.grad for p in m.parameters()] + [b for n, b in m.named_buffers() if "norm2.running_var" in n]
    for i, (ours, naive, gold) in enumerate(zip(runs["ours"], runs["naive"], runs["fp64"])):
        scale = gold.abs().max().item()
        err, err_naive = (ours.double() - gold).abs().max().item(), (naive.double() - gold).abs().max().item()
        assert err <= 10 * err_naive + 1e-6 * scale, (i, err, err_naive)


@pytest.mark.parametrize("strategy", ["shared", "fused"])
@pytest.mark.parametrize("what", ["conv1.weight", "norm2.bias", "running_mean"])
def test_tensor_modified_in_place_before_backward_raises(strategy, what) -> None:
    """A parameter (or a running statistic an eval-mode BN normalised with) changed in place between forward
    and backward, e.g. an optimiser step in between: autograd's in-place error, as for torchvision's model."""
    torch.manual_seed(0)
    model = effdense.densenet_cifar(16, 4, strategy=strategy)
    layer = model.features.denseblock1.denselayer1
    if what == "running_mean":
        model.eval()
        tensor = layer.norm1.running_mean
    else:
        module, name = what.split(".")
        tensor = getattr(getattr(layer, module), name)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    loss = model(x).sum()
    with torch.no_grad():
        tensor.add_(1.0)
    # (the running statistics: effdense's message, which says what they are and what updates them)
    match = "BatchNorm running statistics .* modified by an inplace" if what == "running_mean" else "modified by an inplace"
    with pytest.raises(RuntimeError, match=match):
        loss.backward()


def test_gradcheck_float64_tiny_block() -> None:
    torch.manual_seed(0)
    model = effdense.DenseNet(3, (2,), 4, bn_size=2, num_classes=2, small_inputs=True).double()
    model.set_strategy("shared")
    block, transition = model.features.denseblock1, None
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    params = list(block.parameters())

    # the block's parameters are module attributes: gradcheck perturbs copies, swapped in per call
    # (running statistics change each call but do not affect training-mode outputs)
    inputs = (x,) + tuple(p.detach().clone().requires_grad_() for p in params)

    def f_params(x, *ps):
        saved = [p.data for p in params]
        for p, q in zip(params, ps):
            p.data = q
        try:
            out, _ = shared._DenseStageFunction.apply(
                shared._make_stage(block, transition, shared.reference_ops(), x), x, *ps
            )
        finally:
            for p, s in zip(params, saved):
                p.data = s
        return out

    assert torch.autograd.gradcheck(f_params, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_no_grad_and_eval_save_nothing() -> None:
    model = effdense.densenet_cifar(16, 4, strategy="shared")
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        out = model(x)
    assert out.grad_fn is None
    model.eval()
    with torch.no_grad():
        assert model(x).grad_fn is None


def test_second_backward_and_double_backward_raise() -> None:
    model = effdense.densenet_cifar(16, 4, strategy="shared")
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    loss = model(x).sum()
    loss.backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()
    loss = model(x).square().sum()
    (gx,) = torch.autograd.grad(loss, x, create_graph=True)
    with pytest.raises(RuntimeError, match="(?i)differentiable|once_differentiable|does not require grad"):
        gx.sum().backward()


_ONCE = "strategies 'shared' and 'fused' are differentiable once"


@pytest.mark.parametrize("strategy", ["shared", "fused"])
@pytest.mark.parametrize("how", ["grad_params", "backward_inputs", "grad_x", "grad_stem", "hvp", "features_slice"])
def test_every_second_derivative_through_a_block_raises(strategy, how) -> None:
    """A gradient penalty differentiated with respect to chosen tensors: autograd prunes the nodes that lead to
    none of them, and the double-backward guard led to the incoming gradient only, so these raised nothing
    and left out the blocks' part of the second derivative (block parameters None or zero, the stem's and the
    input's wrong; hvp exactly zero). Each must raise the message naming the way out."""
    torch.manual_seed(0)
    model = effdense.densenet_cifar(16, 4, strategy=strategy).double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    block_params = list(model.features.denseblock1.parameters())
    net = model.features[:3] if how == "features_slice" else model  # stem, block 1, transition 1: a linear loss
    if how == "hvp":
        params = dict(model.named_parameters())

        def loss(*values):
            out = torch.func.functional_call(model, dict(zip(params, values)), (x,))
            return out[:, 0].sum()

        with pytest.raises(RuntimeError, match=_ONCE):
            torch.autograd.functional.hvp(loss, tuple(params.values()), tuple(torch.ones_like(p) for p in params.values()))
        return
    (g,) = torch.autograd.grad(net(x)[:, 0].sum(), x, create_graph=True)  # (a constant incoming gradient)
    penalty = (g.flatten(1).norm(dim=1) - 1).square().mean()
    with pytest.raises(RuntimeError, match=_ONCE):
        if how in ("grad_params", "features_slice"):
            torch.autograd.grad(penalty, block_params, allow_unused=True)
        elif how == "backward_inputs":
            penalty.backward(inputs=block_params)
        elif how == "grad_x":
            torch.autograd.grad(penalty, x)
        else:
            torch.autograd.grad(penalty, model.features.conv0.weight)


def test_retain_graph_backpropagates_again_or_says_why() -> None:
    """retain_graph=True: a second backward gives the same gradients; with kept bottleneck outputs
    (freed by the first backward) it raises an error naming the policy instead of a wrong gradient."""
    model = effdense.densenet_cifar(16, 4, strategy="shared")
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    loss = model(x).square().sum()
    (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, x)
    torch.testing.assert_close(g1, g2, rtol=0, atol=0)
    model.set_strategy("shared", effdense.Policy(recompute_bottleneck=False))
    loss = model(x).square().sum()
    torch.autograd.grad(loss, x, retain_graph=True)
    with pytest.raises(RuntimeError, match="recompute_bottleneck=False"):
        torch.autograd.grad(loss, x)
    # a model without bottlenecks keeps nothing under that policy: it backpropagates again (it raised)
    plain = effdense.densenet_cifar(16, 4, bottleneck=False, strategy="shared")
    plain.policy = effdense.Policy(recompute_bottleneck=False)
    loss = plain(x).square().sum()
    (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, x)
    torch.testing.assert_close(g1, g2, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_autocast_low_precision(dtype) -> None:
    torch.manual_seed(0)
    model = effdense.densenet_cifar(16, 8)
    ref = copy.deepcopy(model).set_strategy("naive")
    model.set_strategy("shared")
    x = torch.randn(4, 3, 12, 12)
    with torch.autocast("cpu", dtype=dtype):
        out = model(x)
        block_out = model.features.denseblock1(model.features.conv0(x))
    assert block_out.dtype == dtype  # the block buffer holds the autocast dtype
    with torch.autocast("cpu", dtype=dtype):
        out_ref = ref(x)
    out.float().sum().backward()
    out_ref.float().sum().backward()
    exact = copy.deepcopy(ref).float()
    exact.zero_grad(set_to_none=True)
    out_fp32 = exact(x)
    out_fp32.sum().backward()
    err = (out.float() - out_fp32).abs().max().item()
    err_torch = (out_ref.float() - out_fp32).abs().max().item()
    assert err <= 2 * err_torch + 1e-2, (err, err_torch)
    # gradients: shared's error against fp32 within twice naive's own error in the same dtype
    for (name, p), q, g in zip(ref.named_parameters(), model.parameters(), exact.parameters()):
        assert q.grad is not None and q.grad.dtype == torch.float32
        gold = g.grad.float()
        err = (q.grad - gold).abs().max().item()
        err_torch = (p.grad - gold).abs().max().item()
        assert err <= 2 * err_torch + 1e-2 * gold.abs().max().item(), (name, err, err_torch)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("strategy", ["shared", "fused"])
def test_low_precision_model_in_eval_mode_backpropagates(strategy, dtype) -> None:
    """A model cast to bf16/fp16 (no autocast) in eval mode, with an input gradient (saliency maps, frozen-BN
    fine-tuning): before, BN2's backward handed the CPU kernel the model's bf16 running statistics beside an
    fp32 gamma ("mixed dtype (CPU)"). Errors against fp64 within twice naive's own in that dtype."""
    torch.manual_seed(0)
    base = _with_random_running_stats(effdense.densenet_cifar(16, 4))
    x = torch.randn(2, 3, 8, 8)
    grads = {}
    for name, s, dt in (("naive", "naive", dtype), ("ours", strategy, dtype), ("fp64", "naive", torch.float64)):
        m = copy.deepcopy(base).set_strategy(s).to(dt).eval()
        xx = x.to(dt).requires_grad_()
        m(xx).float().square().sum().backward()
        grads[name] = [xx.grad.double()] + [p.grad.double() for p in m.parameters()]
    for i, (ours, naive, gold) in enumerate(zip(grads["ours"], grads["naive"], grads["fp64"])):
        scale = gold.abs().max().item()
        err, err_naive = (ours - gold).abs().max().item(), (naive - gold).abs().max().item()
        assert err <= 2 * err_naive + 1e-2 * scale, (i, err, err_naive)


@pytest.mark.parametrize("dtype", [torch.float16])  # (bfloat16's range holds these variances)
@pytest.mark.parametrize("strategy", ["shared", "fused"])
def test_low_precision_running_stats_blend_in_float32(strategy, dtype) -> None:
    """A float16 model fed a batch variance above 65504 (float16's largest value): the running variance
    ``0.9 * 1 + 0.1 * var`` fits, and naive keeps it finite. Casting the batch statistics to the buffers' dtype
    before blending made it ``inf`` (eval then normalised every such channel to 0). Now the blend is computed
    in float32 and rounded once: within one rounding of the float64 blend of naive's own batch statistics."""
    torch.manual_seed(0)
    base = effdense.densenet_cifar(16, 4).to(dtype)
    x = (300 * torch.randn(2, 3, 8, 8)).to(dtype)  # stem outputs of std ~1e3: batch variances ~1e6
    runs = {}
    for s in ("naive", strategy):
        m = copy.deepcopy(base).set_strategy(s).train()
        with torch.no_grad():
            m(x)
        runs[s] = m
    bn = runs[strategy].features.denseblock1.denselayer1.norm1
    ref = runs["naive"].features.denseblock1.denselayer1.norm1
    with torch.no_grad():  # the float64 blend of the batch statistics of the input naive's norm1 saw
        feats = runs["naive"].features.conv0(x).double()
    var = feats.var((0, 2, 3), unbiased=True)
    assert var.max() > 65504
    gold = 0.9 * base.features.denseblock1.denselayer1.norm1.running_var.double() + 0.1 * var
    assert torch.isfinite(ref.running_var).all()
    assert torch.isfinite(bn.running_var).all()
    torch.testing.assert_close(bn.running_var.double(), gold, rtol=2 ** -10, atol=0)
    for name, b in runs[strategy].named_buffers():
        if "running" in name:
            assert torch.isfinite(b).all() == torch.isfinite(dict(runs["naive"].named_buffers())[name]).all(), name

def test_channels_last_input() -> None:
    torch.manual_seed(0)
    model = effdense.densenet_cifar(16, 4)
    x = torch.randn(2, 3, 9, 9).to(memory_format=torch.channels_last)
    assert_matches(*_pair(model, "shared"), x)


@pytest.mark.parametrize("strategy", ["shared", "fused"])
def test_channels_last_model_gets_gradients_in_its_parameters_layout(strategy) -> None:
    # each bottleneck's and transition's 1x1 weight gradient came back contiguous, (C, 1, 1, 1) strides, on a
    # channels_last model whose weights have (C, 1, C, C): DDP warned "Grad strides do not match bucket view
    # strides" on every rank and copied them each step (naive and checkpoint matched the parameters)
    torch.manual_seed(0)
    model = effdense.densenet_cifar(16, 4, strategy=strategy).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last)
    model(x).sum().backward()
    odd = [n for n, p in model.named_parameters() if p.grad.stride() != p.stride()]
    assert not odd, odd


@pytest.mark.parametrize("strategy", ["shared", "fused"])
def test_channels_last_model_with_dropout_matches_naive(strategy) -> None:
    # backward replayed dropout's RNG on a contiguous gradient, while forward drew the mask for a channels_last
    # convolution output (numbers drawn in memory order): another mask, gradients off by O(1)
    torch.manual_seed(0)
    model = effdense.densenet_cifar(16, 4, drop_rate=0.3).to(memory_format=torch.channels_last)
    x = torch.randn(3, 3, 8, 8).to(memory_format=torch.channels_last)
    assert_matches(*_pair(model, strategy), x)


@pytest.mark.parametrize("strategy", ["shared", "fused"])
def test_a_drop_rate_set_as_a_0d_tensor_matches_naive(strategy) -> None:
    # a schedule that sets layer.drop_rate = torch.tensor(0.3): backward's replay drew through bernoulli_'s tensor
    # overload, other numbers than forward's dropout, and raised the error meant for another thread's draw
    torch.manual_seed(0)
    model = effdense.densenet_cifar(16, 4)
    for layer in model.modules():
        if isinstance(layer, effdense.densenet._DenseLayer):
            layer.drop_rate = torch.tensor(0.3)
    assert_matches(*_pair(model, strategy), torch.randn(3, 3, 8, 8))


@pytest.mark.parametrize("strategy", ["shared", "fused"])
@pytest.mark.parametrize("new_rate", [0.0, 0.5])
def test_dropout_rate_changed_before_backward_applies_forwards_rate(strategy, new_rate) -> None:
    """A dropout schedule that sets the layers' ``drop_rate`` between a forward and its backward (or two
    forwards at different rates, one backward): backward read the layer's rate then, not forward's. 0.2 -> 0.5
    gave input gradients off by O(1), silently; 0.2 -> 0.0 raised the error meant for another thread's draw."""
    torch.manual_seed(0)
    model = effdense.densenet_cifar(16, 4, drop_rate=0.2).double()
    ref, other = _pair(model, strategy)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    grads = []
    for m in (ref, other):
        xx = x.clone().requires_grad_()
        torch.manual_seed(1)
        first = m(xx)
        for layer in m.modules():
            if isinstance(layer, effdense.densenet._DenseLayer):
                layer.drop_rate = new_rate
        torch.manual_seed(2)
        second = m(xx)
        (first.square().sum() + second.sum()).backward()
        grads.append([xx.grad] + [p.grad for p in m.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)


def test_fake_tensor_mode_shapes_only() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        model = effdense.densenet121(strategy="shared")
        x = torch.randn(64, 3, 224, 224)
        out = model(x)
        out.sum().backward()
        assert out.shape == (64, 1000)
        assert model.features.conv0.weight.grad.shape == model.features.conv0.weight.shape


@pytest.mark.parametrize("strategy", ["shared", "fused"])
@pytest.mark.parametrize("how", ["relu_after_backbone", "hook_on_block"])
def test_block_output_modified_in_place_says_what_and_why(strategy, how) -> None:
    """A block run on its own returns its feature buffer, which backward needs: changing it in place (a backbone
    slice with nn.ReLU(inplace=True) after it, a hook that edits the output) gave autograd's bare version error,
    naming only _DenseStageFunction. naive trains (torch.cat's output is free to change)."""
    torch.manual_seed(0)
    model = effdense.densenet_cifar(16, 4, strategy=strategy)
    if how == "relu_after_backbone":
        net = nn.Sequential(*list(model.features.children())[:2], nn.ReLU(inplace=True))  # conv0, denseblock1
    else:
        model.features.denseblock2.register_forward_hook(lambda m, i, o: o.clamp_(max=5.0))
        net = model
    x = torch.randn(2, 3, 8, 8)
    loss = net(x).sum()
    with pytest.raises(RuntimeError, match="effdense shared/fused: the output of a dense block .* was modified in "
                                           "place before backward.*strategy 'checkpoint' or 'naive'"):  # fmt: skip
        loss.backward()
    model.set_strategy("naive")
    net(x).sum().backward()  # what the message offers works


@pytest.mark.parametrize("strategy", ["shared", "fused"])
@pytest.mark.parametrize("module", ["denselayer1.conv1", "denselayer2.norm1", "denselayer1.conv2"])
def test_a_module_in_another_dtype_raises_as_naive(strategy, module) -> None:
    """Outside autocast, a layer put in fp64 in an fp32 model (and an fp32 conv in a bf16 model) is an error
    for naive and torchvision; shared/fused cast its parameters and computed it in the input's dtype silently."""
    for model_dtype, module_dtype in ((torch.float32, torch.float64), (torch.bfloat16, torch.float32)):
        if model_dtype == torch.bfloat16 and "norm" in module:
            continue  # (fp32 BatchNorm in a bf16 model is allowed: below)
        for s in ("naive", strategy):
            torch.manual_seed(0)
            model = effdense.densenet_cifar(16, 4, strategy=s).to(model_dtype)
            model.features.denseblock1.get_submodule(module).to(module_dtype)
            x = torch.randn(2, 3, 8, 8, dtype=model_dtype)
            match = "effdense: denselayer.* of a dense block has torch.* parameters but the block's input is" if s == strategy else None
            with pytest.raises(RuntimeError, match=match):
                model(x).sum().backward()
    # allowed: BatchNorm in fp32 in a bf16 model, as naive allows it; under autocast, an fp32 conv (autocast
    # casts it), not an fp64 one (autocast leaves it alone: naive raises, and shared/fused computed it in bf16)
    ref = effdense.densenet_cifar(16, 4, strategy="naive").bfloat16()
    ref.features.denseblock1.denselayer2.norm1.float()
    _, other = _pair(ref, strategy)
    x = torch.randn(2, 3, 8, 8, dtype=torch.bfloat16)
    torch.testing.assert_close(other(x), ref(x), rtol=2e-2, atol=2e-2)
    for model in (ref, other):
        model.features.denseblock1.denselayer1.conv1.float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(x.float()).sum().backward()
        model.features.denseblock1.denselayer1.conv1.double()
        with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(RuntimeError):
            model(x.float()).sum().backward()


@pytest.mark.parametrize("strategy, name", [
    ("shared", "features.conv0.weight"), ("fused", "features.norm0.weight"),
    ("checkpoint", "features.denseblock1.denselayer1.conv1.weight"),
    ("checkpoint", "features.denseblock1.denselayer2.norm1.bias"),
])  # fmt: skip
def test_recomputed_parameter_modified_in_place_before_backward_raises(strategy, name) -> None:
    """What is recomputed in backward (the ImageNet stem; under checkpoint each BN1-ReLU-conv1x1) read the
    parameters as they were at backward: one changed in place in between (an optimiser step) gave gradients
    of the new values, where the plain model raises autograd's in-place error."""
    torch.manual_seed(0)
    model = effdense.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2, num_classes=5,
                              strategy=strategy)  # fmt: skip
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    loss = model(x).square().sum()
    with torch.no_grad():
        model.get_parameter(name).mul_(1.5)
    with pytest.raises(RuntimeError, match=r"modified by an inplace operation: \[.*\] \((Conv2d|BatchNorm2d)\.(weight|bias), "
                                           r"read again when effdense recomputes it in backward\)"):  # fmt: skip
        loss.backward()


def _stage_nodes(t: torch.Tensor) -> list:
    """The _DenseStageFunction nodes (their ctx) in ``t``'s graph."""
    seen, stack, found = set(), [t.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == "_DenseStageFunctionBackward":
            found.append(node)
        stack.extend(n for n, _ in node.next_functions)
    return found


@pytest.mark.parametrize("strategy", ["shared", "fused"])
def test_a_backpropagated_graph_releases_the_stage_state(strategy) -> None:
    """After a backward without retain_graph the stage's kept state (statistics, affines, RNG states) is freed,
    as autograd frees the graph's saved tensors: a graph kept alive afterwards (running_loss += loss) held
    ~0.5 MB of it per DenseNet-121 step. With retain_graph=True it stays, and a second backward works."""
    model = effdense.densenet_cifar(16, 4, strategy=strategy)
    x = torch.randn(2, 3, 8, 8)
    loss = model(x).square().sum()
    nodes = _stage_nodes(loss)
    assert len(nodes) == 3 and all(n.state is not None for n in nodes)
    loss.backward(retain_graph=True)
    assert all(n.state is not None for n in nodes)
    loss.backward()
    assert all(n.state is None for n in nodes)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()


def test_running_statistics_are_flagged_only_while_a_graph_that_saved_them_lives() -> None:
    """An eval-mode forward with gradients saves the running statistics it normalised with; once that graph is
    backpropagated or dropped, they are no longer flagged (they stayed flagged for the model's lifetime). The
    training-mode updates never move their versions, as ATen's batch norm does not: while such a graph lived, a
    step that also ran the model's modules as plain BatchNorms (model.features(x) beside model(x)), which save
    the running statistics too, failed with PyTorch's bare version error. The eval graph's own backward refuses."""

    def flagged(t):
        entry = shared._SAVED_RUNNING.get(id(t))
        return entry is not None and entry[0]() is t

    model = effdense.densenet_cifar(16, 4, strategy="shared")
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    mean = model.features.denseblock1.denselayer1.norm1.running_mean
    for release in ("drop", "backward"):
        model.eval()
        out = model(x)
        assert flagged(mean)
        if release == "backward":
            out.sum().backward()
        del out
        assert not flagged(mean), release
        model.train()
        version = mean._version
        model(x).sum().backward()
        assert mean._version == version, release
    model.eval()
    kept = model(x).sum()  # an eval graph kept alive
    model.train()
    version = mean._version
    (model.features(x).sum() + model(x).square().sum()).backward()
    assert mean._version == version
    with pytest.raises(RuntimeError, match=r"running statistics .* modified by an inplace operation .*training-mode"):
        kept.backward()


def _resize_head(model: nn.Module, channels: int) -> None:
    model.features.norm5 = nn.BatchNorm2d(channels)
    model.classifier = nn.Linear(channels, model.classifier.out_features)


@pytest.mark.parametrize("strategy", ["shared", "fused"])
@pytest.mark.parametrize("surgery", ["append_last", "pop_last_of_middle"])
def test_layer_added_or_removed_after_construction(strategy, surgery) -> None:
    """Model surgery on a block's layers, with what follows resized: the shared buffer was sized by the
    block's layer count at construction, so a layer appended raised a bare size error, one removed a
    BatchNorm size error. Now the block's output width counts the layers it holds, and the model matches naive."""
    torch.manual_seed(0)
    model = effdense.densenet_cifar(16, 4)
    f = model.features
    if surgery == "append_last":
        block = f.denseblock3
        block.add_module("denselayer3", effdense.densenet._DenseLayer(block.num_output_features, 4, 4, 0.0))
        _resize_head(model, block.num_output_features)
    else:
        block = f.denseblock2
        del block.denselayer2
        c = block.num_output_features
        f.transition2.norm = nn.BatchNorm2d(c)
        f.transition2.conv = nn.Conv2d(c, f.transition2.conv.out_channels, 1, bias=False)
    assert block.num_output_features == block.num_input_features + len(block.layers) * block.growth_rate
    with pytest.raises(AttributeError, match="counted from the layers it holds"):
        block.num_output_features += 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (the layout is a dense block's: no fallback to naive)
        assert_matches(*_pair(model, strategy), torch.randn(2, 3, 8, 8))


@pytest.mark.parametrize("strategy", ["shared", "fused"])
def test_layer_removed_without_resizing_the_rest_raises_as_naive(strategy) -> None:
    """A layer deleted and what reads the block's output left as it was (a mistake naive catches with
    PyTorch's size error): shared/fused ran on, the missing channels read from an uninitialised buffer
    (different outputs for identical forwards). Now the stage sees the channel counts are not its block's,
    warns naming the block, and runs as naive, which raises."""
    torch.manual_seed(0)
    model = effdense.densenet_cifar(16, 4, strategy=strategy)
    del model.features.denseblock2.denselayer1  # the second layer now reads 4 channels fewer than it holds
    with pytest.warns(UserWarning, match=r"features\.denseblock2\) runs as strategy 'naive'.*denselayer2\.norm1"
                      r"\.num_features = \d+, expected \d+"):
        with pytest.raises(RuntimeError, match="running_mean should contain"):
            model(torch.randn(2, 3, 8, 8))


def test_fallback_warning_names_the_block() -> None:
    """Every block has a ``denselayer1``: the warning of a module swapped in names the block too."""
    model = effdense.densenet_cifar(16, 4, strategy="shared")
    conv = model.features.denseblock2.denselayer1.conv2
    model.features.denseblock2.denselayer1.conv2 = nn.Conv2d(conv.in_channels, conv.out_channels, 3, padding=1)
    with pytest.warns(UserWarning, match=r"dense block \(features\.denseblock2\) .* denselayer1\.conv2"):
        model(torch.randn(2, 3, 8, 8))


def test_block_input_channels_checked() -> None:
    block = effdense.densenet_cifar(16, 4, strategy="shared").features.denseblock1
    # which of a model's blocks is named (before, a 10-block model's error said none)
    with pytest.raises(ValueError, match="dense block features.denseblock1 expects input \\(N, 8, H, W\\), got shape \\(2, 5, 4, 4\\)"):
        block(torch.randn(2, 5, 4, 4))
    model = nn.Sequential(block)
    effdense.set_strategy(model, "shared")  # (the name set_strategy gives it in a model of one's own)
    with pytest.raises(ValueError, match="dense block 0 expects input \\(N, 8, H, W\\)"):
        model(torch.randn(2, 5, 4, 4))
    with pytest.raises(ValueError, match="^dense block expects input"):  # a block never named: none said
        effdense.DenseBlock(2, 8, 4, 4, 0.0, strategy="shared")(torch.randn(2, 5, 4, 4))
    # an integer input: the parameter-dtype check advised model.to(torch.int64) or autocast
    for strategy in ("shared", "fused"):
        with pytest.raises(TypeError, match="^dense block expects a floating-point input, got dtype torch.int64; convert with x.float"):
            effdense.DenseBlock(2, 8, 4, 4, 0.0, strategy=strategy)(torch.ones(2, 8, 4, 4, dtype=torch.long))


def test_batch_of_one_pixel_raises_like_batchnorm() -> None:
    """The same ValueError, in the same words, as PyTorch's BatchNorm gives naive (the size was a tuple)."""
    messages = {}
    for strategy in ("naive", "shared", "fused"):
        block = effdense.densenet_cifar(16, 4, strategy=strategy).features.denseblock1
        with pytest.raises(ValueError, match="Expected more than 1 value per channel when training") as info:
            block(torch.randn(1, 8, 1, 1))
        messages[strategy] = str(info.value)
    assert messages["shared"] == messages["fused"] == messages["naive"], messages


def test_block_alone_returns_full_buffer() -> None:
    model = effdense.densenet_cifar(16, 4)
    block = model.features.denseblock1
    x = torch.randn(2, block.num_input_features, 5, 5)
    naive = copy.deepcopy(block)
    naive.strategy = "naive"
    block.strategy = "shared"
    out = block(x)
    assert out.shape == (2, block.num_output_features, 5, 5)
    assert torch.allclose(out, naive(x), atol=1e-5)
    assert torch.equal(out[:, : block.num_input_features], x)


class _ClippedReLU(nn.ReLU):  # a subclass with a forward of its own: computed as plain ReLU before
    def forward(self, x):
        return torch.clamp(x, 0.0, 0.5)


class _ScaledBN(nn.BatchNorm2d):
    def forward(self, x):
        return 2.0 * super().forward(x)


def _subclassed(cls, m):
    new = cls(m.num_features) if cls is _ScaledBN else cls()
    new.load_state_dict(m.state_dict())
    return new


def _without(bn: nn.BatchNorm2d, name: str) -> nn.BatchNorm2d:
    """``bn`` with its ``name`` parameter removed (``nn.BatchNorm2d(C, bias=False)`` where PyTorch has it)."""
    setattr(bn, name, None)
    return bn


def _bias_conv(conv: nn.Conv2d) -> nn.Conv2d:
    new = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, padding=conv.padding, bias=True)
    with torch.no_grad():
        new.weight.copy_(conv.weight)
        new.bias.uniform_(-1.0, 1.0)
    return new


@pytest.mark.parametrize(
    "bottleneck, path, make",
    [
        (True, "denseblock1.denselayer1.conv1", _bias_conv),
        (True, "denseblock2.denselayer1.conv2", _bias_conv),
        (False, "denseblock1.denselayer1.conv1", _bias_conv),
        (True, "transition1.conv", _bias_conv),
        (True, "denseblock1.denselayer1.norm1", lambda bn: nn.BatchNorm2d(bn.num_features, affine=False)),
        (True, "denseblock2.denselayer1.norm2", lambda bn: nn.BatchNorm2d(bn.num_features, affine=False)),
        (True, "transition2.norm", lambda bn: nn.BatchNorm2d(bn.num_features, affine=False)),
        (True, "denseblock3.denselayer1.relu2", lambda relu: nn.LeakyReLU(0.2)),
        (True, "transition1.relu", lambda relu: nn.SiLU()),
        (True, "transition1.pool", lambda pool: nn.MaxPool2d(2)),
        (True, "denseblock1.denselayer1.conv1", lambda conv: nn.Sequential(conv)),  # no out_channels to read
        (True, "denseblock1.denselayer1.relu1", lambda relu: _subclassed(_ClippedReLU, relu)),
        (True, "transition1.relu", lambda relu: _subclassed(_ClippedReLU, relu)),
        (True, "denseblock2.denselayer1.norm2", lambda bn: _subclassed(_ScaledBN, bn)),
        (False, "denseblock1.denselayer1.norm1", lambda bn: _subclassed(_ScaledBN, bn)),
        # no bias (a constructor option in recent PyTorch) or no weight: before, AttributeError in _bn_affine
        (True, "denseblock1.denselayer1.norm2", lambda bn: _without(bn, "bias")),
        (True, "denseblock2.denselayer1.norm1", lambda bn: _without(bn, "weight")),
        (False, "denseblock1.denselayer1.norm1", lambda bn: _without(bn, "bias")),
        (True, "transition1.norm", lambda bn: _without(bn, "bias")),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
@pytest.mark.parametrize("strategy", ["shared", "fused"])
def test_modules_swapped_in_by_a_user_run_as_naive(bottleneck, path, make, strategy) -> None:
    """A user's own module in a stage (a conv with a bias, affine=False, another activation or pool): the
    shared Function computes what torchvision's modules compute, so such a stage runs its modules, as naive,
    with a warning naming them (before: the bias and the activation were silently ignored, running statistics
    and outputs differed, bias gradients were None; affine=False raised AttributeError or ValueError)."""
    torch.manual_seed(0)
    model = effdense.densenet_cifar(10, 4, num_classes=3, bottleneck=bottleneck, compression=0.5)
    parent, name = f"features.{path}".rsplit(".", 1)
    setattr(model.get_submodule(parent), name, make(model.get_submodule(f"features.{path}")))
    ref, other = _pair(model, strategy)
    named = path.split(".", 1)[1] if path.startswith("denseblock") else "transition." + name  # within the stage
    with pytest.warns(UserWarning, match=rf"runs as strategy 'naive'.* because its modules {named} "):
        assert_matches(ref, other, torch.randn(2, 3, 8, 8))


class _TanhLayer(effdense.densenet._DenseLayer):  # a layer class with a forward of its own
    def forward(self, inputs):
        return torch.tanh(super().forward(inputs))


class _HalfTailLayer(effdense.densenet._DenseLayer):  # keeps forward, changes a part it calls
    def tail(self, bottleneck_output):
        return 0.5 * super().tail(bottleneck_output)


class _TanhTransition(effdense.densenet._Transition):
    def forward(self, x):
        return torch.tanh(super().forward(x))


class _ScaledFeatures(nn.Sequential):  # (not tanh: the model's in-place ReLU after features would break it)
    def forward(self, x):
        return 2.0 * super().forward(x) - 0.1


def _patch(m: nn.Module, fn) -> None:
    """``m.forward = fn(m, ...)`` on the instance (its class untouched)."""
    m.forward = types.MethodType(fn, m)


_OWN_FORWARDS = {
    "layer subclass": lambda f: setattr(f.denseblock1.denselayer2, "__class__", _TanhLayer),
    "layer subclass's tail": lambda f: setattr(f.denseblock2.denselayer1, "__class__", _HalfTailLayer),
    "layer instance forward": lambda f: _patch(
        f.denseblock1.denselayer1, lambda self, i: torch.tanh(effdense.densenet._DenseLayer.forward(self, i))
    ),
    "relu1 instance forward": lambda f: _patch(f.denseblock2.denselayer1.relu1, lambda self, x: x.clamp(0.0, 0.5)),
    "transition subclass": lambda f: setattr(f.transition1, "__class__", _TanhTransition),
    "transition instance forward": lambda f: _patch(f.transition1, lambda self, x: torch.tanh(nn.Sequential.forward(self, x))),
    "transition pool instance forward": lambda f: _patch(f.transition1.pool, lambda self, x: torch.nn.functional.max_pool2d(x, 2)),
    "block instance forward": lambda f: _patch(
        f.denseblock2, lambda self, x: torch.tanh(effdense.densenet._DenseBlock.forward(self, x))
    ),
    "features subclass": lambda f: setattr(f, "__class__", _ScaledFeatures),
}


@pytest.mark.filterwarnings("ignore:effdense. a dense block.* runs as strategy 'naive'")
@pytest.mark.parametrize("case", list(_OWN_FORWARDS))
@pytest.mark.parametrize("strategy", ["checkpoint", "shared", "fused"])
def test_own_forwards_are_run(case, strategy) -> None:
    """A dense layer, transition, block, ``features`` or part module with a forward of its own (a subclass, or
    one patched onto the instance) computes as on torchvision's model, where every container calls its children.
    Before, shared/fused computed the stage from the parts and skipped those forwards silently (outputs off by
    ~0.2), and checkpoint skipped a layer's."""
    models = []
    for s in ("naive", strategy):  # two builds (a patched bound method would not follow a deepcopy)
        torch.manual_seed(0)
        model = effdense.densenet_cifar(16, 4, num_classes=3, compression=0.5, strategy=s)
        _OWN_FORWARDS[case](model.features)
        models.append(model)
    assert_matches(*models, torch.randn(2, 3, 8, 8))


@pytest.mark.filterwarnings("ignore:effdense. a dense block.* runs as strategy 'naive'")
@pytest.mark.parametrize("cls, method", [("_DenseLayer", "forward"), ("_DenseLayer", "tail"), ("_DenseBlock", "forward")])
@pytest.mark.parametrize("strategy", ["checkpoint", "shared", "fused"])
def test_methods_patched_on_effdense_classes_are_run(cls, method, strategy, monkeypatch) -> None:
    """``effdense.densenet._DenseLayer.forward = f`` (a patch on the class, not a subclass or an instance): the
    strategies run it, as they run a subclass's. Before, shared/fused computed the stage from its parts and
    ignored such a patch silently."""
    klass = getattr(effdense.densenet, cls)
    original = getattr(klass, method)
    monkeypatch.setattr(klass, method, lambda self, *a: torch.tanh(original(self, *a)))
    models = []
    for s in ("naive", strategy):
        torch.manual_seed(0)
        models.append(effdense.densenet_cifar(16, 4, num_classes=3, compression=0.5, strategy=s))
    assert_matches(*models, torch.randn(2, 3, 8, 8))


@pytest.mark.parametrize("strategy", ["checkpoint", "shared", "fused"])
def test_a_layer_with_its_own_forward_is_named_in_the_fallback_warning(strategy) -> None:
    model = effdense.densenet_cifar(16, 4, num_classes=3, strategy=strategy)
    model.features.denseblock1.denselayer2.__class__ = _TanhLayer
    with pytest.warns(UserWarning, match=rf"runs as strategy 'naive' instead of .*{strategy}.* denselayer2"):
        model(torch.randn(2, 3, 8, 8))


def test_a_blocks_strategy_is_checked_when_set() -> None:
    block = effdense.densenet_cifar(16, 4).features.denseblock1
    with pytest.raises(ValueError, match="unknown strategy 'Naive'"):  # before: a bare KeyError at the next forward
        block.strategy = "Naive"
    block.strategy = "checkpoint"
    assert block.strategy == "checkpoint"
    # a block pickled before the property held "strategy" in its instance dict
    state = block.__getstate__()
    state["strategy"] = state.pop("_strategy")
    old = effdense.densenet._DenseBlock.__new__(effdense.densenet._DenseBlock)
    old.__setstate__(state)
    assert old.strategy == "checkpoint"
    state["strategy"] = "Naive"  # assigned unchecked in the old version: refused when loaded
    with pytest.raises(ValueError, match="unknown strategy 'Naive'"):
        effdense.densenet._DenseBlock.__new__(effdense.densenet._DenseBlock).__setstate__(state)


def test_a_blocks_policy_is_checked_when_set_and_kept_until_the_model_sets_one() -> None:
    """A block's policy: checked when set (a dict or None failed with an AttributeError deep in the next
    forward); kept by set_strategy without a policy, by estimate_step given the model's own strategy and by
    convert() (all three put the model's policy back on every block, silently); replaced by a model-wide one."""
    from effdense.memory import estimate_step

    model = effdense.densenet_cifar(16, 4, strategy="shared")
    block = model.features.denseblock1
    for bad in ({"cache_stats": False}, None):
        with pytest.raises(TypeError, match="a dense block's policy must be an effdense.Policy, got"):
            block.policy = bad
    own = effdense.Policy(recompute_bottleneck=False)
    block.policy = own
    shape = (2, 3, 8, 8)
    peak = estimate_step(model, shape).peak
    assert estimate_step(model, shape, strategy="shared").peak == peak
    assert estimate_step(model, shape, strategy="shared", policy=effdense.Policy()).peak < peak
    model.set_strategy("fused")
    assert block.policy is own and model.features.denseblock2.policy == effdense.Policy()
    assert effdense.convert(model).features.denseblock1.policy is own
    assert effdense.convert(model, policy=effdense.Policy()).features.denseblock1.policy == effdense.Policy()
    model.policy = effdense.Policy(cache_stats=False)
    assert block.policy == model.features.denseblock2.policy == effdense.Policy(cache_stats=False)
    # a block pickled before the property held "policy" in its instance dict
    state = block.__getstate__()
    state["policy"] = state.pop("_policy")
    old = effdense.densenet._DenseBlock.__new__(effdense.densenet._DenseBlock)
    old.__setstate__(state)
    assert old.policy == effdense.Policy(cache_stats=False)


@pytest.mark.parametrize("strategy", ["shared", "fused"])
def test_a_blocks_own_strategy_is_honoured_under_the_models(strategy, monkeypatch) -> None:
    """``block.strategy`` decides how a block runs (the _DenseBlock docstring): before, a shared/fused model
    ran every block through its stage Function whatever the blocks said."""
    applied = []
    original = shared._DenseStageFunction.apply
    monkeypatch.setattr(shared._DenseStageFunction, "apply", lambda *a: (applied.append(a[0].block), original(*a))[1])
    torch.manual_seed(0)
    model = effdense.densenet_cifar(16, 4, num_classes=3)
    ref, other = _pair(model, strategy)
    blocks = [b for name, b in other.features.named_children() if name.startswith("denseblock")]
    blocks[0].strategy = "naive"
    assert_matches(ref, other, torch.randn(2, 3, 8, 8))
    assert applied and all(b is not blocks[0] for b in applied) and any(b is blocks[1] for b in applied)
    # the other way round: a naive model whose blocks are set to the strategy runs them on it
    applied.clear()
    for b in ref.features.children():
        if hasattr(b, "growth_rate"):
            b.strategy = strategy
    ref(torch.randn(2, 3, 8, 8))
    assert len(applied) == 3


@pytest.mark.parametrize("strategy", ["shared", "fused"])
@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
def test_float64_model_under_autocast_runs_in_float64(strategy, stem) -> None:
    """Autocast leaves float64 tensors alone, so an fp64 model under autocast runs in fp64, as naive's modules
    do. Before, the stage took autocast's dtype whatever the input's, filled its buffer in bf16 and the next
    plain module (norm5, or the transition after a block) failed with a dtype mismatch."""
    torch.manual_seed(0)
    if stem == "cifar":
        model, x = effdense.densenet_cifar(16, 4), torch.randn(2, 3, 8, 8)
    else:
        model, x = effdense.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, num_classes=5), torch.randn(2, 3, 32, 32)
    ref, other = _pair(model.double(), strategy)
    outs = []
    for m in (ref, other):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x.double())
        assert out.dtype == torch.float64
        out.square().sum().backward()
        outs.append((out, [p.grad for p in m.parameters()]))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-10, atol=1e-12)
    for a, b in zip(outs[1][1], outs[0][1]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_auto_is_not_fused_under_deterministic_algorithms(monkeypatch) -> None:
    """The fused kernels sum across programs with atomics (their last bits vary on a GPU): under
    torch.use_deterministic_algorithms(True) "auto" takes shared instead of raising at the first kernel."""
    from effdense import strategies

    monkeypatch.setattr(strategies, "fused_supported", lambda x: True)  # as on a GPU
    x = torch.randn(2, 3, 8, 8)
    assert strategies.resolve("auto", x) == "fused"
    was, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        assert strategies.resolve("auto", x) == "shared"
        assert strategies.resolve("fused", x) == "fused"  # an explicit choice stands (its kernels then raise)
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn_only)


@pytest.mark.parametrize("strategy", ["shared", "fused"])
def test_allow_mutation_on_saved_tensors_runs_auto_as_naive(strategy) -> None:
    """Before: a bare KeyError ('out') or AttributeError from inside PyTorch's mode, for any step."""
    torch.manual_seed(0)
    model = effdense.densenet_cifar(10, 4)
    ref = copy.deepcopy(model).set_strategy("naive")
    x = torch.randn(2, 3, 8, 8)
    with torch.autograd.graph.allow_mutation_on_saved_tensors():
        model.set_strategy("auto")(x).sum().backward()
        ref(x).sum().backward()
        model.set_strategy(strategy)
        with pytest.raises(RuntimeError, match="cannot run inside torch.autograd.graph.allow_mutation_on_saved_tensors"):
            model(x)
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("strategy", ["checkpoint", "shared", "fused"])
def test_disabled_saved_tensor_hooks_keep_activations_instead_of_failing(strategy) -> None:
    """Under ``torch.autograd.graph.disable_saved_tensors_hooks`` (which some libraries enter), the
    non-reentrant ``torch.utils.checkpoint`` raises the context's message. Before, every strategy but naive
    raised it (shared/fused from the ImageNet stem's recomputation): now checkpoint's blocks run as naive
    and the stem keeps its activations, each with a warning that says why, and the numbers are naive's."""
    torch.manual_seed(0)
    model = effdense.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2, num_classes=3)
    ref, other = _pair(model, strategy)
    with torch.autograd.graph.disable_saved_tensors_hooks("effdense test: no saved-tensor hooks here"):
        with pytest.warns(UserWarning, match=r"saved-tensor hooks are disabled here .*context says: .effdense test"):
            assert_matches(ref, other, torch.randn(2, 3, 33, 33))


def test_checkpoint_under_torch_func_grad_says_the_transform_disabled_hooks() -> None:
    """torch.func.grad disables saved-tensor hooks itself: the fallback warning named only
    ``disable_saved_tensors_hooks``, a call the user never made. It quotes the transform's own message now;
    the gradients are naive's."""
    torch.manual_seed(0)
    model = effdense.densenet_cifar(16, 4)
    ref, other = _pair(model, "checkpoint")
    x = torch.randn(2, 3, 8, 8)
    grads = {}
    for name, m in (("naive", ref), ("checkpoint", other)):
        params = {n: p.detach() for n, p in m.named_parameters()}
        buffers = {n: b.clone() for n, b in m.named_buffers()}

        def loss(p, b, m=m):  # (the buffers as inputs: training mode updates them in place)
            return torch.func.functional_call(m, {**p, **b}, (x,)).square().sum()

        if name == "checkpoint":
            with pytest.warns(UserWarning, match=r"torch\.func transforms .*context says: .torch\.func\.\{grad"):
                grads[name] = torch.func.grad(loss)(params, buffers)
        else:
            grads[name] = torch.func.grad(loss)(params, buffers)
    for n, g in grads["naive"].items():
        torch.testing.assert_close(grads["checkpoint"][n], g, rtol=1e-4, atol=1e-6)


def _stem_dropout(m):
    m.features.relu0 = nn.Sequential(nn.ReLU(), nn.Dropout(0.3))


def _stem_instance_norm(m):
    m.features.norm0 = nn.InstanceNorm2d(m.features.norm0.num_features, affine=True, track_running_stats=True)


_NOT_RECOMPUTABLE_STEMS = {
    "dropout": _stem_dropout,
    "rrelu": lambda m: setattr(m.features, "relu0", nn.RReLU()),
    "spectral_norm": lambda m: nn.utils.parametrizations.spectral_norm(m.features.conv0),
    "instance_norm_with_running_stats": _stem_instance_norm,
}


@pytest.mark.parametrize("swap", sorted(_NOT_RECOMPUTABLE_STEMS))
@pytest.mark.parametrize("strategy", ["shared", "fused"])
def test_stem_module_that_would_not_recompute_exactly_keeps_its_activations(strategy, swap) -> None:
    """shared/fused recompute the ImageNet stem in backward without restoring the RNG (its standard modules
    draw nothing). Before, a Dropout or RReLU swapped into it was recomputed with another draw (gradients
    off by 100 % and more), and a spectral-norm parametrization or an InstanceNorm with running statistics
    stepped its state twice per step; now such a stem keeps its activations, with a warning naming the
    module, and gives naive's outputs, gradients and buffers (the power iteration's u and v among them)."""
    torch.manual_seed(0)
    model = effdense.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2, num_classes=3)
    _NOT_RECOMPUTABLE_STEMS[swap](model)
    ref, other = _pair(model, strategy)
    with pytest.warns(UserWarning, match=r"the stem \(conv0, norm0, relu0, pool0\) keeps its activations .*(relu0|conv0|norm0)"):
        assert_matches(ref, other, torch.randn(2, 3, 33, 33))


_NOT_RECOMPUTABLE_LAYERS = {
    "dropout": lambda layer: setattr(layer, "relu1", nn.Sequential(nn.ReLU(), nn.Dropout(0.3))),
    "rrelu": lambda layer: setattr(layer, "relu1", nn.RReLU()),
    "spectral_norm": lambda layer: nn.utils.parametrizations.spectral_norm(layer.conv1),
    "old_spectral_norm": lambda layer: nn.utils.spectral_norm(layer.conv1),
    "instance_norm_with_running_stats": lambda layer: setattr(
        layer, "norm1", nn.InstanceNorm2d(layer.norm1.num_features, affine=True, track_running_stats=True)
    ),
}


@pytest.mark.parametrize("swap", sorted(_NOT_RECOMPUTABLE_LAYERS))
def test_checkpoint_block_with_a_part_that_would_not_recompute_exactly_runs_as_naive(swap) -> None:
    """checkpoint recomputes each layer's norm1-relu1-conv1 in backward. Before, a random module there was
    recomputed with another draw (wrong gradients in every earlier layer; torchvision's memory_efficient=True
    restores the RNG) and a spectral norm stepped its power iteration twice per step (as torchvision's does);
    now that block runs as naive, with a warning naming the module, and matches naive exactly."""
    torch.manual_seed(0)
    model = effdense.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2, num_classes=3)
    _NOT_RECOMPUTABLE_LAYERS[swap](model.features.denseblock2.denselayer2)
    ref, other = _pair(model, "checkpoint")
    with pytest.warns(UserWarning, match=r"instead of 'checkpoint', because denselayer2\.(relu1|conv1|norm1)"):
        assert_matches(ref, other, torch.randn(2, 3, 33, 33))


@pytest.mark.parametrize("strategy", ["checkpoint", "shared"])
def test_modules_that_recompute_exactly_are_still_recomputed(strategy) -> None:
    """The other side of the two tests above: Dropout(p=0), GroupNorm, torchvision's FrozenBatchNorm2d and
    another activation in the stem (shared) or a layer's recomputed parts (checkpoint) warn of nothing."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    torch.manual_seed(0)
    model = effdense.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2, num_classes=3)
    f, layer = model.features, model.features.denseblock1.denselayer1
    if strategy == "shared":
        f.relu0, f.norm0 = nn.Sequential(nn.SiLU(), nn.Dropout(0.0)), FrozenBatchNorm2d(8)
    else:
        layer.relu1, layer.norm1 = nn.Sequential(nn.ReLU(), nn.Dropout(0.0)), nn.GroupNorm(2, 8)
    ref, other = _pair(model, strategy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_matches(ref, other, torch.randn(2, 3, 33, 33))


@pytest.mark.parametrize("strategy", ["checkpoint", "shared"])
def test_running_statistics_updated_between_an_eval_forward_and_its_backward_raise(strategy) -> None:
    """An eval-mode forward, then a training-mode forward that updates the running statistics it normalised
    with, then the first one's backward: shared/fused raise autograd's in-place error. Before, checkpoint
    recomputed BN1 with the new statistics and gave a gradient neither the forward's nor naive's (28 % off
    naive's input gradient), silently; batch_norm moves no version counter of the statistics it updates, so
    the check is on num_batches_tracked, which a training-mode BatchNorm increments in place."""
    torch.manual_seed(0)
    model = effdense.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2, num_classes=3)
    model.set_strategy(strategy).eval()
    out = model(torch.randn(2, 3, 33, 33, requires_grad=True))
    model.train()
    with torch.no_grad():
        model(3 * torch.randn(4, 3, 33, 33) + 1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.pow(2).sum().backward()
    # without the update in between: no error, naive's gradients (the statistics are read, not changed)
    ref = copy.deepcopy(model).set_strategy("naive").eval()
    model.eval()
    x = torch.randn(2, 3, 33, 33)
    for m in (model, ref):
        m.zero_grad(set_to_none=True)
        m(x).pow(2).sum().backward()
    for (name, p), q in zip(ref.named_parameters(), model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)


def test_which_modules_recompute_exactly() -> None:
    """The rule behind the two fallbacks above, module by module: known deterministic, stateless modules pass
    (RReLU and Dropout in eval mode draw nothing; weight norm computes the weight from parameters alone), random
    or stateful ones and anything unknown are named (a forward patched on a class is not that class's)."""
    from effdense.strategies.checkpoint import unrecomputable

    wn = nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 4, 3))
    sn = nn.utils.parametrizations.spectral_norm(nn.Conv2d(3, 4, 3))
    old_sn = nn.utils.spectral_norm(nn.Conv2d(3, 4, 3))

    class MyReLU(nn.ReLU):
        pass

    named = {
        "ok_seq": nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=True), nn.MaxPool2d(2)),
        "ok_eval_rrelu": nn.RReLU().eval(), "ok_eval_dropout": nn.Dropout(0.5).eval(), "ok_p0": nn.Dropout(0.0),
        "ok_wn": wn, "ok_softmax": nn.Softmax(dim=1), "ok_group": nn.GroupNorm(2, 4),
        "rrelu": nn.RReLU(), "dropout": nn.Dropout(0.5), "sn": sn, "old_sn": old_sn, "sub": MyReLU(),
        "inst": nn.InstanceNorm2d(4, track_running_stats=True), "seq": nn.Sequential(nn.ReLU(), nn.Dropout2d(0.1)),
    }  # fmt: skip
    assert unrecomputable(list(named.items())) == ["rrelu", "dropout", "sn", "old_sn", "sub", "inst", "seq.1"]
    relu = nn.ReLU()
    original = nn.ReLU.forward
    try:
        nn.ReLU.forward = lambda self, x: x.clamp(min=0) + torch.rand_like(x)  # patched on the class
        assert unrecomputable([("relu", relu)]) == ["relu"]
    finally:
        nn.ReLU.forward = original
    assert unrecomputable([("relu", relu)]) == []


@pytest.mark.parametrize("strategy", ["checkpoint", "shared", "fused"])
def test_weight_norm_under_parametrize_cached_is_not_recomputed(strategy) -> None:
    """Under ``torch.nn.utils.parametrize.cached()`` a weight-normed module read again in backward takes the
    cached weight, saving fewer tensors than its forward: torch.utils.checkpoint raised "A different number of
    tensors was saved" for the stem under shared/fused, and for a layer's conv1 under checkpoint (as for
    torchvision's memory_efficient=True), from a probe. Such a module is kept, with the fallback's warning."""
    from torch.nn.utils import parametrizations, parametrize

    torch.manual_seed(0)
    model = effdense.DenseNet(4, (2, 2), 8, bn_size=2, num_classes=3)  # the ImageNet stem, which shared/fused checkpoint
    parametrizations.weight_norm(model.features.conv0)
    if strategy == "checkpoint":
        parametrizations.weight_norm(model.features.denseblock1.denselayer1.conv1)
    ref, other = _pair(model, strategy)
    x = torch.randn(2, 3, 33, 33)
    outs = []
    for m in (ref, other):  # (a context each: PyTorch keys its cache on the module a parametrization was made
        # on, so a deepcopy's weight is cached under its source's key, and the two would read each other's)
        with parametrize.cached(), warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            outs.append(_step(m, x, seed=0))
    where = r"denselayer1\.conv1" if strategy == "checkpoint" else r"the stem .* keeps its activations"
    assert any(re.search(where + r".*parametrize\.cached\(\) it would read", str(w.message)) for w in warned), [
        str(w.message) for w in warned]  # fmt: skip
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(ref.named_parameters(), other.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)
    with warnings.catch_warnings():  # outside the context: recomputed as before
        warnings.simplefilter("error")
        assert_matches(ref, other, x, steps=1)


@pytest.mark.parametrize("strategy", ["checkpoint", "shared", "fused"])
def test_optimizer_step_in_backward_trains_as_naive(strategy) -> None:
    """PyTorch's optimizer-in-backward recipe: each parameter steps in its post-accumulate-grad hook as soon as
    its gradient is final. Before, checkpoint raised the in-place error in the first backward: it checked every
    parameter of a layer before recomputing norm1-relu1-conv1, and autograd had already finished (and stepped)
    norm2 and conv2 by then."""
    torch.manual_seed(0)
    model = effdense.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2, num_classes=3)
    x, y = torch.randn(4, 3, 20, 20), torch.tensor([0, 1, 2, 0])

    def train(m):
        optimizers = {p: torch.optim.SGD([p], lr=0.1, momentum=0.9) for p in m.parameters()}
        for p in m.parameters():
            p.register_post_accumulate_grad_hook(lambda p: (optimizers[p].step(), optimizers[p].zero_grad()) and None)
        for _ in range(3):
            nn.functional.cross_entropy(m(x), y).backward()
        return nn.utils.parameters_to_vector(m.parameters()).detach()

    ref, other = _pair(model, strategy)
    torch.testing.assert_close(train(other), train(ref), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("strategy", ["shared", "fused"])
def test_dropout_drawn_while_another_draw_interleaves_raises_in_backward(strategy, monkeypatch) -> None:
    """shared/fused replay each layer's dropout mask in backward from the RNG state saved in forward. Another
    thread drawing from the generator between that save and the draw (simulated here: a draw inside the
    forward's dropout call) made the replay apply another mask: gradients off by up to 100x, silently. Now
    backward checks that its replay left the generator where forward's draw did, and raises if not; without
    the interleaved draw, the same model trains as naive."""
    torch.manual_seed(0)
    model = effdense.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2, num_classes=3,
                              drop_rate=0.5)  # fmt: skip
    ref, other = _pair(model, strategy)
    x = torch.randn(2, 3, 33, 33)
    assert_matches(ref, other, x)
    real_dropout = nn.functional.dropout
    interleave = {"on": True}

    def racing_dropout(t, *args, **kwargs):
        if interleave["on"]:
            torch.rand(7)  # "another thread" draws between the saved state and this layer's mask
        return real_dropout(t, *args, **kwargs)

    monkeypatch.setattr(nn.functional, "dropout", racing_dropout)
    out = other(x)
    interleave["on"] = False  # (backward's replay draws alone)
    with pytest.raises(RuntimeError, match="dropout mask cannot be replayed in backward.*another thread"):
        out.sum().backward()


@pytest.mark.parametrize("strategy", ["shared", "fused"])
def test_dropout_replay_leaves_the_global_generator_alone_on_cpu(strategy, monkeypatch) -> None:
    """On CPU backward replays each dropout mask from a private generator set to forward's state: it set the
    global generator back and restored it after (fork_rng), so another thread drawing meanwhile got forward's
    numbers again and lost its own advance. The masks are still naive's."""
    torch.manual_seed(0)
    model = effdense.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2, num_classes=3,
                              drop_rate=0.5)  # fmt: skip
    ref, other = _pair(model, strategy)
    x = torch.randn(2, 3, 33, 33)
    torch.manual_seed(5)
    ref(x).sum().backward()
    torch.manual_seed(5)
    out = other(x)
    state = torch.get_rng_state()

    def refuse(*args, **kwargs):
        raise AssertionError("backward set the global generator")

    monkeypatch.setattr(torch, "set_rng_state", refuse)
    monkeypatch.setattr(torch.random, "set_rng_state", refuse)
    out.sum().backward()
    assert torch.equal(torch.get_rng_state(), state)
    for (name, p), q in zip(ref.named_parameters(), other.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_dropout_keeps_its_mask_on_devices_without_a_replay() -> None:
    """The replay sets the CPU generator (a private copy) or CUDA's: on MPS/XPU forward's dropout draws from
    their own generator, so a replay there applied another mask (silently wrong gradients; untestable without
    such a device: the rule is checked)."""
    assert shared._keep_dropout_mask(torch.device("mps")) and shared._keep_dropout_mask(torch.device("xpu"))
    assert not shared._keep_dropout_mask(torch.device("cpu")) and not shared._keep_dropout_mask(torch.device("meta"))


@pytest.mark.cuda
@pytest.mark.parametrize("strategy", ["shared", "fused"])
def test_dropout_replay_at_batch_1_on_a_misaligned_gradient_slice_matches_naive(strategy) -> None:
    """At batch 1 a layer's channel slice of the gradient buffer is contiguous, so the replay drew on the view
    itself; growth 5 from 6 channels at 7x7 in fp32 starts slices 1176, 2156, ... bytes in, not 16-byte aligned.
    CUDA's dropout picks its vector width (and with it which random number masks which element) from the
    input's address, where forward's input was a fresh, aligned allocation: another mask, silently."""
    torch.manual_seed(0)
    model = effdense.DenseNet(5, (3,), 6, bn_size=2, num_classes=3, small_inputs=True, drop_rate=0.5).cuda()
    assert_matches(*_pair(model, strategy), torch.randn(1, 3, 7, 7, device="cuda"))


def test_sync_count_reduces_on_the_inputs_gpu(monkeypatch) -> None:
    """Under NCCL the stage's global batch count was all-reduced on the current GPU, cuda:0 on every rank
    that had not called torch.cuda.set_device (its model on cuda:<rank>): NCCL's duplicate-GPU error, or a
    hang. nn.SyncBatchNorm reduces on its input's device; so does the count now (no GPU needed to see which
    device is chosen)."""
    import torch.distributed as dist

    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    for device in ("cuda:1", "cuda:3"):
        assert shared._count_device(None, torch.device(device)) == torch.device(device)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    assert shared._count_device(None, torch.device("cuda:1")) == torch.device("cpu")  # gloo reduces host tensors


@pytest.mark.parametrize("strategy", ["shared", "fused"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_one_batchnorm_in_two_layers_updates_its_statistics_twice_in_order(strategy, momentum) -> None:
    """One BatchNorm module as two layers' norm2 (tied): the stage updated its running statistics for both
    layers at once, with one buffer listed twice in the multi-tensor ops, so the blends summed instead of
    chaining, and with momentum=None both read the counter after its two increments (running_var 0.25 high)."""
    torch.manual_seed(0)
    model = effdense.DenseNet(4, (3,), 8, bn_size=2, num_classes=3, small_inputs=True).double()
    block = model.features.denseblock1
    block.denselayer2.norm2 = block.denselayer3.norm2 = block.denselayer1.norm2
    block.denselayer1.norm2.momentum = momentum
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (computed by the strategy, not run as naive)
        assert_matches(*_pair(model, strategy), torch.randn(2, 3, 6, 6, dtype=torch.float64), steps=3)


class _CountingScale(nn.Module):
    """A parametrization with state: it scales the weight by how often it has run in training."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
        return w * (1 + 0.1 * self.calls)


@pytest.mark.parametrize("strategy", ["shared", "fused"])
def test_batchnorm_with_a_parametrization_that_has_state_runs_as_naive(strategy) -> None:
    """The strategies read a BatchNorm's weight several times per step (naive once): a parametrization with
    state (spectral norm's power iteration, a counter) ran three times in forward and again in backward, for
    other outputs and gradients, or autograd's bare in-place error. Such a block runs as naive, with a warning;
    weight norm (stateless) is still computed by the strategy."""
    from torch.nn.utils import parametrizations, parametrize

    torch.manual_seed(0)
    model = effdense.DenseNet(4, (2, 2), 8, bn_size=2, num_classes=3, small_inputs=True).double()
    parametrize.register_parametrization(model.features.denseblock1.denselayer1.norm1, "weight", _CountingScale())
    parametrizations.weight_norm(model.features.denseblock2.denselayer2.norm2, dim=0)
    ref, other = _pair(model, strategy)
    with pytest.warns(UserWarning, match=r"features\.denseblock1\) runs as strategy 'naive'.*denselayer1\.norm1") as record:
        assert_matches(ref, other, torch.randn(2, 3, 8, 8, dtype=torch.float64))
    assert not any("denseblock2" in str(w.message) for w in record), "weight norm needs no fallback"
    calls = [layer.norm1.parametrizations.weight[0].calls for layer in (ref.features.denseblock1.denselayer1,
                                                                         other.features.denseblock1.denselayer1)]  # fmt: skip
    assert calls[0] == calls[1] == 3, calls  # one at registration, one per forward


def test_conv_with_an_instance_patched_conv_forward_runs_as_naive() -> None:
    """``conv._conv_forward`` (what Conv2d.forward calls) replaced on the instance: the strategy computed a
    plain convolution, silently (eval outputs off by 0.25)."""
    torch.manual_seed(0)
    model = effdense.DenseNet(4, (2,), 8, bn_size=2, num_classes=3, small_inputs=True).double()
    conv = model.features.denseblock1.denselayer1.conv1
    conv._conv_forward = lambda x, w, b: F.conv2d(x, 2 * w, b)
    ref, other = _pair(model, "shared")
    with pytest.warns(UserWarning, match=r"denselayer1\.conv1"):
        assert_matches(ref, other, torch.randn(2, 3, 8, 8, dtype=torch.float64))
    ref.eval(), other.eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with pytest.warns(UserWarning, match="naive"):
        torch.testing.assert_close(other(x), ref(x))


def test_checkpoint_block_that_recomputes_nothing_does_not_warn() -> None:
    """A block whose parameters are frozen, fed an input that needs no gradient, recomputes nothing: a
    module there that would not recompute exactly is no reason for the 'runs as naive' warning (it warned
    whenever gradients were enabled)."""
    torch.manual_seed(0)
    model = effdense.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2, num_classes=3)
    model.features.denseblock1.denselayer1.relu1 = nn.RReLU()
    model.features.requires_grad_(False)
    model.set_strategy("checkpoint")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(torch.randn(2, 3, 33, 33)).sum().backward()  # (the classifier still trains)


def test_fallback_warnings_of_every_strategy_name_the_block() -> None:
    """checkpoint's fallbacks, the module-hook fallback and a block run on its own said only "a dense block":
    with several blocks of one shape, which one was not said. They name it as the DenseNet (or
    effdense.set_strategy, in a model of one's own) named it."""
    model = effdense.DenseNet(4, (2, 2), 8, bn_size=2, num_classes=3, small_inputs=True, strategy="checkpoint")
    model.features.denseblock2.denselayer1.relu1 = nn.RReLU()  # (random in training: not recomputed exactly)
    with pytest.warns(UserWarning, match=r"a dense block \(features\.denseblock2\) runs as strategy 'naive' instead of 'checkpoint'"):
        model(torch.randn(2, 3, 8, 8)).sum().backward()
    model = effdense.DenseNet(4, (2, 2), 8, bn_size=2, num_classes=3, small_inputs=True, strategy="shared")
    model.features.denseblock1.denselayer2.register_forward_hook(lambda *args: None)
    with pytest.warns(UserWarning, match=r"a dense block \(features\.denseblock1\) runs as strategy 'naive' instead of 'shared'"):
        model(torch.randn(2, 3, 8, 8)).sum().backward()

    class Up(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up = nn.ModuleList([effdense.DenseBlock(2, 3, 2, 4, 0.0), effdense.DenseBlock(2, 3, 2, 4, 0.0)])

        def forward(self, x):
            return self.up[1](self.up[0](x)[:, :3])

    net = effdense.set_strategy(Up(), "shared")
    net.up[1].denselayer2.register_forward_hook(lambda *args: None)
    with pytest.warns(UserWarning, match=r"a dense block \(up\.1\) runs as strategy 'naive'"):
        net(torch.randn(2, 3, 8, 8)).sum().backward()


def test_fused_on_the_interpreter_runs_from_two_threads_at_once() -> None:
    # Triton's interpreter keeps a launch's state process-wide: two threads running fused inference on one
    # model broke each other's launches ("Did you forget to add @triton.jit?"); interpreted launches take turns
    import threading

    from effdense.strategies import fused

    if not fused.kernels_available(torch.device("cpu")):
        pytest.skip("Triton kernels cannot run on cpu here (TRITON_INTERPRET unset)")
    torch.manual_seed(0)
    model = effdense.DenseNet(growth_rate=4, block_config=(2,), num_init_features=8, small_inputs=True, num_classes=3, strategy="fused").eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
    results: dict[int, object] = {}

    def run(i: int) -> None:
        try:
            with torch.no_grad():
                results[i] = all(torch.equal(model(x), expected) for _ in range(3))
        except Exception as exc:  # (reported below, with the thread's error)
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert results == {0: True, 1: True}, results


@pytest.mark.parametrize("strategy", ["shared", "fused"])
def test_an_estimate_with_dropout_ignores_other_threads_draws(strategy) -> None:
    # an estimate's fake dropout draws nothing, yet forward noted the real generator's state after it and
    # backward compared: another thread drawing meanwhile (a data-augmentation thread) failed 9 estimates in 10
    # with the error meant for a broken replay
    import threading

    from effdense.memory import estimate_step

    stop = threading.Event()

    def draw() -> None:
        while not stop.is_set():
            torch.rand(64)

    thread = threading.Thread(target=draw)
    thread.start()
    try:
        for _ in range(5):
            estimate_step(
                lambda: effdense.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, small_inputs=True,
                                          num_classes=5, strategy=strategy, drop_rate=0.2),
                (2, 3, 16, 16), backend="fake",
            )
    finally:
        stop.set()
        thread.join()
