#!/usr/bin/env bash
# One-command GPU suite: environment, CUDA tests, kernel benchmark, effdense bench (DenseNet-BC-100 fp32 and
# DenseNet-121 b64 224px bf16), memory estimate vs torch.cuda.max_memory_allocated, the DenseNet-121 step
# replayed from a CUDA graph (its host overhead) and checked against eager steps, a profile of where the eager
# step's host time goes, and operators per step with each kernel call's host time.
#
#   bash benchmarks/gpu_suite.sh                  # on a CUDA machine, effdense installed (pip install -e .)
#   OUT=/some/dir GIT_COMMIT=abc123 bash benchmarks/gpu_suite.sh
#   OUT=/tmp/gpu ARCHIVE=/keep/gpu.tgz bash benchmarks/gpu_suite.sh   # also everything in one .tgz
#   bash benchmarks/gpu_suite.sh --allow-cpu      # dry run without a GPU: every step on tiny settings
#
# Everything goes under $OUT (relative: to the calling folder), a new or empty folder (default benchmarks/results/gpu-<device-slug>/<date>_<commit>/;
# a folder holding an earlier run's files is refused, so that no stale result sits beside this run's): environment.json, one
# <step>.log per step, pytest junit XML, the benchmarks' JSON/CSV, and steps.tsv / summary.json with each
# step's exit code and duration. A failing step does not stop the others; the script exits 1 at the end if
# any step failed (2 for a usage error or no GPU). Each step runs under `timeout`, and all of them share a
# budget of $SUITE_BUDGET_S seconds (default 540, so the suite ends inside a 10-minute session; 551 s with
# SUITE_BUDGET_S=550 on an H200 at 3d264cc; 1800 for the dry run): a step left without time is recorded as
# not_run. Ctrl-C (or TERM) stops the running step, records it as interrupted and ends the suite (exit 130/143). ARCHIVE: a
# .tgz path to pack $OUT into at the end, for machines that return few files. No network access is needed.
# GIT_COMMIT names the commit recorded (else .git's, else "unknown"). PYTHON: the interpreter (default python),
# whose effdense must be this checkout's (pip install -e .; checked). SUITE_WORKERS: pytest-xdist processes for
# the CUDA test steps (default 8, when xdist is importable). SUITE_STEPS: a comma-separated list of step names
# (as in steps.tsv, e.g. tests_cuda,bench_kernels) to run, the others recorded as skipped (default: every step;
# environment always runs); a lease too short for the whole suite runs part of it and another lease the rest (a
# second lease does not know that the first turned the direct launch off: include tests_direct_launch in each).
set -euo pipefail
SUITE_START=$SECONDS  # (here, before the pre-checks below: they are in the budget too)
# a relative OUT or ARCHIVE is the caller's, not the checkout's (they were taken from the repository root)
CALLER_DIR=$(pwd)
for var in OUT ARCHIVE; do
    if [ -n "${!var:-}" ] && [ "${!var#/}" = "${!var}" ]; then
        printf -v "$var" '%s/%s' "$CALLER_DIR" "${!var}"
    fi
done
cd "$(dirname "$0")/.."

usage() { awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"; }  # (the whole header)

ALLOW_CPU=0
while [ $# -gt 0 ]; do
    case "$1" in
        --allow-cpu) ALLOW_CPU=1 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "gpu_suite.sh: error: unknown argument '$1' (expected --allow-cpu or --help)" >&2; exit 2 ;;
    esac
    shift
done

PY=${PYTHON:-python}
if ! "$PY" -c "import effdense, torch" 2>/dev/null; then
    echo "gpu_suite.sh: error: '$PY' cannot import effdense and torch; install with" \
        "'$PY -m pip install --no-deps --no-build-isolation -e .' or set PYTHON=/path/to/python" >&2
    exit 2
fi
# the effdense that runs must be this checkout's: the suite records this checkout's commit, and its CLI steps
# (python -m, from here) would import this tree's effdense/ while the scripts (python benchmarks/x.py) import the
# installed one, mixing two trees under one commit
WHERE=$("$PY" -c "import os, effdense, effdense.kernels as k; print(os.path.dirname(os.path.dirname(os.path.realpath(effdense.__file__))), os.path.dirname(os.path.realpath(k.__file__)), sep='|')" 2>&1 | tail -n 1) || WHERE="|"
if [ "${WHERE%%|*}" != "$(pwd -P)" ] || [ "${WHERE#*|}" != "$(pwd -P)/kernels" ]; then
    echo "gpu_suite.sh: error: '$PY' imports effdense (and effdense.kernels) from '${WHERE%%|*}' ('${WHERE#*|}'), not from" \
        "this checkout ($(pwd -P)); install it with '$PY -m pip install --no-deps --no-build-isolation -e .'" >&2
    exit 2
fi
# the console script may belong to another interpreter than $PY (seen on a GPU machine: its `effdense` ran a
# Python without torch), so the CLI runs as a module of the interpreter checked above
EFFDENSE=("$PY" -m effdense.cli)

HAS_CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))")
if [ "$HAS_CUDA" != 1 ]; then
    if [ "$ALLOW_CPU" != 1 ]; then
        echo "gpu_suite.sh: error: no CUDA device (torch.cuda.is_available() is False); this suite tests and" \
            "times the GPU paths. Run it on a CUDA machine, or pass --allow-cpu for a dry run on tiny settings." >&2
        exit 2
    fi
    MODE=dry-run
