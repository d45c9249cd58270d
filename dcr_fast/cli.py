"""The ``dcr-fast`` command line: one sub-command per job, one way for every job to end.

Each sub-command lives beside the code it drives and exposes ``register(subparsers)``, which
adds its parser and sets ``func`` (and, for a resumable job, ``resume_hint``: what to do after
Ctrl-C); this module collects them and owns the contract they all share:

* success: the command's return code (0);
* a user error: one line on stderr, ``dcr-fast CMD: error: MESSAGE``, exit 2 (argparse's own
  errors, such as a missing flag, too);
* Ctrl-C: one line, ``dcr-fast CMD: interrupted; HINT``, exit 130;
* anything else is a bug: Python's traceback, exit 1.

``--debug`` (before or after the command name) or ``DCR_FAST_DEBUG=1`` shows the traceback of
user errors and interrupts as well. Warnings issued by dcr-fast print as one line,
``dcr-fast CMD: warning: MESSAGE``.

What is a user error (``is_user_error``) is decided by where the exception was raised, not by
its type alone, so that bugs keep their traceback:

* a ``ValueError``, ``FileNotFoundError`` or ``ImportError`` raised by a ``raise`` statement in
  dcr-fast's own code (``dcr_fast.*``, and the checkout's ``bench.*``): by the package's
  convention those are the checks that name the argument and what was expected. The same
  types raised inside torch, numpy or transformers, or by a failing operation of ours (an
  unpacking, an ``int()``, a numpy call), are bugs until a check of ours says what is wrong;
* an ``OSError`` naming a file (missing, unreadable, not writable, a full disk), wherever it
  was raised: the operating system's message names the path.
"""

from __future__ import annotations

import argparse
import contextlib
import dis
import importlib
import os
import sys
import traceback
import warnings
from collections.abc import Iterator
from types import TracebackType

_SUBCOMMANDS = (
    "dcr_fast.reproduce.cli",
    "dcr_fast.demo.run",
    "dcr_fast.train.dcr",
    "dcr_fast.train.sft",
    "dcr_fast.evaluation.cli",
    "dcr_fast.ntk.cli",
    "dcr_fast.forecast.cli",
    "dcr_fast.bench_cli",
)

DEBUG_ENV = "DCR_FAST_DEBUG"
USER_ERROR = 2
INTERRUPTED = 130
_OWN_MODULES = ("dcr_fast", "bench")
_USER_ERROR_TYPES = (ValueError, FileNotFoundError, ImportError)
_DEFAULT_RESUME_HINT = "rerun the same command"


class _Parser(argparse.ArgumentParser):
    """argparse with errors on one line, as every other user error (usage is under --help)."""

    def error(self, message: str):
        self.exit(USER_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="dcr-fast",
        description="Fast Circle loss, empirical NTK and the DCR over-refusal pipeline.",
    )
    debug = dict(action="store_true", help=f"show the traceback of errors (or set {DEBUG_ENV}=1)")
    parser.add_argument("--debug", **debug)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in _SUBCOMMANDS:
        importlib.import_module(module).register(subparsers)
    for command in _commands(subparsers):
        # SUPPRESS: an absent flag after the command must not reset one given before it.
        command.add_argument("--debug", default=argparse.SUPPRESS, **debug)
    parser.set_defaults(commands=subparsers.choices)
    return parser


def _commands(subparsers: argparse._SubParsersAction) -> list[argparse.ArgumentParser]:
    """Every command's parser, nested ones (``bench circle-loss``) included."""
    found = []
    for command in subparsers.choices.values():
        found.append(command)
        for action in command._actions:
            if isinstance(action, argparse._SubParsersAction):
                found += _commands(action)
    return found


def main(argv: list[str] | None = None) -> int:
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:  # argparse would blame the top-level parser; the sub-command's name says more
        args.commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    debug = args.debug or os.environ.get(DEBUG_ENV, "").lower() in ("1", "true", "yes")
    prefix = f"dcr-fast {args.command}"
    try:
        with _one_line_warnings(prefix):
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print(f"{prefix}: interrupted; {getattr(args, 'resume_hint', _DEFAULT_RESUME_HINT)}", file=sys.stderr)
        return INTERRUPTED
    except Exception as err:
        if not is_user_error(err):
            raise
        if debug:
            traceback.print_exc()
        print(f"{prefix}: error: {user_message(err)}", file=sys.stderr)
        return USER_ERROR


def is_user_error(err: BaseException) -> bool:
    """Whether ``err`` is a user error by the rule in the module docstring."""
    if isinstance(err, OSError) and err.filename is not None:
        return True
    if not isinstance(err, _USER_ERROR_TYPES) or err.__traceback__ is None:
        return False
    return _raised_by_own_raise(err.__traceback__)


def user_message(err: BaseException) -> str:
    """The one-line message of a user error."""
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        target = f" -> {err.filename2!r}" if err.filename2 is not None else ""
        return f"{err.strerror}: {str(err.filename)!r}{target}"
    return " ".join(str(err).split()) or type(err).__name__


def _raised_by_own_raise(tb: TracebackType) -> bool:
    """Whether the innermost frame is ours and stopped at a ``raise`` (not a failing operation)."""
    while tb.tb_next is not None:
        tb = tb.tb_next
    module = tb.tb_frame.f_globals.get("__name__", "")
    if module.split(".")[0] not in _OWN_MODULES:
        return False
    instruction = next((i for i in dis.get_instructions(tb.tb_frame.f_code) if i.offset == tb.tb_lasti), None)
    return instruction is not None and instruction.opname == "RAISE_VARARGS"


@contextlib.contextmanager
def _one_line_warnings(prefix: str) -> Iterator[None]:
    """Print dcr-fast's own warnings as ``PREFIX: warning: MESSAGE``; others as Python would."""
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    with warnings.catch_warnings():
        default = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if not os.path.abspath(filename).startswith(package):
                return default(message, category, filename, lineno, file, line)
            print(f"{prefix}: warning: {' '.join(str(message).split())}", file=file or sys.stderr)

        warnings.showwarning = show
        yield


if __name__ == "__main__":
    sys.exit(main())
