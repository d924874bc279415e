"""The task registry: one entry per task the fleet runs, and the card an agent reads about it.

A task names its driver (`hw.make_driver`), the observation layout per observation kind (with units),
what an action means and its bounds, the goal, the control rate, the success rule, and the template a
team may start from. The card adds what the fleet's configuration decides (horizon, per-step deadline,
largest action change, pass@k attempts) and the policy protocol, so an agent is told everything that
bounds a policy in one place. `tests/test_tasks.py` checks every card against the driver's real spaces.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from hw.taskspec import Field, ObservationKind, TaskSpec

__all__ = ["Field", "ObservationKind", "TaskSpec"]  # defined with the drivers, which fill them in too

ON_FAILURE_KEYS = ("attempt", "reason", "score")  # what Policy.on_failure(info) receives (pass@k)


def _pusht() -> TaskSpec:
    state = ObservationKind(5, (
        Field("agent_x", 0, 1, "px", "pusher centre x"),
        Field("agent_y", 1, 1, "px", "pusher centre y"),
        Field("block_x", 2, 1, "px", "T block reference point x (middle of the top edge of the T's bar)"),
        Field("block_y", 3, 1, "px", "T block reference point y"),
        Field("block_angle", 4, 1, "rad", "T block rotation (not wrapped: any real number)"),
    ), note="world frame [0, 512]^2 px, y grows downwards on the rendered image")
    pixels = ObservationKind(2, (
        Field("agent_x", 0, 1, "px", "pusher centre x (obs['agent_pos'][0])"),
        Field("agent_y", 1, 1, "px", "pusher centre y (obs['agent_pos'][1])"),
    ), note="obs is a dict: 'agent_pos' (2,) float64 as above and 'pixels' (96, 96, 3) uint8 RGB, the scene "
            "seen from above after the step (goal T green, block T grey, pusher blue); the block's pose is "
            "only in the image")
    return TaskSpec(
        name="pusht", driver="pusht", title="Push-T (gym-pusht 0.1.8)",
        observations={"state": state, "pixels": pixels},
        action_fields=(Field("target_x", 0, 1, "px", "pusher target x"),
                       Field("target_y", 1, 1, "px", "pusher target y")),
        action_low=(0.0, 0.0), action_high=(512.0, 512.0),
        action_meaning="absolute target position of the round pusher (radius 15 px); a PD controller "
                       "(kp 100, kv 20) drives the pusher towards it during each 0.1 s control step",
        goal="put the T block on the goal pose (x 256, y 256, angle pi/4 rad), drawn as a green T",
        success="coverage > 0.95: area of (block ∩ goal T) / area of the goal T, judged by the trusted "
                "verifier from the simulator state after the episode",
        score="progress = min(1, coverage / 0.95), in [0, 1]",
        control_hz=10.0, horizon=300,
        geometry="The T is two 30 px thick boxes in its body frame (origin = reference point): the bar "
                 "x in [-60, 60], y in [0, 30]; the stem x in [-15, 15], y in [30, 120]. A body point (u, v) "
                 "is at (x + u cos a - v sin a, y + u sin a + v cos a) in the world. Walls at 5 and 506 px.",
        template="enpire.agents.pusht_policy",
        # from pixels: perception inside the policy (a pose estimate from the frame) feeding that controller
        observation_templates={"pixels": "enpire.agents.pusht_pixels_policy"},
        goal_value=(256.0, 256.0, math.pi / 4),
    )


def _metaworld(name: str, title: str, objects: tuple[Field, ...], goal: str, success: str, template: str) -> TaskSpec:
    # Meta-World's 39-dim goal-observable layout: hand (3), gripper (1), two objects' pos+quat (14), the same
    # 18 values of the previous step, then the goal position (3).
    now = (Field("hand_pos", 0, 3, "m", "end-effector (hand body) x, y, z; the point between the fingertips "
                                          "is about 0.045 m below it"),
           Field("gripper", 3, 1, "[0, 1]", "finger opening, 1 = open"),
           *objects)
    prev = tuple(Field(f"prev_{f.name}", 18 + f.start, f.size, f.unit, f"{f.name} one step earlier") for f in now)
    state = ObservationKind(39, (*now, *prev, Field("goal_pos", 36, 3, "m", "target position x, y, z")),
                            note="world frame in metres (x right, y away from the robot, z up); unused object "
                                 "slots are zeros")
    return TaskSpec(
        name=name, driver=name, title=title, observations={"state": state},
        action_fields=(Field("dx", 0, 1, "cm", "hand motion along x"), Field("dy", 1, 1, "cm", "along y"),
                       Field("dz", 2, 1, "cm", "along z"), Field("grip", 3, 1, "-", "gripper effort: -1 open, +1 close")),
        action_low=(-1.0,) * 4, action_high=(1.0,) * 4,
        action_meaning="[dx, dy, dz, grip] in [-1, 1]^4: each step moves the hand's mocap target by "
                       "action * 1 cm (clipped to the workspace); grip is the finger effort",
        goal=goal, success=success, score="progress = clip(reward / 10, 0, 1) of Meta-World's shaped reward",
        control_hz=80.0, horizon=500, template=template,
    )


def _object(name: str, meaning: str) -> tuple[Field, ...]:
    return (Field(f"{name}_pos", 4, 3, "m", meaning), Field(f"{name}_quat", 7, 4, "-", f"{name} orientation (w, x, y, z)"),
            Field("object2", 11, 7, "-", "second object slot (unused: zeros)"))


TASKS: dict[str, TaskSpec] = {t.name: t for t in (
    _pusht(),
    _metaworld("peg-insert-side-v3", "Meta-World peg insertion (side)", _object("peg", "peg position"),
               "grasp the peg and insert it sideways into the hole of the box; goal_pos is the hole",
               "the peg is within 0.07 m of the goal (Meta-World's info['success'])",
               "enpire.agents.metaworld_peg_policy"),
    _metaworld("drawer-open-v3", "Meta-World drawer open", _object("handle", "drawer handle position"),
               "pull the drawer open by its handle until the handle reaches goal_pos",
               "the handle is within 0.03 m of the goal (Meta-World's info['success'])",
               "enpire.agents.metaworld_drawer_policy"),
    _metaworld("door-open-v3", "Meta-World door open", _object("handle", "door handle position"),
               "swing the door open by its handle; goal_pos is where the handle ends up",
               "|handle x - goal x| <= 0.08 m (Meta-World's info['success'])", ""),
)}


def spec(name: str, options: dict | None = None) -> TaskSpec:
    """The spec of a built-in task, or of a plugin driver's (entry point or "package.module:Class"): the
    driver describes its own task with `task_spec()` (a LeRobot robot: from its features and options)."""
    if name in TASKS:
        return TASKS[name]
    from hw.plugins import PluginError, driver_class, make_driver

    try:
        cls = driver_class(name)
    except PluginError as e:
        raise KeyError(f"unknown task {name!r}; known: {', '.join(TASKS)} ({e})") from None
    describe = getattr(cls, "task_spec", None)
    if describe is None:
        raise KeyError(f"driver {name!r} gives no task card: define task_spec() -> enpire.tasks.TaskSpec on its class")
    if isinstance(cls.__dict__.get("task_spec"), (classmethod, staticmethod)):
        return describe()
    return make_driver(name, **(options or {})).task_spec()  # the robot's own features decide


@dataclass(frozen=True)
class TaskCard:
    """What an agent is told about its task: the spec plus the fleet's limits."""

    spec: TaskSpec
    observation: str = "state"
    horizon: int = 0
    act_deadline_s: float = 0.05
    max_delta: float = 0.0  # largest change between consecutive actions (per dimension); 0 = none
    max_missed: int = 3  # consecutive missed act() deadlines that end an episode as policy_timeout
    attempts: int = 1
    allowed_imports: str = ("the Python standard library and numpy (any installed third-party package loads, "
                            "but nothing of the fleet: enpire, hw, bus, actors are refused); no files outside "
                            "the sandbox's scratch dir, no sockets, no subprocesses")
    extra: dict[str, str] = field(default_factory=dict)
    fleet_goal: str = ""  # the fleet's target and how the judge decides it (judging.goal), with a config

    @property
    def obs(self) -> ObservationKind:
        try:
            return self.spec.observations[self.observation]
        except KeyError:
            raise KeyError(f"task {self.spec.name!r} has no {self.observation!r} observation; "
                           f"kinds: {', '.join(self.spec.observations)}") from None

    def render(self) -> str:
        s, o = self.spec, self.obs
        def rows(fields: tuple[Field, ...]) -> str:
            return "\n".join(f"  [{f.start}{'' if f.size == 1 else f':{f.start + f.size}'}] {f.name} ({f.unit}): {f.meaning}"
                             for f in fields)
        lines = [
            f"# Task card: {s.name} — {s.title}",
            f"Goal: {s.goal}.",
            *([f"Fleet goal: {self.fleet_goal}"] if self.fleet_goal else []),
            f"Observation ({self.observation}, {o.dim} values; {o.note}):\n{rows(o.fields)}",
            f"Action ({len(s.action_low)} values, bounds low {list(s.action_low)} high {list(s.action_high)}): "
            f"{s.action_meaning}.\n{rows(s.action_fields)}",
        ]
        if s.geometry:
            lines.append(f"Geometry: {s.geometry}")
        limit = f"at most {self.max_delta:g} per dimension between consecutive actions" if self.max_delta else "none"
        lines += [
            f"Control: {s.control_hz:g} Hz, horizon {self.horizon or s.horizon} steps; act() must answer within "
            f"{self.act_deadline_s * 1000:.0f} ms (a missed deadline holds the last action; {self.max_missed} in a row "
            f"end the episode as policy_timeout). Largest action change: {limit}. Every action is checked for shape, finiteness, bounds "
            "and change; a violation ends the episode as safety_violation.",
            f"Success: {s.success}. Score: {s.score}.",
            f"pass@k: up to {self.attempts} attempt(s) per episode; after a failed attempt the policy's "
            f"on_failure(info) gets a dict with keys {', '.join(ON_FAILURE_KEYS)} and the next attempt continues "
            "from where the failed one left the scene.",
            f"A policy may import {self.allowed_imports}.",
        ]
        template = s.observation_templates.get(self.observation, s.template)
        if template:
            lines.append(f"Starting template: {template} (on main when the fleet starts from it).")
        lines += [f"{k}: {v}" for k, v in self.extra.items()]
        return "\n".join(lines)


def card(name: str, config=None) -> TaskCard:
    """The card of task `name`: a key of the config's [tasks] table (its driver names the spec) with the
    fleet's horizon, deadline, action limit and attempts, or without a config a driver name and the
    task's own defaults."""
    if config is None:
        s = spec(name)
        return TaskCard(s, horizon=s.horizon)
    from enpire.judging import goal  # the judge's rules, not needed for a card without a fleet

    task = config.tasks.get(name)
    if task is None:
        raise KeyError(f"task {name!r} is not in the configuration's [tasks] ({', '.join(config.tasks)})")
    return TaskCard(spec(task.driver, dict(task.driver_options)), observation=task.observation, horizon=task.horizon,
                    act_deadline_s=config.sandbox.act_timeout_s, max_delta=task.limits.max_delta,
                    max_missed=config.sandbox.max_missed_deadlines, attempts=task.attempts, fleet_goal=goal(config))
