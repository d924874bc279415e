"""`python -m enpire.fleet`: the headless fleet daemon.

It wires the actors together (verifier, scheduler, summarizer, agents in this process; one process per
robot cell), serves the bus, and runs until the champion reaches the target success rate on held-out
seeds or the time budget ends. It then prints the report: best policy, success with its Wilson 95%
interval on held-out seeds the agents never tuned on, episodes, time to target, MRU per cell.

Exit codes: 0 target reached, 3 budget ended first, 2 bad configuration or state dir, 130 stopped
by a signal (SIGINT/SIGTERM drain the fleet and keep everything recorded).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import lmdb
import msgspec
import pynng
import structlog
import trio

from actors.agent import AgentActor
from actors.judge import Judge
from actors.lease_queue import LeaseQueue
from actors.runtime import ActorStartError, ActorSystem, Ref
from actors.summarizer import Summarizer
from actors.trainer import Trainer
from actors.verifier import Verifier
from bus.backoff import backoff_delay
from bus.blackboard import Blackboard, BlackboardError
from bus.events import EventHub, events_url, relay
from bus.messages import (
    Address,
    BundleRequest,
    CellStateChanged,
    ChampionChanged,
    DataRequest,
    Envelope,
    EpisodeReport,
    Failure,
    FinalJudging,
    FinalResult,
    FindingPosted,
    Heartbeat,
    HeldoutUsage,
    Hello,
    LeaseRequest,
    Message,
    PolicySpec,
    Progress,
    QueueDepth,
    TokensUsed,
    TrainDone,
    TrainerHeartbeat,
    TrainerHello,
    TrainJobRequest,
    UtilizationReport,
    UtilizationRequest,
    VerifyRequest,
)
from bus.records import (
    SCHEMA_VERSION,
    Champion,
    CLIRunRecord,
    DaemonRecord,
    EpisodeRecord,
    FinalRecord,
    Finding,
    HeldoutRecord,
    Meta,
    TokenRecord,
)
from bus.transport import Publisher, RequestServer, cell_key, ipc_url
from enpire import command, isolation, judging, ledger, log, progress, summary
from enpire import config as cfg
from enpire.agents.backends import make_backend
from enpire.agents.backends import probe as probe_model
from enpire.agents.llm import LLMConfigError
from enpire.agents.pacing import Room
from enpire.agents.session import agent_tools
from enpire.bundles import BundleStore
from enpire.heldout import running_low
from enpire.learning.dataset import ARTIFACTS
from enpire.metrics import mean_robot_utilization, regimes_used
from enpire.sandbox import without_credentials
from enpire.sinks import TensorBoardSink, check_tensorboard
from enpire.statelock import StateDirLocked, StateLock
from enpire.workspace import MAIN, Workspace, WorkspaceError
from hw import verifier_name

EXIT_TARGET, EXIT_CONFIG, EXIT_BUDGET, EXIT_SIGNAL = 0, 2, 3, 130


class StateDirError(RuntimeError):
    pass


class StartupError(RuntimeError):
    """The fleet could not start (e.g. its listen address is taken): one line for the user, exit 2."""


async def _listen(nursery: trio.Nursery, what: str, server: RequestServer) -> None:
    try:
        await nursery.start(server.serve)
    except pynng.NNGException as e:
        raise StartupError(f"{what}: cannot listen on {server.url}: {e}") from None


def _startup_error(error: BaseException) -> StartupError | ActorStartError | None:
    """The start-up failure that ended trio.run (alone, possibly inside exception groups), else None."""
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error if isinstance(error, StartupError | ActorStartError) else None


def parse_args(argv: list[str] | None = None, prog: str = "python -m enpire.fleet") -> argparse.Namespace:
    p = command.Parser(
        prog=prog,
        description="Run a fleet of robot cells and agents that improve a policy until a target or a budget.",
    )
    p.add_argument("--config", type=Path, help="enpire.toml to use (default: ./enpire.toml if present, "
                   "else the embedded default: 2 simulated Meta-World peg-insertion cells, 1 built-in agent)")
    p.add_argument("--state-dir", help="directory holding everything of this run (default from config: state)")
    p.add_argument("--cells", type=int, help="number of local simulated cells (config cells.count)")
    p.add_argument("--agents", type=int, help="number of agents (config agents.count)")
    p.add_argument("--budget-minutes", type=float, help="stop after this many minutes (config fleet.budget_minutes)")
    p.add_argument("--target", type=float, help="held-out success rate that ends the run (config fleet.target)")
    p.add_argument("--min-heldout", type=int, help="held-out episodes the champion needs (config fleet.min_heldout)")
    p.add_argument("--tensorboard", action="store_true", default=None,
                   help="write progress as TensorBoard scalars to STATE_DIR/tensorboard (config fleet.tensorboard)")
    p.add_argument("--print-config", action="store_true", help="print the effective configuration and exit")
    p.add_argument("--quiet", action="store_true", help="no console log; the JSON log file is still written")
    return p.parse_args(argv)


def effective_config(args: argparse.Namespace) -> cfg.Config:
    path = args.config
    if path is None and Path("enpire.toml").exists():
        path = Path("enpire.toml")
    config = cfg.load(path)
    return cfg.with_overrides(
        config,
        **{
            "fleet.state_dir": args.state_dir,
            "cells.count": args.cells,
            "agents.count": args.agents,
            "fleet.budget_minutes": args.budget_minutes,
            "fleet.target": args.target,
            "fleet.min_heldout": args.min_heldout,
            "fleet.tensorboard": args.tensorboard,
        },
    )


def lock_state_dir(path: Path) -> StateLock:
    """Create the state directory (private to this user) and take its lock: one daemon per directory."""
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(path, 0o700)
        return StateLock(path).acquire()
    except StateDirLocked as e:
        raise StateDirError(str(e)) from None
    except OSError as e:
        raise StateDirError(f"{path}: cannot use as a state directory: {e.strerror or e}") from None


def _holds_files(path: Path) -> bool:
    return path.is_file() or (path.is_dir() and next(path.iterdir(), None) is not None)


def open_state_dir(path: Path, map_size_mb: int = 1024) -> tuple[Blackboard, Meta]:
    """Reopen or start the blackboard of a (locked) state directory; refuse one of another schema version."""
    try:
        board = Blackboard(path / "blackboard.lmdb", map_size=map_size_mb << 20)
        meta = board.get("meta", "meta", Meta)
    except BlackboardError as e:  # names the path
        raise StateDirError(f"cannot open the state directory: {e}") from None
    except (OSError, lmdb.Error) as e:
        raise StateDirError(f"{path / 'blackboard.lmdb'}: cannot open the blackboard: {e}") from None
    if meta is None and board.count("episodes") == 0:
        if leftovers := [name for name in cfg.RUN_RECORDS if _holds_files(path / name)]:
            board.close()  # an emptied or replaced blackboard: a new run here would orphan the old one's records
            raise StateDirError(f"{path / 'blackboard.lmdb'}: holds no run, but the directory holds a run's "
                                f"{', '.join(leftovers)}: the blackboard was emptied or replaced; restore it, or "
                                "use a new --state-dir")
    if meta is None:
        meta = Meta(schema_version=SCHEMA_VERSION, run_id=uuid.uuid4().hex[:12], created=time.time())
        board.put("meta", "meta", meta)
    elif meta.schema_version != SCHEMA_VERSION:
        board.close()
        raise StateDirError(
            f"{path}: state directory has schema version {meta.schema_version}, this enpire needs "
            f"{SCHEMA_VERSION}; use a new --state-dir"
        )
    return board, meta


@dataclass
class Outcome:
    reason: str  # "target", "budget", "signal"
    elapsed_s: float
    time_to_target_s: float | None


LOCAL_SECRET_ENV = "ENPIRE_LOCAL_SECRET"
MIN_LEASE_S = 1.0  # a shorter lease is warned about: few episodes are leased, run, verified and reported in less


def cell_command(config: cfg.Config, index: int, url: str, state_dir: Path) -> list[str]:
    """The command line of local cell `index`: its driver and the [sandbox] limits it enforces."""
    cell_id = f"cell-{index}"
    task, sb = config.task(), config.sandbox
    command = [
        sys.executable, "-m", "enpire.cell", "--connect", url, "--cell-id", cell_id, "--driver", task.driver,
        "--driver-options", json.dumps(task.driver_options),
        "--state-dir", str(state_dir), "--scratch", str(state_dir / "scratch" / cell_id),
        "--act-timeout", str(sb.act_timeout_s), "--max-missed", str(sb.max_missed_deadlines),
        "--load-timeout", str(sb.load_timeout_s),
        "--cpu-seconds", str(sb.cpu_seconds), "--memory-mb", str(sb.memory_mb), "--exit-with-parent",
        "--scratch-mb", str(sb.scratch_mb), "--pids", str(sb.pids),
        "--key-env", LOCAL_SECRET_ENV,
    ]
    cpus = sorted(os.sched_getaffinity(0))
    pinning = config.cells.cpu_pinning
    if pinning == "on" or (pinning == "auto" and config.cells.count >= len(cpus)):
        command += ["--cpu", str(cpus[index % len(cpus)])]
    if not sb.require_isolation and isolation.check() is not None:
        command.append("--unconfined")  # the user opted out, and the engine cannot run here
    return command


async def _cell_process(
    config: cfg.Config, index: int, url: str, state_dir: Path, stopping: trio.Event, secret: bytes
) -> None:
    """Keep one local cell process alive; restart it with backoff if it dies."""
    cell_id = f"cell-{index}"
    logger = structlog.get_logger().bind(actor="fleet")
    command = cell_command(config, index, url, state_dir)
    env = without_credentials(os.environ, config.bus.secret_env, config.agents.api_key_env)  # no model key in a cell
    env[LOCAL_SECRET_ENV] = cell_key(secret.hex().encode(), cell_id).decode()  # this cell's key only
    failures = 0
    while not stopping.is_set():
        began = time.time()
        result = await trio.run_process(command, check=False, stdin=None, env=env)
        if stopping.is_set():
            return
        failures = 1 if time.time() - began > 30 else failures + 1  # a run that lasted starts afresh
        delay = backoff_delay(failures, 0.5, 5.0)
        logger.error("cell_process_exited", cell=cell_id, code=result.returncode, restart_in_s=delay)
        await trio.sleep(delay)


def heldout_records(board: Blackboard, config: cfg.Config) -> list[HeldoutRecord]:
    """Every task's held-out pool, drawn from or not."""
    out = []
    for name, task in config.tasks.items():
        record = board.get("heldout", name, HeldoutRecord) or HeldoutRecord(name)
        record.total, record.low = task.heldout_seeds.count, running_low(config, record)
        out.append(record)
    return out


