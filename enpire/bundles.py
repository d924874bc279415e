"""Policy bundles by content hash: the daemon names a policy's files by their hash in every lease, and a
cell fetches the files of a hash it has not seen once, then runs them from its own bounded cache.

A lease stays a few hundred bytes however large the policy (a checkpoint can be megabytes), and the
transport's duplicate-reply cache never holds policy files (bundle replies are not remembered there:
they are content-addressed, so answering a repeated request again is always right).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import trio

from bus.messages import PolicyBundle, PolicySpec, bundle_hash


class BundleError(RuntimeError):
    pass


class _Lru:
    """Files by digest, least recently used dropped first beyond `max_entries` or `max_bytes`."""

    def __init__(self, max_entries: int, max_bytes: int):
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._items: OrderedDict[str, dict[str, bytes]] = OrderedDict()
        self.bytes = 0

    def get(self, digest: str) -> dict[str, bytes] | None:
        files = self._items.get(digest)
        if files is not None:
            self._items.move_to_end(digest)
        return files

    def put(self, digest: str, files: dict[str, bytes]) -> None:
        if digest in self._items:
            return
        self._items[digest] = files
        self.bytes += _size(files)
        while len(self._items) > 1 and (len(self._items) > self.max_entries or self.bytes > self.max_bytes):
            _, old = self._items.popitem(last=False)
            self.bytes -= _size(old)

    def __len__(self) -> int:
        return len(self._items)


def _size(files: dict[str, bytes]) -> int:
    return sum(len(v) for v in files.values())


class BundleStore:
    """The daemon's side: (commit, artifact) -> digest (small, kept) and digest -> files (bounded; re-read
    on a miss). A policy that names a checkpoint by content hash (`PolicySpec.artifact`) gets it from the
    trainer's `artifacts/` as `weights.npz` beside its commit's files: the checkpoint travels by its hash.

    `read_files(commit)` is the workspace's reader (git, blocking): it runs in a worker thread."""

    def __init__(self, read_files: Callable[[str], dict[str, bytes]], artifacts: Path | None = None, *,
                 max_entries: int = 64, max_bytes: int = 256 << 20):
        self._read, self._artifacts = read_files, artifacts
        self._digests: dict[tuple[str, str], str] = {}
        self._sources: dict[str, tuple[str, str]] = {}  # digest -> (commit, artifact), to re-read an evicted one
        self._files = _Lru(max_entries, max_bytes)
        self.reads = 0

    async def digest(self, spec: PolicySpec) -> str:
        source = (spec.commit, spec.artifact)
        digest = self._digests.get(source)
        if digest is None:
            files = await self._load(source)
            digest = bundle_hash(files)
            self._digests[source], self._sources[digest] = digest, source
            self._files.put(digest, files)
        return digest

    async def bundle(self, digest: str) -> PolicyBundle | None:
        files = self._files.get(digest)
        if files is None:
            source = self._sources.get(digest)
            if source is None:
                return None
            files = await self._load(source)
            self._files.put(digest, files)
        return PolicyBundle(digest=digest, files=files)

    async def _load(self, source: tuple[str, str]) -> dict[str, bytes]:
        self.reads += 1
        return await trio.to_thread.run_sync(self._read_source, *source)

    def _read_source(self, commit: str, artifact: str) -> dict[str, bytes]:
        files = dict(self._read(commit))
        if artifact:
            if self._artifacts is None:
                raise BundleError(f"policy names checkpoint {artifact} but this fleet keeps no artifacts")
            weights = (self._artifacts / f"{artifact}.npz").read_bytes()
            if hashlib.sha256(weights).hexdigest()[:32] != artifact:
                raise BundleError(f"checkpoint {artifact} does not match its content hash: the file was altered")
            files["weights.npz"] = weights
        return files


class BundleCache:
    """The cell's side: bundles it already fetched, bounded; `fetch(digest)` asks the daemon on a miss."""

    def __init__(self, fetch: Callable[[str], PolicyBundle], *, max_entries: int = 16, max_bytes: int = 128 << 20):
        self._fetch = fetch
        self._files = _Lru(max_entries, max_bytes)
        self.fetches = 0

    def files(self, digest: str) -> dict[str, bytes]:
        files = self._files.get(digest)
        if files is None:
            self.fetches += 1
            bundle = self._fetch(digest)
            if bundle_hash(bundle.files) != digest:  # checked once, when it arrives; runs from the cache after
                raise BundleError(f"bundle {digest} arrived with other content (hash {bundle_hash(bundle.files)})")
            files = bundle.files
            self._files.put(digest, files)
        return files

    def __len__(self) -> int:
        return len(self._files)
