"""``effdense train``: short runs on a digits subset, exact resume, Ctrl-C, mixed precision, and one-line
errors with exit code 2. The full default run (>= 95% on digits) is recorded in benchmarks/results, not
run here."""

import argparse
import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from effdense import train as T
from effdense.data import ShardSampler, load_digits

# a tiny DenseNet-BC (one layer per block, k=4) on 12x12 digits: ~0.1 s per epoch of 128 images
TINY = ["--depth", "10", "--growth-rate", "4", "--image-size", "12", "--subset", "128", "--test-subset", "64",
        "--batch-size", "32", "--strategy", "naive", "--no-progress", "--quiet"]


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny models gain nothing from a second thread, and OpenMP spinning on a shared 2-core machine costs
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _args(tmp_path, *extra):
    return T.parse_args([*TINY, "--out-dir", str(tmp_path), *map(str, extra)])


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(a, b, atol=1e-6, rtol=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=rtol, msg=lambda m: f"{k}: {m}")


def test_add_arguments_on_a_fresh_parser():
    parser = argparse.ArgumentParser()
    T.add_arguments(parser)
    args = parser.parse_args([])
    assert (args.data, args.model, args.strategy, args.optimizer, args.lr_schedule) == (
        "digits", None, "auto", "sgd", "cosine")
    assert args.precision == "fp32" and not args.sync_bn and not args.compile


def test_digits_split_is_fixed_stratified_and_resized():
    a, b = load_digits(16), load_digits(16)
    assert len(a.train) + len(a.test) == 1797 and len(a.test) == 450
    assert torch.equal(a.train.tensors[0], b.train.tensors[0])  # same split every time
    assert a.train.tensors[0].shape[1:] == (1, 16, 16)
    test_counts = torch.bincount(a.test.tensors[1], minlength=10)
    all_counts = test_counts + torch.bincount(a.train.tensors[1], minlength=10)
    assert ((test_counts - 0.25 * all_counts).abs() <= 1).all()  # stratified: each class 25% held out


def test_shard_sampler_matches_distributed_sampler_and_resumes_mid_epoch():
    from torch.utils.data import DistributedSampler

    data = list(range(13))  # odd length: padding
    for rank in range(2):
        ours = ShardSampler(len(data), world_size=2, rank=rank, seed=5)
        ref = DistributedSampler(data, num_replicas=2, rank=rank, seed=5)
        ours.set_epoch(3)
        ref.set_epoch(3)
        assert list(ours) == list(ref) and len(ours) == len(ref)
        ours.set_epoch(3, start=4)
        assert list(ours) == list(ref)[4:] and len(ours) == len(ref) - 4


def test_short_run_learns_and_logs(tmp_path):
    result = T.train(_args(tmp_path, "--epochs", 4, "--growth-rate", 8, "--subset", 256, "--image-size", 16))
    losses = [row["train_loss"] for row in result["history"]]
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.85 * losses[0], losses
    assert result["test_acc"] > 0.2  # chance is 0.1; 32 steps on 256 images are far from converged
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    for key in ("train_loss", "train_acc", "test_acc", "img_per_s", "peak_mem_mib", "lr"):
        assert float(rows[-1][key]) >= 0.0, key
    assert os.path.isfile(tmp_path / "checkpoint.pt")


@pytest.mark.parametrize("interrupt_at", [4, 2], ids=["epoch-boundary", "mid-epoch"])
def test_resume_continues_the_same_run(tmp_path, interrupt_at):
    # 2 epochs of 4 steps straight, versus Ctrl-C after step `interrupt_at` of epoch 1 and --resume
    extra = ["--epochs", 2, "--optimizer", "sgd", "--lr-schedule", "cosine", "--drop-rate", "0"]
    straight = T.train(_args(tmp_path / "a", *extra))

    def ctrl_c(epoch, step, loss):
        if epoch == 0 and step == interrupt_at:
            os.kill(os.getpid(), signal.SIGINT)  # the handler sets a flag; the loop stops after this step

    first = T.train(_args(tmp_path / "b", *extra), on_step=ctrl_c)
    assert first["interrupted"] and first["checkpoint"] == str(tmp_path / "b" / "checkpoint.pt")
    assert len(first["step_losses"]) == interrupt_at
    saved_elapsed = torch.load(first["checkpoint"], weights_only=False)["elapsed_s"]  # before the resumed run rewrites it
    resumed = T.train(_args(tmp_path / "b", *extra, "--resume", first["checkpoint"]))
    assert not resumed["interrupted"]

    losses = first["step_losses"] + resumed["step_losses"]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(straight["step_losses"]), atol=1e-6, rtol=1e-5)
    _assert_same_state(_state(resumed["model"]), _state(straight["model"]))
    assert [r["epoch"] for r in resumed["history"]] == [1, 2]
    with open(tmp_path / "b" / "metrics.csv") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [1, 2]  # appended, not restarted
    # wall time continues across the resume: the log's elapsed_s does not restart at the second process
    assert 0 < saved_elapsed <= first["wall_s"]
    elapsed = [r["elapsed_s"] for r in resumed["history"]]
    assert elapsed == sorted(elapsed) and elapsed[-1] > saved_elapsed


def test_keyboard_interrupt_exception_saves_a_checkpoint_that_resumes(tmp_path):
    # a KeyboardInterrupt raised outside the signal handler (e.g. from a DataLoader) takes the other path
    def boom(epoch, step, loss):
        if epoch == 1 and step == 1:
            raise KeyboardInterrupt

    first = T.train(_args(tmp_path, "--epochs", 2), on_step=boom)
    assert first["interrupted"]
    state = T.load_checkpoint(first["checkpoint"])
    assert (state["epoch"], state["step"]) == (1, 1)
    assert {"torch", "numpy", "python"} <= set(state["rng"])
    resumed = T.train(_args(tmp_path, "--epochs", 2, "--resume", first["checkpoint"]))
    straight = T.train(_args(tmp_path / "ref", "--epochs", 2))
    _assert_same_state(_state(resumed["model"]), _state(straight["model"]))


def test_a_shortened_resume_keeps_the_schedules_length_for_the_next(tmp_path):
    """A 3-epoch cosine run stopped after epoch 1, resumed with --epochs 2 (the schedule keeps its 3 epochs, as
    the note says), then resumed again with --epochs 3: it finishes the run as one straight run. Before, the
    second checkpoint recorded 2 epochs and the last resume was refused ("a 2-epoch run, whose cosine
    learning-rate schedule ends at epoch 2"): the run could not be finished."""
    extra = ["--optimizer", "sgd", "--lr-schedule", "cosine", "--drop-rate", "0"]

    def stop(epoch, step, loss):
        if epoch == 0 and step == 4:  # (TINY: 4 steps per epoch) the end of epoch 1
            os.kill(os.getpid(), signal.SIGINT)

    first = T.train(_args(tmp_path / "b", "--epochs", 3, *extra), on_step=stop)
    assert first["interrupted"]
    second = T.train(_args(tmp_path / "b", "--epochs", 2, *extra, "--resume", first["checkpoint"]))
    assert T.load_checkpoint(second["checkpoint"])["schedule_epochs"] == 3
    third = T.train(_args(tmp_path / "b", "--epochs", 3, *extra, "--resume", second["checkpoint"]))
    straight = T.train(_args(tmp_path / "a", "--epochs", 3, *extra))
    losses = first["step_losses"] + second["step_losses"] + third["step_losses"]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(straight["step_losses"]), atol=1e-6, rtol=1e-5)
    _assert_same_state(_state(third["model"]), _state(straight["model"]))