else
    MODE=gpu
fi

SLUG=$("$PY" -c "
import re, torch
name = torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu-dry-run'
print(re.sub(r'[^a-z0-9]+', '-', name.lower()).strip('-'))")
# (a dry run on a 2-core CPU needs ~30 min for its steps: no lease to end inside there)
BUDGET=${SUITE_BUDGET_S:-$([ "$MODE" = gpu ] && echo 540 || echo 1800)}
if ! [[ "$BUDGET" =~ ^[0-9]+$ ]] || [ "$BUDGET" -eq 0 ]; then
    echo "gpu_suite.sh: error: SUITE_BUDGET_S must be a positive number of seconds, got '$BUDGET'" >&2
    exit 2
fi
BUDGET=$((10#$BUDGET))  # (a leading zero is not octal: "090" was an arithmetic error, every step dropped)
if [ -n "${SUITE_WORKERS:-}" ] && { ! [[ "$SUITE_WORKERS" =~ ^[0-9]+$ ]] || [ "$((10#$SUITE_WORKERS))" -eq 0 ]; }; then
    echo "gpu_suite.sh: error: SUITE_WORKERS must be a positive number of pytest processes, got '$SUITE_WORKERS'" >&2
    exit 2
fi
if [ -z "${GIT_COMMIT:-}" ]; then
    GIT_COMMIT=$(git rev-parse HEAD 2>/dev/null || echo unknown)
    [ "$GIT_COMMIT" != unknown ] && ! git diff --quiet HEAD 2>/dev/null && GIT_COMMIT="$GIT_COMMIT+dirty"
fi
export GIT_COMMIT  # effdense and bench_kernels.py record it (it takes precedence over .git)
OUT=${OUT:-benchmarks/results/gpu-$SLUG/$(date -u +%Y-%m-%d)_${GIT_COMMIT:0:7}}
if [ -e "$OUT" ] && ! [ -d "$OUT" ]; then
    echo "gpu_suite.sh: error: OUT=$OUT is a file, not a folder" >&2
    exit 2
fi
if [ -d "$OUT" ] && [ -n "$(ls -A "$OUT")" ]; then
    echo "gpu_suite.sh: error: OUT=$OUT already holds files (an earlier run's results would sit beside this run's," \
        "under its environment.json and steps.tsv); give a new or empty folder" >&2
    exit 2
fi
if ! mkdir -p "$OUT" 2>/dev/null; then
    echo "gpu_suite.sh: error: cannot create the OUT folder $OUT" >&2
    exit 2
fi
OUT=$(cd "$OUT" && pwd)
# pytest-xdist (when importable, on a GPU): the CUDA test steps spread their tests over $SUITE_WORKERS processes.
# Their time is Triton compiling each test's kernels on the host, one after another: at 1a95410 on a fresh H100
# 88 of 126 CUDA tests ran in 180 s on one of its 16 cores. The processes share the GPU (each test is small).
XDIST=()
if [ "$MODE" = gpu ] && "$PY" -c "import xdist" 2>/dev/null; then
    XDIST=(-n "${SUITE_WORKERS:-8}")
fi

ALL_STEPS="environment tests_direct_launch bench_densenet121_bf16 step_graph_time bench_kernels tests_cuda
bench_fused_compile bench_densenet_bc_100 host_overhead tests_cuda_graph profile_step estimate_vs_cuda tests_cuda_slow
tests_kernels_shared"
set -f  # (SUITE_STEPS names steps, not files: no glob expansion below)
SELECTED=" $(printf '%s ' ${SUITE_STEPS:-$ALL_STEPS} | tr ',' ' ') environment "  # (environment.json: always)
if [ -n "${SUITE_STEPS:-}" ] && [ -z "$(printf '%s' "$SUITE_STEPS" | tr -d ' ,')" ]; then
    echo "gpu_suite.sh: error: SUITE_STEPS='$SUITE_STEPS' names no step" >&2
    exit 2
fi
for name in $SELECTED; do
    if ! [[ " $(echo $ALL_STEPS) " == *" $name "* ]]; then
        echo "gpu_suite.sh: error: SUITE_STEPS names '$name', not a step of this suite (steps: $(echo $ALL_STEPS | tr ' ' ','))" >&2
        exit 2
    fi
done
set +f

echo "gpu_suite.sh: $MODE on $SLUG, commit $GIT_COMMIT, writing to $OUT (budget ${BUDGET}s; pytest ${XDIST[*]:-without xdist})"
printf 'step\texit_code\tseconds\tstatus\tcommand\n' >"$OUT/steps.tsv"
FAILED=()
STEP_PID=

# ARCHIVE: $OUT packed into one .tgz (also after an interruption, whose partial results are the ones wanted)
pack_archive() {
    [ -n "${ARCHIVE:-}" ] || return 0
    mkdir -p "$(dirname "$ARCHIVE")"
    if tar czf "$ARCHIVE" -C "$(dirname "$OUT")" "$(basename "$OUT")"; then
        echo "gpu_suite.sh: packed $OUT into $ARCHIVE"
    else
        echo "gpu_suite.sh: error: could not pack $OUT into $ARCHIVE" >&2
        return 1
    fi
}

write_summary() {
    "$PY" - "$OUT" "$MODE" "$((SECONDS - SUITE_START))" <<'EOF'
import csv, json, sys
out, mode, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3])
with open(f"{out}/steps.tsv") as f:
    steps = list(csv.DictReader(f, delimiter="\t"))
with open(f"{out}/summary.json", "w") as f:
    json.dump({"mode": mode, "seconds": seconds,
               "failed": [s["step"] for s in steps if s["status"] not in ("ok", "skipped")],
               "skipped": [s["step"] for s in steps if s["status"] == "skipped"], "steps": steps}, f, indent=2)
EOF
}

# Ctrl-C or a TERM: stop the running step (its `timeout` passes the signal on to the step's process group),
# record it as interrupted, write summary.json and exit 130 (143 for TERM)
on_signal() {
    trap - INT TERM
    local sig=$1 code=$2 kids
    if [ -n "$STEP_PID" ]; then
        kids=$(pgrep -P "$STEP_PID" 2>/dev/null || cat /proc/"$STEP_PID"/task/*/children 2>/dev/null || true)
        if [ -n "$kids" ]; then kill -"$sig" $kids 2>/dev/null || true; fi
        wait "$STEP_PID" 2>/dev/null || true
        printf '%s\t%s\t%s\t%s\t%s\n' "$STEP_NAME" "$code" "$((SECONDS - STEP_START))" interrupted "$STEP_CMD" >>"$OUT/steps.tsv"
        echo "gpu_suite.sh: interrupted by SIG$sig during step $STEP_NAME; the later steps did not run; results so far in $OUT" >&2
    else
        echo "gpu_suite.sh: interrupted by SIG$sig; the later steps did not run; results so far in $OUT" >&2
    fi
    write_summary || true
    pack_archive || true
    exit "$code"
}
trap 'on_signal INT 130' INT
trap 'on_signal TERM 143' TERM

# step NAME LIMIT_S CMD...: run CMD under `timeout` (at most what is left of the budget), log to NAME.log,
# record its exit code; never stops the suite.
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - (SECONDS - SUITE_START) - 10))  # (10 s: timeout's --kill-after fits in the budget)
    # a step is started with at least a third of its own limit (or 30 s) left: cut to the 9-14 s left at the end of
    # earlier runs, the compile bench and the slow tests could only time out, holding the machine for nothing
    local least=$((limit / 3 < 30 ? limit / 3 : 30))
    local start=$SECONDS rc status=
    if [[ "$SELECTED" != *" $name "* ]]; then
        printf '%s\t\t0\tskipped\t%s\n' "$name" "$*" >>"$OUT/steps.tsv"
        return 0
    fi
    if [ "$left" -lt "$limit" ]; then limit=$left; fi
    echo
    echo "== [$name] $* (limit ${limit}s, $((SECONDS - SUITE_START))s into the suite)"
    if [ "$limit" -le 5 ] || [ "$limit" -lt "$least" ]; then
        rc=125 status=not_run
        echo "too little time left in the suite budget (${BUDGET}s) for this step; not run" | tee "$OUT/$name.log"
    else
        # in the background, waited for: bash runs the INT/TERM trap (on_signal) at once during a `wait`, where a
        # foreground pipeline deferred it, and `timeout` puts its step in a process group of its own, which a
        # terminal's Ctrl-C does not reach (the suite ran on, every later step too, and exited 0)
        set +e
        (
            # (the subshell and tee outlive a TERM or INT sent to the suite's whole process group, where `timeout`
            # and its step are not: on_signal then still finds timeout here and stops the step through it)
            trap '' INT TERM
            timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
            exit "${PIPESTATUS[0]}"
        ) <&0 &  # (<&0: a background command's stdin is /dev/null otherwise, and the environment step reads its script there)
        STEP_PID=$! STEP_NAME=$name STEP_START=$start STEP_CMD="$*"
        wait "$STEP_PID"
        rc=$?
        STEP_PID=
        set -e
    fi
    case $status$rc in
        0) status=ok ;;
        124 | 137) status=timeout ;;
        not_run*) ;;
        *) status=failed ;;
    esac
    [ "$rc" -eq 0 ] || FAILED+=("$name")
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" "$status" "$*" >>"$OUT/steps.tsv"
    echo "== [$name] $status (exit $rc, $((SECONDS - start))s)"
}

# (a) where and with what
step environment 60 "$PY" - "$OUT/environment.json" "$MODE" <<'EOF'
import datetime, json, os, platform, subprocess, sys
import torch
try:
    import triton
    triton_version = triton.__version__
except ImportError:
    triton_version = None
try:
    import torchvision
    tv_version = torchvision.__version__
except ImportError:
    tv_version = None
import effdense
from effdense.benchutil import git_commit

env = {
    "mode": sys.argv[2],
    "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "git_commit": git_commit(),
    "effdense": effdense.__version__,
    "strategies_available": list(effdense.available_strategies()),
    "python": platform.python_version(),
    "platform": platform.platform(),
    "torch": torch.__version__,
    "torchvision": tv_version,
    "triton": triton_version,
    "cuda": torch.version.cuda,
    "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
    "cpu_threads": torch.get_num_threads(),
    "devices": [],
}
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        env["devices"].append({"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
                               "memory_mib": p.total_memory // 2**20, "multiprocessors": p.multi_processor_count})
    try:
        env["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit", "--format=csv"],
            capture_output=True, text=True, timeout=20).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        env["nvidia_smi"] = None
with open(sys.argv[1], "w") as f:
    json.dump(env, f, indent=2)
print(json.dumps(env, indent=2))
EOF

if [ "$MODE" = gpu ]; then
    # Order: the fused issue's figures first (the kernel bench among them), then the CUDA tests (-v names each
    # result: at 4c8a7e5 they named a TF32 tolerance failure, perhaps d837e33's unnamed one), then what was never recorded, in case the budget runs out (at
    # d837e33 the fused compile row was still compiling after 150 s, the BC-100 bench's fused row tuning after
    # 120 s; host_overhead.py had 40 s). A fresh machine
    # autotunes every kernel shape in the first fused step: on an H200 (commit 31de30d, Triton's default
    # tuning time) the DenseNet-121 fused row alone did not finish in 170 s.
    # the direct launch of compiled kernels (on by default since 929b8f3): each kernel's results through it
    # against Triton's launch path. First, since every step below runs through it: if a test fails (pytest exits
    # 1), they run with it off (EFFDENSE_DIRECT_LAUNCH=0; the file DIRECT_LAUNCH_OFF says so). A timeout does not
    # switch it off: at 1a95410 on a fresh H100 the 12 tests ran out of 60 s compiling (all passed in 36 s on the
    # same machine later), and the suite ran with the direct launch off for nothing. 120 s
    step tests_direct_launch 120 env EFFDENSE_AUTOTUNE=0 "$PY" -m pytest "${XDIST[@]}" tests/test_kernels.py -v -k "direct_launch" \
        --junitxml="$OUT/pytest_direct_launch.xml"
    if [ "$(tail -n 1 "$OUT/steps.tsv" | cut -f2)" = 1 ]; then
        echo "gpu_suite.sh: a direct-launch test failed: the steps below run with EFFDENSE_DIRECT_LAUNCH=0"
        export EFFDENSE_DIRECT_LAUNCH=0
        echo "tests_direct_launch failed: the later steps ran with EFFDENSE_DIRECT_LAUNCH=0" >"$OUT/DIRECT_LAUNCH_OFF"
    fi
    # (d) the fused issue's step targets: fused against torchvision plain and memory_efficient on DenseNet-121 b64 224px bf16; bench rewrites its JSON/CSV after each row, so a step cut by its
    # time limit keeps the rows it finished. 330 s: at 170 s (31de30d, Triton's default tuning time) the fused
    # row's first step, which tunes and compiles every kernel shape, did not end
    # --reference plain,memory_efficient: torchvision's compiled row (recorded at c2e934d, 36.5 ms on an H200)
    # costs ~100 s of compilation that the steps below need more
    # TRITON_PRINT_AUTOTUNING=1: each tuned key's time and choice go to the log (where a fresh machine's time goes)
    step bench_densenet121_bf16 330 env TRITON_PRINT_AUTOTUNING=1 "${EFFDENSE[@]}" bench --device cuda --model densenet121 --batch-size 64 \
        --image-size 224 --dtype bf16 --strategies fused --reference plain,memory_efficient --steps 10 --max-seconds-per-row 10 --out "$OUT"
    # (f) DenseNet-121 b64 bf16 step, eager and replayed from a CUDA graph: the host overhead in the step time
    # (its kernel shapes are tuned by the step above, so it takes ~30 s); fused also eagerly with every kernel
    # launched through Triton's kernel[grid](...) (eager_triton_launch_ms): what the direct launch saves
    step step_graph_time 120 "$PY" benchmarks/step_graph_time.py --out "$OUT"
    # (c) Triton bottleneck kernels vs cuBLAS on DenseNet-121 shapes, bf16 (the >= 70 % of cuBLAS target),
    # with the autotuner's choice per shape
    # (150 s: at 4c8a7e5 on a fresh H200, with the direct launch off, 90 s ended while tuning the 14x14 shapes)
    step bench_kernels 150 "$PY" benchmarks/bench_kernels.py --dtypes bf16 --out "$OUT"
    # (b) tests: every CUDA-marked test but the slow ones, then (below) the rest of the kernel and shared-block
    # tests; the slow CUDA tests (each GEMM kernel with each autotuning config, compiled per case) on their own.
    # EFFDENSE_AUTOTUNE=0: each test shape launches one untuned config instead of tuning all of them, the
    # likely cost behind the step running out of its 120 s after 33 and 36 tests at 3d264cc and c2e934d
    # (not profiled); the autotuned path is covered by test_cuda_densenet_shapes[tuned] and the benches.
    # 180 s: a whole pass (126 tests in 76.7 s with 8 processes on an H200 at d837e33)
    # -v: each test's name goes to the log as it starts, so a step cut by its limit shows where it was
    # (without the CUDA-graph and direct-launch tests, which steps of their own run: they ran twice)
    step tests_cuda 180 env EFFDENSE_AUTOTUNE=0 "$PY" -m pytest "${XDIST[@]}" tests -v -m "cuda and not slow" \
        --ignore=tests/test_cuda_graph.py -k "not direct_launch" --junitxml="$OUT/pytest_cuda.xml"
    # the same DenseNet-121 step for fused under torch.compile (default mode, inductor; not recorded yet: 14 s
    # were left at 1a95410, and 150 s at d837e33 ran out while compiling), beside fused eager in the same process: whether compilation removes the host time that
    # the eager step is bound by
    step bench_fused_compile 300 "${EFFDENSE[@]}" bench --device cuda --model densenet121 --batch-size 64 \
        --image-size 224 --dtype bf16 --strategies fused --no-reference --compile --steps 10 --max-seconds-per-row 10 \
        --out "$OUT/compile"
    # every strategy on DenseNet-BC-100 (recorded on an H100 at b4b324d), each row's timing capped at 20 s
    # (--reference plain,memory_efficient: torchvision's compiled row, ~100 s of compilation, could not end in 120 s)
    step bench_densenet_bc_100 120 "${EFFDENSE[@]}" bench --device cuda --max-seconds-per-row 20 \
        --reference plain,memory_efficient --out "$OUT"
    # (g) operators per BC-100 b64 step (naive, fused on its kernels) and each kernel call's host time with
    # real launches: what the BC-100 step times are made of
    step host_overhead 90 "$PY" benchmarks/host_overhead.py --device cuda --strategies naive,fused --out "$OUT"
    # a captured and replayed step against eager steps (5 passed on an H100 at 1a95410)
    # (EFFDENSE_AUTOTUNE=0: each test shape compiles one config instead of tuning all of them)
    step tests_cuda_graph 60 env EFFDENSE_AUTOTUNE=0 "$PY" -m pytest tests/test_cuda_graph.py -v \
        --junitxml="$OUT/pytest_cuda_graph.xml"
    # where the eager step's host time goes (fused, naive, torchvision; DenseNet-121 b64 bf16): host vs whole-step
    # time, one profiled step's events (launches, operators, waits), a Python profile
    step profile_step 90 "$PY" benchmarks/profile_step.py --out "$OUT"
    # (e) FakeTensor estimate vs the allocator's peak, per strategy (recorded on an H200 at 31de30d)
    step estimate_vs_cuda 120 "$PY" benchmarks/estimate_vs_cuda.py --device cuda --out "$OUT"
    step tests_cuda_slow 150 "$PY" -m pytest "${XDIST[@]}" tests -v -m "cuda and slow" --junitxml="$OUT/pytest_cuda_slow.xml"
    step tests_kernels_shared 90 "$PY" -m pytest "${XDIST[@]}" tests/test_kernels.py tests/test_shared.py -q -m "not cuda" \
        --junitxml="$OUT/pytest_kernels_shared.xml"
else
    # the same steps on tiny settings: checks the plumbing, measures nothing worth keeping
    step tests_cuda 120 "$PY" -m pytest tests -q -m cuda --junitxml="$OUT/pytest_cuda.xml"
    # (the kernel tests only: with test_shared.py the step takes 6-12 min on two CPU cores, longer than a
    # plumbing check needs; CI runs both)
    step tests_kernels_shared 600 "$PY" -m pytest tests/test_kernels.py -q -m "not cuda" \
        --junitxml="$OUT/pytest_kernels_shared.xml"
    step bench_densenet121_bf16 240 "${EFFDENSE[@]}" bench --device cpu --model densenet121 --batch-size 2 \
        --image-size 32 --dtype bf16 --steps 1 --out "$OUT"
    step bench_densenet_bc_100 120 "${EFFDENSE[@]}" bench --device cpu --model densenet_bc_16 --batch-size 2 \
        --steps 1 --out "$OUT"
    step estimate_vs_cuda 120 "$PY" benchmarks/estimate_vs_cuda.py --device cpu \
        --config densenet_bc_16:4:32:fp32 --config densenet121:2:64:fp32 --out "$OUT"
    step bench_kernels 60 "$PY" benchmarks/bench_kernels.py --help  # it needs CUDA: only its arguments here
    step step_graph_time 60 "$PY" benchmarks/step_graph_time.py --help  # likewise
    step tests_direct_launch 60 "$PY" -m pytest tests/test_kernels.py -q -k "direct_launch" \
        --junitxml="$OUT/pytest_direct_launch.xml"
    step tests_cuda_graph 60 "$PY" -m pytest tests/test_cuda_graph.py -q --junitxml="$OUT/pytest_cuda_graph.xml"
    step profile_step 120 "$PY" benchmarks/profile_step.py --device cpu --model densenet_bc_16 --batch-size 2 \
        --image-size 8 --steps 1 --warmup 1 --out "$OUT"
    step host_overhead 60 "$PY" benchmarks/host_overhead.py --device cpu --model densenet_bc_16 --batch-size 2 \
        --image-size 8 --repeats 1 --calls 10 --out "$OUT"
fi

# steps that this mode has no run of (the dry run's GPU-only ones): skipped, not silently missing from steps.tsv
for name in $ALL_STEPS; do
    if ! cut -f1 "$OUT/steps.tsv" | grep -qx "$name"; then
        printf '%s\t\t0\tskipped\t(no %s step)\n' "$name" "$MODE" >>"$OUT/steps.tsv"
    fi
done
write_summary
echo
echo "gpu_suite.sh: $MODE finished in $((SECONDS - SUITE_START))s; results in $OUT"
column -t -s $'\t' "$OUT/steps.tsv" 2>/dev/null | cut -c1-100 || cut -f1-4 "$OUT/steps.tsv"
pack_archive || FAILED+=(archive)
if [ ${#FAILED[@]} -gt 0 ]; then
    echo "gpu_suite.sh: failed: ${FAILED[*]}" >&2
    exit 1
fi
