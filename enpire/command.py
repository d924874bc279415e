"""How a command ends: with its `main`'s exit code, or quietly when its reader went away."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import NoReturn


def run(main: Callable[..., int], *args: object, **kwargs: object) -> int:
    try:
        code = main(*args, **kwargs)
        sys.stdout.flush()  # here, not at exit, where a closed pipe prints a traceback no one can catch
        return code
    except BrokenPipeError:  # `enpire status | head -1`: stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush cannot fail again
        return 1


class Parser(argparse.ArgumentParser):
    """argparse that says what is wrong in one line, exit 2, as every start-up failure does (argparse's
    own prints the whole usage first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")
