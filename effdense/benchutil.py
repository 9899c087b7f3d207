"""What the ``effdense`` subcommands share: argument types, the run environment, timing, output files.

Argument types raise ``argparse.ArgumentTypeError`` so that a bad value ends as argparse's one-line
error with exit code 2 (see :mod:`effdense.cli`); errors found after parsing raise :class:`UsageError`.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import hashlib
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.nn as nn

from effdense import strategies as _strategies
from effdense.densenet import MODELS, cifar_layers_per_block
from effdense.memory import parse_bytes, training_step


class UsageError(ValueError):
    """A bad command-line value found after parsing: reported in one line, exit code 2."""


class OutputError(OSError):
    """A result file could not be written (a full disk, a quota, an I/O error) after the run had started:
    reported in one line naming the file, exit code 1. An ``OSError``, as the error it stands for."""


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Turn an ``OSError`` while writing ``path`` into an :class:`OutputError` that names it (a write's
    ``OSError`` names no file: "[Errno 28] No space left on device")."""
    try:
        yield
    except BrokenPipeError:
        raise
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc


DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
"""``--dtype`` values: ``None`` is plain fp32, the others run forward and loss under autocast."""


# ------------------------------------------------------------------------------------------------
# Argument types


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (PyTorch's often run to pages), or its type's name if it
    has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def error_note(exc: BaseException, limit: int = 300) -> str:
    """``"<type>: <first line>"``, at most ``limit`` characters: the note of a result row that failed."""
    text = str(exc).strip()
    return (f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__)[:limit]


def exit_code(command: str, failed: Sequence[str], total: int, what: tuple[str, str] = ("row", "rows")) -> int:
    """A results command's exit status: 0 when nothing failed; else 1, after a line on stderr naming the
    failures (their results are written all the same, each with status ``error`` and its note), so that a
    script or CI job running the command sees them."""
    if not failed:
        return 0
    names = ", ".join(failed[:5]) + (f" and {len(failed) - 5} more" if len(failed) > 5 else "")
    print(f"effdense {command}: {len(failed)} of {total} {what[total != 1]} failed ({names}); each is recorded with status "
          "'error' and its note; exit code 1", file=sys.stderr, flush=True)
    return 1


def model_name(text: str) -> str:
    """A name :func:`effdense.get_model` accepts: one of :data:`effdense.MODELS`, ``densenet_bc_<depth>``
    or ``densenet_<depth>`` with a depth the paper's rule allows. Case-insensitive, as :func:`effdense.get_model`;
    returns the lower-case name (file names, the ImageNet/CIFAR defaults). A depth with leading zeros is kept as
    given: ``densenet_bc_0250`` is :func:`effdense.get_model`'s k=12 model of depth 250, not the
    ``densenet_bc_250`` preset (k=24)."""
    name = text.strip().lower()
    if name in MODELS:
        return name
    m = re.fullmatch(r"densenet_(bc_)?([0-9]+)", name)  # (ASCII digits, as get_model)
    if m:
        try:
            cifar_layers_per_block(int(m.group(2)), bottleneck=m.group(1) is not None)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return name
    raise argparse.ArgumentTypeError(
        f"unknown model {text!r}; expected one of {', '.join(sorted(MODELS))}, densenet_bc_<depth> or densenet_<depth>"
    )


def strategy_list(text: str) -> list[str]:
    """``all`` (every available strategy) or a comma list of names from :data:`effdense.STRATEGIES`.

    A known strategy that is not implemented yet is kept (it is reported as skipped); an unknown one is
    an error.
    """
    if text.strip() == "all":
        return list(_strategies.available())
    names = comma_items(text)
    if not names:
        raise argparse.ArgumentTypeError(f"no strategy in {text!r}; expected 'all' or e.g. naive,checkpoint")
    for name in names:
        if name not in _strategies.STRATEGIES:
            raise argparse.ArgumentTypeError(
                f"unknown strategy {name!r}; expected 'all' or a comma list of {', '.join(_strategies.STRATEGIES)}"
            )
    return list(dict.fromkeys(names))


def selection_tag(chosen: Sequence[str], default: Sequence[str], none: str = "") -> str:
    """The part of a result file's name that tells a run of a selection of rows (``--strategies``,
    ``--reference``) from a run of the default ones, so that one does not overwrite the other: ``""`` for
    the default selection (in any order: the same rows), ``none`` for an empty one, else ``"_"`` and the
    names joined by ``-``, in the order given."""
    if sorted(chosen) == sorted(default):
        return ""
    return f"_{none}" if not chosen else "_" + "-".join(chosen)


def comma_items(text: str) -> list[str]:
    """The stripped items of a comma list; ``[]`` when there is none (``""``, ``","``: the caller names the
    empty list). An empty item between others (``"16,,22"``, ``"16,"``) is an ``ArgumentTypeError``: a value
    left out by mistake must not shrink the list silently."""
    items = [s.strip() for s in text.split(",")]
    if not any(items):
        return []
    if not all(items):
        raise argparse.ArgumentTypeError(f"empty item in the comma list {text!r}: give a value between every two commas")
    return items


def int_list(text: str) -> list[int]:
    """A comma list of positive integers (``"40,100,250"``); empty lists and empty items are errors."""
    try:
        values = [int(s) for s in comma_items(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"empty list {text!r}: give at least one value")
    if any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"values must be positive, got {text!r}")
    return list(dict.fromkeys(values))


def dtype_name(text: str) -> str:
    if text not in DTYPES:
        raise argparse.ArgumentTypeError(f"unknown dtype {text!r}; expected one of {', '.join(DTYPES)}")
    return text


def dtype_list(text: str) -> list[str]:
    names = comma_items(text)
    if not names:
        raise argparse.ArgumentTypeError(f"empty dtype list {text!r}; expected e.g. fp32,bf16")
    return list(dict.fromkeys(dtype_name(n) for n in names))


def byte_size(text: str) -> int:
    """A memory size with its unit (``12GiB``, ``500MB``, ``300000B``): on the command line a bare number is
    refused (``--budget 12`` meant 12 bytes, so every model was reported as not fitting)."""
    try:
        value = parse_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not re.search(r"[a-zA-Z]", text):
        raise argparse.ArgumentTypeError(
            f"memory size {text!r} has no unit; write e.g. {text.strip()}GiB, {text.strip()}MB, or {text.strip()}B for bytes"
        )
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def nonnegative_float(text: str) -> float:
    """A number >= 0 (``inf`` allowed); ``nan`` and negative numbers are errors."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0:  # nan too
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    """``--threads N``: the CPU threads of PyTorch's operators (``torch.set_num_threads``), for CPU timings
    that compare across machines and runs; recorded in each CPU result's ``device_name``."""
    parser.add_argument("--threads", type=positive_int, default=None, metavar="N",
                        help="CPU threads for PyTorch's operators (torch.set_num_threads; default: PyTorch's choice, "
                        "usually the cores); recorded in device_name on CPU")


def apply_threads(args: argparse.Namespace) -> None:
    """Set ``--threads`` (see :func:`add_threads_argument`), if given."""
    if getattr(args, "threads", None) is not None:
        torch.set_num_threads(args.threads)


def device_name(text: str) -> str:
    if text == "auto":
        return text
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; expected auto, cpu or cuda[:N]") from None
    if dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"unsupported device {text!r}; expected auto, cpu or cuda[:N]")
    if dev.type == "cpu" and dev.index not in (None, 0):  # PyTorch has one CPU device: "cpu:1" would run on it
        raise argparse.ArgumentTypeError(f"unsupported device {text!r}: there is one CPU device; expected auto, cpu or cuda[:N]")
    return text