def test_a_shortened_resume_of_a_run_with_a_long_warmup_is_not_refused(tmp_path):
    """--warmup-epochs longer than --epochs is refused, except on --resume: the schedule is the checkpoint's
    (3 epochs here, 2.5 of them warm-up), and --warmup-epochs must repeat the saved value."""
    extra = ["--warmup-epochs", 2.5, "--lr-schedule", "cosine"]

    def stop(epoch, step, loss):
        if epoch == 0 and step == 4:  # (TINY: 4 steps per epoch) the end of epoch 1
            os.kill(os.getpid(), signal.SIGINT)

    first = T.train(_args(tmp_path, "--epochs", 3, *extra), on_step=stop)
    assert first["interrupted"]
    second = T.train(_args(tmp_path, "--epochs", 2, *extra, "--resume", first["checkpoint"]))
    assert not second.get("interrupted") and T.load_checkpoint(second["checkpoint"])["schedule_epochs"] == 3


def test_a_keyboard_interrupt_during_the_epochs_checkpoint_saves_the_next_epochs_start(tmp_path, monkeypatch):
    """A raw KeyboardInterrupt (a second Ctrl-C) while the epoch-end checkpoint is written: the epoch is
    trained, evaluated and logged, so the checkpoint is of epoch 2's start. Before, it was saved as epoch 1's
    last step with epoch 1's row in its history, and --resume evaluated and logged epoch 1 again."""
    save = T.save_checkpoint
    calls = {"n": 0}

    def interrupted_once(path, state):
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt
        return save(path, state)

    monkeypatch.setattr(T, "save_checkpoint", interrupted_once)
    first = T.train(_args(tmp_path, "--epochs", 2))
    assert first["interrupted"] and calls["n"] == 2
    state = T.load_checkpoint(first["checkpoint"])
    assert (state["epoch"], state["step"]) == (1, 0) and [r["epoch"] for r in state["history"]] == [1]
    monkeypatch.setattr(T, "save_checkpoint", save)
    resumed = T.train(_args(tmp_path, "--epochs", 2, "--resume", first["checkpoint"]))
    assert [r["epoch"] for r in resumed["history"]] == [1, 2]
    assert [line.split(",")[0] for line in (tmp_path / "metrics.csv").read_text().splitlines()[1:]] == ["1", "2"]


def test_a_stop_asked_during_the_evaluation_stops_at_the_epochs_end(tmp_path, monkeypatch):
    """Ctrl-C while an epoch's evaluation runs: the run stops there, with a checkpoint of the next epoch's
    start. Before, it started the next epoch (a new loader) and stopped after its first step."""
    evaluate = T.evaluate

    def evaluate_and_ask(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(T, "evaluate", evaluate_and_ask)
    first = T.train(_args(tmp_path, "--epochs", 3, "--save-every", 2))
    assert first["interrupted"] and len(first["step_losses"]) == 4  # (TINY: 4 steps per epoch)
    state = T.load_checkpoint(first["checkpoint"])
    assert (state["epoch"], state["step"]) == (1, 0) and [r["epoch"] for r in state["history"]] == [1]


def test_test_loss_is_the_training_criterion(tmp_path):
    """With --label-smoothing, test_loss is smoothed as train_loss is (torchvision's reference scripts
    evaluate with their training criterion); before, it was plain cross-entropy beside a smoothed train_loss."""
    from effdense.data import Subset

    run = T.train(_args(tmp_path, "--label-smoothing", 0.6))
    test = Subset(load_digits(12).test, 64)  # (TINY's --image-size and --test-subset)
    model = run["model"].eval()
    with torch.no_grad():
        x = torch.stack([test[i][0] for i in range(len(test))])
        y = torch.tensor([test[i][1] for i in range(len(test))])
        logits = model(x)
    smoothed = T.F.cross_entropy(logits, y, label_smoothing=0.6).item()
    assert abs(T.F.cross_entropy(logits, y).item() - smoothed) > 1e-3  # (the case tells them apart)
    assert run["history"][-1]["test_loss"] == pytest.approx(smoothed, rel=1e-5)


def test_keyboard_interrupt_inside_a_step_saves_no_checkpoint(tmp_path, monkeypatch):
    """A raw KeyboardInterrupt in a step's forward (a second Ctrl-C, which the handler calls "stop at once,
    without a checkpoint"): a checkpoint was saved anyway, holding that step's BatchNorm updates and dropout
    draws under the previous step's count, and resuming from it gave another run (num_batches_tracked one
    ahead, losses off by 2e-2). Mid-step there is no step boundary to save: the last checkpoint stands."""
    calls = {"n": 0}
    loss_fn = T.F.cross_entropy

    def cross_entropy(logits, *args, **kwargs):  # (inside the step: after its forward, before its backward)
        calls["n"] += logits.requires_grad  # (training steps only, not the evaluations)
        if logits.requires_grad and calls["n"] == 7:  # epoch 2, step 3 (TINY: 4 steps per epoch)
            raise KeyboardInterrupt
        return loss_fn(logits, *args, **kwargs)

    monkeypatch.setattr(T.F, "cross_entropy", cross_entropy)
    first = T.train(_args(tmp_path, "--epochs", 2, "--drop-rate", "0.2"))
    assert first["interrupted"] and first["checkpoint"] == str(tmp_path / "checkpoint.pt")  # epoch 1's
    state = T.load_checkpoint(first["checkpoint"])
    assert (state["epoch"], state["step"]) == (1, 0)
    monkeypatch.setattr(T.F, "cross_entropy", loss_fn)
    resumed = T.train(_args(tmp_path, "--epochs", 2, "--drop-rate", "0.2", "--resume", first["checkpoint"]))
    straight = T.train(_args(tmp_path / "ref", "--epochs", 2, "--drop-rate", "0.2"))
    _assert_same_state(_state(resumed["model"]), _state(straight["model"]))


def test_resume_with_another_number_of_processes_rescales_the_schedule(tmp_path):
    # an end-of-epoch checkpoint of a 2-process run resumed in 1 process: its schedule counted 2 steps per epoch
    # where this run takes 4, so continued as saved the cosine lr reached 0 at epoch 3 and rose again in epoch 4
    extra = ["--epochs", 4, "--optimizer", "sgd", "--lr-schedule", "cosine", "--warmup-epochs", 1]
    saved = tmp_path / "epoch2.pt"

    def keep(epoch, step, loss):
        if (epoch, step) == (2, 1):
            shutil.copy(tmp_path / "a" / "checkpoint.pt", saved)

    straight = T.train(_args(tmp_path / "a", *extra), on_step=keep)
    state = torch.load(saved, weights_only=False)
    assert state["epoch"] == 2 and state["world_size"] == 1
    # what a 2-process run (global batch 64: 2 steps per epoch) would have saved at the end of epoch 2
    args = T._with_defaults(_args(tmp_path / "b", *extra))
    optimizer = T._build_optimizer(args, T.build_model(args, 10, 1))
    scheduler = T._build_scheduler(args, optimizer, 2)
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    state["world_size"], state["scheduler"] = 2, scheduler.state_dict()
    for group, lr in zip(state["optimizer"]["param_groups"], scheduler.get_last_lr()):
        group["lr"] = lr
    torch.save(state, saved)
    resumed = T.train(_args(tmp_path / "b", *extra, "--resume", saved))
    lrs = [r["lr"] for r in resumed["history"][-2:]]
    torch.testing.assert_close(lrs, [r["lr"] for r in straight["history"][-2:]])
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)


def test_a_checkpoint_of_another_process_count_says_where_in_the_epoch_it_was_saved(tmp_path, capsys):
    """A checkpoint a 2-process run saved when interrupted after its epoch's last step (before the evaluation)
    is not mid-epoch in the sense a user reads it: the message says where it stands."""
    T.train(_args(tmp_path / "a", "--epochs", 1))
    state = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)
    state.update(world_size=2, epoch=0, history=[])  # 128 images, batch 32: 2 steps per epoch in each of 2 processes
    for step, needle in ((2, "saved after the last training step of epoch 1, before its evaluation by 2"), (1, "saved mid-epoch by 2")):
        state["step"] = step
        torch.save(state, tmp_path / "two.pt")
        code, err = _run_main(capsys, [*TINY, "--out-dir", str(tmp_path / "b"), "--epochs", "1", "--resume", str(tmp_path / "two.pt")])
        assert code == 2 and needle in err and "resume it with 2 (this run has 1)" in err, err


