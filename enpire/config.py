"""Typed configuration: `enpire.toml` decoded into msgspec Structs, validated at start.

The embedded default is the Structs' own defaults (2 simulated Meta-World peg-insertion cells, 1 built-in agent), so
`python -m enpire.fleet` runs with no file at all. Every problem is reported as one line naming the
file, the key and the reason.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from enpire.metrics import sprt

# Every number has bounds: an absurd value (2**63 - 1 MB of memory, 10**6 cells, an `inf` budget) is a
# one-line configuration error at start, never a crash later. The bounds are generous on purpose.
PositiveInt = Annotated[int, Meta(ge=1, le=1_000_000_000)]
NonNegInt = Annotated[int, Meta(ge=0, le=1_000_000_000)]
PositiveFloat = Annotated[float, Meta(gt=0, le=1e9)]  # also refuses inf and nan
Fraction = Annotated[float, Meta(ge=0, le=1)]
Seconds = Annotated[float, Meta(gt=0, le=86_400)]  # at most a day
Minutes = Annotated[float, Meta(ge=0, le=525_600)]  # at most a year
Seed = Annotated[int, Meta(ge=0, lt=2**32)]  # numpy seeds


class Strict(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class SeedRange(Strict):
    start: Seed
    count: Annotated[int, Meta(ge=1, le=100_000_000)]

    def seeds(self) -> range:
        return range(self.start, self.start + self.count)


class HeldoutSeeds(SeedRange):
    """Every seed from `start` up is held out; a run judges `count` of them at most (its pool), drawn in an
    order keyed by a secret in the state dir (`enpire.heldout`): nothing an agent can read names them."""

    def seeds(self) -> range:
        return range(self.start, 2**32)


class ActionLimitsConfig(Strict):
    max_delta: Annotated[float, Meta(gt=0, le=1e6)] = 100.0  # largest allowed change between consecutive actions
    # Per named action (a LeRobot robot's action_features, e.g. "shoulder_pan.pos"): [low, high].
    # A real arm's joint and workspace limits; an action outside them ends the episode.
    joints: dict[str, Annotated[list[float], Meta(min_length=2, max_length=2)]] = {}


Scalar = str | int | float | bool
DriverOption = Scalar | list[Scalar] | dict[str, Scalar | list[Scalar]]


class TaskConfig(Strict):
    driver: str = "pusht"  # built in, an entry point of group "enpire.drivers", or "package.module:Class"
    driver_options: dict[str, DriverOption] = {}  # keyword arguments of the driver (e.g. a LeRobot robot)
    verifier_kind: str = ""  # "" = the driver's own check; else "pusht", "metaworld" or "package.module:function"
    # "state": the simulator's state vector; "pixels" (Push-T): a 96x96 RGB camera frame and the pusher's
    # position, never the object's pose (LeRobot's Push-T image setting)
    observation: Literal["state", "pixels"] = "state"
    horizon: Annotated[int, Meta(ge=1, le=1_000_000)] = 300
    verifier: Literal["state", "vision"] = "state"
    attempts: Annotated[int, Meta(ge=1, le=100)] = 1  # k of pass@k for evaluations
    control_hz: Annotated[float, Meta(ge=0, le=100_000)] = 0.0  # pace simulated steps like a real robot; 0 = unpaced
    tuning_seeds: SeedRange = msgspec.field(default_factory=lambda: SeedRange(start=0, count=100_000))
    # Every judging, confirmation and final judging draws fresh seeds, never reused, from `start` up to 2**32
    # in a secret order; `count` is the pool: size it for the run (a judging takes scheduler.promote_seeds,
    # a confirmation up to CONFIRMATION_CAP x fleet.min_heldout).
    heldout_seeds: HeldoutSeeds = msgspec.field(default_factory=lambda: HeldoutSeeds(start=1_000_000, count=100_000))
    limits: ActionLimitsConfig = msgspec.field(default_factory=ActionLimitsConfig)
    record_trajectories: bool = True


class FleetConfig(Strict):
    state_dir: str = "state"
    budget_minutes: Annotated[float, Meta(gt=0, le=525_600)] = 15.0
    target: Fraction = 0.9  # held-out success rate of the champion that ends the run
    min_heldout: Annotated[int, Meta(ge=1, le=10_000_000)] = 100  # held-out episodes the champion needs before the target counts
    progress_s: Seconds = 10.0
    stop_at_target: bool = True  # false: run the whole budget (benchmarks, soak)
    map_size_mb: Annotated[int, Meta(ge=1, le=1 << 20)] = 1024  # initial LMDB map (<= 1 TiB); it grows by doubling when nearly full
    baseline: str = ""  # folder with the policy the team starts from (policy.py ...); "" = agents write one
    # at the end of a run, the starting policy and the champion on this many fresh held-out seeds each; 0 = none
    final_seeds: NonNegInt = 100
    tensorboard: bool = False  # progress events as TensorBoard scalars in <state_dir>/tensorboard (extra: tensorboard)


CONFIRMATION_CAP = 5  # a champion's confirmation stops "not_met" after this many times fleet.min_heldout episodes
PIXEL_DRIVERS = ("pusht",)  # drivers that can hand the policy camera frames instead of the state
DEFAULT_TASK = "peg-insert-side-v3"  # Meta-World pin insertion: the built-in agent's first guess is far below target


def default_tasks() -> dict[str, TaskConfig]:
    """The tasks every configuration knows unless its file names its own: Push-T and Meta-World pin insertion."""
    return {
        "pusht": TaskConfig(),
        "peg-insert-side-v3": TaskConfig(driver="peg-insert-side-v3", horizon=500,  # Meta-World's episode length
                                         limits=ActionLimitsConfig(max_delta=2.0)),  # actions lie in [-1, 1]^4
    }


class CellsConfig(Strict):
    count: Annotated[int, Meta(ge=0, le=1024)] = 2
    task: str = DEFAULT_TASK
    # (no "real" key: a real robot needs a person at its terminal, so it joins as `enpire cell --real`)
    # "on": each local cell and its policy sandbox share one CPU (cell i on CPU i mod n), so the hand-off
    # at every control step stays on one core. "off": the OS places them, so a policy can think on another
    # core while its cell's simulator scores the step. "auto": on when there are at least as many cells
    # as CPUs (every core has a cell to run anyway), off otherwise.
    cpu_pinning: Literal["auto", "on", "off"] = "auto"


class PriceConfig(Strict):
    input: Annotated[float, Meta(ge=0, le=1e9)] = 0.0
    output: Annotated[float, Meta(ge=0, le=1e9)] = 0.0
    cached_input: float = -1.0
    cache_write: float = -1.0


class AgentsConfig(Strict):
    count: Annotated[int, Meta(ge=0, le=256)] = 1
    backend: Literal["builtin", "anthropic", "openai", "openai_responses", "claude-code", "codex", "command"] = "builtin"
    # built-in researcher
    population: Annotated[int, Meta(ge=1, le=10_000)] = 12  # candidates per search generation
    seeds_per_candidate: Annotated[int, Meta(ge=1, le=10_000)] = 6
    learn: bool = True  # may train BC / RL on the fleet's successes once tuning plateaus
    plateau_generations: PositiveInt = 5  # generations without gain that make a tuning plateau
    learn_min_successes: PositiveInt = 100  # recorded successes before the first behaviour cloning
    episode_budget: NonNegInt = 0  # episodes each agent may request; 0 = no limit
    # model-driven backends
    model: str = ""  # required when backend is not "builtin"
    base_url: str = ""  # "" = the provider's own; e.g. "http://127.0.0.1:8000/v1" for vLLM, llama.cpp, Ollama
    api_key_env: str = ""  # "" = ANTHROPIC_API_KEY / OPENAI_API_KEY; keys are read from the environment only
    token_budget: Annotated[int, Meta(ge=0, le=10**13)] = 0  # per agent, input + output tokens; 0 = no limit
    wall_budget_minutes: Minutes = 0.0  # 0 = no limit
    # turns kept verbatim in the prompt; past this many (or context_chars) the oldest half become journal
    # lines at once, so the prompt's cached prefix changes rarely
    max_turns_window: PositiveInt = 40
    context_chars: PositiveInt = 120_000
    max_output_tokens: PositiveInt = 4096
    max_output_ceiling: PositiveInt = 16384  # a reply cut off at the limit is asked again with up to this limit
    request_timeout_s: Seconds = 120.0
    max_failures: PositiveInt = 5  # consecutive failed model calls before the agent pauses
    pause_s: Seconds = 300.0
    notes_dir: str = ""  # a folder of notes / literature the agents may search
    digest: bool = True  # false (ablation): briefings list every peer finding instead of the summarizer's digest
    # CLI coding agents (backend "claude-code", "codex" or "command"): one research turn is one headless run
    command: str = ""  # "command": argv template, placeholders {prompt} {mcp_config} {workdir} {model} {base_url}
    turn_minutes: PositiveFloat = 30.0  # a run still going after this is stopped (and restarted with backoff)
    max_turns: NonNegInt = 0  # runs per agent; 0 = until the budgets end
    # model agents on a pooled fleet start a turn once some results are in and fewer than this many
    # episodes per cell are queued (teammates' coming requests included); 0 = after all their results
    pace_per_cell: Annotated[float, Meta(ge=0, le=1e6)] = 10.0
    # cost of each model call on the token ledger: [agents.prices."MODEL"] input/output/cached_input/
    # cache_write in currency per million tokens (cached_input, cache_write default to input)
    prices: dict[str, PriceConfig] = {}


class SchedulerConfig(Strict):
    lease_s: Seconds = 60.0  # a leased episode not reported by then is re-queued
    heartbeat_s: Annotated[float, Meta(gt=0, le=3600)] = 1.0
    background: bool = True  # idle cells re-evaluate the champion on more held-out seeds
    pooled: bool = True  # false: cell-i runs only agent-i's episodes and no background work (the paper's set-up)
    promote_seeds: Annotated[int, Meta(ge=1, le=10_000_000)] = 100  # held-out seeds a candidate is judged on
    alpha: Annotated[float, Meta(gt=0, lt=1)] = 0.05  # promotion test significance
    rollback_min_n: PositiveInt = 30  # confirmation episodes before a regression can roll a champion back
    smoke_seeds: PositiveInt = 5  # simulated episodes a policy passes before a real cell runs it


class SandboxConfig(Strict):
    act_timeout_s: Annotated[float, Meta(gt=0, le=60)] = 0.05
    max_missed_deadlines: Annotated[int, Meta(ge=1, le=1000)] = 3
    load_timeout_s: Annotated[float, Meta(gt=0, le=600)] = 10.0
    cpu_seconds: Annotated[int, Meta(ge=1, le=86_400)] = 600
    memory_mb: Annotated[int, Meta(ge=64, le=1 << 20)] = 1024
    scratch_mb: Annotated[int, Meta(ge=1, le=1 << 16)] = 64  # the sandbox's tmpfs scratch (in memory)
    pids: Annotated[int, Meta(ge=4, le=4096)] = 16  # processes + threads in a sandbox
    # Policies are untrusted code: without the isolation engine (bubblewrap) the daemon refuses to run
    # them. false = run them with only the in-process layers (rlimits, Landlock, audit hook); opt-out.
    require_isolation: bool = True


class TrainerConfig(Strict):
    device: str = "auto"  # where recipes train: "auto" (CUDA when present, else CPU), "cpu", "cuda", "cuda:N"
    # training jobs the daemon runs on its own machine at once; 0 = only trainers that joined with
    # `python -m enpire.trainer --connect ...` train (e.g. a GPU box), which share the same queue
    local_slots: NonNegInt = 1
    processes: NonNegInt = 1  # data-parallel processes per BC job (torch.distributed); 0 = one per GPU
    lease_s: PositiveFloat = 30.0  # a remote trainer silent this long loses its job to the queue again
    heartbeat_s: Annotated[float, Meta(ge=0.05, le=3600)] = 2.0  # how often a remote trainer says it still works


class BusConfig(Strict):
    listen: str = ""  # e.g. "tcp://0.0.0.0:7700" to accept remote cells; "" = local ipc only
    secret_env: str = "ENPIRE_SECRET"  # environment variable holding the shared secret for tcp peers


class Config(Strict):
    fleet: FleetConfig = msgspec.field(default_factory=FleetConfig)
    cells: CellsConfig = msgspec.field(default_factory=CellsConfig)
    agents: AgentsConfig = msgspec.field(default_factory=AgentsConfig)
    scheduler: SchedulerConfig = msgspec.field(default_factory=SchedulerConfig)
    sandbox: SandboxConfig = msgspec.field(default_factory=SandboxConfig)
    bus: BusConfig = msgspec.field(default_factory=BusConfig)
    trainer: TrainerConfig = msgspec.field(default_factory=TrainerConfig)
    tasks: dict[str, TaskConfig] = msgspec.field(default_factory=default_tasks)

    def task(self, name: str | None = None) -> TaskConfig:
        return self.tasks[name or self.cells.task]


class ConfigError(ValueError):
    """One line: file, key, reason."""


def _key_of(message: str) -> tuple[str, str]:
    """msgspec says '... - at `$.cells.count`'; return ('cells.count', reason)."""
    m = re.search(r"\s*-\s*at `\$\.?([^`]*)`", message)
    if not m:
        return "", message
    return m.group(1), message[: m.start()]


def _convert(raw: object, type_, source: str, prefix: str = ""):
    try:
        return msgspec.convert(raw, type_)
    except msgspec.ValidationError as e:
        key, reason = _key_of(str(e))
        raise ConfigError(f"{source}: {prefix}{key or '(top level)'}: {reason}") from None


MAX_CONFIG_BYTES = 1 << 20


def decode(text: str | bytes, source: str = "<config>") -> Config:
    try:
        # utf-8-sig: a byte-order mark (some Windows editors write one) is not part of the TOML
        raw = tomllib.loads(text.decode("utf-8-sig") if isinstance(text, bytes) else text.removeprefix("\ufeff"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{source}: not valid TOML: {e}") from None
    # Tasks are checked one by one first: msgspec hides dict keys in its error paths. A file's task
    # settings start from the embedded task of the same name, and the embedded tasks it does not name
    # stay defined (`[cells] task = "pusht"` alone switches tasks).
    tasks = raw.get("tasks")
    if isinstance(tasks, dict):
        defaults = msgspec.to_builtins(default_tasks())
        for name, task in tasks.items():
            if name in defaults and isinstance(task, dict):
                task = tasks[name] = _merged(defaults[name], task)
            _convert(task, TaskConfig, source, f"tasks.{name}.")
        raw["tasks"] = {**defaults, **tasks}
    config = _convert(raw, Config, source)
    check(config, source)
    return config


def _merged(base: dict, over: dict) -> dict:
    """`over` on top of `base`, tables merged key by key."""
    out = dict(base)
    for key, value in over.items():
        out[key] = _merged(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


def check(config: Config, source: str = "<config>") -> None:
    """Cross-field checks that types alone cannot express."""
    if config.cells.task not in config.tasks:
        known = ", ".join(sorted(config.tasks)) or "none"
        raise ConfigError(f"{source}: cells.task: task {config.cells.task!r} is not defined (tasks: {known})")
    for name, task in config.tasks.items():
        from hw.plugins import (  # local import: config stays light for tools that only read it
            PluginError,
            driver_options_problem,
            driver_spec,
            verifier_methods,
            verifier_name,
        )

        try:
            driver_spec(task.driver)
        except PluginError as e:
            raise ConfigError(f"{source}: tasks.{name}.driver: {e}") from None
        try:
            kind = task.verifier_kind or verifier_name(task.driver)
            methods = verifier_methods(kind)
        except PluginError as e:
            raise ConfigError(f"{source}: tasks.{name}.{'verifier_kind' if task.verifier_kind else 'driver'}: {e}") from None
        if methods is not None and task.verifier not in methods:
            raise ConfigError(f"{source}: tasks.{name}.verifier: {task.verifier!r} is not a method of its verifier "
                              f"{kind!r} (it has: {', '.join(methods)})")
        if task.driver_options and (problem := driver_options_problem(task.driver, task.driver_options)):
            raise ConfigError(f"{source}: tasks.{name}.driver_options: {problem}")
        for joint, (low, high) in task.limits.joints.items():
            if not low < high:
                raise ConfigError(f"{source}: tasks.{name}.limits.joints.{joint}: low {low} must be below high {high}")
        for which in ("tuning_seeds", "heldout_seeds"):
            seeds = getattr(task, which).seeds()
            if seeds.stop > 2**32:
                raise ConfigError(f"{source}: tasks.{name}.{which}: seeds up to {seeds.stop - 1}; seeds must be < 2**32")
        if task.heldout_seeds.count > len(task.heldout_seeds.seeds()):
            raise ConfigError(f"{source}: tasks.{name}.heldout_seeds.count: {task.heldout_seeds.count} is more than "
                              f"the {len(task.heldout_seeds.seeds())} seeds from its start up to 2**32")
        if task.observation == "pixels" and task.driver not in PIXEL_DRIVERS:
            raise ConfigError(f"{source}: tasks.{name}.observation: 'pixels' needs a camera driver "
                              f"({', '.join(PIXEL_DRIVERS)}), not {task.driver!r}")
        if _overlap(task.tuning_seeds.seeds(), task.heldout_seeds.seeds()):
            raise ConfigError(f"{source}: tasks.{name}.heldout_seeds: start {task.heldout_seeds.start} is not above "
                              "tuning_seeds; every seed from heldout_seeds.start up is held out and must stay unseen")
        # one judging, one confirmation or one final judging must fit in the pool (each draws fresh seeds)
        for key, need in (("fleet.min_heldout", config.fleet.min_heldout),
                          ("scheduler.promote_seeds", config.scheduler.promote_seeds),
                          ("fleet.final_seeds", config.fleet.final_seeds)):
            if task.heldout_seeds.count < need:
                raise ConfigError(f"{source}: tasks.{name}.heldout_seeds.count: {task.heldout_seeds.count} < {key} {need}")
    fleet, cap = config.fleet, CONFIRMATION_CAP * config.fleet.min_heldout
    if 0 < fleet.target < 1 and sprt(cap, cap, fleet.target, config.scheduler.alpha, min_n=fleet.min_heldout,
                                     max_n=cap) != "met":
        raise ConfigError(f"{source}: fleet.target: {fleet.target} cannot be confirmed: even {cap} successes in a row "
                          f"(the confirmation's cap, {CONFIRMATION_CAP} x fleet.min_heldout) fall short at "
                          f"scheduler.alpha {config.scheduler.alpha}; raise fleet.min_heldout or lower the target")
    if config.fleet.baseline:
        policy = Path(config.fleet.baseline) / "policy.py"
        if not policy.is_file():
            raise ConfigError(f"{source}: fleet.baseline: {config.fleet.baseline!r} has no policy.py")
        try:  # a starting policy that cannot even compile would fail every episode of the run
            compile(policy.read_bytes(), str(policy), "exec")
        except (SyntaxError, ValueError) as e:
            where = f"line {e.lineno}: {e.msg}" if isinstance(e, SyntaxError) else str(e)
            raise ConfigError(f"{source}: fleet.baseline: {str(policy)!r} does not compile ({where})") from None
    if config.agents.notes_dir and not Path(config.agents.notes_dir).is_dir():
        raise ConfigError(f"{source}: agents.notes_dir: {config.agents.notes_dir!r} is not a folder")
    if config.agents.backend != "builtin" and not config.agents.model:
        raise ConfigError(f"{source}: agents.model: backend {config.agents.backend!r} needs a model name")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", config.trainer.device):
        raise ConfigError(f"{source}: trainer.device: {config.trainer.device!r} is not auto, cpu, cuda or cuda:N")
    if config.trainer.heartbeat_s >= config.trainer.lease_s:
        raise ConfigError(f"{source}: trainer.heartbeat_s: {config.trainer.heartbeat_s} must be below "
                          f"trainer.lease_s {config.trainer.lease_s}")
    if config.bus.listen and not config.bus.listen.startswith(("tcp://", "ipc://")):
        raise ConfigError(f"{source}: bus.listen: {config.bus.listen!r} is not a tcp:// or ipc:// url")


# Directories a state dir must never be: the daemon makes its state dir private (chmod 0700) and fills it.
SYSTEM_DIRS = frozenset({"/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib32", "/lib64", "/libx32",
                         "/media", "/mnt", "/opt", "/proc", "/root", "/run", "/sbin", "/srv", "/sys", "/tmp",
                         "/usr", "/var", "/var/lib", "/var/tmp"})
SYSTEM_TREES = ("/proc", "/sys", "/dev", "/run", "/boot", "/etc", "/bin", "/sbin", "/lib", "/usr")


# What a fleet writes in its state directory: any of them, and a folder is a state dir (a new one is empty).
# RUN_RECORDS are a run's results: beside an empty blackboard they mean the blackboard lost its run.
RUN_RECORDS = ("episodes", "report.json")
STATE_MARKERS = ("daemon.lock", "blackboard.lmdb", "logs", "workspace", *RUN_RECORDS)


def state_dir_problem(path: str | Path) -> str | None:
    """Why `path` cannot be a state directory (one line), or None."""
    given = str(path)
    if not given.strip():
        return "state_dir is empty (an unset variable?); name a directory, e.g. ./state"
    try:
        real = Path(path).expanduser().resolve()
    except (OSError, RuntimeError) as e:
        return f"state_dir {given!r}: cannot resolve: {e}"
    text = str(real)
    if text in SYSTEM_DIRS or any(text == t or text.startswith(t + "/") for t in SYSTEM_TREES):
        shown = given if given == text else f"{given!r} ({text})"
        return f"state_dir {shown} is a system directory; use a directory of its own, e.g. ./state"
    if real == Path.home().resolve():
        return f"state_dir {given!r} is your home directory; use a directory of its own, e.g. ~/enpire-state"
    if real.exists() and not real.is_dir():
        return f"state_dir {given!r} exists and is not a directory"
    if real.is_dir() and not any((real / name).exists() for name in STATE_MARKERS):
        try:
            other = next(real.iterdir(), None)
        except OSError as e:
            return f"state_dir {given!r}: cannot list it: {e.strerror}"
        if other is not None:  # a project folder, /var/log: never adopted (nor made private to this user)
            return (f"state_dir {given!r} holds other files (e.g. {other.name!r}) and no fleet state; "
                    "use a new or empty directory")
    return None


def _overlap(a: range, b: range) -> bool:
    return a.start < b.stop and b.start < a.stop


def load(path: str | Path | None) -> Config:
    """Load a config file; None means the embedded default."""
    if path is None:
        return Config()
    path = Path(path)
    try:
        with path.open("rb") as f:
            text = f.read(MAX_CONFIG_BYTES + 1)  # bounded: /dev/zero or a wrong huge file is not read whole
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES >> 20} MiB: not a config file")
    return decode(text, str(path))


def with_overrides(config: Config, **overrides) -> Config:
    """Apply command-line flags (dotted keys, None = not given) and re-check."""
    for dotted, value in overrides.items():
        if value is None:
            continue
        section, field = dotted.split(".")
        part = getattr(config, section)
        config = msgspec.structs.replace(config, **{section: msgspec.structs.replace(part, **{field: value})})
    # Convert through builtins so flag values get the same validation as file values.
    config = _convert(msgspec.to_builtins(config), Config, "command line")
    check(config, "command line")
    return config


def to_toml(config: Config) -> str:
    return msgspec.toml.encode(config).decode()
