"""The environment interface of a cell marked real, built once with a person (the paper's first stage).

- Reset: an approved reset program (kept read-only under the cell's interface directory once the person
  approved it; the cell runs nothing else) or the person ("scene reset? [y/n]" on the cell's terminal).
  No answer within the timeout pauses this cell (the fleet goes on); 'resume' on the terminal un-pauses.
- Verification: the person labels outcomes at first, while the verifier program (the fleet's verifier:
  OpenCV on the camera frame, SAM2, or a simulator's state) judges the same episodes beside them. Their
  agreement is kept: the false-success rate is the share of labelled episodes the program called a
  success and the person a failure, with its Wilson 95% upper bound over the n labelled episodes. Once
  n >= `min_labels` and that bound is <= `max_false_success`, the program judges alone, and the person
  is still asked on a `spot_check` share of episodes; a spot check that pushes the bound past the limit
  hands judging back to the person.
- Safety: an e-stop ('e' or 'stop' on the terminal, or SIGUSR1) halts the arm, holds the episode as
  unverified (never counted) and pauses the cell. Without `--confirm-motion` a real cell moves nothing:
  `DryRun` prints what each command would move.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import queue
import random
import stat
import sys
import threading
import time
from pathlib import Path
from typing import TextIO

import msgspec
import numpy as np

from bus.messages import Verdict
from enpire import command
from enpire.metrics import wilson_interval

ESTOP_WORDS = ("e", "stop", "estop", "e-stop")


class RealSettings(msgspec.Struct, frozen=True, kw_only=True):
    reset: str = "person"  # "person", or the path of an approved reset program
    reset_timeout_s: float = 120.0  # no answer: the cell pauses
    verdict_timeout_s: float = 120.0
    max_false_success: float = 0.05  # Wilson 95% upper bound the verifier program must reach to judge alone
    min_labels: int = 20  # person-labelled episodes before the program may judge alone
    spot_check: float = 0.1  # share of episodes the person still labels afterwards
    seed: int = 0  # of the spot-check draw (reproducible runs)


# ----------------------------------------------------------------------------- the person at the terminal


class Operator:
    """Prompts on `out`, answers from `inp` (one line each), read by a thread so a prompt can time out.

    An e-stop word on any line, at any time, sets `estop`; so does SIGUSR1 (installed by the cell)."""

    def __init__(self, inp: TextIO = sys.stdin, out: TextIO = sys.stdout, estop: threading.Event | None = None):
        self.inp, self.out = inp, out
        self.estop = estop or threading.Event()
        self._answers: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, name="operator-stdin", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.inp:
            word = line.strip().lower()
            if word in ESTOP_WORDS:
                self.estop.set()
                self.say("E-STOP: arm halted; the episode is held unverified and the cell pauses")
                continue
            self._answers.put(word)
        self._answers.put(None)  # end of input: nobody will answer any more

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def _drain(self) -> None:
        """Answers typed before a question are not answers to it."""
        try:
            while True:
                if self._answers.get_nowait() is None:
                    self._answers.put(None)
                    return
        except queue.Empty:
            pass

    def ask(self, question: str, timeout: float, choices: tuple[str, ...] = ("y", "n")) -> str | None:
        """The person's answer among `choices`, or None when none came within `timeout` seconds."""
        self._drain()
        self.say(f"{question} [{'/'.join(choices)}]")
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                word = self._answers.get(timeout=left)
            except queue.Empty:
                break
            if word is None:
                self._answers.put(None)
                return None
            if word in choices:
                return word
            self.say(f"please answer {' or '.join(choices)}")
        return None

    def wait_for(self, word: str, poll_s: float = 1.0, stop: threading.Event | None = None) -> bool:
        """Block until the person types `word` (True) or input ends / `stop` is set (False)."""
        while stop is None or not stop.is_set():
            try:
                got = self._answers.get(timeout=poll_s)
            except queue.Empty:
                continue
            if got is None:
                self._answers.put(None)
                return False
            if got == word:
                return True
        return False


# ----------------------------------------------------------------------------- verifier agreement


