"""The session table that worker processes share (``voicegw serve --workers N``).

One small file, mapped into every worker and the supervisor, locked with ``fcntl.flock``
for each read-modify-write. It holds a row per worker (pid, admitted sessions, reserved
connections, capacity) and, per API key, how many sessions each worker holds for it, so
that ``limits.max_sessions`` and ``limits.max_sessions_per_key`` stay global: a worker
admits a session only if the sums over every row allow it, under the lock.

Keys are stored as a 64-bit hash of the principal's ``key_id`` (itself a hash of the key),
never the key. There are ``max_sessions`` key slots: no more keys than that can hold
sessions at once, so a key being admitted always finds one.

A dead worker's row is cleared by the supervisor as soon as it sees the death (and a row
whose pid is gone is taken over by the next worker that claims one). There are twice as
many rows as workers, so a rolling restart (SIGHUP: the new worker starts before the old
one stops) always finds a free row.

``flock`` locks per open file: each process opens the file once and uses it from one
thread (a worker's event loop, the supervisor's main thread).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import mmap
import os
import struct
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

_MAGIC = b"VGWTBL01"
_HEADER = struct.Struct("<8sIII")  # magic, rows, key slots, workers
_HEADER_BYTES = 64
ROW_DTYPE = np.dtype(
    [("pid", "<i8"), ("sessions", "<i4"), ("reserved", "<i4"), ("capacity", "<i4"), ("_", "<i4")]
)

MAX_SESSIONS = "max_sessions"
MAX_SESSIONS_PER_KEY = "max_sessions_per_key"


class Row(NamedTuple):
    """One worker's load as the table holds it."""

    pid: int
    sessions: int
    reserved: int
    capacity: int

    @property
    def load(self) -> int:
        return self.sessions + self.reserved

    @property
    def full(self) -> bool:
        return self.load >= self.capacity


def accept_policy(rows: Sequence[Row], me: int) -> bool:
    """Whether worker ``me`` should accept connections now.

    It stops only while it is full *and* another live worker has room: then the kernel's
    queue goes to that one. When every worker is full, all accept, and admission decides
    (a session over ``max_sessions`` is refused, whichever worker took it). A worker that
    is starting or stopping publishes capacity 0, so it never counts as having room."""
    if not rows[me].full:
        return True
    return not any(i != me and r.pid and not r.full for i, r in enumerate(rows))


def key_hash(key_id: str) -> int:
    """A principal's ``key_id`` as a non-zero 64-bit number (0 marks a free key slot)."""
    h = int.from_bytes(hashlib.blake2b(key_id.encode(), digest_size=8).digest(), "little")
    return h or 1


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive, and not ours to clear
        return True
    return True


