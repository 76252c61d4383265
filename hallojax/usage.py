"""What every command line shares: the user-error classes, an argparse that raises instead of exiting,
and the one-line error printer. Below `hallojax.cli`, so that the commands it dispatches to (bench, the data
pipeline's prepare and synthetic) can build their parsers without importing it back."""

from __future__ import annotations

import argparse
import sys

# every hallojax error class (ConfigError, ConversionError, CheckpointError, SafetensorsError, UsageError)
# is a ValueError; OSError covers unreadable or unwritable paths
USER_ERRORS = (ValueError, OSError)


class UsageError(ValueError):
    """Bad command-line arguments, from `ArgumentParser.error`; `prog` is the command they were given to."""

    def __init__(self, prog: str, message: str):
        super().__init__(message)
        self.prog = prog


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors raise `UsageError` instead of printing the usage block and exiting, so a bad
    argument ends like every other user error: one line, status 2 (and `main` returns instead of exiting)."""

    def error(self, message):
        raise UsageError(self.prog, f"{message} (usage: {self.prog} --help)")


def print_error(prog: str, error: BaseException) -> None:
    """`PROG: error: MESSAGE` on stderr. A path that is not UTF-8 is shown escaped instead of failing to print."""
    text = f"{getattr(error, 'prog', prog)}: error: {error}"
    print(text.encode("utf-8", "backslashreplace").decode("utf-8"), file=sys.stderr)