def target_met(champion: ChampionChanged | Champion | None) -> bool:
    """The champion's confirmation stopped with "met" (the judge's sequential rule, `metrics.sprt`)."""
    return champion is not None and champion.decision == "met"


@dataclass
class Core:
    """The part of a fleet that serves cells: verifier, lease queue, judge, trainer, the bus, local cells."""

    system: ActorSystem
    queue: Ref
    judge: Ref
    verifier: Ref
    trainer: Ref
    workspace: Workspace
    url: str
    stopping: trio.Event
    events: EventHub

    @property
    def scheduler(self) -> Ref:
        """Where agents send evaluations and promotions: the judge."""
        return self.judge


# What other processes hear of the daemon's events (`enpire status --follow`); the rest stays in-process.
TELEMETRY = (Progress, CellStateChanged, ChampionChanged, QueueDepth, FindingPosted, HeldoutUsage, TokensUsed)


async def _publish_events(events: EventHub, url: str) -> None:
    """The daemon's TELEMETRY on the bus's pub/sub. Unsealed: it is telemetry (no secrets, nothing acted
    on), and its socket sits in the owner-only state dir (or, for a long path, a socket file only the
    owner may write to, which connecting needs)."""
    with Publisher(url, sender="fleet") as publisher:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(publisher.heartbeat, 1.0)
            await relay(events, publisher, TELEMETRY)


