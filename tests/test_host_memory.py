"""vaekl.host_memory: freed blocks stay in the process, so a repeated large allocation does not
page-fault its memory in again (what XLA:CPU's temporary buffers do at every step), on the
main thread and on a worker thread (where XLA executes; a thread arena cannot hold 80 MiB)."""

import platform
import subprocess
import sys

import pytest

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
