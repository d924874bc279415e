"""Running one training job: stage exactly its files, run the recipe process (confined, bounded), read
back the checkpoint. The daemon's in-process trainer and a remote trainer (`python -m enpire.trainer`)
both run jobs through here, so a job trains the same way wherever it lands.

A job directory holds only what the job may see: `episodes/<hash>.npz` (hard links to the selected
episode files, chosen by the trainer queue: agents' episodes only, never held-out ones), the init
checkpoint under `artifacts/<hash>.npz` if any, `manifest.json`, and `out/` where the recipe writes
`weights.npz` and `metrics.json`. The recipe runs in the isolation engine's jail when it works here
(no network, no state dir, only the job directory writable); a CUDA job runs outside it, with its
address-space cap and time budget, because the jail binds no GPU device nodes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import trio

from enpire import isolation
from enpire.sandbox import without_credentials
from enpire.untrusted_json import finite, json_object

ROOT = Path(__file__).resolve().parents[2]  # the code the recipe imports (bound read-only into the jail)
RECIPES = ("bc", "rl", "visuomotor")
DATA_PARALLEL = ("bc", "visuomotor")  # recipes that train with torch.distributed when given several processes
SIGNAL_RESTARTS = 2  # a group whose rank died of a signal starts again at most this often (see `run`)


def content_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:32]


def bytes_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


@dataclass
class Outcome:
    ok: bool
    error: str = ""
    weights: bytes = b""
    metrics: dict[str, float] = field(default_factory=dict)
    info: dict[str, str] = field(default_factory=dict)  # device, gpu, precision, world, isolation


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        return
    try:
        os.link(src, dst)
    except OSError:  # another filesystem
        shutil.copyfile(src, dst)


def stage(job_dir: Path, episodes: list[tuple[str, Path, bool]], init: tuple[str, Path] | None = None) -> Path:
    """Fill `job_dir` with the job's files: (content hash, source file, success) per episode and the init
    checkpoint. Returns the manifest path."""
    entries = []
    for sha, src, success in episodes:
        _link(src, job_dir / "episodes" / f"{sha}.npz")
        entries.append({"id": sha, "file": f"episodes/{sha}.npz", "success": success})
    if init is not None:
        _link(init[1], job_dir / "artifacts" / f"{init[0]}.npz")
    manifest = job_dir / "manifest.json"
    manifest.write_text(json.dumps({"episodes": entries}))
    return manifest


def resolve_processes(processes: int, device: str) -> int:
    """0 means one process per GPU (one on the CPU)."""
    if processes > 0:
        return processes
    import torch

    return max(1, torch.cuda.device_count()) if device != "cpu" and torch.cuda.is_available() else 1


def command(recipe: str, task: str, job_dir: Path, budget_s: float, max_rss_mb: int, options: dict[str, str],
            device: str, processes: int, port: int = 29500) -> list[str]:
    """The recipe's argv; several processes are launched the torchrun way (rendezvous on loopback)."""
    if recipe in DATA_PARALLEL and processes > 1:
        # static rendezvous on loopback: the jail has its own network namespace (no name resolution, no
        # other listeners); outside it a free port is picked
        launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--node-rank", "0",
                  "--nproc-per-node", str(processes), "--master-addr", "127.0.0.1", "--master-port", str(port),
                  "--module", "enpire.learning.recipes"]
    else:
        launch = [sys.executable, "-m", "enpire.learning.recipes"]
    argv = launch + [
        "--recipe", recipe, "--task", task, "--state-dir", str(job_dir), "--out", str(job_dir / "out"),
        "--manifest", str(job_dir / "manifest.json"), "--time-budget-s", str(budget_s),
        "--max-rss-mb", str(max_rss_mb), "--device", device,
    ]
    for key, value in sorted(options.items()):
        argv += ["--option", f"{key}={value}"]
    return argv


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _uses_cuda(device: str) -> bool:
    if device.startswith("cuda"):
        return True
    if device != "auto":
        return False
    return shutil.which("nvidia-smi") is not None or Path("/dev/nvidiactl").exists()


def confine(argv: list[str], job_dir: Path, budget_s: float, max_rss_mb: int, processes: int,
            device: str) -> tuple[list[str], dict[str, str] | None, str]:
    """(argv, env, how): the recipe inside the jail when the engine works and the job is on the CPU."""
    why = isolation.check()
    if why is None and not _uses_cuda(device):
        env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
               "PYTHONDONTWRITEBYTECODE": "1", "GLOO_SOCKET_IFNAME": "lo",
               "PYTHONFAULTHANDLER": "1"}
        jail = isolation.Jail(
            read_only=(*isolation.python_paths(), ROOT), writable=(job_dir,), scratch_mb=256, network=False,
            memory_mb=int(max_rss_mb * processes + 512), pids=64 * processes + 64,
            cpu_seconds=int(budget_s * max(1, processes) + 60), env=env, cwd=job_dir,
        )
        return isolation.wrap(jail, argv), None, "jail"
    reason = "cuda device nodes are not bound into the jail" if why is None else why
    return argv, without_credentials(os.environ), f"none ({reason})"


