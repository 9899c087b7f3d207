"""The foundation: torchvision parity, configurations, weights, strategy switching, bad input."""

from __future__ import annotations

import copy
import os
import types
import warnings
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.utils.prune  # noqa: F401 (torch.nn.utils.prune.* below)
import torchvision

import effdense
from effdense import strategies

# fp32 on CPU, "within 1e-5 relative": max|a - b| <= RTOL * max|b| per tensor
RTOL = 1e-5


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL, name: str = "") -> None:
    err = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= rtol * max(scale, 1e-12), f"{name}: max error {err:.3g} > {rtol} * {scale:.3g}"


def train_step(model: nn.Module, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    out = model(x)
    # a loss whose gradient differs per class, so every output channel matters
    weights = torch.linspace(-1.0, 1.0, out.shape[1])
    (out * weights).sum().backward()
    return out.detach()


TORCHVISION_BUILDERS = ["densenet121", "densenet161", "densenet169", "densenet201"]


@pytest.mark.parametrize("arch", TORCHVISION_BUILDERS)
@pytest.mark.parametrize("strategy", ["naive", "checkpoint"])
def test_matches_torchvision_with_same_weights(arch: str, strategy: str) -> None:
    torch.manual_seed(0)
    tv = getattr(torchvision.models, arch)(num_classes=11)
    ours = getattr(effdense, arch)(num_classes=11, strategy=strategy)
    ours.load_state_dict(tv.state_dict(), strict=True)
    x = torch.randn(2, 3, 33, 33)  # 33 -> 9 after the stem: odd sizes in every block
    out_tv = train_step(tv, x)
    out = train_step(ours, x)
    assert_close_rel(out, out_tv, name="output")
    tv_params = dict(tv.named_parameters())
    for name, p in ours.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert_close_rel(p.grad, tv_params[name].grad, name=name)


@pytest.mark.parametrize("arch", TORCHVISION_BUILDERS)
def test_convert_holds_the_same_parameters(arch: str) -> None:
    torch.manual_seed(1)
    tv = getattr(torchvision.models, arch)(num_classes=5)
    with torch.no_grad():  # not a fresh BatchNorm's 1, 0, 0, 1, which the copy's own would equal (vacuously)
        for m in tv.modules():
            if isinstance(m, nn.BatchNorm2d):
                for t, low in ((m.weight, 0.5), (m.bias, -0.5), (m.running_mean, -0.2), (m.running_var, 0.5)):
                    t.copy_(torch.rand_like(t) + low)
                m.num_batches_tracked.fill_(7)
    for strategy in ("naive", "checkpoint"):
        ours = effdense.convert(tv, strategy=strategy)
        assert isinstance(ours, effdense.DenseNet) and ours.strategy == strategy
        for (n1, t1), (n2, t2) in zip(tv.state_dict().items(), ours.state_dict().items()):
            assert n1 == n2 and torch.equal(t1, t2)
    ours = effdense.convert(tv, strategy="checkpoint")
    x = torch.randn(2, 3, 36, 36)
    out_tv = train_step(tv, x)
    out = train_step(ours, x)
    assert_close_rel(out, out_tv, name="output")
    tv_params = dict(tv.named_parameters())
    for name, p in ours.named_parameters():
        assert_close_rel(p.grad, tv_params[name].grad, name=name)


def test_convert_rejects_other_models() -> None:
    with pytest.raises(TypeError, match="torchvision DenseNet"):
        effdense.convert(torchvision.models.resnet18())


def _bn_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: b for n, b in model.named_buffers() if "running" in n or "num_batches" in n}


def _assert_bn_buffers_close(actual: nn.Module, expected: nn.Module, rtol: float, what: str = "") -> None:
    """BatchNorm running statistics and counters of two models with the same modules, in fp32, to ``rtol``."""
    for (name, a), b in zip(_bn_buffers(actual).items(), _bn_buffers(expected).values()):
        assert torch.allclose(a.float(), b.float(), rtol=rtol, atol=1e-6), f"{what} {name}".strip()


def test_checkpoint_updates_running_stats_once_unlike_torchvision() -> None:
    torch.manual_seed(0)
    naive = effdense.densenet121(num_classes=3, strategy="naive")
    ckpt = copy.deepcopy(naive).set_strategy("checkpoint")
    tv_eff = torchvision.models.densenet121(num_classes=3, memory_efficient=True)
    tv_eff.load_state_dict(naive.state_dict())
    x = torch.randn(2, 3, 32, 32)
    for step in range(3):
        for model in (naive, ckpt, tv_eff):
            model.zero_grad()
            train_step(model, x + step, seed=step)
    ours, ref, theirs = _bn_buffers(ckpt), _bn_buffers(naive), _bn_buffers(tv_eff)
    for name, value in ref.items():
        assert torch.equal(ours[name], value) if "num_batches" in name else torch.allclose(ours[name], value, rtol=1e-5, atol=1e-6), name
    # torchvision's recomputation runs norm1 in training mode a second time
    norm1 = "features.denseblock1.denselayer1.norm1"
    assert int(theirs[f"{norm1}.num_batches_tracked"]) == 6
    assert int(ours[f"{norm1}.num_batches_tracked"]) == 3
    assert not torch.allclose(theirs[f"{norm1}.running_mean"], ref[f"{norm1}.running_mean"])


@pytest.mark.parametrize("momentum", [0.1, None])
def test_checkpoint_running_stats_match_naive_cifar(momentum) -> None:
    naive = effdense.densenet_cifar(16, 6, strategy="naive")
    for m in naive.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = momentum
    ckpt = copy.deepcopy(naive).set_strategy("checkpoint")
    x = torch.randn(4, 3, 16, 16)
    for step in range(3):
        train_step(naive, x * (step + 1), seed=step)
        train_step(ckpt, x * (step + 1), seed=step)
    _assert_bn_buffers_close(naive, ckpt, rtol=1e-5)


def test_checkpoint_replays_dropout() -> None:
    naive = effdense.densenet_cifar(16, 6, drop_rate=0.3, strategy="naive")
    ckpt = copy.deepcopy(naive).set_strategy("checkpoint")
    x = torch.randn(3, 3, 12, 12)
    out_a = train_step(naive, x, seed=7)
    out_b = train_step(ckpt, x, seed=7)
    assert_close_rel(out_b, out_a, name="output")
    for (name, p), q in zip(naive.named_parameters(), ckpt.parameters()):
        assert_close_rel(q.grad, p.grad, rtol=1e-5, name=name)


def test_checkpoint_runs_plainly_without_grad(monkeypatch) -> None:
    from effdense.strategies import checkpoint as ckpt_module

    def fail(*args, **kwargs):
        raise AssertionError("checkpoint() called although no gradient is needed")

    monkeypatch.setattr(ckpt_module, "checkpoint", fail)
    model = effdense.densenet_cifar(16, 6, strategy="checkpoint")
    with torch.no_grad():
        model(torch.randn(2, 3, 8, 8))


def test_strategy_switch_on_live_model_keeps_outputs() -> None:
    model = effdense.densenet_cifar(16, 6, strategy="naive").eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        reference = model(x)
        for name in effdense.available_strategies():
            model.set_strategy(name)
            assert all(b.strategy == name for b in model.dense_blocks)
            assert_close_rel(model(x), reference, rtol=1e-5, name=name)


def test_assigning_strategy_or_policy_reaches_every_block() -> None:
    """``model.strategy = ...`` and ``model.policy = ...`` reach every block, as set_strategy does (before: the
    model's attribute changed and the blocks kept running the old strategy, silently); a policy alone keeps
    each block's strategy."""
    model = effdense.densenet_cifar(16, 4)
    model.strategy = "naive"
    assert model.strategy == "naive" and all(b.strategy == "naive" for b in model.dense_blocks)
    policy = effdense.Policy(recompute_bottleneck=False)
    model.policy = policy
    assert model.policy is policy and model.strategy == "naive" and all(b.policy is policy for b in model.dense_blocks)
    # a policy alone leaves each block's strategy, one of its own included (it reset them all to the model's)
    model.set_strategy("shared")
    model.features.denseblock1.strategy = "naive"
    model.policy = effdense.Policy(shared_grad=False)
    assert [b.strategy for b in model.dense_blocks] == ["naive", "shared", "shared"]
    assert all(b.policy == effdense.Policy(shared_grad=False) for b in model.dense_blocks)
    model.set_strategy("naive", policy)
    with pytest.raises(ValueError, match="unknown strategy 'fast'"):
        model.strategy = "fast"
    with pytest.raises(TypeError, match="policy must be an effdense.Policy, got NoneType$"):
        model.policy = None
    with pytest.raises(TypeError, match=r"got dict: make one with effdense.Policy\(\*\*fields\)"):
        model.policy = {"shared_grad": False}
    assert model.strategy == "naive" and model.policy is policy
    copied = copy.deepcopy(model)
    assert copied.strategy == "naive" and copied.policy == policy


def test_torchvisions_per_layer_memory_efficient_switch_is_refused() -> None:
    """torchvision's ``layer.memory_efficient = True`` idiom: before, it set an attribute nothing read."""
    layer = effdense.densenet_cifar(16, 4).features.denseblock1.denselayer1
    with pytest.raises(AttributeError, match=r"no memory_efficient switch .* model.set_strategy\('checkpoint'\)"):
        layer.memory_efficient = True
    assert not hasattr(layer, "memory_efficient")


def test_strategies_table_and_auto() -> None:
    assert effdense.STRATEGIES == ("naive", "checkpoint", "shared", "fused")
    x = torch.zeros(1)
    # on CPU, auto is the best strategy that runs here: shared (fused only where its kernels run)
    assert strategies.resolve("auto", x) == ("shared" if "shared" in effdense.available_strategies() else "checkpoint")
    with pytest.raises(ValueError, match="unknown strategy 'fast'"):
        effdense.densenet121(strategy="fast")
    with pytest.raises(ValueError, match="unknown strategy"):
        effdense.densenet_bc_100().set_strategy("Naive")


def test_pending_strategy_is_a_clear_error(monkeypatch) -> None:
    runners = dict(strategies._runners())
    runners.pop("fused")
    monkeypatch.setattr(strategies, "_runners", lambda: runners)
    with pytest.raises(NotImplementedError, match="'fused'.*Triton kernels"):
        strategies.check_strategy("fused")


def test_memory_efficient_flag_means_checkpoint() -> None:
    assert effdense.densenet121(memory_efficient=True).strategy == "checkpoint"
    with pytest.raises(ValueError, match="memory_efficient=True"):
        effdense.densenet121(memory_efficient=True, strategy="naive")


# --------------------------------------------------------------------------------------------------
# configurations


@pytest.mark.parametrize(
    "name, params_m",
    [
        ("densenet_40", 1.0),  # Huang et al. Table 2
        ("densenet_bc_100", 0.8),
        ("densenet_bc_250", 15.3),
        ("densenet_bc_190", 25.6),
    ],
)
def test_cifar_presets_have_the_papers_sizes(name: str, params_m: float) -> None:
    model = effdense.get_model(name)
    n = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(n - params_m) <= 0.05 * params_m, f"{name}: {n:.2f}M parameters, paper {params_m}M"
    assert model.small_inputs and not hasattr(model.features, "pool0")
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10) if params_m < 2 else True


def test_cifar_depth_rule() -> None:
    assert effdense.densenet_cifar(100, 12).block_config == (16, 16, 16)
    assert effdense.densenet_cifar(40, 12, bottleneck=False, compression=1.0).block_config == (12, 12, 12)
    assert len(effdense.get_model("densenet_bc_16").dense_blocks) == 3
    for depth in (101, 3, 0):
        with pytest.raises(ValueError, match="not a valid DenseNet-BC"):
            effdense.densenet_cifar(depth, 12)
    with pytest.raises(ValueError, match="not a valid DenseNet \\(bottleneck=False\\)"):
        effdense.densenet_cifar(41, 12, bottleneck=False)


def test_imagenet_builders_match_torchvision_shapes() -> None:
    for arch in TORCHVISION_BUILDERS:
        tv_keys = {k: v.shape for k, v in getattr(torchvision.models, arch)().state_dict().items()}
        ours = {k: v.shape for k, v in getattr(effdense, arch)().state_dict().items()}
        assert ours == tv_keys, arch
    d264 = effdense.densenet264()
    assert d264.block_config == (6, 12, 64, 48) and d264.growth_rate == 32


def test_original_layer_without_bottleneck() -> None:
    model = effdense.DenseNet(growth_rate=8, block_config=(3, 3), num_init_features=16, bottleneck=False, num_classes=4)
    layer = model.features.denseblock1.denselayer1
    assert layer.conv1.kernel_size == (3, 3) and not hasattr(layer, "conv2")
    assert model(torch.randn(2, 3, 40, 40)).shape == (2, 4)