@pytest.mark.parametrize("momentum", [None, 0.3])
def test_cpu_sync_batchnorm_without_a_counter_is_nn_batchnorms(momentum):
    """Running statistics and no num_batches_tracked (None): nothing counted, and with momentum=None a blend
    of factor 0, as nn.BatchNorm2d (before: a TypeError adding 1 to None)."""
    torch.manual_seed(0)
    ref, ours = nn.BatchNorm2d(3, momentum=momentum), T.CPUSyncBatchNorm(3, momentum=momentum)
    for bn in (ref, ours):
        bn.register_buffer("num_batches_tracked", None)
    x = torch.randn(4, 3, 2, 2) * 2 + 1
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=0)
    torch.testing.assert_close(ours.running_mean, ref.running_mean, rtol=0, atol=0)
    torch.testing.assert_close(ours.running_var, ref.running_var, rtol=0, atol=0)


def test_sync_bn_counts_every_process_in_the_batch_norm_batch():
    # --batch-size 1 --sync-bn under torchrun was refused for 1x1 maps of "one image", while each BatchNorm
    # sees one image per process: 2 values over 2 processes, which trains (the strategies handle it)
    args = T._with_defaults(T.parse_args(["--depth", "10", "--growth-rate", "4", "--batch-size", "1", "--sync-bn"]))
    model = T.build_model(args, 10, 1)
    size = next(s for s in range(1, 64) if model._final_spatial(s) == 1 and model._final_spatial(s, 1) == 1)
    two = T._Dist(rank=0, world_size=2)
    assert T._batch_norm_problem(model, size, args, two) is None
    assert "one image" in T._batch_norm_problem(model, size, args, T._Dist())  # one process: refused as before
    plain = argparse.Namespace(**{**vars(args), "sync_bn": False})
    assert "--batch-size 1" in T._batch_norm_problem(model, size, plain, two)  # each process alone


def test_a_failed_evaluation_keeps_the_epochs_training(tmp_path, monkeypatch):
    # an error while evaluating (an unreadable test image, memory) came after the epoch's training and
    # before its checkpoint: the epoch was lost. Now it is saved as trained, and --resume goes on from there.
    real = T.evaluate
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("cannot read test image 7")
        return real(*args, **kwargs)

    monkeypatch.setattr(T, "evaluate", failing)
    extra = ["--epochs", 3, "--save-every", 3]  # no checkpoint was due after epoch 2
    with pytest.raises(RuntimeError, match="test image 7") as info:
        T.train(_args(tmp_path, *extra))
    assert "evaluation after epoch 2 failed; the epoch's training is saved to" in info.value.__notes__[0]
    state = T.load_checkpoint(str(tmp_path / "checkpoint.pt"))
    assert (state["epoch"], state["step"]) == (2, 0) and [r["epoch"] for r in state["history"]] == [1]
    monkeypatch.setattr(T, "evaluate", real)
    resumed = T.train(_args(tmp_path, *extra, "--resume", tmp_path / "checkpoint.pt"))
    straight = T.train(_args(tmp_path / "ref", *extra))
    assert len(resumed["step_losses"]) == 4  # epoch 3 only
    _assert_same_state(_state(resumed["model"]), _state(straight["model"]))
    assert [r["epoch"] for r in resumed["history"]] == [1, 3]


@pytest.mark.parametrize(
    "extra",
    [
        ["--precision", "bf16", "--channels-last", "--optimizer", "adamw", "--lr-schedule", "step"],
        # GradScaler on; fp16 is slow on CPU. A constant schedule: a cosine one ends with the first run's epochs
        ["--precision", "fp16", "--warmup-epochs", "0.5", "--subset", "64", "--lr-schedule", "constant"],
    ],
    ids=["bf16-channels_last-adamw-step", "fp16-scaler-warmup"],
)
def test_mixed_precision_runs_and_resumes(tmp_path, extra):
    result = T.train(_args(tmp_path, "--epochs", 1, *extra))
    assert torch.isfinite(torch.tensor(result["step_losses"])).all()
    state = T.load_checkpoint(result["checkpoint"])
    assert bool(state["scaler"]) == ("fp16" in extra)  # the scaler's state travels with the checkpoint
    again = T.train(_args(tmp_path, "--epochs", 2, *extra, "--resume", result["checkpoint"]))
    assert len(again["history"]) == 2


