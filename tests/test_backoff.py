"""One backoff rule (bus/backoff.py) for every retry loop of the project."""

import ast
from pathlib import Path

from actors.runtime import RestartPolicy
from bus.backoff import backoff_delay

ROOT = Path(__file__).resolve().parent.parent


def test_exponential_capped_and_stretched_to_retry_after():
    assert [backoff_delay(n, 0.5, 5.0) for n in range(0, 7)] == [0.0, 0.5, 1.0, 2.0, 4.0, 5.0, 5.0]
    assert backoff_delay(10_000, 1.0, 60.0) == 60.0  # no overflow however long it fails
    assert backoff_delay(1, 1.0, 60.0, retry_after=30.0) == 30.0  # the server asked for longer
    assert backoff_delay(1, 1.0, 60.0, retry_after=900.0, retry_after_max=300.0) == 300.0
    assert backoff_delay(4, 1.0, 60.0, retry_after=2.0) == 8.0  # never shorter than our own rule
    assert RestartPolicy(initial_s=0.1, max_s=1.0).delay(0) == 0.1  # the actor runtime uses it


def _doubling(path: Path) -> list[int]:
    """Lines computing 2 ** <something that varies>: an exponential backoff written out again."""
    return [node.lineno for node in ast.walk(ast.parse(path.read_text(), str(path)))
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow)
            and isinstance(node.left, ast.Constant) and node.left.value == 2
            and not isinstance(node.right, ast.Constant)]


def test_no_retry_loop_writes_its_own_exponential_backoff():
    found = [f"{p.relative_to(ROOT)}:{line}" for top in ("enpire", "actors", "bus", "hw", "bench")
             for p in sorted((ROOT / top).rglob("*.py")) if p != ROOT / "bus" / "backoff.py"
             for line in _doubling(p)]
    assert found == [], "use bus.backoff.backoff_delay:\n" + "\n".join(found)


def test_the_scan_sees_a_written_out_backoff(tmp_path):
    loop = tmp_path / "loop.py"
    loop.write_text("delay = min(60.0, initial * 2 ** (failures - 1))\nmask = 2 ** 20\n")
    assert _doubling(loop) == [1]