def test_compression_sets_transition_width() -> None:
    model = effdense.densenet_cifar(40, 12, compression=0.3)
    t = model.features.transition1.conv
    assert t.out_channels == int(t.in_channels * 0.3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(growth_rate=0), "growth_rate must be a positive integer"),
        (dict(growth_rate=-4), "growth_rate must be a positive integer"),
        (dict(compression=0.0), "compression must be a number in \\(0, 1\\]"),
        (dict(compression=1.5), "compression must be a number in \\(0, 1\\]"),
        (dict(block_config=()), "block_config must name at least one dense block"),
        (dict(block_config=(6, 0)), "block_config\\[1\\] must be a positive integer"),
        (dict(drop_rate=1.0), "drop_rate must be a number in \\[0, 1\\)"),
        (dict(strategy="nope"), "unknown strategy 'nope'"),
    ],
)
def test_invalid_configuration(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        effdense.DenseNet(**kwargs)


def test_switches_must_be_bools_and_sizes_may_be_integer_scalars() -> None:
    # bottleneck/small_inputs took any value by its truth: "False" built a DenseNet-BC with the CIFAR stem
    import numpy as np

    for build in (
        lambda: effdense.DenseNet(growth_rate=4, block_config=(2,), bottleneck="False"),
        lambda: effdense.DenseNet(growth_rate=4, block_config=(2,), small_inputs="False"),
        lambda: effdense.DenseBlock(2, 8, 4, 4, 0.0, bottleneck="no"),
        lambda: effdense.densenet_cifar(22, 4, bottleneck="no"),
        lambda: effdense.get_model("densenet_bc_100", bottleneck="yes"),
        # torchvision's memory_efficient too: "no" built a checkpointed model
        lambda: effdense.DenseNet(growth_rate=4, block_config=(2,), memory_efficient="no"),
        lambda: effdense.DenseBlock(2, 8, 4, 4, 0.0, "False"),
        lambda: effdense.densenet121(memory_efficient="no"),
    ):
        with pytest.raises(TypeError, match="(bottleneck|small_inputs|memory_efficient) must be True or False, got '"):
            build()
    model = effdense.densenet_cifar(np.int64(22), 4, bottleneck=np.bool_(True))  # (depth was refused as invalid)
    assert model.block_config == (3, 3, 3)
    assert model.features.denseblock1.denselayer1.bottleneck is True


def test_a_cifar_densenet_without_bottleneck_has_no_compression_by_default() -> None:
    # the paper's DenseNet (no bottleneck) has no compression: densenet_cifar(40, 12, bottleneck=False) gave
    # 0.5 where densenet_40 and get_model("densenet_40") give 1.0 (DenseNet-C stays one argument away)
    for model in (effdense.densenet_cifar(40, 12, bottleneck=False), effdense.get_model("densenet_40"), effdense.densenet_40()):
        assert model.compression == 1.0
        assert sum(p.numel() for p in model.parameters()) == 1_019_722
    assert effdense.densenet_cifar(40, 12, bottleneck=False, compression=0.5).compression == 0.5
    assert effdense.densenet_cifar(40, 12).compression == 0.5  # DenseNet-BC


def test_builders_fix_their_configuration() -> None:
    with pytest.raises(TypeError, match="densenet121\\(\\) fixes \\['growth_rate'\\]"):
        effdense.densenet121(growth_rate=12)


# --------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    "x, error, message",
    [
        (torch.randn(3, 64, 64), ValueError, "expected 4-D input \\(N, C, H, W\\), got shape \\(3, 64, 64\\)"),
        (torch.randn(2, 1, 64, 64), ValueError, "expected 3 input channels .* got 1"),
        (torch.zeros(2, 3, 64, 64, dtype=torch.uint8), TypeError, "floating-point input, got dtype torch.uint8"),
        (torch.randn(2, 3, 16, 16), ValueError, "16x16 is too small for this model: it needs at least 29x29"),
        ([1, 2, 3], TypeError, "expected a torch.Tensor input, got list"),
    ],
)
def test_bad_input_names_expected_and_got(x, error, message) -> None:
    model = effdense.densenet121()
    with pytest.raises(error, match=message):
        model(x)


def test_small_inputs_stem_accepts_tiny_images() -> None:
    model = effdense.densenet_cifar(16, 6)
    assert model.min_input_size() == 4
    with pytest.raises(ValueError, match="too small"):
        model(torch.randn(2, 3, 3, 3))


# --------------------------------------------------------------------------------------------------
# weights


def test_weights_from_state_dict_file_and_legacy_keys(tmp_path) -> None:
    tv = torchvision.models.densenet121(num_classes=7)
    sd = tv.state_dict()
    from_dict = effdense.densenet121(weights=sd, num_classes=7)
    path = tmp_path / "w.pth"
    torch.save(sd, path)
    from_file = effdense.densenet121(weights=str(path), num_classes=7)
    legacy = {k.replace("norm1.", "norm.1.").replace("conv2.", "conv.2."): v for k, v in sd.items()}
    assert any("norm.1." in k for k in legacy)
    from_legacy = effdense.densenet121(weights=legacy, num_classes=7)
    for model in (from_dict, from_file, from_legacy):
        for key, value in model.state_dict().items():
            assert torch.equal(value, sd[key]), key


def test_weights_enum_is_used_without_download() -> None:
    sd = torchvision.models.densenet121(num_classes=4).state_dict()

    class FakeWeights:  # the WeightsEnum surface the builder uses
        meta = {"categories": ["a", "b", "c", "d"]}

        def get_state_dict(self, progress: bool = True, check_hash: bool = False):
            return sd

    model = effdense.densenet121(weights=FakeWeights())
    assert model.classifier.out_features == 4
    assert torch.equal(model.classifier.weight, sd["classifier.weight"])


def test_weights_from_common_checkpoint_layouts_and_short_misfit_messages(tmp_path) -> None:
    """Checkpoint layouts found in the wild load (PyTorch's tutorial's ``model_state_dict``, a Lightning
    module's ``model.`` prefix); what does not fit is said in a few hundred characters, not PyTorch's list of
    every key (30-73 KB for a checkpoint dict), with a hint for a checkpoint dict and for another class count."""
    source = effdense.densenet_cifar(16, 6, num_classes=5)
    own = source.state_dict()
    for weights in ({"model_state_dict": own, "optimizer_state_dict": {}, "epoch": 3},
                    {"state_dict": {f"model.{k}": v for k, v in own.items()}, "epoch": 3}):
        torch.save(weights, tmp_path / "ckpt.pt")
        model = effdense.densenet_cifar(16, 6, num_classes=5, weights=tmp_path / "ckpt.pt")
        assert all(torch.equal(v, own[k]) for k, v in model.state_dict().items())
    with pytest.raises(RuntimeError) as info:
        effdense.densenet_cifar(16, 6, num_classes=5, weights={"net": own, "epoch": 3})
    text = str(info.value)
    assert len(text) < 600 and "Missing key(s) (" in text and "Unexpected key(s) (2): 'net', 'epoch'" in text
    assert "a training checkpoint?" in text
    with pytest.raises(RuntimeError, match=r"size mismatch for classifier.weight.*for 5 classes: build the model with num_classes=5"):
        effdense.densenet_cifar(16, 6, num_classes=7, weights=own)
    # a prefix is stripped only where the rest is exactly the model's keys
    partial = {f"model.{k}": v for k, v in own.items() if k != "classifier.bias"}
    with pytest.raises(RuntimeError, match=r"carry a prefix \(.model\..\) before the model.s own"):
        effdense.densenet_cifar(16, 6, num_classes=5, weights=partial)


def test_bad_weights() -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        effdense.densenet121(weights="/nonexistent/w.pth")
    with pytest.raises(TypeError, match="weights must be None, a torchvision WeightsEnum"):
        effdense.densenet121(weights=3)
    with pytest.raises(RuntimeError, match="Missing key"):
        effdense.densenet121(weights={"classifier.weight": torch.zeros(1000, 1024)})


@pytest.fixture
def no_download(monkeypatch):
    """torchvision's WeightsEnum.get_state_dict records its calls and returns random weights: no network."""
    from torchvision.models import WeightsEnum

    calls: list = []

    def fake_get_state_dict(self, *args, **kwargs):
        calls.append(self)
        return torchvision.models.densenet121().state_dict()

    monkeypatch.setattr(WeightsEnum, "get_state_dict", fake_get_state_dict)
    return calls


def test_weights_enum_checked_before_download(no_download) -> None:
    from torchvision.models import DenseNet121_Weights, DenseNet161_Weights, ResNet18_Weights

    # torchvision: TypeError for another model's enum, ValueError for a num_classes conflict; no download
    with pytest.raises(TypeError, match="densenet121\\(\\) expects weights from DenseNet121_Weights, got DenseNet16"):
        effdense.densenet121(weights=DenseNet161_Weights.IMAGENET1K_V1)
    with pytest.raises(TypeError, match="expects weights from DenseNet121_Weights, got ResNet18_Weights"):
        effdense.densenet121(weights=ResNet18_Weights.IMAGENET1K_V1)
    with pytest.raises(TypeError, match="torchvision has no weights for densenet264"):
        effdense.densenet264(weights=DenseNet121_Weights.IMAGENET1K_V1)
    with pytest.raises(ValueError, match="has 1000 classes, got num_classes=10"):
        effdense.densenet121(weights=DenseNet121_Weights.IMAGENET1K_V1, num_classes=10)
    assert no_download == []
    model = effdense.densenet121(weights=DenseNet121_Weights.IMAGENET1K_V1, num_classes=1000)
    assert model.classifier.out_features == 1000 and len(no_download) == 1


def test_weights_enum_member_names_and_pretrained(no_download) -> None:
    from torchvision.models import DenseNet121_Weights

    # as torchvision's WeightsEnum.verify: member names, with or without the class name
    for name in ("DEFAULT", "IMAGENET1K_V1", "DenseNet121_Weights.IMAGENET1K_V1"):
        effdense.densenet121(weights=name)
    assert no_download == [DenseNet121_Weights.IMAGENET1K_V1] * 3
    with pytest.raises(FileNotFoundError, match="'IMAGENET1K_V2' does not exist.*DenseNet121_Weights.*IMAGENET1K_V1"):
        effdense.densenet121(weights="IMAGENET1K_V2")
    # torchvision's deprecated pretrained= flag: warns and means weights=DEFAULT / None
    with pytest.warns(UserWarning, match="pretrained=.*deprecated"):
        assert effdense.densenet121(pretrained=True).classifier.out_features == 1000
    with pytest.warns(UserWarning, match="deprecated"):
        effdense.densenet121(pretrained=False)
    assert len(no_download) == 4
    with pytest.raises(ValueError, match="both weights= and the deprecated pretrained=True"):
        effdense.densenet121(pretrained=True, weights="DEFAULT")


def test_legacy_positional_weights_and_bool_weights_as_torchvision(no_download) -> None:
    """torchvision's builders still take ``weights`` (and ``progress``) positionally and a bool for ``weights``
    (the old positional ``pretrained``), each with a deprecation warning; so do effdense's."""
    import inspect
    import warnings

    for call, downloads in (((None,), 0), ((False,), 0), ((True,), 1), ((None, False), 0)):
        with warnings.catch_warnings(record=True) as tv_warned:
            warnings.simplefilter("always")
            tv = torchvision.models.densenet121(*call)
        before = len(no_download)
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            model = effdense.densenet121(*call)
        assert len(no_download) - before == downloads, call
        assert tv_warned and warned and all("deprecated" in str(w.message) for w in warned), call
        assert all(w.filename == __file__ for w in warned), [w.filename for w in warned]  # points at the caller
        assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in tv.parameters())
    with pytest.warns(UserWarning, match="deprecated"):
        assert effdense.densenet169(weights=False).classifier.out_features == 1000
    assert list(inspect.signature(effdense.densenet121).parameters) == ["weights", "progress", "kwargs"]
    with pytest.raises(TypeError, match="at most 2 positional"):
        effdense.densenet201(None, True, 3)
    with pytest.raises(TypeError, match="multiple values for argument 'weights'"):
        effdense.densenet121(None, weights=None)
    with pytest.raises(TypeError, match="pass weights= only"):
        effdense.densenet121(weights=True, pretrained=True)


def test_weights_of_another_model_get_no_class_count_hint_and_names_fix_what_they_say() -> None:
    """The num_classes hint only when the class count is what differs (it was given for DenseNet-121's weights
    in a DenseNet-169, whose classifier takes 1,664 features); names take ASCII digits only; an ImageNet name
    fixes bottleneck and compression (another network, silently), a CIFAR name block_config and small_inputs
    (a bare "multiple values for keyword argument")."""
    sd = torchvision.models.densenet121().state_dict()
    with pytest.raises(RuntimeError, match="weights do not fit this DenseNet: Missing key") as info:
        effdense.densenet169(weights=sd)
    assert "num_classes" not in str(info.value) and ".;" not in str(info.value), info.value
    for name in ("densenet_bc_\uff11\uff10\uff10", "densenet_bc_\u0661\u0660\u0660"):
        with pytest.raises(ValueError, match="unknown model"):
            effdense.get_model(name)
    for key, value in (("bottleneck", False), ("compression", 1.0)):
        with pytest.raises(TypeError, match=rf"densenet121\(\) fixes \['{key}'\]"):
            effdense.densenet121(**{key: value})
    assert effdense.densenet121(small_inputs=True).features.conv0.kernel_size == (3, 3)  # (a stem for small images)
    for key, value in (("block_config", (1, 1, 1)), ("small_inputs", False)):
        with pytest.raises(TypeError, match=f"its stem is small_inputs=True; got {key}: build effdense.DenseNet"):
            effdense.get_model("densenet_bc_100", **{key: value})


