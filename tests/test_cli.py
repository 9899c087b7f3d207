"""The ``effdense`` command: each subcommand on tiny settings, and bad arguments (one line, exit code 2)."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import effdense
from effdense import cli


def run(capsys, *argv):
    """Run ``effdense argv`` in-process; returns (exit code, stdout, stderr)."""
    try:
        code = cli.main(list(argv))
    except SystemExit as exc:  # argparse errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def test_bench_tiny(capsys, tmp_path):
    # (--max-seconds-per-row 0: CPU's default 3 s cut a row's timed steps to 1 on a loaded machine)
    code, out, err = run(capsys, "bench", "--model", "densenet_bc_10", "--batch-size", "2", "--steps", "2",
                         "--strategies", "naive,checkpoint", "--device", "cpu", "--max-seconds-per-row", "0",
                         "--out", str(tmp_path))  # fmt: skip
    assert code == 0, err
    (json_path,) = tmp_path.glob("bench_densenet_bc_10_b2_32px_fp32_cpu_naive-checkpoint.json")
    payload = json.loads(json_path.read_text())
    rows = {r["row"]: r for r in payload["rows"]}
    assert set(rows) == {"effdense naive", "effdense checkpoint", "torchvision", "torchvision memory_efficient"}
    assert all(r["status"] == "ok" and r["timed_steps"] == 2 for r in rows.values())
    assert rows["effdense naive"]["mem_ratio"] == 1.0
    # torchvision computes the same function with the same weights: the same memory as ours
    assert rows["torchvision"]["peak_bytes"] == rows["effdense naive"]["peak_bytes"]
    assert payload["meta"]["git_commit"] and payload["meta"]["torch"]
    assert "[1/4] effdense naive" in err and "peak MiB" in out
    with open(json_path.with_suffix(".csv")) as f:
        assert len(list(csv.DictReader(f))) == 4


def test_bench_file_names_tell_runs_apart(capsys, tmp_path):
    """Runs that measure another way (estimate), or other rows (a strategy subset, other torchvision rows),
    write files of their own; before, every one of them overwrote the default run's files."""
    common = ("bench", "--model", "densenet_bc_10", "--batch-size", "2", "--memory", "estimate", "--device", "cpu",
              "--out", str(tmp_path))  # fmt: skip
    assert run(capsys, *common)[0] == 0
    assert run(capsys, *common, "--strategies", "fused,naive", "--no-reference")[0] == 0
    assert run(capsys, *common, "--strategies", "all", "--reference", "plain")[0] == 0
    assert run(capsys, *common, "--strategies", "naive,checkpoint,shared,fused", "--reference", "plain,memory_efficient")[0] == 0
    # the default rows in another order, and 'all' (on a CPU: the two uncompiled rows): the default run too.
    # Before, these were _fused-shared-checkpoint-naive, _ref-memory_efficient-plain and an error ("--reference
    # compile ... on a GPU only", compile being one of all's rows)
    assert run(capsys, *common, "--strategies", "fused,shared,checkpoint,naive", "--reference", "memory_efficient,plain")[0] == 0
    assert run(capsys, *common, "--reference", "all")[0] == 0
    stem = "bench_densenet_bc_10_b2_32px_fp32_cpu_estimate"
    assert {p.name for p in tmp_path.glob("*.json")} == {
        f"{stem}.json", f"{stem}_fused-naive_noref.json", f"{stem}_ref-plain.json"}  # (the last runs are the default)
    rows = lambda name: [r["row"] for r in json.loads((tmp_path / name).read_text())["rows"]]  # noqa: E731
    assert rows(f"{stem}_fused-naive_noref.json") == ["effdense fused", "effdense naive"]
    assert len(rows(f"{stem}.json")) == 6
    for path in tmp_path.glob("*.csv"):  # plain \n line ends (csv's default is \r\n)
        assert b"\r" not in path.read_bytes()


def test_bench_row_whose_timing_fails_keeps_its_measured_peak(capsys, tmp_path, monkeypatch):
    from effdense import bench

    def time_steps(*args, **kwargs):
        raise RuntimeError("simulated timing failure")

    monkeypatch.setattr(bench, "time_steps", time_steps)
    code, _, err = run(capsys, "bench", "--model", "densenet_bc_10", "--batch-size", "2", "--strategies", "naive",
                       "--no-reference", "--steps", "1", "--device", "cpu", "--out", str(tmp_path))  # fmt: skip
    assert code == 1, err
    (row,) = json.loads(next(tmp_path.glob("*.json")).read_text())["rows"]
    assert row["status"] == "error" and row["note"] == "timing: RuntimeError: simulated timing failure"
    assert row["peak_mib"] > 0 and row["memory_mode"] == "exact"


def test_bench_names_the_ratio_baseline(capsys, tmp_path):
    # before: without a naive row the ratios were against the first row, which only the JSON said
    code, out, err = run(capsys, "bench", "--model", "densenet_bc_10", "--batch-size", "2",
                         "--strategies", "shared,checkpoint", "--memory", "estimate", "--out", str(tmp_path))  # fmt: skip
    assert code == 0, err
    assert "x mem and x time: against effdense shared" in out
    with open(next(tmp_path.glob("*.csv"))) as f:
        assert {r["baseline_row"] for r in csv.DictReader(f)} == {"effdense shared"}


def test_bench_reports_unavailable_strategy_as_skipped(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(effdense.strategies, "available", lambda: ("naive",))
    code, _, err = run(capsys, "bench", "--model", "densenet_bc_10", "--batch-size", "2",
                       "--no-reference", "--strategies", "naive,fused", "--memory", "estimate", "--out", str(tmp_path))  # fmt: skip
    assert code == 0, err
    rows = json.loads(next(tmp_path.glob("*.json")).read_text())["rows"]
    assert [r["status"] for r in rows] == ["ok", "skipped"]


def test_ablate_tiny_and_resume(capsys, tmp_path):
    argv = ["ablate", "--strategies", "naive,checkpoint", "--depths", "10,16", "--batch-sizes", "2,4",
            "--estimate", "--no-progress", "--out", str(tmp_path)]  # fmt: skip
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    with open(tmp_path / "ablate.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and all(r["status"] == "ok" for r in rows)
    assert {p.name for p in tmp_path.glob("*.png")} == {"ablate_depth.png", "ablate_batch.png"}
    code, out, err = run(capsys, *argv)  # resumed: nothing left to run
    assert code == 0 and "8 already in" in err and "0 to run" in err
    assert "nothing run" in out and "wrote " + str(tmp_path / "ablate.csv") not in out
    with open(tmp_path / "ablate.csv") as f:
        assert len(list(csv.DictReader(f))) == 8


def test_ablate_says_why_the_time_plot_is_not_drawn(capsys, tmp_path):
    # before: --time without naive in the grid drew no time plot and said nothing, and an earlier run's stayed
    (tmp_path / "ablate_time.png").write_bytes(b"an earlier run's plot")
    code, out, err = run(capsys, "ablate", "--strategies", "checkpoint", "--depths", "10,16", "--batch-sizes", "2",
                         "--estimate", "--time", "--steps", "1", "--warmup", "0", "--no-progress", "--out", str(tmp_path))
    assert code == 0, err
    assert ("ablate_time.png not drawn: it needs naive in the grid (times are relative to naive's) and two or more "
            "depths timed (the file there is from an earlier run)") in out


def test_ablate_refuses_a_csv_with_other_columns(capsys, tmp_path):
    # before: rows were appended under a foreign header (and under an older version's, ragged), silently
    argv = ["ablate", "--strategies", "naive", "--depths", "10,16", "--batch-sizes", "2", "--estimate", "--no-progress",
            "--out", str(tmp_path)]  # fmt: skip
    (tmp_path / "ablate.csv").write_text("foo,bar\n1,2\n")
    code, out, err = run(capsys, *argv)
    assert code == 2 and "has other columns than this version of ablate writes (missing " in err, err
    assert (tmp_path / "ablate.csv").read_text() == "foo,bar\n1,2\n"


def test_ablate_appends_after_a_last_line_without_a_line_end(capsys, tmp_path):
    # before: the new row was glued onto the last one (an editor that drops the final newline, or a row cut
    # short by a kill): exit 0, "wrote ablate.csv", the new point lost and the old row corrupted
    base = ["ablate", "--strategies", "naive", "--batch-sizes", "2", "--estimate", "--no-progress", "--no-plots",
            "--out", str(tmp_path)]  # fmt: skip
    code, _, err = run(capsys, *base, "--depths", "10")
    assert code == 0, err
    path = tmp_path / "ablate.csv"
    path.write_bytes(path.read_bytes().rstrip(b"\n"))
    code, _, err = run(capsys, *base, "--depths", "16")
    assert code == 0, err
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["depth"], r["status"], r[None] if None in r else "") for r in rows] == [("10", "ok", ""), ("16", "ok", "")]


def test_ablate_appends_after_a_row_cut_inside_a_quoted_field(capsys, tmp_path):
    # from a probe: a row cut inside a quoted field (device_name, always; the command line, with a list) kept the
    # quote open, and the next run's row was read as part of that field: lost, and measured again by every run
    base = ["ablate", "--strategies", "naive", "--batch-sizes", "2", "--estimate", "--no-progress", "--no-plots",
            "--out", str(tmp_path)]  # fmt: skip
    code, _, err = run(capsys, *base, "--depths", "10,16")
    assert code == 0, err
    path = tmp_path / "ablate.csv"
    text = path.read_bytes()
    path.write_bytes(text[: text.rindex(b'"CPU') + 4])  # inside the last row's "CPU (...)" device name
    code, _, err = run(capsys, *base, "--depths", "22")
    assert code == 0, err
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["depth"], r["status"], r["device_name"]) for r in rows] == [
        ("10", "ok", rows[0]["device_name"]), ("16", "ok", "CPU"), ("22", "ok", rows[0]["device_name"])]  # fmt: skip


def test_ablate_refuses_a_csv_that_is_not_text(capsys, tmp_path):
    # before: a UnicodeDecodeError traceback, exit 1
    (tmp_path / "ablate.csv").write_bytes(b"\xff\xfe strategy,policy\n")
    code, _, err = run(capsys, "ablate", "--strategies", "naive", "--depths", "10", "--batch-sizes", "2", "--estimate",
                       "--no-progress", "--no-plots", "--out", str(tmp_path))  # fmt: skip
    assert code == 2 and "ablate.csv is not a CSV file that ablate writes (not text:" in err, err
    assert "Traceback" not in err


def test_a_result_file_that_cannot_be_written_is_one_line_and_exit_1(capsys, tmp_path, monkeypatch):
    # a full disk mid-run: before, a traceback ending in "OSError: [Errno 28] No space left on device", which
    # names no file (what was written before stays whole: the files are replaced at once)
    import errno
    import pathlib

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pathlib.Path, "write_text", full)
    code, _, err = run(capsys, "summary", "densenet_bc_16", "--batch-size", "2", "--image-size", "8", "--out", str(tmp_path))
    assert code == 1 and "Traceback" not in err, err
    assert f"effdense summary: error: cannot write {tmp_path}" in err and "No space left on device" in err, err
    assert not list(tmp_path.glob(".*.tmp"))  # the temporary file is removed


