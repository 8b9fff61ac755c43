from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.hostile.stack import Stack, running_stack


class Stacks:
    """One gateway process shared by the probes while it stays healthy. A probe whose
    health check fails leaves it marked unhealthy, and the next probe gets a fresh one:
    one leak must not fail every probe after it."""

    def __init__(self, root: Path, snac: Path) -> None:
        self._root = root
        self._snac = snac
        self._exit = contextlib.ExitStack()
        self._current: Stack | None = None
        self._n = 0

    def get(self) -> Stack:
        s = self._current
        if s is not None and (not s.healthy or s.proc.poll() is not None):
            self._exit.close()
            self._exit = contextlib.ExitStack()
            s = None
        if s is None:
            self._n += 1
            tmp = self._root / f"stack{self._n}"
            tmp.mkdir()
            s = self._exit.enter_context(running_stack(tmp, self._snac))
            self._current = s
        return s

    def close(self) -> None:
        self._exit.close()


@pytest.fixture(scope="session")
def stacks(tmp_path_factory: pytest.TempPathFactory, snac_weights: Path) -> Iterator[Stacks]:
    s = Stacks(tmp_path_factory.mktemp("hostile"), snac_weights)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def stack(stacks: Stacks) -> Stack:
    return stacks.get()
