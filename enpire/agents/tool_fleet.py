"""Agent tools on the fleet: evaluate and promote (a job id at once), wait for results (the turn sleeps, no
model call), inspect jobs and episodes (poses, trajectory, error with line numbers, frames as an image),
train a recipe on recorded episodes and make a checkpoint a candidate."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
import numpy as np
import trio
from msgspec import Meta

from bus.messages import EvalResult, PolicySpec, PromoteResult, TrainResult
from bus.records import EpisodeRecord
from enpire.agents.jobs import Job
from enpire.agents.render import png, strip
from enpire.agents.tool_code import COMMIT
from enpire.agents.toolkit import Args, Image, Tool, ToolError, ToolResult
from enpire.agents.tools import failure_summary
from enpire.episodes import read_trajectory


def _json(value) -> str:
    return msgspec.json.encode(value).decode()


def job_text(job: Job) -> str:
    """One job as the model sees it: what was asked and, once finished, what came of it."""
    head = {"job": job.job_id, "kind": job.kind, "policy": job.label, **job.asked, "state": job.state}
    if job.state == "failed":
        head["error"] = job.error
    r = job.result
    if isinstance(r, EvalResult):
        n = len(r.episodes)
        head |= {"successes": r.successes, "n": n,
                 "mean_score": round(sum(e.score for e in r.episodes) / n, 4) if n else 0.0,
                 "summary": failure_summary(r)}
    elif isinstance(r, PromoteResult):
        head |= {"promoted": r.promoted, "successes": r.successes, "n": r.n, "champion_successes": r.champion_successes,
                 "champion_n": r.champion_n, "detail": r.detail}
    elif isinstance(r, TrainResult):
        head |= {"ok": r.ok, "artifact": r.artifact, "metrics": {k: round(v, 4) for k, v in r.metrics.items()}}
        if r.error:
            head["error"] = r.error
    return _json(head)


class EvaluateArgs(Args):
    commit: COMMIT = ""
    params: Annotated[dict[str, float], Meta(description="passed to Policy(params)")] = {}
    n_seeds: Annotated[int, Meta(ge=1, le=200, description="episodes on tuning seeds the harness picks")] = 10
    attempts: Annotated[int, Meta(ge=1, le=5, description="k of pass@k")] = 1


async def evaluate(session, a: EvaluateArgs) -> str:
    if a.n_seeds > session.settings.max_eval_seeds:
        raise ToolError(f"n_seeds is at most {session.settings.max_eval_seeds}")
    spec = PolicySpec(commit=await session.resolve(a.commit, policy=True), params=dict(a.params))
    seeds = sorted(session.rng.sample(session.tuning_seeds, min(a.n_seeds, len(session.tuning_seeds))))
    tools = session.tools
    job_id = tools.new_job_id()
    job = session.jobs.launch(job_id, "evaluate", spec.ref, {"params": spec.params, "n_seeds": len(seeds)},
                              lambda: tools.evaluate(spec, seeds, a.attempts, job_id=job_id))
    return job_text(job) + "\nThe result comes with your next turn (or call wait)."


class PromoteArgs(Args):
    commit: COMMIT = ""
    params: dict[str, float] = {}


async def promote(session, a: PromoteArgs) -> str:
    spec = PolicySpec(commit=await session.resolve(a.commit, policy=True), params=dict(a.params))
    tools = session.tools
    job_id = tools.new_job_id("promote")
    job = session.jobs.launch(job_id, "promote", spec.ref, {"params": spec.params},
                              lambda: tools.promote(spec, job_id=job_id))
    return job_text(job) + "\nJudged on held-out seeds you never see; the verdict comes as a result."


class WaitArgs(Args):
    jobs: Annotated[list[str], Meta(description="job ids to wait for; empty = until any new result")] = []
    timeout_s: Annotated[float, Meta(ge=0, le=3600)] = 300.0


async def wait(session, a: WaitArgs) -> str:
    jobs, done = await session.jobs.wait(a.jobs, min(a.timeout_s, session.settings.max_wait_s))
    session.jobs.mark_seen([j.job_id for j in jobs if j.state != "running"])
    running = len(session.jobs.running())
    head = "all waited-for jobs finished" if done else f"timed out after {a.timeout_s:g} s"
    return f"{head}; {running} of your jobs still running\n" + "\n".join(job_text(j) for j in jobs)


class JobsArgs(Args):
    pass


async def jobs(session, a: JobsArgs) -> str:
    return "\n".join(job_text(j) for j in list(session.jobs.jobs.values())[-30:]) or "no jobs yet"


class JobArgs(Args):
    job: Annotated[str, Meta(description="a job id evaluate returned")]


async def job(session, a: JobArgs) -> str:
    j = session.jobs.get(a.job)
    lines = [job_text(j)]
    if isinstance(j.result, EvalResult):
        lines += [f"episode {e.episode_id}: {'success' if e.success else e.reason} score {e.score:.3f} steps {e.steps}"
                  for e in j.result.episodes[:60]]
    return "\n".join(lines)


class EpisodeArgs(Args):
    episode: Annotated[str, Meta(description="an episode id from job()")]
    rows: Annotated[int, Meta(ge=2, le=40, description="trajectory rows (evenly spaced steps)")] = 10
    frames: Annotated[int, Meta(ge=0, le=6, description="frames in the image strip; 0 = no image")] = 4
    replay: Annotated[bool, Meta(description="re-run the policy on the recorded observations in a sandbox to "
                                             "collect its stderr (print output) and error")] = False


def _pose(card, obs: np.ndarray) -> str:
    fields = [f for f in card.obs.fields if not f.name.startswith(("prev_", "object2"))]
    return ", ".join(f"{f.name}=" + (f"{obs[f.start]:.3f}" if f.size == 1 else str([round(float(v), 3)
                     for v in obs[f.start:f.start + f.size]])) for f in fields)


async def episode(session, a: EpisodeArgs) -> ToolResult:
    tools, card = session.tools, session.card
    rec = tools.board.get("episodes", a.episode, EpisodeRecord)
    if rec is None or rec.kind != "agent" or rec.task != tools.task:
        raise ToolError(f"no episode {a.episode!r} of an agent evaluation on {tools.task} (held-out episodes are "
                        "shown only as aggregates)")
    v = rec.verdict
    lines = [f"episode {rec.episode_id} of job {rec.job_id}: {'success' if v.success else v.reason}; score "
             f"{v.score:.3f}; {rec.steps} steps; policy {rec.policy.ref}"]
    if not rec.trajectory_file or tools.state_dir is None:
        lines.append("no trajectory was recorded for this episode")
        return ToolResult("\n".join(lines))
    traj = await trio.to_thread.run_sync(read_trajectory, tools.state_dir / rec.trajectory_file)
    obs, act = traj["observations"], traj["actions"]
    lines += [f"start: {_pose(card, obs[0])}", f"final: {_pose(card, obs[-1])}", "trajectory (step: observation -> action):"]
    for t in sorted({round(i * (len(obs) - 1) / (a.rows - 1)) for i in range(a.rows)}):
        action = [round(float(x), 3) for x in act[t]] if t < len(act) else "(end)"
        lines.append(f"  {t}: {[round(float(x), 3) for x in obs[t][:card.obs.dim]][:12]} -> {action}")
    if a.replay:
        lines.append(await _replay(session, rec, obs))
    images: tuple[Image, ...] = ()
    if a.frames and obs.ndim == 2 and obs.shape[1] >= card.spec.observations["state"].dim:
        img, steps = strip(card.spec, obs, a.frames)
        images = (Image(png(img)),)
        lines.append(f"image: frames at steps {steps}, drawn from the recorded state ({_legend(card.spec.driver)})")
    return ToolResult("\n".join(lines), images)


def _legend(driver: str) -> str:
    if driver == "pusht":
        return "green: goal T, grey: block T, blue: pusher"
    return "left: top view x-y, right: side view y-z; blue: hand and its path, orange: object, green: goal"


async def _replay(session, rec: EpisodeRecord, obs: np.ndarray) -> str:
    """Run the episode's policy on its recorded observations in a fresh sandbox: its stderr and first error."""
    import tempfile

    from enpire.sandbox import PolicySandbox, SandboxLimits

    files = await trio.to_thread.run_sync(session.workspace.read_bytes, rec.policy.commit)

    def run() -> tuple[str, str]:
        with tempfile.TemporaryDirectory() as tmp, PolicySandbox(SandboxLimits(act_timeout_s=1.0), tmp) as box:
            error = ""
            try:
                box.load(files, rec.policy.params)
                box.reset()
                for o in obs[:-1]:
                    result = box.act(o)
                    if result.error:
                        error = result.error
                        break
            except Exception as e:  # PolicyError with a verdict reason
                error = str(e)
            return error, box.stderr_tail(2000)

    error, stderr = await trio.to_thread.run_sync(run)
    return f"replay error: {error or 'none'}\nreplay stderr:\n{stderr.strip() or '(empty)'}"


