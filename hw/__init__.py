"""Robot drivers. `make_driver(name)` builds one by name (built in, plugin entry point, or
"package.module:Class"; see `hw/plugins.py`); `hw/driver.py` is the protocol every driver fills."""

from __future__ import annotations

from hw.driver import Driver, StepResult
from hw.plugins import (
    BUILTIN_VERIFIER,
    METAWORLD_TASKS,
    PluginError,
    known_drivers,
    make_driver,
    verifier_name,
)

DRIVERS = ("pusht", *METAWORLD_TASKS)  # the built-in simulators
# Which trusted check (enpire.verify) judges each built-in driver's scenes; plugins: `verifier_name`.
VERIFIER_KIND = BUILTIN_VERIFIER

__all__ = ["DRIVERS", "Driver", "PluginError", "StepResult", "known_drivers", "make_driver", "verifier_name"]