def test_ablate_plot_draws_each_series_in_its_own_style(capsys, tmp_path, monkeypatch):
    # before: every series took matplotlib's default colour cycle with one marker, so with --vary all the
    # 18 series had 10 looks (naive and fused drawn alike) and the legend covered the lines
    import matplotlib.axes

    from effdense import ablate

    code, _, err = run(capsys, "ablate", "--strategies", "naive", "--depths", "10,16", "--batch-sizes", "2",
                       "--estimate", "--no-progress", "--no-plots", "--out", str(tmp_path))  # fmt: skip
    assert code == 0, err
    with open(tmp_path / "ablate.csv") as f:
        rows = list(csv.DictReader(f))
    with open(tmp_path / "ablate.csv", "w", newline="") as f:  # 18 series: the same points under 18 policies
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for i in range(18):
            writer.writerows({**r, "policy": f"p{i}"} for r in rows)
    styles = []
    original = matplotlib.axes.Axes.plot

    def spy(self, *args, **kwargs):
        styles.append((kwargs.get("color"), kwargs.get("marker"), kwargs.get("linestyle")))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", spy)
    written = ablate.plot(tmp_path / "ablate.csv", tmp_path)
    assert [p.name for p in written] == ["ablate_depth.png"]  # (one batch size: no batch plot)
    depth_styles = styles[:18]
    assert len(set(depth_styles)) == 18 and len({(c, m) for c, m, _ in depth_styles}) == 18, depth_styles


def test_ablate_timed_writes_time_plot(capsys, tmp_path):
    code, out, err = run(capsys, "ablate", "--strategies", "naive,checkpoint", "--depths", "10,16", "--batch-sizes", "2",
                         "--time", "--steps", "1", "--warmup", "0", "--device", "cpu", "--no-progress", "--out", str(tmp_path))  # fmt: skip
    assert code == 0, err
    assert (tmp_path / "ablate_time.png").exists() and (tmp_path / "ablate_depth.png").exists()
    # one batch size: no batch plot (before: a "line" of one point per series), and a line that says so
    assert not (tmp_path / "ablate_batch.png").exists()
    assert "ablate_batch.png not drawn: its x axis needs two or more batch sizes" in out


def test_ablate_resumed_with_time_times_the_points_measured_without(capsys, tmp_path):
    # before: the untimed rows counted as done, so the timed rerun ran nothing and drew no time plot
    argv = ["ablate", "--strategies", "naive,checkpoint", "--depths", "10,16", "--batch-sizes", "2", "--image-size", "8",
            "--device", "cpu", "--no-progress", "--out", str(tmp_path)]  # fmt: skip
    assert run(capsys, *argv)[0] == 0
    code, _, err = run(capsys, *argv, "--time", "--steps", "1", "--warmup", "0")
    assert code == 0 and "4 to run" in err, err
    with open(tmp_path / "ablate.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and [bool(r["time_ms"]) for r in rows] == [False] * 4 + [True] * 4
    assert (tmp_path / "ablate_time.png").exists()
    code, _, err = run(capsys, *argv, "--time", "--steps", "1", "--warmup", "0", "--no-plots")
    assert code == 0 and "0 to run" in err, err


def test_ablate_resume_reruns_points_of_other_timing_code_or_torch(capsys, tmp_path, monkeypatch):
    # before: a row counted as done whatever --steps/--warmup timed it and whatever code or torch measured
    # it ("all 4 grid points already there; nothing run" after a change); the rows name neither steps nor command
    argv = ["ablate", "--strategies", "naive", "--depths", "10,16", "--batch-sizes", "2", "--image-size", "8",
            "--device", "cpu", "--no-progress", "--no-plots", "--out", str(tmp_path), "--time", "--warmup", "0"]  # fmt: skip
    monkeypatch.setenv("GIT_COMMIT", "aaaa")
    assert run(capsys, *argv, "--steps", "1")[0] == 0
    code, _, err = run(capsys, *argv, "--steps", "2")  # other --steps: timed again
    assert code == 0 and "2 to run" in err, err
    assert "0 to run" in run(capsys, *argv, "--steps", "2")[2]
    monkeypatch.setenv("GIT_COMMIT", "bbbb")  # other code: measured again
    code, _, err = run(capsys, *argv, "--steps", "2")
    assert code == 0 and "2 to run" in err, err
    with open(tmp_path / "ablate.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["steps"], r["warmup"], r["git_commit"]) for r in rows] == [
        ("1", "0", "aaaa"), ("1", "0", "aaaa"), ("2", "0", "aaaa"), ("2", "0", "aaaa"), ("2", "0", "bbbb"), ("2", "0", "bbbb")
    ]
    from effdense.benchutil import command_line

    assert all(r["command"] == command_line() != "" for r in rows)  # (in-process here: the test runner's command)


def test_threads_are_set_recorded_and_a_timed_point_of_other_threads_runs_again(capsys, tmp_path, monkeypatch):
    """bench/ablate --threads N (as train's): torch.set_num_threads, recorded in device_name. ablate took a point
    timed with other threads (or on another GPU model: device_type is only 'cuda') as done. (set_num_threads is
    patched: the test process keeps its threads.)"""
    monkeypatch.setattr(torch, "set_num_threads", lambda n: monkeypatch.setattr(torch, "get_num_threads", lambda: n))
    argv = ["ablate", "--strategies", "naive", "--depths", "10", "--batch-sizes", "2", "--image-size", "8",
            "--device", "cpu", "--no-progress", "--no-plots", "--out", str(tmp_path), "--time", "--steps", "1",
            "--warmup", "0"]  # fmt: skip
    assert run(capsys, *argv, "--threads", "1")[0] == 0
    code, _, err = run(capsys, *argv, "--threads", "1")
    assert code == 0 and "0 to run" in err and ", 1 threads)" in err, err
    code, _, err = run(capsys, *argv, "--threads", "3")
    assert code == 0 and "1 to run" in err, err
    with open(tmp_path / "ablate.csv") as f:
        assert [r["device_name"].split(", ")[-1] for r in csv.DictReader(f)] == ["1 threads)", "3 threads)"]
    code, _, err = run(capsys, "bench", "--model", "densenet_bc_10", "--batch-size", "2", "--image-size", "8", "--device",
                       "cpu", "--strategies", "naive", "--no-reference", "--steps", "1", "--threads", "2", "--out",
                       str(tmp_path))  # fmt: skip
    assert code == 0, err
    assert json.loads(next(tmp_path.glob("bench_*.json")).read_text())["rows"][0]["device_name"].endswith(", 2 threads)")
    assert "invalid positive_int value" not in run(capsys, "bench", "--threads", "0")[2]
    assert "--threads: expected a positive integer, got '0'" in run(capsys, "bench", "--threads", "0")[2]
    for command, untimed in (("bench", ("--memory", "estimate")), ("bench", ("--no-timing",)), ("ablate", ("--estimate",)),
                             ("ablate", ("--strategies", "naive"))):  # (nothing timed)  # fmt: skip
        code, _, err = run(capsys, command, *untimed, "--threads", "2", "--out", str(tmp_path))
        assert code == 2 and f"effdense {command}: error: --threads has no effect with" in err, err


def test_ablate_adds_the_new_columns_to_an_earlier_versions_csv(capsys, tmp_path):
    from effdense import ablate

    old = [c for c in ablate.CSV_COLUMNS if c not in ("steps", "warmup", "command")]
    row = dict.fromkeys(old, "")
    row.update(strategy="naive", policy="-", depth="40", status="ok", peak_mib="1.5")
    with open(tmp_path / "ablate.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=old, lineterminator="\n")
        writer.writeheader()
        writer.writerow(row)
    argv = ["ablate", "--strategies", "naive", "--depths", "10", "--batch-sizes", "2", "--estimate", "--no-progress",
            "--no-plots", "--out", str(tmp_path)]  # fmt: skip
    code, _, err = run(capsys, *argv)
    assert code == 0 and "added the columns steps, warmup, command (empty in its 1 earlier rows)" in err, err
    with open(tmp_path / "ablate.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(ablate.CSV_COLUMNS) and rows[0]["peak_mib"] == "1.5" and rows[0]["command"] == ""
    assert len(rows) == 2 and rows[1]["command"]


def test_ablate_rows_say_where_they_were_measured_and_on_what(capsys, tmp_path):
    import argparse

    from effdense import ablate

    cuda = torch.device("cuda")  # (a device object only: nothing runs on it)
    estimate_timed = argparse.Namespace(estimate=True, time=True)
    assert ablate._device_type(estimate_timed, cuda) == "cuda"  # before: "cpu", with the GPU's times
    assert ablate._device_type(argparse.Namespace(estimate=True, time=False), cuda) == "cpu"
    assert ablate._device_type(argparse.Namespace(estimate=False, time=False), cuda) == "cuda"
    code, _, err = run(capsys, "ablate", "--strategies", "fused", "--depths", "10", "--batch-sizes", "2", "--image-size",
                       "8", "--device", "cpu", "--no-progress", "--no-plots", "--out", str(tmp_path))  # fmt: skip
    assert code == 0, err
    with open(tmp_path / "ablate.csv") as f:
        (row,) = csv.DictReader(f)
    if not torch.cuda.is_available():  # as bench notes it: not the GPU's kernels (the tests run the interpreter)
        assert row["note"] == "CPU: Triton kernels through the interpreter"
    code, _, err = run(capsys, "ablate", "--strategies", "fused", "--depths", "10", "--batch-sizes", "2", "--image-size",
                       "8", "--estimate", "--no-progress", "--no-plots", "--out", str(tmp_path / "est"))  # fmt: skip
    assert code == 0, err
    with open(tmp_path / "est" / "ablate.csv") as f:
        (row,) = csv.DictReader(f)
    assert row["note"] == ""  # an estimate runs no kernel: nothing to say about which ran


def test_ablate_plots_show_the_grid_just_run(capsys, tmp_path, monkeypatch):
    # two grids in one folder, at two image sizes: before, the plots mixed both into each line
    import matplotlib.axes

    lines = []
    original = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot",
                        lambda self, xs, ys, **kw: lines.append((self, kw.get("label"), list(xs))) or original(self, xs, ys, **kw))  # fmt: skip
    argv = ["ablate", "--strategies", "naive", "--depths", "10,16", "--batch-sizes", "2", "--estimate", "--no-progress",
            "--out", str(tmp_path)]  # fmt: skip
    assert run(capsys, *argv, "--image-size", "8", "--no-plots")[0] == 0
    assert run(capsys, *argv, "--image-size", "16")[0] == 0
    depth_lines = [(label, xs) for ax, label, xs in lines if "vs depth" in ax.get_title()]  # titled after plotting
    assert depth_lines == [("naive", [10.0, 16.0])]


def test_ablate_plots_around_a_failed_corner_and_from_each_points_newest_row(capsys, tmp_path, monkeypatch):
    """The largest depth at the largest batch failed (out of memory, say): each plot is drawn at a slice that
    has two x values (before: at the largest batch and depth alone, so neither plot was drawn). A point whose
    newest row failed is not drawn from an older ok row; a value that is not a number is named."""
    import matplotlib.axes

    from effdense import ablate
    from effdense.benchutil import UsageError

    argv = ["ablate", "--strategies", "naive,shared", "--depths", "10,16", "--batch-sizes", "2,3", "--estimate",
            "--image-size", "8", "--no-progress", "--no-plots", "--out", str(tmp_path)]  # fmt: skip
    assert run(capsys, *argv)[0] == 0
    path = tmp_path / "ablate.csv"
    rows = ablate.read_rows(path)
    for r in rows:
        if (r["depth"], r["batch_size"]) == ("16", "3"):
            r.update(status="error", peak_mib="", note="out of memory")
    # naive at depth 10, batch 2 failed in a later run: its older ok row above must not be drawn
    rows.append({**next(r for r in rows if (r["strategy"], r["depth"], r["batch_size"]) == ("naive", "10", "2")),
                 "status": "error", "peak_mib": ""})  # fmt: skip
    ablate.write_csv(path, rows, ablate.CSV_COLUMNS)
    lines = []
    original = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot",
                        lambda self, xs, ys, **kw: lines.append((self, kw.get("label"), list(xs))) or original(self, xs, ys, **kw))  # fmt: skip
    written = ablate.plot(path, tmp_path)
    assert sorted(p.name for p in written) == ["ablate_batch.png", "ablate_depth.png"]
    drawn = {(("depth" if "vs depth" in ax.get_title() else "batch"), label): xs for ax, label, xs in lines}
    assert drawn == {("depth", "naive"): [16.0], ("depth", "shared"): [10.0, 16.0],  # at batch 2
                     ("batch", "naive"): [3.0], ("batch", "shared"): [2.0, 3.0]}  # at depth 10  # fmt: skip
    # and a rerun measures the points whose newest row failed (before, the older ok row counted it done: never
    # measured again, and never drawn)
    code, out, err = run(capsys, *argv)
    assert code == 0 and "5 already in" in err and "3 to run" in err, err
    n, row = next((n, r) for n, r in enumerate(rows, 1) if (r["strategy"], r["depth"], r["batch_size"]) == ("shared", "10", "2"))
    row["peak_mib"] = "abc"
    ablate.write_csv(path, rows, ablate.CSV_COLUMNS)
    with pytest.raises(UsageError, match=rf"data row {n} \(shared depth 10 batch 2\) has peak_mib='abc', not a number"):
        ablate.plot(path, tmp_path)


def test_max_depth_tiny(capsys, tmp_path):
    code, out, err = run(capsys, "max-depth", "--budget", "64MiB", "--batch-size", "4", "--strategies", "naive,checkpoint",
                         "--depth-limit", "200", "--device", "cpu", "--out", str(tmp_path))  # fmt: skip
    assert code == 0, err
    rows = json.loads(next(tmp_path.glob("max_depth_64MiB_*.json")).read_text())["rows"]
    by = {r["strategy"]: r for r in rows}
    for r in by.values():
        assert r["status"] == "ok" and r["peak_mib"] <= 64 and (r["next_peak_mib"] is None or r["next_peak_mib"] > 64)
        assert (r["max_depth"] - 4) % 6 == 0
    assert by["checkpoint"]["max_depth"] >= by["naive"]["max_depth"]


def test_max_depth_file_names_its_strategies_and_records_its_settings(capsys, tmp_path):
    common = ("max-depth", "--budget", "2MiB", "--batch-size", "2", "--depth-limit", "28", "--device", "cpu",
              "--out", str(tmp_path))  # fmt: skip
    assert run(capsys, *common, "--strategies", "naive", "--estimate-limit", "22")[0] == 0
    assert run(capsys, *common, "--strategies", "shared")[0] == 0
    names = sorted(p.name for p in tmp_path.glob("*.json"))
    assert names == ["max_depth_2MiB_k12_b2_32px_fp32_naive.json", "max_depth_2MiB_k12_b2_32px_fp32_shared.json"]
    meta = json.loads((tmp_path / names[0]).read_text())["meta"]
    assert meta["estimate_limit"] == 22 and meta["strategies"] == ["naive"]
    assert json.loads((tmp_path / names[1]).read_text())["meta"]["estimate_limit"] is None


def test_max_depth_progress_line_says_when_the_depth_is_extrapolated(capsys, tmp_path):
    """Before: "naive: max depth 316 (63.0 MiB), 4 estimates in 1.0 s", read as measured; the table's status
    column alone said 'extrapolated'."""
    code, _, err = run(capsys, "max-depth", "--budget", "64MiB", "--batch-size", "2", "--image-size", "8", "--strategies",
                       "naive", "--estimate-limit", "40", "--device", "cpu", "--out", str(tmp_path))  # fmt: skip
    row = json.loads(next(tmp_path.glob("*.json")).read_text())["rows"][0]
    assert code == 0 and row["status"] == "extrapolated", row
    assert f"naive: max depth {row['max_depth']} ({row['peak_mib']:,.1f} MiB), extrapolated past depth 40," in err, err


@pytest.mark.parametrize("command", ["bench", "ablate", "max-depth"])
def test_failed_rows_make_the_exit_code_1(capsys, tmp_path, monkeypatch, command):
    """A row (grid point, strategy) that raises is recorded with status 'error' and the others still run; the
    command then ends with exit code 1 and a line naming the failures (it ended with 0, so a script or CI
    job running it took a failed measurement for a result)."""
    from effdense import ablate, bench, maxdepth

    real = effdense.memory.estimate_step

    def estimate_step(*args, strategy=None, **kwargs):
        build = args[0]
        broken = strategy == "checkpoint" or (callable(build) and build().strategy == "checkpoint")
        if broken:
            raise RuntimeError("simulated failure\nsecond line")
        return real(*args, **({} if strategy is None else {"strategy": strategy}), **kwargs)

    module, argv = {
        "bench": (bench, ["--model", "densenet_bc_10", "--batch-size", "2", "--memory", "estimate", "--no-reference"]),
        "ablate": (ablate, ["--depths", "10", "--batch-sizes", "2", "--estimate", "--no-progress", "--no-plots"]),
        "max-depth": (maxdepth, ["--budget", "16MiB", "--batch-size", "2", "--depth-limit", "16"]),
    }[command]
    if command != "ablate":  # (ablate's estimates run on the CPU: --device is refused with --estimate)
        argv += ["--device", "cpu"]
    monkeypatch.setattr(module, "estimate_step", estimate_step)
    code, out, err = run(capsys, command, *argv, "--strategies", "naive,checkpoint", "--out", str(tmp_path))
    assert code == 1, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"effdense {command}: 1 of 2 ") and "failed (" in last and "checkpoint" in last, last
    if command != "ablate":
        rows = json.loads(next(tmp_path.glob("*.json")).read_text())["rows"]
    else:
        with open(tmp_path / "ablate.csv") as f:
            rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows] == ["ok", "error"]
    assert rows[1]["note"] == "RuntimeError: simulated failure"
    # a rerun of ablate retries only the failed point; with it fixed, the exit code is 0
    if command == "ablate":
        monkeypatch.setattr(module, "estimate_step", real)
        code, _, err = run(capsys, command, *argv, "--strategies", "naive,checkpoint", "--out", str(tmp_path))
        assert code == 0 and "1 to run" in err, err