class SessionTable:
    """The mapped file. ``create`` (the supervisor) sizes and zeroes it; ``open`` (a worker)
    maps an existing one; ``claim`` gives a worker its row."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd
        head = os.pread(fd, _HEADER.size, 0)
        magic, rows, keys, workers = _HEADER.unpack(head)
        if magic != _MAGIC:
            os.close(fd)
            raise ValueError(f"{path} is not a voicegw session table")
        self.workers: int = workers
        self._mm = mmap.mmap(fd, _size(rows, keys))
        off = _HEADER_BYTES
        self._rows: npt.NDArray[np.void] = np.ndarray((rows,), ROW_DTYPE, self._mm, off)
        off += rows * ROW_DTYPE.itemsize
        self._hashes: npt.NDArray[np.uint64] = np.ndarray((keys,), "<u8", self._mm, off)
        off += keys * 8
        # Per worker row, a contiguous run of per-key counts: clearing a row is one slice.
        self._counts: npt.NDArray[np.int32] = np.ndarray((rows, keys), "<i4", self._mm, off)

    @classmethod
    def create(cls, path: str | os.PathLike[str], *, workers: int, keys: int) -> SessionTable:
        p = Path(path)
        rows = 2 * workers
        fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        os.ftruncate(fd, _size(rows, keys))  # zero-filled: every row free, every slot free
        os.pwrite(fd, _HEADER.pack(_MAGIC, rows, keys, workers), 0)
        return cls(p, fd)

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> SessionTable:
        p = Path(path)
        return cls(p, os.open(p, os.O_RDWR))

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def rows(self) -> list[Row]:
        with self.locked():
            return self._rows_unlocked()

    def _rows_unlocked(self) -> list[Row]:
        r = self._rows
        return [
            Row(int(p), int(s), int(v), int(c))
            for p, s, v, c in zip(
                r["pid"], r["sessions"], r["reserved"], r["capacity"], strict=True
            )
        ]

    def key_sessions(self, key: int) -> int:
        """Sessions held for ``key`` over all workers."""
        with self.locked():
            hit = np.flatnonzero(self._hashes == np.uint64(key))
            return int(self._counts[:, hit[0]].sum()) if hit.size else 0

    def claim(self, pid: int) -> WorkerSlot:
        """A free row (or one whose process is gone) for worker ``pid``."""
        with self.locked():
            for i, row in enumerate(self._rows_unlocked()):
                if row.pid == pid or row.pid == 0 or not _alive(row.pid):
                    self._clear_row(i)
                    self._rows["pid"][i] = pid
                    return WorkerSlot(self, i, pid)
        raise RuntimeError(f"no free row in the session table {self.path}")

    def clear(self, pid: int) -> bool:
        """Forget worker ``pid`` (it died): its sessions and key counts no longer count."""
        with self.locked():
            hit = np.flatnonzero(self._rows["pid"] == pid)
            for i in hit:
                self._clear_row(int(i))
            return bool(hit.size)

    def _clear_row(self, i: int) -> None:
        held = np.flatnonzero(self._counts[i])
        self._counts[i] = 0
        self._rows[i] = (0, 0, 0, 0, 0)
        if held.size:
            free = held[self._counts[:, held].sum(axis=0) == 0]
            self._hashes[free] = 0

    def close(self) -> None:
        # The arrays export the map's buffer; they go first or mmap refuses to close.
        del self._rows, self._hashes, self._counts
        self._mm.close()
        os.close(self._fd)


def _size(rows: int, keys: int) -> int:
    return _HEADER_BYTES + rows * ROW_DTYPE.itemsize + keys * 8 + rows * keys * 4


class WorkerSlot:
    """One worker's row: admission against the global sums, and this worker's load.

    Every change to this row calls the ``on_change`` listeners (the worker's accept loop:
    a worker that just filled up stops accepting before the next connection)."""

    def __init__(self, table: SessionTable, index: int, pid: int) -> None:
        self.table = table
        self.index = index
        self.pid = pid
        self.on_change: list[Callable[[], None]] = []

    @property
    def workers(self) -> int:
        return self.table.workers

    @property
    def row(self) -> Row:
        return self.table.rows()[self.index]

    def rows(self) -> list[Row]:
        return self.table.rows()

    def try_admit(self, key: int | None, max_sessions: int, max_per_key: int) -> str | None:
        """Count one more session here (for ``key``, unless None: anonymous), if the
        totals allow: None, else the limit that refused it."""
        t = self.table
        with t.locked():
            if int(t._rows["sessions"].sum()) >= max_sessions:
                return MAX_SESSIONS
            if key is not None:
                hit = np.flatnonzero(t._hashes == np.uint64(key))
                if hit.size:
                    k = int(hit[0])
                    if int(t._counts[:, k].sum()) >= max_per_key:
                        return MAX_SESSIONS_PER_KEY
                else:
                    free = np.flatnonzero(t._hashes == 0)
                    if not free.size:  # more keys than sessions: cannot happen under the cap
                        return MAX_SESSIONS
                    k = int(free[0])
                    t._hashes[k] = np.uint64(key)
                t._counts[self.index, k] += 1
            t._rows["sessions"][self.index] += 1
        self._changed()
        return None

    def release(self, key: int | None) -> None:
        t = self.table
        with t.locked():
            t._rows["sessions"][self.index] -= 1
            if key is not None:
                hit = np.flatnonzero(t._hashes == np.uint64(key))
                if hit.size:
                    k = int(hit[0])
                    t._counts[self.index, k] -= 1
                    if int(t._counts[:, k].sum()) <= 0:
                        t._hashes[k] = 0
        self._changed()

    def set_reserved(self, n: int) -> None:
        self._set("reserved", n)

    def set_capacity(self, n: int) -> None:
        self._set("capacity", n)

    def _set(self, field: str, n: int) -> None:
        t = self.table
        with t.locked():
            if int(t._rows[field][self.index]) == n:
                return
            t._rows[field][self.index] = n
        self._changed()

    def free(self) -> None:
        """Give the row back (this worker is stopping)."""
        self.table.clear(self.pid)

    def _changed(self) -> None:
        for fn in list(self.on_change):
            fn()