def _baseline(config: cfg.Config, workspace: Workspace, board: Blackboard) -> PolicySpec | None:
    """Commit the starting policy (`[fleet] baseline`) to main once per state dir; its spec afterwards."""
    if not config.fleet.baseline:
        return None
    spec = board.get("meta", "baseline", PolicySpec)
    if spec is None:
        root = Path(config.fleet.baseline)
        # bytes: a starting policy may carry weights (a folder from `enpire export-policy`, a .npz)
        files = {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
                 if p.is_file() and not {"__pycache__", ".git"} & set(p.relative_to(root).parts)}
        try:
            spec = PolicySpec(workspace.commit(MAIN, files, "baseline: the policy the team starts from"))
        except WorkspaceError as e:
            raise StartupError(f"fleet.baseline {str(root)!r}: {e}") from None
        board.put("meta", "baseline", spec)
    return spec


async def start_core(nursery: trio.Nursery, config: cfg.Config, state_dir: Path, board: Blackboard,
                     meta: Meta, stopping: trio.Event | None = None, ended: trio.Event | None = None) -> Core:
    """Start verifier, scheduler, bus server(s) and the local cells inside `nursery`; `stopping`, once set,
    ends the cells' restarts (the fleet's stop); `ended`, once set, closes the judge (the run's end: it
    decides nothing more, its final judging aside)."""
    workspace = await trio.to_thread.run_sync(Workspace, state_dir / "workspace")  # git: off the loop
    baseline = await trio.to_thread.run_sync(_baseline, config, workspace, board)
    task_kinds = {name: t.verifier_kind or verifier_name(t.driver) for name, t in config.tasks.items()}
    system = ActorSystem(nursery)
    events = EventHub()
    bundles = BundleStore(workspace.read_bytes, state_dir / ARTIFACTS)
    verdict_key = secrets.token_bytes(32)  # verifier and lease queue only: cells relay verdicts, never sign them
    verifier = await system.spawn("verifier", lambda: Verifier(task_kinds, verdict_key))
    queue = await system.spawn("queue", lambda: LeaseQueue(config, board, bundles, state_dir, meta.run_id, events,
                                                             verdict_key=verdict_key))
    judge = await system.spawn("judge", lambda: Judge(config, board, queue, events, workspace.set_main, baseline,
                                                      ended))
    trainer = await system.spawn("trainer", lambda: Trainer(board, state_dir, config.trainer))
    routes: dict[type, Ref] = {
        Hello: queue, LeaseRequest: queue, Heartbeat: queue, EpisodeReport: queue, BundleRequest: queue,
        VerifyRequest: verifier,
        **dict.fromkeys((TrainerHello, TrainJobRequest, DataRequest, TrainerHeartbeat, TrainDone), trainer),
    }

    async def route(envelope: Envelope) -> Message:
        ref = routes.get(type(envelope.body))
        if ref is None:
            return Failure(error=f"no actor takes {type(envelope.body).__name__} from the bus")
        claimed = getattr(envelope.body, "cell_id", envelope.sender)
        if hasattr(envelope.body, "trainer_id"):  # remote trainers speak as "trainer:<id>" (their own key)
            claimed = f"trainer:{envelope.body.trainer_id}"
        if claimed != envelope.sender:  # the sender is authenticated (its own key); the field is not
            structlog.get_logger().warning("impersonation_refused", actor="fleet", sender=envelope.sender[:60],
                                           claimed=str(claimed)[:60], request=type(envelope.body).__name__)
            return Failure(error=f"sender {envelope.sender!r} cannot speak for cell {claimed!r}", retry=False)
        return await ref.ask(envelope.body, timeout=60.0)

    # Local peers authenticate too: a per-run secret, so nothing else on the machine (a policy that
    # escaped its sandbox, say) can speak on the socket in the state dir.
    local_secret = secrets.token_bytes(32)
    url = ipc_url(state_dir, "bus")
    # Each cell's long-polled LeaseRequest holds one server worker: leave room for heartbeats and reports.
    workers = 2 * config.cells.count + 8
    await _listen(nursery, "the local bus", RequestServer(url, route, sender="fleet", secret=local_secret.hex().encode(),
                                                          per_sender_keys=True, workers=workers))
    if config.bus.listen:
        secret = os.environ[config.bus.secret_env].encode()
        await _listen(nursery, f"bus.listen {config.bus.listen!r}",
                      RequestServer(config.bus.listen, route, sender="fleet", secret=secret,
                                   per_sender_keys=True, workers=32))
        structlog.get_logger().info("listening", actor="fleet", url=config.bus.listen)
    nursery.start_soon(_publish_events, events, events_url(state_dir))
    stopping = stopping if stopping is not None else trio.Event()
    for i in range(config.cells.count):
        nursery.start_soon(_cell_process, config, i, url, state_dir, stopping, local_secret)
    return Core(system, queue, judge, verifier, trainer, workspace, url, stopping, events)


