"""A simulated arm that is a LeRobot `Robot`: Push-T behind it, simulated latency, one camera.

It lets the whole real-robot path (LeRobot driver, person in the loop, e-stop, dataset export) run
without hardware. Like a real arm it has named joints ("x.pos", "y.pos": the end effector's target
in Push-T's 512x512 workspace), a camera ("top"), and no idea of seeds; unlike one it also reports the
block's pose (as a motion-capture tracker would) and offers `reset_scene(seed)` / `scene_state()`,
the simulator's stand-ins for a person's hands and for ground truth.

Needs LeRobot (see README: LeRobot robots). Register the config type by importing this module.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from lerobot.robots import Robot, RobotConfig

from hw.pusht import PushTDriver


@RobotConfig.register_subclass("enpire_sim_pusht")
@dataclass(kw_only=True)
class SimPushTArmConfig(RobotConfig):
    latency_s: float = 0.005  # each send_action and get_observation takes this long (a serial bus round trip)
    frame_size: int = 256  # camera resolution; the vision verifier needs >= 256
    log_file: str = ""  # when set: one JSON line per command (monotonic time, action) and per reset, for timing checks
    # When set: the scene's state at each reset and each time the scene is read (an episode's end, before a
    # verdict), where a scripted operator "looks". Not after every command: on a disk busy with the fleet's
    # fsyncs, replacing the file stalled the 10 Hz command loop by up to 0.45 s.
    scene_file: str = ""
    fail_connect: bool = False  # a robot that is unplugged
    camera_fails_after: int = -1  # the camera returns no frame after this many observations (-1: never)


class SimPushTArm(Robot):
    config_class = SimPushTArmConfig
    name = "enpire_sim_pusht"

    def __init__(self, config: SimPushTArmConfig):
        super().__init__(config)
        self.config = config
        self.sim = PushTDriver(frame_size=config.frame_size)
        self._connected = False
        self._observations = 0
        self._log = None

    @property
    def observation_features(self) -> dict:
        return {"x.pos": float, "y.pos": float, "block.x": float, "block.y": float, "block.theta": float,
                "top": (self.config.frame_size, self.config.frame_size, 3)}

    @property
    def action_features(self) -> dict:
        return {"x.pos": float, "y.pos": float}

    @property
    def is_connected(self) -> bool:
        return self._connected

    @property
    def is_calibrated(self) -> bool:
        return True  # a simulator needs no calibration

    def calibrate(self) -> None:
        pass

    def configure(self) -> None:
        pass

    def connect(self, calibrate: bool = True) -> None:
        if self.config.fail_connect:
            raise ConnectionError("no device answers (simulated unplugged arm)")
        self.sim.connect()
        self.sim.reset(0)
        if self.config.log_file:
            self._log = open(self.config.log_file, "a", buffering=1)
        self._connected = True

    def disconnect(self) -> None:
        self._connected = False
        self.sim.disconnect()
        if self._log is not None:
            self._log.close()
            self._log = None

    def reset_scene(self, seed: int) -> None:
        self.sim.reset(seed)
        self._record({"t": time.monotonic(), "reset": seed})
        self._show()

    def scene_state(self) -> dict[str, list[float]]:
        self._show()
        return self.sim.trusted_state()

    def get_observation(self) -> dict:
        if not self._connected:
            raise ConnectionError(f"{self} is not connected")
        time.sleep(self.config.latency_s)
        obs = self.sim.env.get_obs()
        self._observations += 1
        failing = 0 <= self.config.camera_fails_after < self._observations
        frame = None if failing else self.sim.frame()
        return {"x.pos": float(obs[0]), "y.pos": float(obs[1]), "block.x": float(obs[2]), "block.y": float(obs[3]),
                "block.theta": float(obs[4]), "top": frame}

    def send_action(self, action: dict) -> dict:
        if not self._connected:
            raise ConnectionError(f"{self} is not connected")
        target = np.array([action["x.pos"], action["y.pos"]], dtype=np.float64)
        self._record({"t": time.monotonic(), "action": target.tolist()})
        time.sleep(self.config.latency_s)
        self.sim.act(target)
        return {"x.pos": float(target[0]), "y.pos": float(target[1])}

    def _record(self, line: dict) -> None:
        if self._log is not None:
            self._log.write(json.dumps(line) + "\n")

    def _show(self) -> None:
        if self.config.scene_file:
            path = Path(self.config.scene_file)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.sim.trusted_state()))
            tmp.replace(path)