def test_max_depth_when_nothing_fits_says_so(capsys, tmp_path):
    """A budget below the shallowest model: status 'none fits', a progress line that says it, and a file
    named after the budget in bytes (budgets under 1 MiB would otherwise all be '0MiB')."""
    code, out, err = run(capsys, "max-depth", "--budget", "300KiB", "--batch-size", "4", "--strategies", "naive",
                         "--depth-limit", "16", "--device", "cpu", "--out", str(tmp_path))  # fmt: skip
    assert code == 0, err
    assert "no depth fits the budget (the shallowest, depth 10, needs" in err + out
    rows = json.loads((tmp_path / "max_depth_307200B_k12_b4_32px_fp32_naive.json").read_text())["rows"]
    assert rows[0]["status"] == "none fits" and rows[0]["max_depth"] is None


def test_max_depth_at_the_depth_limit_says_so(capsys, tmp_path):
    """The search stopped by --depth-limit, not by the budget: the printed result says so (was in the JSON only)."""
    code, out, err = run(capsys, "max-depth", "--budget", "1GiB", "--batch-size", "2", "--strategies", "naive",
                         "--depth-limit", "16", "--device", "cpu", "--out", str(tmp_path))  # fmt: skip
    assert code == 0, err
    assert "naive: max depth 16 (" in err + out and "the deepest that --depth-limit 16 allows" in err + out
    # and the table, whose status column says ok, has the note too
    (line,) = [ln for ln in out.splitlines() if ln.startswith("naive ")]
    assert line.split()[-4:] == ["ok", "reached", "--depth-limit", "16"], out
    rows = json.loads(next(tmp_path.glob("max_depth_1024MiB_*.json")).read_text())["rows"]
    assert rows[0]["max_depth"] == 16 and rows[0]["note"] == "reached --depth-limit 16"


def test_max_depth_at_the_depth_limit_and_extrapolated_keeps_both_notes(capsys, tmp_path):
    """Capped by --depth-limit and fitted past --estimate-limit: before, the fit's note replaced the depth
    limit's in the files, which then lost that deeper models may fit."""
    code, out, err = run(capsys, "max-depth", "--budget", "1GiB", "--batch-size", "2", "--image-size", "8",
                         "--strategies", "naive", "--estimate-limit", "22", "--depth-limit", "28", "--device", "cpu",
                         "--out", str(tmp_path))  # fmt: skip
    assert code == 0, err
    (row,) = json.loads(next(tmp_path.glob("max_depth_1024MiB_*.json")).read_text())["rows"]
    assert row["max_depth"] == 28 and row["status"] == "extrapolated"
    assert row["note"].startswith("reached --depth-limit 28; fit through estimates at depths"), row["note"]


def test_summary_tiny(capsys, tmp_path):
    code, out, err = run(capsys, "summary", "densenet_bc_16", "--strategies", "naive", "--batch-size", "2",
                         "--out", str(tmp_path))  # fmt: skip
    assert code == 0, err
    payload = json.loads((tmp_path / "summary_densenet_bc_16_32px_b2_fp32_naive.json").read_text())
    assert payload["meta"]["strategies"] == ["naive"] and payload["meta"]["batch_size"] == 2
    assert payload["blocks"] == [2, 2, 2] and payload["dense_connections_per_block"] == [3, 3, 3]
    model, resnet = payload["models"]
    assert model["params"] == sum(p.numel() for p in effdense.get_model("densenet_bc_16").parameters())
    assert model["macs"] > 0 and resnet["model"] == "torchvision resnet18 (ImageNet architecture)"
    assert resnet["reference"] == "torchvision.models.resnet18" and resnet["architecture"] == "imagenet"