async def run_fleet(config: cfg.Config, state_dir: Path, board: Blackboard, meta: Meta,
                    final_only: bool = False) -> tuple[Outcome, dict]:
    """The run: cells, judge and agents until the target, the budget or a stop signal, then the final judging.
    `final_only`: the run met its target before and only its final judging (cut short then) is left: the
    cells and the judge start for it alone, without agents."""
    logger = structlog.get_logger().bind(actor="fleet")
    started = time.time()
    deadline = started + config.fleet.budget_minutes * 60
    outcome = Outcome("budget", 0.0, None)
    stats: dict = {}

    stopping, ended = trio.Event(), trio.Event()  # ended: the run's time is over (target, budget or signal)
    if final_only:  # the run ended before (at its target); a signal now only cuts the judging short
        outcome.reason = "target"
        ended.set()
    final = trio.CancelScope()  # the final judging after it, which a signal cuts short

    async def on_signal(signals) -> None:
        async for signum in signals:  # every one, until the run ends: one left unread would kill the drain
            name = signal.Signals(signum).name
            if final.cancel_called:
                logger.warning("signal_ignored", signal=name, detail="already stopping: the run drains "
                               "and writes its report")
                continue
            final.cancel()  # a signal cuts the final judging short too
            if ended.is_set():  # the run already ended (target, budget): it keeps its outcome
                logger.warning("final_judging_cut_short", signal=name)
                continue
            logger.warning("stopping", signal=name)
            outcome.reason = "signal"
            stopping.set()

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as outer:  # outlives the fleet's nursery: a signal during its drain is read too
            outer.start_soon(on_signal, signals)
            async with trio.open_nursery() as nursery:
                core = await start_core(nursery, config, state_dir, board, meta, stopping, ended)
                system, workspace, events = core.system, core.workspace, core.events
                prior = board.get("meta", "daemon", DaemonRecord) if final_only else None  # the run's own start
                daemon = DaemonRecord(os.getpid(), prior.started if prior else started, started, "running", config.cells.count,
                                      config.agents.count, config.cells.task, budget_s=config.fleet.budget_minutes * 60,
                                      target=config.fleet.target, ended=prior.ended if prior else 0.0)
                sink = TensorBoardSink(state_dir / "tensorboard", started) if config.fleet.tensorboard and not final_only else None
                ticks = Ticks(logger, board, config, core.queue, started, deadline, daemon, events, sink)
                nursery.start_soon(ticks.feed_sink)
                await nursery.start(ticks.count_tokens)
                nursery.start_soon(ticks.run)  # progress lines and the daemon's liveness record, final judging too
                if final_only:
                    logger.info("final_judging_resumed", cells=config.cells.count, state_dir=str(state_dir))
                else:
                    await system.spawn("summarizer", lambda: Summarizer(board, config.cells.task, events))
                    room = Room()  # the team's pacing marks, one for all agents
                    for i in range(config.agents.count):
                        tools = agent_tools(config, i, workspace, core.judge, board, trainer=core.trainer,
                                            state_dir=state_dir, events=events, room=room)
                        await system.spawn(tools.agent, lambda tools=tools, i=i: AgentActor(tools.agent, make_backend(config, i), tools))
                    logger.info("fleet_started", cells=config.cells.count, agents=config.agents.count, state_dir=str(state_dir),
                                budget_minutes=config.fleet.budget_minutes, target=config.fleet.target)
                    # The run ends on an event (the judge's "met", a signal) or at the deadline: nothing is polled.
                    with trio.move_on_at(trio.current_time() + deadline - time.time()), \
                            events.subscribe(ChampionChanged, buffer=16) as champions:
                        async def on_target() -> None:
                            latest = events.latest(ChampionChanged)
                            while not (config.fleet.stop_at_target and target_met(latest)):
                                latest = await champions.receive()
                            outcome.reason = "target"
                            outcome.time_to_target_s = time.time() - started
                            stopping.set()
                        nursery.start_soon(on_target)
                        await stopping.wait()
                ended.set()
                # The run's figures (time, MRU) end here; the final judging is reported on its own.
                outcome.elapsed_s = time.time() - started
                if not final_only:  # (a start for the final judging alone keeps the run's end, when it was recorded)
                    daemon.ended = started + outcome.elapsed_s  # status's figures end here too: on disk at once,
                    await trio.to_thread.run_sync(board.put, "meta", "daemon", daemon)  # a kill may come next
                if not final_only:  # (a start for the final judging alone keeps the run's figures)
                    logger.info("run_ended", outcome=outcome.reason, elapsed_s=round(outcome.elapsed_s, 1),
                                time_to_target_s=outcome.time_to_target_s and round(outcome.time_to_target_s, 1))
                stats["utilization"] = (await queue_shares(core.queue)).cells
                depth = events.latest(QueueDepth)
                # (its own cells are still starting when a run resumes only its final judging: it waits for them)
                if outcome.reason != "signal" and config.fleet.final_seeds and not (depth and depth.cells or final_only):
                    logger.warning("final_judging_skipped", detail="no cell is connected")
                elif outcome.reason != "signal" and config.fleet.final_seeds:
                    if not final_only:  # the run's own figures first: a kill during the judging leaves them to resume it
                        interim = {**stats, "restarts": {name: s.restarts for name, s in system.actors.items()}}
                        await trio.to_thread.run_sync(
                            lambda: write_report(state_dir, build_report(board, config, outcome, interim)))
                    with final:
                        await _final_judging(logger, core, config)
                if sink is not None:
                    sink.close()
                stats["restarts"] = {name: s.restarts for name, s in system.actors.items()}
                daemon.last_seen, daemon.state = time.time(), f"stopped: {outcome.reason}"
                await trio.to_thread.run_sync(board.put, "meta", "daemon", daemon)
                stopping.set()
                nursery.cancel_scope.cancel()  # actors stop, cells drain (a signal meanwhile is read and logged)
            outer.cancel_scope.cancel()
    return outcome, stats