class TrainArgs(Args):
    recipe: Annotated[Literal["bc", "rl"], Meta(description="bc: behaviour cloning; rl: TD3+BC (offline RL, "
                                                            "from a BC checkpoint when init_artifact is given)")]
    time_budget_s: Annotated[float, Meta(ge=10, le=3600)] = 300.0
    success_only: Annotated[bool, Meta(description="data: only successful episodes")] = True
    max_episodes: Annotated[int, Meta(ge=0, description="data: newest N episodes; 0 = all")] = 0
    init_artifact: Annotated[str, Meta(description="rl: start from this BC checkpoint hash")] = ""
    options: Annotated[dict[Annotated[str, Meta(max_length=40)], Annotated[str, Meta(max_length=200)]],
                       Meta(max_length=20, description="recipe options: hidden, layers, max_epochs, patience, "
                                                       "lr, seed, rl_steps, alpha, online_episodes")] = {}


async def train(session, a: TrainArgs) -> str:
    tools = session.tools
    if tools.trainer is None:
        raise ToolError("this fleet has no trainer")
    options = dict(a.options) | {"success_only": "1" if a.success_only else "0"}
    if a.max_episodes:
        options["max_episodes"] = str(a.max_episodes)
    if a.init_artifact:
        options["init_artifact"] = a.init_artifact
    budget = min(a.time_budget_s, session.settings.max_train_s)
    job_id = tools.new_job_id("train")
    data = await trio.to_thread.run_sync(tools.training_successes)
    job = session.jobs.launch(job_id, "train", a.recipe, {"options": options, "time_budget_s": budget},
                              lambda: tools.train(a.recipe, time_budget_s=budget, options=options, job_id=job_id))
    return job_text(job) + f"\n{data} recorded successful episodes of this task are available for training."


