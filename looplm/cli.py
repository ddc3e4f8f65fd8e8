"""One way for every command-line tool to refuse bad input: one line on stderr, exit status 2.

    if __name__ == "__main__":
        run_cli(main)

A user's mistake (a missing file, a corrupt checkpoint or table, a value out of range) reaches the
user as `prog: error: what was wrong and what is allowed`, never as a traceback. The errors caught
are the ones the library raises for bad input; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, NoReturn, Optional, Sequence

from looplm.backends import BackendUnavailable  # an unknown or unavailable --backend


class CLIError(Exception):
    """Bad input found by a command-line tool; its message is the whole explanation."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, whose refusals (a wrong-typed option, a missing argument) go through run_cli's one
    line like every other user error, rather than a usage block."""

    def error(self, message: str) -> NoReturn:
        raise CLIError(f"{message} (see --help)")


_prog = "looplm"  # the running command's name, for warn(); run_cli sets it


def warn(message: str) -> None:
    """One line on stderr about something the command repaired or skipped: `prog: warning: ...`."""
    print(f"{_prog}: warning: {message}", file=sys.stderr, flush=True)


USER_ERRORS: tuple[type[BaseException], ...] = (CLIError, BackendUnavailable, ValueError, TypeError, LookupError,
                                                 OSError, json.JSONDecodeError)


def run_cli(main: Callable[[Optional[Sequence[str]]], object], argv: Optional[Sequence[str]] = None,
            prog: Optional[str] = None) -> None:
    """Call main(argv) and exit: 0 (or main's int) on success, 2 with one line on bad input."""
    global _prog
    prog = prog or os.path.basename(sys.argv[0]) or "looplm"
    outer, _prog = _prog, prog
    try:
        result = main(argv)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)
    except USER_ERRORS as e:
        message = str(e).strip().splitlines()
        print(f"{prog}: error: {message[0] if message else type(e).__name__}", file=sys.stderr)
        for line in message[1:]:
            print(f"  {line}", file=sys.stderr)
        sys.exit(2)
    finally:
        _prog = outer
    sys.exit(result if isinstance(result, int) else 0)
