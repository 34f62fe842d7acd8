"""The host allocator: keep freed memory in the process instead of returning it to the kernel.

XLA:CPU allocates a compiled program's temporary buffers afresh at every execution. A conv
VAE's training step needs tens of megabytes of them; glibc's ``malloc`` serves blocks that
large with ``mmap`` and gives them back with ``munmap`` when they are freed, so every step
page-faults its working memory in again (measured: ~15,500 minor faults and ~25 ms of kernel
time per 0.15 s step of the Locatello conv VAE on one core; the same holds for PyTorch's
step). :func:`keep_freed_memory` asks glibc to serve every block from the heap
(``M_MMAP_MAX = 0``), never to trim it (``M_TRIM_THRESHOLD``), and to keep one arena
(``M_ARENA_MAX = 1``): XLA executes on a worker thread, and a thread's own arena cannot hold a
block over 64 MiB (the conv VAE's step has a 72 MB one), so glibc would mmap it regardless —
17,500 faults and ~25 ms per one-step call. After the first step the memory is reused without
faults. The price is that the process keeps its peak heap until it exits, which a training
or evaluation process does anyway. Call it before the first thread allocates (entry points do,
before jax starts its backend).

Entry points call it (:func:`vaekl.cli.main`); ``VAEKL_KEEP_FREED_MEMORY=0`` turns it off.
Elsewhere than Linux with glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform

LOG = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
_NEVER_TRIM = 2**31 - 1  # mallopt takes an int: 2 GiB of free top-of-heap before any trim

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Sets glibc's allocator to reuse freed memory (once per process); True if it is set."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("VAEKL_KEEP_FREED_MEMORY", "1") == "0":
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _applied = all([libc.mallopt(M_MMAP_MAX, 0), libc.mallopt(M_TRIM_THRESHOLD, _NEVER_TRIM),
                        libc.mallopt(M_ARENA_MAX, 1)])
    except (OSError, AttributeError) as e:  # no libc to load, or one without mallopt
        LOG.debug("mallopt unavailable: %s", e)
    return _applied
