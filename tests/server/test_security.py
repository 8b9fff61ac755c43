"""Session admission: the caps alone in one process, and global across worker processes
through the shared session table."""

from __future__ import annotations

import os
from pathlib import Path

from gateway.server.security import ANONYMOUS, Principal, SessionLimiter
from gateway.server.table import SessionTable, key_hash

ALICE, BOB = Principal("key-alice"), Principal("key-bob")


def test_one_process_caps_sessions_and_sessions_per_key() -> None:
    refused: list[str] = []
    lim = SessionLimiter(3, 2, on_refuse=refused.append)
    assert lim.try_acquire(ALICE) is None
    assert lim.try_acquire(ALICE) is None
    assert lim.try_acquire(ALICE) == "this key is at its limit of 2 sessions"
    assert lim.try_acquire(ANONYMOUS) is None
    assert lim.try_acquire(BOB) == "the gateway is at its limit of 3 sessions"
    assert refused == ["max_sessions_per_key", "max_sessions"]
    lim.release(ALICE)
    assert lim.active == 2
    assert lim.try_acquire(BOB) is None


def test_with_a_table_the_caps_hold_over_every_worker(tmp_path: Path) -> None:
    path = SessionTable.create(tmp_path / "sessions", workers=2, keys=3).path
    refused: list[str] = []
    one = SessionLimiter(
        3, 2, table=SessionTable.open(path).claim(os.getpid()), on_refuse=refused.append
    )
    two = SessionLimiter(
        3, 2, table=SessionTable.open(path).claim(os.getppid()), on_refuse=refused.append
    )
    assert one.try_acquire(ALICE) is None
    assert two.try_acquire(ALICE) is None
    assert two.try_acquire(ALICE) == "this key is at its limit of 2 sessions"
    assert one.try_acquire(BOB) is None
    assert two.try_acquire(ANONYMOUS) == "the gateway is at its limit of 3 sessions"
    assert refused == ["max_sessions_per_key", "max_sessions"]
    assert (one.active, two.active) == (2, 1)  # each counts its own
    one.release(ALICE)
    assert two.try_acquire(ALICE) is None
    assert SessionTable.open(path).key_sessions(key_hash(ALICE.key_id)) == 2
