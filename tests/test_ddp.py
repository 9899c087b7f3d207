"""DistributedDataParallel on CPU: two gloo processes against one process on the same global batch.

* without sync_bn each rank normalises its half of the batch, so the single-process twin runs the two
  halves separately (ghost batches) and averages their losses: DDP must match it for every strategy;
* with sync_bn (``effdense train --sync-bn``) the batch statistics are those of the global batch, so DDP
  must match plain single-process training on the whole batch: parameters, running statistics, losses.

Both ranks run every configuration in one spawn (a process start costs seconds here); the single-process
references run in the test process. Without CUDA, ``fused`` runs its CPU path here, the kernels' PyTorch
twins (``TRITON_INTERPRET=0``), i.e. the ``shared`` Function: under Triton's interpreter (conftest's
default) each of its runs takes 10-30 s, and the kernels are tested against the twins elsewhere. One
configuration, fused under SyncBatchNorm semantics, runs the kernels in the interpreter, in a spawn of its own.
"""


import os
import time
import traceback
import warnings
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import effdense
from effdense import train as T

WORLD = 2
STEPS = 2
AVAILABLE = effdense.available_strategies()
# (atol, rtol) for fp32 parameters after a few SGD steps: only the reduction order differs
TOL = (2e-5, 1e-4)

# DDP runs of `effdense train`: 32 images, 2 steps per epoch of a global batch of 16, 2 epochs
TRAIN_ARGV = ["--depth", "10", "--growth-rate", "4", "--image-size", "12", "--subset", "32", "--test-subset", "16",
              "--epochs", "2", "--save-every", "0", "--no-progress", "--quiet", "--seed", "3"]


def _tiny_model(strategy):
    torch.manual_seed(0)
    return effdense.densenet_cifar(10, 4, num_classes=10, in_channels=1, strategy=strategy)


def _global_batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8 * WORLD, 1, 12, 12, generator=g), torch.randint(0, 10, (8 * WORLD,), generator=g))
            for _ in range(STEPS)]


def _sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def _train_rank_half(run, model, rank):
    """SGD steps of ``model``, called through ``run`` (the model or its DDP wrapper) on this rank's half of
    each global batch; returns ``model``."""
    opt = _sgd(model)
    for x, y in _global_batches():
        loss = F.cross_entropy(run(x.chunk(WORLD)[rank]), y.chunk(WORLD)[rank])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def _train_ddp(model, rank):
    """SGD steps of ``model`` under DDP, on this rank's half of each global batch; returns ``model``."""
    return _train_rank_half(torch.nn.parallel.DistributedDataParallel(model), model, rank)


def _ghost_ddp(strategy, rank):
    model = _train_ddp(_tiny_model(strategy), rank)
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _fsdp2(strategy, rank):
    # FSDP2: every dense block sharded, then the model (the parameters are DTensors; the strategies compute
    # with the unsharded ones FSDP gathers before each block's forward and backward)
    from torch.distributed.fsdp import fully_shard

    model = _tiny_model(strategy)
    for block in model.dense_blocks:
        fully_shard(block)
    fully_shard(model)
    _train_rank_half(model, model, rank)
    return {k: v.full_tensor().detach().clone() for k, v in model.named_parameters()}


def _ghost_reference(strategy):
    model = _tiny_model(strategy)
    opt = _sgd(model)
    for x, y in _global_batches():
        loss = sum(F.cross_entropy(model(xc), yc) for xc, yc in zip(x.chunk(WORLD), y.chunk(WORLD))) / WORLD
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _torch_sync_bn_ddp(strategy, rank):
    # PyTorch's recipe instead of set_sync_bn: nn.SyncBatchNorm.convert_sync_batchnorm, then (CPU only: DDP
    # refuses nn.SyncBatchNorm on CPU modules) effdense's CPU stand-in for it
    model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(_tiny_model(strategy))
    T.enable_cpu_sync_bn(model)
    model = _train_ddp(model, rank)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _eval_alone(strategy, rank):
    # rank 0 evaluates under SyncBatchNorm semantics while rank 1 waits: in eval mode nothing is all-reduced
    # (nn.SyncBatchNorm's behaviour); before, shared/fused all-reduced the batch size and rank 0 hung
    model = _tiny_model(strategy).set_sync_bn(True)
    T.enable_cpu_sync_bn(model)
    out = torch.zeros(())
    if rank == 0:
        with torch.no_grad():
            out = model.eval()(_global_batches()[0][0])
    dist.barrier()
    return out