class Agreement(msgspec.Struct, kw_only=True):
    """Person labels vs the verifier program's verdicts on the same episodes, kept across runs."""

    n: int = 0
    agree: int = 0
    false_success: int = 0  # program success, person failure: the error that matters
    false_failure: int = 0

    def record(self, person: bool, program: bool) -> None:
        self.n += 1
        self.agree += person == program
        self.false_success += program and not person
        self.false_failure += person and not program

    def false_success_bound(self) -> float:
        """Wilson 95% upper bound of the false-success rate (1.0 with no labels)."""
        return wilson_interval(self.false_success, self.n)[1] if self.n else 1.0

    def trusted(self, settings: RealSettings) -> bool:
        return self.n >= settings.min_labels and self.false_success_bound() <= settings.max_false_success

    def summary(self) -> dict:
        return {"n": self.n, "agree": self.agree, "false_success": self.false_success,
                "false_failure": self.false_failure,
                "false_success_rate": self.false_success / self.n if self.n else None,
                "false_success_wilson95_upper": round(self.false_success_bound(), 4)}


def load_agreement(path: Path) -> Agreement:
    try:
        return msgspec.json.decode(path.read_bytes(), type=Agreement)
    except FileNotFoundError:
        return Agreement()
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise ValueError(f"{path}: unreadable agreement record ({e})") from None


def save_agreement(path: Path, agreement: Agreement) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(msgspec.json.encode(agreement))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- reset programs


def program_digest(text: bytes) -> str:
    return hashlib.sha256(text).hexdigest()[:16]


