"""How a command ends: with its `main`'s exit code, or quietly when its reader went away."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable


def run(main: Callable[..., int], *args: object, **kwargs: object) -> int:
    try:
        code = main(*args, **kwargs)
        sys.stdout.flush()  # here, not at exit, where a closed pipe prints a traceback no one can catch
        return code
    except BrokenPipeError:  # `enpire status | head -1`: stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush cannot fail again
        return 1