def test_model_names_are_case_insensitive(capsys, tmp_path):
    # as effdense.get_model; before: "unknown model 'DenseNet_BC_10'"
    code, _, err = run(capsys, "summary", "DenseNet_BC_10", "--no-memory", "--out", str(tmp_path))
    assert code == 0, err
    assert json.loads((tmp_path / "summary_densenet_bc_10_32px_nomemory.json").read_text())["blocks"] == [1, 1, 1]


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["bench", "--model", "resnet50"], "unknown model"),
        (["bench", "--model", "densenet_bc_101"], "not a valid"),
        (["bench", "--strategies", "fast"], "unknown strategy"),
        (["max-depth", "--budget", "12XB"], "cannot parse memory size"),
        (["ablate", "--depths", ","], "empty list"),
        (["ablate", "--depths", "41"], "not a valid"),
        (["ablate", "--vary", "speed"], "unknown Policy field"),
        (["summary", "densenet_bc_16", "--image-size", "2"], "too small"),
        (["bench", "--batch-size", "0"], "positive integer"),
        (["bench", "--max-seconds-per-row", "nan"], "expected a number >= 0"),  # before: accepted, "at most nan s"
        (["bench", "--max-seconds-per-row", "-1"], "expected a number >= 0"),
        # values starting with a minus sign reach their type, not argparse's "expected one argument"
        (["max-depth", "--budget", "-1GiB"], "at least 1 byte"),
        (["ablate", "--depths", "-10,16"], "must be positive"),
        (["max-depth", "--budget", "0.5B"], "at least 1 byte"),
        (["max-depth", "--budget", "12"], "memory size '12' has no unit; write e.g. 12GiB, 12MB, or 12B for bytes"),
        (["max-depth", "--budget", "1e400"], "too large"),
        (["max-depth", "--backend", "meta", "--dtype", "bf16"], "--backend meta cannot estimate --dtype bf16"),
        (["nonsense"], "invalid choice"),
        (["bench", "--compile", "--device", "cpu"], "--compile times compiled rows on a GPU only"),
        (["bench", "--compile", "--memory", "estimate"], "--compile adds timed rows"),
        (["bench", "--compile", "--no-timing"], "--compile adds timed rows"),
    ],
)
def test_bad_arguments_one_line_exit_2(capsys, argv, fragment):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert err.count("\n") == 1 and fragment in err, err
    assert err.startswith("effdense")


# one quick run of each command that writes under --out
_OUT_WRITERS = pytest.mark.parametrize(
    "argv",
    [
        ["bench", "--model", "densenet_bc_10", "--batch-size", "2", "--memory", "estimate"],
        ["ablate", "--strategies", "naive", "--depths", "10", "--batch-sizes", "2", "--estimate", "--no-progress"],
        ["max-depth", "--budget", "1MiB", "--batch-size", "2", "--strategies", "naive", "--depth-limit", "16"],
        ["summary", "densenet_bc_10", "--no-memory"],
    ],
    ids=["bench", "ablate", "max-depth", "summary"],
)


@_OUT_WRITERS
@pytest.mark.parametrize("where", ["file", "below-a-file"])
def test_out_that_cannot_be_a_folder_is_a_usage_error(capsys, tmp_path, argv, where):
    # before: a FileExistsError/NotADirectoryError traceback, after the work was done (exit code 1)
    blocker = tmp_path / "results"
    blocker.write_text("not a folder")
    out = blocker if where == "file" else blocker / "sub"
    code, _, err = run(capsys, *argv, "--out", str(out))
    assert code == 2 and err.count("\n") == 1 and "--out" in err and str(out) in err, err
    assert blocker.read_text() == "not a folder"


_RESULT_FILE = {
    "bench": "bench_densenet_bc_10_b2_32px_fp32_cpu_estimate.json", "ablate": "ablate.csv",
    "max-depth": "max_depth_1MiB_k12_b2_32px_fp32_naive.json", "summary": "summary_densenet_bc_10_32px_nomemory.json",
}  # fmt: skip


@_OUT_WRITERS
@pytest.mark.parametrize("where", ["folder-in-the-way", "dangling-link"])
def test_out_whose_result_file_cannot_be_written_is_a_usage_error(capsys, tmp_path, argv, where):
    # before: a folder where the result file goes gave an IsADirectoryError traceback (exit 1), after the work;
    # a symbolic link to nowhere as --out said "cannot create the --out folder ...: File exists"
    out = tmp_path / "results"
    if where == "folder-in-the-way":
        (out / _RESULT_FILE[argv[0]]).mkdir(parents=True)
        fragment = "a folder (or another non-file) of that name is in the way"
    else:
        out.symlink_to(tmp_path / "missing")
        fragment = "is a symbolic link to"
    code, _, err = run(capsys, *argv, "--out", str(out))
    assert code == 2 and err.count("\n") == 1 and fragment in err, err


def test_json_results_are_standard_json(capsys, tmp_path):
    # before: --max-seconds-per-row inf was written as Infinity, which strict JSON parsers refuse
    code, _, err = run(capsys, "bench", "--model", "densenet_bc_10", "--batch-size", "2", "--no-reference",
                       "--strategies", "naive", "--steps", "1", "--warmup", "0", "--max-seconds-per-row", "inf",
                       "--out", str(tmp_path))  # fmt: skip
    assert code == 0, err

    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    payload = json.loads(next(tmp_path.glob("*.json")).read_text(), parse_constant=refuse)
    assert payload["meta"]["max_seconds_per_row"] is None


def test_bench_compile_adds_a_compiled_row_per_strategy_last():
    """``--compile`` (GPU only): after the plain rows and torchvision's, one ``effdense <strategy> compile`` row
    per selected strategy, its model under ``torch.compile`` (the list is built here; nothing is compiled)."""
    from effdense import bench

    args = cli.build_parser().parse_args(["bench", "--strategies", "naive,fused", "--compile", "--model", "densenet_bc_10"])
    rows = bench._rows(args, torch.device("cuda"))
    assert [r["row"] for r in rows] == [
        "effdense naive", "effdense fused", "torchvision", "torchvision memory_efficient", "torchvision compile",
        "effdense naive compile", "effdense fused compile",
    ]  # fmt: skip
    model = rows[-1]["build"]()
    assert hasattr(model, "_orig_mod") and model._orig_mod.strategy == "fused"
    plain = cli.build_parser().parse_args(["bench", "--strategies", "fused", "--model", "densenet_bc_10"])
    assert not any(r["row"].endswith(" compile") and r["kind"] == "effdense" for r in bench._rows(plain, torch.device("cuda")))
    # the files name each strategy once (the GPU suite's compile run wrote ..._compile_fused-fused_noref)
    only = cli.build_parser().parse_args(["bench", "--strategies", "fused", "--compile", "--no-reference", "--model", "densenet_bc_10"])
    stem = bench.result_stem(only, bench._rows(only, torch.device("cuda")), torch.device("cuda"), 32)
    assert stem == "bench_densenet_bc_10_b64_32px_fp32_cuda_compile_fused_noref", stem


