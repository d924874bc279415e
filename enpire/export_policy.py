"""`python -m enpire.export_policy`: the champion as a folder that plays outside the fleet.

The folder holds the champion's code (the policy commit's files), its parameters (`params.json`), its
weights as safetensors (every `.npz` of the commit, array by array), `champion.json` (what it is and
what it scored on held-out seeds) and `run.py`, a small runner with no dependency on enpire:

    python run.py --sim pusht --episodes 10            # gym-pusht, success as gym-pusht scores it
    python run.py --robot my_pkg.arm:Arm --config '{"port": "/dev/ttyACM0"}' --confirm-motion

On a LeRobot robot the policy sees the robot's scalar observation features in the robot's order (the
layout the LeRobot driver gives it in the fleet); without --confirm-motion it prints what would move.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np

from bus.blackboard import Blackboard, BlackboardError
from bus.records import Champion
from enpire import command
from enpire.workspace import Workspace

RUNNER = Path(__file__).with_name("policy_runner.py")


class ExportError(ValueError):
    pass


def npz_to_safetensors(data: bytes) -> bytes:
    from safetensors.numpy import save

    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        arrays = {k: np.ascontiguousarray(z[k]) for k in z.files}
    return save(arrays)


def export(state_dir: Path, out: Path, task: str | None = None) -> dict:
    path = state_dir / "blackboard.lmdb"
    if not path.exists():
        raise ExportError(f"{state_dir}: no blackboard.lmdb (not a fleet state directory)")
    board = Blackboard(path, readonly=True)
    try:
        champions = {c.task: c for c in board.values("champion", Champion)}
    finally:
        board.close()
    if task is None and len(champions) == 1:
        task = next(iter(champions))
    champion = champions.get(task or "")
    if champion is None and not champions:
        raise ExportError(f"{state_dir}: no champion yet (no candidate has been promoted in this run)")
    if champion is None:
        which = f"for task {task!r}" if task else "named: give --task"
        raise ExportError(f"{state_dir}: no champion {which} (champions: {', '.join(sorted(champions))})")
    files = Workspace(state_dir / "workspace").read_bytes(champion.policy.commit)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out}: exists and is not an empty directory")
    (out / "policy").mkdir(parents=True, exist_ok=True)
    weights = []
    for name, data in files.items():
        target = out / "policy" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".npz"):  # checkpoints travel as safetensors; the runner restores the .npz
            name = name[:-4] + ".safetensors"
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_bytes(npz_to_safetensors(data))
            weights.append(name)
            continue
        target.write_bytes(data)
    (out / "params.json").write_text(json.dumps(champion.policy.params, indent=2))
    info = {
        "task": champion.task, "policy": champion.policy.ref, "commit": champion.policy.commit,
        "artifact": champion.policy.artifact, "agent": champion.agent, "weights": weights,
        "heldout": {"judged": [champion.judged_successes, champion.judged_n], "confirmed": [champion.successes, champion.n]},
    }
    (out / "champion.json").write_text(json.dumps(info, indent=2))
    (out / "run.py").write_text(RUNNER.read_text())
    return info


def main(argv: list[str] | None = None, prog: str = "python -m enpire.export_policy") -> int:
    p = command.Parser(prog=prog, description="write the champion (code, params, safetensors weights, runner)")
    p.add_argument("--state-dir", type=Path, default=Path("state"))
    p.add_argument("--task", help="whose champion (default: the only one)")
    p.add_argument("--out", type=Path, required=True, help="folder to create")
    args = p.parse_args(argv)
    try:
        info = export(args.state_dir, args.out, args.task)
    except (ExportError, BlackboardError, OSError) as e:  # OSError: --out cannot be made or written
        print(f"enpire.export_policy: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"out": str(args.out), **info}))
    return 0


if __name__ == "__main__":
    sys.exit(command.run(main))
