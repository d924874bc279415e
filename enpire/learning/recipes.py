"""Training recipes: the trainer actor's entry point, meant to run in its own process.

    python -m enpire.learning.recipes --recipe bc --task pusht --state-dir D --out O \
        --time-budget-s S --max-rss-mb M [--option key=value ...]

Reads the fleet's recorded episodes from the state dir (only successful ones unless
`--option success_only=0`), trains, and writes `O/weights.npz` (plain arrays for `mlp_policy.py`) and
`O/metrics.json`. On any failure it exits non-zero with one line on stderr saying why:
no data, NaN loss, time budget, memory budget (RLIMIT_AS caps the address space; a MemoryError or a
failed allocation ends as "memory budget exceeded").

Options (all strings on the command line): max_episodes, success_only, hidden, layers, max_epochs,
patience, lr, seed, batch_size; for "rl" also rl_steps, alpha, online_episodes and init_artifact (the content hash
of a BC checkpoint in artifacts/ to start from instead of training BC first); for "visuomotor" (a CNN on
recorded camera frames, `enpire.learning.visuomotor`) hidden, max_epochs, lr, batch_size, seed, dagger_rounds,
dagger_episodes, horizon, workers and expert_params (JSON: the perception template's parameters the expert
relabels with; default the champion on the state dir's blackboard, else the template's initial ones);
inject_nan and inject_abort_once (tests only).

Where: `--device auto|cpu|cuda|cuda:N` (auto: CUDA when torch sees a GPU) and option `amp`
(auto|on|off: bf16 autocast on CUDA; auto leaves it to the recipe, and the small MLPs here train in
fp32). Launched by torchrun (`python -m torch.distributed.run --nproc-per-node N -m
enpire.learning.recipes ...`, which the trainer does for `processes > 1`), BC trains data-parallel
(gloo on CPU, nccl on CUDA) and rank 0 writes the results. metrics.json records the device, the GPU's
name, the precision, the number of processes and the training throughput (`samples_per_s`).

`--manifest FILE` names the episodes to learn from (JSON: {"episodes": [{"id", "file", "success"}]},
files relative to --state-dir): the trainer chooses them on the blackboard (agents' episodes only,
never held-out ones) and a remote trainer has only those files. Without it the recipe chooses them
itself from the state dir's blackboard.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

RECIPES = ("bc", "rl", "visuomotor")
EXIT_FAILED = 2


class RecipeError(RuntimeError):
    """A failure that ends the recipe with a one-line reason."""


@dataclass
class TrainResult:
    recipe: str
    weights_path: Path
    metrics: dict[str, float] = field(default_factory=dict)


def _opt(options: dict[str, str], key: str, kind, default):
    if key not in options:
        return default
    try:
        if kind is bool:
            return options[key].strip().lower() not in ("0", "false", "no", "")
        return kind(options[key])
    except ValueError:
        raise RecipeError(f"option {key}={options[key]!r} is not a valid {kind.__name__}") from None


def _with_options(config, options: dict[str, str], names: tuple[str, ...]):
    """`config` (a dataclass) with the named fields read from `options` where given, each typed like its
    value in `config`: the recipe's own defaults stand where no option is given."""
    return replace(config, **{n: _opt(options, n, type(getattr(config, n)), getattr(config, n)) for n in names})


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def run_recipe(
    name: str, state_dir: str | Path, out_dir: str | Path, budget: float, *, task: str = "pusht",
    options: dict[str, str] | None = None, max_rss_mb: float | None = None, device: str = "cpu",
    manifest: str | Path | None = None,
) -> TrainResult:
    """Train recipe `name` on the state dir's episodes (or the manifest's) within `budget` seconds, on
    `device`; rank 0 writes weights and metrics. Raises RecipeError (or NoDataError / NaNLossError,
    DeviceError) with a one-line reason."""
    import torch

    from enpire.learning import bc
    from enpire.learning.dataset import load_dataset, load_manifest
    from enpire.learning.device import Placement

    if name not in RECIPES:
        raise RecipeError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}")
    options = dict(options or {})
    torch.set_num_threads(max(1, _opt(options, "threads", int, 1)))
    t0 = time.monotonic()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # bf16 autocast pays on CUDA for the CNN's convolutions; the small MLPs stay in fp32
    place = Placement.start(device, options.get("amp", "auto"), amp_default=name == "visuomotor")
    if _opt(options, "inject_abort_once", bool, False) and place.rank == 1:  # tests only: what gloo does at times
        marker = out_dir / "aborted-once"
        if not marker.exists():
            marker.touch()
            os.abort()
    if name == "visuomotor":
        return _visuomotor(state_dir, out_dir, budget, task, options, max_rss_mb, t0, place, manifest)

    if manifest:
        ds = load_manifest(state_dir, manifest)
    else:
        ds = load_dataset(state_dir, task=task, success_only=_opt(options, "success_only", bool, True),
                          max_episodes=_opt(options, "max_episodes", int, None))
    load_s = time.monotonic() - t0
    remaining = budget - load_s
    if remaining <= 1.0:
        raise RecipeError(f"time budget exceeded while loading data ({load_s:.0f} s of {budget:.0f} s)")

    bc_share = remaining * (0.8 if name == "bc" else 0.4)
    cfg = bc.BCConfig(
        hidden=_opt(options, "hidden", int, 512), layers=_opt(options, "layers", int, 4),
        max_epochs=_opt(options, "max_epochs", int, 60), patience=_opt(options, "patience", int, 15),
        lr=_opt(options, "lr", float, 1e-3), seed=_opt(options, "seed", int, 0), time_budget_s=bc_share,
        batch_size=_opt(options, "batch_size", int, 256),
        inject_nan_at_step=0 if _opt(options, "inject_nan", bool, False) else -1,
    )
    init = options.get("init_artifact", "")
    if init and name == "rl":  # RL from a BC checkpoint the fleet already has: no second BC run
        model, metrics = bc.import_numpy(_checkpoint(Path(state_dir), init)), {"init_from_artifact": 1.0}
    elif init:
        raise RecipeError(f"option init_artifact is for the rl recipe, not {name!r}")
    else:
        model, metrics = bc.train_bc(ds, cfg, place=place)
    if name == "rl":
        from enpire.learning import rl

        rl_cfg = rl.RLConfig(
            steps=_opt(options, "rl_steps", int, 20000), alpha=_opt(options, "alpha", float, 2.5),
            online_episodes=_opt(options, "online_episodes", int, 0), seed=cfg.seed,
            time_budget_s=max(1.0, budget - (time.monotonic() - t0)) * 0.9,
        )
        if place.world > 1:
            raise RecipeError("the rl recipe trains in one process (processes=1); its networks are too small to split")
        model, rl_metrics = rl.train_td3bc(ds, rl_cfg, init=model, place=place)
        metrics["samples_per_s"] = rl_metrics["samples_per_s"]
        metrics.update({f"rl_{k}": v for k, v in rl_metrics.items()})

    metrics.update({"episodes": float(ds.n_episodes), "transitions": float(len(ds)),
                    "skipped_files": float(len(ds.skipped))})
    return _write(out_dir, name, bc.export_numpy(model), metrics, ds.skipped, budget, max_rss_mb, t0, place)


