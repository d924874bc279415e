"""`enpire COMMAND [ARGS]`: one installed command for every entry point (`enpire --help` lists them).

Each command is a module with `main(argv, prog) -> int`; `python -m enpire.fleet` and the others keep
working. Adding a command is one line in COMMANDS. Modules are imported only when their command runs,
so `enpire --version` and `enpire --help` start at once.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from importlib import metadata

from enpire import command

# name: (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "fleet": ("enpire.fleet", "run the fleet daemon until the target or the budget"),
    "status": ("enpire.status", "the fleet at a glance: cells, MRU, jobs, champion, tokens"),
    "logs": ("enpire.logs", "the fleet's JSON log in readable form, filtered, --follow"),
    "report": ("enpire.report", "plots and a markdown summary of a run"),
    "cell": ("enpire.cell", "one robot cell process joining a fleet over the bus"),
    "trainer": ("enpire.trainer", "a trainer (e.g. a GPU machine) joining a fleet's training queue over the bus"),
    "replay": ("enpire.replay", "render recorded episodes (failed ones first) as mp4 or GIF"),
    "export": ("enpire.export", "write a run's episodes as a LeRobotDataset (needs LeRobot)"),
    "export-policy": ("enpire.export_policy", "write the champion (code, params, safetensors, runner)"),
    "realcell": ("enpire.realcell", "a real cell's interface: approve reset programs, verifier agreement"),
}


def version() -> str:
    try:
        return metadata.version("enpire")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed: pip install -e .)"


def main(argv: list[str] | None = None) -> int:
    width = max(map(len, COMMANDS))
    listing = "\n".join(f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items())
    p = command.Parser(
        prog="enpire", description="Coding agents improving robot policies on a fleet: every entry point as one command.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"commands:\n{listing}\n\n`enpire COMMAND --help` shows a command's options.",
    )
    p.add_argument("--version", action="version", version=f"enpire {version()}")
    p.add_argument("command", choices=COMMANDS, metavar="COMMAND", help="one of: " + ", ".join(COMMANDS))
    p.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    module = importlib.import_module(COMMANDS[args.command][0])
    return command.run(module.main, args.args, prog=f"enpire {args.command}")


if __name__ == "__main__":
    sys.exit(main())
