"""The shared blackboard: typed msgspec records in LMDB, one named database per table.

LMDB gives crash safety (a committed transaction survives a SIGKILL of the writer), many readers in
several processes, and one writer at a time. Records are msgpack-encoded Structs; the caller names the
type it expects, so a record of the wrong shape is a clear `RecordError`, never a silent misread.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import lmdb
import msgspec
import structlog
import trio

T = TypeVar("T")

TABLES = (
    "meta",
    "episodes",
    "jobs",
    "findings",
    "digests",
    "champion",
    "cells",
    "timeline",
    "tokens",
    "cli_runs",
    "counters",
    "leases",
    "smoke",
    "tested",
    "training",
    "trainers",
    "candidates",
    "heldout",
    "tallied",
    "confirmed",
)
DEFAULT_MAP_SIZE = 1 << 30  # 1 GiB of address space; the file only grows as data is written
MAX_MAP_SIZE = 1 << 36


class BlackboardError(ValueError):
    """The blackboard cannot be opened or read (not an LMDB environment, damaged, not ours)."""


class RecordError(BlackboardError):
    """A stored record could not be decoded as the expected type."""


class Txn:
    """One LMDB transaction with typed helpers. Writes become visible, all at once, on commit."""

    def __init__(self, board: Blackboard, txn: lmdb.Transaction):
        self._board = board
        self._txn = txn

    def _db(self, table: str):
        return self._board._dbs[table]

    def put(self, table: str, key: str, record: msgspec.Struct, *, overwrite: bool = True) -> bool:
        """Store a record. With overwrite=False the first write wins and later ones return False."""
        return self._txn.put(key.encode(), msgspec.msgpack.encode(record), db=self._db(table), overwrite=overwrite)

    def get(self, table: str, key: str, type_: type[T]) -> T | None:
        self._board.reads += 1
        if self._db(table) is None:
            return None
        raw = self._txn.get(key.encode(), db=self._db(table))
        return None if raw is None else _decode(raw, type_, table, key)

    def delete(self, table: str, key: str) -> bool:
        return self._txn.delete(key.encode(), db=self._db(table))

    def items(self, table: str, type_: type[T], prefix: str = "", start: str = "") -> Iterator[tuple[str, T]]:
        self._board.reads += 1
        if self._db(table) is None:
            return
        cursor = self._txn.cursor(db=self._db(table))
        first = max(prefix, start)
        if not cursor.set_range(first.encode()):
            return
        for raw_key, raw in cursor:
            key = raw_key.decode()
            if not key.startswith(prefix):
                return
            yield key, _decode(raw, type_, table, key)

    def count(self, table: str) -> int:
        self._board.reads += 1
        return 0 if self._db(table) is None else self._txn.stat(self._db(table))["entries"]

    def counter(self, name: str) -> int:
        self._board.reads += 1
        return self._value(name)

    def _value(self, name: str) -> int:
        if self._db("counters") is None:
            return 0
        raw = self._txn.get(name.encode(), db=self._db("counters"))
        return 0 if raw is None else int(raw)

    def incr(self, name: str, by: int = 1) -> int:
        value = self._value(name) + by
        self._txn.put(name.encode(), str(value).encode(), db=self._db("counters"))
        return value

    def append(self, table: str, record: msgspec.Struct) -> str:
        """Store under the next sequence key of the table, so scans return records in write order."""
        key = f"{self.incr('seq:' + table):012d}"
        self.put(table, key, record)
        return key


def _decode(raw: bytes, type_: type[T], table: str, key: str) -> T:
    try:
        return msgspec.msgpack.decode(raw, type=type_)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as e:
        raise RecordError(f"blackboard table {table!r} key {key!r}: not a valid {type_.__name__}: {e}") from None


class Blackboard:
    """LMDB environment at `path` (a directory). Safe to open from several processes."""

    def __init__(self, path: str | os.PathLike, *, map_size: int = DEFAULT_MAP_SIZE, readonly: bool = False):
        self.path = Path(path)
        if not readonly:
            self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            self._env = lmdb.open(
                str(self.path),
                map_size=map_size,
                max_dbs=len(TABLES),
                readonly=readonly,
                lock=True,
                sync=True,  # a committed write survives a kill or power loss
                create=not readonly,
            )
            self._check_whole()
            # Named databases must be opened inside a write txn unless readonly.
            self._dbs = {name: self._open_table(name, readonly) for name in TABLES}
        except lmdb.Error as e:
            if hasattr(self, "_env"):
                self._env.close()
            reason = str(e).removeprefix(f"{self.path}: ")  # lmdb names the path too
            raise BlackboardError(f"{self.path}: not a readable blackboard ({reason})") from None
        self.reads = 0  # read operations of every transaction (writes' included): tests count polling by it

    def _check_whole(self) -> None:
        """Refuse a data file shorter than the pages its header says are written (a copy interrupted
        part way, a truncated file): reading a page past its end would kill the process (SIGBUS)."""
        data = self.path / "data.mdb"
        need = (self._env.info()["last_pgno"] + 1) * self._env.stat()["psize"]  # from the header only
        size = data.stat().st_size
        if size < need:
            self._env.close()
            raise BlackboardError(f"{data}: {size} bytes, but its records reach byte {need}: the file was cut "
                                  "short (an interrupted copy?); restore it from a whole copy")

    def _open_table(self, name: str, readonly: bool):
        try:
            return self._env.open_db(name.encode(), create=not readonly)
        except lmdb.NotFoundError:  # a reader that came before the writer created the table: it is empty
            return None

    @property
    def map_size(self) -> int:
        return self._env.info()["map_size"]

    @contextmanager
    def write(self) -> Iterator[Txn]:
        """A write transaction. The map grows (doubling) before it gets full, up to MAX_MAP_SIZE."""
        self._grow_if_needed()
        with self._env.begin(write=True) as txn:
            yield Txn(self, txn)

    async def transact(self, fn: Callable[[Txn], T]) -> T:
        """`fn(txn)` in one write transaction in a worker thread, so an actor's loop never waits for the
        fsync of the commit; returns what `fn` returns."""
        def run() -> T:
            with self.write() as w:
                return fn(w)
        return await trio.to_thread.run_sync(run)

    def _grow_if_needed(self) -> None:
        info, page = self._env.info(), self._env.stat()["psize"]
        used = (info["last_pgno"] + 1) * page
        if used > 0.7 * info["map_size"] and info["map_size"] * 2 <= MAX_MAP_SIZE:
            self._env.set_mapsize(info["map_size"] * 2)
            structlog.get_logger().info("blackboard_grown", actor="blackboard", map_mb=info["map_size"] * 2 >> 20)

    @contextmanager
    def read(self) -> Iterator[Txn]:
        with self._env.begin(write=False) as txn:
            yield Txn(self, txn)

    # Single-operation conveniences: each is its own transaction.
    def put(self, table: str, key: str, record: msgspec.Struct, *, overwrite: bool = True) -> bool:
        with self.write() as w:
            return w.put(table, key, record, overwrite=overwrite)

    def get(self, table: str, key: str, type_: type[T]) -> T | None:
        with self.read() as r:
            return r.get(table, key, type_)

    def items(self, table: str, type_: type[T], prefix: str = "", start: str = "") -> list[tuple[str, T]]:
        with self.read() as r:
            return list(r.items(table, type_, prefix, start))

    def values(self, table: str, type_: type[T], prefix: str = "") -> list[T]:
        return [v for _, v in self.items(table, type_, prefix)]

    def append(self, table: str, record: msgspec.Struct) -> str:
        with self.write() as w:
            return w.append(table, record)

    def count(self, table: str) -> int:
        with self.read() as r:
            return r.count(table)

    def counter(self, name: str) -> int:
        with self.read() as r:
            return r.counter(name)

    def incr(self, name: str, by: int = 1) -> int:
        with self.write() as w:
            return w.incr(name, by)

    def close(self) -> None:
        self._env.close()