def _visuomotor(state_dir, out_dir: Path, budget: float, task: str, options: dict[str, str],
                max_rss_mb: float | None, t0: float, place, manifest) -> TrainResult:
    from enpire.learning import visuomotor as vm

    ds = vm.load_frames(state_dir, task=task, max_episodes=_opt(options, "max_episodes", int, None),
                        manifest=manifest)
    load_s = time.monotonic() - t0
    remaining = budget - load_s
    if remaining <= 1.0:
        raise RecipeError(f"time budget exceeded while loading data ({time.monotonic() - t0:.0f} s of {budget:.0f} s)")
    expert = options.get("expert_params", "")
    try:  # the expert that relabels: the perception template with these parameters (the champion's)
        params = json.loads(expert) if expert else vm.champion_params(state_dir, task)
    except json.JSONDecodeError as exc:
        raise RecipeError(f"option expert_params is not JSON: {exc}") from None
    if params is not None and not isinstance(params, dict):
        raise RecipeError(f"option expert_params must be a JSON object of parameters, not {expert!r}")
    cfg = _with_options(vm.VisuomotorConfig(time_budget_s=remaining * 0.9, expert_params=params,
                                            inject_nan_at_step=0 if _opt(options, "inject_nan", bool, False) else -1),
                        options, ("hidden", "max_epochs", "lr", "batch_size", "seed", "dagger_rounds",
                                  "dagger_episodes", "horizon", "workers"))
    try:
        model, metrics = vm.train_visuomotor(ds, cfg, place=place)
    except vm.NaNLossError as exc:
        from enpire.learning.bc import NaNLossError

        raise NaNLossError(str(exc)) from None
    metrics.update({"load_s": load_s, "skipped_files": float(len(ds.skipped))})
    return _write(out_dir, "visuomotor", vm.export_numpy(model), metrics, ds.skipped, budget, max_rss_mb, t0, place)


def _write(out_dir: Path, name: str, weights: dict[str, np.ndarray], metrics: dict[str, float], skipped: list[str],
           budget: float, max_rss_mb: float | None, t0: float, place) -> TrainResult:
    """Check the budgets and the weights, then (rank 0) write weights.npz and metrics.json, which records
    where it trained: device, GPU, precision, processes."""
    from enpire.learning.bc import NaNLossError

    bad = [k for k, v in weights.items() if v.dtype.kind == "f" and not np.all(np.isfinite(v))]
    if bad:
        raise NaNLossError(f"non-finite exported weights: {', '.join(bad)}")
    elapsed = time.monotonic() - t0
    if elapsed > budget:
        raise RecipeError(f"time budget exceeded ({elapsed:.0f} s > {budget:.0f} s)")
    rss = _peak_rss_mb()
    if max_rss_mb is not None and rss > max_rss_mb:
        raise RecipeError(f"memory budget exceeded (peak RSS {rss:.0f} MiB > {max_rss_mb:.0f} MiB)")
    metrics.update({"wall_s": elapsed, "peak_rss_mb": rss, "processes": float(place.world)})
    info = place.describe()
    place.stop()
    weights_path = out_dir / "weights.npz"
    if not place.main:
        return TrainResult(name, weights_path, metrics)
    tmp = out_dir / "weights.tmp.npz"
    np.savez(tmp, **weights)
    tmp.replace(weights_path)
    doc = {k: (float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None) for k, v in metrics.items()}
    doc["recipe"] = name
    doc.update(info)  # device, gpu, precision, world: strings, kept beside the numbers
    doc["skipped"] = skipped[:20]
    (out_dir / "metrics.json").write_text(json.dumps(doc, indent=1))
    return TrainResult(name, weights_path, metrics)


