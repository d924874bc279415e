"""`python -m enpire.cell`: one robot cell process, joining a fleet over the bus.

The daemon starts one per local cell over ipc://; a robot on another machine joins with
`python -m enpire.cell --connect tcp://HOST:PORT --cell-id NAME --driver pusht` and its own key in
$ENPIRE_CELL_KEY (`python -m enpire.cell --cell-id NAME --print-key` on the daemon's machine derives it
from the fleet secret; that key lets the robot speak only as NAME), or the fleet's shared secret in the
environment variable named by --secret-env, from which it derives the same key.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
from pathlib import Path

import trio

from actors.cell import Cell
from actors.runtime import ActorSystem
from bus.transport import RequestClient, cell_key
from enpire import command, isolation, log
from enpire.config import Fraction, SandboxConfig, Seconds
from enpire.peer import bus_url, peer_name, run_peer
from enpire.realcell import DryRun, Operator, RealInterface, RealSettings
from enpire.sandbox import SandboxLimits
from hw import PluginError, make_driver
from hw.driver import DriverError

SECONDS, FRACTION = command.annotated(Seconds), command.annotated(Fraction)  # as the config's


def parse_args(argv: list[str] | None = None, prog: str = "python -m enpire.cell") -> argparse.Namespace:
    p = command.Parser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--connect", type=bus_url, help="bus url of the fleet, ipc://... or tcp://HOST:PORT (required to run)")
    p.add_argument("--cell-id", type=peer_name, required=True, help="unique name of this cell in the fleet")
    p.add_argument("--driver", default="pusht",
                   help="robot or simulator driver: built in, a plugin's entry point name, or package.module:Class")
    p.add_argument("--driver-options", default="{}", help="JSON object of keyword arguments for the driver")
    p.add_argument("--state-dir", type=Path, help="fleet state dir, for logs (local cells only)")
    p.add_argument("--scratch", type=Path, help="scratch directory for the policy sandbox")
    p.add_argument("--secret-env", default="ENPIRE_SECRET", help="env var with the fleet's shared secret (tcp)")
    p.add_argument("--key-env", default="ENPIRE_CELL_KEY", help="env var with this cell's own key (preferred)")
    p.add_argument("--print-key", action="store_true",
                   help="print this cell's key, derived from the secret in --secret-env, and exit")
    p.add_argument("--real", action="store_true", help="this cell drives a real robot")
    real = p.add_argument_group("real cells (--real): a person at this terminal, e-stop 'e' + Enter or SIGUSR1")
    real.add_argument("--confirm-motion", action="store_true",
                      help="let this real cell move the robot; without it a dry run prints what would move")
    real.add_argument("--interface-dir", type=Path,
                      help="approved reset programs and the verifier's agreement record (default ~/.enpire/cells/ID)")
    real.add_argument("--reset", default="person", help="'person' or an approved reset program (default person)")
    real.add_argument("--reset-timeout", type=SECONDS, default=120.0, help="seconds to answer 'scene reset?'")
    real.add_argument("--verdict-timeout", type=SECONDS, default=120.0, help="seconds to answer 'success?'")
    real.add_argument("--max-false-success", type=FRACTION, default=0.05,
                      help="Wilson 95%% upper bound of the verifier program's false-success rate to judge alone")
    real.add_argument("--min-labels", type=command.bounded(int, 1, 1e9), default=20, help="person labels before the program may judge alone")
    real.add_argument("--spot-check", type=FRACTION, default=0.1, help="share of episodes the person labels afterwards")
    limits = SandboxConfig()  # the one definition of the sandbox's limits ([sandbox] in enpire.toml)
    p.add_argument("--act-timeout", type=command.like(SandboxConfig, "act_timeout_s"), default=limits.act_timeout_s, help="seconds the policy has per act() call")
    p.add_argument("--max-missed", type=command.like(SandboxConfig, "max_missed_deadlines"), default=limits.max_missed_deadlines,
                   help="consecutive missed deadlines that end an episode")
    p.add_argument("--load-timeout", type=command.like(SandboxConfig, "load_timeout_s"), default=limits.load_timeout_s,
                   help="seconds the sandbox has to start and build the policy")
    p.add_argument("--cpu-seconds", type=command.like(SandboxConfig, "cpu_seconds"), default=limits.cpu_seconds, help="CPU seconds per sandbox process")
    p.add_argument("--memory-mb", type=command.like(SandboxConfig, "memory_mb"), default=limits.memory_mb,
                   help="memory of the sandbox (address space, and its jail)")
    p.add_argument("--scratch-mb", type=command.like(SandboxConfig, "scratch_mb"), default=limits.scratch_mb, help="size of the sandbox's tmpfs scratch")
    p.add_argument("--pids", type=command.like(SandboxConfig, "pids"), default=limits.pids, help="processes + threads in the sandbox's jail")
    p.add_argument("--unconfined", action="store_true",
                   help="run policies without the isolation engine (bubblewrap); only if you trust them")
    p.add_argument("--connect-timeout", type=SECONDS, default=60.0, help="seconds to wait for the fleet to answer")
    p.add_argument("--rt-priority", type=command.bounded(int, 0, 99), default=0,
                   help="SCHED_FIFO priority (1-99) of the control loop during rollouts; 0 = normal scheduling")
    p.add_argument("--cpu", type=command.bounded(int, 0, 4095), help="run this cell and its policy sandbox on this CPU only")
    p.add_argument("--exit-with-parent", action="store_true", help="stop when the process that started us dies")
    return p.parse_args(argv)


async def _watch_parent(parent: int, cancel: trio.CancelScope) -> None:
    while os.getppid() == parent:
        await trio.sleep(0.5)
    cancel.cancel()


def sandbox_limits(args: argparse.Namespace) -> SandboxLimits:
    return SandboxLimits(
        act_timeout_s=args.act_timeout, max_missed_deadlines=args.max_missed, load_timeout_s=args.load_timeout,
        cpu_seconds=args.cpu_seconds, memory_mb=args.memory_mb, scratch_mb=args.scratch_mb, pids=args.pids,
        confined=not args.unconfined,
    )


def build_interface(args: argparse.Namespace) -> RealInterface:
    settings = RealSettings(reset=args.reset, reset_timeout_s=args.reset_timeout, verdict_timeout_s=args.verdict_timeout,
                            max_false_success=args.max_false_success, min_labels=args.min_labels,
                            spot_check=args.spot_check)
    folder = args.interface_dir or Path.home() / ".enpire" / "cells" / args.cell_id
    interface = RealInterface(settings, Operator(), folder)
    # SIGUSR1 is the e-stop a foot switch or another terminal can send (`kill -USR1 PID`).
    signal.signal(signal.SIGUSR1, lambda *_: interface.estop.set())
    return interface


def build_driver(args: argparse.Namespace):
    """The driver, or PluginError with one line naming what is wrong."""
    try:
        options = json.loads(args.driver_options)
    except json.JSONDecodeError as e:
        raise PluginError(f"--driver-options: not JSON ({e})") from None
    if not isinstance(options, dict):
        raise PluginError(f"--driver-options: expected a JSON object, got {type(options).__name__}")
    return make_driver(args.driver, **options)


async def run(args: argparse.Namespace, secret: bytes | None, driver, interface: RealInterface | None = None) -> None:
    if args.scratch is None:  # a scratch of our own goes with the cell
        with tempfile.TemporaryDirectory(prefix=f"enpire-{args.cell_id}-", ignore_cleanup_errors=True) as own:
            return await run(argparse.Namespace(**{**vars(args), "scratch": Path(own)}), secret, driver, interface)
    scratch, limits = args.scratch, sandbox_limits(args)
    # Authenticate before anything runs: a refused robot stops with a clear message instead of retrying.
    probe = RequestClient(args.connect, sender=args.cell_id, secret=secret)
    try:
        await probe.wait_ready(timeout=args.connect_timeout)
    finally:
        probe.close()
    parent = os.getppid()
    async with trio.open_nursery() as nursery:
        if args.exit_with_parent:
            nursery.start_soon(_watch_parent, parent, nursery.cancel_scope)
        system = ActorSystem(nursery)
        await system.spawn(
            f"cell:{args.cell_id}",
            lambda: Cell(args.cell_id, args.connect, driver, limits, scratch,
                         secret=secret, real=args.real, interface=interface, rt_priority=args.rt_priority),
        )


def main(argv: list[str] | None = None, prog: str = "python -m enpire.cell") -> int:
    args = parse_args(argv, prog)
    # Take the secrets out of the environment so no child process (the policy sandbox) can inherit them.
    shared = os.environ.pop(args.secret_env, "").encode()
    own = os.environ.pop(args.key_env, "").encode()
    if args.print_key:
        if not shared:
            print(f"enpire.cell: --print-key: ${args.secret_env} is empty", file=sys.stderr)
            return 2
        print(cell_key(shared, args.cell_id).decode())
        return 0
    if not args.connect:
        print("enpire.cell: --connect is required", file=sys.stderr)
        return 2
    secret = own or (cell_key(shared, args.cell_id) if shared else None)
    log.configure(args.state_dir, f"cell:{args.cell_id}", console=args.state_dir is None)
    if not args.unconfined and (reason := isolation.check()) is not None:
        print(f"enpire.cell: sandbox: {reason}; policies are untrusted code and run only confined "
              "(--unconfined to run them anyway)", file=sys.stderr)
        return 2
    if args.cpu is not None:
        # Before any thread starts: threads and the sandbox process inherit the mask.
        try:
            os.sched_setaffinity(0, {args.cpu})
        except (OSError, ValueError) as e:
            print(f"enpire.cell: --cpu {args.cpu}: {e}", file=sys.stderr)
            return 2
    interface = None
    try:
        driver = build_driver(args)
        if args.real:
            interface = build_interface(args)
            if not args.confirm_motion:
                print("enpire.cell: dry run (no --confirm-motion): commands are printed, the robot does not move",
                      file=sys.stderr)
                driver = DryRun(driver)
    except (PluginError, ValueError) as e:
        print(f"enpire.cell: {e}", file=sys.stderr)
        return 2
    try:
        driver.connect()  # a robot that does not answer stops here with one line, before joining the fleet
    except DriverError as e:
        print(f"enpire.cell: {e}", file=sys.stderr)
        return 5
    return run_peer("enpire.cell", "cell_refused", {"cell": args.cell_id}, run, args, secret, driver, interface)


if __name__ == "__main__":
    sys.exit(command.run(main))
