"""The robot cell actor: one per robot, in its own process (the simulator is CPU-bound).

Loop: ask the scheduler for a lease, reset the scene with the lease's seed, run the policy (in its
sandbox process: observations in, actions out, every action checked), ask the verifier for the
verdict on the trusted final state, report the episode. Per-step control never crosses the bus.
The robot does not wait for the last verdict: the end state is captured, and the verifier is asked
(and the report sent) in the background while the robot takes its next lease. Only a pass@k retry
waits, since the policy must be told of the failure before it tries again.

The cell records its own state changes (idle, resetting, running, verifying, faulted) as time
segments and ships them with heartbeats and reports, so MRU is computed from what happened.
"""

from __future__ import annotations

import functools
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import trio

from actors.runtime import Actor
from bus.backoff import backoff_delay
from bus.messages import (
    Array,
    Attempt,
    BundleRequest,
    CellState,
    EpisodeReport,
    Failure,
    Frames,
    Heartbeat,
    Hello,
    JobKind,
    Lease,
    LeaseRequest,
    NoWork,
    PolicyBundle,
    Segment,
    Trajectory,
    Verdict,
    VerifyReply,
    VerifyRequest,
    Welcome,
)
from bus.transport import RequestClient
from enpire.bundles import BundleCache
from enpire.realcell import DryRun, RealInterface
from enpire.safety import ActionLimits, check_action, named_bounds
from enpire.sandbox import PolicyError, PolicySandbox, SandboxLimits
from hw.driver import Driver, DriverError


class Timeline:
    """The cell's state over time; closed segments wait here until the scheduler acknowledges them.

    Only the heartbeat task ships segments (one sender, in order), so `take`/`acked` stay simple.
    """

    def __init__(self, clock=time.time):
        self._clock = clock
        self._lock = threading.Lock()  # the episode runs in a worker thread, heartbeats in trio
        self.state: CellState = "idle"
        self.kind: JobKind | None = None
        self._since = clock()
        self._closed: list[Segment] = []

    def enter(self, state: CellState, kind: JobKind | None = None) -> None:
        with self._lock:
            now = self._clock()
            if now > self._since:
                self._closed.append(Segment(self.state, self._since, now, self.kind))
            self.state, self.kind, self._since = state, kind, now

    def take(self) -> list[Segment]:
        """Closed segments so far; call `acked` with them once delivered."""
        with self._lock:
            return list(self._closed)

    def acked(self, segments: list[Segment]) -> None:
        with self._lock:
            del self._closed[: len(segments)]


class Unverified(NamedTuple):
    """An episode whose last verdict is still to be asked for: the trusted end state, and how to finish."""

    request: VerifyRequest
    finish: Callable[[VerifyReply, float], EpisodeReport | None]  # (reply, seconds it took) -> report


def _refused_report(cell_id: str, lease: Lease, reason: str) -> EpisodeReport:
    """An episode this cell cannot run as leased (e.g. an observation its driver cannot give)."""
    verdict = Verdict(success=False, score=0.0, reason=reason, verifier="cell")
    return EpisodeReport(
        cell_id=cell_id, lease_id=lease.lease_id, episode_id=lease.episode_id, verdict=verdict,
        attempts=[Attempt(verdict, 0)], steps=0, reset_s=0.0, run_s=0.0, verify_s=0.0,
    )


def _flagged_report(cell_id: str, lease: Lease, reply: VerifyReply, reset_s: float, verify_s: float) -> EpisodeReport:
    assert reply.at_reset is not None
    return EpisodeReport(
        cell_id=cell_id, lease_id=lease.lease_id, episode_id=lease.episode_id, verdict=reply.at_reset, attempts=[],
        steps=0, reset_s=reset_s, run_s=0.0, verify_s=verify_s, flagged="success_at_reset",
        signature=reply.reset_signature,
    )