def test_weights_that_need_a_download_say_where_the_file_goes(monkeypatch) -> None:
    import urllib.error

    weights = torchvision.models.DenseNet121_Weights.IMAGENET1K_V1

    def offline(self, *args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(type(weights), "get_state_dict", offline)
    where = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    with pytest.raises(OSError, match="downloading it failed") as info:
        effdense.densenet121(weights="DEFAULT")
    assert where in str(info.value) and "pass a state dict or a file path" in str(info.value), info.value

    def unwritable(self, *args, **kwargs):  # (not a network failure: passed on as it is)
        raise PermissionError(13, "Permission denied", torch.hub.get_dir())

    monkeypatch.setattr(type(weights), "get_state_dict", unwritable)
    with pytest.raises(PermissionError, match="Permission denied") as info:
        effdense.densenet121(weights="DEFAULT")
    assert "downloading" not in str(info.value)


def test_weights_files_name_their_problem(tmp_path) -> None:
    sd = torchvision.models.densenet121(num_classes=3).state_dict()
    torch.save({"model": sd, "epoch": 2}, tmp_path / "train.pt")  # effdense train's checkpoint layout
    model = effdense.densenet121(weights=tmp_path / "train.pt", num_classes=3)
    assert torch.equal(model.classifier.weight, sd["classifier.weight"])
    (tmp_path / "junk.pth").write_text("not a checkpoint")  # (before: torch's advice to try weights_only=False)
    with pytest.raises(ValueError, match=r"junk.pth' is not in a format torch.save writes today \(a zip archive, or a "
                       r"pickle of protocol 2 or later; it begins with b'not '\)"):  # fmt: skip
        effdense.densenet121(weights=tmp_path / "junk.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.pth' is empty"):
        effdense.densenet121(weights=tmp_path / "empty.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "train.pt").read_bytes()[:100])  # a torch file cut short
    with pytest.raises(ValueError, match="cut.pth' could not be read as a state dict"):
        effdense.densenet121(weights=tmp_path / "cut.pth")
    torch.save(torchvision.models.densenet121(num_classes=3), tmp_path / "whole.pth")
    with pytest.raises(ValueError, match="whole.pth' could not be read.*save model.state_dict\\(\\) instead"):
        effdense.densenet121(weights=tmp_path / "whole.pth", num_classes=3)
    with pytest.raises(FileNotFoundError, match="is not a file"):
        effdense.densenet121(weights=tmp_path)
    # models without torchvision weights: a name such as 'DEFAULT' is a missing file, and said so
    with pytest.raises(FileNotFoundError, match="densenet264 has no torchvision weights enum"):
        effdense.densenet264(weights="DEFAULT")
    with pytest.raises(FileNotFoundError, match="does not exist .*for densenet121/161/169/201, a member name"):
        effdense.densenet_bc_100(weights="DEFAULT")


def _small_torchvision_densenet(**kwargs) -> nn.Module:
    return torchvision.models.DenseNet(growth_rate=8, block_config=(2, 3), num_init_features=16, **kwargs)


def test_convert_keeps_the_sources_memory_layout() -> None:
    """A source moved to channels_last gives a channels_last copy (before: contiguous weights, as built)."""
    torch.manual_seed(0)
    source = _small_torchvision_densenet(num_classes=4).to(memory_format=torch.channels_last)
    ours = effdense.convert(source, strategy="shared")
    for (name, p), q in zip(ours.named_parameters(), source.parameters()):
        assert p.stride() == q.stride() and torch.equal(p, q), name
    assert any(p.dim() == 4 and not p.is_contiguous() for p in ours.parameters())  # the check above means something
    x = torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), source.eval()(x), rtol=1e-5, atol=1e-5)


def test_convert_keeps_each_tensors_dtype() -> None:
    """Each parameter and buffer keeps its own dtype (before: the whole copy was cast to the dtype of the
    source's first parameter, rounding the fp32 BatchNorms of a bf16 model to bf16, an fp64 head to fp32)."""
    torch.manual_seed(0)
    source = _small_torchvision_densenet(num_classes=4)
    source(torch.randn(4, 3, 32, 32) * 3 + 1)  # running statistics that bf16 cannot hold exactly
    for m in source.modules():
        if isinstance(m, nn.Conv2d):
            m.to(torch.bfloat16)
    source.classifier.double()
    ours = effdense.convert(source, strategy="naive")
    theirs = source.state_dict()
    for name, t in ours.state_dict().items():
        assert t.dtype == theirs[name].dtype and torch.equal(t, theirs[name]), name
    assert {t.dtype for t in theirs.values()} == {torch.bfloat16, torch.float32, torch.float64, torch.int64}
    with torch.device("meta"):  # and device: a meta source gives a meta copy (a tensor's .data cannot change device)
        meta = _small_torchvision_densenet(num_classes=4)
    block = meta.features.denseblock1
    block.denselayer2.norm2 = block.denselayer1.norm2  # (a tie: its second name's slot is placed too)
    block.denselayer2.conv2.weight = block.denselayer1.conv2.weight
    copy_ = effdense.convert(meta, strategy="shared")
    assert {t.device.type for t in copy_.state_dict().values()} == {"meta"}
    assert copy_.features.denseblock1.denselayer2.conv2.weight is copy_.features.denseblock1.denselayer1.conv2.weight


@pytest.mark.parametrize("strategy", ["shared", "fused"])
def test_convert_rebuilds_blocks_and_transitions_of_other_widths(strategy) -> None:
    """A block swapped for one of another growth rate (torchvision source), or a transition and block for
    other widths in an effdense source (whose ``compression`` then no longer describes them): the copy's
    blocks are built with the source's widths and run the strategy, without the naive fallback's warning
    (before: the first block's growth rate, the fallback; or a copy whose first forward failed)."""
    tv_block = torchvision.models.densenet._DenseBlock
    torch.manual_seed(0)
    tv = _small_torchvision_densenet(num_classes=4)  # k=8, (2, 3) layers: 16 + 16 = 32 -> 16 -> 16 + 24 = 40
    tv.features.denseblock2 = tv_block(3, 16, 4, 6, 0.0)  # k=6: 16 + 18 = 34
    tv.features.norm5, tv.classifier = nn.BatchNorm2d(34), nn.Linear(34, 4)
    ed = effdense.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, num_classes=5, strategy="naive")
    ed.features.transition1 = effdense.Transition(16, 12)  # compression 0.5 would give 8
    ed.features.denseblock2 = effdense.DenseBlock(2, 12, 4, 4, 0.0)
    ed.features.norm5, ed.classifier = nn.BatchNorm2d(20), nn.Linear(20, 5)
    x = torch.randn(2, 3, 32, 32)
    for source in (tv, ed):
        source.eval()
        ours = effdense.convert(source, strategy=strategy).eval()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = ours(x)
        torch.testing.assert_close(out, source(x), rtol=1e-5, atol=1e-6)
    assert ours.features.transition1.conv.out_channels == 12 and ours.features.denseblock2.num_input_features == 12
    assert ours.features.denseblock2.__dict__.get("_effdense_where") == "features.denseblock2"  # (warnings name it)
    assert effdense.convert(tv, strategy=strategy).features.denseblock2.growth_rate == 6


def test_convert_keeps_what_the_state_dict_does_not_carry() -> None:
    source = _small_torchvision_densenet(num_classes=4)
    for p in source.features.denseblock1.parameters():  # frozen first block, its BatchNorms in eval mode
        p.requires_grad_(False)
    source.features.denseblock1.eval()
    for m in source.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum, m.eps = 0.3, 1e-2
    tv = copy.deepcopy(source)
    x = torch.randn(2, 3, 40, 40)
    out_tv = train_step(tv, x)
    tv_params = dict(tv.named_parameters())
    for strategy in effdense.available_strategies():
        ours = effdense.convert(source, strategy=strategy)
        assert [m.training for m in ours.modules()] == [m.training for m in tv.modules()], strategy
        assert [p.requires_grad for p in ours.parameters()] == [p.requires_grad for p in tv.parameters()], strategy
        assert ours.features.denseblock2.denselayer1.norm1.eps == 1e-2
        out = train_step(ours, x)
        assert_close_rel(out, out_tv, rtol=1e-4, name=f"{strategy} output")
        for name, p in ours.named_parameters():
            assert (p.grad is None) == (tv_params[name].grad is None), f"{strategy} {name}"
            if p.grad is not None:
                assert_close_rel(p.grad, tv_params[name].grad, rtol=1e-4, name=f"{strategy} {name}")
        _assert_bn_buffers_close(ours, tv, rtol=1e-4, what=strategy)


def test_convert_keeps_tied_modules_and_parameters() -> None:
    """A source with one BatchNorm as two layers' norm2 and one weight shared by two convolutions: the copy,
    built module by module and loaded from a state dict (which lists a tied tensor under each name), held a
    tensor per name, silently untied (3085 parameter elements against 2781, other gradients, the shared
    BatchNorm's statistics updated once per step instead of twice)."""
    torch.manual_seed(0)
    source = _small_torchvision_densenet(num_classes=4)
    block = source.features.denseblock2
    block.denselayer2.norm2 = block.denselayer1.norm2
    block.denselayer3.conv2.weight = block.denselayer1.conv2.weight
    tv = copy.deepcopy(source)
    x = torch.randn(2, 3, 40, 40)
    out_tv = train_step(tv, x)
    tv_params = dict(tv.named_parameters())
    for strategy in effdense.available_strategies():
        ours = effdense.convert(source, strategy=strategy)
        b = ours.features.denseblock2
        assert b.denselayer2.norm2 is b.denselayer1.norm2, strategy
        assert b.denselayer3.conv2.weight is b.denselayer1.conv2.weight, strategy
        assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in tv.parameters())
        out = train_step(ours, x)
        assert_close_rel(out, out_tv, rtol=1e-4, name=f"{strategy} output")
        assert dict(ours.named_parameters()).keys() == tv_params.keys()
        gmax = max(p.grad.abs().max().item() for p in tv.parameters())  # (norm0's is ~0 in exact arithmetic)
        for name, p in ours.named_parameters():
            torch.testing.assert_close(p.grad, tv_params[name].grad, rtol=1e-4, atol=1e-6 * gmax, msg=f"{strategy} {name}")
        _assert_bn_buffers_close(ours, tv, rtol=1e-4, what=strategy)


def test_convert_keeps_each_layers_drop_rate() -> None:
    # before: every layer of the copy took the first layer's drop_rate
    source = _small_torchvision_densenet(num_classes=4)
    layers = [m for m in source.modules() if hasattr(m, "drop_rate")]
    for i, layer in enumerate(layers):
        layer.drop_rate = 0.1 * (i % 3)
    for src in (source, effdense.convert(source, strategy="naive")):
        ours = effdense.convert(src, strategy="shared")
        assert [m.drop_rate for m in ours.modules() if hasattr(m, "drop_rate")] == [m.drop_rate for m in layers]


def _leaky_forward(relu: nn.ReLU) -> nn.Module:
    relu.forward = types.MethodType(lambda self, x: torch.nn.functional.leaky_relu(x, 0.2), relu)
    return relu


def _frozen_bn(bn: nn.BatchNorm2d) -> nn.Module:
    from torchvision.ops import FrozenBatchNorm2d

    frozen = FrozenBatchNorm2d(bn.num_features, eps=bn.eps)
    frozen.load_state_dict({k: v for k, v in bn.state_dict().items() if k != "num_batches_tracked"})
    return frozen


def _doubled(conv: nn.Conv2d):
    return lambda x, weight, bias: nn.Conv2d._conv_forward(conv, x, weight * 2, bias)


def _with(module: nn.Module, **settings) -> nn.Module:
    module = copy.deepcopy(module)
    for name, value in settings.items():
        setattr(module, name, value)
    return module


