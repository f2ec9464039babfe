"""``mailhub [--config PATH] COMMAND ...``: parse arguments, run a command, turn errors into text.

Every listing takes ``--json`` and then prints JSON only. Errors print one line on stderr
(``mailhub: error: ...``) with a hint, exit status 1; usage errors exit 2. No tracebacks for bad
input; an unexpected crash prints where the log is instead of a traceback unless --debug.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import sys
from collections.abc import Callable
from typing import TextIO

from mailhub.cli import cmd_cases, cmd_keys, cmd_queue, cmd_schedule, cmd_setup
from mailhub.errors import MailhubError

EPILOG = """\
The configuration defaults to $MAILHUB_CONFIG, then ./config.toml.
Start with:  mailhub init DIR  then  mailhub --config DIR/config.toml serve
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mailhub",
        description="Secure email coordination hub: encrypting relay, case files, care-plan "
                    "scheduler.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="PATH",
                        help="configuration file, or an instance folder holding config.toml "
                             "(default: $MAILHUB_CONFIG, then ./config.toml)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    cmd_setup.register(sub)
    cmd_keys.register(sub)
    cmd_queue.register(sub)
    cmd_cases.register(sub)
    cmd_schedule.register(sub)
    return parser


class _ReaderMayLeave(io.TextIOBase):
    """stdout for a command: when its reader goes away (``mailhub init DIR | head -1``), the
    rest of the output goes to /dev/null and the command still finishes its work. Before, the
    first write after that raised BrokenPipeError and left init half done, with exit status 0."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def _gone(self) -> None:
        try:  # the descriptor too: the interpreter flushes it again at exit
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)
        except (OSError, ValueError, io.UnsupportedOperation):
            pass
        self._stream = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._gone()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._gone()

    def isatty(self) -> bool:
        return self._stream.isatty()

    def fileno(self) -> int:
        return self._stream.fileno()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    func: Callable[[argparse.Namespace], int | None] = args.func
    real_stdout = sys.stdout
    sys.stdout = _ReaderMayLeave(real_stdout)
    try:
        return int(func(args) or 0)
    except MailhubError as exc:
        print(f"mailhub: error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"mailhub: hint: {exc.hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if args.debug:
            raise
        print(f"mailhub: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        print("mailhub: hint: run again with --debug for details, and report it", file=sys.stderr)
        return 70
    finally:
        sys.stdout = real_stdout


if __name__ == "__main__":
    raise SystemExit(main())
