"""One builder per cache: a ``flock`` on a local disk, a lease on an object store.

A local lock file (``.<cache>.lock`` beside the cache) is released by the kernel when its
holder dies, so a killed build never blocks the next one.

An object store has no flock, so a build holds a **lease**: objects ``.<cache>.lease/<epoch>``
beside the cache, each created by a conditional write (``If-None-Match: *``: it fails if the
key exists). The newest epoch is the lease. Its holder rewrites it every ``ttl / 4`` seconds
with a new expiry. A second builder that finds the newest epoch alive is refused; one that
finds it expired (its holder stopped renewing it ``ttl`` seconds ago) or left by a dead
process on its own host takes over by creating the next epoch — of several racing for it,
exactly one wins. A released lease deletes its epochs (oldest first). A holder that sees a
newer epoch than its own has lost the lease, and its build stops before its commit point.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
from pathlib import Path

from pipeline import storage
from pipeline.errors import KdError

LEASE_TTL = 60.0  # seconds a lease lives without renewal; clocks must agree to well within it


def cache_lock(root, ttl: float = LEASE_TTL):
    """The lock of the cache at ``root``: a :class:`CacheLock` locally, a :class:`CacheLease` on
    an object store. Use it as a context manager."""
    return CacheLease(root, ttl) if storage.is_remote(root) else CacheLock(root)


def _busy(root, holder: str) -> KdError:
    return KdError(f"cache {root} is being built by {holder}; wait for it to finish (a second "
                   "build would race it)")


class CacheLock:
    """One builder per cache directory, through ``flock`` on ``.<name>.lock`` beside it."""

    def __init__(self, root: Path):
        self.root = root
        self.path = root.parent / f".{root.name}.lock"

    def __enter__(self) -> "CacheLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(self.fd)
            raise _busy(self.root, holder) from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        return self

    def check(self) -> None:
        """A flock cannot be lost while its holder lives."""

    def __exit__(self, *exc) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


class CacheLease:
    """One builder per cache on an object store (see the module docstring)."""

    def __init__(self, root, ttl: float = LEASE_TTL):
        self.root = root
        self.dir = root.parent / f".{root.name}.lease"
        self.ttl = float(ttl)
        self.epoch = 0
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- the lease objects
    def _epochs(self) -> list[int]:
        names = storage.files(self.dir)
        return sorted(int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit())

    def _path(self, epoch: int):
        return self.dir / f"{epoch:08d}.json"

    def _body(self) -> bytes:
        now = time.time()
        return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "renewed": now,
                           "expires": now + self.ttl}).encode()

    def _read(self, epoch: int) -> dict | None:
        try:
            return json.loads(self._path(epoch).read_bytes())
        except FileNotFoundError:
            return None
        except (ValueError, UnicodeDecodeError):  # torn by hand: treat as expired
            return {"expires": 0}

    @staticmethod
    def _stale(holder: dict) -> bool:
        if holder.get("expires", 0) < time.time():
            return True
        if holder.get("host") == socket.gethostname():  # a dead process on this host
            try:
                os.kill(int(holder["pid"]), 0)
            except ProcessLookupError:
                return True
            except (PermissionError, KeyError, ValueError, TypeError):
                return False
        return False

    # ---------------------------------------------------------------- acquire, renew, release
    def __enter__(self) -> "CacheLease":
        for _ in range(3):  # a race lost to a taker: look again once it has written its lease
            epochs = self._epochs()
            latest = epochs[-1] if epochs else 0
            holder = self._read(latest) if latest else None
            if holder is not None and not self._stale(holder):
                left = holder.get("expires", 0) - time.time()
                raise _busy(self.root, f"pid {holder.get('pid')} on {holder.get('host')} (its lease "
                                       f"expires in {max(0, left):.0f}s unless renewed)")
            if storage.create_exclusive(self._path(latest + 1), self._body()):
                self.epoch = latest + 1
                break
        else:
            raise _busy(self.root, "another builder (it took the lease while this one looked)")
        self._thread = threading.Thread(target=self._renew, name="kdcache-lease", daemon=True)
        self._thread.start()
        return self

    def _renew(self) -> None:
        renewed = time.time()
        while not self._stop.wait(self.ttl / 4):
            try:
                latest = self._epochs()[-1:]
                if latest != [self.epoch]:
                    self.lost = f"epoch {latest[0] if latest else 'none'} is there, not {self.epoch}"
                    return
                storage.write_bytes(self._path(self.epoch), self._body())
                renewed = time.time()
            except Exception as exc:
                # retried at the next tick; once the ttl has passed, another builder may own it
                if time.time() - renewed > self.ttl:
                    self.lost = f"not renewed for {self.ttl:.0f}s: {type(exc).__name__}: {exc}"
                    return

    def check(self) -> None:
        """Raise if the lease was taken over (this build stalled past its ttl): the other
        builder owns the cache now, so this one must not commit."""
        if self.lost:
            raise KdError(f"lost the build lease of cache {self.root} ({self.lost}); another "
                          "builder took over after this one stalled; let it finish")

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.lost:
            return  # the lease is another builder's now
        for epoch in self._epochs():  # oldest first: the newest goes last
            if epoch <= self.epoch:
                storage.remove_file(self._path(epoch))
