"""First process inside a CLI agent's jail: opens the loopback model endpoint, then runs the CLI.

    python -m enpire.agents.jail_init --model-socket PATH --url-env ANTHROPIC_BASE_URL=http://127.0.0.1:{relay_port} -- claude -p ...

The jail has no network but loopback; `forward` pipes loopback TCP to the daemon's model relay socket.
The CLI's exit status is this process's, and SIGTERM/SIGINT reach the CLI.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys

from enpire.agents.model_relay import forward


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="enpire.agents.jail_init")
    ap.add_argument("--model-socket", required=True)
    ap.add_argument("--url-env", action="append", default=[], help="NAME=URL with {relay_port}: set for the CLI")
    ap.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        ap.error("no command after --")
    port = forward(0, args.model_socket)
    env = dict(os.environ)
    for item in args.url_env:
        name, _, template = item.partition("=")
        env[name] = template.replace("{relay_port}", str(port))
    command = [c.replace("{relay_port}", str(port)) for c in command]  # e.g. Codex's provider base_url
    child = subprocess.Popen(command, env=env)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda s, f: child.send_signal(s))
    return child.wait()


if __name__ == "__main__":
    sys.exit(main())
