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

The visuomotor recipe joins this table once `enpire.learning.visuomotor` is on the branch; until then the
JSON says it was not measured.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

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
    ap.add_argument("--quick", action="store_true", help="40 episodes, 20 held-out seeds, 5 epochs")
    args = ap.parse_args()
    if args.quick:
        args.episodes, args.eval, args.max_epochs = 40, 20, 5
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
    visuomotor = importlib.util.find_spec("enpire.learning.visuomotor") is not None
    print(json.dumps({
        "recipe": "bc",
        "dataset": {"episodes_recorded": args.episodes, "training_seeds": f"0..{args.episodes - 1}",
                    "record_s": round(record_s, 1)},
        "model": {"hidden": args.hidden, "layers": args.layers, "max_epochs": args.max_epochs,
                  "batch_size": args.batch_size, "seed": args.seed},
        "heldout_seeds": f"{HELDOUT_SEED0}..{HELDOUT_SEED0 + args.eval - 1}",
        "cuda_available": torch.cuda.is_available(),
        "placements": results,
        "visuomotor": "not measured: enpire.learning.visuomotor is not on this branch" if not visuomotor else
                      "module present but not yet wired into this bench",
    }, indent=1))
    tmp.cleanup()


if __name__ == "__main__":
    main()
