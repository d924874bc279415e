"""Meta-World (3.x, MuJoCo) driver for single manipulation tasks.

One task environment per driver, built from Meta-World's own task class with the goal observable (the
39-dim observation the shipped scripted policies expect). `reset(seed)` draws the object and goal
placement from the env's generator seeded with `seed`: different seeds give different starts, the same
seed gives the same start. Success is the env's own `info["success"]`.

Rendering needs an OpenGL backend (MUJOCO_GL=egl, osmesa or glfw with a display). Where none works,
`frame()` returns None and `render_error` says why; verification uses the state either way.
"""

from __future__ import annotations

import warnings

import numpy as np

try:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from metaworld.env_dict import ALL_V3_ENVIRONMENTS
except ImportError as e:  # hw.make_driver turns this into an install hint
    raise ImportError(f"Meta-World is not installed: pip install 'enpire[metaworld]' ({e})") from e

from hw.driver import Driver

TASKS = ("peg-insert-side-v3", "drawer-open-v3", "door-open-v3")


class MetaWorldDriver(Driver):
    name = "metaworld"
    observation_dim = 39  # hand (3), gripper (1), objects (14), previous of those (18), goal (3)

    def __init__(self, task: str, frame_size: int = 224, terminate_on_success: bool = True) -> None:
        if task not in ALL_V3_ENVIRONMENTS:
            raise ValueError(f"unknown Meta-World task {task!r}; supported: {', '.join(TASKS)}")
        self.task = task
        self.frame_size = int(frame_size)
        self.terminate_on_success = terminate_on_success
        self.action_low = -np.ones(4, dtype=np.float64)
        self.action_high = np.ones(4, dtype=np.float64)
        self.horizon = 500
        self.render_error: str | None = None
        self._env = None
        self._last_obs: np.ndarray | None = None
        self._last_reward = 0.0
        self._last_info: dict = {}

    # ------------------------------------------------------------------ lifecycle

    def connect(self) -> None:
        if self._env is not None:
            return
        env = ALL_V3_ENVIRONMENTS[self.task](render_mode="rgb_array", width=self.frame_size, height=self.frame_size)
        # What Meta-World's goal-observable variants do, but with a per-reset seed instead of a frozen
        # start: the goal is in the observation and each reset samples a new start from env.np_random.
        env._partially_observable = False
        del env.sawyer_observation_space  # cached property: recomputed for the observable goal
        env._set_task_called = True
        env._freeze_rand_vec = False
        env.seeded_rand_vec = True
        self._env = env
        self.horizon = int(env.max_path_length)

    def disconnect(self) -> None:
        if self._env is not None:
            try:
                self._env.close()
            except Exception:  # a renderer that never started may fail to close
                pass
            self._env = None

    @property
    def env(self):
        if self._env is None:
            self.connect()
        return self._env

    # ------------------------------------------------------------------ control

    def reset(self, seed: int) -> np.ndarray:
        env = self.env
        env.seed(int(seed))
        obs, _ = env.reset()
        self._last_obs = np.asarray(obs, dtype=np.float64)
        # The start can already be a success (rare): judge it the way a step would.
        self._last_reward, self._last_info = env.evaluate_state(self._last_obs, np.zeros(4))
        return self._last_obs.copy()

    def act(self, action: np.ndarray) -> np.ndarray:
        """One MuJoCo step (Meta-World scores inside it, so `outcome()` only reads what it computed)."""
        a = np.clip(np.asarray(action, dtype=np.float64).reshape(4), -1.0, 1.0)
        obs, reward, _terminated, _truncated, info = self.env.step(a)
        self._last_obs = np.asarray(obs, dtype=np.float64)
        self._last_reward, self._last_info = float(reward), dict(info)
        return self._last_obs.copy()

    def outcome(self) -> tuple[float, bool]:
        # Meta-World never terminates by itself; its benchmarks stop an episode on success.
        return self._last_reward, self.terminate_on_success and bool(self._last_info.get("success", 0.0))

    # ------------------------------------------------------------------ trusted reads

    def trusted_state(self) -> dict[str, list[float]]:
        env = self.env
        info = self._last_info
        return {
            "success": [1.0 if info.get("success", 0.0) else 0.0],
            "progress": [float(np.clip(self._last_reward / 10.0, 0.0, 1.0))],  # v2 rewards lie in [0, 10]
            "obj_pos": [float(v) for v in env._get_pos_objects()],
            "goal_pos": [float(v) for v in env._target_pos],
            "hand_pos": [float(v) for v in env.tcp_center],
            "obj_to_target": [float(info.get("obj_to_target", np.nan))],
            "steps": [float(env.curr_path_length)],
        }

    def frame(self) -> np.ndarray | None:
        if self.render_error is not None:
            return None
        try:
            img = self.env.render()
        except Exception as e:  # no GL backend headless: say so once, then stop trying
            self.render_error = f"{type(e).__name__}: {e}"
            return None
        return None if img is None else np.ascontiguousarray(img, dtype=np.uint8)
