"""The `tetris` command: argparse with one subcommand per registrar.

A subcommand module exposes `register(subparsers)`, which adds its parser and sets its handler
with `parser.set_defaults(handler=fn)`, where `fn(args) -> int` returns the exit status. Add the
module's `register` to `REGISTRARS` to ship it.

Bad user input anywhere exits with status 2 and one line on stderr, `tetris: error: <message>`:
argparse's own errors through `CliParser.error`, and ValueError / pydantic ValidationError (and
OSError: a file named on the command line that cannot be opened) raised while a handler runs
through `main`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from pydantic import ValidationError

from tetris import __version__
from tetris.cli import (
    bench_cmd,
    generate_cmd,
    model_cmd,
    plan_cmd,
    profile_cmd,
    serve_cmd,
    simulate_cmd,
    trace_cmd,
    whatif_cmd,
)
from tetris.cli.errors import EXIT_USAGE, one_line

PROG = "tetris"
# Each registrar gets the subparsers action; the parsers it adds are `CliParser`s.
Registrar = Callable[["argparse._SubParsersAction[Any]"], None]

REGISTRARS: list[Registrar] = [
    plan_cmd.register,
    bench_cmd.register,
    model_cmd.register,
    generate_cmd.register,
    simulate_cmd.register,
    whatif_cmd.register,
    trace_cmd.register,
    profile_cmd.register,
    serve_cmd.register,
]


class _Exit(Exception):
    """Raised instead of SystemExit so that `main` returns a status when called in-process."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class CliParser(argparse.ArgumentParser):
    """Errors as one line without the usage dump; exits raise `_Exit` for `main` to return."""

    def error(self, message: str) -> NoReturn:
        print_error(message)
        raise _Exit(EXIT_USAGE)

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            sys.stderr.write(message)
        raise _Exit(status)


def print_error(message: str) -> None:
    print(f"{PROG}: error: {' '.join(message.split())}", file=sys.stderr)


def build_parser(registrars: list[Registrar] | None = None) -> CliParser:
    parser = CliParser(
        prog=PROG,
        description="Long-context LLM serving with Chunkwise Dynamic Sequence Parallelism.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    # Subparsers inherit the parser class, so their errors are one line too.
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in REGISTRARS if registrars is None else registrars:
        register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
        handler: Callable[[argparse.Namespace], int] = args.handler
        return handler(args)
    except _Exit as done:
        return done.status
    except (ValueError, ValidationError) as exc:
        print_error(one_line(exc))
        return EXIT_USAGE
    except KeyboardInterrupt:
        print_error("interrupted")
        return 130
    except BrokenPipeError:
        # The reader (e.g. `| head`) left: point stdout at devnull so the interpreter's own
        # flush at exit does not raise a second time, and exit quietly like other filters.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as exc:
        # A file the user named that cannot be opened or written (a directory, a missing
        # parent, no permission): their input, reported like any other bad input.
        print_error(one_line(exc))
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
