"""Robot drivers. `make_driver(name)` builds one by name; see `hw/driver.py` for the protocol."""

from __future__ import annotations

from hw.driver import Driver, StepResult

METAWORLD_TASKS = ("peg-insert-side-v3", "drawer-open-v3", "door-open-v3")
DRIVERS = ("pusht", *METAWORLD_TASKS)
# Which trusted check (enpire.verify) judges each driver's scenes.
VERIFIER_KIND = {"pusht": "pusht", **{task: "metaworld" for task in METAWORLD_TASKS}}


def make_driver(name: str, **options) -> Driver:
    if name == "pusht":
        from hw.pusht import PushTDriver

        return PushTDriver(**options)
    if name in METAWORLD_TASKS:
        try:
            from hw.metaworld import MetaWorldDriver
        except ImportError as e:
            raise ImportError(f"driver {name!r} needs Meta-World: pip install 'enpire[metaworld]' ({e})") from None
        return MetaWorldDriver(name, **options)
    raise ValueError(f"unknown driver {name!r}; known: {', '.join(DRIVERS)}")


__all__ = ["DRIVERS", "Driver", "StepResult", "make_driver"]