def test_ablate_with_no_available_strategy_is_a_usage_error(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(effdense.strategies, "available", lambda: ("naive",))
    code, _, err = run(capsys, "ablate", "--strategies", "fused", "--depths", "10", "--estimate", "--out", str(tmp_path))
    assert code == 2 and err.count("\n") == 1 and "no strategy of the grid is available" in err


@pytest.mark.parametrize("module", ["effdense.cli", "effdense"])  # (python -m effdense: before, "No module named effdense.__main__")
def test_console_entry_point_runs(module):
    result = subprocess.run([sys.executable, "-m", module, "max-depth", "--budget", "12XB"],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "12XB" in result.stderr
    assert result.stderr.startswith("effdense max-depth: error:"), result.stderr


@pytest.mark.parametrize("argv", [
    ["summary", "densenet_bc_10", "--no-memory", "--image-size", "8"],  # stdout written at exit (buffered)
    ["max-depth", "--budget", "300KiB", "--batch-size", "1", "--strategies", "naive", "--depth-limit", "10"],
])  # fmt: skip
def test_closed_stdout_ends_quietly_with_141(tmp_path, argv):
    """``effdense summary densenet121 | head -3``: the reader goes away; before, a BrokenPipeError traceback
    (or 'Exception ignored ... BrokenPipeError' at shutdown) and exit code 1. Now no traceback, exit 141
    (128 + SIGPIPE, as coreutils). The read end is closed before the child writes anything, so the first
    write fails whatever the timing."""
    proc = subprocess.Popen([sys.executable, "-m", "effdense.cli", *argv, "--out", str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    proc.stdout.close()
    _, err = proc.communicate(timeout=300)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert proc.returncode == 141, err


def test_a_broken_pipe_elsewhere_is_not_taken_for_a_closed_stdout():
    """A BrokenPipeError from another pipe (a subprocess, a worker) while stdout is fine is an error: before,
    it too ended the run silently with 141 and stderr pointed at /dev/null."""
    code = (
        "import os, sys\n"
        "from effdense import cli, summary\n"
        "def broken(args):\n"
        "    r, w = os.pipe(); os.close(r); os.write(w, b'x')\n"
        "summary.main = broken\n"
        "sys.exit(cli.main(['summary', 'densenet121']))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "BrokenPipeError" in result.stderr, (result.returncode, result.stderr)


def test_subcommands_come_from_one_table():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert {"bench", "ablate", "max-depth", "summary"} <= set(sub.choices) <= set(cli.COMMANDS)


def _benchmark_script(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script_name, argv, fragment", [
    ("step_time_ratio", ["--model", "nosuch"], "unknown model 'nosuch'"),
    ("step_time_ratio", ["--device", "bogus"], "unknown device 'bogus'"),
    ("step_time_ratio", ["--image-size", "1", "--batch-size", "2"], "too small for densenet_bc_100"),
    ("estimate_vs_cuda", ["--config", "nosuch:2:32"], "unknown model 'nosuch'"),
    ("estimate_vs_cuda", ["--config", "densenet_bc_16:0:32"], "expected a positive integer, got '0'"),
    ("estimate_vs_cuda", ["--device", "nonsense"], "unknown device 'nonsense'"),
])  # fmt: skip
def test_benchmark_scripts_refuse_bad_arguments_with_a_usage_error(capsys, tmp_path, script_name, argv, fragment):
    """Before: tracebacks (exit 1) from step_time_ratio.py; estimate_vs_cuda.py ran every row into an error
    (and overwrote its result files) for a config it could not run."""
    script = _benchmark_script(script_name)
    with pytest.raises(SystemExit) as exc:
        script.main([*argv, "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and fragment in err.strip().splitlines()[-1] and "Traceback" not in err, err
    assert not any(tmp_path.iterdir())


def test_step_graph_time_arguments_and_device(capsys):
    """benchmarks/step_graph_time.py (GPU suite): its arguments parse, bad ones exit 2, and without CUDA it
    says it needs a CUDA device (exit 2) instead of failing later."""
    script = _benchmark_script("step_graph_time")
    args = script.parse_args(["--model", "densenet_bc_16", "--batch-size", "2", "--dtype", "fp16", "--strategies", "fused"])
    assert (args.model, args.batch_size, args.dtype, args.strategies) == ("densenet_bc_16", 2, "fp16", ["fused"])
    with pytest.raises(SystemExit) as exc:
        script.parse_args(["--dtype", "fp64"])
    assert exc.value.code == 2
    if not torch.cuda.is_available():
        assert script.main(["--model", "densenet_bc_16"]) == 2
        assert "needs a CUDA device" in capsys.readouterr().err


def test_host_overhead_counts_and_writes(tmp_path, capsys):
    """benchmarks/host_overhead.py: per strategy the operator kinds add up to the total, counts repeat
    exactly, the wrapper times are written, bad arguments exit 2."""
    script = _benchmark_script("host_overhead")
    argv = ["--model", "densenet_bc_16", "--batch-size", "2", "--image-size", "8", "--repeats", "1", "--calls", "3",
            "--strategies", "naive,fused", "--out", str(tmp_path)]  # fmt: skip
    assert script.main(argv) == 0
    data = json.loads((tmp_path / "host_overhead_densenet_bc_16_b2_8px.json").read_text())
    assert data["meta"]["command"] == " ".join(["python", "benchmarks/host_overhead.py", *argv])
    rows = {r["strategy"]: r for r in data["op_counts"]}
    for row in rows.values():
        kinds = ("views", "allocations", "fills", "compute", "kernel_ops")
        assert sum(row[k] for k in kinds) == row["total"] == sum(row["ops"].values()) > 0
    assert rows["naive"]["kernel_ops"] == 0
    if data["fused_counted_on_triton_path"]:
        assert rows["fused"]["ops"]["effdense.bottleneck_forward"] > 0
    assert rows["fused"] == script.count_ops("densenet_bc_16", "fused", (2, 3, 8, 8))  # deterministic
    assert set(data["wrapper_us_per_call"]) and all(v > 0 for v in data["wrapper_us_per_call"].values())
    for bad in (["--strategies", "nope"], ["--model", "resnet50"], ["--calls", "0"], ["--device", "tpu"]):
        with pytest.raises(SystemExit) as exc:
            script.main(bad)
        assert exc.value.code == 2
    for ineffective in (["--calls", "10"], ["--repeats", "3"]):  # (they time the wrappers, which this leaves out)
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            script.main(["--no-wrapper-times", *ineffective])
        assert exc.value.code == 2 and "--no-wrapper-times leaves out" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert script.main(["--device", "cuda"]) == 2
        assert "needs a CUDA device" in capsys.readouterr().err


def test_measure_builds_keeps_every_row():
    """effdense.bench.measure_builds (the step scripts' row loop): a build that fails or a measurement that
    raises gives an error row naming the exception, a build without a model a skipped row, and the rows
    after them still run; each finished row is reported; same_weight_builds gives each strategy base's weights."""
    from effdense.bench import measure_builds, same_weight_builds

    base = effdense.get_model("densenet_bc_16", strategy="naive")
    builds = same_weight_builds("densenet_bc_16", base, ["naive", "fused"], ("plain", "memory_efficient"))
    assert [name for name, _ in builds] == ["effdense naive", "effdense fused", "torchvision", "torchvision memory_efficient"]
    for _, build in builds:
        model = build()
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), base.state_dict().values()))
    assert builds[-1][1]().features.denseblock1.denselayer1.memory_efficient
    assert not builds[-2][1]().features.denseblock1.denselayer1.memory_efficient
    assert [name for name, _ in same_weight_builds("densenet_bc_16", base, ["naive"], ())] == ["effdense naive"]
    with pytest.raises(ValueError, match="'plain' and/or 'memory_efficient', got \\['compile'\\]"):
        same_weight_builds("densenet_bc_16", base, ["naive"], ("compile",))

    def broken():
        raise RuntimeError("no such model\nsecond line")

    def measure(name, model):
        if name == "raises":
            raise ValueError("measure failed")
        return {"status": "ok", "params": sum(p.numel() for p in model.parameters())}

    seen = []
    rows = measure_builds(
        [("broken", broken), ("none", lambda: None), ("raises", lambda: base), ("fine", lambda: base)],
        measure, torch.device("cpu"), on_row=lambda row: seen.append(row["row"]), model="densenet_bc_16",
    )  # fmt: skip
    assert [(r["row"], r["status"]) for r in rows] == [
        ("broken", "error"), ("none", "skipped"), ("raises", "error"), ("fine", "ok")]
    assert rows[0]["note"] == "RuntimeError: no such model" and rows[2]["note"] == "ValueError: measure failed"
    assert rows[3]["params"] == sum(p.numel() for p in base.parameters()) and rows[3]["model"] == "densenet_bc_16"
    assert seen == ["broken", "none", "raises", "fine"]


@pytest.mark.parametrize("text, problem", [("mps", "unsupported device"), ("bogus", "unknown device"), ("cpu:1", "one CPU device")])
def test_device_option_refuses_what_it_cannot_run_on(text, problem, capsys):
    # "cpu:1" ran the whole bench on the one CPU and recorded "cpu:1" as its device
    with pytest.raises(SystemExit) as info:
        cli.main(["bench", "--device", text, "--steps", "1"])
    assert info.value.code == 2 and problem in capsys.readouterr().err


def test_error_note_is_one_short_line():
    """Every failed row (bench, ablate, max-depth, the GPU suite's scripts) notes its error the same way."""
    from effdense.benchutil import error_note, first_line

    assert error_note(RuntimeError("CUDA out of memory.\nTried to allocate...")) == "RuntimeError: CUDA out of memory."
    assert error_note(KeyError()) == first_line(KeyError()) == "KeyError"
    assert error_note(ValueError("x" * 500)) == "ValueError: " + "x" * 288 and len(error_note(ValueError("x" * 500), 40)) == 40
    assert first_line(RuntimeError("  first\nsecond ")) == "first"


def test_profile_step_records_host_time_events_and_python(tmp_path, capsys):
    """benchmarks/profile_step.py (GPU suite): per row the host and whole-step times, the profiled step's
    events with their kinds, and a Python profile; the JSON names the command; bad arguments exit 2. No time
    is asserted on."""
    script = _benchmark_script("profile_step")
    argv = ["--device", "cpu", "--model", "densenet_bc_16", "--batch-size", "2", "--image-size", "8", "--steps", "1",
            "--warmup", "1", "--strategies", "fused", "--top", "5", "--out", str(tmp_path)]  # fmt: skip
    assert script.main(argv) == 0
    data = json.loads((tmp_path / "profile_step_densenet_bc_16_b2_8px_bf16_cpu.json").read_text())
    assert data["meta"]["command"] == " ".join(["python", "benchmarks/profile_step.py", *argv])
    rows = {r["row"]: r for r in data["rows"]}
    assert set(rows) == {"effdense fused", "torchvision"} and all(r["status"] == "ok" for r in rows.values())
    for r in rows.values():
        assert r["step_ms"] >= r["host_ms"] > 0
        profile = r["profile"]
        assert profile["by_kind"]["aten"]["count"] > 0 and 0 < len(profile["top"]) <= 5
        assert all(e["kind"] == script._kind(e["name"]) for e in profile["top"])
        assert not any(script._FINAL_WAIT in e["name"] for e in profile["top"])  # the script's own wait is left out
        assert sum(r["python_ms_cprofile"].values()) > 0
    assert [script._kind(n) for n in ("aten::mm", "cudaLaunchKernel", "cuLaunchKernelEx", "custom", "effdense::x")] == [
        "aten", "runtime", "runtime", "other", "effdense"]
    for bad in (["--strategies", "nope"], ["--model", "resnet50"], ["--steps", "0"], ["--device", "tpu"]):
        with pytest.raises(SystemExit) as exc:
            script.main(bad)
        assert exc.value.code == 2
    assert script.main(["--device", "cpu", "--model", "densenet121", "--image-size", "8"]) == 2
    assert "too small" in capsys.readouterr().err
    assert script.main(["--device", "cpu", "--trace"]) == 2
    assert "--trace writes into --out" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert script.main(["--device", "cuda"]) == 2
        assert "needs a CUDA device" in capsys.readouterr().err


def test_fused_weight_gradient_is_one_launch_per_bottleneck():
    """On its kernel path ``fused`` computes each bottleneck's weight gradient in one launch over all input
    channels; only the input gradient works on channel chunks (its dh scratch). DenseNet-BC-100 at batch 64,
    32x32 (counted on meta tensors): 48 layers and 2 transitions, wide layers in several chunks."""
    from effdense.kernels import kernels_available

    if not kernels_available("cpu"):
        pytest.skip("the fused kernel path needs TRITON_INTERPRET=1 on CPU (conftest sets it)")
    script = _benchmark_script("host_overhead")
    ops = script.count_ops("densenet_bc_100", "fused", (64, 3, 32, 32))["ops"]
    assert ops["effdense.bottleneck_backward_weight"] == 50
    assert ops["effdense.bottleneck_forward"] == 2 * 48 + 2  # layers: forward and backward's recomputation
    assert ops["effdense.bottleneck_backward_input"] == ops["effdense.bn_backward_accumulate"] > 50


def test_bench_kernels_records_command_and_environment(capsys):
    """benchmarks/bench_kernels.py (GPU suite) records what effdense.benchutil.environment records (versions,
    commit, time) and the command line, as the other result files do (before: no command, no torchvision or
    python version). Its arguments parse, bad ones exit 2, --help exits 0, and without CUDA it says it needs a
    GPU (exit 2). No timing is run or asserted."""
    from effdense.benchutil import environment

    script = _benchmark_script("bench_kernels")
    argv = ["--dtypes", "bf16", "--batch", "2", "--quick"]
    args = script._parse(argv)
    assert (args.dtypes, args.batch, args.quick) == (["bf16"], 2, True)
    meta = script.metadata(args, torch.device("cpu"), argv)
    assert meta["command"] == "python benchmarks/bench_kernels.py --dtypes bf16 --batch 2 --quick"
    assert set(environment(torch.device("cpu"))) <= set(meta)
    assert meta["git_commit"] and meta["torch"] == torch.__version__ and meta["time"] == meta["date"]
    assert meta["device"] == meta["device_name"] and (meta["batch"], meta["bottleneck"]) == (2, 128)
    for bad in (["--dtypes", "fp64"], ["--batch", "0"], ["--bottleneck", "-1"]):
        with pytest.raises(SystemExit) as exc:
            script._parse(bad)
        assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        script._parse(["--help"])
    assert exc.value.code == 0
    capsys.readouterr()
    if not torch.cuda.is_available():
        assert script.main(["--quick"]) == 2
        assert "needs a CUDA GPU" in capsys.readouterr().err


def test_summary_reference_row_says_it_is_the_imagenet_resnet(capsys, tmp_path):
    """For a CIFAR model the reference row is torchvision's ImageNet ResNet at 32x32: the table and its note
    say so, and that it is not a CIFAR ResNet (before: 'torchvision resnet18' and nothing else)."""
    code, out, err = run(capsys, "summary", "densenet_bc_16", "--no-memory", "--out", str(tmp_path))
    assert code == 0, err
    assert "torchvision resnet18 (ImageNet architecture)" in out
    assert "run at 32x32 input (last feature map 1x1)" in out and "It is not a CIFAR ResNet" in out
    (resnet,) = json.loads((tmp_path / "summary_densenet_bc_16_32px_nomemory.json").read_text())["models"][1:]
    assert "not a CIFAR ResNet" in resnet["note"] and resnet["input"] == "32x32"


_TINY_TRAIN = ["--epochs", "1", "--subset", "64", "--test-subset", "64", "--batch-size", "32", "--no-progress"]


@pytest.mark.parametrize(
    "argv, fragment",
    [
        # before: every grid point or strategy failed on its own and the run ended with exit code 0
        (["ablate", "--image-size", "2", "--depths", "10", "--estimate", "--no-progress"], "--image-size 2 is too small"),
        (["max-depth", "--image-size", "3", "--depth-limit", "16", "--strategies", "naive"], "--image-size 3 is too small"),
        (["max-depth", "--estimate-limit", "5", "--depth-limit", "16", "--strategies", "naive"],
         "--estimate-limit 5 allows no DenseNet-BC"),
        # before: with fewer than three models under the limit to fit through, the search estimated past it
        (["max-depth", "--estimate-limit", "16", "--depth-limit", "40", "--strategies", "naive"],
         "--estimate-limit 16 leaves fewer than the three estimated models"),
        # before: a traceback (exit code 1) from torch, or taken silently
        (["train", *_TINY_TRAIN, "--lr", "-1"], "--lr must be a number >= 0"),
        (["train", *_TINY_TRAIN, "--lr", "nan"], "--lr must be a number >= 0"),
        (["train", *_TINY_TRAIN, "--momentum", "-1"], "--momentum must be"),
        (["train", *_TINY_TRAIN, "--weight-decay", "-1"], "--weight-decay must be a number >= 0"),
        (["train", *_TINY_TRAIN, "--lr-schedule", "step", "--lr-gamma", "-1"], "--lr-gamma must be a number > 0"),
        (["train", *_TINY_TRAIN, "--warmup-epochs", "-1"], "--warmup-epochs must be a number >= 0"),
        (["train", *_TINY_TRAIN, "--label-smoothing", "2"], "--label-smoothing must be a number in [0, 1]"),
        (["train", *_TINY_TRAIN, "--lr-schedule", "step", "--lr-milestones", "2"], "--lr-milestones must be"),
        # before: both taken, as a step schedule without a step and as 0.5,1 (the other comma lists refuse them)
        (["train", *_TINY_TRAIN, "--lr-schedule", "step", "--lr-milestones", ""], "--lr-milestones must be"),
        (["train", *_TINY_TRAIN, "--lr-schedule", "step", "--lr-milestones", "0.5,,1"], "--lr-milestones must be"),
        # before: "--workers and --save-every must be >= 0" for either, and the model's parameter names
        # ("drop_rate must be in [0, 1)", "growth_rate must be a positive integer") instead of the options
        (["train", *_TINY_TRAIN, "--workers", "-1"], "--workers must be an integer >= 0, got -1"),
        (["train", *_TINY_TRAIN, "--save-every", "-1"], "--save-every must be an integer >= 0, got -1"),
        (["train", *_TINY_TRAIN, "--drop-rate", "1.5"], "argument --drop-rate: expected a number in [0, 1), got '1.5'"),
        (["train", *_TINY_TRAIN, "--drop-rate", "nan"], "argument --drop-rate: expected a number in [0, 1)"),
        (["train", *_TINY_TRAIN, "--growth-rate", "0"], "argument --growth-rate: expected a positive integer, got '0'"),
    ],
    ids=["ablate-image-size", "max-depth-image-size", "max-depth-estimate-limit", "max-depth-estimate-limit-fit",
         "train-lr", "train-lr-nan",
         "train-momentum", "train-weight-decay", "train-lr-gamma", "train-warmup", "train-label-smoothing",
         "train-milestones", "train-milestones-empty", "train-milestones-empty-item", "train-workers", "train-save-every", "train-drop-rate", "train-drop-rate-nan",
         "train-growth-rate"],
)
def test_bad_values_found_after_parsing_one_line_exit_2(capsys, tmp_path, argv, fragment):
    out_option = "--out-dir" if argv[0] == "train" else "--out"
    code, _, err = run(capsys, *argv, out_option, str(tmp_path / "out"))
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"effdense {argv[0]}: error: ") and fragment in err, err
    assert not (tmp_path / "out").exists()  # said before any work or output


@pytest.mark.parametrize("option", ["--out-dir", "--checkpoint", "--metrics"])
def test_train_output_that_cannot_be_written_is_a_usage_error(capsys, tmp_path, option):
    # before: a FileNotFoundError/IsADirectoryError traceback (exit code 1), after the epoch was trained
    blocker = tmp_path / "results"
    blocker.write_text("not a folder")
    target = {
        "--out-dir": blocker / "run",  # below a file
        "--checkpoint": tmp_path,  # a folder
        "--metrics": blocker / "metrics.csv",  # below a file
    }[option]
    argv = ["train", *_TINY_TRAIN, option, str(target)]
    if option != "--out-dir":
        argv += ["--out-dir", str(tmp_path / "run")]
    code, out, err = run(capsys, *argv)
    assert code == 2 and err.count("\n") == 1 and option in err and str(target) in err, err
    assert "epoch 1/1" not in out and blocker.read_text() == "not a folder"


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["summary", "densenet_bc_16", "extra"], "effdense summary: error: unrecognized arguments: extra"),
        (["bench", "--bogus"], "effdense bench: error: unrecognized arguments: --bogus"),
        (["train", "--epochs", "1", "extra", "more"], "effdense train: error: unrecognized arguments: extra more"),
        # an unknown argument before the subcommand is the top-level parser's
        (["--bogus", "summary", "densenet_bc_16"], "effdense: error: unrecognized arguments: --bogus"),
    ],
    ids=["summary", "bench", "train", "top-level"],
)
def test_unrecognized_arguments_are_the_subcommands_error(capsys, argv, expected):
    # before: "effdense: error: unrecognized arguments: extra", naming the top-level program
    code, out, err = run(capsys, *argv)
    assert code == 2 and err == expected + "\n" and not out, err


