"""The `ldm` process's C allocator: keep the memory a generation frees for the next one.

glibc's malloc hands the blocks of a freed activation back to the kernel (blocks above its mmap threshold are
unmapped, the heap's top is trimmed), so every generation faults its activations in again: measured on the 2-core
CPU VM of BENCHMARKS.md ("Few-step models"), 0.85 M minor page faults (3.3 GiB) per warm SD-Turbo image, and its
TAESD decode took 0.78–1.12 s instead of 0.41–0.50 s. Telling glibc to keep freed memory (the two `mallopt` calls
below, the same as `MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=…` in the environment; glibc's `malloc/malloc.c`,
`mallopt(3)`) takes the faults to nearly none. The price: the process keeps its peak memory until it exits, which
suits a command that generates and ends, or a server that generates again.

Only the `ldm` command does this, for its own process (the library leaves a host program's allocator alone), and
not where the user has set either variable, nor with `LDM_KEEP_FREED_MEMORY=0`, nor on a C library without
`mallopt` (musl, macOS, Windows).
"""

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's <malloc.h>
KEEP_ALL = 2**31 - 1  # the largest threshold mallopt takes (an int): never trim


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory in the process; True when it was asked (and agreed)."""
    users_choice = {"MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_"} & os.environ.keys()
    if users_choice or os.environ.get("LDM_KEEP_FREED_MEMORY") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, KEEP_ALL))