async def _final_judging(logger, core: Core, config: cfg.Config) -> None:
    """The starting policy and the champion on the same fresh held-out seeds, within a bounded time after
    the run (a quarter of the budget, at least a minute): where the run started and where it got to."""
    limit = max(60.0, config.fleet.budget_minutes * 15.0)
    logger.info("final_judging_started", seeds=config.fleet.final_seeds, limit_s=round(limit))
    with trio.move_on_after(limit) as scope:
        reply = await core.judge.ask(FinalJudging(task=config.cells.task, seeds=config.fleet.final_seeds),
                                     timeout=limit + 1)
    if scope.cancelled_caught or not isinstance(reply, FinalResult):
        logger.warning("final_judging_incomplete", reply=str(reply)[:200] if not scope.cancelled_caught else "timeout")


async def queue_shares(queue: Address) -> UtilizationReport:
    """The lease queue's cells' time shares, asked as a message; none while it restarts (a crash of the
    queue must not stop the progress lines or the report)."""
    reply = None
    with trio.move_on_after(5.0):  # a full mailbox too: the ask's own timeout starts once it is sent
        reply = await queue.ask(UtilizationRequest(), timeout=10.0)
    return reply if isinstance(reply, UtilizationReport) else UtilizationReport(cells={}, recorded=0)


