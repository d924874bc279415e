"""Live coordination travels as events; the blackboard is the durable record, never polled in-process.
Policies travel by content hash: a lease is small, a cell fetches a bundle once."""

import time

import msgspec
import pytest
import trio

from bus import messages as m
from bus.blackboard import Blackboard
from bus.events import EventHub
from bus.messages import BundleRequest, EvalRequest, Lease, LeaseRequest, PolicyBundle, PolicySpec
from bus.records import JobRecord
from bus.transport import RequestServer
from enpire import config as cfg
from enpire.bundles import BundleCache, BundleError, BundleStore
from enpire.fleet import open_state_dir, run_fleet
from tests.test_scheduler import _config, _hello

BIG = {"policy.py": b"class Policy: pass\n", "weights.npz": bytes(range(256)) * 4096}  # 1 MiB of checkpoint


async def test_subscribers_get_their_events_and_a_slow_one_loses_only_the_oldest():
    hub = EventHub()
    depth = hub.subscribe(m.QueueDepth, buffer=2)
    findings = hub.subscribe(m.FindingPosted)
    for i in range(3):
        hub.publish(m.QueueDepth(waiting=i, background=0, cells=1, t=0.0))
    hub.publish(m.FindingPosted(finding_id="f", agent="a", t=0.0))
    assert [(await depth.receive()).waiting for _ in range(2)] == [1, 2] and depth.dropped == 1
    assert (await findings.receive()).finding_id == "f" and findings.pending() == 0
    assert hub.latest(m.QueueDepth).waiting == 2  # a late subscriber starts from the last value
    depth.close()
    hub.publish(m.QueueDepth(waiting=9, background=0, cells=1, t=0.0))
    assert depth.pending() == 0


@pytest.mark.parametrize("agents, idle_s", [
    ("builtin", 6.0),  # longer than any poll period the old design had (5 s)
    ("model", 6.0),
    pytest.param("model", 60.0, marks=pytest.mark.slow),  # the idle minute, outside CI's time
])
async def test_an_idle_fleet_reads_nothing_from_the_blackboard(tmp_path, model_sim, agents, idle_s):
    """Agents (built-in, or model agents on the simulated model, paced), the summarizer, the judge, the
    lease queue and the fleet's own loop wait on events: over an idle stretch (agents waiting for results no
    cell runs) the blackboard is not read once, in any transaction. The polling design this replaced read
    it every 0.25-5 s (fleet 0.5 s, summarizer 5 s, agents 1 s)."""
    overrides = {"cells.count": 0, "agents.count": 2, "fleet.progress_s": 0.2, "fleet.budget_minutes": 5.0,
                 "fleet.final_seeds": 0}
    sim = None
    if agents == "model":
        sim = model_sim.ModelSimulator(model_sim.Timing(overhead_s=0.05, input_tok_s=1e6, output_tok_s=1e5))
        baseline = tmp_path / "baseline"  # the policy the team starts from, as the MRU/MTU bench gives it
        baseline.mkdir()
        (baseline / "policy.py").write_text(model_sim.TEMPLATE_SOURCE)
        overrides.update({"fleet.baseline": str(baseline), "agents.backend": "openai", "agents.model": "sim-model", "agents.base_url": sim.start(),
                          "agents.api_key_env": "ENPIRE_TEST_NO_KEY", "agents.pace_per_cell": 4.0})
    config = cfg.with_overrides(cfg.Config(cells=cfg.CellsConfig(task="pusht")), **overrides)
    board, meta = open_state_dir(tmp_path / "state")
    samples = {}

    async def sample():
        # Start-up done: every agent has asked for an evaluation and waits for results (watched underneath
        # the counter, so it counts only the fleet's reads).
        def askers() -> set[str]:
            with board._env.begin() as txn:
                return {msgspec.msgpack.decode(raw, type=JobRecord).agent for _, raw in txn.cursor(db=board._dbs["jobs"])}
        with trio.fail_after(60):
            while not {"agent-0", "agent-1"} <= askers():
                await trio.sleep(0.1)
        await trio.sleep(1.0)
        samples["start"], t0 = board.reads, time.monotonic()
        await trio.sleep(idle_s)
        samples["end"], samples["seconds"] = board.reads, time.monotonic() - t0
        await board.transact(lambda w: w.count("jobs"))  # a read inside a write transaction counts too
        samples["counted"] = board.reads - samples["end"]

    try:
        async with trio.open_nursery() as nursery:
            async def fleet():
                samples["outcome"] = (await run_fleet(config, tmp_path / "state", board, meta))[0]
            nursery.start_soon(fleet)
            await sample()
            nursery.cancel_scope.cancel()  # the stretch is measured: no need to sit out the budget
    finally:
        board.close()
        if sim is not None:
            sim.stop()
    assert samples["seconds"] >= idle_s
    assert samples["start"] > 0  # reads happen (start-up, the agents' first look), so the counter counts
    assert samples["end"] - samples["start"] == 0, samples
    assert samples["counted"] >= 1
    if sim is not None:
        assert len(sim.calls) >= 2  # the model agents did think, then waited