def _without_running_stats(model):
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False
            m.running_mean = m.running_var = m.num_batches_tracked = None
    return model


def _eval_no_running_stats(strategy, rank):
    # eval mode under SyncBatchNorm semantics, BatchNorms without running statistics: nn.SyncBatchNorm normalises
    # with this rank's own batch statistics (it all-reduces in training mode only). Before, shared/fused
    # all-reduced them (outputs 0.05-0.08 off), and a rank evaluating alone hung. Each rank its half of a batch,
    # then rank 0 alone.
    model = _without_running_stats(_tiny_model(strategy)).set_sync_bn(True)
    T.enable_cpu_sync_bn(model)
    x = _global_batches()[0][0]
    with torch.no_grad():
        out = model.eval()(x.chunk(WORLD)[rank])
        alone = model(x.chunk(WORLD)[0]) if rank == 0 else torch.zeros(())
    dist.barrier()
    return {"out": out, "alone": alone}


def _mixed_sync_modes(strategy, rank):
    # training under SyncBatchNorm semantics with one BN1 of block 1 in eval mode without running statistics (its
    # own rank's batch statistics, the others' all-reduced): shared/fused run that block's modules as naive does
    # (its one set of cached statistics cannot be both), the other blocks as themselves
    model = _without_running_stats(_tiny_model(strategy)).set_sync_bn(True)
    T.enable_cpu_sync_bn(model)
    model.train().features.denseblock1.denselayer1.norm1.eval()
    x = _global_batches()[0][0].chunk(WORLD)[rank].requires_grad_()
    model(x).square().sum().backward()
    return {"grad": x.grad, **{k: p.grad for k, p in model.named_parameters()}}


def _f64_sync_bn(rank):
    # CPUSyncBatchNorm computes a float64 input in float64 (before: in float32, outputs 4e-6 off)
    bn = T.CPUSyncBatchNorm(3).double()
    x = (torch.randn(4, 3, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(rank)) * 3 + 100).requires_grad_()
    out = bn(x)
    (out * out.detach().sin()).sum().backward()
    return {"out": out.detach(), "grad": x.grad, "running_var": bn.running_var}


def _empty_rank(strategy, rank):
    # SyncBatchNorm semantics with rank 1's batches empty (the tail of an uneven dataset): every rank must issue
    # the same collectives. Before, checkpoint's empty rank ran as naive, without the recomputation (and its
    # SyncBatchNorm all-gathers) that rank 0 ran in backward: both hung until the group's timeout
    model = _tiny_model(strategy).set_sync_bn(True)
    T.enable_cpu_sync_bn(model)
    run, opt = torch.nn.parallel.DistributedDataParallel(model), _sgd(model)
    for x, y in _global_batches():
        n = x.shape[0] // WORLD if rank == 0 else 0
        loss = F.cross_entropy(run(x[:n]), y[:n], reduction="sum")  # (a mean over no samples is NaN)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _outside_group(rank):
    # a CPUSyncBatchNorm over a group without this rank normalises locally, as nn.SyncBatchNorm; before, rank 1
    # failed with "stack expects a non-empty TensorList" (get_world_size is -1 outside the group)
    group = dist.new_group([0])  # (every rank takes part in creating it)
    bn = T.CPUSyncBatchNorm(3)
    bn.process_group = group
    x = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(rank))
    return bn(x) if rank == 1 else torch.zeros(())


def _global_reference(strategy):
    model = _tiny_model(strategy)
    opt = _sgd(model)
    for x, y in _global_batches():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _train_argv(strategy, out_dir, batch_size, sync):
    return [*TRAIN_ARGV, "--strategy", strategy, "--batch-size", str(batch_size), "--out-dir", out_dir,
            *(["--sync-bn"] if sync else [])]


def _resume_rank0_rng(rank, out_dir):
    """A 2-process resume from a checkpoint that holds rank 0's RNG state alone (as one saved by one process, or
    by one rank on an error): each rank's seed afterwards."""
    run = os.path.join(out_dir, "run-naive")  # (the sync run's checkpoint after its 2 epochs, forged as after 1)
    forged = os.path.join(out_dir, "rank0-rng.pt")
    if rank == 0:
        state = torch.load(os.path.join(run, "checkpoint.pt"), weights_only=False)
        state["rng"] = state["rng"][0]
        state["epoch"], state["history"] = 1, state["history"][:1]  # (as if saved after epoch 1 of 2)
        torch.save(state, forged)
    dist.barrier()
    argv = _train_argv("naive", os.path.join(out_dir, "resumed"), 8, sync=True)
    T.train(T.parse_args([*argv, "--resume", forged]))
    return {"seed": torch.initial_seed()}