class Ticks:
    """Progress lines (and the TensorBoard sink), the daemon's liveness record and the no-cell warning, every
    progress_s, from what the actors answer and publish: a timer, not a read of the blackboard."""

    def __init__(self, logger, board: Blackboard, config: cfg.Config, queue: Address, started: float,
                 deadline: float, daemon: DaemonRecord, events: EventHub, sink: TensorBoardSink | None):
        self.logger, self.board, self.config, self.queue, self.events = logger, board, config, queue, events
        self.started, self.deadline, self.daemon, self.sink = started, deadline, daemon, sink
        # Local cells take a while to start (imports, simulator); a fleet waiting for remote ones says so sooner.
        grace = 30.0 if config.cells.count else 3 * config.fleet.progress_s
        self.watch = progress.NoCellWatch(started, grace_s=max(5.0, grace))
        records = board.values("tokens", TokenRecord)  # once; then from the agents' events
        self.tokens = ledger.totals(records)
        self.agent_tokens = {a: t.total for a, t in ledger.per_agent(records).items()}

    async def feed_sink(self) -> None:
        if self.sink is None:
            return
        with self.events.subscribe(Progress) as updates:
            async for p in updates:
                self.sink.write(p)

    async def count_tokens(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Every model call as it is published (read at once: a long progress_s never overflows the
        subscription's buffer); started with `nursery.start`, so no call is missed after it returns."""
        with self.events.subscribe(TokensUsed) as used:
            task_status.started()
            async for event in used:
                call = event.call
                self.tokens = self.tokens.add(call)
                self.agent_tokens[call.agent] = self.agent_tokens.get(call.agent, 0) + ledger.call_tokens(
                    call.input_tokens, call.output_tokens)

    async def run(self) -> None:
        while True:
            await self.tick()
            await trio.sleep(self.config.fleet.progress_s)

    async def tick(self) -> None:
        self.daemon.last_seen = now = time.time()
        await trio.to_thread.run_sync(self.board.put, "meta", "daemon", self.daemon)
        shares = await queue_shares(self.queue)
        p = progress.progress(now, self.started, self.deadline, shares.recorded, self.events.latest(ChampionChanged),
                              mean_robot_utilization(shares.cells), self.tokens.total, self.agent_tokens)
        self.logger.info("progress", **progress.log_fields(p, self.started))
        self.events.publish(p)  # the sink (and any other subscriber) takes it from here
        cells = depth.cells if (depth := self.events.latest(QueueDepth)) is not None else 0
        if (waiting := self.watch.check(now, cells)) is not None:
            self.logger.warning("no_cells", waiting_s=round(waiting), local=self.config.cells.count,
                                listen=self.config.bus.listen, detail="no cell is connected, so no episode runs")


def build_report(board: Blackboard, config: cfg.Config, outcome: Outcome, stats: dict) -> dict:
    util = stats.get("utilization", {})
    episodes = board.values("episodes", EpisodeRecord)
    by_kind: dict[str, int] = {}
    for e in episodes:
        by_kind[e.kind] = by_kind.get(e.kind, 0) + 1
    return {
        "outcome": outcome.reason,
        "elapsed_s": round(outcome.elapsed_s, 1),
        "time_to_target_s": round(outcome.time_to_target_s, 1) if outcome.time_to_target_s is not None else None,
        "target": config.fleet.target,
        "task": config.cells.task,
        "champion": summary.champion(board.get("champion", config.cells.task, Champion)),
        "start_vs_champion": summary.final(current_final(board, config.cells.task)),
        "heldout_pool": summary.heldout_pools(heldout_records(board, config)),
        "episodes": len(episodes),
        "episodes_by_kind": by_kind,
        "episodes_flagged": board.counter("episodes_flagged"),
        "episodes_requeued": board.counter("episodes_requeued"),
        "regimes": regimes_used(board.values("findings", Finding)),
        **summary.cells(util),  # "mru", "cells"
        "actor_restarts": stats.get("restarts", {}),
        # team and per-agent ledger totals; CLI agents' runs add the cost their CLI reported (cli_cost_usd)
        "tokens": ledger.summary(board.values("tokens", TokenRecord), board.values("cli_runs", CLIRunRecord)),
    }


def write_report(state_dir: Path, report: dict) -> None:
    """report.json whole or not at all (replaced in one rename): a kill never leaves half of it."""
    part = state_dir / "report.json.part"
    part.write_text(json.dumps(report, indent=2))
    os.replace(part, state_dir / "report.json")


def completed_report(state_dir: Path, board: Blackboard, config: cfg.Config) -> None:
    """report.json gains the final judging that a kill kept from it (after the judging, before the last
    report): the only change made to a finished run."""
    try:
        report = json.loads((state_dir / "report.json").read_text())
    except (OSError, ValueError):
        return
    final = current_final(board, config.cells.task)
    if isinstance(report, dict) and report.get("start_vs_champion") is None and final is not None:
        write_report(state_dir, {**report, "start_vs_champion": summary.final(final)})


def current_final(board: Blackboard, task: str) -> FinalRecord | None:
    """The final judging of the champion now on the board; one of another champion (an earlier start's,
    before the run went on) is not this run's."""
    record = board.get("meta", "final", FinalRecord)
    champion = board.get("champion", task, Champion)
    if record is None or record.task != task or record.champion != (champion.policy if champion else None):
        return None
    return record


class CellFigures(msgspec.Struct):
    mru: float
    agent_share: float
    wall_s: float
    by_state_s: dict[str, float]


class RunFigures(msgspec.Struct):
    """What a finished run's report.json says of the run itself: a run resumed only for its final judging
    keeps them (its time and MRU end where the run ended). A report of an earlier start (its outcome a
    signal or the budget) does not decode: that run is not resumed."""

    outcome: Literal["target"]  # only a run that met its target is resumed for its final judging
    elapsed_s: float
    time_to_target_s: float
    mru: float
    cells: dict[str, CellFigures]
    actor_restarts: dict[str, int]


def _run_figures(path: Path) -> dict | None:
    """The run's own figures from its report.json, or None when it is missing or damaged."""
    try:
        return msgspec.to_builtins(msgspec.json.decode(path.read_bytes(), type=RunFigures))
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return None


def format_report(report: dict) -> str:
    lines = [f"enpire fleet: {report['outcome']} after {report['elapsed_s']:.0f}s",
             "  " + summary.champion_line(report["task"], report["champion"])]
    final = report.get("start_vs_champion")
    if final:
        for label, r in (("started from", final["start"]), ("champion", final["champion"])):
            if r:
                lines.append(f"  {label} {r['policy']}: {r['successes']}/{r['n']} = {r['rate']:.1%}, Wilson 95% "
                             f"[{r['wilson95'][0]:.3f}, {r['wilson95'][1]:.3f}] on the same fresh held-out seeds")
    lines += ["  " + summary.heldout_line(task, pool) for task, pool in report["heldout_pool"].items() if pool["low"]]
    ttt = report["time_to_target_s"]
    lines.append(f"  time to target: {ttt:.0f}s" if ttt is not None else "  target not reached")
    lines.append(f"  episodes {report['episodes']} {report['episodes_by_kind']}; MRU {report['mru']:.1%}")
    for agent, regimes in sorted(report["regimes"].items()):
        lines.append(f"    {agent}: regimes {' > '.join(regimes)}")
    lines += ["    " + summary.cell_line(cid, u) for cid, u in report["cells"].items()]
    return "\n".join(lines)


def idle_fleet(config: cfg.Config) -> str | None:
    """Why a fleet with this configuration could never run an episode, or None."""
    if config.cells.count == 0 and not config.bus.listen:
        return ("cells.count is 0 and bus.listen is empty: no cell could ever join, so the fleet would do no "
                "work; add local cells (--cells N) or listen for remote ones ([bus] listen)")
    if config.agents.count == 0 and not config.fleet.baseline:
        return ("agents.count is 0 and fleet.baseline is empty: no policy would ever exist to run; add agents "
                "(--agents N) or a starting policy ([fleet] baseline)")
    if not config.scheduler.pooled and config.agents.count > config.cells.count and not config.bus.listen:
        return (f"scheduler.pooled is false and agents.count {config.agents.count} is more than cells.count "
                f"{config.cells.count}: unpooled, agent-i's work runs only on cell-i, so agent-{config.cells.count} "
                "would wait forever; add cells, remove agents or pool the cells")
    return None


def short_lease(config: cfg.Config) -> str | None:
    """Why leases would end before their episodes do (each episode cut off and re-run), or None."""
    task, lease = config.task(), config.scheduler.lease_s
    # paced: a full episode's length, every attempt of a pass@k episode included (one lease covers them all)
    episode_s = task.attempts * task.horizon / task.control_hz if task.control_hz else 0.0
    if lease >= max(episode_s, MIN_LEASE_S):
        return None
    length = (f"a full episode takes {episode_s:g} s" + (f" ({task.attempts} attempts)" if task.attempts > 1 else "")
              if episode_s else f"below {MIN_LEASE_S:g} s")
    return (f"scheduler.lease_s {lease:g} is shorter than an episode ({length}): cells will be cut off and "
            "episodes re-run again and again")


def trainer_device_problem(device: str) -> str | None:
    """Why the daemon's own training cannot use `device`, or None. Only a named GPU can be missing ("auto"
    falls back to the CPU), so torch is imported only then."""
    if not device.strip().lower().startswith("cuda"):
        return None
    from enpire.learning.device import DeviceError, resolve

    try:
        resolve(device)
    except DeviceError as e:
        return str(e)
    return None


def main(argv: list[str] | None = None, prog: str = "python -m enpire.fleet") -> int:
    args = parse_args(argv, prog)
    try:
        config = effective_config(args)
    except cfg.ConfigError as e:
        print(f"enpire: {e}", file=sys.stderr)
        return EXIT_CONFIG
    if args.print_config:
        print(cfg.to_toml(config), end="")
        return 0
    try:
        if config.agents.count:
            make_backend(config, 0)  # a missing API key or model setting fails here, in one line
        trio.run(probe_model, config)  # so does a model name the endpoint does not serve, or a refused key
    except LLMConfigError as e:
        print(f"enpire: agents: {e}", file=sys.stderr)
        return EXIT_CONFIG
    if config.cells.count and (reason := isolation.check()) is not None:
        if config.sandbox.require_isolation:
            print(f"enpire: sandbox: {reason}; policies are untrusted code and run only confined "
                  "(set [sandbox] require_isolation = false to run them anyway)", file=sys.stderr)
            return EXIT_CONFIG
        print(f"enpire: warning: sandbox: {reason}; running policies unconfined as configured "
              "([sandbox] require_isolation = false)", file=sys.stderr)
    if config.trainer.local_slots and (reason := trainer_device_problem(config.trainer.device)) is not None:
        print(f"enpire: trainer.device: {reason} (local_slots = {config.trainer.local_slots}: the daemon trains "
              "here; set device = \"auto\" or local_slots = 0 to leave training to joined trainers)", file=sys.stderr)
        return EXIT_CONFIG
    if config.bus.listen and not os.environ.get(config.bus.secret_env):
        print(f"enpire: bus.listen is {config.bus.listen!r} but ${config.bus.secret_env} is empty: "
              "remote cells authenticate with that shared secret", file=sys.stderr)
        return EXIT_CONFIG
    if (problem := cfg.state_dir_problem(config.fleet.state_dir)) is not None:
        print(f"enpire: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    if idle := idle_fleet(config):  # a fleet that could never do work must not sit out its budget
        print(f"enpire: {idle}", file=sys.stderr)
        return EXIT_CONFIG
    if short := short_lease(config):
        print(f"enpire: warning: {short}", file=sys.stderr)
    if config.fleet.tensorboard and (reason := check_tensorboard()):
        print(f"enpire: {reason}", file=sys.stderr)
        return EXIT_CONFIG
    state_dir = Path(config.fleet.state_dir).resolve()
    try:
        lock = lock_state_dir(state_dir)  # before anything in the directory is read or written
    except StateDirError as e:
        print(f"enpire: {e}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        board, meta = open_state_dir(state_dir, config.fleet.map_size_mb)
    except StateDirError as e:
        lock.release()
        print(f"enpire: {e}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        champion = board.get("champion", config.cells.task, Champion)
    except BlackboardError as e:
        board.close()
        lock.release()
        print(f"enpire: {state_dir}: {e}", file=sys.stderr)
        return EXIT_CONFIG
    # A finished run, started again with the same target (or a lower one): say so and touch nothing, unless
    # its final judging did not finish (a stop signal) and its report says it met the target: then that
    # judging alone runs.
    previous = None
    if config.fleet.stop_at_target and champion is not None and judging.confirmation(champion, config) == "met":
        met = f"the target was already met here ({champion.policy.ref} confirmed {champion.successes}/{champion.n})"
        cut = config.fleet.final_seeds and current_final(board, config.cells.task) is None
        previous = _run_figures(state_dir / "report.json") if cut else None
        if not cut:
            completed_report(state_dir, board, config)
        if previous is None:
            board.close()
            lock.release()
            print(f"enpire: {state_dir}: {met}; nothing to run. Its report is {state_dir / 'report.json'}"
                  + (" (without its final judging, cut short or skipped: no start-vs-champion figures)" if cut else "")
                  + "; use a new --state-dir to start again", file=sys.stderr)
            return EXIT_TARGET
        print(f"enpire: {state_dir}: {met}, but its final judging did not finish: running it alone now (the start "
              f"and the champion on {config.fleet.final_seeds} held-out seeds, those it drew if it drew any)",
              file=sys.stderr)
    log.configure(state_dir, "fleet", console=not args.quiet)
    try:
        try:
            outcome, stats = trio.run(run_fleet, config, state_dir, board, meta, previous is not None,
                                      restrict_keyboard_interrupt_to_checkpoints=True)
        except (StartupError, ActorStartError, BaseExceptionGroup) as e:
            if (startup := _startup_error(e)) is None:
                raise
            structlog.get_logger().error("fleet_not_started", actor="fleet", error=str(startup))
            print(f"enpire: {startup}", file=sys.stderr)
            return EXIT_CONFIG
        # The run is over: a stop signal now (a second Ctrl-C, a supervisor's repeated SIGTERM) must not
        # cut the report short. Until it is written and printed, they are ignored.
        ignored = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            report = build_report(board, config, outcome, stats)
            if previous is not None:  # resumed for its final judging alone: the run's own figures stay
                report.update(previous)
            write_report(state_dir, report)
            print(format_report(report), flush=True)
        finally:
            for s, handler in ignored.items():
                signal.signal(s, handler)
    finally:
        board.close()
        lock.release()
    return {"target": EXIT_TARGET, "budget": EXIT_BUDGET, "signal": EXIT_SIGNAL}[outcome.reason]


if __name__ == "__main__":
    sys.exit(command.run(main))