async def training_status(session, a: JobsArgs) -> str:
    mine = [j for j in session.jobs.jobs.values() if j.kind == "train"]
    return "\n".join(job_text(j) for j in mine) or "no training jobs yet"


class CheckpointArgs(Args):
    artifact: Annotated[str, Meta(description="checkpoint hash (32 hex digits); or give job")] = ""
    job: Annotated[str, Meta(description="a finished train job whose checkpoint to commit")] = ""
    message: Annotated[str, Meta(min_length=1, max_length=300)] = "trained checkpoint"


async def commit_checkpoint(session, a: CheckpointArgs) -> str:
    artifact = a.artifact
    if a.job:
        j = session.jobs.get(a.job)
        if not (isinstance(j.result, TrainResult) and j.result.ok):
            raise ToolError(f"job {a.job} has no checkpoint ({j.state}{': ' + j.error if j.error else ''})")
        artifact = j.result.artifact
    if not artifact:
        raise ToolError("give artifact or job")
    commit = await session.tools.commit_checkpoint(artifact, a.message)
    return _json({"commit": commit, "artifact": artifact, "branch": f"learned/{session.tools.agent}",
                  "next": "evaluate it with this commit id"})


TOOLS = [
    Tool("evaluate", "Run a policy on tuning seeds the harness picks. Returns a job id at once; the result comes "
         "with your next turn or from wait.", EvaluateArgs, evaluate, ordered=True),
    Tool("promote", "Ask for a candidate to be judged against the champion on held-out seeds you never see; "
         "returns a job id.", PromoteArgs, promote, ordered=True),
    Tool("wait", "Sleep until the named jobs (or any new result) finish, or the timeout; no tokens are spent "
         "while waiting. Returns their results.", WaitArgs, wait, ordered=True),
    Tool("jobs", "Your recent jobs and their state.", JobsArgs, jobs),
    Tool("job", "Per-episode outcomes (episode ids, reasons, scores) of one of your evaluation jobs.", JobArgs, job),
    Tool("episode", "One episode in detail: start and final poses, a downsampled trajectory, the error (with "
         "line numbers), optionally a sandbox replay for stderr, and frames as an image.", EpisodeArgs, episode),
    Tool("train", "Train a policy on the fleet's recorded episodes (bc or rl = TD3+BC; data selection by "
         "success and recency). Returns a training job id.", TrainArgs, train, ordered=True),
    Tool("training_status", "Your training jobs: state, metrics, checkpoint hash.", JobsArgs, training_status),
    Tool("commit_checkpoint", "Make a trained checkpoint a policy version (commit on learned/YOU) to evaluate "
         "and promote like any candidate.", CheckpointArgs, commit_checkpoint, ordered=True),
]
