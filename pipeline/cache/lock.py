"""One builder per cache: a ``flock`` on a local disk, a lease on an object store.

A local lock file (``.<cache>.lock`` beside the cache) is released by the kernel when its
holder dies, so a killed build never blocks the next one.

An object store has no flock, so a build holds a **lease**: objects ``.<cache>.lease/<epoch>``
beside the cache, each created by a conditional write (``If-None-Match: *``: it fails if the
key exists), holding its holder's random token. The newest epoch is the lease. Its holder
rewrites it every ``ttl / 4`` seconds with a new expiry. A second builder that finds the
newest epoch alive is refused; one that finds it expired (its holder stopped renewing it
``ttl`` seconds ago) or left by a dead process of its own machine takes over by creating the
next epoch — of several racing for it, exactly one wins. A released lease deletes its epochs
(oldest first), so epoch numbers are reused: ownership is the token. A holder whose epoch is
no longer the newest, or no longer holds its token, or that has not renewed it for ``ttl / 2``
has lost the lease, and its build stops before its commit point.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import threading
import time
import uuid
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
        self.token = uuid.uuid4().hex  # whose lease an epoch object is: epochs can be reused
        self.lost: str | None = None
        self._renewed = 0.0  # time.monotonic() of the last successful write of the lease
        self._error = "stalled"  # the last renewal's failure, if any
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
        return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "machine": _machine(),
                           "token": self.token, "renewed": now, "expires": now + self.ttl}).encode()

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
        # a dead process of this very machine and pid namespace (a hostname alone is shared by
        # host-network containers and cloned VMs, whose pids are not ours to probe)
        if holder.get("host") == socket.gethostname() and holder.get("machine") == _machine():
            try:
                os.kill(int(holder["pid"]), 0)
            except ProcessLookupError:
                return True
            except (PermissionError, KeyError, ValueError, TypeError):
                return False
        return False

    def _mine(self) -> bool:
        """Whether the newest epoch is this holder's (by its token, not only its number)."""
        epochs = self._epochs()
        return bool(epochs) and epochs[-1] == self.epoch and \
            (self._read(self.epoch) or {}).get("token") == self.token

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
            created = storage.create_exclusive(self._path(latest + 1), self._body())
            # a retried PUT whose first attempt landed fails its condition on our own object
            if created or (self._read(latest + 1) or {}).get("token") == self.token:
                self.epoch = latest + 1
                break
        else:
            raise _busy(self.root, "another builder (it took the lease while this one looked)")
        self._renewed = time.monotonic()
        self._thread = threading.Thread(target=self._renew, name="kdcache-lease", daemon=True)
        self._thread.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                if not self._mine():
                    self.lost = f"its epoch {self.epoch} is no longer the newest, or not its own"
                    return
                storage.write_bytes(self._path(self.epoch), self._body())
                self._renewed = time.monotonic()
            except Exception as exc:  # retried at the next tick; check() gives up at ttl / 2
                self._error = f"{type(exc).__name__}: {exc}"

    def check(self) -> None:
        """Raise unless this build still holds its lease: checked now against the store, and
        renewed within ttl / 2 (a taker may take it at ttl). Called before the commit point."""
        stale = time.monotonic() - self._renewed > self.ttl / 2
        if not self.lost and (stale or not self._mine()):
            self.lost = (f"not renewed for {time.monotonic() - self._renewed:.0f}s "
                         f"({self._error})" if stale else
                         f"its epoch {self.epoch} is no longer the newest, or not its own")
        if self.lost:
            raise KdError(f"lost the build lease of cache {self.root} ({self.lost}); another "
                          "builder may own it now; re-run the same command once it is done")

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.lost or not self._mine():
            return  # the lease is another builder's now
        try:
            for epoch in self._epochs():  # oldest first: the newest, ours, goes last
                if epoch <= self.epoch:
                    storage.remove_file(self._path(epoch))
        except Exception as exc:  # the build itself is done; an unreleased lease expires by itself
            print(f"kdcache: warning: could not release the build lease {self._path(self.epoch)} "
                  f"({type(exc).__name__}: {exc}); it expires {self.ttl:.0f}s after its last renewal",
                  file=sys.stderr)


def _machine() -> str:
    """This kernel's boot id and this process's pid namespace: processes that agree on both can
    probe each other's pids."""
    try:
        boot = open("/proc/sys/kernel/random/boot_id").read().strip()
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return ""
    return f"{boot}:{namespace}"
