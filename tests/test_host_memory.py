"""vaekl.host_memory: freed blocks stay in the process, so a repeated large allocation does not
page-fault its memory in again (what XLA:CPU's temporary buffers do at every step)."""

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="mallopt is glibc's")

# Allocates and frees a 64 MiB block 10 times (touching every page); prints the minor page faults.
CHILD = """
import resource, sys
import numpy as np
core = getattr(np, "_core", None) or np.core
core.multiarray._set_madvise_hugepage(False)  # numpy's huge pages would hide the faults: count 4 KiB ones
from vaekl import host_memory
print(host_memory.keep_freed_memory(), file=sys.stderr)
np.ones(1 << 24, np.float32).sum()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    np.ones(1 << 24, np.float32).sum()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(env_value: str) -> tuple[int, str]:
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True,
                         env={"VAEKL_KEEP_FREED_MEMORY": env_value, "PATH": "/usr/bin:/bin"})
    return int(out.stdout.split()[-1]), out.stderr.strip().splitlines()[-1]


def test_freed_memory_is_reused_without_page_faults():
    faults, applied = _faults("1")
    assert applied == "True"
    assert faults < 1000, faults  # 10 × 16,384 pages without it


def test_switched_off_by_the_environment():
    faults, applied = _faults("0")
    assert applied == "False"
    assert faults > 10 * 16384 // 2, faults  # glibc mmaps and unmaps the 64 MiB block each time