@pytest.mark.parametrize(
    "path, make",
    [
        ("features.denseblock1.denselayer1.relu2", lambda m: nn.SiLU()),
        ("features.transition1.relu", lambda m: nn.GELU()),
        ("features.transition1.pool", lambda m: nn.MaxPool2d(2)),
        ("features.denseblock2.denselayer1.relu1", lambda m: nn.Identity()),
        ("every BatchNorm", _frozen_bn),  # a detectron-style frozen backbone; before: a bare KeyError
        ("features.denseblock2.denselayer1.relu2", _leaky_forward),  # same class, its own forward on the instance
        # a container for a leaf: before, load_state_dict's "Missing key(s)" for norm1.weight
        ("features.denseblock1.denselayer2.norm1", lambda m: nn.Sequential(copy.deepcopy(m), nn.Dropout2d(0.0))),
        # the same class holding other tensors: before, the built module was kept and the state dict's
        # "Missing key(s)" (norm1.weight) or "Unexpected key(s)" (conv1.bias) was the error
        ("features.denseblock1.denselayer1.norm1", lambda m: nn.BatchNorm2d(m.num_features, affine=False)),
        ("features.transition1.conv", lambda m: nn.Conv2d(m.in_channels, m.out_channels, 1, bias=True)),
        # the same class and tensors with other settings: before, the built module (torchvision's settings) was kept
        ("features.transition1.pool", lambda m: nn.AvgPool2d(3, 2, padding=1)),
        ("features.denseblock1.denselayer1.conv2", lambda m: _with(m, padding_mode="circular")),
        ("features.norm5", lambda m: _with(m, track_running_stats=False)),  # (buffers kept: training updates none)
        ("features.denseblock1.denselayer2.conv2", lambda m: _with(m, _conv_forward=_doubled(m))),  # an instance's helper
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
@pytest.mark.parametrize("strategy", ["naive", "shared"])
def test_convert_keeps_modules_swapped_into_the_source(path, make, strategy) -> None:
    """A state dict does not carry a module's class: before, parameter-free swaps (another activation or
    pool) were lost silently and the copy computed other outputs."""
    torch.manual_seed(0)
    tv = _small_torchvision_densenet()
    paths = [n for n, m in tv.named_modules() if isinstance(m, nn.BatchNorm2d)] if path == "every BatchNorm" else [path]
    for p in paths:
        parent, _, child = p.rpartition(".")
        setattr(tv.get_submodule(parent), child, make(tv.get_submodule(p)))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "effdense: a dense block.* runs as strategy 'naive'")
        ours = effdense.convert(tv, strategy=strategy)
        for p in paths:
            assert type(ours.get_submodule(p)) is type(tv.get_submodule(p)), p
        x = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(ours.eval()(x), tv.eval()(x), rtol=1e-5, atol=1e-5)
        ours.train()(x).sum().backward()  # trains (the frozen BatchNorms hold no parameters)
    tv.train()(x)
    source_buffers = dict(tv.named_buffers())  # (a BatchNorm untracked in training updates no running statistics)
    for name, b in ours.named_buffers():
        torch.testing.assert_close(b, source_buffers[name], rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("strategy", ["shared", "fused"])
def test_convert_runs_torchvisions_modules_spelled_otherwise_as_its_own(strategy) -> None:
    """A source pool of AvgPool2d((2, 2), (2, 2)) or a 3x3 conv with padding='same' computes as torchvision's:
    convert() copies them (their settings differ), and the strategies compute them, without running as naive."""
    torch.manual_seed(0)
    tv = _small_torchvision_densenet()
    tv.features.transition1.pool = nn.AvgPool2d((2, 2), (2, 2))
    tv.features.denseblock1.denselayer1.conv2.padding = "same"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (no "runs as strategy 'naive'")
        ours = effdense.convert(tv, strategy=strategy)
        x = torch.randn(2, 3, 16, 16)
        torch.testing.assert_close(ours.eval()(x), tv.eval()(x), rtol=1e-5, atol=1e-5)
        ours.train()(x).sum().backward()


@pytest.mark.parametrize("path", ["features.denseblock1.denselayer1.norm1", "features.conv0", "classifier"])
def test_convert_names_a_module_it_cannot_copy(path) -> None:
    import threading

    tv = _small_torchvision_densenet()
    tv.get_submodule(path).lock = threading.Lock()  # (another setting: copied, and deepcopy fails)
    kind = type(tv.get_submodule(path)).__name__
    with pytest.raises(TypeError, match=rf"convert\(\): cannot copy the source's '{path}' \({kind}\): cannot pickle "
                       "'_thread.lock' object"):  # fmt: skip
        effdense.convert(tv)


def test_convert_names_what_it_cannot_convert() -> None:
    tv = _small_torchvision_densenet()
    with pytest.raises(TypeError, match="got a DataParallel wrapper: pass model.module"):
        effdense.convert(nn.DataParallel(tv))
    tv.classifier = None
    with pytest.raises(TypeError, match="with a classifier module .* got classifier NoneType"):
        effdense.convert(tv)
    tv = _small_torchvision_densenet()
    tv.features.denseblock1.denselayer2 = nn.Identity()  # a layer a DenseNet cannot hold (torchvision's fails too)
    with pytest.raises(TypeError, match=r"convert\(\): the source's 'features.denseblock1.denselayer2' \(Identity\) "
                       r"has children \[\], where a DenseNet has \['conv1', 'conv2', 'norm1'"):
        effdense.convert(tv)
    # what convert reads to build the copy: before, AttributeError ('Conv2d' object has no attribute 'conv1') or an
    # empty StopIteration
    for path, module, said in [
        ("features.denseblock1.denselayer1", nn.Conv2d(3, 3, 1), r"denselayer1' \(Conv2d\) is not a dense layer"),
        ("features.denseblock1", nn.Identity(), r"denseblock1' \(Identity\) holds no dense layers"),
        ("features.transition1", nn.Identity(), r"transition1' \(Identity\) is not a transition"),
    ]:
        tv = _small_torchvision_densenet()
        parent, _, name = path.rpartition(".")
        setattr(tv.get_submodule(parent), name, module)
        with pytest.raises(TypeError, match=said):
            effdense.convert(tv)


def test_convert_refuses_code_of_the_sources_own_in_the_modules_it_rebuilds() -> None:
    """From a probe: a DenseNet subclass whose forward returned ``super().forward(x) / 2`` converted into a
    model that did not halve, and a forward set on the instance was dropped likewise, silently."""
    tvm = pytest.importorskip("torchvision").models
    small = dict(growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2)

    class Halved(tvm.DenseNet):
        def forward(self, x):
            return super().forward(x) / 2

    class Layer(tvm.densenet._DenseLayer):
        def bn_function(self, inputs):
            return super().bn_function(inputs) * 0

    with pytest.raises(TypeError, match=r"the source's 'model' \(Halved\) has code of its own, forward of .*Halved, "
                       r"which the copy .* would not run; load the weights into an effdense model instead"):  # fmt: skip
        effdense.convert(Halved(**small))
    tv = _small_torchvision_densenet()
    tv.forward = lambda x: x
    with pytest.raises(TypeError, match=r"'model' \(DenseNet\) has code of its own, set on the instance \(forward\)"):
        effdense.convert(tv)
    tv = _small_torchvision_densenet()
    layer = tv.features.denseblock2.denselayer1
    layer.__class__ = Layer
    with pytest.raises(TypeError, match=r"'features.denseblock2.denselayer1' \(Layer\) has code of its own, bn_function of"):
        effdense.convert(tv)

    class Scratch(nn.Module):  # a class of one's own, nn.Module's alone: held to nn.Module's forward
        def __init__(self):
            super().__init__()
            tv = tvm.DenseNet(**small)
            self.features, self.classifier = tv.features, tv.classifier

        def forward(self, x):
            return self.classifier(F.adaptive_max_pool2d(self.features(x), 1).flatten(1))

    with pytest.raises(TypeError, match=r"'model' \(Scratch\) has code of its own, forward of .*Scratch"):
        effdense.convert(Scratch())

    class Built(tvm.DenseNet):  # a constructor of its own, a repr, helpers: they compute nothing else: converted
        def __init__(self):
            super().__init__(**small)

        def extra_repr(self):
            return "built"

        def freeze_features(self):
            self.features.requires_grad_(False)

        @staticmethod
        def describe():
            return "a helper"

    src = Built().eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(effdense.convert(src).eval()(x), src(x))
    src.compile()  # (torch.compile's call wrapper on the instance: the copy is not compiled, and computes the same)
    effdense.convert(src)


@pytest.mark.parametrize(
    "head",
    [
        lambda n: nn.Sequential(nn.Dropout(0.0), nn.Linear(n, 3)),
        lambda n: nn.Linear(n, 5, bias=False),
        lambda n: nn.Identity(),  # a backbone
    ],
    ids=["sequential", "bias-free", "identity"],
)
@pytest.mark.parametrize("strategy", ["naive", "shared"])
def test_convert_keeps_a_replaced_head(head, strategy) -> None:
    """The usual fine-tuning heads convert with their trained weights and give the source's outputs and
    gradients (before: a TypeError for all but one nn.Linear, a missing-key error for a bias-free one)."""
    torch.manual_seed(0)
    tv = _small_torchvision_densenet()
    tv.classifier = head(tv.classifier.in_features)
    ours = effdense.convert(tv, strategy=strategy)
    assert type(ours.classifier) is type(tv.classifier) and ours.classifier is not tv.classifier
    x = torch.randn(2, 3, 40, 40)
    out, out_tv = ours(x), tv(x)
    assert_close_rel(out, out_tv, rtol=1e-5, name="output")
    out.square().sum().backward()
    out_tv.square().sum().backward()
    tv_params = dict(tv.named_parameters())
    gmax = max(p.grad.abs().max().item() for p in tv.parameters())  # norm0's gradient is cancellation noise
    for name, p in ours.named_parameters():
        err = (p.grad - tv_params[name].grad).abs().max().item()
        assert err <= 1e-4 * tv_params[name].grad.abs().max().item() + 1e-6 * gmax, (name, err)


def test_convert_refuses_a_compiled_wrapper_and_odd_stems() -> None:
    tv = _small_torchvision_densenet()
    with pytest.raises(TypeError, match="torch.compile wrapper OptimizedModule: pass model._orig_mod"):
        effdense.convert(torch.compile(tv))
    # not a module at all (was AttributeError: 'str' object has no attribute 'modules')
    with pytest.raises(TypeError, match=r"an nn.Module\), got str: build it with effdense.get_model\('densenet121'\)"):
        effdense.convert("densenet121")
    with pytest.raises(TypeError, match=r"an nn.Module\), got NoneType$"):
        effdense.convert(None)
    tv.features = nn.Sequential(OrderedDict([("extra", nn.ReLU()), *tv.features.named_children()]))
    with pytest.raises(TypeError, match=r"expects a torchvision DenseNet stem .* got \['extra', 'conv0'"):
        effdense.convert(tv)


class _Plain(nn.Module):
    """A model that is not an effdense DenseNet, holding one's features and classifier (a torchvision-like
    source whose transitions are not torchvision's C // 2)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.features, self.classifier = model.features, model.classifier


@pytest.mark.parametrize("growth_rate", [7, 12])
@pytest.mark.parametrize("compression", [0.3, 0.6, 0.7, 1.0])
def test_convert_rebuilds_any_compression(growth_rate, compression) -> None:
    """floor(C * out/in) of the first transition can fall a channel short in later ones: convert takes an
    effdense source's compression, and for another source one that rebuilds every transition."""
    source = effdense.densenet_cifar(40, growth_rate, compression=compression)
    for src in (source, _Plain(source)):
        clone = effdense.convert(src, strategy="naive")
        assert {k: v.shape for k, v in clone.state_dict().items()} == {k: v.shape for k, v in src.state_dict().items()}
    plain = _Plain(copy.deepcopy(source))
    plain.features.transition1.conv = nn.Conv2d(plain.features.transition1.conv.in_channels, 5, 1, bias=False)
    with pytest.raises(ValueError, match="its transition1 gives 5 channels where denseblock2 reads"):
        effdense.convert(plain)  # (a source that cannot run)


def test_convert_rebuilds_transitions_of_no_single_compression() -> None:
    """Transitions swapped for ones of other ratios (16 -> 12, then 20 -> 10), with blocks that read them: no
    single compression builds both, and the copy rebuilds each (before: refused, 'follow no single compression')."""
    torch.manual_seed(0)
    ed = effdense.DenseNet(growth_rate=4, block_config=(2, 2, 2), num_init_features=8, num_classes=5, strategy="naive")
    ed.features.transition1 = effdense.Transition(16, 12)
    ed.features.denseblock2 = effdense.DenseBlock(2, 12, 4, 4, 0.0)
    ed.features.transition2 = effdense.Transition(20, 10)
    ed.features.denseblock3 = effdense.DenseBlock(2, 10, 4, 4, 0.0)
    ed.features.norm5, ed.classifier = nn.BatchNorm2d(18), nn.Linear(18, 5)
    x = torch.randn(2, 3, 32, 32)
    for source in (ed, _Plain(ed)):
        ours = effdense.convert(source, strategy="shared").eval()
        torch.testing.assert_close(ours(x), ed.eval()(x), rtol=1e-5, atol=1e-6)


def test_convert_carries_batchnorms_without_running_stats() -> None:
    tv = _small_torchvision_densenet()
    for m in tv.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.track_running_stats = False
            m.running_mean = m.running_var = m.num_batches_tracked = None
    x = torch.randn(2, 3, 32, 32)
    for strategy in ("naive", "shared"):
        ours = effdense.convert(tv, strategy=strategy)
        assert all(m.running_mean is None for m in ours.modules() if isinstance(m, nn.BatchNorm2d))
        for mode in ("train", "eval"):  # batch statistics in both
            assert_close_rel(getattr(ours, mode)()(x), getattr(tv, mode)()(x), rtol=1e-5, name=f"{strategy} {mode}")


@pytest.mark.parametrize("strategy", ["naive", "checkpoint", "shared", "fused"])
def test_replaced_stem_converts_and_checks_inputs_by_its_modules(strategy) -> None:
    """torchvision-style stem surgery (one input channel, a 3x3 conv0, pool0 = Identity): convert keeps the
    source's stem modules, and the input checks follow the live stem, not the constructor's arguments."""
    tv = _small_torchvision_densenet()
    tv.features.conv0 = nn.Conv2d(1, 16, 3, 1, 1, bias=False)
    tv.features.pool0 = nn.Identity()
    ours = effdense.convert(tv, strategy=strategy)
    x = torch.randn(2, 1, 6, 6)  # too small for torchvision's 7x7/2 stem with its pool, fine for this one
    assert_close_rel(train_step(ours, x), train_step(tv, x), rtol=1e-4, name=strategy)
    with pytest.raises(ValueError, match="expected 1 input channels"):
        ours(torch.randn(2, 3, 6, 6))
    with pytest.raises(ValueError, match="too small for this model: it needs at least 2x2"):
        ours(torch.randn(2, 1, 1, 1))
    model = effdense.densenet_bc_100(strategy=strategy)
    model.features.conv0 = nn.Conv2d(4, 24, 3, 1, 1, bias=False)  # surgery on an effdense model
    assert model(torch.randn(2, 4, 4, 4)).shape == (2, 10)


@pytest.mark.parametrize(
    "stem",
    [
        {"conv0": nn.Conv2d(3, 8, 3, padding="same", bias=False)},
        {"conv0": nn.Conv2d(3, 8, 3, padding="valid", bias=False)},
        {"conv0": nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)},
        {"conv0": nn.Conv2d(3, 8, 3, padding=1, bias=False), "pool0": nn.MaxPool2d(2, 2, 1, ceil_mode=True)},
        {"conv0": nn.Conv2d(3, 8, 3, padding=1, bias=False), "pool0": nn.AvgPool2d(3, 2, 1, ceil_mode=True)},
    ],
    ids=["same", "valid", "stride2", "ceil-maxpool-padded", "ceil-avgpool"],
)
def test_input_size_check_is_exact_for_a_replaced_stem(stem) -> None:
    """The size check refuses exactly the inputs on which the plain modules fail (PyTorch's own rules:
    string paddings, ceil mode dropping a last window that starts in the padding)."""
    model = effdense.DenseNet(4, (2, 2, 2), 8, small_inputs=True, strategy="naive")
    model.features = nn.Sequential(OrderedDict([*stem.items(), *list(model.features.named_children())[1:]]))
    for size in range(1, 24):
        x = torch.randn(1, 3, size, size)
        try:
            model.features.eval()(x)
            runs = True
        except RuntimeError:
            runs = False
        try:
            model._check_input(x)
            accepted = True
        except ValueError:
            accepted = False
        assert accepted == runs, f"side {size}: the check {'accepts' if accepted else 'refuses'} it, PyTorch {'runs' if runs else 'fails'}"


@pytest.mark.parametrize("strategy", ["shared", "fused"])
def test_norm5_replaced_or_removed_trains(strategy) -> None:
    """Without a BatchNorm as norm5 the features may be the last block's shared buffer, kept for backward:
    the final ReLU is then not in place (as torchvision's in place on a fresh tensor)."""
    for surgery in ("identity", "removed"):
        tv = _small_torchvision_densenet()
        ours = effdense.convert(tv, strategy=strategy)
        for m in (tv, ours):
            if surgery == "identity":
                m.features.norm5 = nn.Identity()
            else:
                del m.features.norm5
        x = torch.randn(2, 3, 32, 32)
        assert_close_rel(train_step(ours, x), train_step(tv, x), rtol=1e-4, name=surgery)


@pytest.mark.parametrize("strategy", ["shared", "fused"])
def test_modules_added_to_or_removed_from_features_run_as_the_sequential(strategy) -> None:
    """A module a user appends to model.features (or a stem module removed) runs as nn.Sequential would
    run it, as for torchvision's model; the dense blocks stay on the strategy."""
    tv = _small_torchvision_densenet()
    ours = effdense.convert(tv, strategy=strategy)
    with pytest.raises(TypeError, match=r"this model's hold \['denseblock1', 'transition1', 'denseblock2', 'norm5', 'act5'\]"):
        effdense.convert(tv.features.add_module("act5", nn.Tanh()) or tv)
    ours.features.add_module("act5", nn.Tanh())
    x = torch.randn(2, 3, 32, 32)
    assert_close_rel(ours.eval()(x), tv.eval()(x), rtol=1e-5, name="appended")
    del tv.features.norm5, ours.features.norm5
    assert_close_rel(ours(x), tv(x), rtol=1e-5, name="removed")


def test_integer_scalars_are_accepted_as_sizes() -> None:
    """numpy integers and 0-d integer tensors as sizes and layer counts (as torchvision accepts them)."""
    import numpy as np

    model = effdense.DenseNet(growth_rate=np.int64(4), block_config=np.array([2, 2]), num_init_features=torch.tensor(8))
    assert (model.growth_rate, model.block_config) == (4, (2, 2))
    assert type(model.growth_rate) is int and all(type(n) is int for n in model.block_config)
    with pytest.raises(ValueError, match="growth_rate must be a positive integer, got 2.5"):
        effdense.DenseNet(growth_rate=2.5)
    with pytest.raises(ValueError, match="block_config\\[1\\] must be a positive integer"):
        effdense.DenseNet(block_config=torch.tensor([2, 0]))
    # real scalars for the rates (before: "drop_rate must be in [0, 1), got np.float32(0.1)")
    model = effdense.DenseNet(4, (2, 2), 8, drop_rate=np.float32(0.25), compression=torch.tensor(0.5))
    assert model.compression == 0.5 and type(model.compression) is float
    assert all(type(m.drop_rate) is float and m.drop_rate == 0.25 for b in model.dense_blocks for m in b.layers)
    for bad in (True, torch.tensor([0.5]), "0.5", float("nan")):
        with pytest.raises(ValueError, match="compression must be a number in"):
            effdense.DenseNet(4, (2, 2), 8, compression=bad)
    # operator.index takes these too, but they are not sizes: a bool tensor, a 1-element 1-d tensor
    with pytest.raises(ValueError, match="growth_rate must be a positive integer, got tensor\\(True\\)"):
        effdense.DenseNet(growth_rate=torch.tensor(True))
    with pytest.raises(ValueError, match="num_init_features must be a positive integer, got tensor\\(\\[8\\]\\)"):
        effdense.DenseNet(num_init_features=torch.tensor([8]))


@pytest.mark.parametrize("strategy", ["naive", "checkpoint", "shared", "fused"])
def test_empty_batch_trains_as_torchvision(strategy: str) -> None:
    tv = _small_torchvision_densenet(num_classes=3)
    ours = effdense.convert(tv, strategy=strategy)
    x = torch.randn(0, 3, 40, 40, requires_grad=True)
    out_tv = tv(x)
    out = ours(x)
    assert out.shape == out_tv.shape == (0, 3)
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in ours.parameters())
    for (name, a), b in zip(_bn_buffers(ours).items(), _bn_buffers(tv).values()):
        assert torch.equal(a, b), name
    with torch.no_grad():
        assert ours.eval()(x).shape == (0, 3)


