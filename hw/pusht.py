"""Push-T driver over gym-pusht (`gym_pusht/PushT-v0`).

The verifier judges `trusted_state()` (read from the pymunk bodies) or `frame()` (the scene rendered
without gym-pusht's action marker, which would otherwise paint the policy's last target into the
image a vision verifier reads).

Observations: "state" is gym-pusht's [agent_x, agent_y, block_x, block_y, block_angle]; "pixels" is
LeRobot's Push-T image setting, {"pixels": (96, 96, 3) uint8 RGB frame, "agent_pos": (2,) float64}: the
camera frame of the scene after the step (the same drawing `frame()` gives the verifier, at 96x96) and
the pusher's position, never the block's pose.
"""

from __future__ import annotations

import warnings

import numpy as np

from hw.driver import Driver

ENV_ID = "gym_pusht/PushT-v0"
WORKSPACE = 512.0  # gym-pusht's world and action range is [0, 512]^2


OBSERVATIONS = ("state", "pixels")
PIXELS_SIZE = 96  # LeRobot's Push-T image observation


class PushTDriver(Driver):
    name = "pusht"
    observation_modes = OBSERVATIONS

    def __init__(self, task: str = "pusht", obs_type: str = "state", frame_size: int = 256) -> None:
        if task != "pusht":
            raise ValueError(f"PushTDriver drives task 'pusht', not {task!r}")
        if frame_size < 16:
            raise ValueError(f"frame_size must be >= 16, got {frame_size}")
        self.task = task
        self.set_observation(obs_type)
        self.frame_size = int(frame_size)
        self.action_low = np.zeros(2, dtype=np.float64)
        self.action_high = np.full(2, WORKSPACE, dtype=np.float64)
        self.horizon = 300  # the registered TimeLimit; the cell enforces it, not this driver
        self._env = None

    def set_observation(self, mode: str) -> None:
        """What `reset`/`act` return from now on: "state" or "pixels" (see the module docstring)."""
        if mode not in OBSERVATIONS:
            raise ValueError(f"PushTDriver observation must be one of {', '.join(OBSERVATIONS)}, not {mode!r}")
        self.obs_type = mode
        self.observation_dim = 5 if mode == "state" else 2  # the flat part: [agent_x, agent_y] with pixels

    # ------------------------------------------------------------------ lifecycle

    def connect(self) -> None:
        if self._env is not None:
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import gym_pusht  # noqa: F401  (registers the env id)
            import gymnasium as gym
            from pymunk.vec2d import Vec2d

            self._still = Vec2d(0, 0)  # the PD controller's target velocity, as gym-pusht writes it

            # The unwrapped env: the cell owns the horizon, and the passive checker would only warn.
            self._env = gym.make(ENV_ID, obs_type="state").unwrapped

    def disconnect(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None

    @property
    def env(self):
        if self._env is None:
            self.connect()
        return self._env

    # ------------------------------------------------------------------ control

    def reset(self, seed: int) -> np.ndarray | dict[str, np.ndarray]:
        self.env.reset(seed=int(seed))
        return self._observe()

    def _observe(self) -> np.ndarray | dict[str, np.ndarray]:
        env = self.env
        if self.obs_type == "pixels":
            agent = env.agent.position
            return {"pixels": self.render(PIXELS_SIZE), "agent_pos": np.array([agent.x, agent.y], dtype=np.float64)}
        return np.asarray(env.get_obs(), dtype=np.float64)

    def act(self, action: np.ndarray) -> np.ndarray | dict[str, np.ndarray]:
        """gym-pusht's step without its scoring: PD control of the agent towards the target, physics at
        the env's own rates; the coverage (a polygon intersection, about a third of a step) waits for
        `outcome()`, so it runs while the policy computes its next action."""
        env = self.env
        a = np.asarray(action, dtype=np.float64).reshape(2)
        env.n_contact_points = 0
        env._last_action = a
        for _ in range(int(1 / (env.dt * env.control_hz))):
            acceleration = env.k_p * (a - env.agent.position) + env.k_v * (self._still - env.agent.velocity)
            env.agent.velocity += acceleration * env.dt
            env.space.step(env.dt)
        return self._observe()

    def outcome(self) -> tuple[float, bool]:
        env = self.env
        coverage = env._get_coverage()
        return float(np.clip(coverage / env.success_threshold, 0.0, 1.0)), bool(coverage > env.success_threshold)

    def set_state(self, block_pose: list[float] | np.ndarray, agent_pos: list[float] | np.ndarray) -> dict:
        """Place block and agent exactly and return the trusted state read back from the bodies.

        gym-pusht's reset_to_state sets the position before the angle, and pymunk rotates about the
        centre of gravity, so the body origin drifts. Setting the angle first keeps the origin where asked.
        No physics step is run, so an overlapping agent is not pushed out: tests pick non-overlapping states.
        """
        env = self.env
        if not hasattr(env, "space"):
            env.reset(seed=0)
        x, y, angle = (float(v) for v in block_pose)
        env.block.angle = angle
        env.block.position = (x, y)
        env.block.velocity = (0.0, 0.0)
        env.block.angular_velocity = 0.0
        env.agent.position = tuple(float(v) for v in agent_pos)
        env.agent.velocity = (0.0, 0.0)
        # Shapes cache world vertices per step; rendering reads them, so refresh without stepping.
        env.space.reindex_shapes_for_body(env.block)
        env.space.reindex_shapes_for_body(env.agent)
        env._last_action = None
        return self.trusted_state()

    # ------------------------------------------------------------------ trusted reads

    def trusted_state(self) -> dict[str, list[float]]:
        env = self.env
        block, agent = env.block, env.agent
        return {
            "block_pose": [float(block.position.x), float(block.position.y), float(block.angle)],
            "goal_pose": [float(v) for v in env.goal_pose],
            "agent_pos": [float(agent.position.x), float(agent.position.y)],
        }

    def frame(self) -> np.ndarray | None:
        """The scene as gym-pusht draws it (goal, walls, agent, block), minus two policy-driven overlays:
        the red cross at the last action target and pymunk's red contact-point markers."""
        return self.render(self.frame_size)

    def render(self, size: int) -> np.ndarray:
        """The scene (see `frame`) as a (size, size, 3) uint8 RGB image."""
        import pygame
        import pymunk
        from gym_pusht.envs.pymunk_override import DrawOptions

        env = self.env
        screen = pygame.Surface((int(WORKSPACE), int(WORKSPACE)))
        screen.fill((255, 255, 255))
        goal = env.get_goal_pose_body(np.asarray(env.goal_pose))
        for shape in env.block.shapes:
            pts = [goal.local_to_world(v) for v in shape.get_vertices()]
            pygame.draw.polygon(screen, pygame.Color("LightGreen"), [(round(p.x), round(p.y)) for p in pts])
        options = DrawOptions(screen)
        options.flags = pymunk.SpaceDebugDrawOptions.DRAW_SHAPES
        env.space.debug_draw(options)
        img = env._get_img(screen, width=size, height=size, render_action=False)
        return np.ascontiguousarray(img, dtype=np.uint8)

    def coverage(self) -> float:
        """The env's own coverage (for cross-checks only; the verifier uses enpire.verify)."""
        return float(self.env._get_coverage())

