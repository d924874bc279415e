"""How a command ends: with its `main`'s exit code, or quietly when its reader went away."""

from __future__ import annotations

import argparse
import math
import os
import sys
import typing
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


def bounded(kind: type, low: float, high: float, *, low_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite `kind` (int or float) in [low, high] ((low, high] with `low_open`); a value
    outside is one line naming the flag (a negative timeout, a priority of 200)."""
    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {kind.__name__} value: {text!r}") from None
        if not (math.isfinite(value) and (value > low if low_open else value >= low) and value <= high):
            raise argparse.ArgumentTypeError(f"{text} is outside {'(' if low_open else '['}{low:.15g}, {high:.15g}]")
        return value
    convert.__name__ = kind.__name__
    return convert


def annotated(hint) -> Callable[[str], float]:
    """An argparse type with the bounds of an `Annotated[int | float, msgspec.Meta(...)]` of the config schema:
    the flag and the key share one definition (e.g. `Seconds`, `Fraction`)."""
    meta = hint.__metadata__[0]
    low = meta.gt if meta.gt is not None else meta.ge
    high = meta.le if meta.le is not None else meta.lt
    return bounded(typing.get_args(hint)[0], low, high, low_open=meta.gt is not None)


def like(struct: type, field: str) -> Callable[[str], float]:
    """`annotated` for a field of a config struct (a cell's --act-timeout and [sandbox] act_timeout_s)."""
    return annotated(typing.get_type_hints(struct, include_extras=True)[field])
