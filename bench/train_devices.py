"""Training throughput per device, and whether the device changes what is learned.

    python bench/train_devices.py [--episodes N] [--eval N] [--processes 2] [--data-dir D] [--quick]

1. Records N episodes of the scripted Push-T controller on training seeds 0..N-1 (reused from --data-dir).
2. Trains the BC recipe on the same successful episodes with the same seed, once per placement, through
   the product path (`enpire.learning.runner`: staged job directory, recipe process, jail on the CPU):
   the CPU with one process; the CPU with `--processes` data-parallel processes (torchrun, gloo); CUDA
   when torch sees a GPU (and `--processes` GPUs data-parallel with nccl when there are that many).
3. Evaluates every checkpoint on the same held-out seeds 100000.. (coverage > 0.95 within 300 steps) and
   gives its success with a Wilson 95% interval.
Prints one JSON object: per placement the recipe's own training throughput (`samples_per_s`, gradient
steps only, measured inside the recipe), wall time, held-out success; the throughput ratios against the
one-process CPU run of this same invocation; and whether each held-out rate lies inside the interval of
the one-process CPU run.

4. The visuomotor recipe's throughput (`enpire.learning.visuomotor.train_visuomotor`, the code its recipe
   runs, in this process) on the CPU and, where present, CUDA (bf16 autocast, as the recipe does there):
   --vm-episodes synthetic episodes of random 96x96 frames (the recorded shape; the content does not
   change the arithmetic), --vm-epochs epochs, the same seed; samples/s as a ratio to the CPU.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "bench"))  # after ROOT: bench/bus.py must not shadow the bus package

import numpy as np  # noqa: E402
import torch  # noqa: E402
import trio  # noqa: E402

from enpire.agents.pusht_policy import INITIAL_PARAMS  # noqa: E402
from enpire.agents.pusht_policy import Policy as Scripted  # noqa: E402
from enpire.learning import runner  # noqa: E402
from enpire.learning.dataset import BOARD_NAME, record_scripted, select_episodes  # noqa: E402

HELDOUT_SEED0 = 100000


def placements(processes: int) -> list[tuple[str, str, int]]:
    """(name, device, processes) to compare; the first is the baseline."""
    out = [("cpu", "cpu", 1)]
    if processes > 1:
        out.append((f"cpu_x{processes}", "cpu", processes))
    if torch.cuda.is_available():
        out.append(("cuda", "cuda", 1))
        if processes > 1 and torch.cuda.device_count() >= processes:
            out.append((f"cuda_x{processes}", "cuda", processes))
    return out


async def train(data_dir: Path, n: int, work: Path, device: str, processes: int, options: dict[str, str],
                budget_s: float) -> tuple[runner.Outcome, float]:
    episodes = [(runner.content_hash(data_dir / r.trajectory_file), data_dir / r.trajectory_file, True)
                for r in select_episodes(data_dir, max_episodes=n)]
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    runner.stage(work, episodes)
    t0 = time.monotonic()
    out = await runner.run("bc", "pusht", work, budget_s=budget_s, max_rss_mb=8192, options=options, device=device,
                           processes=processes)
    return out, time.monotonic() - t0


def visuomotor_throughput(n_episodes: int, epochs: int, seed: int) -> dict:
    from enpire.learning import visuomotor as vm
    from enpire.learning.device import Placement

    rng = np.random.default_rng(seed)
    steps = 100
    episodes = [{"frames": rng.integers(0, 256, (steps + 1, 96, 96, 3), dtype=np.uint8),
                 "observations": rng.uniform(0, 512, (steps + 1, 2)), "actions": rng.uniform(0, 512, (steps, 2))}
                for _ in range(n_episodes)]
    ds = vm.from_episodes(episodes)
    cfg = vm.VisuomotorConfig(max_epochs=epochs, seed=seed, time_budget_s=3600.0)
    out: dict = {"episodes": n_episodes, "transitions": len(ds), "epochs": epochs, "frames": "synthetic 96x96x3"}
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for name in devices:
        place = Placement.start(name, "auto", amp_default=True)  # the recipe's own choice: bf16 on CUDA
        t0 = time.monotonic()
        _, metrics = vm.train_visuomotor(ds, cfg, place=place)
        out[name] = {**place.describe(), "samples_per_s": round(metrics["samples_per_s"], 1),
                     "train_s": round(time.monotonic() - t0, 2)}
    if "cuda" in out:
        out["cuda"]["samples_per_s_vs_cpu"] = round(out["cuda"]["samples_per_s"] / out["cpu"]["samples_per_s"], 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--episodes", type=int, default=300, help="recorded episodes (training seeds 0..N-1)")
    ap.add_argument("--eval", type=int, default=100, help="held-out seeds 100000..")
    ap.add_argument("--processes", type=int, default=2, help="data-parallel processes for the second placement")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--max-epochs", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--time-budget-s", type=float, default=1800.0)
    ap.add_argument("--data-dir", default="", help="state-dir-like folder to record into / reuse")
    ap.add_argument("--vm-episodes", type=int, default=20, help="synthetic pixel episodes of 100 steps")
    ap.add_argument("--vm-epochs", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="40 episodes, 20 held-out seeds, 5 epochs")
    args = ap.parse_args()
    if args.quick:
        args.episodes, args.eval, args.max_epochs, args.vm_episodes, args.vm_epochs = 40, 20, 5, 6, 1
    from bc_pusht import evaluate  # the held-out evaluation bench/bc_pusht.py uses

    tmp = tempfile.TemporaryDirectory()
    data_dir = Path(args.data_dir) if args.data_dir else Path(tmp.name) / "data"
    have = len(list((data_dir / "episodes").glob("*.npz"))) if (data_dir / BOARD_NAME).exists() else 0
    t0 = time.monotonic()
    if have < args.episodes:
        record_scripted(data_dir, lambda: Scripted(INITIAL_PARAMS), range(have, args.episodes))
    record_s = time.monotonic() - t0
    options = {"hidden": str(args.hidden), "layers": str(args.layers), "max_epochs": str(args.max_epochs),
               "patience": str(args.max_epochs), "seed": str(args.seed), "batch_size": str(args.batch_size)}
    results: dict[str, dict] = {}
    for name, device, processes in placements(args.processes):
        out, wall = trio.run(train, data_dir, args.episodes, Path(tmp.name) / name, device, processes, options, args.time_budget_s)
        if not out.ok:
            results[name] = {"error": out.error}
            continue
        with np.load(io.BytesIO(out.weights), allow_pickle=False) as w:
            weights = dict(w)
        results[name] = {
            "device": out.info.get("device"), "gpu": out.info.get("gpu"), "processes": processes,
            "precision": out.info.get("precision"), "isolation": out.info.get("isolation"),
            "samples_per_s": round(out.metrics["samples_per_s"], 1), "train_s": round(out.metrics["train_s"], 2),
            "job_wall_s": round(wall, 2), "epochs": out.metrics["epochs"], "val_loss": out.metrics["val_loss"],
            "heldout": evaluate(weights, args.eval, HELDOUT_SEED0),
        }
    base = results.get("cpu", {})
    for name, r in results.items():
        if "error" in r or "error" in base or name == "cpu":
            continue
        lo, hi = base["heldout"]["wilson95"]
        r["samples_per_s_vs_cpu"] = round(r["samples_per_s"] / base["samples_per_s"], 3)
        r["heldout_within_cpu_interval"] = bool(lo <= r["heldout"]["success_rate"] <= hi)
    vm_results = visuomotor_throughput(args.vm_episodes, args.vm_epochs, args.seed)
    print(json.dumps({
        "recipe": "bc",
        "dataset": {"episodes_recorded": args.episodes, "training_seeds": f"0..{args.episodes - 1}",
                    "record_s": round(record_s, 1)},
        "model": {"hidden": args.hidden, "layers": args.layers, "max_epochs": args.max_epochs,
                  "batch_size": args.batch_size, "seed": args.seed},
        "heldout_seeds": f"{HELDOUT_SEED0}..{HELDOUT_SEED0 + args.eval - 1}",
        "cuda_available": torch.cuda.is_available(),
        "placements": results,
        "visuomotor": vm_results,
    }, indent=1))
    tmp.cleanup()


if __name__ == "__main__":
    main()
