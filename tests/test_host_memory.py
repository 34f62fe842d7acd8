"""vaekl.host_memory: freed blocks stay in the process, so a repeated large allocation does not
page-fault its memory in again (what XLA:CPU's temporary buffers do at every step), on the
main thread and on a worker thread (where XLA executes; a thread arena cannot hold 80 MiB)."""

import platform
import subprocess
import sys

import pytest

from vaekl import host_memory

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="mallopt is glibc's")

# Allocates and frees an 80 MiB block 10 times on the main thread, then 10 times on a worker
# thread (touching every page); prints the minor page faults of each.
CHILD = """
import resource, sys, threading
import numpy as np
core = getattr(np, "_core", None) or np.core
core.multiarray._set_madvise_hugepage(False)  # numpy's huge pages would hide the faults: count 4 KiB ones
from vaekl import host_memory
print(host_memory.keep_freed_memory(), file=sys.stderr)
N = 20 << 20  # 80 MiB of float32

def faults():
    np.ones(N, np.float32).sum()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        np.ones(N, np.float32).sum()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

out = [faults()]
worker = threading.Thread(target=lambda: out.append(faults()))
worker.start()
worker.join()
print(*out)
"""
PAGES = 10 * (80 << 20) // 4096  # 4 KiB pages of ten 80 MiB blocks


def _faults(env_value: str) -> tuple[list[int], str]:
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True,
                         env={"VAEKL_KEEP_FREED_MEMORY": env_value, "PATH": "/usr/bin:/bin"})
    return [int(v) for v in out.stdout.split()[-2:]], out.stderr.strip().splitlines()[-1]


def test_freed_memory_is_reused_without_page_faults():
    (main, worker), applied = _faults("1")
    assert applied == "True"
    assert main < 1000 and worker < 1000, (main, worker)


def test_switched_off_by_the_environment():
    (main, worker), applied = _faults("0")
    assert applied == "False"
    # glibc mmaps and unmaps the block each time
    assert main > PAGES // 2 and worker > PAGES // 2, (main, worker)


# Allocates 256 MiB with malloc after keep_freed_memory, touches it, and prints how much of the
# process is backed by transparent huge pages (kB).
HUGE_CHILD = """
import ctypes, sys
from vaekl import host_memory
host_memory.keep_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
size = 256 << 20
block = libc.malloc(size)
ctypes.memset(block, 1, size)
line = [l for l in open("/proc/self/smaps_rollup") if l.startswith("AnonHugePages:")][0]
print(int(line.split()[1]))
"""


def _huge_kb(env_value: str) -> int:
    out = subprocess.run([sys.executable, "-c", HUGE_CHILD], capture_output=True, text=True, check=True,
                         env={"VAEKL_HUGE_PAGES": env_value, "PATH": "/usr/bin:/bin"})
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(host_memory.thp_mode() != "madvise", reason="the kernel gives huge pages only on request here")
def test_heap_is_backed_by_huge_pages():
    """With the reservation a large malloc'd block is in 2 MiB pages (most of it when the kernel
    has them free: 256 of 256 MiB here; the bound leaves room for a fragmented host); without
    it none."""
    assert _huge_kb("1") >= 64 << 10
    assert _huge_kb("0") < 16 << 10