class Cell(Actor):
    concurrent_handlers = False

    def __init__(
        self,
        cell_id: str,
        connect: str,
        driver: Driver,
        sandbox_limits: SandboxLimits,
        scratch: Path,
        *,
        secret: bytes | None = None,
        real: bool = False,
        interface: RealInterface | None = None,
        rt_priority: int = 0,
    ):
        """`interface`: a real cell's person-in-the-loop reset, verdicts and e-stop (enpire/realcell.py)."""
        self.name = f"cell:{cell_id}"
        super().__init__()
        self.cell_id = cell_id
        self.connect = connect
        self.driver = driver
        self.sandbox_limits = sandbox_limits
        self.scratch = scratch
        self.secret = secret
        self.real = real
        self.interface = interface
        self.rt_priority = rt_priority  # SCHED_FIFO priority of the control loop (0: the OS's normal scheduling)
        self.timeline = Timeline()
        self.heartbeat_s = 1.0
        self.episodes = 0
        self.bundles: BundleCache | None = None  # policies by content hash, fetched once

    async def main(self) -> None:
        self.scratch.mkdir(parents=True, exist_ok=True)
        sandbox = PolicySandbox(self.sandbox_limits, self.scratch, keep_spare=True)
        client = RequestClient(self.connect, sender=self.cell_id, secret=self.secret)
        try:
            await client.wait_ready(timeout=60.0)
            self.driver.connect()
            welcome = await client.request(
                Hello(cell_id=self.cell_id, driver=getattr(self.driver, "registry_name", self.driver.name), tasks=[self.driver.task],
                      host=socket.gethostname(), pid=os.getpid(), real=self.real),
                timeout=10.0,
            )
            if not isinstance(welcome, Welcome):
                raise RuntimeError(f"scheduler refused the cell: {welcome}")
            self.heartbeat_s = welcome.heartbeat_s
            self.bundles = BundleCache(lambda digest: trio.from_thread.run(self._fetch_bundle, client, digest))
            self.log.info("cell_ready", run=welcome.run_id, driver=self.driver.name)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._heartbeats, client)
                await self._work(client, sandbox)
        finally:
            sandbox.close()
            self.driver.disconnect()
            client.close()

    async def _heartbeats(self, client: RequestClient) -> None:
        while True:
            await trio.sleep(self.heartbeat_s)
            segments = self.timeline.take()
            msg = Heartbeat(cell_id=self.cell_id, state=self.timeline.state, segments=segments)
            reply = await client.request(msg, timeout=max(1.0, self.heartbeat_s), retries=2)
            if isinstance(reply, Failure) and not reply.retry:
                raise RuntimeError(f"heartbeat refused: {reply.error}")
            self.timeline.acked(segments)

    async def _work(self, client: RequestClient, sandbox: PolicySandbox) -> None:
        # Reports go out in the background so the robot asks for its next lease at once; a small limit
        # keeps a dead daemon from piling them up (they are acked and idempotent, order does not matter).
        outbox = trio.Semaphore(4)
        refusals = 0
        async with trio.open_nursery() as nursery:
            while True:
                if self.interface is not None and self.interface.paused.is_set():
                    # Paused (operator silent, e-stop, robot fault): this robot takes no work until the
                    # person types 'resume'; the fleet and its other cells go on.
                    self.timeline.enter("faulted")
                    self.log.warning("cell_paused")
                    await trio.to_thread.run_sync(self.interface.wait_resume, abandon_on_cancel=True)
                    continue
                self.timeline.enter("idle")
                reply = await client.request(LeaseRequest(cell_id=self.cell_id, wait_s=2.0), timeout=6.0, retries=10)
                if isinstance(reply, NoWork):
                    await trio.sleep(reply.retry_after_s)
                    continue
                if not isinstance(reply, Lease):
                    refusals += 1
                    delay = backoff_delay(refusals, 1.0, 10.0)
                    self.log.warning("lease_refused", reply=str(reply)[:200], retry_in_s=delay)
                    await trio.sleep(delay)
                    continue
                refusals = 0
                outcome = await trio.to_thread.run_sync(self._run_episode, reply, sandbox, client)
                await outbox.acquire()
                nursery.start_soon(self._send_report, client, outcome, outbox)

    async def _send_report(self, client: RequestClient, outcome: EpisodeReport | Unverified,
                           outbox: trio.Semaphore) -> None:
        try:
            if isinstance(outcome, Unverified):
                t = time.perf_counter()
                reply = await self._ask_verifier(client, outcome.request)
                outcome = outcome.finish(reply, time.perf_counter() - t)
            await client.request(outcome, timeout=10.0, retries=30)
            self.episodes += 1
        finally:
            outbox.release()

    # ------------------------------------------------------------------ one episode (worker thread)

    async def _fetch_bundle(self, client: RequestClient, digest: str) -> PolicyBundle:
        reply = await client.request(BundleRequest(digest=digest), timeout=30.0, retries=5)
        if not isinstance(reply, PolicyBundle):  # the lease expires and is run again; the robot goes on
            raise RuntimeError(f"policy bundle {digest} not served: {reply}")
        return reply

    async def _ask_verifier(self, client: RequestClient, request: VerifyRequest) -> VerifyReply:
        reply = await client.request(request, timeout=10.0, retries=10)
        if not isinstance(reply, VerifyReply):
            raise RuntimeError(f"verifier failed: {reply}")
        return reply

    def _verify_request(self, lease: Lease, attempt: int, reset_state=None) -> VerifyRequest:
        """The trusted end state (and camera frame for a vision verifier), read before the next reset."""
        frame = self.driver.frame() if lease.verifier == "vision" else None
        return VerifyRequest(
            episode_id=lease.episode_id, task=lease.task, state=self.driver.trusted_state(),
            frame=Array.of(frame) if frame is not None else None, reset_state=reset_state,
            lease_id=lease.lease_id, attempt=attempt,
        )

    def _run_episode(self, lease: Lease, sandbox: PolicySandbox, client: RequestClient) -> EpisodeReport | Unverified:
        self._actions: list = []
        try:
            return self._episode(lease, sandbox, client)
        except DriverError as e:  # the robot or a camera failed: a fault after the policy acted (an overload
            # it drove the arm into) counts against it in held-out work, one before it acted does not
            self.log.error("driver_error", episode=lease.episode_id, error=str(e))
            if self.interface is not None:
                self.interface.pause(f"robot fault: {e}")
            return self._held(lease, "driver_error", str(e), steps=len(self._actions))
        finally:
            self.timeline.enter("idle")  # however the episode ended, the robot is free again

    def _held(self, lease: Lease, flag: str, why: str, trajectory: Trajectory | None = None,
              steps: int = 0) -> EpisodeReport:
        """An episode without a verdict (e-stop, no reset, no verdict, robot fault): the scheduler records
        it as flagged; an agent's work runs again on another seed, held-out work counts it as a failure when
        the policy acted in it (`steps` > 0: an e-stop, no verdict) and leaves it out otherwise."""
        verdict = Verdict(success=False, score=0.0, reason=f"unverified: {flag}: {why}"[:500], verifier="cell")
        return EpisodeReport(cell_id=self.cell_id, lease_id=lease.lease_id, episode_id=lease.episode_id,
                             verdict=verdict, attempts=[], steps=steps, reset_s=0.0, run_s=0.0, verify_s=0.0,
                             trajectory=trajectory, flagged=flag)

    def _judge_real(self, client: RequestClient, lease: Lease, request: VerifyRequest, error: str) -> VerifyReply | None:
        """A real cell's verdict: the verifier program's, the person's, or both (agreement); None = no answer."""
        program = trio.from_thread.run(self._ask_verifier, client, request)
        if error:  # a violation or policy fault fails the episode whatever anyone sees
            return program
        verdict, by = self.interface.judge(lease.episode_id, program.verdict)
        self.log.info("real_verdict", episode=lease.episode_id, by=by, success=verdict.success if verdict else None,
                      program=program.verdict.success, agreement=self.interface.agreement.summary())
        if verdict is None:
            return None
        signed = verdict == program.verdict  # the program's verdict keeps its signature; a person's has none
        return VerifyReply(episode_id=program.episode_id, verdict=verdict, at_reset=program.at_reset,
                           signature=program.signature if signed else b"", reset_signature=program.reset_signature)

    def _episode(self, lease: Lease, sandbox: PolicySandbox, client: RequestClient) -> EpisodeReport | Unverified:
        """Reset, run up to `lease.attempts` attempts, and return the report.

        Only a retry needs a verdict before the robot can go on; the last attempt's verdict is asked for
        after the robot has moved on to its next lease (`Unverified`), off the robot's time.
        """
        t0 = time.perf_counter()
        self.timeline.enter("resetting", lease.kind)
        if lease.observation != getattr(self.driver, "obs_type", "state"):
            if lease.observation not in getattr(self.driver, "observation_modes", ("state",)):
                return _refused_report(self.cell_id, lease, f"cell_error: driver {self.driver.name!r} has no "
                                       f"{lease.observation!r} observation")
            self.driver.set_observation(lease.observation)
        if self.interface is not None:  # a person or an approved reset program resets a real scene
            obs, why = self.interface.reset_scene(self.driver, lease.seed, lease.episode_id)
            if why:
                self.interface.pause(why)
                return self._held(lease, why.split(":")[0], why)
        else:
            obs = self.driver.reset(lease.seed)
        reset_state = self.driver.trusted_state()
        reset_s = time.perf_counter() - t0
        verify_s = 0.0

        low, high, problem = named_bounds(getattr(self.driver, "action_names", None), self.driver.action_low,
                                          self.driver.action_high, lease.joints, require_all=self.real)
        limits = ActionLimits(dim=len(low), low=low.tolist(), high=high.tolist(), max_delta=lease.max_delta)
        observations, actions, rewards = [obs], [], []
        self._actions = actions  # how far a robot fault came (`_run_episode`): one after the policy acted counts
        # A robot's camera (LeRobot drivers): one frame per observation, for the record and the dataset.
        camera = [self.driver.frame()] if getattr(self.driver, "record_frames", False) else None
        attempts: list[Attempt] = []
        run_s = 0.0

        def trajectory() -> Trajectory:
            pixels = isinstance(observations[0], dict)  # camera frames travel deflated, beside the flat part
            flat = [o["agent_pos"] for o in observations] if pixels else observations
            frames = np.stack([o["pixels"] for o in observations]) if pixels else None
            if camera is not None and len(camera) == len(observations):  # a robot's camera, recorded per step
                frames = np.stack(camera)
            return Trajectory(  # float64 as the policy saw them: an episode replays exactly
                observations=Array.of(np.asarray(flat, dtype=np.float64)),
                actions=Array.of(np.asarray(actions, dtype=np.float64).reshape(-1, limits.dim)),
                rewards=Array.of(np.asarray(rewards, dtype=np.float32)),
                frames=Frames.of(frames) if frames is not None else None,
            )

        def report(verify_total: float) -> EpisodeReport:
            return EpisodeReport(
                cell_id=self.cell_id, lease_id=lease.lease_id, episode_id=lease.episode_id,
                verdict=attempts[0].verdict, attempts=attempts, steps=sum(a.steps for a in attempts),
                reset_s=reset_s, run_s=run_s, verify_s=verify_total, trajectory=trajectory(),
                flagged="dry_run" if isinstance(self.driver, DryRun) else "",
            )

        def judged(reply: VerifyReply, secs: float, *, error: str, steps: int, spent: float,
                   final: bool) -> EpisodeReport | None:
            """Record an attempt's verdict; the report when the episode ends with it (None: retry)."""
            verify_total = spent + secs
            if reply.at_reset is not None and reply.at_reset.success:
                # Already solved at reset: the seed says nothing about the policy; the scheduler replaces it.
                return _flagged_report(self.cell_id, lease, reply, reset_s, verify_total)
            verdict = reply.verdict
            if error:  # a violation or policy fault ends the episode whatever the scene looks like
                verdict = Verdict(success=False, score=verdict.score, reason=error, verifier=verdict.verifier)
            attempts.append(Attempt(verdict=verdict, steps=steps, signature=reply.signature))
            return report(verify_total) if final or verdict.success or error else None

        if problem:  # the task's limits do not fit this robot: nothing moves
            attempts.append(Attempt(Verdict(False, 0.0, problem, "cell"), 0))
            return report(0.0)
        files = self.bundles.files(lease.bundle)  # from the cache, or fetched once
        try:
            # A judging runs in a jail of its own: held-out episodes never share a process or scratch
            # with tuning episodes (or with another judging).
            context = "" if lease.kind == "agent" else f"{lease.kind}:{lease.job_id}"
            sandbox.load(files, lease.policy.params, context=context)
        except PolicyError as e:
            attempts.append(Attempt(Verdict(False, 0.0, f"policy_error: {e}", "cell"), 0))
            return report(0.0)
        for k in range(lease.attempts):
            self.timeline.enter("running", lease.kind)
            t2 = time.perf_counter()
            if k > 0:
                last = attempts[-1].verdict
                try:
                    sandbox.notify_failure({"attempt": k, "reason": last.reason, "score": last.score})
                except PolicyError as e:
                    attempts.append(Attempt(Verdict(False, 0.0, f"policy_error: {e}", "cell"), 0))
                    break
            steps, error, obs = self._rollout(lease, sandbox, limits, obs, observations, actions, rewards, camera)
            run_s += time.perf_counter() - t2
            if error == "estop":  # halted by the person: held unverified (held-out work counts it failed)
                self.interface.pause("e-stop")
                return self._held(lease, "estop", f"halted after {len(actions)} steps", trajectory(), len(actions))
            request = self._verify_request(lease, k, reset_state if k == 0 else None)
            final = bool(error) or k == lease.attempts - 1
            finish = functools.partial(judged, error=error, steps=steps, spent=verify_s, final=final)
            if final and self.interface is None:
                return Unverified(request, finish)
            self.timeline.enter("verifying", lease.kind)
            t3 = time.perf_counter()
            if self.interface is not None:
                reply = self._judge_real(client, lease, request, error)
                if reply is None:
                    self.interface.pause("no verdict from the operator")
                    return self._held(lease, "unverified", "the operator did not answer", trajectory(), len(actions))
            else:
                reply = trio.from_thread.run(self._ask_verifier, client, request)
            secs = time.perf_counter() - t3
            verify_s += secs
            done = finish(reply, secs)
            if done is not None:
                return done
        return report(verify_s)

    def _rollout(self, lease, sandbox, limits, obs, observations, actions, rewards,
                 camera=None) -> tuple[int, str, np.ndarray]:
        if not self.rt_priority:
            return self._control(lease, sandbox, limits, obs, observations, actions, rewards, camera)
        # A real arm's control loop runs at a fixed rate whatever else the machine does: this thread (only
        # it; processes it starts, such as the policy sandbox, fall back to normal scheduling) gets a
        # real-time priority for the rollout. It sleeps between ticks, so it takes the CPU only to step.
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO | os.SCHED_RESET_ON_FORK, os.sched_param(self.rt_priority))
        except (OSError, AttributeError) as e:
            self.log.warning("rt_priority_refused", error=str(e))
        try:
            return self._control(lease, sandbox, limits, obs, observations, actions, rewards, camera)
        finally:
            try:
                os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
            except (OSError, AttributeError):
                pass

    def _control(self, lease, sandbox, limits, obs, observations, actions, rewards, camera) -> tuple[int, str, np.ndarray]:
        """Run one attempt of at most `horizon` steps; returns (steps, error reason or "", last obs).

        Each new observation goes to the policy before the simulator scores the step, so the policy
        computes its next action while the cell waits for the reward and termination."""
        try:
            sandbox.reset()
        except PolicyError as e:
            return 0, f"policy_error: {e}", obs
        previous = actions[-1] if actions else None
        missed = 0
        period = 1.0 / lease.control_hz if lease.control_hz > 0 else 0.0
        tick = time.perf_counter()
        sandbox.submit(obs)
        estop = self.interface.estop if self.interface is not None else None
        for step in range(lease.horizon):
            if estop is not None and estop.is_set():
                if callable(halt := getattr(self.driver, "halt", None)):
                    halt()
                return step, "estop", obs
            if period:  # a real robot's control loop runs at a fixed rate; so does a paced simulator
                tick += period
                time.sleep(max(0.0, tick - time.perf_counter()))
            result = sandbox.result()
            if result.error:
                return step, result.error, obs
            if result.deadline_missed:
                missed += 1
                if missed > self.sandbox_limits.max_missed_deadlines:
                    return step, f"policy_timeout: {missed} consecutive act() deadlines missed", obs
                if previous is None:
                    sandbox.submit(obs)
                    continue  # nothing safe to hold yet: the robot stays where it is
                action = previous  # hold the last safe action
            else:
                missed = 0
                reason = check_action(result.action, previous, limits)
                if reason:
                    return step, reason, obs
                action = np.asarray(result.action, dtype=np.float64)
            obs = self.driver.act(action)
            if step + 1 < lease.horizon:
                sandbox.submit(obs)
            reward, done = self.driver.outcome()
            observations.append(obs)
            if camera is not None:
                camera.append(self.driver.frame())
            actions.append(action)
            rewards.append(reward)
            previous = action
            if done:  # the action asked for meanwhile is never collected; the next request skips it
                return step + 1, "", obs
        return lease.horizon, "", obs