def _worker(rank, init_file, out_dir, strategies):
    torch.set_num_threads(1)  # two ranks on a shared 2-core machine
    os.environ["TRITON_INTERPRET"] = "0"
    os.environ["LOCAL_RANK"] = str(rank)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=30))
    try:
        for s in strategies:
            # (shared/fused hang with an empty rank under SyncBatchNorm: documented, see the README)
            empty = ("empty_rank",) if s in ("naive", "checkpoint") else ()
            for kind in ("ghost", "fsdp2", "sync", "torch_sync", "eval_alone", "eval_no_running", "mixed_modes", *empty):
                path = os.path.join(out_dir, f"{kind}-{s}-rank{rank}.pt")
                try:
                    with warnings.catch_warnings(record=True) as warned:
                        warnings.simplefilter("always")
                        if kind == "ghost":
                            result = {"params": _ghost_ddp(s, rank)}
                        elif kind == "fsdp2":
                            result = {"params": _fsdp2(s, rank)}
                        elif kind == "torch_sync":
                            result = {"state": _torch_sync_bn_ddp(s, rank)}
                        elif kind == "eval_alone":
                            result = {"out": _eval_alone(s, rank)}
                        elif kind == "eval_no_running":
                            result = _eval_no_running_stats(s, rank)
                        elif kind == "mixed_modes":
                            result = _mixed_sync_modes(s, rank)
                        elif kind == "empty_rank":
                            result = {"state": _empty_rank(s, rank)}
                        else:
                            r = T.train(T.parse_args(_train_argv(s, os.path.join(out_dir, f"run-{s}"), 8, sync=True)))
                            result = {"state": r["model"].state_dict(), "history": r["history"], "seed": torch.initial_seed()}
                    # a stage that ran as naive instead of its strategy says so in a warning
                    result["fallbacks"] = sum("runs as strategy 'naive'" in str(w.message) for w in warned)
                except Exception:  # reported by the test of this configuration
                    result = {"error": traceback.format_exc()}
                torch.save(result, path)
        path = os.path.join(out_dir, f"resume_rank0_rng-naive-rank{rank}.pt")
        try:
            result = _resume_rank0_rng(rank, out_dir)
        except Exception:
            result = {"error": traceback.format_exc()}
        torch.save(result, path)
        for kind, fn in (("outside_group", lambda: {"out": _outside_group(rank)}), ("f64_sync_bn", lambda: _f64_sync_bn(rank))):
            try:
                result = fn()
            except Exception:
                result = {"error": traceback.format_exc()}
            torch.save(result, os.path.join(out_dir, f"{kind}-rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(autouse=True)
def _fused_on_its_cpu_path_one_thread(monkeypatch):
    # the single-process references run fused's CPU path, as the ranks do (their _worker sets TRITON_INTERPRET=0
    # before anything imports effdense.kernels). Here the kernels may already be imported, or are imported by
    # later tests: the variable is read once, at that import, so setting it would leak into every later test
    # (they would run the twins instead of the interpreter). Turn the dispatch off for these tests alone.
    from effdense.kernels import _launch
    monkeypatch.setattr(_launch, "_INTERPRETING", False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks: tiny models, and OpenMP spinning on a shared machine costs
    yield
    torch.set_num_threads(threads)


def _spawn_ranks(fn, args: tuple, limit_s: int) -> None:
    """Run ``fn(rank, *args)`` in ``WORLD`` spawned processes; fail the test if they take over ``limit_s``."""
    ctx = mp.start_processes(fn, args=args, nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + limit_s
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the two DDP processes did not finish within {limit_s} s")


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    _spawn_ranks(_worker, (str(out / "store"), str(out), AVAILABLE), 120)
    return out


def _fused_kernels_worker(rank, init_file, out_dir):
    """``fused`` under SyncBatchNorm semantics with the real Triton kernels, in the interpreter: the ranks of
    :func:`_worker` run fused on the PyTorch twins (its sync path, which launches each channel chunk's weight and
    input gradients apart with BN1's sums all-reduced between them, had no CPU test on the kernels)."""
    torch.set_num_threads(1)
    os.environ["TRITON_INTERPRET"] = "1"  # (before effdense.kernels is imported in this process)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    path = os.path.join(out_dir, f"torch_sync-fused_kernels-rank{rank}.pt")
    try:
        from effdense.strategies import fused

        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            result = {"state": _torch_sync_bn_ddp("fused", rank), "kernels": fused.kernels_available(torch.device("cpu"))}
        result["fallbacks"] = sum("runs as strategy 'naive'" in str(w.message) for w in warned)
    except Exception:
        result = {"error": traceback.format_exc()}
    torch.save(result, path)
    dist.destroy_process_group()


@pytest.mark.skipif("fused" not in AVAILABLE, reason="strategy fused not available")
def test_fused_kernels_under_sync_bn_match_the_global_batch(tmp_path):
    pytest.importorskip("triton")  # (the ranks run the kernels in its interpreter)
    _spawn_ranks(_fused_kernels_worker, (str(tmp_path / "store"), str(tmp_path)), 240)
    expected = _global_reference("naive")
    for rank in range(WORLD):
        result = _load(tmp_path, "torch_sync", "fused_kernels", rank)
        assert result["kernels"] and result["fallbacks"] == 0, (rank, result["kernels"], result["fallbacks"])
        _close(result["state"], expected, f"rank {rank}")


def _load(out, kind, strategy, rank):
    result = torch.load(out / f"{kind}-{strategy}-rank{rank}.pt", weights_only=True)
    if "error" in result:
        pytest.fail(f"rank {rank} failed:\n{result['error']}")
    return result


def _close(actual, expected, what):
    assert actual.keys() == expected.keys()
    for k in expected:
        a, e = actual[k], expected[k]
        if e.is_floating_point():
            torch.testing.assert_close(a, e, atol=TOL[0], rtol=TOL[1], msg=lambda m: f"{what} {k}: {m}")
        else:
            assert torch.equal(a, e), f"{what} {k}: {a} != {e}"


def _strategy_params(names):
    return [pytest.param(s, marks=pytest.mark.skipif(s not in AVAILABLE, reason=f"strategy {s!r} is not available "
                         f"in this installation yet (available: {AVAILABLE})")) for s in names]


@pytest.mark.parametrize("strategy", _strategy_params(effdense.STRATEGIES))
def test_ddp_matches_single_process_ghost_batches(ddp_runs, strategy):
    expected = _ghost_reference(strategy)
    for rank in range(WORLD):
        _close(_load(ddp_runs, "ghost", strategy, rank)["params"], expected, f"rank {rank}")


@pytest.mark.parametrize("strategy", _strategy_params(effdense.STRATEGIES))
def test_fsdp2_per_block_matches_single_process_ghost_batches(ddp_runs, strategy):
    """FSDP2's fully_shard on each dense block and the model: the strategy runs on the gathered parameters
    (no fallback to naive) and trains as DDP does."""
    expected = _ghost_reference(strategy)
    for rank in range(WORLD):
        result = _load(ddp_runs, "fsdp2", strategy, rank)
        assert result["fallbacks"] == 0, f"rank {rank}: a block ran as naive"
        _close(result["params"], expected, f"rank {rank}")


@pytest.mark.parametrize("strategy", _strategy_params(effdense.STRATEGIES))
def test_ddp_sync_bn_matches_single_process_global_batch(ddp_runs, strategy, tmp_path):
    single = T.train(T.parse_args(_train_argv(strategy, str(tmp_path), 8 * WORLD, sync=False)))
    expected = single["model"].state_dict()
    for rank in range(WORLD):
        result = _load(ddp_runs, "sync", strategy, rank)
        _close(result["state"], expected, f"rank {rank}")  # parameters and running statistics
        assert result["seed"] == 3 + rank  # each rank its own random stream (dropout masks), rank 0 --seed's
        for got, want in zip(result["history"], single["history"]):
            for key in ("train_loss", "train_acc", "test_loss", "test_acc"):
                assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-5), (rank, key)
            assert len(got["peak_mem_mib_per_rank"]) == WORLD and got["world_size"] == WORLD


def test_a_resume_from_rank_0s_random_state_alone_gives_each_rank_its_own(ddp_runs):
    """Every rank was given rank 0's state, and drew the same dropout masks as it."""
    seeds = [_load(ddp_runs, "resume_rank0_rng", "naive", rank)["seed"] for rank in range(WORLD)]
    assert len(set(seeds)) == WORLD, seeds


@pytest.mark.parametrize("strategy", _strategy_params(effdense.STRATEGIES))
def test_ddp_with_pytorchs_sync_batchnorm_recipe_matches_global_batch(ddp_runs, strategy):
    # without reading the modules, shared/fused normalised each rank's half on its own: a silent divergence
    expected = _global_reference(strategy)
    for rank in range(WORLD):
        _close(_load(ddp_runs, "torch_sync", strategy, rank)["state"], expected, f"rank {rank}")


@pytest.mark.parametrize("strategy", _strategy_params(effdense.STRATEGIES))
def test_sync_bn_runs_the_strategy_itself(ddp_runs, strategy):
    # before: the CPU stand-in CPUSyncBatchNorm, a BatchNorm with a forward of its own, made every shared/fused
    # stage fall back to naive (with a warning), so the tests above compared naive with naive
    for kind in ("sync", "torch_sync", "eval_alone"):
        for rank in range(WORLD):
            assert _load(ddp_runs, kind, strategy, rank)["fallbacks"] == 0, (kind, rank)


@pytest.mark.parametrize("strategy", _strategy_params(effdense.STRATEGIES))
def test_a_rank_evaluates_alone_under_sync_bn(ddp_runs, strategy):
    model = _tiny_model(strategy).eval()
    with torch.no_grad():
        expected = model(_global_batches()[0][0])
    torch.testing.assert_close(_load(ddp_runs, "eval_alone", strategy, 0)["out"], expected, atol=TOL[0], rtol=TOL[1])


@pytest.mark.skipif("checkpoint" not in AVAILABLE, reason="strategy checkpoint not available")
def test_checkpoint_trains_with_an_empty_rank_under_sync_bn(ddp_runs):
    """A rank whose batch is empty keeps checkpoint's own path (an empty batch falls back to naive for shared
    and fused only), so its collectives match the other rank's; both end as naive's ranks do."""
    for rank in range(WORLD):
        expected = _load(ddp_runs, "empty_rank", "naive", rank)["state"]
        _close(_load(ddp_runs, "empty_rank", "checkpoint", rank)["state"], expected, f"rank {rank}")


def test_cpu_sync_batchnorm_outside_its_group_normalises_locally(ddp_runs):
    result = torch.load(ddp_runs / "outside_group-rank1.pt", weights_only=True)
    assert "error" not in result, result.get("error")
    x = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(result["out"], F.batch_norm(x, None, None, training=True), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("strategy", _strategy_params(effdense.STRATEGIES))
def test_eval_without_running_stats_normalises_each_rank_locally_under_sync_bn(ddp_runs, strategy):
    model = _without_running_stats(_tiny_model("naive")).eval()
    x = _global_batches()[0][0]
    for rank in range(WORLD):
        result = _load(ddp_runs, "eval_no_running", strategy, rank)
        assert result["fallbacks"] == 0, rank
        with torch.no_grad():
            torch.testing.assert_close(result["out"], model(x.chunk(WORLD)[rank]), atol=TOL[0], rtol=TOL[1])
    with torch.no_grad():
        torch.testing.assert_close(_load(ddp_runs, "eval_no_running", strategy, 0)["alone"], model(x.chunk(WORLD)[0]),
                                   atol=TOL[0], rtol=TOL[1])


@pytest.mark.parametrize("strategy", _strategy_params(effdense.STRATEGIES))
def test_sync_bn_in_mixed_modes_matches_naive(ddp_runs, strategy):
    for rank in range(WORLD):
        expected, result = _load(ddp_runs, "mixed_modes", "naive", rank), _load(ddp_runs, "mixed_modes", strategy, rank)
        # one stage (block 1 with its transition) runs as naive in shared/fused, and says so; the others do not
        assert result.pop("fallbacks") == (1 if strategy in ("shared", "fused") else 0), rank
        expected.pop("fallbacks")
        _close(result, expected, f"rank {rank}")


def test_cpu_sync_batchnorm_computes_float64_in_float64(ddp_runs):
    xs = [torch.randn(4, 3, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(r)) * 3 + 100 for r in range(WORLD)]
    whole = torch.cat(xs).requires_grad_()
    out = F.batch_norm(whole, None, None, training=True)
    (out * out.detach().sin()).sum().backward()
    for rank in range(WORLD):
        result = torch.load(ddp_runs / f"f64_sync_bn-rank{rank}.pt", weights_only=True)
        assert "error" not in result, result.get("error")
        assert result["out"].dtype == torch.float64
        torch.testing.assert_close(result["out"], out.detach().chunk(WORLD)[rank], atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(result["grad"], whole.grad.chunk(WORLD)[rank], atol=1e-12, rtol=1e-12)
        expected_var = 0.9 + 0.1 * torch.cat(xs).var(dim=(0, 2, 3))
        torch.testing.assert_close(result["running_var"], expected_var, atol=1e-12, rtol=1e-12)