def _checkpoint(state_dir: Path, artifact: str) -> dict[str, np.ndarray]:
    """The arrays of a checkpoint in the state dir's artifacts/ (by content hash; never unpickled)."""
    from enpire.learning.dataset import ARTIFACTS
    from enpire.learning.mlp_policy import load_weights

    if not re.fullmatch(r"[0-9a-f]{32}", artifact):
        raise RecipeError(f"init_artifact {artifact!r} is not a checkpoint hash (32 hex digits)")
    path = state_dir / ARTIFACTS / f"{artifact}.npz"
    if not path.exists():
        raise RecipeError(f"init_artifact {artifact}: no checkpoint at {path}")
    try:
        return load_weights(str(path))
    except (OSError, ValueError, KeyError) as exc:
        raise RecipeError(f"init_artifact {artifact}: unreadable checkpoint ({exc})") from None


def _wants_cuda(device: str) -> bool:
    device = device.strip().lower()
    if device.startswith("cuda"):
        return True
    if device != "auto":
        return False
    import torch

    return torch.cuda.is_available()


def _limit_memory(max_rss_mb: float) -> None:
    """Cap the address space. torch maps a lot of virtual memory up front, so the cap allows a fixed
    headroom over the requested resident budget; the resident peak is also checked at the end."""
    limit = int((max_rss_mb + 1024) * (1 << 20))
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ValueError, OSError):
        pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m enpire.learning.recipes")
    ap.add_argument("--recipe", required=True)
    ap.add_argument("--task", default="pusht")
    ap.add_argument("--state-dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--time-budget-s", type=float, default=300.0)
    ap.add_argument("--max-rss-mb", type=float, default=4096.0)
    ap.add_argument("--option", action="append", default=[], help="key=value, repeatable")
    ap.add_argument("--device", default="cpu", help="auto, cpu, cuda or cuda:N (default cpu)")
    ap.add_argument("--manifest", help="JSON list of the episodes to learn from (default: choose from the state dir)")
    args = ap.parse_args(argv)

    def fail(msg: str) -> int:
        print(f"error: {' '.join(str(msg).split())}", file=sys.stderr, flush=True)
        return EXIT_FAILED

    options = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep:
            return fail(f"--option {item!r} is not key=value")
        options[key.strip()] = value.strip()
    if not _wants_cuda(args.device):
        _limit_memory(args.max_rss_mb)  # CUDA maps far more address space than it uses: RSS is checked instead
    import signal

    def on_alarm(signum, frame):
        raise RecipeError(f"time budget exceeded ({args.time_budget_s:.0f} s)")

    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, args.time_budget_s + 5.0)  # hard stop a little after the soft one
    from enpire.learning.bc import NaNLossError
    from enpire.learning.dataset import NoDataError
    from enpire.learning.device import DeviceError

    try:
        result = run_recipe(args.recipe, args.state_dir, args.out, args.time_budget_s, task=args.task,
                            options=options, max_rss_mb=args.max_rss_mb, device=args.device,
                            manifest=args.manifest)
    except MemoryError:
        return fail(f"memory budget exceeded (address space capped near {args.max_rss_mb:.0f} MiB + headroom)")
    except NaNLossError as exc:
        return fail(f"NaN loss: {exc}")
    except NoDataError as exc:
        return fail(f"no data: {exc}")
    except (RecipeError, DeviceError) as exc:
        return fail(str(exc))
    except RuntimeError as exc:  # torch reports failed allocations as RuntimeError
        if "alloc" in str(exc).lower() or "memory" in str(exc).lower():
            return fail(f"memory budget exceeded: {exc}")
        return fail(f"{type(exc).__name__}: {exc}")
    except Exception as exc:  # noqa: BLE001 - any other crash still ends as one clear line
        if "memory" in f"{type(exc).__name__} {exc}".lower():  # e.g. lmdb.MemoryError under RLIMIT_AS
            return fail(f"memory budget exceeded: {exc}")
        return fail(f"{type(exc).__name__}: {exc}")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0.0)
    print(json.dumps({"ok": True, "weights": str(result.weights_path),
                      **{k: round(v, 5) for k, v in result.metrics.items()}}))
    return 0


if __name__ == "__main__":
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # One rank of a finished group (results written, group destroyed) was killed now and then on its
        # way out: SIGABRT, "terminate called without an active exception", raised in torch's C++ teardown
        # after the last Python frame (faulthandler's dump). Nothing is left to do, so skip that teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