def output_path(text: str) -> Path:
    """``--out``: a folder path. An empty one is an error: ``Path("")`` is the current directory, so
    ``--out ""`` (an unset shell variable, say) would scatter results into wherever the command ran."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"empty path {text!r}; give a folder, e.g. effdense_results (or . for the current one)")
    return Path(text)


def reject_ineffective(args: argparse.Namespace, options: Sequence[str], reason: str) -> None:
    """Raise :class:`UsageError` when one of ``options`` (``"--steps"``) was given although it has no
    effect, ``reason`` saying why (``"without --time"``).

    The policy of every subcommand: an option that sets a value the run would never use is an error, not
    silently ignored. Such options default to ``None`` (the real default is filled in once it is known to
    apply), so an option counts as given when its value is not ``None``; a default never triggers this.
    (Switches are the subcommands' own business: ``bench`` refuses ``--no-timing`` with ``--memory estimate``.)
    """
    given = [o for o in options if getattr(args, o.lstrip("-").replace("-", "_")) is not None]
    if given:
        verb = "has" if len(given) == 1 else "have"
        raise UsageError(f"{' and '.join(given)} {verb} no effect {reason}")


def min_image_size(model: Any, batch_size: int | None = None) -> int:
    """Smallest square input side on which ``model`` (an effdense DenseNet) can take a training step at
    ``batch_size``: every stage keeps at least one pixel (``model.min_input_size()``), and a training-mode
    BatchNorm gets more than one value per channel (batch x height x width > 1). The last dense block and
    ``norm5`` see the smallest maps, so at batch 1 they must be larger than 1x1 (DenseNet-121: 61, not 29).
    ``batch_size=None``: no training step (a forward pass in eval mode), the pixel rule only."""
    size = model.min_input_size()
    if batch_size is None:
        return size
    while batch_size * model._final_spatial(size, 0) * model._final_spatial(size, 1) < 2:
        size += 1  # a few dozen steps at most: the maps grow with the input
    return size


def image_size_problem(
    model: Any, size: int, what: str, batch_size: int | None = None, batch_option: str = "--batch-size"
) -> str | None:
    """What is wrong with training ``model`` on ``size`` x ``size`` inputs at ``batch_size`` (see
    :func:`min_image_size`), in one line naming the options, or ``None``; ``what`` names the model
    (``densenet_bc_16``, or ``DenseNet-BC`` for a whole family), ``batch_option`` the option that set the
    batch (``--batch-sizes`` in ``ablate``: the smallest of them)."""
    plain = model.min_input_size()
    need = min_image_size(model, batch_size)
    if size >= need:
        return None
    if need == plain:  # the batch does not matter: no pixel left
        return f"--image-size {size} is too small for {what}: it needs at least {need}"
    at = f"at {batch_option} {batch_size}"
    if size < plain:
        return f"--image-size {size} is too small for {what} {at}: it needs at least {need} (at least {plain} with a batch of 2 or more)"
    h, w = model._final_spatial(size, 0), model._final_spatial(size, 1)
    return (
        f"--image-size {size} is too small for {what} {at}: training-mode BatchNorm needs more than one value per "
        f"channel, and its last dense block would see {h}x{w} maps of one image; use --image-size {need} or more, "
        f"or a batch of 2 or more"
    )


def require_image_size(
    model: Any, size: int, what: str, batch_size: int | None = None, batch_option: str = "--batch-size"
) -> None:
    """:class:`UsageError` unless ``model`` (an effdense DenseNet) can train on ``size`` x ``size`` inputs at
    ``batch_size`` (``None``: takes them at all); the message is :func:`image_size_problem`'s."""
    problem = image_size_problem(model, size, what, batch_size, batch_option)
    if problem is not None:
        raise UsageError(problem)


def resolve_device(text: str) -> torch.device:
    """``auto``: the GPU if there is one, else the CPU."""
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(text)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {text} asked for, but this machine has no CUDA GPU; use --device cpu")
    return dev


# ------------------------------------------------------------------------------------------------
# Environment and models


def git_commit() -> str:
    """``$GIT_COMMIT`` when set (the caller knows: e.g. a tree copied onto a GPU machine beside a stale
    ``.git``, which recorded another commit), else the checkout's commit, with ``+dirty.<hash>`` when tracked
    files have changes (the hash of ``git diff HEAD``: two different sets of edits on one commit are told
    apart, so that ``ablate`` does not take one's rows for the other's), else ``"effdense-<version>"`` (an
    installed package: a site-packages inside another project's repository has that project's commit, which
    is not effdense's), else ``"unknown"``."""
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    root = Path(__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file() or not (root / "kernels").is_dir():  # not effdense's checkout
        from effdense import __version__

        return f"effdense-{__version__}"
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        diff = subprocess.run(
            ["git", "diff", "HEAD", "--no-ext-diff", "--no-color"],
            cwd=root, capture_output=True, timeout=30, check=True,
        ).stdout  # fmt: skip
        return head + (f"+dirty.{hashlib.sha1(diff).hexdigest()[:10]}" if diff else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device: torch.device) -> dict[str, Any]:
    """Where and with what a result was recorded."""
    try:
        import torchvision

        tv_version = torchvision.__version__
    except ImportError:
        tv_version = None
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if device.type == "cuda":
        device_desc = torch.cuda.get_device_name(device)
    else:
        device_desc = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return {
        "device": str(device),
        "device_name": device_desc,
        "torch": torch.__version__,
        "torchvision": tv_version,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "command": command_line(),
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "strategies_available": list(_strategies.available()),
        # the kernels' switches as this process's environment set them (None: unset, the default on; the GPU
        # suite sets EFFDENSE_DIRECT_LAUNCH=0 when its direct-launch tests fail): a result file says whether its
        # kernels launched directly and were tuned, which the numbers depend on
        "kernel_settings": {k: os.environ.get(k) for k in ("EFFDENSE_DIRECT_LAUNCH", "EFFDENSE_AUTOTUNE", "TRITON_INTERPRET")},
    }


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command that ran this process (``sys.argv`` by default), as a user would type it again: the
    ``effdense`` script as ``effdense ...``, ``python -m effdense.cli ...`` (how the GPU suite runs the CLI,
    whose ``argv[0]`` is then the full path of ``cli.py``) and ``python -m effdense ...`` (``__main__.py``) as
    those, a script as ``python <script> ...``."""
    argv = list(sys.argv if argv is None else argv)
    if not argv:
        return ""
    first = Path(argv[0])
    if first.name == "effdense":
        return " ".join(["effdense", *argv[1:]])
    if first.name == "cli.py" and first.parent.name == "effdense":
        return " ".join(["python -m effdense.cli", *argv[1:]])
    if first.name == "__main__.py" and first.parent.name == "effdense":  # python -m effdense
        return " ".join(["python -m effdense", *argv[1:]])
    return " ".join(["python", *argv] if first.suffix == ".py" else argv)


def fused_note(device: torch.device) -> str:
    """What ``fused`` runs on ``device``, for a result row's note where that is not the GPU's kernels: the
    PyTorch twins (a CPU), or the Triton kernels through the interpreter (``TRITON_INTERPRET=1``, as the tests
    set it). Empty on CUDA."""
    if device.type == "cuda":
        return ""
    from effdense.kernels import kernels_available

    if kernels_available(device):
        return "CPU: Triton kernels through the interpreter"
    return "CPU: PyTorch twins of the kernels"


def default_image_size(model_name_: str) -> int:
    """224 for the ImageNet models, 32 for the CIFAR ones."""
    from effdense.densenet import CIFAR_PRESETS, IMAGENET_CONFIGS

    if model_name_ in IMAGENET_CONFIGS:
        return 224
    if model_name_ in CIFAR_PRESETS or model_name_.startswith("densenet_"):
        return 32
    return 224


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def time_steps(
    model: nn.Module,
    x: torch.Tensor,
    *,
    steps: int,
    warmup: int,
    autocast_dtype: torch.dtype | None = None,
    max_seconds: float | None = None,
    min_steps: int = 2,
) -> list[float]:
    """Seconds of each timed training step (forward, loss, backward; grads dropped before each step).

    ``warmup`` untimed steps first. With ``max_seconds``, timing stops once that much time has been
    spent and at least ``min_steps`` were timed (for slow CPU runs; the caller records how many).
    """
    model.train()
    for _ in range(warmup):
        model.zero_grad(set_to_none=True)
        training_step(model, x, autocast_dtype=autocast_dtype)
    synchronize(x.device)
    times: list[float] = []
    spent = 0.0
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        synchronize(x.device)
        start = time.perf_counter()
        training_step(model, x, autocast_dtype=autocast_dtype)
        synchronize(x.device)
        times.append(time.perf_counter() - start)
        spent += times[-1]
        if max_seconds is not None and spent >= max_seconds and len(times) >= min_steps:
            break
    model.zero_grad(set_to_none=True)
    return times


def quantiles(times: Sequence[float]) -> dict[str, float]:
    """Median and 20/80 % quantiles, in milliseconds."""
    ms = sorted(t * 1e3 for t in times)
    if len(ms) == 1:
        return {"time_ms": ms[0], "time_ms_p20": ms[0], "time_ms_p80": ms[0]}
    q = statistics.quantiles(ms, n=10, method="inclusive")
    return {"time_ms": statistics.median(ms), "time_ms_p20": q[1], "time_ms_p80": q[7]}


# ------------------------------------------------------------------------------------------------
# Output


def output_dir(path: Path, files: Sequence[str] = ()) -> Path:
    """Create the ``--out`` folder (and its parents) before any work is done, or raise :class:`UsageError`
    saying why results could not be written there (a file of that name, a symbolic link to nowhere, a
    read-only parent, or a folder in place of one of ``files``, the names the command will write there)."""
    if path.is_symlink() and not path.exists():
        raise UsageError(f"--out {path} is a symbolic link to {os.readlink(path)}, which does not exist")
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {path} is a file, not a folder")
    for name in files:
        target = path / name
        if target.exists() and not target.is_file():
            raise UsageError(f"cannot write {target}: a folder (or another non-file) of that name is in the way")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create the --out folder {path}: {exc.strerror or exc}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"the --out folder {path} is not writable")
    return path


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float (``--max-seconds-per-row inf``, an undefined ratio) as None:
    JSON has no Infinity or NaN, and strict parsers (JavaScript's ``JSON.parse``) refuse Python's."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """``payload`` as standard JSON (non-finite numbers as null), replacing ``path`` at once: the benchmarks
    rewrite their file after each row, and a run killed by a time limit mid-write keeps the last whole file."""
    text = json.dumps(_finite(payload), indent=2, default=str, allow_nan=False) + "\n"
    with _writing(path), _replacing(path) as tmp:
        tmp.write_text(text)


@contextlib.contextmanager
def _replacing(path: Path) -> Iterator[Path]:
    """A temporary file beside ``path`` that replaces it when the block completes (``os.replace``: readers
    see the old file or the new one, never a part), and is removed when the block fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_csv(path: Path, rows: Iterable[dict[str, Any]], columns: Sequence[str]) -> None:
    """``rows`` as CSV under a header of ``columns`` (keys not in it left out), with ``\\n`` line ends; the
    file is replaced at once, as :func:`write_json`'s."""
    with _writing(path), _replacing(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow(row)


def append_csv(path: Path, row: dict[str, Any], columns: Sequence[str]) -> None:
    """``row`` appended to the CSV at ``path`` (keys not in ``columns`` left out), under a header of ``columns``
    written first when the file is new or empty; ``\n`` line ends, as :func:`write_csv`. A file whose last line
    has no line end (saved by an editor that drops it, or a row cut short by a kill or a full disk) gets one
    first: the row was glued onto that line, and lost with it. A row cut inside a quoted field (an odd number
    of quote characters in the file: the csv module doubles those within a field) gets its quote closed too:
    the line end alone stayed inside the field, and the next row with it (from a probe)."""
    with _writing(path):
        new = not path.exists() or path.stat().st_size == 0
        ended, open_quote = True, False
        if not new:
            with path.open("rb") as f:
                data = f.read()
            ended = data[-1:] in (b"\n", b"\r")
            open_quote = data.count(b'"') % 2 == 1
        with path.open("a", newline="") as f:
            if open_quote:
                f.write('"')
            if not ended or open_quote:
                f.write("\n")
            writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
            if new:
                writer.writeheader()
            writer.writerow(row)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, Callable[[Any], str]]]) -> str:
    """A plain-text table: ``columns`` are ``(key, header, formatter)``; missing values print as ``-``."""
    cells = [[header for _, header, _ in columns]]
    for row in rows:
        cells.append([fmt(row[key]) if row.get(key) is not None else "-" for key, _, fmt in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    left = {i for i, (_, _, fmt) in enumerate(columns) if fmt is str}  # text left, numbers right
    lines = []
    for j, r in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def progress(message: str) -> None:
    """A progress line on stderr (stdout keeps the results)."""
    print(message, file=sys.stderr, flush=True)


class AutocastInside(nn.Module):
    """``model`` with its forward run under ``autocast(x)`` (a context factory given the input), for
    ``torch.compile`` to trace with autocast inside the compiled call: entered around it, dynamo's retrace of
    the shared/fused autograd Function fails ("Global autocast(cpu)_enabled state changed while dynamo
    tracing"; README, torch.compile limits)."""

    def __init__(self, model: nn.Module, autocast: Callable[[torch.Tensor], contextlib.AbstractContextManager]) -> None:
        super().__init__()
        self.model = model
        self._autocast = autocast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self._autocast(x):
            return self.model(x)