def test_jsonl_metrics_and_imagefolder(tmp_path):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            os.makedirs(tmp_path / "imgs" / split / cls)
            for i in range(4):
                pixels = (torch.rand(20, 20, 3, generator=g) * 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(tmp_path / "imgs" / split / cls / f"{i}.png")
    metrics = tmp_path / "m.jsonl"
    result = T.train(T.parse_args([
        "--data", "imagefolder", "--data-dir", str(tmp_path / "imgs"), "--image-size", "16", "--depth", "10",
        "--growth-rate", "4", "--batch-size", "4", "--epochs", "1", "--strategy", "naive",
        "--out-dir", str(tmp_path), "--metrics", str(metrics), "--no-progress", "--quiet",
    ]))
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["epoch"] == 1 and isinstance(rows[0]["peak_mem_mib_per_rank"], list)
    assert result["model"].classifier.out_features == 2


def _image_folder(root, per_class: int = 8, size: int = 20, classes=("cat", "dog")) -> None:
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for cls in classes:
            os.makedirs(root / split / cls)
            for i in range(per_class):
                pixels = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(root / split / cls / f"{i}.png")


def test_imagefolder_leaves_out_hidden_folders_and_warns_of_deep_images(tmp_path, monkeypatch):
    """A hidden folder in train/ (Jupyter's .ipynb_checkpoints) was a class, and one inside a class folder
    (.AppleDouble, thumbnail caches) gave it images; a 16-bit image is clipped silently (as torchvision reads it)."""
    import pickle
    import warnings

    from PIL import Image

    from effdense.data import load_imagefolder

    _image_folder(tmp_path, per_class=2)
    for split in ("train", "val"):
        _image_folder_class(tmp_path / split / ".ipynb_checkpoints", 1)
        _image_folder_class(tmp_path / split / "cat" / ".AppleDouble", 1)
    Image.fromarray((torch.arange(400).reshape(20, 20) * 150).to(torch.int32).numpy().astype("uint16")).save(
        tmp_path / "train" / "dog" / "deep.png"
    )
    spec = load_imagefolder(tmp_path, image_size=8, augment=False)
    assert spec.classes == ("cat", "dog") and len(spec.train) == 5 and len(spec.test) == 4
    # DataLoader workers started by spawn or forkserver unpickle it in a fresh interpreter (before: the class's
    # module-level name was None there)
    (tmp_path / "train.pkl").write_bytes(pickle.dumps(spec.train))
    code = f"import pickle; print(len(pickle.loads(open({str(tmp_path / 'train.pkl')!r}, 'rb').read())))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "5"
    import effdense.data as D

    monkeypatch.setattr(D, "_warned_deep", False)  # (once per process)
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        for i in range(len(spec.train)):
            spec.train[i]
    assert sum("more than 8 bits per channel" in str(w.message) for w in warned) == 1
    # --no-augment: training images framed as test images (before: a crop of the whole short side)
    assert repr(spec.train.transform) == repr(spec.test.transform)


def _imagefolder_argv(root, out, *extra):
    return [
        "--data", "imagefolder", "--data-dir", str(root), "--image-size", "16", "--depth", "10", "--growth-rate", "4",
        "--batch-size", "4", "--epochs", "1", "--strategy", "naive", "--out-dir", str(out), "--no-progress", "--quiet",
        *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("split, workers", [("train", 0), ("train", 2), ("val", 0)])
def test_an_unreadable_image_is_named_in_one_line(tmp_path, capsys, split, workers):
    """Before: a 49-line traceback ending in PIL's UnidentifiedImageError (from the workers too), after the
    epoch's work for a bad test image. Hidden files (macOS's ._name.jpg) were read as images."""
    _image_folder(tmp_path / "imgs", per_class=4)
    (tmp_path / "imgs" / "train" / "cat" / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # skipped
    code, err = _run_main(capsys, _imagefolder_argv(tmp_path / "imgs", tmp_path / "ok"))
    assert code == 0, err
    bad = tmp_path / "imgs" / split / "dog" / "9.jpg"
    bad.write_bytes(b"not a jpeg at all")
    code, err = _run_main(capsys, _imagefolder_argv(tmp_path / "imgs", tmp_path / "bad", "--workers", str(workers)))
    assert code == 2 and "\n" not in err, err
    expected = (f"effdense train: error: imagefolder: cannot read image {str(bad)!r} (not an image file PIL can "
                "identify); remove or replace the file")
    if split == "val":  # found after the epoch's training, which is saved first: the same line says so
        ckpt = tmp_path / "bad" / "checkpoint.pt"
        expected += (f"; evaluation after epoch 1 failed; the epoch's training is saved to {ckpt} (no test metrics "
                     f"for it): continue with --resume {ckpt}")
    assert err == expected


def test_resume_on_other_data_is_refused(tmp_path, capsys):
    """The data's folder may move, but a resume over another number of training images is refused (from a
    probe: accepted, it ran 14 steps of a 6-step cosine schedule, the learning rate rising to its peak again)."""
    _image_folder(tmp_path / "a", per_class=4)
    _image_folder(tmp_path / "b", per_class=6)
    code, err = _run_main(capsys, _imagefolder_argv(tmp_path / "a", tmp_path / "out", "--epochs", "2", "--save-every", "1"))
    assert code == 0, err
    ckpt = tmp_path / "out" / "checkpoint.pt"
    shutil.copytree(tmp_path / "a", tmp_path / "moved")
    code, err = _run_main(capsys, _imagefolder_argv(tmp_path / "moved", tmp_path / "out", "--epochs", "2", "--resume", str(ckpt)))
    assert code == 0, err  # the same images elsewhere: the run resumes (here: it had finished)
    code, err = _run_main(capsys, _imagefolder_argv(tmp_path / "b", tmp_path / "out", "--epochs", "2", "--resume", str(ckpt)))
    assert code == 2 and "\n" not in err, err
    assert f"was saved by a run over 8 training images; this run has 12 (imagefolder in {tmp_path / 'b'})" in err, err
    # as many images of other classes (before: resumed, its labels meaning other classes)
    _image_folder(tmp_path / "c", per_class=4, classes=("cat", "fox"))
    code, err = _run_main(capsys, _imagefolder_argv(tmp_path / "c", tmp_path / "out", "--epochs", "2", "--resume", str(ckpt)))
    assert code == 2 and "\n" not in err, err
    assert (f"was saved by a run on other classes: 'dog' only there; 'fox' only here (imagefolder in {tmp_path / 'c'}): "
            "resume on the checkpoint's data") in err, err
    # --subset of a dataset that grew: as many images, other ones (before: resumed on them without a word)
    sub = _imagefolder_argv(tmp_path / "a", tmp_path / "sub", "--epochs", "2", "--subset", "6")
    assert _run_main(capsys, sub)[0] == 0
    argv = _imagefolder_argv(tmp_path / "b", tmp_path / "sub", "--epochs", "2", "--subset", "6",
                             "--resume", str(tmp_path / "sub" / "checkpoint.pt"))  # fmt: skip
    code, err = _run_main(capsys, argv)
    assert code == 2 and "with --subset over a dataset of 8 training images; this one has 12" in err, err


def test_a_failed_run_leaves_the_earlier_runs_log_with_its_checkpoint(tmp_path, capsys):
    """A new run in the same folder replaces the earlier run's log when it writes its first row or saves its
    first checkpoint; one that fails before either leaves both files of the earlier run (from a probe: its log
    was deleted at the start, its checkpoint kept)."""
    _image_folder(tmp_path / "imgs", per_class=4)
    code, err = _run_main(capsys, _imagefolder_argv(tmp_path / "imgs", tmp_path / "out"))
    assert code == 0, err
    log = (tmp_path / "out" / "metrics.csv").read_text()
    (tmp_path / "imgs" / "train" / "dog" / "9.png").write_bytes(b"not an image")
    code, err = _run_main(capsys, _imagefolder_argv(tmp_path / "imgs", tmp_path / "out"))
    assert code == 2 and "cannot read image" in err, err
    assert (tmp_path / "out" / "metrics.csv").read_text() == log


def test_a_run_interrupted_before_its_first_row_replaces_the_earlier_log(tmp_path):
    """The checkpoint a new run saves (here at a Ctrl-C in its first epoch) comes with that run's log (no rows
    yet: no file), not the earlier run's."""
    T.train(_args(tmp_path, "--epochs", 1))
    assert (tmp_path / "metrics.csv").exists()

    def ctrl_c(epoch, step, loss):
        if step == 1:
            raise KeyboardInterrupt

    result = T.train(_args(tmp_path, "--epochs", 1), on_step=ctrl_c)
    assert result["interrupted"] and result["checkpoint"] and not (tmp_path / "metrics.csv").exists()


def test_seed_out_of_numpys_range_is_an_argument_error(capsys):
    # before: a traceback from np.random.seed after the output folder was made
    for seed in ("-1", str(2**32)):
        with pytest.raises(SystemExit) as exc:
            T.parse_args(["--seed", seed])
        assert exc.value.code == 2
        assert f"argument --seed: expected an integer in [0, 2**32), got '{seed}'" in capsys.readouterr().err
    assert T.parse_args(["--seed", str(2**32 - 1)]).seed == 2**32 - 1


def test_resume_refuses_a_checkpoint_of_a_newer_format_and_names_a_folder(tmp_path):
    first = T.train(_args(tmp_path / "a", "--epochs", 1))
    state = torch.load(first["checkpoint"], weights_only=True)
    state["version"] = T.CHECKPOINT_VERSION + 1
    torch.save(state, tmp_path / "newer.pt")
    with pytest.raises(T.CheckpointError, match=f"has format version {T.CHECKPOINT_VERSION + 1}, which this effdense"):
        T.load_checkpoint(str(tmp_path / "newer.pt"))
    state["version"] = "1"
    torch.save(state, tmp_path / "odd.pt")
    with pytest.raises(T.CheckpointError, match=r"is not an effdense train checkpoint \(its format version is '1'\)"):
        T.load_checkpoint(str(tmp_path / "odd.pt"))
    with pytest.raises(T.CheckpointError, match="is a folder; give the checkpoint file"):
        T.load_checkpoint(str(tmp_path / "a"))


def test_an_empty_class_folder_is_named_with_its_split(tmp_path, capsys):
    _image_folder(tmp_path / "imgs", per_class=2)
    os.makedirs(tmp_path / "imgs" / "val" / "zebra")
    os.makedirs(tmp_path / "imgs" / "train" / "zebra")
    (tmp_path / "imgs" / "train" / "zebra" / "0.png").write_bytes(b"")  # (never read: val is refused first)
    code, err = _run_main(capsys, _imagefolder_argv(tmp_path / "imgs", tmp_path / "out"))
    assert code == 2 and err.endswith(
        f"imagefolder: {str(tmp_path / 'imgs' / 'val')!r}: Found no valid file for the classes zebra; add images to "
        "those folders, or remove those classes from both train/ and val/"  # (from val/ alone: the splits would differ)
    ), err


def test_class_folders_that_differ_are_named(tmp_path, capsys):
    # before: "differ (2 vs 2 classes)" for a misspelt folder
    _image_folder(tmp_path / "imgs", per_class=2)
    os.rename(tmp_path / "imgs" / "val" / "dog", tmp_path / "imgs" / "val" / "dgo")
    code, err = _run_main(capsys, _imagefolder_argv(tmp_path / "imgs", tmp_path / "out"))
    assert code == 2 and "train and test class folders differ (only in train: 'dog'; only in val: 'dgo')" in err, err


def test_one_class_trains_with_a_note_and_image_size_is_named(tmp_path, capsys):
    _image_folder(tmp_path / "imgs", per_class=4)
    for split in ("train", "val"):
        shutil.rmtree(tmp_path / "imgs" / split / "dog")
    argv = [a for a in _imagefolder_argv(tmp_path / "imgs", tmp_path / "out") if a != "--quiet"]
    code = T.main(T.parse_args(argv))
    out = capsys.readouterr().out
    assert code == 0 and "note: imagefolder has one class: every prediction is right" in out and "1 class |" in out, out
    code, err = _run_main(capsys, _imagefolder_argv(tmp_path / "imgs", tmp_path / "out", "--image-size", "0"))
    assert code == 2 and err.endswith("--image-size must be a positive integer, got 0"), err


def test_a_subset_is_spread_over_a_dataset_stored_by_class():
    """--subset N of an ImageFolder (sorted by class): before, the first N images, all of the first classes."""
    from effdense.data import Subset

    labels = torch.arange(3).repeat_interleave(12)  # 3 classes x 12 images, in class order
    data = torch.utils.data.TensorDataset(torch.zeros(36, 1), labels)
    sub = Subset(data, 12)
    picked = [int(sub[i][1]) for i in range(len(sub))]
    assert len(picked) == 12 and set(picked) == {0, 1, 2} and picked == sorted(picked)  # in the dataset's order
    assert picked == [int(Subset(data, 12)[i][1]) for i in range(12)]  # the same choice every time
    assert len(Subset(data, 100)) == 36 and int(Subset(data, 100)[35][1]) == 2
    with pytest.raises(IndexError):
        sub[12]


def test_an_output_folder_where_no_file_can_be_made_is_refused_before_training(tmp_path, capsys, monkeypatch):
    """As root, os.access calls /proc writable: a --metrics or --checkpoint there failed after the epoch."""
    monkeypatch.setattr(T.os, "access", lambda path, mode: True)  # as for root
    for option in ("--metrics", "--checkpoint"):
        code, err = _run_main(capsys, [*TINY, "--out-dir", str(tmp_path / "o"), option, "/proc/effdense_probe.csv"])
        assert code == 2 and f"{option}: cannot write files in the folder '/proc'" in err, err


def test_a_checkpoint_of_another_class_count_says_so(tmp_path, capsys):
    _image_folder(tmp_path / "two", per_class=2)
    first = T.train(T.parse_args(_imagefolder_argv(tmp_path / "two", tmp_path / "a")))
    three = tmp_path / "three"
    _image_folder(three, per_class=2)
    for split in ("train", "val"):
        os.rename(three / split / "dog", three / split / "eel")
        _image_folder_class(three / split / "fox", 2)
    code, err = _run_main(capsys, _imagefolder_argv(three, tmp_path / "b", "--resume", first["checkpoint"]))
    assert code == 2 and "size mismatch for classifier.weight" in err, err
    assert err.endswith("the checkpoint's data had another number of classes") and "\n" not in err


def _image_folder_class(folder, n: int, size: int = 20) -> None:
    from PIL import Image

    os.makedirs(folder)
    for i in range(n):
        Image.fromarray((torch.rand(size, size, 3) * 255).to(torch.uint8).numpy()).save(folder / f"{i}.png")


def test_augmented_resume_is_exact_with_workers(tmp_path):
    """Random crops and flips depend on (seed, epoch, image) alone: a run interrupted mid-epoch and resumed with
    two DataLoader workers gives the uninterrupted run's losses and weights, and so does any --workers. Before,
    each worker's stream restarted at the resumed step (loss 0.18 off at the first resumed step, a probe found)."""
    _image_folder(tmp_path / "imgs")

    def args(out, workers, *extra):
        return T.parse_args([
            "--data", "imagefolder", "--data-dir", str(tmp_path / "imgs"), "--image-size", "16", "--depth", "10",
            "--growth-rate", "4", "--batch-size", "4", "--epochs", "2", "--strategy", "naive", "--drop-rate", "0",
            "--workers", str(workers), "--out-dir", str(tmp_path / out), "--no-progress", "--quiet", *extra,
        ])  # fmt: skip

    straight = T.train(args("a", 0))

    def ctrl_c(epoch, step, loss):
        if epoch == 0 and step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    first = T.train(args("b", 2), on_step=ctrl_c)
    assert first["interrupted"] and len(first["step_losses"]) == 2
    resumed = T.train(args("b", 2, "--resume", first["checkpoint"]))
    losses = first["step_losses"] + resumed["step_losses"]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(straight["step_losses"]), atol=1e-6, rtol=1e-5)
    _assert_same_state(_state(resumed["model"]), _state(straight["model"]))


def test_seeded_samples_draw_per_image_and_epoch(monkeypatch):
    from effdense.data import SeededSamples

    class Draw(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.rand(3)

    data = SeededSamples(Draw(), seed=7)
    reseeded = []  # torch.manual_seed would reseed every CUDA generator too, which fork_rng(devices=[]) leaves changed
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda s: reseeded.append(s))
    before = torch.random.get_rng_state()
    first = [data[i] for i in range(4)]
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's stream is left as it was
    assert all(torch.equal(a, data[i]) for i, a in enumerate(first))  # the same image draws the same
    assert not torch.equal(first[0], first[1])
    data.epoch = 1
    assert not torch.equal(first[0], data[0])  # another epoch, other draws
    assert not torch.equal(first[0], SeededSamples(Draw(), seed=8)[0])
    assert not reseeded


def _run_main(capsys, argv):
    code = T.main(T.parse_args(argv))
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--data", "cifar10", "--data-dir", "/nonexistent/cifar"], "does not exist"),
        (["--data", "cifar10"], "needs --data-dir"),
        (["--data", "cifar100", "--data-dir", "{tmp}"], "no 'cifar-100-python' folder in"),  # empty folder
        (["--data", "imagefolder", "--data-dir", "{tmp}"], "no 'train/' folder"),
        (["--model", "resnet50"], "unknown model 'resnet50'"),
        (["--depth", "11"], "is not a valid DenseNet-BC"),
        (["--model", "densenet121", "--growth-rate", "8"], "growth_rate"),
        (["--strategy", "turbo"], "unknown strategy 'turbo'"),
        (["--warmup-epochs", "1.5"], "--warmup-epochs 1.5 is longer than the run (--epochs 1)"),
        (["--resume", "/nonexistent/ckpt.pt"], "does not exist"),
        (["--resume", "{tmp}/garbage.pt"], "cannot read checkpoint"),
        (["--resume", "{tmp}/other.pt"], "not an effdense train checkpoint"),
        # before: a traceback from model.to (mps) or Tensor.item (meta)
        (["--device", "meta"], "--device meta holds no values"),
        pytest.param(["--device", "mps"], "--device mps cannot be used in this PyTorch",
                     marks=pytest.mark.skipif(torch.backends.mps.is_available(), reason="MPS is available here")),
    ],
)
def test_errors_are_one_line_with_exit_code_2(tmp_path, capsys, argv, needle):
    (tmp_path / "garbage.pt").write_bytes(b"\x00not a checkpoint" * 10)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    base = TINY[4:]  # without --depth/--growth-rate, which clash with --model
    code, err = _run_main(capsys, [*base, "--out-dir", str(tmp_path), "--epochs", "1", *argv])
    assert code == 2
    assert err.startswith("effdense train: error:") and "\n" not in err and needle in err, err