_TINY_TRAIN_RUN = [*_TINY_TRAIN, "--depth", "10", "--growth-rate", "4", "--image-size", "12", "--strategy", "naive",
                   "--quiet"]  # fmt: skip


@pytest.mark.parametrize(
    "argv, option, reason",
    [
        # each would run in a few seconds without the check: the option was silently ignored, exit code 0
        (["ablate", "--strategies", "naive", "--depths", "10", "--batch-sizes", "2", "--image-size", "8", "--estimate",
          "--no-progress", "--no-plots", "--steps", "3"], "--steps", "without --time"),
        (["ablate", "--strategies", "naive", "--depths", "10", "--batch-sizes", "2", "--image-size", "8", "--estimate",
          "--no-progress", "--no-plots", "--warmup", "0"], "--warmup", "without --time"),
        (["ablate", "--strategies", "naive", "--depths", "10", "--batch-sizes", "2", "--image-size", "8", "--estimate",
          "--no-progress", "--no-plots", "--device", "cpu"], "--device", "with --estimate"),
        (["ablate", "--strategies", "naive", "--depths", "10", "--batch-sizes", "2", "--image-size", "8", "--estimate",
          "--no-progress", "--no-plots", "--vary", "all"], "--vary", "shared and fused"),
        (["bench", "--model", "densenet_bc_10", "--batch-size", "2", "--strategies", "naive", "--no-reference",
          "--memory", "estimate", "--steps", "2"], "--steps", "with --memory estimate"),
        (["bench", "--model", "densenet_bc_10", "--batch-size", "2", "--strategies", "naive", "--no-reference",
          "--no-timing", "--max-seconds-per-row", "1"], "--max-seconds-per-row", "with --no-timing"),
        (["summary", "densenet_bc_10", "--no-memory", "--strategies", "naive"], "--strategies", "with --no-memory"),
        (["summary", "densenet_bc_10", "--no-memory", "--batch-size", "2"], "--batch-size", "with --no-memory"),
        (["summary", "densenet_bc_10", "--no-memory", "--dtype", "bf16"], "--dtype", "with --no-memory"),
        (["train", *_TINY_TRAIN_RUN, "--optimizer", "adamw", "--momentum", "0.5"], "--momentum", "with --optimizer adamw"),
        (["train", *_TINY_TRAIN_RUN, "--lr-gamma", "0.5"], "--lr-gamma", "with --lr-schedule cosine"),
        (["train", *_TINY_TRAIN_RUN, "--lr-schedule", "constant", "--lr-milestones", "0.5"], "--lr-milestones",
         "with --lr-schedule constant"),
        (["train", *_TINY_TRAIN_RUN, "--log-interval", "2"], "--log-interval", "with --quiet"),
        (["train", *_TINY_TRAIN_RUN, "--data-dir", "/tmp"], "--data-dir", "with --data digits"),
        (["max-depth", "--budget", "50MiB", "--strategies", "naive", "--device", "cpu", "--no-verify"], "--no-verify",
         "on cpu"),
        (["max-depth", "--budget", "50MiB", "--strategies", "naive", "--depth-limit", "16", "--estimate-limit", "16"],
         "--estimate-limit 16", "with --depth-limit 16"),
    ],
    ids=["ablate-steps", "ablate-warmup", "ablate-device", "ablate-vary", "bench-steps-estimate",
         "bench-max-seconds-no-timing", "summary-strategies", "summary-batch-size", "summary-dtype", "train-momentum",
         "train-lr-gamma", "train-lr-milestones", "train-log-interval", "train-data-dir", "max-depth-no-verify-cpu",
         "max-depth-estimate-limit-past-depth-limit"],
)
def test_options_given_without_effect_are_usage_errors(capsys, tmp_path, argv, option, reason):
    out_option = "--out-dir" if argv[0] == "train" else "--out"
    code, _, err = run(capsys, *argv, out_option, str(tmp_path / "out"))
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"effdense {argv[0]}: error: {option}"), err
    assert "no effect" in err and reason in err, err
    assert not (tmp_path / "out").exists()  # said before any work or output


def test_options_without_effect_name_all_of_those_given(capsys):
    code, _, err = run(capsys, "bench", "--memory", "estimate", "--warmup", "1", "--steps", "2")
    assert code == 2 and "--steps and --warmup have no effect with --memory estimate" in err, err
    code, _, err = run(capsys, "bench", "--memory", "estimate", "--no-timing")  # before: accepted
    assert code == 2 and "--no-timing has no effect with --memory estimate" in err, err


# The documented commands (README.md, benchmarks/results/README.md, benchmarks/gpu_suite.sh): none of them
# gives an option that has no effect, so none of them is refused.
_DOCUMENTED = [
    "bench",
    "bench --out benchmarks/results",
    "bench --model densenet121 --batch-size 64 --memory estimate --out benchmarks/results",
    "bench --model densenet121 --batch-size 64 --memory estimate --dtype bf16 --out benchmarks/results",
    ("bench --model densenet_bc_400 --batch-size 64 --memory estimate --strategies naive,shared,fused --no-reference "
     "--out benchmarks/results"),
    "bench --device cuda --model densenet121 --batch-size 64 --image-size 224 --dtype bf16",
    ("bench --device cuda --model densenet121 --batch-size 64 --image-size 224 --dtype bf16 --max-seconds-per-row 20 "
     "--out OUT"),
    "bench --device cuda --max-seconds-per-row 20 --out OUT",
    ("bench --device cuda --model densenet121 --batch-size 64 --image-size 224 --dtype bf16 --strategies fused "
     "--reference plain,memory_efficient --steps 10 --max-seconds-per-row 10 --out OUT"),
    ("bench --device cuda --model densenet121 --batch-size 64 --image-size 224 --dtype bf16 --strategies fused "
     "--no-reference --compile --steps 10 --max-seconds-per-row 10 --out OUT"),
    "bench --device cpu --model densenet121 --batch-size 2 --image-size 32 --dtype bf16 --steps 1 --out OUT",
    "bench --device cpu --model densenet_bc_16 --batch-size 2 --steps 1 --out OUT",
    ("ablate --strategies naive,checkpoint,shared --vary recompute_bottleneck --depths 16,40,64 --batch-sizes 16,64 "
     "--estimate --time --steps 3 --warmup 1 --device cpu --out /tmp/ablate_new"),
    "summary densenet_bc_100",
    "train",
    "train --data cifar10 --data-dir ~/data --model densenet_bc_100 --epochs 300 --precision bf16",
    "train --no-progress --out-dir /tmp/rec --metrics benchmarks/results/train-digits-default.csv",
]


