"""Keeping the decoder's memory to what it uses: the kernel cache's cap, and freed heap
memory given back to the operating system.

On CPU, torch runs SNAC's convolutions through oneDNN, which builds a kernel (a
"primitive") per layer and input shape and caches up to 1,024 of them, a few hundred KB
each. A decoder whose windows come in many lengths fills that cache: about 200 MB that
stays. It is bounded and it pays (a cap of 256 cost the soak 9% of its sessions,
docs/design.md, M1), so :func:`limit_kernel_cache` only sets the cap the config asks for
(``decoder.kernel_cache``), oneDNN's own default unless told otherwise.

SNAC's intermediate tensors are megabytes each. glibc's malloc raises its mmap threshold
after such a block is freed (up to 32 MiB), so later ones come from the heap, and a freed
heap is kept for reuse rather than returned: the process's RSS climbs to the high-water of
its busiest moment and stays there. That reuse is worth keeping under load (a fixed low
threshold cost the soak about a third of its throughput, docs/design.md M1), so instead the
decode thread calls :func:`release_freed_memory` once it has been idle a while: RSS then
tracks what is in use, which is what a container's memory limit and a leak check see.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from collections.abc import Callable

KERNEL_CACHE_ENV = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"


def limit_kernel_cache(capacity: int) -> int:
    """Cap oneDNN's kernel cache at ``capacity`` entries unless the environment already
    sets :data:`KERNEL_CACHE_ENV` (an operator's choice wins); returns the cap in force.

    oneDNN reads it once, when the first convolution runs: call this before that."""
    current = os.environ.get(KERNEL_CACHE_ENV, "").strip()
    if current.isdigit():
        return int(current)
    os.environ[KERNEL_CACHE_ENV] = str(int(capacity))
    return int(capacity)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim  # glibc only: musl and macOS have none
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def can_release() -> bool:
    """Whether this C library can give freed heap memory back (glibc's ``malloc_trim``)."""
    return _malloc_trim() is not None


def release_freed_memory() -> bool:
    """Return the free pages of every malloc arena to the system; True if any were.

    Blocks the calling thread for a few milliseconds per hundred MB of free heap: call it
    from a thread with nothing urgent to do, never from the event loop."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False