@pytest.mark.parametrize("env, needle", [
    ({"WORLD_SIZE": "2"}, "RANK, MASTER_ADDR, MASTER_PORT are not set: launch with torchrun"),
    ({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc' is not an integer"),
    ({"LOCAL_RANK": "x"}, "LOCAL_RANK='x' is not an integer"),
    ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "localhost", "MASTER_PORT": "p"}, "MASTER_PORT='p' is not an integer"),
])  # fmt: skip
def test_a_half_set_torchrun_environment_is_one_line(tmp_path, capsys, monkeypatch, env, needle):
    """Before: a traceback from int() or from inside init_process_group."""
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code, err = _run_main(capsys, [*TINY, "--out-dir", str(tmp_path), "--epochs", "1"])
    assert code == 2 and err.startswith("effdense train: error:") and "\n" not in err and needle in err, err


def test_a_run_that_fails_before_writing_removes_the_folders_it_created(tmp_path, capsys):
    """Before: a data error left the new --out-dir tree behind, empty. A folder that was there stays."""
    (tmp_path / "there").mkdir()
    out = tmp_path / "there" / "new" / "out"
    code, err = _run_main(capsys, [*TINY[4:], "--data", "imagefolder", "--data-dir", str(tmp_path / "missing"),
                                   "--out-dir", str(out), "--metrics", str(tmp_path / "logs" / "m.csv")])  # fmt: skip
    assert code == 2 and "does not exist" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["there"] and not any((tmp_path / "there").iterdir())
    code, err = _run_main(capsys, [*TINY, "--out-dir", str(out)])
    assert code == 0 and (out / "checkpoint.pt").is_file(), err


