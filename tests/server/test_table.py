"""The session table that worker processes share: global limits over every worker's row,
rows given back when a worker dies, and the accept policy over the rows."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.server.table import (
    MAX_SESSIONS,
    MAX_SESSIONS_PER_KEY,
    Row,
    SessionTable,
    WorkerSlot,
    accept_policy,
    key_hash,
)

# Two live pids to stand for two workers: a row whose pid is gone may be taken over.
ME, PARENT = os.getpid(), os.getppid()


def dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return int(proc.stdout)


@pytest.fixture
def path(tmp_path: Path) -> Iterator[Path]:
    table = SessionTable.create(tmp_path / "sessions", workers=2, keys=4)
    yield table.path
    table.close()


def two_workers(path: Path) -> tuple[WorkerSlot, WorkerSlot]:
    """Each worker maps the file on its own, as worker processes do."""
    return SessionTable.open(path).claim(ME), SessionTable.open(path).claim(PARENT)


def test_max_sessions_counts_every_worker(path: Path) -> None:
    a, b = two_workers(path)
    assert (a.index, b.index, a.workers) == (0, 1, 2)
    assert a.try_admit(None, 3, 2) is None
    assert a.try_admit(None, 3, 2) is None
    assert b.try_admit(None, 3, 2) is None
    assert b.try_admit(None, 3, 2) == MAX_SESSIONS
    assert a.try_admit(None, 3, 2) == MAX_SESSIONS
    a.release(None)
    assert b.try_admit(None, 3, 2) is None
    assert [(r.sessions, r.pid) for r in a.rows()[:2]] == [(1, ME), (2, PARENT)]


def test_max_sessions_per_key_counts_every_worker(path: Path) -> None:
    a, b = two_workers(path)
    k, other = key_hash("key-1"), key_hash("key-2")
    assert a.try_admit(k, 10, 2) is None
    assert b.try_admit(k, 10, 2) is None
    assert a.try_admit(k, 10, 2) == MAX_SESSIONS_PER_KEY
    assert b.try_admit(k, 10, 2) == MAX_SESSIONS_PER_KEY
    assert b.try_admit(other, 10, 2) is None  # another key is not held back
    assert a.try_admit(None, 10, 2) is None  # nor anonymous sessions (no per-key cap)
    assert a.table.key_sessions(k) == 2
    b.release(k)
    assert a.try_admit(k, 10, 2) is None
    assert a.table.key_sessions(k) == 2


def test_key_slots_are_reused_once_a_key_holds_no_session(path: Path) -> None:
    # 4 slots (max_sessions): four keys fill them; a fifth fits once one key is gone.
    a, b = two_workers(path)
    keys = [key_hash(f"key-{i}") for i in range(5)]
    for k in keys[:4]:
        assert a.try_admit(k, 4, 1) is None
    a.release(keys[0])
    assert b.try_admit(keys[4], 4, 1) is None
    assert a.table.key_sessions(keys[0]) == 0
    assert a.table.key_sessions(keys[4]) == 1


def test_a_dead_workers_sessions_and_keys_are_forgotten(path: Path) -> None:
    a, b = two_workers(path)
    k = key_hash("key-1")
    assert b.try_admit(k, 2, 1) is None
    assert b.try_admit(None, 2, 1) is None
    assert a.try_admit(None, 2, 1) == MAX_SESSIONS
    supervisor = SessionTable.open(path)
    assert supervisor.clear(PARENT)
    assert not supervisor.clear(PARENT)  # nothing left of it
    assert a.try_admit(k, 2, 1) is None  # the key's count went with the worker
    assert a.rows()[b.index] == Row(0, 0, 0, 0)


def test_a_row_whose_process_is_gone_is_taken_over(tmp_path: Path) -> None:
    table = SessionTable.create(tmp_path / "sessions", workers=1, keys=2)  # two rows
    gone = table.claim(dead_pid())
    assert gone.try_admit(key_hash("k"), 2, 2) is None
    live = table.claim(ME)
    assert live.index == gone.index == 0  # no one cleared it, but its pid is gone
    assert table.key_sessions(key_hash("k")) == 0
    assert table.claim(PARENT).index == 1
    with pytest.raises(RuntimeError, match="no free row"):
        table.claim(1)  # pid 1 (init) is alive: every row is held
    table.close()


def test_a_worker_gives_its_row_back(path: Path) -> None:
    a, b = two_workers(path)
    assert b.try_admit(None, 5, 5) is None
    b.free()
    assert a.rows()[b.index] == Row(0, 0, 0, 0)


def test_load_changes_are_published_and_heard(path: Path) -> None:
    a, b = two_workers(path)
    heard: list[Row] = []
    a.on_change.append(lambda: heard.append(a.row))
    a.set_capacity(2)
    a.set_capacity(2)  # no change, no call
    a.set_reserved(1)
    assert a.try_admit(None, 5, 5) is None
    a.release(None)
    assert heard == [Row(ME, 0, 0, 2), Row(ME, 0, 1, 2), Row(ME, 1, 1, 2), Row(ME, 0, 1, 2)]
    assert b.rows()[a.index] == Row(ME, 0, 1, 2)  # the other worker sees it


def test_a_file_that_is_not_a_table_is_refused(tmp_path: Path) -> None:
    (tmp_path / "x").write_bytes(b"\0" * 128)
    with pytest.raises(ValueError, match="not a voicegw session table"):
        SessionTable.open(tmp_path / "x")


# ----------------------------------------------------------------------------------------
# Accept policy


def row(sessions: int, reserved: int, capacity: int, pid: int = 7) -> Row:
    return Row(pid, sessions, reserved, capacity)


@pytest.mark.parametrize(
    ("rows", "me", "accept"),
    [
        # Room here: accept, whatever the others do.
        ([row(0, 0, 2), row(0, 0, 2)], 0, True),
        ([row(1, 0, 2), row(5, 0, 2)], 0, True),
        # Full (sessions, or reserved connections not answered yet): let the other take it.
        ([row(2, 0, 2), row(0, 0, 2)], 0, False),
        ([row(1, 1, 2), row(1, 0, 2)], 0, False),
        # Everyone full: accept (admission decides, e.g. max_sessions refuses).
        ([row(2, 0, 2), row(2, 0, 2)], 0, True),
        ([row(3, 0, 2), row(1, 1, 2)], 0, True),
        # A starting or stopping worker (capacity 0) has no room.
        ([row(2, 0, 2), row(0, 0, 0)], 0, True),
        # A free row (no pid) is no worker.
        ([row(2, 0, 2), row(0, 0, 0, pid=0), row(0, 0, 5, pid=0)], 0, True),
        # The one with room keeps accepting.
        ([row(2, 0, 2), row(0, 0, 2)], 1, True),
        ([row(2, 0, 2), row(2, 0, 2), row(1, 0, 2)], 1, False),
    ],
)
def test_a_full_worker_stops_accepting_only_while_another_has_room(
    rows: list[Row], me: int, accept: bool
) -> None:
    assert accept_policy(rows, me) is accept


def test_key_hashes_are_never_the_free_slot_mark() -> None:
    assert key_hash("key-1") != key_hash("key-2")
    assert all(key_hash(f"key-{i}") != 0 for i in range(1000))
