"""Exit codes of a process that joins the daemon over the bus (a cell, a remote trainer)."""

from __future__ import annotations

import sys

import structlog
import trio

from bus.transport import AuthError, RequestTimeout


def run_peer(prog: str, refused_event: str, identity: dict[str, str], main, *args) -> int:
    """Run `main(*args)` under trio: 0 when it returns, 3 when the daemon refused our key, 4 when it
    never answered, 130 on Ctrl-C. Each failure is one line on stderr."""
    try:
        trio.run(main, *args)
    except AuthError as e:
        structlog.get_logger().error(refused_event, **identity, error=str(e))
        print(f"{prog}: {e}", file=sys.stderr)
        return 3
    except RequestTimeout as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 4
    except KeyboardInterrupt:
        return 130
    return 0
