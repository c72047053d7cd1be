"""Keep freed host memory in the process: glibc's malloc tuned for training.

A training step allocates and frees the same large tensors every step:
activations, gradients, the MLP's (tokens, mlp_dim) buffers. glibc's malloc
serves every block above its mmap threshold (whose ceiling is below the size of
those buffers at usual batch sizes) with a fresh `mmap` and unmaps it on free,
and hands the free top of its heap back to the kernel; the next step then
page-faults all of it in again, zeroed. On a small CPU machine that is a large
share of each step's time, in system time, and it varies from step to step with
the heap's layout, which also makes benchmark rounds disagree.

`retain_freed_memory` makes malloc take every block from its heap and never
trim it, so memory freed by one step is reused by the next, as PyTorch's CUDA
caching allocator does on a GPU and as Intel's CPU tuning guide gets by
preloading jemalloc or tcmalloc configured to never decay. The heap settles
after a few steps: PyTorch asks for 64-byte aligned blocks, glibc pads each such
request, and a freed block serves the same request again once its neighbours'
fragments are consolidated. The price: the process keeps its peak host memory
until it exits (the speed page of the docs has the measurements).
Only glibc (Linux) has these settings; elsewhere this does nothing. `extras.retain_freed_memory` (on by
default) applies it when `src/train.py`, `src/eval.py` or `src/bench.py` start.
"""

from __future__ import annotations

import ctypes
import logging
import sys

log = logging.getLogger(__name__)

# mallopt() parameters, from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
# mallopt takes an int: the largest free heap top kept (2 GiB); above that it is trimmed.
NEVER_TRIM = 2**31 - 1


def retain_freed_memory() -> bool:
    """Tell glibc's malloc to serve every allocation from its heap and keep freed memory.

    `M_MMAP_MAX=0`: no block gets its own mapping (those are unmapped on free).
    `M_TRIM_THRESHOLD=2 GiB`: the heap's free top is not handed back to the kernel.
    Affects allocations made from now on, for the rest of the process (and of
    processes it forks, such as DataLoader workers). Returns whether glibc took
    both settings; False on other C libraries and platforms.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the interpreter runs on
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    taken = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, NEVER_TRIM) == 1
    if not taken:
        log.info("mallopt refused M_MMAP_MAX/M_TRIM_THRESHOLD: host memory is not retained")
    return taken
