"""What a task looks like to a policy: observation and action layouts with units, bounds, goal, success
rule. Drivers describe their own task here (`task_spec()`); `enpire.tasks` adds the fleet's cards."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Field:
    """A slice of the observation or action vector: [start, start + size)."""

    name: str
    start: int
    size: int
    unit: str
    meaning: str


@dataclass(frozen=True)
class ObservationKind:
    dim: int
    fields: tuple[Field, ...]
    note: str = ""


@dataclass(frozen=True)
class TaskSpec:
    name: str
    driver: str
    title: str
    observations: dict[str, ObservationKind]  # by kind ("state", ...)
    action_fields: tuple[Field, ...]
    action_low: tuple[float, ...]
    action_high: tuple[float, ...]
    action_meaning: str
    goal: str
    success: str
    score: str
    control_hz: float
    horizon: int  # the task's own episode length (a config may shorten it)
    geometry: str = ""
    template: str = ""  # module of the starting template policy ("" = none)
    observation_templates: dict[str, str] = field(default_factory=dict)  # another template for an observation kind
    goal_value: tuple[float, ...] = ()  # a fixed goal, when the task has one (checked against the driver)
