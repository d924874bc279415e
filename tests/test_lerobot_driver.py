"""The LeRobot driver's mapping of a Robot's features, without LeRobot installed (a robot with the same
interface); tests/lerobot/ runs the same driver on a real LeRobot `Robot` subclass."""

import numpy as np
import pytest

from hw import PluginError, make_driver
from hw.driver import DriverError
from hw.lerobot import LeRobotDriver


class FakeArmConfig:
    def __init__(self, fail_connect=False, blind_after=-1, id=None):
        self.fail_connect, self.blind_after = fail_connect, blind_after


class TwoJointArm:
    """Two joints that go where they are told, a wrist camera; the interface LeRobot's Robot defines."""

    config_class = FakeArmConfig

    def __init__(self, config):
        self.config = config
        self.is_connected = False
        self.q = np.zeros(2)
        self.sent = []
        self.n = 0

    observation_features = {"shoulder.pos": float, "elbow.pos": float, "wrist": (8, 8, 3)}
    action_features = {"shoulder.pos": float, "elbow.pos": float}

    def connect(self, calibrate=True):
        if self.config.fail_connect:
            raise OSError("could not open port /dev/ttyACM0")
        self.is_connected = True

    def get_observation(self):
        self.n += 1
        frame = None if 0 <= self.config.blind_after < self.n else np.full((8, 8, 3), self.n, np.uint8)
        return {"shoulder.pos": self.q[0], "elbow.pos": self.q[1], "wrist": frame}

    def send_action(self, action):
        self.sent.append(dict(action))
        self.q = np.array([action["shoulder.pos"], action["elbow.pos"]])
        return action

    def disconnect(self):
        self.is_connected = False


SPEC = f"{__name__}:TwoJointArm"


def test_features_become_the_named_layout_and_cameras_frames():
    d = make_driver("lerobot", robot=SPEC)
    assert d.observation_names == ["shoulder.pos", "elbow.pos"] and d.cameras == ["wrist"]
    assert d.action_names == ["shoulder.pos", "elbow.pos"] and d.observation_dim == 2
    assert np.isinf(d.action_high).all()  # limits come from the task, never from the driver
    d.connect()
    d.reset(0)
    obs = d.act(np.array([10.0, -5.0]))
    assert obs.tolist() == [10.0, -5.0] and d.robot.sent[-1] == {"shoulder.pos": 10.0, "elbow.pos": -5.0}
    assert d.frame().shape == (8, 8, 3) and d.frame()[0, 0, 0] == 2
    assert d.trusted_state() == {"shoulder.pos": [10.0], "elbow.pos": [-5.0]}
    d.halt()  # holds where it is
    assert d.robot.sent[-1] == {"shoulder.pos": 10.0, "elbow.pos": -5.0}
    assert d.outcome() == (0.0, False)


def test_pixels_observation_gives_the_policy_the_camera():
    d = make_driver("lerobot", robot=SPEC, pixels_size=4)
    d.set_observation("pixels")
    d.connect()
    obs = d.reset(0)
    assert obs["pixels"].shape == (4, 4, 3) and obs["agent_pos"].tolist() == [0.0, 0.0]
    assert d.frame().shape == (8, 8, 3)  # the verifier and the record keep the full frame
    with pytest.raises(ValueError, match="must be one of state, pixels"):
        d.set_observation("depth")


def test_the_robot_features_make_the_task_card():
    from enpire import config as cfg
    from enpire.tasks import card

    config = cfg.decode(f'[cells]\ntask = "arm"\n[agents]\ncount = 0\n[tasks.arm]\ndriver = "lerobot"\nverifier_kind = "pusht"\n'
                        f'[tasks.arm.driver_options]\nrobot = "{SPEC}"\ncamera = "wrist"\n', "x.toml")
    text = card("arm", config).render()
    assert "[0] shoulder.pos (robot units)" in text and "[1] elbow.pos" in text and "camera 'wrist'" not in text
    assert "LeRobot robot TwoJointArm" in text


def test_bad_robots_are_one_line_errors():
    with pytest.raises(PluginError, match="option 'robot' is required"):
        make_driver("lerobot")
    with pytest.raises(PluginError, match="cannot import 'no_such_pkg.arm'"):
        make_driver("lerobot", robot="no_such_pkg.arm:Arm")
    with pytest.raises(PluginError, match="camera 'top' is not among"):
        make_driver("lerobot", robot=SPEC, camera="top")
    d = make_driver("lerobot", robot=SPEC, config={"fail_connect": True})
    with pytest.raises(DriverError, match="failed to connect: OSError: could not open port") as e:
        d.connect()
    assert "\n" not in str(e.value)
    blind = LeRobotDriver(robot=SPEC, config={"blind_after": 2})
    blind.connect()
    blind.reset(0)
    blind.act(np.zeros(2))
    with pytest.raises(DriverError, match="camera 'wrist' returned no frame"):
        blind.act(np.zeros(2))


def test_a_robot_that_fails_to_connect_stops_its_cell_with_one_line(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    options = '{"robot": "tests.test_lerobot_driver:TwoJointArm", "config": {"fail_connect": true}}'
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    r = subprocess.run([sys.executable, "-m", "enpire.cell", "--connect", f"ipc://{tmp_path}/bus", "--cell-id", "c",
                        "--driver", "lerobot", "--driver-options", options], capture_output=True, text=True,
                       timeout=60, env=env)
    assert r.returncode == 5 and r.stderr.count("\n") == 1
    assert "failed to connect: OSError: could not open port /dev/ttyACM0" in r.stderr
