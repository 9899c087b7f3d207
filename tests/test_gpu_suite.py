"""benchmarks/gpu_suite.sh's plumbing, in its CPU dry run (``--allow-cpu``): the one command a lent GPU machine
runs, whose failures cost GPU minutes. The steps themselves are the benchmarks' and tests' own; here, what the
script does around them: its output folder, its record of every step, and how it stops."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SUITE = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_suite.sh"

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="a bash script")


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHON": sys.executable, **extra}


def _steps(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "steps.tsv") as f:
        return {row["step"]: row for row in csv.DictReader(f, delimiter="\t")}


def test_dry_run_records_every_step_in_a_relative_out_of_the_callers(tmp_path) -> None:
    # a relative OUT was taken from the repository root (results written into the source tree), and the dry
    # run's steps with no tiny version (the compile bench, the slow CUDA tests) were missing from steps.tsv
    run = subprocess.run(
        ["bash", str(SUITE), "--allow-cpu"], cwd=tmp_path, env=_env(OUT="out", SUITE_STEPS="bench_kernels,tests_cuda_slow"),
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    steps = _steps(tmp_path / "out")
    assert steps["environment"]["status"] == steps["bench_kernels"]["status"] == "ok"
    assert steps["tests_cuda_slow"]["status"] == "skipped" and steps["tests_cuda_slow"]["command"] == "(no dry-run step)"
    assert steps["host_overhead"]["status"] == "skipped"  # not selected
    assert (tmp_path / "out" / "environment.json").is_file() and (tmp_path / "out" / "summary.json").is_file()


def _running_with(text: str) -> list[int]:
    """Processes whose command line holds ``text``."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and text in (proc / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["INT", "TERM"])
def test_a_signal_to_the_process_group_stops_the_running_step_and_the_suite(tmp_path, sig, code) -> None:
    # timeout put each step in a process group of its own, which a terminal's Ctrl-C (SIGINT to the foreground
    # group) did not reach, and bash deferred its own handling to the end of the step: the suite ran on through
    # every later step; a TERM to the group (an outer timeout) left the step running after the suite had ended
    out = tmp_path / "out"
    proc = subprocess.Popen(
        ["bash", str(SUITE), "--allow-cpu"], cwd=tmp_path, env=_env(OUT=str(out), SUITE_STEPS="tests_kernels_shared,host_overhead"),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        log = out / "tests_kernels_shared.log"
        while not (log.is_file() and log.stat().st_size > 0):  # the step has started (pytest is writing)
            assert proc.poll() is None and time.monotonic() < deadline, "the step did not start"
            time.sleep(0.5)
        os.killpg(proc.pid, sig)  # as a terminal's Ctrl-C: to the whole foreground process group
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == code, err
    assert f"interrupted by {sig.name} during step tests_kernels_shared" in err
    steps = _steps(out)
    assert steps["tests_kernels_shared"]["status"] == "interrupted"
    assert "host_overhead" not in steps  # the later step did not run
    # the step's processes (its junit path names them) ended before the suite did: it waits for its step
    assert not _running_with(str(out / "pytest_kernels_shared.xml"))