def approve(program: Path, interface_dir: Path, operator: Operator, timeout: float = 300.0) -> Path | None:
    """Show the program to the person; on 'y' keep a read-only copy under `interface_dir/approved/`."""
    text = program.read_bytes()
    operator.say(f"--- reset program {program} ---\n{text.decode(errors='replace')}\n--- end ---")
    if operator.ask("approve this reset program for this cell?", timeout) != "y":
        return None
    approved = interface_dir / "approved"
    approved.mkdir(parents=True, exist_ok=True)
    os.chmod(approved, 0o755)
    target = approved / f"{program_digest(text)}.py"
    if not target.exists():
        target.write_bytes(text)
    os.chmod(target, stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
    os.chmod(approved, 0o555)  # protected: nothing adds or swaps programs without the person
    return target


def load_reset_program(path: Path, interface_dir: Path):
    """The `reset(driver, seed)` function of an approved program; refuses anything else."""
    path = Path(path).resolve()
    approved = (interface_dir / "approved").resolve()
    if path.parent != approved:
        raise ValueError(f"reset program {path}: not approved (approved programs live in {approved}; "
                         "run `python -m enpire.realcell approve`)")
    if not path.is_file() or path.stem != program_digest(path.read_bytes()):
        raise ValueError(f"reset program {path}: missing or changed since it was approved")
    spec = importlib.util.spec_from_file_location(f"enpire_reset_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fn = getattr(module, "reset", None)
    if not callable(fn):
        raise ValueError(f"reset program {path}: defines no reset(driver, seed)")
    return fn


# ----------------------------------------------------------------------------- the interface


class RealInterface:
    """Reset, verdicts, e-stop and pausing of one real cell. Blocking calls: run them off the event loop."""

    def __init__(self, settings: RealSettings, operator: Operator, interface_dir: Path):
        self.settings = settings
        self.operator = operator
        self.dir = interface_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.estop = operator.estop
        self.paused = threading.Event()
        self.agreement_path = self.dir / "agreement.json"
        self.agreement = load_agreement(self.agreement_path)
        self._rng = random.Random(settings.seed)
        self.reset_program = None
        if settings.reset != "person":
            self.reset_program = load_reset_program(Path(settings.reset), self.dir)

    def pause(self, why: str) -> None:
        self.paused.set()
        self.operator.say(f"cell paused: {why}; type 'resume' to continue")

    def wait_resume(self, stop: threading.Event | None = None) -> bool:
        if self.operator.wait_for("resume", stop=stop):
            self.estop.clear()
            self.paused.clear()
            self.operator.say("cell resumed")
            return True
        return False

    def reset_scene(self, driver, seed: int, episode: str) -> tuple[np.ndarray | None, str]:
        """Reset the scene, then read the first observation; ("", problem) when it could not be done."""
        if self.reset_program is not None:
            try:
                self.reset_program(driver, seed)
            except Exception as e:  # noqa: BLE001 - a failing reset program pauses the cell, not the fleet
                return None, f"reset_program_error: {type(e).__name__}: {e}"
        else:
            answer = self.operator.ask(f"episode {episode}: scene reset?", self.settings.reset_timeout_s)
            if answer != "y":
                return None, "operator_timeout" if answer is None else "operator_declined_reset"
        return driver.reset(seed), ""

    def judge(self, episode: str, program: Verdict | None) -> tuple[Verdict | None, str]:
        """The verdict that counts, and who gave it ("person", "program", "spot_check").

        None when the person had to answer and did not: the episode stays unverified."""
        trusted = program is not None and self.agreement.trusted(self.settings)
        if trusted and self._rng.random() >= self.settings.spot_check:
            return program, "program"
        hint = f" (verifier program says {'success' if program.success else 'failure'})" if program and trusted else ""
        answer = self.operator.ask(f"episode {episode}: success?{hint}", self.settings.verdict_timeout_s)
        if answer is None:
            return None, "person"
        person = answer == "y"
        if program is not None:
            self.agreement.record(person, program.success)
            save_agreement(self.agreement_path, self.agreement)
            if trusted and not self.agreement.trusted(self.settings):
                self.operator.say("verifier program no longer within its bound: the person judges again")
        score = program.score if program is not None else float(person)
        verdict = Verdict(success=person, score=score, reason="success" if person else "person: failure",
                          verifier="person")
        return verdict, "spot_check" if trusted else "person"


class DryRun:
    """A real robot without `--confirm-motion`: observations are read, commands are printed, nothing moves."""

    def __init__(self, driver, out: TextIO = sys.stdout):
        self._driver = driver
        self._out = out
        self._obs = None

    def __getattr__(self, name):
        return getattr(self._driver, name)

    def reset(self, seed: int) -> np.ndarray:
        self._obs = self._driver.reset(seed)
        return self._obs

    def act(self, action: np.ndarray) -> np.ndarray:
        names = getattr(self._driver, "action_names", None) or [str(i) for i in range(len(action))]
        moves = ", ".join(f"{n}={float(v):.4g}" for n, v in zip(names, np.asarray(action, dtype=float), strict=False))
        print(f"dry run: would move {moves}", file=self._out, flush=True)
        return self._obs

    def outcome(self) -> tuple[float, bool]:
        return 0.0, False

    def halt(self) -> None:
        pass




def main(argv: list[str] | None = None, prog: str = "python -m enpire.realcell") -> int:
    """`python -m enpire.realcell approve PROGRAM --dir DIR` / `agreement --dir DIR`."""

    p = command.Parser(prog=prog, description="a real cell's environment interface")
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("approve", help="show a reset program to the person and keep it if approved")
    a.add_argument("program", type=Path)
    a.add_argument("--dir", type=Path, required=True, help="the cell's interface directory (--interface-dir)")
    g = sub.add_parser("agreement", help="the verifier program's agreement with the person so far")
    g.add_argument("--dir", type=Path, required=True)
    args = p.parse_args(argv)
    not_a_dir = args.dir.exists() and not args.dir.is_dir()  # approve creates it; agreement reads it
    if not_a_dir or (args.command == "agreement" and not args.dir.is_dir()):
        print(f"enpire.realcell: --dir {args.dir}: not a cell's interface directory", file=sys.stderr)
        return 2
    try:
        if args.command == "approve":
            if not args.program.is_file():
                print(f"enpire.realcell: {args.program}: no such file", file=sys.stderr)
                return 2
            target = approve(args.program, args.dir, Operator())
            print(f"approved: {target}" if target else "not approved")
            return 0 if target else 1
        print(json.dumps(load_agreement(args.dir / "agreement.json").summary(), indent=2))
    except (OSError, ValueError) as e:
        print(f"enpire.realcell: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(command.run(main))