def test_torchscript_errors_say_what_works() -> None:
    model = effdense.densenet_cifar(16, 6, strategy="shared").eval()
    with pytest.raises(RuntimeError, match="cannot be compiled by torch.jit.script.*torch.compile"):
        torch.jit.script(model)
    x = torch.randn(2, 3, 16, 16)
    for strategy in ("shared", "fused"):
        with pytest.raises(RuntimeError, match=f"strategy '{strategy}' cannot be traced by torch.jit.trace"):
            torch.jit.trace(model.set_strategy(strategy), x)
    with torch.no_grad():
        expected = model(x)
    traced = torch.jit.trace(model.set_strategy("naive"), x)
    assert_close_rel(traced(x), expected, name="traced naive")


def test_policy_switches_must_be_bools() -> None:
    assert effdense.Policy(cache_stats=False).cache_stats is False
    with pytest.raises(TypeError, match="Policy.recompute_bottleneck must be a bool, got 'no'"):
        effdense.Policy(recompute_bottleneck="no")
    with pytest.raises(TypeError, match="Policy.shared_grad must be a bool, got None"):
        effdense.Policy(shared_grad=None)


def test_cifar_builders_take_weights(tmp_path) -> None:
    source = effdense.densenet_bc_100(num_classes=100)
    path = tmp_path / "bc100.pt"
    torch.save({"model": source.state_dict()}, path)  # effdense train's checkpoint layout
    for model in (
        effdense.densenet_bc_100(num_classes=100, weights=source.state_dict()),
        effdense.get_model("densenet_bc_100", num_classes=100, weights=str(path)),
        effdense.densenet_cifar(100, 12, num_classes=100, weights=path),
    ):
        for (name, a), b in zip(model.state_dict().items(), source.state_dict().values()):
            assert torch.equal(a, b), name
    with pytest.raises(RuntimeError, match="size mismatch for classifier.weight"):
        effdense.densenet_bc_100(weights=source.state_dict())  # 10 classes by default
    from torchvision.models import DenseNet121_Weights

    with pytest.raises(TypeError, match="torchvision has no weights for CIFAR DenseNets"):
        effdense.densenet_bc_100(weights=DenseNet121_Weights.IMAGENET1K_V1)


def test_block_config_must_be_a_sequence() -> None:
    assert effdense.DenseNet(block_config=[2, 3]).block_config == (2, 3)
    with pytest.raises(TypeError, match="block_config must be a sequence of layer counts.*got 6"):
        effdense.DenseNet(block_config=6)


def test_get_model_names_are_case_insensitive() -> None:
    # torchvision.models.get_model("DenseNet121") works: it lowercases the name
    assert effdense.get_model("DenseNet121").block_config == (6, 12, 24, 16)
    assert effdense.get_model("DenseNet_BC_16").block_config == (2, 2, 2)
    with pytest.raises(ValueError, match="unknown model 'resnet50'; expected one of densenet121, densenet161, ") as info:
        effdense.get_model("ResNet50")
    assert "[" not in str(info.value)  # the names, not a Python list's repr


# --------------------------------------------------------------------------------------------------
# what a CIFAR name fixes, DataParallel weights, convert() from an effdense model, empty batch per block


