"""A driver for any LeRobot `Robot` (SO-101, Koch, ... or a simulated arm that subclasses `Robot`).

The robot's own interface does the work: `connect()` (LeRobot's calibration flow stays LeRobot's),
`get_observation()`, `send_action()`, `disconnect()`. Its `observation_features` become the named
observation layout: every scalar feature (e.g. "shoulder_pan.pos") is one component of the vector the
policy sees, in the robot's order; every (H, W, 3) feature is a camera whose latest frame the verifier
(and the episode record) may use. `action_features` name the action vector's components; their limits
come from the task (`[tasks.X.limits.joints]`), never from the policy.

A real robot has no reward and no seeded reset: the scene is reset by a person or an approved reset
program (enpire/realcell.py) before `reset()` reads the first observation. A simulated robot may offer
`reset_scene(seed)` and `scene_state()` (trusted simulator state for a state verifier); real ones do not.

LeRobot itself is imported only through the robot class named in the options, so this module loads in
an environment without LeRobot (the config check names the driver without building it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from hw.driver import DriverError
from hw.plugins import PluginError, load_object


def build_robot(spec: str, config: Mapping[str, Any]):
    """A LeRobot robot from "package.module:RobotClass" and the fields of its `config_class`."""
    cls = load_object(spec, f"robot {spec!r}")
    config_class = getattr(cls, "config_class", None)
    if config_class is None:
        raise PluginError(f"robot {spec!r}: not a LeRobot Robot (no config_class)")
    try:
        import draccus

        robot_config = draccus.decode(config_class, dict(config))  # nested fields (cameras) as LeRobot parses them
    except ImportError:
        robot_config = config_class(**config)
    except Exception as e:  # noqa: BLE001 - draccus raises its own errors for unknown or mistyped fields
        raise PluginError(f"robot {spec!r}: bad config {dict(config)}: {str(e).splitlines()[0]}") from None
    return cls(robot_config)


class LeRobotDriver:
    name = "lerobot"
    verifier = None  # depends on the scene, not on the robot: the task's `verifier_kind` names it

    observation_modes = ("state", "pixels")

    def __init__(self, task: str = "lerobot", robot: str | Any = "", config: Mapping[str, Any] | None = None,
                 camera: str = "", calibrate: bool = True, pixels_size: int = 0) -> None:
        """`robot`: "package.module:RobotClass" (with `config` for its config class) or a Robot instance;
        `camera`: the camera the verifier judges and a pixels policy sees (default: the first one);
        `pixels_size`: side of the square frame a pixels policy gets (0: the camera's own size)."""
        if not robot:
            raise PluginError("driver 'lerobot': option 'robot' is required ('package.module:RobotClass')")
        self.task = task
        self.robot = build_robot(robot, config or {}) if isinstance(robot, str) else robot
        self.calibrate = bool(calibrate)
        features = dict(self.robot.observation_features)
        self.observation_names = [k for k, v in features.items() if not isinstance(v, tuple)]
        self.cameras = [k for k, v in features.items() if isinstance(v, tuple) and len(v) == 3]
        self.action_names = list(self.robot.action_features)
        if camera and camera not in self.cameras:
            raise PluginError(f"driver 'lerobot': camera {camera!r} is not among the robot's cameras {self.cameras}")
        self.camera = camera or (self.cameras[0] if self.cameras else "")
        self.observation_dim = len(self.observation_names)
        # No limits of its own: a real arm's come from the task, and the cell refuses to move without them.
        self.action_low = np.full(len(self.action_names), -np.inf)
        self.action_high = np.full(len(self.action_names), np.inf)
        self.frames: dict[str, np.ndarray] = {}
        self.pixels_size = int(pixels_size)
        self.obs_type = "state"
        self.record_frames = bool(self.camera)  # the cell keeps the verifier camera's frame of every step
        self._last: dict[str, Any] = {}

    def set_observation(self, mode: str) -> None:
        """"state": the scalar features as one vector; "pixels": {"pixels": the camera's frame,
        "agent_pos": that vector} (the task's `observation`)."""
        if mode not in self.observation_modes:
            raise ValueError(f"LeRobotDriver observation must be one of {', '.join(self.observation_modes)}, not {mode!r}")
        if mode == "pixels" and not self.camera:
            raise ValueError(f"robot {self.robot} has no camera for a pixels observation")
        self.obs_type = mode

    # ------------------------------------------------------------------ lifecycle

    def connect(self) -> None:
        if getattr(self.robot, "is_connected", False):
            return
        try:
            self.robot.connect(calibrate=self.calibrate)
        except Exception as e:  # noqa: BLE001 - serial ports, USB cameras, simulators: any failure is one line
            raise DriverError(f"robot {self.robot} failed to connect: {type(e).__name__}: {e}") from None

    def disconnect(self) -> None:
        if getattr(self.robot, "is_connected", False):
            self.robot.disconnect()

    # ------------------------------------------------------------------ control

    def _observe(self) -> np.ndarray:
        try:
            obs = self.robot.get_observation()
        except Exception as e:  # noqa: BLE001
            raise DriverError(f"robot {self.robot}: get_observation failed: {type(e).__name__}: {e}") from None
        missing = [k for k in (*self.observation_names, *self.cameras) if k not in obs]
        if missing:
            raise DriverError(f"robot {self.robot}: observation lacks {missing[0]!r}")
        for cam in self.cameras:
            frame = obs[cam]
            if frame is None or getattr(frame, "size", 0) == 0:
                raise DriverError(f"camera {cam!r} returned no frame")
            self.frames[cam] = np.asarray(frame, dtype=np.uint8)
        self._last = obs
        state = np.array([float(obs[k]) for k in self.observation_names], dtype=np.float64)
        if self.obs_type == "pixels":
            frame = self.frames[self.camera]
            if self.pixels_size and frame.shape[:2] != (self.pixels_size, self.pixels_size):
                import cv2

                frame = cv2.resize(frame, (self.pixels_size, self.pixels_size), interpolation=cv2.INTER_AREA)
            return {"pixels": frame, "agent_pos": state}
        return state

    def reset(self, seed: int) -> np.ndarray | dict[str, np.ndarray]:
        """The scene was reset (by a person or a reset program); a simulated robot reseeds its scene here."""
        if callable(getattr(self.robot, "reset_scene", None)):
            self.robot.reset_scene(int(seed))
        return self._observe()

    def act(self, action: np.ndarray) -> np.ndarray | dict[str, np.ndarray]:
        command = {name: float(v) for name, v in zip(self.action_names, np.asarray(action, dtype=np.float64), strict=True)}
        try:
            self.robot.send_action(command)
        except Exception as e:  # noqa: BLE001
            raise DriverError(f"robot {self.robot}: send_action failed: {type(e).__name__}: {e}") from None
        return self._observe()

    def outcome(self) -> tuple[float, bool]:
        return 0.0, False  # a real robot has no reward signal: the verifier decides at the end

    def step(self, action: np.ndarray):
        from hw.driver import StepResult

        return StepResult(observation=self.act(action), reward=0.0, done=False)

    def halt(self) -> None:
        """E-stop: command every joint to where it is now (those the robot reports), then stop commanding."""
        hold = {name: float(self._last[name]) for name in self.action_names if name in self._last}
        if hold and len(hold) == len(self.action_names):
            try:
                self.robot.send_action(hold)
            except Exception:  # noqa: BLE001 - halting must not raise; the cell stops commanding anyway
                pass

    # ------------------------------------------------------------------ trusted reads

    def trusted_state(self) -> dict[str, list[float]]:
        state = {k: [float(self._last[k])] for k in self.observation_names if k in self._last}
        if callable(getattr(self.robot, "scene_state", None)):  # a simulator's trusted scene
            state.update(self.robot.scene_state())
        return state

    def frame(self) -> np.ndarray | None:
        return self.frames.get(self.camera)

    def task_spec(self):
        """The task card's layout from the robot's features (the goal and success rule are the person's and
        the verifier's: the card says so)."""
        from hw.taskspec import Field, ObservationKind, TaskSpec

        state = ObservationKind(self.observation_dim, tuple(
            Field(n, i, 1, "robot units", f"LeRobot observation feature {n!r}") for i, n in enumerate(self.observation_names)),
            note=f"the robot's scalar observation features in its order; cameras: {', '.join(self.cameras) or 'none'}")
        kinds = {"state": state}
        if self.camera:
            shape = self.robot.observation_features[self.camera]
            size = f"({self.pixels_size}, {self.pixels_size}, 3)" if self.pixels_size else str(tuple(shape))
            kinds["pixels"] = ObservationKind(self.observation_dim, state.fields,
                                              note=f"obs is a dict: 'agent_pos' the vector above, 'pixels' {size} "
                                                   f"uint8 RGB from camera {self.camera!r}")
        return TaskSpec(
            name=self.task, driver="lerobot", title=f"LeRobot robot {type(self.robot).__name__}",
            observations=kinds,
            action_fields=tuple(Field(n, i, 1, "robot units", f"LeRobot action feature {n!r}")
                                for i, n in enumerate(self.action_names)),
            action_low=tuple(float(v) for v in self.action_low), action_high=tuple(float(v) for v in self.action_high),
            action_meaning="goal values sent to the robot with send_action (the task's limits.joints bound them)",
            goal="the task the person set up at this cell (the fleet's task name: " + self.task + ")",
            success="the person's label, or the verifier program's once it agrees with the person",
            score="the verifier program's score", control_hz=10.0, horizon=300)

    def describe(self) -> str:
        return (f"{self.robot}: observation {self.observation_names}, cameras {self.cameras}, "
                f"actions {self.action_names}")


def measured_period(stamps: list[float]) -> dict[str, float]:
    """Step periods from command timestamps: mean, p50, p99, max (seconds)."""
    d = np.diff(np.asarray(stamps, dtype=np.float64))
    if d.size == 0:
        return {"n": 0}
    return {"n": int(d.size), "mean": float(d.mean()), "p50": float(np.percentile(d, 50)),
            "p99": float(np.percentile(d, 99)), "max": float(d.max())}

