"""Drivers and verifiers by name: built in, an installed plugin's entry point, or "package.module:Attr".

A user adds a robot without editing enpire: a package that declares

    [project.entry-points."enpire.drivers"]
    my-arm = "my_pkg.driver:MyArmDriver"

(or a task with `driver = "my_pkg.driver:MyArmDriver"` in enpire.toml) is found here. A driver class
says which trusted check judges its scenes with a `verifier` attribute: a built-in kind of
`enpire.verify` ("pusht", "metaworld") or "package.module:function" taking (state, frame, method) and
returning a `bus.messages.Verdict`. Every failure is a `PluginError` of one line naming the name.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

GROUP = "enpire.drivers"
METAWORLD_TASKS = ("peg-insert-side-v3", "drawer-open-v3", "door-open-v3")
# Built-in drivers: name -> where the class lives. Meta-World's class takes the task as its first argument.
BUILTIN = {
    "pusht": "hw.pusht:PushTDriver",
    "lerobot": "hw.lerobot:LeRobotDriver",
    **{task: "hw.metaworld:MetaWorldDriver" for task in METAWORLD_TASKS},
}
BUILTIN_VERIFIER = {"pusht": "pusht", **{task: "metaworld" for task in METAWORLD_TASKS}}
INSTALL_HINT = {"hw.metaworld": "pip install 'enpire[metaworld]'", "hw.lerobot": "see README: LeRobot robots"}


class PluginError(ValueError):
    """One line: which driver/verifier name and why it cannot be used."""


def load_object(spec: str, what: str = "") -> Any:
    """Import "package.module:Attr" (Attr may be dotted). Errors start with `what` (default: the spec)."""
    what = what or repr(spec)
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise PluginError(f"{what}: expected 'package.module:Name', got {spec!r}")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        hint = INSTALL_HINT.get(module_name)
        raise PluginError(f"{what}: cannot import {module_name!r} ({e})" + (f"; {hint}" if hint else "")) from None
    except Exception as e:  # a plugin that fails as it loads (a syntax error, its own check): one line too
        raise PluginError(f"{what}: importing {module_name!r} failed: {type(e).__name__}: {e}") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise PluginError(f"{what}: module {module_name!r} has no {attr!r}") from None
    return obj


def _entry_points() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def known_drivers() -> list[str]:
    return [*BUILTIN, *sorted(set(_entry_points()) - set(BUILTIN))]


def driver_spec(name: str) -> str:
    """Where driver `name` lives ("package.module:Class"), or PluginError when no such driver exists."""
    if name in BUILTIN:
        return BUILTIN[name]
    if ":" in name:
        return name
    ep = _entry_points().get(name)
    if ep is None:
        raise PluginError(
            f"unknown driver {name!r} (known: {', '.join(known_drivers())}; or an entry point in group "
            f"{GROUP!r}, or 'package.module:Class')"
        )
    return ep.value


def driver_class(name: str) -> type:
    spec = driver_spec(name)
    cls = load_object(spec, f"driver {name!r}" + ("" if spec == name else f" ({spec})"))
    if not callable(cls):
        raise PluginError(f"driver {name!r}: {driver_spec(name)} is not a class")
    return cls


def make_driver(name: str, **options):
    """Build the driver called `name` with its options (a task's `driver_options`)."""
    cls = driver_class(name)
    args = (name,) if name in METAWORLD_TASKS else ()
    try:
        driver = cls(*args, **options)
    except (TypeError, ValueError, KeyError) as e:
        raise PluginError(f"driver {name!r}: {e}") from None
    driver.registry_name = name  # what the cell reports, so replays and exports can build it again
    return driver


def driver_options_problem(name: str, options: dict) -> str | None:
    """Why driver `name` cannot take `options` (a misspelled or unknown keyword), or None. A driver whose
    code is not installed here (cells on other machines) is not checked: its cells say so themselves."""
    try:
        cls = driver_class(name)
    except PluginError:
        return None
    args = (name,) if name in METAWORLD_TASKS else ()
    try:
        inspect.signature(cls).bind(*args, **options)
    except TypeError as e:
        return f"driver {name!r} ({cls.__name__}) does not take them: {e}"
    except ValueError:  # no signature to read: the cells will say
        return None
    return None


def verifier_name(driver: str) -> str:
    """The verifier kind that judges scenes of `driver`: built-in kind or "package.module:function"."""
    if driver in BUILTIN_VERIFIER:
        return BUILTIN_VERIFIER[driver]
    kind = getattr(driver_class(driver), "verifier", None)
    if not isinstance(kind, str) or not kind:
        raise PluginError(f"driver {driver!r} names no verifier: set the task's verifier_kind "
                          "(or give the driver class a `verifier` attribute)")
    return kind


# The built-in verifier kinds (enpire/verify.py) and the methods each judges with.
BUILTIN_METHODS = {"pusht": ("state", "vision"), "metaworld": ("state",)}


def verifier_methods(kind: str) -> tuple[str, ...] | None:
    """The methods verifier `kind` judges with; None for a plugin's function (it is given the method).
    Raises PluginError for a kind that does not exist or a plugin that does not load."""
    if ":" in kind:
        load_verifier(kind)
        return None
    if kind not in BUILTIN_METHODS:
        raise PluginError(f"unknown verifier kind {kind!r}; known: {', '.join(BUILTIN_METHODS)} or "
                          "'package.module:function'")
    return BUILTIN_METHODS[kind]


def load_verifier(spec: str) -> Callable:
    fn = load_object(spec, f"verifier {spec!r}")
    if not callable(fn):
        raise PluginError(f"verifier {spec!r} is not callable")
    return fn