@pytest.mark.parametrize(
    "name, kwargs, message",
    [
        ("densenet_bc_100", {"depth": 40}, "densenet_bc_100 fixes depth=100 and bottleneck=True; got depth=40.*bc_40"),
        ("densenet_bc_100", {"bottleneck": False}, "densenet_bc_100 fixes .*; got bottleneck=False.*'densenet_100'"),
        ("densenet_40", {"bottleneck": True}, "densenet_40 fixes depth=40 and bottleneck=False; got bottleneck=True"),
        ("densenet_bc_16", {"depth": 40}, "densenet_bc_16 fixes depth=16 and bottleneck=True; got depth=40"),
        ("densenet_bc_16", {"bottleneck": False}, "densenet_bc_16 fixes .*; got bottleneck=False.*densenet_cifar"),
        ("densenet_16", {"depth": 100}, "densenet_16 fixes depth=16 and bottleneck=False; got depth=100"),
    ],
)
def test_cifar_names_reject_keywords_that_contradict_them(name, kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        effdense.get_model(name, **kwargs)
    if name in effdense.MODELS:
        with pytest.raises(ValueError, match=message):
            effdense.MODELS[name](**kwargs)


@pytest.mark.parametrize(
    "name, kwargs, error, message",
    [  # before: a hint naming a model that is not one ('densenet_bc_7', 'densenet_bc_True'), or the one asked for
        ("densenet_7", {"bottleneck": True}, ValueError, "got bottleneck=True, and there is no such model: depth=7 is not a valid DenseNet-BC"),
        ("densenet_bc_100", {"depth": 41}, ValueError, "got depth=41, and there is no such model: depth=41 is not a valid"),
        ("densenet_bc_100", {"depth": "100"}, TypeError, "depth must be an integer, got str '100'"),
        ("densenet_bc_100", {"depth": True}, TypeError, "depth must be an integer, got bool True"),
        ("densenet_bc_100", {"depth": 100.0}, TypeError, "depth must be an integer, got float 100.0"),
    ],
)
def test_cifar_names_name_no_model_that_does_not_exist(name, kwargs, error, message) -> None:
    with pytest.raises(error, match=message):
        effdense.get_model(name, **kwargs)


def test_cifar_depth_must_be_an_integer() -> None:
    # before: "depth='40' is not a valid DenseNet-BC depth: it must be 4 + 6*n", which 40 is
    for depth in ("40", 40.0, True):
        with pytest.raises(TypeError, match="depth must be an integer"):
            effdense.densenet_cifar(depth, 12)
    assert effdense.densenet_cifar(torch.tensor(40), 12).block_config == (6, 6, 6)


def test_cifar_names_accept_keywords_that_agree_and_their_defaults() -> None:
    model = effdense.get_model("densenet_bc_100", depth=100, bottleneck=True, num_classes=100, strategy="naive")
    assert model.block_config == (16, 16, 16) and model.growth_rate == 12 and model.classifier.out_features == 100
    assert effdense.get_model("densenet_40", bottleneck=False, depth=40).block_config == (12, 12, 12)
    assert effdense.get_model("densenet_bc_16", depth=16, bottleneck=True, growth_rate=6).growth_rate == 6
    # growth_rate stays a default, for presets too (effdense max-depth and ablate ask for densenet_bc_<d> at any k)
    assert effdense.get_model("densenet_bc_190", growth_rate=4).growth_rate == 4
    assert effdense.get_model("densenet_bc_100", growth_rate=6, compression=1.0).growth_rate == 6


def test_weights_from_data_parallel_state_dict(tmp_path) -> None:
    torch.manual_seed(0)
    source = effdense.densenet_cifar(16, 6, num_classes=5, strategy="naive")
    train_step(source, torch.randn(4, 3, 16, 16))  # running statistics away from their initial values
    own = source.state_dict()
    sd = nn.DataParallel(source).state_dict()
    assert sd.keys() == {"module." + k for k in own}
    path = tmp_path / "dp.pth"
    torch.save(sd, path)
    torch.save({"model": sd, "epoch": 1}, tmp_path / "dp_train.pt")
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        expected = source.eval()(x)
    models = [
        effdense.densenet_cifar(16, 6, num_classes=5, weights=sd),
        effdense.densenet_cifar(16, 6, num_classes=5, weights=str(path)),
        effdense.get_model("densenet_bc_16", growth_rate=6, num_classes=5, weights=tmp_path / "dp_train.pt"),
        effdense.load_weights(effdense.densenet_cifar(16, 6, num_classes=5), {f"module.{k}": v for k, v in own.items()}),
    ]
    for model in models:
        for key, value in model.state_dict().items():
            assert torch.equal(value, own[key]), key
        with torch.no_grad():
            assert_close_rel(model.eval()(x), expected, name="output")  # the source runs naive, the copy auto
    # torch.compile's OptimizedModule prefixes ``_orig_mod.``, alone or inside/around DDP's ``module.``
    compiled = torch.compile(source).state_dict()
    assert compiled.keys() == {"_orig_mod." + k for k in own}
    for sd in (compiled, {f"module._orig_mod.{k}": v for k, v in own.items()}, {f"_orig_mod.module.{k}": v for k, v in own.items()}):
        model = effdense.densenet_cifar(16, 6, num_classes=5, weights=sd)
        assert all(torch.equal(value, own[key]) for key, value in model.state_dict().items())
    # only a prefix every key has is a wrapper's: a partly prefixed state dict is left as it is
    partly = dict(own)
    partly["module.classifier.bias"] = partly.pop("classifier.bias")
    with pytest.raises(RuntimeError, match="Missing key.*classifier.bias"):
        effdense.densenet_cifar(16, 6, num_classes=5, weights=partly)


def test_convert_keeps_an_effdense_sources_policy() -> None:
    policy = effdense.Policy(cache_stats=False, shared_grad=False)
    source = effdense.densenet_cifar(16, 6, strategy="shared", policy=policy)
    ours = effdense.convert(source, strategy="shared")
    assert ours.policy == policy and all(b.policy == policy for b in ours.dense_blocks)
    other = effdense.Policy(recompute_bottleneck=False)
    assert effdense.convert(source, policy=other).policy == other
    assert effdense.convert(_small_torchvision_densenet()).policy == effdense.Policy()


def _sync_norms(model: nn.Module) -> list:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _unused_process_group():
    """A ``torch.distributed.ProcessGroup`` of one rank, without a backend or init_process_group: enough
    for code that only keeps a group and compares it by identity."""
    import torch.distributed as dist

    return dist.ProcessGroup(dist.HashStore(), 0, 1)


def test_set_sync_bn_refuses_what_is_not_a_flag_or_a_group() -> None:
    model = effdense.densenet_cifar(16, 6, num_classes=3)
    with pytest.raises(TypeError, match=r"process_group must be a torch.distributed.ProcessGroup .* got str"):
        model.set_sync_bn(True, "bogus")
    with pytest.raises(TypeError, match=r"process_group must be .* got list"):
        model.set_sync_bn(True, [0, 1])  # ranks, not a group
    with pytest.raises(TypeError, match="enabled must be True or False, got 'yes'"):
        model.set_sync_bn("yes")
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())  # refused before any change
    assert not any(b.sync_bn for b in model.dense_blocks)
    group = _unused_process_group()
    model.set_sync_bn(True, group)
    assert all(b.sync_group is group for b in model.dense_blocks)
    # a group with synchronisation off was ignored; it is refused before anything changes
    with pytest.raises(ValueError, match="process_group was given with enabled=False"):
        model.set_sync_bn(False, group)
    assert all(b.sync_bn and b.sync_group is group for b in model.dense_blocks)


def test_convert_keeps_sync_bn_and_its_process_group() -> None:
    group = _unused_process_group()  # set_sync_bn only keeps it
    source = effdense.densenet_cifar(16, 6, num_classes=3, strategy="naive").set_sync_bn(True, group)
    for strategy in effdense.available_strategies():
        ours = effdense.convert(source, strategy=strategy)
        assert all(b.sync_bn and b.sync_group is group for b in ours.dense_blocks), strategy
        norms = _sync_norms(ours)
        assert norms and all(isinstance(m, nn.SyncBatchNorm) and m.process_group is group for m in norms), strategy
        x = torch.randn(2, 3, 16, 16)
        with torch.no_grad():
            assert_close_rel(ours.eval()(x), source.eval()(x), name=strategy)
    plain = effdense.convert(effdense.densenet_cifar(16, 6))
    assert not any(b.sync_bn for b in plain.dense_blocks)
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in plain.modules())
    # a torchvision DenseNet made SyncBatchNorm as a whole carries it too; partly, it cannot
    tv = nn.SyncBatchNorm.convert_sync_batchnorm(_small_torchvision_densenet(), group)
    ours = effdense.convert(tv)
    assert all(b.sync_bn and b.sync_group is group for b in ours.dense_blocks)
    assert all(isinstance(m, nn.SyncBatchNorm) and m.process_group is group for m in _sync_norms(ours))
    tv = _small_torchvision_densenet()
    tv.features.denseblock1 = nn.SyncBatchNorm.convert_sync_batchnorm(tv.features.denseblock1, group)
    with pytest.raises(ValueError, match="cannot carry the source's SyncBatchNorm.*call set_sync_bn on the result"):
        effdense.convert(tv)
    # an effdense source made SyncBatchNorm with PyTorch's converter (README: the same effect as set_sync_bn),
    # and the CPU stand-in: before, convert() dropped the synchronisation of both
    from effdense.train import CPUSyncBatchNorm, enable_cpu_sync_bn

    source = nn.SyncBatchNorm.convert_sync_batchnorm(effdense.densenet_cifar(16, 6, num_classes=3), group)
    ours = effdense.convert(source)
    assert all(b.sync_bn and b.sync_group is group for b in ours.dense_blocks)
    standin = nn.SyncBatchNorm.convert_sync_batchnorm(_small_torchvision_densenet(), group)
    assert enable_cpu_sync_bn(standin) > 0
    ours = effdense.convert(standin)
    assert all(b.sync_bn and b.sync_group is group for b in ours.dense_blocks)
    assert all(type(m) is CPUSyncBatchNorm and m.process_group is group for m in _sync_norms(ours))


@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
def test_checkpoint_runs_an_empty_batch_on_its_own_path(stem: str) -> None:
    """checkpoint keeps its own path for an empty batch (shared and fused run it as naive): under
    SyncBatchNorm a rank left without samples must recompute in backward as the other ranks do
    (tests/test_ddp.py). Its step there is naive's: an empty output, zero gradients, BatchNorm counters
    advanced and running statistics kept."""
    import effdense.strategies as registry

    build = (lambda s: effdense.densenet_cifar(16, 6, drop_rate=0.2, strategy=s)) if stem == "cifar" else (
        lambda s: effdense.DenseNet(4, (2, 2), 8, bn_size=2, num_classes=3, drop_rate=0.2, strategy=s))  # fmt: skip
    naive = build("naive")
    train_step(naive, torch.randn(4, 3, 32, 32))
    ours = copy.deepcopy(naive).set_strategy("checkpoint")
    assert registry._runner_for("checkpoint", torch.empty(0, 3, 8, 8)) is registry._runners()["checkpoint"]
    for model in (naive, ours):
        model.zero_grad(set_to_none=False)
        x = torch.randn(0, 3, 32, 32, requires_grad=True)
        out = model(x)
        out.sum().backward()
        assert out.shape == (0, model.classifier.out_features) and x.grad.shape == x.shape
    for (name, p), q in zip(naive.named_parameters(), ours.parameters()):
        assert torch.equal(p.grad, q.grad), name
    for (name, a), b in zip(naive.named_buffers(), ours.buffers()):
        assert torch.equal(a, b), name


def _empty_batch_entries():
    from effdense.strategies import fused, shared

    return {
        "shared.run_block": lambda block, transition, x: shared.run_block(block, x),
        "fused.run_block": lambda block, transition, x: fused.run_block(block, x),
        "shared.run_stage": lambda block, transition, x: shared.run_stage(block, transition, x, shared.reference_ops()),
    }