@pytest.mark.parametrize("command", _DOCUMENTED)
def test_documented_commands_give_no_option_without_effect(command):
    from effdense import ablate, bench, summary, train

    args = cli.build_parser().parse_args(command.split())
    check = {"bench": bench._reject_ineffective_options, "ablate": ablate._reject_ineffective_options,
             "summary": summary._reject_ineffective_options, "train": train._reject_ineffective_options}[args.command]  # fmt: skip
    check(args)  # raises on an option without effect


def test_summary_depth_column_counts_both_rows_the_same_way(capsys, tmp_path):
    """The depth column counts convolution and fully connected layers on the longest input-to-output path,
    for the DenseNet and the ResNet row alike (before: every such layer of the DenseNet, but the ResNet's
    nominal depth, which leaves out its projection shortcuts: ResNet-18 has 21 such layers), and the output
    says what the column means."""
    import torchvision

    from effdense.summary import RESNET_DEPTHS, layer_depth

    for d in RESNET_DEPTHS:  # the nearest reference is chosen by these numbers: they are the counted depths
        assert layer_depth(getattr(torchvision.models, f"resnet{d}"), 32) == d
    for name, depth in {"densenet_bc_16": 16, "densenet121": 121, "densenet_40": 40}.items():
        model = effdense.get_model(name, strategy="naive")
        all_layers = sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in model.modules())
        # every convolution of a DenseNet is on the longest path
        assert layer_depth(lambda name=name: effdense.get_model(name, strategy="naive"), 32) == all_layers == depth
    code, out, err = run(capsys, "summary", "densenet_bc_16", "--no-memory", "--out", str(tmp_path))
    assert code == 0, err
    model, resnet = json.loads((tmp_path / "summary_densenet_bc_16_32px_nomemory.json").read_text())["models"]
    assert (model["depth"], resnet["depth"]) == (16, 18)
    assert "depth: convolution and fully connected layers on the longest input-to-output path" in out


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["bench", "--model", "densenet121", "--batch-size", "1", "--image-size", "32", "--memory", "estimate",
          "--strategies", "naive", "--no-reference"], "--image-size 32 is too small for densenet121 at --batch-size 1"),
        (["summary", "densenet121", "--batch-size", "1", "--image-size", "32"],
         "--image-size 32 is too small for densenet121 at --batch-size 1"),
        (["max-depth", "--batch-size", "1", "--image-size", "4", "--strategies", "naive", "--depth-limit", "16"],
         "--image-size 4 is too small for DenseNet-BC at --batch-size 1"),
        (["ablate", "--batch-sizes", "4,1", "--image-size", "4", "--depths", "10", "--estimate", "--no-progress"],
         "--image-size 4 is too small for DenseNet-BC at --batch-sizes 1"),
        (["train", "--model", "densenet121", "--image-size", "32", "--batch-size", "1", "--subset", "2",
          "--test-subset", "2", "--epochs", "1", "--no-progress"],
         "--image-size 32 is too small for densenet121 at --batch-size 1"),
        # below the size every stage needs: the batch-1 need, and the size a larger batch would take
        (["max-depth", "--batch-size", "1", "--image-size", "2", "--strategies", "naive", "--depth-limit", "16"],
         "--image-size 2 is too small for DenseNet-BC at --batch-size 1: it needs at least 8 (at least 4 with a batch"),
    ],
    ids=["bench", "summary", "max-depth", "ablate", "train", "max-depth-below-every-stage"],
)
def test_batch_of_one_needs_maps_larger_than_one_pixel(capsys, tmp_path, argv, fragment):
    """A training-mode BatchNorm needs more than one value per channel (batch x height x width); at batch 1
    the last dense block must see maps larger than 1x1. Before: every row or estimate failed on its own with
    PyTorch's "Expected more than 1 value per channel when training" and exit code 0 (train: a traceback)."""
    out_option = "--out-dir" if argv[0] == "train" else "--out"
    code, _, err = run(capsys, *argv, out_option, str(tmp_path / "out"))
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"effdense {argv[0]}: error: {fragment}"), err
    if "it needs at least" not in fragment:
        assert "use --image-size" in err and "or a batch of 2 or more" in err, err
    if argv[0] != "train":  # train creates its --out-dir before loading the data the model is built for
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["densenet_bc_10", "densenet121"])
@pytest.mark.parametrize("batch", [1, 2])
def test_min_image_size_is_where_a_training_step_starts_to_work(name, batch):
    from effdense.benchutil import min_image_size
    from effdense.memory import estimate_step

    model = effdense.get_model(name, strategy="naive")
    need = min_image_size(model, batch)
    assert need == {("densenet_bc_10", 1): 8, ("densenet_bc_10", 2): 4, ("densenet121", 1): 61, ("densenet121", 2): 29}[name, batch]
    assert min_image_size(model) == model.min_input_size()  # no training step: the pixel rule only
    estimate_step(name, (batch, 3, need, need), strategy="naive", backend="meta")  # the step runs
    with pytest.raises(ValueError):  # one pixel less: BatchNorm's or the model's own input check refuses it
        estimate_step(name, (batch, 3, need - 1, need - 1), strategy="naive", backend="meta")


def test_summary_without_memory_takes_a_one_pixel_last_block(capsys, tmp_path):
    # --no-memory runs one image in eval mode only: no training-mode BatchNorm, so 32x32 is enough for densenet121
    code, _, err = run(capsys, "summary", "densenet121", "--no-memory", "--image-size", "32", "--out", str(tmp_path))
    assert code == 0, err


@pytest.mark.parametrize("extra", [["--memory", "estimate"], ["--no-timing"]], ids=["estimate", "no-timing"])
def test_bench_records_that_nothing_was_timed(capsys, tmp_path, extra):
    # before: "timing": true, "steps": 3, "warmup": 0, "max_seconds_per_row": 3.0 in the meta and every row
    code, _, err = run(capsys, "bench", "--model", "densenet_bc_10", "--batch-size", "2", "--image-size", "8",
                       "--strategies", "naive", "--no-reference", "--device", "cpu", *extra, "--out", str(tmp_path))  # fmt: skip
    assert code == 0, err
    (json_path,) = tmp_path.glob("*.json")
    payload = json.loads(json_path.read_text())
    for record in (payload["meta"], *payload["rows"]):
        assert record["timing"] is False
        assert record["steps"] is None and record["warmup"] is None and record["max_seconds_per_row"] is None
    with open(json_path.with_suffix(".csv")) as f:
        (row,) = list(csv.DictReader(f))
    assert row["status"] == "ok" and row["peak_mib"] and not any(row[c] for c in ("time_ms", "timed_steps", "time_ratio"))


@_OUT_WRITERS
def test_empty_out_is_a_usage_error(capsys, tmp_path, monkeypatch, argv):
    # before: Path("") is ".", so the results went into the current directory
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, *argv, "--out", "")
    assert code == 2 and err == f"effdense {argv[0]}: error: argument --out: empty path ''; give a folder, " \
        "e.g. effdense_results (or . for the current one)\n", err
    assert not list(tmp_path.iterdir())


def test_version(capsys):
    code, out, err = run(capsys, "--version")
    assert code == 0 and out == f"effdense {effdense.__version__}\n" and not err
    # the version is written once, in effdense/__init__.py: pyproject.toml reads it from there for the package
    # metadata (before, it was written in both); the installed metadata says the same
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    try:
        import tomllib  # (Python 3.11+)
    except ImportError:
        tomllib = None
    if pyproject.is_file() and tomllib is not None:  # (a checkout or an unpacked sdist)
        project = tomllib.loads(pyproject.read_text())
        assert "version" in project["project"]["dynamic"] and "version" not in project["project"]
        assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "effdense.__version__"}
    import importlib.metadata

    try:
        installed = importlib.metadata.version("effdense")
    except importlib.metadata.PackageNotFoundError:  # (run from a checkout that was not installed)
        installed = effdense.__version__
    assert installed == effdense.__version__


def test_budget_takes_float_syntax(capsys, tmp_path):
    # before: "cannot parse memory size '1e-3GiB'" (the exponent could not be negative)
    code, _, err = run(capsys, "max-depth", "--budget", "1e-3GiB", "--batch-size", "1", "--strategies", "naive",
                       "--depth-limit", "10", "--out", str(tmp_path))  # fmt: skip
    assert code == 0, err
    assert json.loads(next(tmp_path.glob("*.json")).read_text())["meta"]["budget_bytes"] == 1073741


@pytest.mark.parametrize(
    "option, value, fragment",
    [
        # before: the empty item was dropped (depths 16 and 22; naive alone), and --vary "" meant "vary nothing",
        # while --strategies "" was refused
        ("--depths", "16,,22", "argument --depths: empty item in the comma list '16,,22'"),
        ("--strategies", "naive,", "argument --strategies: empty item in the comma list 'naive,'"),
        ("--dtypes", ",fp32", "argument --dtypes: empty item"),
        ("--vary", "", "argument --vary: no Policy field in ''"),
    ],
)
def test_empty_values_in_ablate_lists_are_refused(capsys, tmp_path, option, value, fragment):
    argv = {"--depths": "10", "--strategies": "shared", "--dtypes": "fp32", "--batch-sizes": "2", "--image-size": "8"}
    argv[option] = value
    code, _, err = run(capsys, "ablate", *[x for kv in argv.items() for x in kv], "--estimate", "--no-progress", "--no-plots",
                       "--out", str(tmp_path / "out"))  # fmt: skip
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"effdense ablate: error: {fragment}"), err
    assert not (tmp_path / "out").exists()


def test_reference_chooses_the_torchvision_rows(capsys, tmp_path):
    code, _, err = run(capsys, "bench", "--model", "densenet_bc_10", "--batch-size", "2", "--memory", "estimate",
                       "--strategies", "naive", "--reference", "memory_efficient", "--out", str(tmp_path))  # fmt: skip
    assert code == 0, err
    payload = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert [r["row"] for r in payload["rows"]] == ["effdense naive", "torchvision memory_efficient"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--reference", "plain,bogus"], "unknown torchvision row 'bogus'"),
        (["--reference", ","], "no torchvision row"),
        (["--reference", "plain", "--no-reference"], "--reference and --no-reference contradict"),
        (["--reference", "compile", "--device", "cpu"], "on a GPU only"),
    ],
)
def test_reference_usage_errors(capsys, tmp_path, argv, message):
    code, _, err = run(capsys, "bench", "--model", "densenet_bc_10", "--batch-size", "2", "--memory", "estimate",
                       "--strategies", "naive", *argv, "--out", str(tmp_path))  # fmt: skip
    assert code == 2 and message in err, err


