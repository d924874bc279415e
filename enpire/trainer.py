"""`python -m enpire.trainer`: a trainer joining a fleet's training queue, e.g. from a GPU machine.

    ENPIRE_SECRET=... python -m enpire.trainer --connect tcp://HOST:7700 --trainer-id gpu-1 [--device auto]

It authenticates the way remote cells do (every frame sealed with the fleet's shared secret; a wrong
secret is refused before anything runs), long-polls for training jobs, fetches the job's episodes by
content hash (only those the queue selected for the job; files already in its cache are not fetched
again), runs the recipe (`enpire.learning.runner`: the same staging and confinement as the daemon's
own trainer, on this machine's device, data-parallel over `--processes`), heartbeats while it works and
returns the checkpoint's bytes; the fleet stores it by content hash. If this process dies mid-job, the
lease lapses and the job goes back to the queue for another trainer.
Exit codes: 130 stopped by a signal (SIGINT, SIGTERM), 3 refused (wrong secret), 4 the fleet never answered, 2 bad device.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
from pathlib import Path

import structlog
import trio

from bus.backoff import backoff_delay
from bus.messages import (
    Ack,
    DataReply,
    DataRequest,
    Failure,
    TrainDone,
    TrainerHeartbeat,
    TrainerHello,
    TrainJob,
    TrainJobRequest,
)
from bus.transport import RequestClient, RequestTimeout, cell_key
from enpire import command, log
from enpire.config import Seconds
from enpire.learning import runner
from enpire.peer import bus_url, peer_name, run_peer

FETCH_BATCH = 256  # hashes per DataRequest
MIN_HEARTBEAT_S = 0.05  # however often a fleet asks for heartbeats, no faster than this


def parse_args(argv: list[str] | None = None, prog: str = "python -m enpire.trainer") -> argparse.Namespace:
    p = command.Parser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--connect", type=bus_url, required=True, help="bus url of the fleet, tcp://HOST:PORT (or ipc://...)")
    p.add_argument("--trainer-id", type=peer_name, default=f"{socket.gethostname()}-{os.getpid()}",
                   help="unique name in the fleet")
    p.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N")
    p.add_argument("--processes", type=command.bounded(int, 0, 1024), default=1, help="data-parallel processes per BC job; 0 = one per GPU")
    p.add_argument("--cache", type=Path, help="folder for fetched episodes and job directories (default: a temp dir)")
    p.add_argument("--secret-env", default="ENPIRE_SECRET", help="env var with the fleet's shared secret")
    p.add_argument("--connect-timeout", type=command.annotated(Seconds), default=60.0, help="seconds to wait for the fleet to answer")
    p.add_argument("--max-jobs", type=command.bounded(int, 0, 1e9), default=0, help="stop after this many jobs (0 = run until stopped)")
    return p.parse_args(argv)


def describe_device(device: str) -> tuple[str, str]:
    """(device, gpu name) this trainer's recipes will use; raises DeviceError in one line."""
    from enpire.learning.device import gpu_name, resolve

    dev = resolve(device)
    return str(dev), gpu_name(dev)


