"""`python -m enpire.logs --state-dir DIR [--follow]`: the fleet's JSON log in readable form.

Filters: --actor (prefix, e.g. `cell` or `scheduler`), --event, --level (minimum). Lines that are not
a JSON object (a torn last line after a crash) are shown as they are, never dropped silently.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from enpire import command

LEVELS = ["debug", "info", "warning", "error", "critical"]
SHOWN_FIRST = ("timestamp", "level", "actor", "event", "process", "pid")


def keep(event: dict, actor: str | None, name: str | None, level: str) -> bool:
    if actor and not str(event.get("actor", event.get("process", ""))).startswith(actor):
        return False
    if name and event.get("event") != name:
        return False
    rank = LEVELS.index(event.get("level", "info")) if event.get("level") in LEVELS else 1
    return rank >= LEVELS.index(level)


def readable(event: dict) -> str:
    extras = " ".join(f"{k}={json.dumps(v) if not isinstance(v, str) else v}"
                      for k, v in event.items() if k not in SHOWN_FIRST)
    actor = str(event.get("actor") or event.get("process", ""))
    return (f"{str(event.get('timestamp', ''))[:23]} {str(event.get('level', '')):<7} {actor:<12} "
            f"{event.get('event', '')} {extras}")


def lines(path: Path, follow: bool, poll_s: float = 0.25):
    with open(path, encoding="utf-8", errors="replace") as f:
        buffer = ""
        while True:
            chunk = f.readline()
            if chunk:
                buffer += chunk
                if buffer.endswith("\n"):
                    yield buffer.rstrip("\n")
                    buffer = ""
                continue
            if not follow:
                if buffer:
                    yield buffer
                return
            time.sleep(poll_s)


def main(argv: list[str] | None = None, prog: str = "python -m enpire.logs") -> int:
    p = command.Parser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--state-dir", type=Path, default=Path("state"))
    p.add_argument("--follow", "-f", action="store_true", help="keep reading as the fleet writes")
    p.add_argument("--actor", help="only events of actors whose name starts with this")
    p.add_argument("--event", help="only this event name")
    p.add_argument("--level", default="debug", choices=LEVELS, help="minimum level")
    p.add_argument("--json", action="store_true", help="print the matching JSON lines as they are")
    args = p.parse_args(argv)
    path = args.state_dir / "logs" / "fleet.jsonl"
    if not path.exists():
        print(f"{prog}: {path}: no log yet", file=sys.stderr)
        return 2
    try:
        for line in lines(path, args.follow):
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                event = None
            if not isinstance(event, dict):  # a torn line, or not one of ours
                print(f"(unparsed) {line}")
                continue
            if keep(event, args.actor, args.event, args.level):
                print(line if args.json else readable(event), flush=True)
    except (KeyboardInterrupt, BrokenPipeError):
        pass
    return 0


if __name__ == "__main__":
    sys.exit(command.run(main))