@pytest.mark.parametrize("case", ["no-torchvision", "inexpressible"])
def test_torchvision_rows_that_cannot_run_are_listed_with_the_reason(capsys, tmp_path, monkeypatch, case):
    """Without torchvision an ImageNet model's rows failed ("the model builder returned a NoneType") and a CIFAR
    model's vanished, as did every model torchvision's class cannot express (no bottleneck), silently, even
    when named by --reference. They are skipped rows with the reason now, and --reference is refused."""
    model = "densenet_bc_10" if case == "no-torchvision" else "densenet_13"
    if case == "no-torchvision":
        monkeypatch.setitem(sys.modules, "torchvision", None)  # (import torchvision raises ImportError)
    common = ["bench", "--model", model, "--batch-size", "2", "--memory", "estimate", "--strategies", "naive"]
    code, _, err = run(capsys, *common, "--out", str(tmp_path))
    assert code == 0, err
    rows = json.loads(next(tmp_path.glob("*.json")).read_text())["rows"]
    assert [(r["row"], r["status"]) for r in rows] == [
        ("effdense naive", "ok"), ("torchvision", "skipped"), ("torchvision memory_efficient", "skipped")
    ]
    reason = "not installed" if case == "no-torchvision" else "cannot express this model"
    assert all(reason in r["note"] for r in rows[1:]), rows
    code, _, err = run(capsys, *common, "--reference", "plain", "--out", str(tmp_path / "ref"))
    assert code == 2 and reason in err and not (tmp_path / "ref").exists(), err


def test_ablate_without_matplotlib_says_so_before_running(capsys, tmp_path, monkeypatch):
    """It ran the whole grid, wrote the CSV, then ended in a ModuleNotFoundError traceback from the plots."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    argv = ["ablate", "--strategies", "naive", "--depths", "10,16", "--batch-sizes", "2", "--estimate"]
    code, _, err = run(capsys, *argv, "--out", str(tmp_path / "a"))
    assert code == 2 and "pip install 'effdense[plot]'" in err and "--no-plots" in err, err
    assert not (tmp_path / "a" / "ablate.csv").exists()
    code, _, err = run(capsys, *argv, "--no-plots", "--out", str(tmp_path / "b"))
    assert code == 0 and (tmp_path / "b" / "ablate.csv").exists(), err


def test_bench_compiled_low_precision_rows_enter_autocast_inside_the_compiled_call():
    """`effdense bench --compile --dtype bf16` (GPU suite): each compiled row's step ran under an autocast
    entered around the compiled model, where dynamo fails on the shared/fused Function. The rows now compile a
    model that enters autocast itself, and step it without one (checked here on CPU with shared)."""
    from effdense.bench import _compiled
    from effdense.benchutil import AutocastInside
    from effdense.memory import training_step

    torch.manual_seed(0)
    model = _compiled(effdense.get_model("densenet_bc_10", strategy="shared"), "bf16")
    assert isinstance(model._orig_mod, AutocastInside)
    x = torch.randn(2, 3, 16, 16)
    training_step(model, x, loss="sum")  # as _run_row steps it: autocast_dtype=None
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model(x).dtype == torch.bfloat16  # autocast ran inside
    assert not isinstance(_compiled(effdense.get_model("densenet_bc_10"), "fp32")._orig_mod, AutocastInside)


def test_summary_runs_at_other_settings_do_not_overwrite_each_other(capsys, tmp_path):
    # before: every run wrote summary_<model>.json, so a run at another image size, batch or dtype replaced
    # the last one's file (whose numbers then no longer matched the command that a reader reran)
    runs = [
        ("--no-memory",),
        ("--no-memory", "--image-size", "64"),
        ("--strategies", "naive", "--batch-size", "2"),
        ("--strategies", "naive", "--batch-size", "3"),
    ]
    for extra in runs:
        code, _, err = run(capsys, "summary", "densenet_bc_10", *extra, "--out", str(tmp_path))
        assert code == 0, err
    names = sorted(p.name for p in tmp_path.glob("summary_*.json"))
    assert names == [
        "summary_densenet_bc_10_32px_b2_fp32_naive.json", "summary_densenet_bc_10_32px_b3_fp32_naive.json",
        "summary_densenet_bc_10_32px_nomemory.json", "summary_densenet_bc_10_64px_nomemory.json",
    ]
    meta = json.loads((tmp_path / "summary_densenet_bc_10_64px_nomemory.json").read_text())["meta"]
    assert meta["image_size"] == 64 and meta["memory"] is False and "batch_size" not in meta


def test_recorded_command_line_is_what_a_user_types_again():
    # before: `python -m effdense.cli bench ...` (how benchmarks/gpu_suite.sh runs the CLI) was recorded as
    # "/abs/path/effdense/cli.py bench ...", a command that does not reproduce the run
    from effdense.benchutil import command_line

    cli_path = str(Path(effdense.__file__).parent / "cli.py")
    assert command_line([cli_path, "bench", "--steps", "2"]) == "python -m effdense.cli bench --steps 2"
    assert command_line(["/venv/bin/effdense", "summary", "densenet121"]) == "effdense summary densenet121"
    main_path = str(Path(effdense.__file__).parent / "__main__.py")  # python -m effdense (before: python .../__main__.py)
    assert command_line([main_path, "ablate", "--depths", "10"]) == "python -m effdense ablate --depths 10"
    assert command_line(["benchmarks/bench_kernels.py", "--quick"]) == "python benchmarks/bench_kernels.py --quick"


def test_bench_memory_columns_add_up_to_the_peak(capsys, tmp_path):
    # before: grads_mib was every gradient at the end of the step while activations_mib took out only those
    # live at the peak, so the columns summed to more than peak_mib and the figure that closed it was missing
    code, _, err = run(capsys, "bench", "--model", "densenet_bc_10", "--batch-size", "2", "--memory", "estimate",
                       "--strategies", "naive,shared,fused", "--no-reference", "--out", str(tmp_path))  # fmt: skip
    assert code == 0, err
    with open(next(tmp_path.glob("*.csv"))) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3
    # an estimate runs no kernel: no note on what fused's kernels run as (before: "CPU: PyTorch twins ...")
    assert [r["note"] for r in rows if r["row"] == "effdense fused"] == [""]
    for r in rows:
        parts = ("params_mib", "buffers_mib", "input_mib", "grads_at_peak_mib", "activations_mib")
        assert abs(sum(float(r[c]) for c in parts) - float(r["peak_mib"])) < 1e-6, r
        assert float(r["grads_at_peak_mib"]) <= float(r["grads_mib"])


def test_git_commit_tells_two_sets_of_edits_apart(monkeypatch):
    # before: any dirty tree was "<commit>+dirty", so ablate took rows measured with other edits for this code's
    import subprocess as sp

    from effdense import benchutil

    monkeypatch.delenv("GIT_COMMIT", raising=False)
    diffs = {"text": b""}

    def fake_run(argv, **kwargs):
        out = "abc123\n" if argv[1] == "rev-parse" else diffs["text"]
        return sp.CompletedProcess(argv, 0, stdout=out, stderr="")

    monkeypatch.setattr(benchutil.subprocess, "run", fake_run)
    assert benchutil.git_commit() == "abc123"
    diffs["text"] = b"--- a/x\n+++ b/x\n+one edit\n"
    first = benchutil.git_commit()
    diffs["text"] = b"--- a/x\n+++ b/x\n+another edit\n"
    second = benchutil.git_commit()
    assert first.startswith("abc123+dirty.") and second.startswith("abc123+dirty.") and first != second


def test_git_commit_of_an_installed_copy_inside_another_repository_is_the_version(tmp_path, monkeypatch):
    """A wheel install whose site-packages lies inside another project's git repository (a venv in the
    project): the commit recorded was that project's, and ablate's reruns took it for effdense's code."""
    import shutil
    import subprocess as sp

    import effdense.kernels

    repo = tmp_path / "userproject"
    site = repo / "venv" / "site-packages"
    shutil.copytree(Path(effdense.__file__).parent, site / "effdense", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(Path(effdense.kernels.__file__).parent, site / "effdense" / "kernels",
                    ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)  # fmt: skip
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    sp.run([*git, "init", "-q", str(repo)], check=True)
    sp.run([*git, "-C", str(repo), "add", "-A"], check=True)
    sp.run([*git, "-C", str(repo), "commit", "-qm", "user project"], check=True)
    monkeypatch.delenv("GIT_COMMIT", raising=False)
    out = sp.run([sys.executable, "-c", "import effdense.benchutil as b, effdense; print(b.git_commit(), effdense.__file__)"],
                 cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(site)}, capture_output=True, text=True, check=True)  # fmt: skip
    commit, where = out.stdout.split()
    assert where.startswith(str(site)), where
    assert commit == f"effdense-{effdense.__version__}"


def test_result_files_are_replaced_whole(tmp_path):
    """The benchmarks rewrite their JSON/CSV after each row (a GPU-suite step cut by its time limit keeps what it
    measured): a write replaces the file at once, and a failed one leaves the old file and no temporary."""
    from effdense.benchutil import write_csv, write_json

    path = tmp_path / "r.json"
    write_json(path, {"rows": [1]})
    with pytest.raises(ValueError):
        write_json(path, {"rows": [2], "bad": _Unserialisable()})
    assert json.loads(path.read_text()) == {"rows": [1]}
    write_csv(tmp_path / "r.csv", [{"a": 1, "b": 2}], ["a", "b"])
    with pytest.raises(ValueError):
        write_csv(tmp_path / "r.csv", [{"a": 3, "b": 4}, {"a": 5, "b": _Unserialisable()}], ["a", "b"])
    assert (tmp_path / "r.csv").read_text() == "a,b\n1,2\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.csv", "r.json"]


class _Unserialisable:
    def __str__(self) -> str:
        raise ValueError("cannot be written")


def test_summary_memory_parts_add_up_and_a_failed_strategy_exits_1(capsys, tmp_path, monkeypatch):
    """A strategy whose estimate failed was a bare "error: MemoryError" and the run exited 0; the parts written
    (activations, params+grads at peak) did not add up to the peak (buffers and input were left out)."""
    from effdense import summary

    code, out, err = run(capsys, "summary", "densenet_bc_16", "--batch-size", "2", "--out", str(tmp_path))
    assert code == 0, err
    assert "convolutions and linear layers only" in out
    rows = json.loads(next(tmp_path.glob("summary_*.json")).read_text())["memory"]
    for r in rows:
        parts = r["activations_mib"] + r["params_grads_at_peak_mib"] + r["buffers_input_mib"]
        assert abs(parts - r["peak_mib"]) < 1e-9, r
    real = summary.estimate_step

    def failing(model, shape, strategy, **kwargs):
        if strategy == "checkpoint":
            raise MemoryError("simulated")
        return real(model, shape, strategy=strategy, **kwargs)

    monkeypatch.setattr(summary, "estimate_step", failing)
    code, _, err = run(capsys, "summary", "densenet_bc_16", "--batch-size", "2", "--out", str(tmp_path / "f"))
    assert code == 1 and "1 of 4 strategies failed (checkpoint)" in err, err
    (row,) = [r for r in json.loads(next((tmp_path / "f").glob("*.json")).read_text())["memory"] if r["status"] != "ok"]
    assert row == {"strategy": "checkpoint", "status": "error", "note": "MemoryError: simulated"}