class RemoteTrainer:
    def __init__(self, args: argparse.Namespace, client: RequestClient, cache: Path, device: str, gpu: str,
                 processes: int):
        self.args = args
        self.client = client
        self.cache = cache
        self.device, self.gpu, self.processes = device, gpu, processes
        self.id = args.trainer_id
        self.log = structlog.get_logger().bind(actor=f"trainer:{self.id}")

    async def _hello(self) -> None:
        await self.client.request(TrainerHello(trainer_id=self.id, host=socket.gethostname(), pid=os.getpid(),
                                               device=self.device, gpu=self.gpu, processes=self.processes),
                                  timeout=5.0)

    async def serve(self) -> None:
        await self._hello()
        self.log.info("trainer_ready", device=self.device, gpu=self.gpu, processes=self.processes)
        done = refusals = 0
        while not self.args.max_jobs or done < self.args.max_jobs:
            reply = await self.client.request(TrainJobRequest(trainer_id=self.id, wait_s=5.0), timeout=15.0, retries=20)
            if isinstance(reply, Failure):  # e.g. the fleet restarted and forgot us: introduce ourselves again
                refusals += 1
                delay = backoff_delay(refusals, 1.0, 30.0)
                self.log.warning("job_request_refused", error=reply.error, retry_in_s=delay)
                await trio.sleep(delay)
                await self._hello()
                continue
            refusals = 0
            if isinstance(reply, TrainJob):
                await self.run_job(reply)
                done += 1

    async def run_job(self, job: TrainJob) -> None:
        state = {"name": "fetching"}
        outcome: runner.Outcome | None = None
        async with trio.open_nursery() as nursery:
            lapsed = trio.Event()
            nursery.start_soon(self._heartbeat, job, state, lapsed, nursery.cancel_scope)
            with tempfile.TemporaryDirectory(dir=self.cache, prefix="job-") as tmp:
                try:
                    await self._fetch(job)
                    state["name"] = "training"
                    episodes = [(e.sha, self._path(e.sha), e.success) for e in job.episodes]
                    init = (job.init_artifact, self._path(job.init_artifact)) if job.init_artifact else None
                    await trio.to_thread.run_sync(runner.stage, Path(tmp), episodes, init)
                    self.log.info("training_started", job=job.job_id, episodes=len(job.episodes))
                    outcome = await runner.run(job.recipe, job.task, Path(tmp), budget_s=job.time_budget_s,
                                               max_rss_mb=job.max_rss_mb, options=job.options,
                                               device=self.args.device,  # as given: each rank picks its GPU
                                               processes=self.processes)
                except FetchError as e:
                    outcome = runner.Outcome(False, str(e))
            nursery.cancel_scope.cancel()
        if outcome is None:
            self.log.warning("job_abandoned", job=job.job_id, why="lease lapsed")
            return
        reply = await self.client.request(
            TrainDone(trainer_id=self.id, lease_id=job.lease_id, job_id=job.job_id, ok=outcome.ok,
                      error=outcome.error, metrics=outcome.metrics, info=outcome.info, weights=outcome.weights),
            timeout=30.0, retries=10)
        self.log.info("training_returned", job=job.job_id, ok=outcome.ok, error=outcome.error,
                      recorded=isinstance(reply, Ack) and reply.ok,
                      samples_per_s=round(outcome.metrics.get("samples_per_s", 0.0), 1))

    async def _heartbeat(self, job: TrainJob, state: dict, lapsed: trio.Event, scope: trio.CancelScope) -> None:
        interval = max(MIN_HEARTBEAT_S, job.heartbeat_s or job.lease_s / 4)
        while True:
            await trio.sleep(interval)
            try:
                reply = await self.client.request(
                    TrainerHeartbeat(trainer_id=self.id, lease_id=job.lease_id, state=state["name"]),
                    timeout=max(0.5, interval), retries=3)
            except RequestTimeout:
                continue  # the fleet is slow or restarting: keep working, the lease decides
            if isinstance(reply, Ack) and not reply.ok:
                lapsed.set()
                scope.cancel()  # the job went to someone else: stop the recipe (run_process kills it)
                return

    def _path(self, sha: str) -> Path:
        return self.cache / "files" / f"{sha}.npz"

    async def _fetch(self, job: TrainJob) -> None:
        wanted = [e.sha for e in job.episodes] + ([job.init_artifact] if job.init_artifact else [])
        missing = [h for h in dict.fromkeys(wanted) if not self._path(h).exists()]
        (self.cache / "files").mkdir(parents=True, exist_ok=True)
        while missing:
            batch = missing[:FETCH_BATCH]
            reply = await self.client.request(DataRequest(trainer_id=self.id, lease_id=job.lease_id, hashes=batch),
                                              timeout=30.0, retries=5)
            if not isinstance(reply, DataReply) or not reply.files:
                raise FetchError(f"fetching data for {job.job_id} failed: {getattr(reply, 'error', reply)}")
            for sha, data in reply.files.items():
                if sha not in batch or runner.bytes_hash(data) != sha:
                    raise FetchError(f"fetched file {sha[:12]}… does not match its content hash")
                tmp = self._path(sha).with_suffix(".part")
                tmp.write_bytes(data)
                tmp.replace(self._path(sha))
            missing = [h for h in missing if h not in reply.files]
        self.log.info("data_ready", job=job.job_id, files=len(wanted))


class FetchError(RuntimeError):
    pass


async def run(args: argparse.Namespace, secret: bytes | None, device: str, gpu: str, processes: int) -> None:
    if args.cache is None:  # a cache of our own goes with the trainer
        with tempfile.TemporaryDirectory(prefix=f"enpire-trainer-{args.trainer_id}-", ignore_cleanup_errors=True) as own:
            return await run(argparse.Namespace(**{**vars(args), "cache": Path(own)}), secret, device, gpu, processes)
    cache = args.cache
    cache.mkdir(parents=True, exist_ok=True)
    client = RequestClient(args.connect, sender=f"trainer:{args.trainer_id}", secret=secret)
    try:
        await client.wait_ready(timeout=args.connect_timeout)  # refused here, before anything runs
        await RemoteTrainer(args, client, cache, device, gpu, processes).serve()
    finally:
        client.close()


def main(argv: list[str] | None = None, prog: str = "python -m enpire.trainer") -> int:
    args = parse_args(argv, prog)
    secret = os.environ.pop(args.secret_env, "").encode() or None  # recipes must not inherit it
    if secret:  # the daemon derives each peer's key from the fleet secret and the peer's name
        secret = cell_key(secret, f"trainer:{args.trainer_id}")
    log.configure(None, f"trainer:{args.trainer_id}", console=True)
    from enpire.learning.device import DeviceError

    try:
        device, gpu = describe_device(args.device)
        processes = runner.resolve_processes(args.processes, device)
    except DeviceError as e:
        print(f"enpire.trainer: {e}", file=sys.stderr)
        return 2
    return run_peer("enpire.trainer", "trainer_refused", {"trainer": args.trainer_id},
                    run, args, secret, device, gpu, processes)


if __name__ == "__main__":
    sys.exit(command.run(main))
