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

It also backs that heap with transparent huge pages where the kernel gives them on request
(``/sys/kernel/mm/transparent_hugepage/enabled`` is ``madvise``, as on Debian): it reserves
:data:`HUGE_PAGE_RESERVE` at the top of the heap, marks it ``MADV_HUGEPAGE`` and frees it
again, so the blocks XLA allocates next are carved from 2 MiB pages (one TLB entry where
there were 512). Measured on the conv VAE's step, both cores of this 2-core machine busy, one
process pinned to each: 131 → 120 ms per step (median of 4 side-by-side pairs, every pair
faster). Untouched, the reservation is address space only (it is skipped where the kernel
counts address space against a commit limit, ``vm.overcommit_memory = 2``);
``VAEKL_HUGE_PAGES=0`` leaves it out.

Entry points call it (:func:`vaekl.cli.main`); ``VAEKL_KEEP_FREED_MEMORY=0`` turns it all off.
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
MADV_HUGEPAGE = 14
HUGE_PAGE = 2 << 20
HUGE_PAGE_RESERVE = 1 << 30  # below _NEVER_TRIM, so that freeing it does not trim it away
THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"

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
    if (_applied and os.environ.get("VAEKL_HUGE_PAGES", "1") != "0" and thp_mode() == "madvise"
            and not _strict_overcommit()):
        reserve_huge_pages(libc)
    return _applied


def thp_mode() -> str:
    """The kernel's transparent-huge-page mode ('always', 'madvise', 'never'; '' if unknown)."""
    try:
        with open(THP_MODE) as f:
            text = f.read()
    except OSError:
        return ""
    return text[text.find("[") + 1:text.find("]")] if "[" in text else ""


def _strict_overcommit() -> bool:
    """Whether the kernel counts every mapped byte against a commit limit
    (``vm.overcommit_memory = 2``), where the reservation would cost each process 1 GiB of it."""
    try:
        with open("/proc/sys/vm/overcommit_memory") as f:
            return f.read().strip() == "2"
    except OSError:
        return False


def reserve_huge_pages(libc, size: int = HUGE_PAGE_RESERVE) -> bool:
    """Marks ``size`` bytes at the top of the heap ``MADV_HUGEPAGE`` (malloc, madvise, free:
    with trimming off the block stays in the heap, so later allocations fault in huge pages).
    True if the kernel took the advice."""
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    block = libc.malloc(size)
    if not block:
        return False
    start = -(-block // HUGE_PAGE) * HUGE_PAGE
    end = (block + size) // HUGE_PAGE * HUGE_PAGE
    ok = libc.madvise(start, end - start, MADV_HUGEPAGE) == 0
    libc.free(block)
    return ok
