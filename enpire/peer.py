"""A process that joins the daemon over the bus (a cell, a remote trainer): its command-line checks and
its exit codes."""

from __future__ import annotations

import argparse
import re
import signal
import sys

import pynng
import structlog
import trio

from bus.transport import AuthError, RequestTimeout

PEER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # it names files and folders too


def peer_name(value: str) -> str:
    """argparse type of a cell's or trainer's name."""
    if not PEER_NAME.fullmatch(value):
        raise argparse.ArgumentTypeError(
            f"{value!r}: 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
    return value


def bus_url(value: str) -> str:
    """argparse type of the fleet's address: refused when nng cannot dial it at all (a typo); an address
    with nobody listening yet is fine (the peer waits for the fleet)."""
    with pynng.Req0() as probe:
        try:
            probe.dial(value, block=False)
        except pynng.NNGException as e:
            raise argparse.ArgumentTypeError(f"{value!r}: not an address to dial ({e}); e.g. tcp://HOST:7700") from None
    return value


def run_peer(prog: str, refused_event: str, identity: dict[str, str], main, *args) -> int:
    """Run `main(*args)` under trio: 0 when it returns, 3 when the daemon refused our key, 4 when it
    never answered, 130 when a stop signal (SIGINT, SIGTERM) ended it. Each failure is one line on stderr."""
    try:
        stopped = trio.run(_until_stopped, main, *args)
    except AuthError as e:
        structlog.get_logger().error(refused_event, **identity, error=str(e))
        print(f"{prog}: {e}", file=sys.stderr)
        return 3
    except RequestTimeout as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 4
    except KeyboardInterrupt:
        return 130
    return 130 if stopped else 0


async def _until_stopped(main, *args) -> bool:
    """`main(*args)`, cancelled by a stop signal so that what it holds is let go on the way out (a robot's
    driver disconnected, the policy sandbox closed, its own scratch folder removed); whether one came."""
    stopped, error = False, None
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            async def watch() -> None:
                nonlocal stopped
                async for _ in signals:
                    stopped = True
                    nursery.cancel_scope.cancel()
            nursery.start_soon(watch)
            try:
                await main(*args)
            except Exception as e:  # raised below as itself, not inside the nursery's exception group
                error = e
            nursery.cancel_scope.cancel()
    if error is not None:
        raise error
    return stopped
