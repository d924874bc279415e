"""Every message that crosses the bus: one msgspec tagged union, one module.

A frame on the wire is an `Envelope` encoded with msgpack. The envelope carries the request id that
makes the acked path idempotent: a receiver that sees an id twice answers with the reply it gave the
first time instead of acting again.

Rules of thumb:
- Messages are immutable value objects (frozen Structs); anything that must survive a restart is also
  written to the blackboard by the actor that owns it.
- Arrays travel as `Array` (dtype, shape, raw bytes), never pickled.
"""

from __future__ import annotations

import enum
import hashlib
from typing import Literal, Protocol, Union

import msgspec
import numpy as np


class Message(msgspec.Struct, frozen=True, tag=True, kw_only=True):
    """Base of every bus message; the tag is the class name."""


class Address(Protocol):
    """Whatever answers a message with a message (an actor's address, a bus client): the domain talks
    to actors through this and never imports the actor runtime."""

    async def ask(self, msg: Message, timeout: float = ...) -> Message: ...


# ----------------------------------------------------------------------------- values


class Array(msgspec.Struct, frozen=True):
    """A numpy array as raw bytes: cheap to encode, no pickle."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes

    @classmethod
    def of(cls, a: np.ndarray) -> Array:
        a = np.ascontiguousarray(a)
        return cls(dtype=a.dtype.str, shape=tuple(a.shape), data=a.tobytes())

    def numpy(self) -> np.ndarray:
        dtype = np.dtype(self.dtype)
        if dtype.hasobject:
            raise ValueError(f"Array with object dtype {self.dtype!r} refused")
        expected = int(np.prod(self.shape, dtype=np.int64)) * dtype.itemsize
        if expected != len(self.data):
            raise ValueError(f"Array of shape {self.shape} {self.dtype} needs {expected} bytes, got {len(self.data)}")
        return np.frombuffer(self.data, dtype=dtype).reshape(self.shape)


class PolicySpec(msgspec.Struct, frozen=True):
    """What a cell runs: a commit of the policy workspace, optional parameters, optional checkpoint."""

    commit: str
    params: dict[str, float] = {}
    artifact: str = ""  # content hash of a checkpoint in artifacts/, "" for none

    @property
    def ref(self) -> str:
        """Short, stable name of this exact candidate (commit + parameters + artifact)."""
        blob = msgspec.json.encode([self.commit, sorted(self.params.items()), self.artifact])
        return f"{self.commit[:10]}-{hashlib.sha1(blob).hexdigest()[:8]}"


def bundle_hash(files: dict[str, bytes]) -> str:
    """Content hash of a policy's files: leases name a bundle by it, cells cache bundles by it."""
    h = hashlib.sha256()
    for path in sorted(files):
        data = files[path] if isinstance(files[path], bytes) else files[path].encode()
        h.update(f"{path}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()[:32]


class PolicyBundle(Message, frozen=True):
    """A policy's files as shipped to a cell, once per content hash (the reply to `BundleRequest`)."""

    digest: str  # bundle_hash(files)
    # relative path -> exact file content (sources as UTF-8, checkpoints such as weights.npz as raw
    # bytes: msgpack carries bytes as they are); must contain "policy.py"
    files: dict[str, bytes]


class Verdict(msgspec.Struct, frozen=True):
    success: bool
    score: float  # task-defined progress in [0, 1] (coverage for Push-T)
    reason: str  # "success", "timeout", "safety_violation: ...", "policy_error: ...", ...
    verifier: str  # which trusted check decided: "pusht_state", "pusht_vision", "metaworld"


CellState = Literal["idle", "resetting", "running", "verifying", "faulted", "offline"]
JobKind = Literal["agent", "heldout", "background"]


class Purpose(enum.Enum):
    """Why a job runs: a closed set. The purpose fixes the job's kind (whose time it is, for MRU)."""

    EVAL = "eval"  # an agent's evaluation on tuning seeds
    SMOKE = "smoke"  # simulated episodes a policy passes before a real cell runs it
    PROMOTE = "promote"  # judging a candidate on fresh held-out seeds
    FINAL = "final"  # the run's paired final judging: starting policy and champion on the same fresh seeds
    BASELINE = "baseline"  # judging the starting policy while there is no champion
    CONFIRM = "confirm"  # more fresh held-out episodes of the champion, until the sequential rule stops

    @property
    def kind(self) -> JobKind:
        if self in (Purpose.EVAL, Purpose.SMOKE):
            return "agent"
        return "heldout" if self in (Purpose.PROMOTE, Purpose.FINAL) else "background"


class Segment(msgspec.Struct, frozen=True):
    """One stretch of a cell's time in one state, in the cell's own clock (durations are what count)."""

    state: CellState
    start: float
    end: float
    kind: JobKind | None = None  # for "running": whose experiment it was


class Attempt(msgspec.Struct, frozen=True):
    """One try within a pass@k rollout."""

    verdict: Verdict
    steps: int
    signature: bytes = b""  # the verifier's, over this attempt's verdict and the lease (enpire/seal.py)


# ----------------------------------------------------------------------------- cell <-> scheduler


class Hello(Message, frozen=True):
    cell_id: str
    driver: str
    tasks: list[str]  # what its driver runs: leased only tasks whose [tasks.X] driver is `driver` or one of these
    host: str
    pid: int
    real: bool = False


class Welcome(Message, frozen=True):
    run_id: str
    heartbeat_s: float


class LeaseRequest(Message, frozen=True):
    cell_id: str
    wait_s: float = 2.0  # how long the scheduler may hold the request open when there is no work


class Lease(Message, frozen=True):
    lease_id: str
    episode_id: str
    job_id: str
    kind: JobKind
    task: str
    seed: int
    attempts: int  # k of pass@k
    policy: PolicySpec
    bundle: str  # content hash of the policy's files: a cell that has not cached it asks `BundleRequest`
    deadline_s: float  # lease expires this many seconds after it was granted
    horizon: int  # steps per attempt
    max_delta: float  # largest allowed change between consecutive actions
    verifier: str = "state"  # "state" or "vision"
    observation: str = "state"  # what the policy is handed: "state" or "pixels" (camera frame + pusher position)
    control_hz: float = 0.0  # pace steps like a real robot; 0 = as fast as the simulator goes
    joints: dict[str, list[float]] = {}  # the task's [low, high] per named action (joint/workspace limits)


class NoWork(Message, frozen=True):
    retry_after_s: float


class BundleRequest(Message, frozen=True):
    """A cell asks once for the files of a bundle it has not cached; the reply is a `PolicyBundle`."""

    digest: str


class Heartbeat(Message, frozen=True):
    cell_id: str
    state: CellState
    segments: list[Segment] = []  # closed segments since the last acknowledged heartbeat or report


class EpisodeReport(Message, frozen=True):
    """A finished episode. Idempotent by episode_id: the first report wins, later ones are acked only."""

    cell_id: str
    lease_id: str
    episode_id: str
    verdict: Verdict  # pass@1: the first attempt's; pass@k success is any(attempt.verdict.success)
    attempts: list[Attempt]
    steps: int
    reset_s: float
    run_s: float
    verify_s: float
    trajectory: Trajectory | None = None
    segments: list[Segment] = []
    flagged: str = ""  # e.g. "success_at_reset" when the seed had to be replaced
    signature: bytes = b""  # the verifier's, over `verdict` when it is not an attempt's (flagged reports)


class Frames(msgspec.Struct, frozen=True):
    """Camera frames of an episode, (T+1, H, W, 3) uint8, deflated (one scene's frames shrink ~30x)."""

    shape: tuple[int, ...]
    deflated: bytes

    @classmethod
    def of(cls, frames: np.ndarray) -> Frames:
        import zlib

        frames = np.ascontiguousarray(frames, dtype=np.uint8)
        return cls(shape=tuple(frames.shape), deflated=zlib.compress(frames.tobytes(), 1))

    def numpy(self) -> np.ndarray:
        """The frames; ValueError when the bytes do not inflate to exactly the stated shape."""
        import zlib

        if len(self.shape) != 4 or self.shape[-1] != 3 or min(self.shape) < 0:
            raise ValueError(f"Frames shape {self.shape} is not (T, H, W, 3)")
        expected = int(np.prod(self.shape, dtype=np.int64))
        try:
            inflater = zlib.decompressobj()
            data = inflater.decompress(self.deflated, expected + 1)  # never inflate past what was promised
        except zlib.error as e:
            raise ValueError(f"Frames: corrupt deflate stream ({e})") from None
        if len(data) != expected:
            raise ValueError(f"Frames of shape {self.shape} need {expected} bytes, inflated to {len(data)}")
        return np.frombuffer(data, dtype=np.uint8).reshape(self.shape)


class Trajectory(msgspec.Struct, frozen=True):
    observations: Array  # (T+1, obs_dim): with pixel observations, the flat part the policy saw (agent_pos)
    actions: Array  # (T, act_dim)
    rewards: Array  # (T,)
    frames: Frames | None = None  # pixel observations: the (T+1, H, W, 3) frames the policy saw


class Ack(Message, frozen=True):
    ok: bool = True
    detail: str = ""


class Failure(Message, frozen=True):
    """The reply when a request could not be handled: the requester decides whether to retry."""

    error: str
    retry: bool = False


# ----------------------------------------------------------------------------- verifier


class VerifyRequest(Message, frozen=True):
    episode_id: str
    task: str
    state: dict[str, list[float]]  # trusted simulator state, as the driver reports it
    frame: Array | None = None  # rendered camera frame, HxWx3 uint8, for vision verification
    # The start state, judged in the same call: an episode that was already a success at reset is
    # flagged and its seed replaced (one round trip per attempt instead of two).
    reset_state: dict[str, list[float]] | None = None
    lease_id: str = ""  # what the verifier's signature binds the verdict to
    attempt: int = 0


class VerifyReply(Message, frozen=True):
    episode_id: str
    verdict: Verdict
    at_reset: Verdict | None = None
    signature: bytes = b""  # over (lease, episode, attempt, verdict); the scheduler checks it
    reset_signature: bytes = b""  # over (lease, episode, RESET_ATTEMPT, at_reset)


# ----------------------------------------------------------------------------- agents <-> scheduler


class EvalRequest(Message, frozen=True):
    job_id: str
    agent: str
    task: str
    policy: PolicySpec
    seeds: list[int]
    attempts: int = 0  # k of pass@k; 0 = the task's own ([tasks.X] attempts)
    priority: int = 0


class EpisodeSummary(msgspec.Struct, frozen=True):
    episode_id: str
    seed: int
    success: bool  # pass@1
    success_at_k: bool
    score: float
    reason: str
    steps: int


class EvalResult(Message, frozen=True):
    job_id: str
    policy: PolicySpec
    task: str
    episodes: list[EpisodeSummary]

    @property
    def successes(self) -> int:
        return sum(e.success for e in self.episodes)


class PromoteRequest(Message, frozen=True):
    """Ask for a candidate to be judged on the held-out seeds against the champion."""

    job_id: str
    agent: str
    task: str
    policy: PolicySpec


class PromoteResult(Message, frozen=True):
    job_id: str
    policy: PolicySpec
    promoted: bool
    successes: int
    n: int
    champion_successes: int
    champion_n: int
    detail: str


# ----------------------------------------------------------------------------- judge <-> lease queue


class JobSpec(msgspec.Struct, frozen=True, kw_only=True):
    """A job the judge hands to the lease queue: one episode per seed, of one policy."""

    job_id: str
    agent: str  # who it is for: fair share between agents, and the owner's cell on an unpooled fleet
    task: str
    policy: PolicySpec
    seeds: list[int]
    purpose: Purpose
    attempts: int = 1
    priority: int = 0  # the head of the highest-priority queue is leased first

    @property
    def kind(self) -> JobKind:
        return self.purpose.kind


class SubmitJob(Message, frozen=True):
    """Queue a job (idempotent by job_id: a resubmission waits for the same job); the reply, once every
    episode is recorded, is `JobDone`. The job survives a restart of either side on the blackboard."""

    job: JobSpec


class JobDone(Message, frozen=True):
    job_id: str
    episodes: list[EpisodeSummary]  # flagged episodes (e.g. solved at reset) are left out
    cancelled: bool = False


class CancelJob(Message, frozen=True):
    """Drop a job's episodes not yet leased (e.g. the baseline's judging once there is a champion)."""

    job_id: str


class Clearance(Message, frozen=True):
    """The judge's smoke verdict on a policy: cells marked real run only cleared ones."""

    policy: PolicySpec
    passed: bool


class FinalJudging(Message, frozen=True):
    """Judge the starting policy and the champion on the same fresh held-out seeds (end of a run)."""

    task: str
    seeds: int


class FinalJudged(msgspec.Struct, frozen=True):
    """The run's paired final judging: where the run started and where it got to, judged on the same fresh
    held-out seeds. The judge answers it and keeps it on the blackboard as it is (`records.FinalRecord`)."""

    task: str
    seeds: list[int]
    start: PolicySpec
    start_successes: int
    start_n: int
    champion: PolicySpec | None
    champion_successes: int
    champion_n: int
    t: float


class FinalResult(Message, frozen=True):
    final: FinalJudged


# ----------------------------------------------------------------------------- fleet <-> lease queue


class Utilization(msgspec.Struct, frozen=True):
    """Time shares of one cell over a window (`metrics.utilization` computes it); MRU counts only `running`."""

    wall_s: float
    running_s: float
    agent_s: float  # running on agent-requested experiments (including held-out judging of candidates)
    background_s: float  # running background work (champion re-evaluation)
    by_state: dict[str, float]

    @property
    def mru(self) -> float:
        return self.running_s / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def agent_share(self) -> float:
        """Share of running time spent on agents' experiments."""
        return self.agent_s / self.running_s if self.running_s > 0 else 0.0


class UtilizationRequest(Message, frozen=True):
    """The fleet asks the lease queue for its cells' time shares (each progress tick, and for the report)."""


class UtilizationReport(Message, frozen=True):
    cells: dict[str, Utilization]  # every cell the queue has seen, over its MRU window
    recorded: int  # episodes on the blackboard


# ----------------------------------------------------------------------------- agents <-> trainer


class TrainRequest(Message, frozen=True):
    """Run a training recipe (e.g. "bc", "rl") on the fleet's recorded episodes. Idempotent by job_id."""

    job_id: str
    agent: str
    task: str
    recipe: str
    time_budget_s: float = 300.0
    max_rss_mb: int = 4096
    options: dict[str, str] = {}


class TrainResult(Message, frozen=True):
    job_id: str
    ok: bool
    artifact: str = ""  # content hash of the checkpoint in artifacts/ ("" on failure)
    error: str = ""  # one line: why it failed (crash, NaN, time or memory budget, no data)
    metrics: dict[str, float] = {}
    info: dict[str, str] = {}  # where it trained: trainer, host, device, gpu, precision, world


# ----------------------------------------------------------------------------- remote trainer <-> trainer queue


class TrainerHello(Message, frozen=True):
    """A trainer process joining the training queue (from this host or another)."""

    trainer_id: str
    host: str
    pid: int
    device: str  # what its recipes train on: "cuda:0", "cpu"
    gpu: str = ""  # the GPU's name, "" on the CPU
    processes: int = 1  # data-parallel processes per job


class TrainJobRequest(Message, frozen=True):
    """Long-poll for a training job; the reply is a TrainJob or NoWork."""

    trainer_id: str
    wait_s: float = 2.0


class EpisodeRef(msgspec.Struct, frozen=True):
    episode_id: str
    sha: str  # content hash of the episode file (what the trainer fetches and caches it by)
    success: bool


class TrainJob(Message, frozen=True):
    """A leased training job: the recipe, its budget and exactly the episodes it may learn from."""

    lease_id: str
    job_id: str
    task: str
    recipe: str
    time_budget_s: float
    max_rss_mb: int
    options: dict[str, str]
    episodes: list[EpisodeRef]
    init_artifact: str = ""  # a checkpoint the recipe starts from, by content hash ("" for none)
    lease_s: float = 30.0  # the lease lapses unless a heartbeat comes sooner
    heartbeat_s: float = 0.0  # how often the trainer beats (`[trainer] heartbeat_s`); 0: a quarter of lease_s


class DataRequest(Message, frozen=True):
    """Files of a held lease by content hash: its episodes, or its init checkpoint."""

    trainer_id: str
    lease_id: str
    hashes: list[str]


class DataReply(Message, frozen=True):
    files: dict[str, bytes]  # content hash -> file bytes


class TrainerHeartbeat(Message, frozen=True):
    """Keeps a lease (and the trainer) alive; the reply Ack(ok=False) says the lease was taken away."""

    trainer_id: str
    lease_id: str = ""
    state: str = "idle"  # "idle", "fetching", "training"


class TrainDone(Message, frozen=True):
    """The outcome of a leased job; only the lease's current holder is heard (the first answer wins)."""

    trainer_id: str
    lease_id: str
    job_id: str
    ok: bool
    error: str = ""
    metrics: dict[str, float] = {}
    info: dict[str, str] = {}  # device, gpu, precision, world
    weights: bytes = b""  # the checkpoint file; its content hash becomes the artifact id


# ----------------------------------------------------------------------------- telemetry (pub/sub)


class CellStateChanged(Message, frozen=True):
    cell_id: str
    state: CellState
    t: float


class QueueDepth(Message, frozen=True):
    """Published by the lease queue whenever the numbers change: agents pace their turns by it."""

    waiting: int  # episodes of agents' evaluations and judging not yet leased
    background: int  # background episodes queued (confirmation, baseline)
    cells: int  # cells not offline
    t: float


class RoomReleased(Message, frozen=True):
    """Published by an agent whose turn hold ended or shrank (its model answered or failed, it paused):
    teammates waiting for room in the queue look again, as on a change of the queue's depth."""

    agent: str
    t: float


class ChampionChanged(Message, frozen=True):
    """Published by the judge on promotion, confirmation progress, a stop decision and rollback."""

    task: str
    policy: PolicySpec
    agent: str
    judged_successes: int
    judged_n: int
    successes: int  # confirmed on fresh held-out seeds
    n: int
    decision: str  # "" while confirming, "met" or "not_met" once the sequential rule stopped
    t: float
    # The rule's state as the judge applies it (`judging.confirmation`): "" it leads (ahead of agents'
    # experiments; agents may hold), "unlikely" (idle cells only; the search goes on), "met", "not_met".
    confirmation: str = ""


class HeldoutUsage(Message, frozen=True):
    task: str
    used: int
    total: int
    low: bool  # fewer left than one judging plus one confirmation need
    t: float


class FindingPosted(Message, frozen=True):
    finding_id: str
    agent: str
    t: float


class TokenCall(msgspec.Struct, frozen=True):
    """One model call. input_tokens counts every prompt token (cached reads and cache writes included),
    output_tokens every generated one (reasoning included); cost in the price table's currency (0 = no price).
    The token ledger keeps it as it is (`records.TokenRecord`); `TokensUsed` tells the fleet of it."""

    agent: str
    model: str
    t: float
    input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    cost: float = 0.0


class TokensUsed(Message, frozen=True):
    call: TokenCall


class SmokeNeeded(Message, frozen=True):
    """A real cell waits for a policy that has no smoke verdict yet (the judge runs the smoke test)."""

    policy: PolicySpec


class Progress(Message, frozen=True):
    """The fleet's periodic summary (log line, `[fleet] tensorboard` sink)."""

    t: float
    episodes: int
    champion: str
    champion_success: float  # confirmed on held-out seeds never used to choose it
    champion_n: int
    mru: float
    tokens: int  # the team's input + output tokens so far
    agent_tokens: dict[str, int] = {}  # each agent's input + output tokens so far
    tokens_per_min: float = 0.0  # MTU over the run so far
    time_left_s: float = 0.0  # of the budget


BusMessage = Union[
    Hello,
    Welcome,
    LeaseRequest,
    Lease,
    NoWork,
    BundleRequest,
    PolicyBundle,
    Heartbeat,
    EpisodeReport,
    Ack,
    Failure,
    VerifyRequest,
    VerifyReply,
    EvalRequest,
    EvalResult,
    PromoteRequest,
    PromoteResult,
    TrainRequest,
    TrainResult,
    TrainerHello,
    TrainJobRequest,
    TrainJob,
    DataRequest,
    DataReply,
    TrainerHeartbeat,
    TrainDone,
    CellStateChanged,
    Progress,
    QueueDepth,
    RoomReleased,
    ChampionChanged,
    HeldoutUsage,
    FindingPosted,
    TokensUsed,
]


class Envelope(msgspec.Struct, frozen=True):
    """One frame on the wire. `id` is unique per logical request; retries reuse it."""

    id: str
    sender: str
    body: BusMessage


class DecodeError(ValueError):
    """Raised for bytes that are not a valid Envelope; the message names what was wrong."""


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Envelope)


def encode(envelope: Envelope) -> bytes:
    return _encoder.encode(envelope)


def decode(data: bytes) -> Envelope:
    try:
        return _decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as e:
        raise DecodeError(f"bad frame ({len(data)} bytes): {e}") from None