@pytest.mark.parametrize("entry", ["shared.run_block", "fused.run_block", "shared.run_stage"])
def test_shared_block_function_runs_an_empty_batch_as_naive(entry: str) -> None:
    run = _empty_batch_entries()[entry]
    with_transition = entry.endswith("run_stage")
    naive = effdense.densenet_cifar(16, 6, drop_rate=0.2, strategy="naive")
    train_step(naive, torch.randn(4, 3, 8, 8))  # running statistics away from their initial values
    ours = copy.deepcopy(naive)
    shapes = []
    for model in (naive, ours):
        model.zero_grad(set_to_none=True)
        block, transition = model.features.denseblock1, model.features.transition1
        x = torch.randn(0, block.num_input_features, 8, 8, requires_grad=True)
        if model is naive:
            out = block(x) if not with_transition else transition(block(x))
        else:
            out = run(block, transition if with_transition else None, x)
        out.sum().backward()
        assert x.grad is not None and x.grad.shape == x.shape
        shapes.append(tuple(out.shape))
    assert shapes[1] == shapes[0] == ((0, 12, 4, 4) if with_transition else (0, 24, 8, 8))
    for (name, p), q in zip(naive.named_parameters(), ours.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if q.grad is not None:
            assert torch.equal(q.grad, torch.zeros_like(q)), name
    for (name, a), b in zip(_bn_buffers(naive).items(), _bn_buffers(ours).values()):
        assert torch.equal(a, b), name
    with torch.no_grad():
        ours.eval()
        transition = ours.features.transition1 if with_transition else None
        assert run(ours.features.denseblock1, transition, torch.randn(0, 12, 8, 8)).shape == shapes[0]


# ------------------------------------------------------------------------------------------------
# Module hooks and fx tracing: what torchvision users do with a DenseNet (Grad-CAM, feature extraction,
# FLOP and shape counters) works on every strategy


def _small_densenet(strategy: str) -> effdense.DenseNet:
    torch.manual_seed(3)
    return effdense.DenseNet(growth_rate=8, block_config=(2, 3), num_init_features=16, num_classes=5, strategy=strategy)


# one module of each kind a strategy may compute without calling it
_HOOKED = [
    "features.conv0",
    "features.denseblock1.denselayer2.conv1",
    "features.denseblock1.denselayer2.norm2",
    "features.denseblock2.denselayer1",
    "features.denseblock2",
    "features.transition1.norm",
    "features.transition1",
    "features.norm5",
    "features",
]


# modules whose output an in-place ReLU modifies (nn.ReLU(inplace=True) after a norm, DenseNet.forward's
# F.relu(features, inplace=True)): a full backward hook there fails in torchvision's model too ("Output 0 of
# BackwardHookFunction is a view and is being modified inplace")
_INPLACE_OUTPUTS = ("features", "features.norm5", "features.denseblock1.denselayer2.norm2", "features.transition1.norm")


def _hook_everything(model: nn.Module, names: list[str], calls: dict) -> list:
    modules = dict(model.named_modules())
    handles = []
    for name in names:
        def forward_hook(module, inputs, output, name=name):
            calls.setdefault(("forward", name), []).append(output.detach().clone())

        def backward_hook(module, grad_inputs, grad_outputs, name=name):
            calls.setdefault(("backward", name), []).append(grad_outputs[0].detach().clone())

        handles.append(modules[name].register_forward_hook(forward_hook))
        if name not in _INPLACE_OUTPUTS:
            handles.append(modules[name].register_full_backward_hook(backward_hook))
    return handles


@pytest.mark.parametrize("strategy", ["checkpoint", "shared", "fused", "auto"])
@pytest.mark.parametrize("hooked", [_HOOKED[1:2], _HOOKED[3:4], _HOOKED[4:5], _HOOKED])
def test_hooks_fire_once_with_naives_values(strategy: str, hooked: list[str]) -> None:
    reference = _small_densenet("naive")
    model = _small_densenet(strategy)
    x = torch.randn(2, 3, 29, 29)
    expected_calls: dict = {}
    calls: dict = {}
    _hook_everything(reference, hooked, expected_calls)
    _hook_everything(model, hooked, calls)
    out_ref = train_step(reference, x)
    out = train_step(model, x)
    # shared/fused against naive as tests/test_shared.py judges them: 1e-4 relative, plus 1e-6 of the largest
    # gradient for the cancellation-dominated ones (norm0's weight)
    assert_close_rel(out, out_ref, rtol=1e-4, name="output")
    assert sorted(calls) == sorted(expected_calls)
    assert len(calls) == 2 * len(hooked) - len(set(hooked) & set(_INPLACE_OUTPUTS))
    for key, values in expected_calls.items():
        assert len(calls[key]) == len(values) == 1, key
        assert_close_rel(calls[key][0], values[0], rtol=1e-4, name=str(key))
    ref_params = dict(reference.named_parameters())
    gmax = max(p.grad.abs().max().item() for p in reference.parameters())
    for name, p in model.named_parameters():
        expected = ref_params[name].grad
        err = (p.grad - expected).abs().max().item()
        assert err <= 1e-4 * expected.abs().max().item() + 1e-6 * gmax, f"{name}: gradient error {err:.3g}"
    for (name, a), b in zip(_bn_buffers(model).items(), _bn_buffers(reference).values()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), name


def test_hooks_inside_a_block_make_it_naive_with_a_warning(monkeypatch) -> None:
    from effdense.strategies import shared

    model = _small_densenet("shared")
    x = torch.randn(2, 3, 29, 29)
    stages = []
    run_stage = shared.run_stage
    monkeypatch.setattr(shared, "run_stage", lambda block, *a, **k: stages.append(block) or run_stage(block, *a, **k))

    # hooks outside the blocks' layers: every block still runs shared (per block), no warning
    handle = model.features.transition1.register_forward_hook(lambda *a: None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(x)
    assert stages == [model.features.denseblock1, model.features.denseblock2]

    # a hook on a layer's module: that block runs naive and says so, the other stays shared
    stages.clear()
    handle.remove()
    handle = model.features.denseblock1.denselayer2.conv1.register_forward_pre_hook(lambda *a: None)
    with pytest.warns(UserWarning, match=r"runs as strategy 'naive' instead of 'shared'.*denselayer2\.conv1"):
        model(x)
    assert stages == [model.features.denseblock2]

    # removed: back to one shared stage per block and transition, from run_features
    stages.clear()
    handle.remove()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(x)
    assert stages == [model.features.denseblock1, model.features.denseblock2]


def test_checkpoint_keeps_inner_hooks_as_torchvision_memory_efficient() -> None:
    # checkpoint calls a layer's modules (and recomputes norm1/relu1/conv1 in backward) as torchvision's
    # memory_efficient=True does, but not the layer itself: only a hook on a layer makes it fall back
    model = _small_densenet("checkpoint")
    tv = _small_torchvision_densenet(num_classes=5, memory_efficient=True)
    tv.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 29, 29)
    counts = {"ours": 0, "tv": 0}
    model.features.denseblock1.denselayer1.conv1.register_forward_hook(lambda *a: counts.__setitem__("ours", counts["ours"] + 1))
    tv.features.denseblock1.denselayer1.conv1.register_forward_hook(lambda *a: counts.__setitem__("tv", counts["tv"] + 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train_step(model, x)
    train_step(tv, x)
    assert counts["ours"] == counts["tv"] >= 1
    model.features.denseblock1.denselayer1.register_forward_hook(lambda *a: None)
    with pytest.warns(UserWarning, match="instead of 'checkpoint'.*denselayer1 .*its dense layers"):
        train_step(model, x)


@pytest.mark.parametrize(
    "strategy, hooked",
    [
        ("checkpoint", "features.denseblock1.denselayer2.relu1"),  # a layer's recomputed part
        ("checkpoint", "global"),  # register_module_forward_hook: every module checkpoint calls
        ("shared", "global stem"),  # the stem, which shared/fused recompute (a hook on it makes them run it plainly)
        ("checkpoint", "bn_function"),  # a layer's own bn_function that draws
    ],
)
def test_checkpoint_recomputes_what_draws_random_numbers_with_forwards_numbers(strategy: str, hooked: str) -> None:
    # a forward hook (or a layer's own bn_function) that draws (noise, a dropout added by a hook) runs again when
    # the recomputation does: it must draw forward's numbers, as torchvision's memory_efficient=True does (it keeps
    # the RNG state), and leave the RNG where the plain model leaves it; before, it drew others: other gradients
    import types

    from torch.nn.modules.module import register_module_forward_hook

    def noisy(module, inputs, output):
        return F.dropout(output, p=0.5, training=True) if isinstance(module, nn.ReLU) else None

    def drawing_bn_function(self, inputs):
        return F.dropout(self.conv1(self.relu1(self.norm1(torch.cat(list(inputs), 1)))), 0.5, training=True)

    x = torch.randn(2, 3, 29, 29)
    results = {}
    for s in ("naive", strategy):
        model = _small_densenet(s)
        stem = model.features.relu0
        handle = None
        if hooked == "global":
            handle = register_module_forward_hook(noisy)
        elif hooked == "global stem":
            handle = register_module_forward_hook(lambda m, i, o: noisy(m, i, o) if m is stem else None)
        elif hooked == "bn_function":
            layer = model.features.denseblock1.denselayer2
            layer.bn_function = types.MethodType(drawing_bn_function, layer)
        else:
            handle = model.get_submodule(hooked).register_forward_hook(noisy)
        try:
            out = train_step(model, x, seed=7)
        finally:
            if handle is not None:
                handle.remove()
        results[s] = (out, {n: p.grad for n, p in model.named_parameters()}, torch.rand(4))
    (out, grads, after), (ref_out, ref_grads, ref_after) = results[strategy], results["naive"]
    assert_close_rel(out, ref_out, name="output")
    scale = max(g.abs().max().item() for g in ref_grads.values())  # (shared's own rounding: tiny stem gradients)
    for name, g in ref_grads.items():
        err = (grads[name] - g).abs().max().item()
        assert err <= 1e-5 * scale, f"{name}: max error {err:.3g} against gradients up to {scale:.3g}"
    assert torch.equal(after, ref_after)  # the RNG where the plain model leaves it


def test_a_forward_inside_inference_mode_with_grad_enabled_runs_plainly() -> None:
    # torch.enable_grad() inside torch.inference_mode(): grad mode is on but nothing is recorded, and tensors
    # made there cannot be saved for backward; checkpoint and the shared Function saved them and raised
    # PyTorch's "Inference tensors cannot be saved for backward" (the plain model and torchvision run)
    x = torch.randn(2, 3, 29, 29)
    ref = _small_densenet("naive")
    with torch.inference_mode(), torch.enable_grad():
        expected = ref(x)
    for strategy in ("checkpoint", "shared", "fused", "auto"):
        model = _small_densenet(strategy)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with torch.inference_mode(), torch.enable_grad():
                out = model(x)
        assert not out.requires_grad
        assert_close_rel(out, expected, name=strategy)
        for (name, b), r in zip(model.named_buffers(), ref.buffers()):
            assert torch.allclose(b.float(), r.float(), rtol=1e-5, atol=1e-6), name  # updated once, as naive's


def test_global_module_hooks_and_flop_counting_keep_the_strategy() -> None:
    # FlopCounterMode registers hooks for all modules (its ModuleTracker) to attribute work: a shared step
    # must be counted as it runs, recomputation included, not replaced by naive's
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(2, 3, 29, 29)
    flops = {}
    for strategy in ("naive", "shared"):
        model = _small_densenet(strategy)
        counter = FlopCounterMode(display=False)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with counter:
                train_step(model, x)
        flops[strategy] = counter.get_total_flops()
    assert flops["shared"] > flops["naive"]  # BN1-ReLU-conv1x1 recomputed in backward

    from torch.nn.modules.module import register_module_forward_hook

    seen: list = []
    handle = register_module_forward_hook(lambda module, inputs, output: seen.append(type(module).__name__))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _small_densenet("shared")(x)
    finally:
        handle.remove()
    assert "_DenseLayer" not in seen and "DenseNet" in seen  # the modules shared calls, and only those


def test_fx_feature_extraction_as_torchvision() -> None:
    from torchvision.models.feature_extraction import create_feature_extractor

    tv = _small_torchvision_densenet(num_classes=5)
    model = effdense.convert(tv, strategy="auto")
    nodes = {"features.denseblock2": "block", "features.transition1.conv": "transition", "features.denseblock1.denselayer2.conv2": "layer"}
    x = torch.randn(2, 3, 29, 29)
    for mode in ("train", "eval"):
        getattr(tv, mode)(), getattr(model, mode)()
        ours = create_feature_extractor(model, nodes)(x)
        theirs = create_feature_extractor(tv, nodes)(x)
        for key in nodes.values():
            assert_close_rel(ours[key], theirs[key], name=f"{mode} {key}")
    # the same graph node names, the first layer's one-input cat included (before: missing, so
    # return_nodes=["features.denseblock1.denselayer1.cat"] raised "not present in model")
    from torchvision.models.feature_extraction import get_graph_node_names

    assert get_graph_node_names(model) == get_graph_node_names(tv)
    traced = torch.fx.symbolic_trace(model.eval())
    assert_close_rel(traced(x), tv(x), name="symbolic_trace")
    for strategy in ("checkpoint", "shared", "fused"):
        with pytest.raises(RuntimeError, match=f"strategy '{strategy}' cannot be traced by torch.fx symbolic tracing.*'auto'"):
            torch.fx.symbolic_trace(model.set_strategy(strategy))


def test_jit_trace_of_auto_records_the_plain_model() -> None:
    model = _small_densenet("auto").eval()
    x = torch.randn(2, 3, 29, 29)
    with torch.no_grad():
        expected = model(x)
    traced = torch.jit.trace(model, x)
    assert model.strategy == "auto"
    assert_close_rel(traced(x), expected, name="traced auto")
    assert "aten::cat" in str(traced.inlined_graph)  # naive's concatenations, not a shared buffer


def test_pytorch_sync_batchnorm_recipe_is_followed_by_every_strategy() -> None:
    # nn.SyncBatchNorm.convert_sync_batchnorm(model), PyTorch's DDP recipe, must mean what set_sync_bn means:
    # shared/fused read it from the modules (tests/test_ddp.py checks the numbers on two ranks)
    from effdense.strategies import shared

    group = object()  # stands for a torch.distributed process group: only its identity is read here
    model = nn.SyncBatchNorm.convert_sync_batchnorm(effdense.densenet_cifar(16, 6, num_classes=3), group)
    block, transition = model.features.denseblock1, model.features.transition1
    assert not block.sync_bn
    assert shared._sync_semantics(block, transition) == (True, group)
    assert shared._sync_semantics(model.features.denseblock3, None) == (True, group)

    # half-converted blocks have no meaning for a shared buffer: named, not guessed
    transition.norm = nn.BatchNorm2d(transition.norm.num_features)
    with pytest.raises(ValueError, match=r"4 of this block's 5 are synchronised \(over 1 group"):
        shared._sync_semantics(block, transition)

    # set_sync_bn(False) undoes either conversion, keeping the very parameter tensors an optimizer holds
    weight = block.denselayer1.norm1.weight
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.set_sync_bn(False)
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    assert block.denselayer1.norm1.weight is weight and type(block.denselayer1.norm1) is nn.BatchNorm2d
    assert shared._sync_semantics(block, transition) == (False, None)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_torch_func_transforms_run_auto_as_naive() -> None:
    from torch.func import functional_call, grad, vmap

    model = _small_densenet("auto").eval()
    reference = _small_densenet("naive").eval()
    x = torch.randn(3, 3, 29, 29)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def per_sample_input_grads(m):
        return vmap(grad(lambda xi: m(xi[None]).square().sum()))(x)

    def param_grads(m):
        return grad(lambda p: functional_call(m, p, (x,)).square().sum())(params)

    assert_close_rel(per_sample_input_grads(model), per_sample_input_grads(reference), name="vmap(grad)")
    ours, theirs = param_grads(model), param_grads(reference)
    for k in theirs:
        assert_close_rel(ours[k], theirs[k], name=k)
    assert model.strategy == "auto"
    for strategy in ("shared", "fused"):
        with pytest.raises(RuntimeError, match=f"strategy '{strategy}' cannot run inside a torch.func transform"):
            per_sample_input_grads(model.set_strategy(strategy))


@pytest.mark.parametrize("strategy", ["shared", "fused"])
def test_batched_backward_names_the_way_out(strategy: str) -> None:
    """is_grads_batched=True and jacobian(vectorize=True) run the backward under PyTorch's own batching, outside
    torch.func: the block's backward crashed with "Cannot access storage of BatchedTensorImpl"."""
    model, reference = _small_densenet(strategy), _small_densenet("naive")
    x = torch.randn(2, 3, 29, 29, requires_grad=True)
    out = model(x)
    basis = torch.eye(out.numel()).view(-1, *out.shape)[:3]
    with pytest.raises(RuntimeError, match="cannot run a batched backward.*set_strategy\\('naive'\\) or 'checkpoint'"):
        torch.autograd.grad(out, x, grad_outputs=basis, is_grads_batched=True)
    with pytest.raises(RuntimeError, match="cannot run a batched backward"):
        torch.autograd.functional.jacobian(lambda t: model(t)[:, :2], x, vectorize=True)
    for way_out in ("naive", "checkpoint"):
        (rows,) = torch.autograd.grad(model.set_strategy(way_out)(x), x, grad_outputs=basis, is_grads_batched=True)
        (expected,) = torch.autograd.grad(reference(x), x, grad_outputs=basis, is_grads_batched=True)
        assert_close_rel(rows, expected, name=f"batched input gradient, {way_out}")


def test_forward_mode_ad_runs_auto_as_naive_and_names_the_way_out() -> None:
    """Inside forward_ad.dual_level(), "auto" runs as naive (the tangent is naive's); an explicit shared/fused
    raised PyTorch's bare "You must implement the jvp function" or a batch_norm error about running
    statistics, naming neither effdense nor the way out."""
    import torch.autograd.forward_ad as fwAD

    model, reference = _small_densenet("auto"), _small_densenet("naive")
    x, tangent = torch.randn(2, 3, 29, 29), torch.randn(2, 3, 29, 29)

    def jvp(m):
        with fwAD.dual_level():
            return fwAD.unpack_dual(m(fwAD.make_dual(x, tangent))).tangent

    assert_close_rel(jvp(model), jvp(reference), name="forward-mode tangent")
    for strategy in ("shared", "fused"):
        with pytest.raises(RuntimeError, match=f"strategy '{strategy}' cannot run inside forward-mode AD.*set_strategy"):
            jvp(model.set_strategy(strategy))


@pytest.mark.parametrize("strategy", ["shared", "fused"])
def test_double_backward_names_the_way_out(strategy: str) -> None:
    model, reference = _small_densenet(strategy), _small_densenet("naive")
    x = torch.randn(2, 3, 29, 29, requires_grad=True)
    first, = torch.autograd.grad(model(x).square().sum(), x, create_graph=True)
    expected, = torch.autograd.grad(reference(x).square().sum(), x, create_graph=True)
    assert_close_rel(first, expected, rtol=1e-4, name="first-order input gradient under create_graph")
    with pytest.raises(RuntimeError, match="differentiable once.*set_strategy\\('naive'\\) or 'checkpoint'"):
        first.square().sum().backward()
    for strategy_that_can in ("naive", "checkpoint"):
        first, = torch.autograd.grad(model.set_strategy(strategy_that_can)(x).square().sum(), x, create_graph=True)
        first.square().sum().backward()  # a gradient penalty


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_checkpoint_second_derivatives_match_naive(mode: str) -> None:
    """A Hessian (row by row, retain_graph=True) through checkpoint's recomputed bottleneck and stem: putting
    the BatchNorm running statistics back after each recomputation bumped their version, which invalidated
    what the earlier recomputation's graph saved, and autograd raised its in-place error. torchvision's
    memory_efficient=True computes it."""
    from torch.func import functional_call

    torch.manual_seed(1)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    names = ["features.denseblock1.denselayer1.norm1.weight", "features.norm0.weight"]
    hessians = {}
    for strategy in ("naive", "checkpoint"):
        model = getattr(_small_densenet(strategy).double(), mode)()
        params = dict(model.named_parameters())
        p0 = tuple(params[n].detach().clone() for n in names)
        f = lambda *ps: functional_call(model, dict(zip(names, ps)), (x,), strict=False).square().sum()  # noqa: E731
        hessians[strategy] = torch.autograd.functional.hessian(f, p0)
    for row, row_ref in zip(hessians["checkpoint"], hessians["naive"]):
        for h, h_ref in zip(row, row_ref):
            torch.testing.assert_close(h, h_ref, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("strategy", ["shared", "fused"])
def test_double_backward_through_a_block_alone_raises_too(strategy: str) -> None:
    # a block followed by a parameter-free loss: its incoming gradient is a constant. Before, the input
    # gradient then came back without a graph and a penalty on it silently contributed nothing
    block = _small_densenet(strategy).features.denseblock1
    x = torch.randn(2, block.num_input_features, 7, 7, requires_grad=True)
    y = block(x)
    first, = torch.autograd.grad(y.sum(), x, create_graph=True)
    assert first.requires_grad
    with pytest.raises(RuntimeError, match="differentiable once"):
        (y.mean() + first.square().sum()).backward()


@pytest.mark.parametrize("strategy", ["naive", "shared"])
def test_convert_keeps_the_sources_module_hooks(strategy) -> None:
    """Before, convert() dropped forward and backward hooks on every dense block, layer, transition and their
    modules (a hook that scaled an output changed the source's outputs and not the copy's) and kept the stem's
    and head's (deep copies). The copy now has the same hooks and the same outputs and gradients; a hooked
    layer makes its block run as naive, as on any model."""
    torch.manual_seed(0)
    source = _small_torchvision_densenet(num_classes=4)
    scale = lambda module, inputs, output: output * 3  # noqa: E731
    f = source.features
    hooked = [f.denseblock1, f.denseblock2.denselayer1, f.transition1, f.denseblock2.denselayer2.norm1, f.conv0]
    for m in hooked:
        m.register_forward_hook(scale)
    f.denseblock1.denselayer1.conv1.register_forward_pre_hook(lambda module, args: (args[0] * 0.5,))
    grads = []
    f.denseblock2.denselayer2.conv2.register_full_backward_hook(lambda module, gin, gout: grads.append(gout[0].abs().sum()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the hooked blocks run as naive, with their warning)
        ours = effdense.convert(source, strategy=strategy)
        ours_modules = dict(ours.named_modules())
        for name, m in source.named_modules():
            assert len(ours_modules[name]._forward_hooks) == len(m._forward_hooks), name
        x = torch.randn(2, 3, 40, 40)
        out_tv, out = train_step(copy.deepcopy(source), x), train_step(ours, x)
    assert_close_rel(out, out_tv, rtol=1e-4, name="output")
    assert len(grads) == 2 and torch.allclose(grads[0], grads[1], rtol=1e-4)
    # the source's handles are the source's: removing one leaves the copy's hook in place
    handle = source.features.denseblock1.register_forward_hook(scale)
    copy_of_it = effdense.convert(source, strategy="naive")
    handle.remove()
    assert len(copy_of_it.features.denseblock1._forward_hooks) == 2


def test_convert_says_a_pruned_model_needs_prune_remove() -> None:
    # before: "the state dicts differ: ... Unexpected weight_orig, weight_mask", naming no pruning
    source = _small_torchvision_densenet(num_classes=4)
    conv = source.features.denseblock2.denselayer1.conv2
    torch.nn.utils.prune.l1_unstructured(conv, "weight", amount=0.3)
    with pytest.raises(TypeError, match=r"pruned with torch.nn.utils.prune \(features.denseblock2.denselayer1.conv2\).*prune.remove"):
        effdense.convert(source)
    torch.nn.utils.prune.remove(conv, "weight")
    for name in ("classifier", "features.conv0"):  # copied modules too (before: deepcopy's own error about graph leaves)
        other = _small_torchvision_densenet(num_classes=4)
        torch.nn.utils.prune.l1_unstructured(other.get_submodule(name), "weight", amount=0.3)
        with pytest.raises(TypeError, match=rf"pruned with torch.nn.utils.prune \({name}\)"):
            effdense.convert(other)
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(effdense.convert(source).eval()(x), source.eval()(x))


class _DownUp(nn.Module):
    """A small FC-DenseNet-like model of one's own: two dense blocks around a transition, the up path fed the
    down block's new features as a skip."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.down = effdense.DenseBlock(num_layers=3, num_input_features=8, bn_size=2, growth_rate=4, drop_rate=0.0)
        self.td = effdense.Transition(20, 10)
        self.bottom = effdense.DenseBlock(2, 10, 2, 4, 0.0)
        self.up = nn.ConvTranspose2d(8, 8, 2, stride=2)
        self.head = nn.Conv2d(8 + 12, 5, 1)

    def forward(self, x):
        y = self.down(self.stem(x))
        skip = y[:, 8:]  # the down block's new features
        z = self.bottom(self.td(y))
        return self.head(torch.cat([self.up(z[:, 10:]), skip], 1))


@pytest.mark.parametrize("strategy", ["checkpoint", "shared", "fused"])
def test_set_strategy_on_a_model_of_ones_own(strategy) -> None:
    """Blocks used in an architecture of one's own: effdense.set_strategy sets every block (before there was no
    way but a loop over private classes: set_strategy was a DenseNet method, and assigning net.strategy did
    nothing), and the model matches naive, running stats included."""
    torch.manual_seed(0)
    ref = effdense.set_strategy(_DownUp().double(), "naive")
    other = effdense.set_strategy(copy.deepcopy(ref), strategy, effdense.Policy(cache_stats=False))
    assert [b.strategy for b in (other.down, other.bottom)] == [strategy] * 2
    assert other.down.policy == effdense.Policy(cache_stats=False)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (no block falls back to naive)
        outs = []
        for m in (ref, other):
            out = m(x)
            (out * torch.linspace(-1, 1, out.shape[1], dtype=out.dtype).view(1, -1, 1, 1)).square().sum().backward()
            outs.append(out.detach())
    torch.testing.assert_close(outs[1], outs[0])
    for (name, p), q in zip(ref.named_parameters(), other.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)
    for (name, a), b in zip(ref.named_buffers(), other.buffers()):
        torch.testing.assert_close(b, a, msg=name)
    with pytest.raises(ValueError, match="holds no effdense dense block"):
        effdense.set_strategy(nn.Linear(2, 2), "shared")
    with pytest.raises(ValueError, match="unknown strategy"):
        effdense.set_strategy(other, "bogus")
    model = effdense.densenet_cifar(16, 4)
    assert effdense.set_strategy(model, strategy) is model and model.strategy == strategy


def test_dense_block_takes_torchvisions_arguments_and_checks_them() -> None:
    """Public as effdense.DenseBlock: torchvision's sixth positional argument is memory_efficient (here it was
    bottleneck: DenseBlock(2, 8, 2, 4, 0.0, False) built another block than torchvision's), and nonsense was
    accepted until forward (growth_rate=0: a bare IndexError under shared; policy={} taken as the default)."""
    tv = torchvision.models.densenet._DenseBlock(2, 8, 2, 4, 0.0, False)
    ours = effdense.DenseBlock(2, 8, 2, 4, 0.0, False)
    assert ours.state_dict().keys() == tv.state_dict().keys()
    assert effdense.DenseBlock(2, 8, 2, 4, 0.0, True).strategy == "checkpoint"
    with pytest.raises(ValueError, match="conflicts with strategy='shared'"):
        effdense.DenseBlock(2, 8, 2, 4, 0.0, True, strategy="shared")
    for kwargs, error, match in [
        (dict(growth_rate=0), ValueError, "growth_rate"),
        (dict(num_layers=0), ValueError, "num_layers"),
        (dict(drop_rate=1.0), ValueError, "drop_rate"),
        (dict(policy={}), TypeError, "policy"),
        (dict(strategy="bogus"), ValueError, "unknown strategy"),
    ]:
        args = dict(num_layers=2, num_input_features=8, bn_size=2, growth_rate=4, drop_rate=0.0) | kwargs
        with pytest.raises(error, match=match):
            effdense.DenseBlock(**args)


def test_set_strategy_reaches_blocks_a_densenet_subclass_holds_outside_features() -> None:
    class WithHead(effdense.DenseNet):
        def __init__(self):
            super().__init__(4, (2,), 8, bn_size=2, num_classes=3, small_inputs=True)
            self.head_block = effdense.DenseBlock(2, 8, 2, 4, 0.0)

    model = effdense.set_strategy(WithHead(), "checkpoint")
    assert model.strategy == "checkpoint" and model.head_block.strategy == "checkpoint"
    assert model.features.denseblock1.strategy == "checkpoint"
    # the model's own method and attributes too (from a probe: they reached features' direct children only, and
    # an ablation ran the head block, or a block wrapped by surgery, on the old strategy and policy, silently)
    model.features.denseblock1 = nn.Sequential(model.features.denseblock1)
    policy = effdense.Policy(cache_stats=False)
    model.set_strategy("shared", policy)
    blocks = (model.head_block, model.features.denseblock1[0])
    assert [(b.strategy, b.policy) for b in blocks] == [("shared", policy)] * 2
    model.strategy = "naive"
    model.policy = effdense.Policy()
    assert [(b.strategy, b.policy) for b in blocks] == [("naive", effdense.Policy())] * 2