async def _run_process(argv: list[str], env: dict[str, str] | None, job_dir: Path, limit_s: float) -> int | None:
    """Exit code, or None after `limit_s` (the process is killed; so it is when we are cancelled).

    Started from the trio thread itself, not from trio's worker threads (as `trio.run_process` does):
    the jail's die-with-parent is PR_SET_PDEATHSIG, which fires when the *thread* that forked exits, and
    an idle worker thread exits after a few seconds, killing every recipe that runs longer."""
    with open(job_dir / "stderr.log", "wb") as err:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, env=env,
                                cwd=str(job_dir))
    try:
        with trio.move_on_after(limit_s):
            return await trio.to_thread.run_sync(proc.wait, abandon_on_cancel=True)
        return None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def read_metrics(path: Path) -> tuple[dict[str, float], dict[str, str]]:
    """(the finite numbers, the device facts) of a recipe's metrics.json. The recipe ran on the agents'
    data and options: anything that is not a flat JSON object of such values is left out, not a crash."""
    try:
        doc = json_object(path.read_bytes()) or {}
    except OSError:
        doc = {}
    metrics = {k: number for k, v in doc.items() if (number := finite(v)) is not None}
    return metrics, {k: str(doc[k])[:200] for k in ("device", "gpu", "precision", "world") if k in doc}


def failure(stderr_log: Path, code: int) -> tuple[str, bool]:
    """(why a recipe process failed, in one line; whether a rank died of a signal without the recipe
    reporting an error). The recipe reports its own errors as `error: ...` lines; a torchrun launch ends
    with a summary whose "Root Cause" names the first rank that failed and its exit code (negative: a
    signal)."""
    try:
        lines = stderr_log.read_text(errors="replace").strip().splitlines()
    except OSError:
        lines = []
    errors = [ln for ln in lines if ln.startswith("error: ")]
    if errors:
        return errors[-1], False
    root = next((i for i, ln in enumerate(lines) if ln.startswith("Root Cause")), None)
    if root is not None:
        fields = {key.strip(): value.strip() for key, _, value in (ln.partition(":") for ln in lines[root + 1:])}
        rank, exitcode = fields.get("rank", "?").split(" ")[0], fields.get("exitcode", "?")
        said = next((ln.strip() for ln in lines if ln.startswith("terminate called")), "")
        return f"rank {rank} exited {exitcode}" + (f": {said}" if said else ""), exitcode.startswith("-")
    return (lines[-1] if lines else f"exit code {code}"), False


async def run(recipe: str, task: str, job_dir: Path, *, budget_s: float, max_rss_mb: int, options: dict[str, str],
              device: str = "cpu", processes: int = 1) -> Outcome:
    """Run the staged job; never raises for a failing recipe (the Outcome says why in one line)."""
    if recipe not in RECIPES:
        return Outcome(False, f"unknown recipe {recipe!r}; known: {', '.join(RECIPES)}")
    processes = processes if recipe in DATA_PARALLEL else 1
    jailed = isolation.check() is None and not _uses_cuda(device)
    asked, deadline, restarts = budget_s, trio.current_time() + budget_s, 0
    while True:
        argv = command(recipe, task, job_dir, budget_s, max_rss_mb, options, device, processes,
                       port=29500 if jailed else _free_port())
        argv, env, how = confine(argv, job_dir, budget_s, max_rss_mb, processes, device)
        code = await _run_process(argv, env, job_dir, budget_s + 30.0)  # the recipe's own budget, plus grace
        if code is None:
            return Outcome(False, f"time budget exceeded ({asked:.0f} s)")
        if code == 0:
            break
        why, crashed = failure(job_dir / "stderr.log", code)
        budget_s = deadline - trio.current_time()
        # A safety net: a group whose rank died of a signal (the recipes' exit-time abort in torch's
        # teardown was one, see recipes.py), with no error from the recipe, starts again with the time
        # left. A recipe's own error never runs twice.
        if not (crashed and processes > 1 and restarts < SIGNAL_RESTARTS and budget_s >= 30.0):
            return Outcome(False, f"recipe failed (exit {code}): {why}"[:300])
        restarts += 1
        (job_dir / "stderr.log").replace(job_dir / f"stderr-{restarts}.log")
        (job_dir / "out" / "weights.npz").unlink(missing_ok=True)  # only the run that succeeds may leave one
    weights, metrics_file = job_dir / "out" / "weights.npz", job_dir / "out" / "metrics.json"
    if not weights.exists():
        return Outcome(False, "recipe wrote no weights.npz")
    metrics, info = read_metrics(metrics_file)
    info["isolation"] = how
    if restarts:
        info["restarts"] = str(restarts)
    return Outcome(True, weights=weights.read_bytes(), metrics=metrics, info=info)
