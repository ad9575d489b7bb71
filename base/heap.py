"""Hand the C heap's free pages back to the system (glibc's malloc_trim).

glibc keeps memory freed by a thread in that thread's arena, and memory freed below its dynamic
mmap threshold (which rises to the largest block freed, up to 32 MiB) in the heap, both counted in
the resident set until trimmed. Code that frees large buffers on one thread and then allocates on
another (the export's weights stream, then validation) or that measures memory (`bench`) trims
first, so the freed memory is neither held beside the next phase nor counted against it.
"""

from __future__ import annotations

import contextlib
import ctypes


def trim_heap() -> None:
    """malloc_trim(0); nothing where the C library is not glibc."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


M_ARENA_MAX = -8  # glibc's mallopt parameters
M_MMAP_THRESHOLD = -3
LARGE_BLOCK = 256 * 1024  # glibc's dynamic threshold starts at half this and rises to 32 MiB


def one_arena() -> None:
    """Make threads started from now on allocate from the arenas that exist (glibc's M_ARENA_MAX),
    not each from a new one of its own. What a short-lived worker thread frees stays in its arena,
    which the threads after it inherit (ONNX Runtime's and PyTorch's pools), and an export's peak
    then varied from run to run by a sixth (docs/benchmarks.md). Nothing where the C library is not
    glibc."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(M_ARENA_MAX, 1)


def map_large_blocks() -> None:
    """Give every block above LARGE_BLOCK a mapping of its own, returned to the system when freed
    (glibc's M_MMAP_THRESHOLD, which also ends its dynamic threshold). By default a freed block
    raises the threshold to its size, so the next blocks of that size come from the heap and stay
    resident: a run that makes and frees a few large buffers then holds the largest of them beside
    everything after it. For a phase that measures or bounds its memory (export validation), at the
    cost of a page fault per fresh page of such blocks. Nothing where the C library is not glibc."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, LARGE_BLOCK)