def test_only_the_empty_folders_a_run_created_are_removed(tmp_path):
    """Innermost first whatever the order the two outputs made them in (--checkpoint a/ck.pt, --metrics
    a/b/m.csv: a was left, b inside it at its turn); a folder with a file stays, and so does one made before."""
    (tmp_path / "before").mkdir()
    created: list[str] = []
    T._output_file(str(tmp_path / "a" / "ck.pt"), "--checkpoint", created)
    T._output_file(str(tmp_path / "a" / "b" / "m.csv"), "--metrics", created)
    T._output_file(str(tmp_path / "before" / "c" / "x.pt"), "--checkpoint", created)
    T._output_file(str(tmp_path / "kept" / "d" / "x.pt"), "--checkpoint", created)
    (tmp_path / "kept" / "d" / "x.pt").write_bytes(b"written")
    assert sorted(os.path.relpath(f, tmp_path) for f in created) == ["a", "a/b", "before/c", "kept", "kept/d"]
    T._remove_empty_folders(created)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["before", "kept"] and not any((tmp_path / "before").iterdir())
    assert (tmp_path / "kept" / "d" / "x.pt").is_file()
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(T.TrainError, match=r"--metrics: '.*file', the folder for '.*file/m.csv', is a file"):
        T._output_file(str(tmp_path / "file" / "m.csv"), "--metrics", [])


