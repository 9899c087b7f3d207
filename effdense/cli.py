"""The ``effdense`` command: one subcommand per module, registered in :data:`COMMANDS`.

A subcommand is a module with ``add_arguments(parser)`` and ``main(args) -> int``; adding one is one line
in :data:`COMMANDS`. Bad arguments end with a one-line error on stderr and exit code 2, whether argparse
finds them or the subcommand does (by raising :class:`effdense.benchutil.UsageError`); the error names the
subcommand (``effdense summary: error: ...``). An option given where it has no effect (``--steps`` for a
run that times nothing) is such an error too, never silently ignored: see
:func:`effdense.benchutil.reject_ineffective`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from typing import Callable, Sequence

COMMANDS: dict[str, tuple[str, str]] = {
    # name: (module with add_arguments/main, one-line help)
    "bench": ("effdense.bench", "compare the strategies on one model: peak memory, step time, ratios"),
    "ablate": ("effdense.ablate", "grid over strategies x policy x depth x growth x batch x dtype; CSV and plots"),
    "max-depth": ("effdense.maxdepth", "deepest DenseNet-BC whose training step fits a memory budget"),
    "summary": ("effdense.summary", (
        "parameters, MACs, dense connections and training-step memory of a model, beside a torchvision ResNet "
        "(ImageNet architecture) of similar depth"
    )),
    "train": ("effdense.train", "train a DenseNet: digits (bundled), CIFAR-10/100 or ImageFolder; AMP, DDP, resume"),
}


class _Parser(argparse.ArgumentParser):
    """argparse, with errors on one line (``effdense bench: error: ...``) instead of usage plus message.

    A value that starts with a minus sign and a digit (``--budget -1GiB``, ``--depths -10,20``) is taken
    as the option's value, so its type reports what is wrong with it; argparse itself only does that for
    plain negative numbers and would say "expected one argument". No effdense option looks like ``-1``.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-\.?\d")

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


class _SubcommandParser(_Parser):
    """The parser of one subcommand: arguments it does not know are its error (``effdense summary: error:
    unrecognized arguments: extra``), not the top-level parser's.

    argparse hands a subcommand's leftover arguments back to the top-level parser, which reports them under
    its own name (``effdense: error: ...``). The top-level parser has no options of its own after the
    subcommand name, so whatever the subcommand leaves over is an argument nobody takes.
    """

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras


def build_parser() -> argparse.ArgumentParser:
    from effdense import __version__

    parser = _Parser(prog="effdense", description="Memory-efficient DenseNets: benchmarks, ablations, training.")
    parser.add_argument("--version", action="version", version=f"effdense {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_SubcommandParser)
    sub.required = True
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue  # a subcommand whose module is not in this installation
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``effdense`` console script; returns the exit code."""
    parser = build_parser()
    return run_entry(lambda: parser.parse_args(argv), lambda args: args._module.main(args))


def run_entry(
    parse: Callable[[], argparse.Namespace], run: Callable[[argparse.Namespace], int | None], command: str | None = None
) -> int:
    """Parse, run and return the exit code, as every entry point does (the ``effdense`` script, ``python -m
    effdense.train``): a :class:`~effdense.benchutil.UsageError` is one line and 2, a result file that could not be
    written (:class:`~effdense.benchutil.OutputError`) one line and 1, Ctrl-C one line and 130, a
    closed stdout a quiet 141 (:func:`_broken_pipe`). ``command`` names the subcommand in those lines
    (default: the parsed ``args.command``)."""
    from effdense.benchutil import OutputError, UsageError

    try:
        try:
            args = parse()
        except SystemExit:  # --help, or a usage error
            sys.stdout.flush()
            raise
        name = command or args.command
        try:
            code = int(run(args) or 0)
        except UsageError as exc:
            print(f"effdense {name}: error: {exc}", file=sys.stderr)
            code = 2
        except OutputError as exc:  # (a full disk: what was written before is whole, see benchutil.write_json)
            print(f"effdense {name}: error: {exc}", file=sys.stderr)
            code = 1
        except KeyboardInterrupt:
            print(f"effdense {name}: interrupted", file=sys.stderr)
            code = 130
        sys.stdout.flush()  # a pipe's buffered output fails here, not in the interpreter's shutdown
        return code
    except BrokenPipeError:
        return _broken_pipe()


def _broken_pipe() -> int:
    """After a ``BrokenPipeError``: if the reader of stdout went away, as in ``effdense summary densenet121 |
    head -3``, stop quietly, without a traceback, as coreutils do on SIGPIPE. The exit code is theirs too,
    141 (128 + SIGPIPE), what ``set -o pipefail`` sees of ``seq 100000 | head -1``: the output was cut short,
    which 0 would hide. Work after the failed write is not done (files of ``--out`` written after it
    included). A broken pipe of anything else (a subprocess, a socket) is an error of its own: re-raised.

    The closed stream (stdout, and stderr if it went to the same reader) is pointed at ``/dev/null`` so
    that the interpreter's final flush of what is still buffered cannot fail again (Python's recommended
    handling, see the ``signal`` module's documentation).
    """
    if not _closed(sys.stdout):
        raise  # noqa: PLE0704 - called from the except clause: the BrokenPipeError being handled
    devnull = os.open(os.devnull, os.O_WRONLY)
    for stream in (sys.stdout, sys.stderr):
        if stream is sys.stdout or _closed(stream):
            try:
                os.dup2(devnull, stream.fileno())
            except (AttributeError, OSError, ValueError):  # replaced streams (pytest's capture) without a descriptor
                pass
    os.close(devnull)
    return 128 + 13  # SIGPIPE


def _closed(stream) -> bool:
    """Whether ``stream`` is a pipe whose reader has gone (poll reports an error on its descriptor). A stream
    without a descriptor, or a platform without ``poll``, counts as closed: the error came from a write."""
    try:
        import select

        fd = stream.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):
        return True


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