async def test_a_lease_for_a_cached_policy_carries_no_bundle_bytes(tmp_path):
    from actors.judge import Judge
    from actors.lease_queue import LeaseQueue
    from actors.runtime import ActorSystem
    from tests.test_scheduler import Fleet

    store = BundleStore(lambda commit: dict(BIG))
    board = Blackboard(tmp_path / "bb")
    async with trio.open_nursery() as nursery:
        system, events = ActorSystem(nursery), EventHub()
        queue = await system.spawn("queue", lambda: LeaseQueue(_config(), board, store, tmp_path, "run", events))
        judge = await system.spawn("judge", lambda: Judge(_config(), board, queue, events))
        ref = Fleet(queue, judge, events)
        await _hello(ref)
        policy = PolicySpec("c0ffee", {"gain": 1.0})
        nursery.start_soon(ref.ask, EvalRequest(job_id="j", agent="a", task="pusht", policy=policy, seeds=[1, 2, 3]))
        leases = [await ref.ask(LeaseRequest(cell_id="cell-0")) for _ in range(3)]
        assert all(isinstance(lease, Lease) for lease in leases)
        sizes = [len(m.encode(m.Envelope(id="x", sender="fleet", body=lease))) for lease in leases]
        assert max(sizes) < 1024, sizes  # the policy is 1 MiB: the lease names it by hash
        served = []

        def fetch(digest):  # the cell's side: from its worker thread, over the bus
            served.append(digest)
            return trio.from_thread.run(ref.ask, BundleRequest(digest=digest))

        cache = BundleCache(fetch)
        files = [await trio.to_thread.run_sync(cache.files, lease.bundle) for lease in leases]
        assert files[0] == BIG and files[1] is files[0]
        assert served == [leases[0].bundle] and cache.fetches == 1  # fetched once, then cached
        assert store.reads == 1  # the daemon read the commit once too
        nursery.cancel_scope.cancel()


def test_the_cell_cache_is_bounded_and_checks_what_arrives():
    bundles = {}
    for i in range(3):
        files = {"policy.py": f"v = {i}\n".encode()}
        bundles[m.bundle_hash(files)] = PolicyBundle(digest=m.bundle_hash(files), files=files)
    cache = BundleCache(lambda d: bundles[d], max_entries=2)
    for digest in bundles:
        cache.files(digest)
    assert len(cache) == 2 and cache.fetches == 3
    liar = BundleCache(lambda d: PolicyBundle(digest=d, files={"policy.py": b"evil"}))
    try:
        liar.files(next(iter(bundles)))
    except BundleError as e:
        assert "other content" in str(e)
    else:
        raise AssertionError("a bundle with other content was accepted")


async def test_the_transport_never_keeps_a_bundle_in_its_duplicate_reply_cache():
    async def handler(envelope):
        if isinstance(envelope.body, BundleRequest):
            return PolicyBundle(digest=envelope.body.digest, files=dict(BIG))
        return m.Ack()

    server = RequestServer("inproc://unused", handler)
    bundle = await server.answer(m.encode(m.Envelope(id="1", sender="cell", body=BundleRequest(digest="d"))))
    assert len(bundle) > len(BIG["weights.npz"])  # the reply itself carries the files
    assert server._reply_bytes == 0 and not server._replies
    await server.answer(m.encode(m.Envelope(id="2", sender="cell", body=m.NoWork(retry_after_s=0))))
    assert len(server._replies) == 1  # other replies are remembered: a resend is answered from the cache


async def test_a_checkpoint_travels_by_its_hash_and_a_missing_one_is_refused(tmp_path):
    """`PolicySpec.artifact` names a trained checkpoint in artifacts/: the bundle carries it as weights.npz
    (checked against its hash); a policy naming a checkpoint that is not there is refused in one line."""
    import hashlib

    from tests.test_scheduler import _start

    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    weights = b"PK\x03\x04 trained weights"
    digest = hashlib.sha256(weights).hexdigest()[:32]
    (artifacts / f"{digest}.npz").write_bytes(weights)
    store = BundleStore(lambda commit: {"policy.py": b"learned"}, artifacts)
    plain, learned = PolicySpec("c0ffee", {}), PolicySpec("c0ffee", {}, digest)
    bundle = await store.bundle(await store.digest(learned))
    assert bundle.files == {"policy.py": b"learned", "weights.npz": weights}
    assert await store.digest(plain) != await store.digest(learned) and store.reads == 2
    (artifacts / f"{digest}.npz").write_bytes(weights + b"tampered")
    try:
        await BundleStore(lambda commit: {"policy.py": b"x"}, artifacts).digest(learned)
    except BundleError as e:
        assert "does not match its content hash" in str(e)
    else:
        raise AssertionError("an altered checkpoint was served")
    async with trio.open_nursery() as nursery:
        ref, _, _ = await _start(nursery, tmp_path)
        missing = PolicySpec("c0ffee", {}, "0" * 32)
        refused = await ref.ask(EvalRequest(job_id="j", agent="a", task="pusht", policy=missing, seeds=[1]))
        assert isinstance(refused, m.Failure) and "cannot be served" in refused.error
        nursery.cancel_scope.cancel()