def test_out_of_memory_is_one_line_with_a_hint(tmp_path, capsys, monkeypatch):
    # before: a traceback ending in the CPU allocator's "can't allocate memory" (7 PB for the digits at 10^6 px)
    base = TINY[4:]
    code, err = _run_main(capsys, [*base, "--out-dir", str(tmp_path), "--epochs", "1", "--image-size", "1000000"])
    assert code == 1 and err.startswith("effdense train: error: out of memory (") and "\n" not in err, err
    assert "--batch-size" in err and "can't allocate memory" in err

    def cuda_oom(args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB\nmore lines")

    monkeypatch.setattr(T, "train", cuda_oom)
    code, err = _run_main(capsys, [*TINY, "--out-dir", str(tmp_path)])
    assert code == 1 and "out of memory (CUDA out of memory. Tried to allocate 20.00 GiB)" in err and "\n" not in err, err

    def other(args):
        raise RuntimeError("some other failure")

    monkeypatch.setattr(T, "train", other)  # not an allocation failure: raised as it is
    with pytest.raises(RuntimeError, match="some other failure"):
        T.main(T.parse_args([*TINY, "--out-dir", str(tmp_path)]))


def test_checkpoint_of_another_model_is_refused(tmp_path, capsys):
    first = T.train(_args(tmp_path, "--epochs", 1))
    code, err = _run_main(capsys, [*TINY, "--out-dir", str(tmp_path), "--epochs", "2", "--growth-rate", "6",
                                   "--resume", first["checkpoint"]])
    assert code == 2 and "holds another model" in err and "--growth-rate 4 (this run: 6)" in err and "\n" not in err, err


def test_python_dash_m_entry_point(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "effdense.train", "--model", "nope", "--out-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().startswith("effdense train: error: unknown model 'nope'")


class NotACheckpoint:
    """A Python object in a file: what torch.load(weights_only=True) refuses with a page of advice."""


@pytest.mark.parametrize("kind", ["garbage", "text", "python-object", "plain-pickle", "empty"])
def test_resume_from_a_file_that_is_not_a_checkpoint_is_one_short_line(tmp_path, capsys, kind):
    # before: the first line of torch's weights_only message, 170-300 characters of advice (with terminal
    # colour codes), and for a plain pickle a UserWarning about its protocol as well
    import pickle
    import warnings

    path = tmp_path / f"{kind}.pt"
    if kind == "garbage":
        path.write_bytes(b"\x00not a checkpoint" * 10)
    elif kind == "text":  # (from a probe: "(KeyError: 101)")
        path.write_text("hello world\n")
    elif kind == "python-object":
        torch.save({"model": NotACheckpoint()}, path)
    elif kind == "plain-pickle":
        path.write_bytes(pickle.dumps({"model": 1}, protocol=4))
    else:
        path.write_bytes(b"")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, err = _run_main(capsys, [*TINY, "--out-dir", str(tmp_path / "run"), "--epochs", "1", "--resume", str(path)])
    assert code == 2 and "\n" not in err, err
    assert err.startswith(f"effdense train: error: cannot read checkpoint {str(path)!r}: it is not an effdense train checkpoint (")
    reason = err.split("checkpoint (", 1)[1]
    assert len(reason) <= 100 and "\x1b" not in err and "weights_only" not in err, err
    expected = {"garbage": "it is not a file written by torch.save", "text": "it is not a file written by torch.save",
                "python-object": "NotACheckpoint",
                "plain-pickle": "UnpicklingError", "empty": "the file is empty"}[kind]  # fmt: skip
    assert expected in reason, err
    assert not [w for w in caught if "pickle protocol" in str(w.message)]


def test_options_that_act_only_in_some_runs_keep_their_defaults(tmp_path):
    """--momentum, --lr-milestones, --lr-gamma and --log-interval parse as None (so that giving one where it
    does nothing is an error); the run, and its checkpoint's config, still use the defaults, and where they
    act, the given values are taken."""
    args = _args(tmp_path / "a", "--epochs", 1)
    assert (args.momentum, args.lr_milestones, args.lr_gamma, args.log_interval) == (None, None, None, None)
    result = T.train(args)
    assert args.momentum is None  # the caller's namespace is left as it was
    config = T.load_checkpoint(result["checkpoint"])["config"]
    assert {k: config[k] for k in T.DEFAULTS} == T.DEFAULTS
    result = T.train(_args(tmp_path / "b", "--epochs", 1, "--momentum", 0.5, "--lr-schedule", "step",
                           "--lr-milestones", "0.5", "--lr-gamma", 0.5))  # fmt: skip
    config = T.load_checkpoint(result["checkpoint"])["config"]
    assert (config["momentum"], config["lr_milestones"], config["lr_gamma"]) == (0.5, "0.5", 0.5)
    state = T.load_checkpoint(result["checkpoint"])
    assert state["optimizer"]["param_groups"][0]["momentum"] == 0.5


def test_cifar_folder_problems_name_the_file_and_never_suggest_a_download(tmp_path, capsys):
    # before: every case was "no valid 'cifar-10-batches-py' folder in ... (Dataset not found or corrupted. You
    # can use download=True to download it)": no file named, and advice for an option effdense train lacks
    from torchvision.datasets import CIFAR10

    folder = tmp_path / "data" / CIFAR10.base_folder
    folder.mkdir(parents=True)
    for name, _ in [*CIFAR10.train_list, *CIFAR10.test_list]:
        (folder / name).write_bytes(b"\x80not a pickle")  # a truncated download
    cases = [
        (tmp_path / "data", f"{str(folder / 'data_batch_1')!r} is corrupted (its MD5 checksum is wrong)"),
        (folder, f"is the 'cifar-10-batches-py' folder itself; give the folder that holds it: --data-dir {tmp_path / 'data'}"),
    ]
    base = TINY[4:]
    for data_dir, needle in cases:
        code, err = _run_main(capsys, [*base, "--out-dir", str(tmp_path / "run"), "--epochs", "1",
                                       "--data", "cifar10", "--data-dir", str(data_dir)])
        assert code == 2 and "\n" not in err and needle in err and "download" not in err, err
    (folder / "data_batch_1").unlink()
    code, err = _run_main(capsys, [*base, "--out-dir", str(tmp_path / "run"), "--epochs", "1",
                                   "--data", "cifar10", "--data-dir", str(tmp_path / "data")])
    assert code == 2 and f"{str(folder / 'data_batch_1')!r} is missing" in err, err


def test_resume_refuses_options_that_change_the_run(tmp_path, capsys):
    # before: all accepted; the checkpoint's optimiser state silently replaced --lr, a new --seed or --batch-size
    # reshuffled the rest of the run, and --epochs past a cosine schedule's end made the lr rise again (lr 0.1
    # in epoch 4 of a 2-epoch run extended to 4)
    first = T.train(_args(tmp_path / "a", "--epochs", 2))
    ckpt = first["checkpoint"]
    for extra, needle in [
        (["--lr", "0.05"], "--lr 0.1 (this run: 0.05)"),
        (["--seed", "1", "--batch-size", "16"], "--batch-size 32 (this run: 16), --seed 0 (this run: 1)"),
        (["--optimizer", "adamw"], "--optimizer sgd (this run: adamw), --lr 0.1 (this run: 0.001)"),
        (["--epochs", "3"], "cosine learning-rate schedule ends at epoch 2"),
        # before: ended at once with exit 0, reporting the checkpoint's old figures as this run's
        (["--epochs", "1"], "has trained 2 epoch(s), and this run asks for --epochs 1"),
        # before: PyTorch's first line only ("Error(s) in loading state_dict for DenseNet:")
        (["--depth", "16"], "holds another model: it was saved by a run with --depth 10 (this run: 16)"),
    ]:
        argv = [*TINY, "--out-dir", str(tmp_path / "b"), "--epochs", "2", *extra, "--resume", ckpt]
        code, err = _run_main(capsys, argv)
        assert code == 2 and "\n" not in err and needle in err, (extra, err)
    # defaults given explicitly are the same options
    code, err = _run_main(capsys, [*TINY, "--out-dir", str(tmp_path / "b"), "--epochs", "2", "--lr", "0.1",
                                   "--image-size", "12", "--resume", ckpt])
    assert code == 0, err
    # resuming the finished run: a note, not "resumed from ...: epoch 3, step 0" of a 2-epoch run
    code = T.main(T.parse_args([a for a in TINY if a != "--quiet"] + ["--out-dir", str(tmp_path / "b"), "--epochs", "2",
                                                                       "--resume", ckpt]))
    out = capsys.readouterr().out
    assert code == 0 and "has finished its 2 epochs; nothing is left to train" in out and "resumed from" not in out, out
    # an option left to its default equals its default given
    default = vars(T._with_defaults(T.parse_args([])))
    T.check_resume_options("c.pt", default, T._with_defaults(T.parse_args(["--image-size", "16", "--lr", "0.1"])))
    with pytest.raises(T.CheckpointError, match=r"--image-size 16 \(this run: 12\)"):
        T.check_resume_options("c.pt", default, T._with_defaults(T.parse_args(["--image-size", "12"])))


def test_resume_with_another_strategy_is_allowed_and_exact(tmp_path):
    # the strategies compute the same function: switching one on resume (say, to fit memory) is not refused
    def ctrl_c(epoch, step, loss):
        if epoch == 0 and step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    first = T.train(_args(tmp_path / "b", "--epochs", 2), on_step=ctrl_c)
    assert first["interrupted"]
    resumed = T.train(_args(tmp_path / "b", "--epochs", 2, "--strategy", "shared", "--resume", first["checkpoint"]))
    straight = T.train(_args(tmp_path / "a", "--epochs", 2))
    _assert_same_state(_state(resumed["model"]), _state(straight["model"]))


def test_metrics_log_after_resuming_from_an_older_checkpoint(tmp_path):
    # a run killed (OOM, preemption: no checkpoint at the end) in epoch 4 with --save-every 2 and resumed from
    # epoch 2's checkpoint; before, its metrics.csv had epochs 1, 2, 3, 3, 4
    def killed(epoch, step, loss):
        if epoch == 3 and step == 1:
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        T.train(_args(tmp_path, "--epochs", 4, "--save-every", 2), on_step=killed)
    with open(tmp_path / "metrics.csv") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [1, 2, 3]
    resumed = T.train(_args(tmp_path, "--epochs", 4, "--save-every", 2, "--resume", tmp_path / "checkpoint.pt"))
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    assert [float(r["train_loss"]) for r in rows] == pytest.approx([r["train_loss"] for r in resumed["history"]])
    # a resumed run logging elsewhere has the whole history too (before: only the epochs it ran)
    T.train(_args(tmp_path, "--epochs", 4, "--metrics", tmp_path / "other.jsonl", "--resume", tmp_path / "checkpoint.pt"))
    assert [json.loads(line)["epoch"] for line in (tmp_path / "other.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_python_dash_m_ctrl_c_outside_the_loop_is_one_line_130(tmp_path, monkeypatch, capsys):
    # before: a KeyboardInterrupt traceback (the effdense CLI already said "effdense train: interrupted", 130)
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(T, "build_datasets", interrupted)  # Ctrl-C while the data loads
    try:
        code = T.cli_main([*TINY, "--epochs", "1", "--out-dir", str(tmp_path)])
    except KeyboardInterrupt:  # would end the whole pytest session
        pytest.fail("KeyboardInterrupt escaped python -m effdense.train's cli_main")
    assert code == 130 and capsys.readouterr().err == "effdense train: interrupted\n"


def test_python_dash_m_into_a_closed_pipe_ends_quietly_with_141(tmp_path):
    # `python -m effdense.train ... | head -2`: before, a BrokenPipeError traceback and exit code 1
    proc = subprocess.Popen(
        [sys.executable, "-m", "effdense.train", *TINY[:-1], "--epochs", "1", "--threads", "1",
         "--out-dir", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    proc.stdout.close()  # the reader is gone before the first line
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141 and err == "", err


def test_resume_compares_milestones_as_numbers():
    # "0.5,0.75" and ".5, .75" are one schedule: before, --resume refused the second as a changed option
    from effdense.train import _effective_options, _with_defaults, parse_args

    def opts(*argv):
        return _effective_options(vars(_with_defaults(parse_args(["--lr-schedule", "step", *argv]))))

    assert opts() == opts("--lr-milestones", ".5, .75") != opts("--lr-milestones", "0.5,0.8")
    # a checkpoint saved when an empty item was still taken ("0.5,0.75,") resumes with the milestones it ran
    saved = {**vars(_with_defaults(parse_args(["--lr-schedule", "step"]))), "lr_milestones": "0.5,0.75,"}
    assert _effective_options(saved) == opts("--lr-milestones", "0.5,0.75")


def test_compile_with_autocast_precision_trains_the_shared_strategy(tmp_path):
    """``--compile --precision bf16``: before, the training loop entered autocast around the compiled model, and
    dynamo's retrace of the shared/fused autograd Function failed ("Global autocast(cpu)_enabled state changed
    while dynamo tracing"; the README's compile limit). Autocast now runs inside the compiled call."""
    argv = ["--depth", "10", "--growth-rate", "4", "--image-size", "12", "--subset", "32", "--test-subset", "16",
            "--batch-size", "16", "--strategy", "shared", "--precision", "bf16", "--compile", "--epochs", "1",
            "--out-dir", str(tmp_path), "--no-progress", "--quiet"]  # fmt: skip
    result = T.train(T.parse_args(argv))
    assert len(result["step_losses"]) == 2 and all(math.isfinite(v) for v in result["step_losses"])
    eager = T.train(T.parse_args([a for a in argv if a != "--compile"] + ["--out-dir", str(tmp_path / "eager")]))
    assert abs(result["step_losses"][0] - eager["step_losses"][0]) < 0.05  # the same first step, in bf16


@pytest.mark.parametrize("where", ["checkpoint", "jsonl"])
def test_a_full_disk_while_saving_is_one_line_and_exit_1(tmp_path, where):
    """train's checkpoint and .jsonl metrics writes when a write fails (here a file-size limit, EFBIG, as a full
    disk's ENOSPC): before, a traceback naming no file: OSError for the metrics row, and for the checkpoint
    torch.save's RuntimeError ("unexpected pos", from its C++ writer, given a path). Now one line naming the file
    and exit code 1, as bench's result files; the checkpoint's partial temporary file is removed."""
    target = tmp_path / "o" / ("ckpt.pt" if where == "checkpoint" else "m.jsonl")
    option = "--checkpoint" if where == "checkpoint" else "--metrics"
    argv = [*TINY, "--epochs", "1", "--out-dir", str(tmp_path / "o"), option, str(target)]
    # the limit after the imports; the metrics row (jsonl: ~300 bytes) fits 200 bytes only in the checkpoint case
    limit = 5_000 if where == "checkpoint" else 200
    code = (
        "import resource, signal, sys\n"
        "from effdense import train\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
        f"sys.exit(train.cli_main({argv!r}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    err = proc.stderr.strip()
    assert proc.returncode == 1 and "Traceback" not in err, err
    assert err.splitlines()[-1] == f"effdense train: error: cannot write {target}: File too large", err
    assert not list(target.parent.glob("*.tmp*")), list(target.parent.iterdir())


def test_a_subset_larger_than_the_dataset_says_it_takes_all(tmp_path, capsys):
    """Before: --subset 100000 of digits' 1,347 training images trained on 1,347, silently."""
    argv = [a for a in TINY if a != "--quiet"]
    i = argv.index("--subset")
    argv[i + 1] = "100000"
    code = T.main(T.parse_args([*argv, "--epochs", "1", "--out-dir", str(tmp_path)]))
    out = capsys.readouterr().out
    assert code == 0 and "note: --subset 100000 is more than the 1,347 images there: all of them are used" in out, out
    assert "--test-subset" not in out  # (64 of 450: a real subset)


def test_a_checkpoint_that_cannot_be_pickled_is_not_called_a_write_failure(tmp_path):
    """save_checkpoint called while another error is handled (train saves after a failed evaluation): the walk
    from torch.save's RuntimeError to the file's OSError stops at that error (an unpicklable state was
    reported as "cannot write ...: image file is truncated", the evaluation's error)."""

    class Unpicklable:
        def __reduce_ex__(self, protocol):
            raise RuntimeError("not picklable")

    target = tmp_path / "ck.pt"
    with pytest.raises(RuntimeError, match="not picklable"):
        try:
            raise OSError("image file is truncated")
        except OSError:
            T.save_checkpoint(str(target), {"x": torch.zeros(3), "bad": Unpicklable()})
    assert not target.exists() and not list(tmp_path.glob("*.tmp*"))


def test_no_full_batch_is_one_line(tmp_path, capsys):
    code, err = _run_main(capsys, [*TINY, "--out-dir", str(tmp_path), "--epochs", "1", "--subset", "16"])
    assert code == 2 and err.endswith("16 training images give no full batch of 32 per process (1 process); lower --batch-size"), err


def test_a_diverged_runs_jsonl_log_is_standard_json(tmp_path):
    # a NaN loss was written as a bare NaN, which strict JSON parsers (jq, JavaScript) refuse
    metrics = tmp_path / "m.jsonl"
    T.train(_args(tmp_path, "--epochs", 1, "--lr", "1e30", "--lr-schedule", "constant", "--metrics", metrics))
    (row,) = [json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}")) for line in metrics.read_text().splitlines()]
    assert row["train_loss"] is None and row["epoch"] == 1


def test_schedule_options_that_would_change_nothing_are_refused_or_applied(tmp_path, capsys):
    # a warm-up that rounds to no step was silently dropped; two milestones on one step decayed it once
    code, err = _run_main(capsys, [*TINY, "--out-dir", str(tmp_path / "w"), "--epochs", "1", "--warmup-epochs", "0.1"])
    assert code == 2 and "--warmup-epochs 0.1 rounds to no step (4 steps per epoch)" in err and "give at least 0.25" in err
    history = {}
    for milestones in ("0.5", "0.5,0.5", "0.5,0.52"):
        result = T.train(_args(tmp_path / milestones, "--epochs", 4, "--lr-schedule", "step", "--lr-milestones", milestones))
        history[milestones] = [row["lr"] for row in result["history"]]
    assert history["0.5"][-1] == pytest.approx(0.01)
    assert history["0.5,0.5"][-1] == history["0.5,0.52"][-1] == pytest.approx(0.001)  # gamma twice, as MultiStepLR


def test_no_augment_on_digits_does_not_stop_a_resume_and_tilde_is_the_home_folder(tmp_path, capsys, monkeypatch):
    # --no-augment changes nothing on digits (no augmentation), yet resume refused it as a changed option
    first = T.train(_args(tmp_path / "a", "--epochs", 1, "--lr-schedule", "constant"))
    code, err = _run_main(capsys, [*TINY, "--out-dir", str(tmp_path / "a"), "--epochs", "2", "--lr-schedule", "constant",
                                   "--no-augment", "--resume", first["checkpoint"]])
    assert code == 0, err
    # "~" the shell left alone (--out-dir=~/runs) made a folder named "~" under the working folder
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    result = T.train(T.parse_args([*TINY, "--epochs", "1", "--out-dir=~/runs"]))
    assert result["checkpoint"] == str(tmp_path / "home" / "runs" / "checkpoint.pt")
    assert not (tmp_path / "~").exists()


def test_imagefolder_with_val_and_test_says_which_it_evaluates_on(tmp_path):
    # val/ and test/ both present: val/ was evaluated on and test/ silently left unread
    from effdense.data import load_imagefolder

    _image_folder(tmp_path / "imgs", per_class=2)
    _image_folder_class(tmp_path / "imgs" / "test" / "cat", 1)
    _image_folder_class(tmp_path / "imgs" / "test" / "dog", 1)
    spec = load_imagefolder(tmp_path / "imgs", image_size=16)
    assert spec.notes == ("imagefolder: evaluating on val/; 'test/' is there too and is not used",)
    assert len(spec.test) == 4  # val's
    (tmp_path / "imgs" / "val").rename(tmp_path / "imgs" / "old")
    assert load_imagefolder(tmp_path / "imgs", image_size=16).notes == ()


def test_out_of_memory_is_one_line_without_the_allocators_prefix(capsys, monkeypatch):
    # the CPU allocator's message began "[enforce fail at alloc_cpu.cpp:127] err == 0. " (c10's check, not news)
    def fail(args):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 123 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(T, "train", fail)
    code, err = _run_main(capsys, [*TINY, "--epochs", "1"])
    assert code == 1 and "\n" not in err
    assert err.startswith("effdense train: error: out of memory (DefaultCPUAllocator: can't allocate memory: you tried")
