from __future__ import annotations

import os

import pytest

from gateway.decoder.memory import (
    KERNEL_CACHE_ENV,
    can_release,
    limit_kernel_cache,
    release_freed_memory,
)

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


@pytest.mark.skipif(not can_release(), reason="needs glibc's malloc_trim")
def test_freed_heap_memory_goes_back_to_the_system() -> None:
    # 200 MB in 100 KB blocks: under malloc's mmap threshold, so they come from the heap.
    # The last block stays alive, so free() cannot shrink the heap from its top: the freed
    # memory stays in the process, as it does after a burst of decoding.
    blocks = [bytearray(100_000) for _ in range(2000)]
    for b in blocks:
        b[::4096] = b"\x01" * len(b[::4096])  # touch every page
    keep = blocks[-1]
    del blocks
    before = rss_bytes()
    assert release_freed_memory()
    after = rss_bytes()
    assert before - after > 150 * 2**20, (before, after)
    assert keep[0] == 1


def test_the_kernel_cache_cap_is_set_unless_the_environment_chose_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(KERNEL_CACHE_ENV, raising=False)
    assert limit_kernel_cache(64) == 64
    assert os.environ[KERNEL_CACHE_ENV] == "64"
    monkeypatch.setenv(KERNEL_CACHE_ENV, "8")
    assert limit_kernel_cache(64) == 8  # the operator's choice wins
    assert os.environ[KERNEL_CACHE_ENV] == "8"
    monkeypatch.setenv(KERNEL_CACHE_ENV, "lots")
    assert limit_kernel_cache(64) == 64  # not a number: ours
    assert os.environ[KERNEL_CACHE_ENV] == "64"
