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


M_ARENA_MAX = -8  # glibc's mallopt parameter


def one_arena() -> None:
    """Make threads started from now on allocate from the arenas that exist (glibc's M_ARENA_MAX),
    not each from a new one of its own. What a short-lived worker thread frees stays in its arena,
    which the threads after it inherit (ONNX Runtime's and PyTorch's pools), and an export's peak
    then varied from run to run by a sixth (docs/benchmarks.md). Nothing where the C library is not
    glibc."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(M_ARENA_MAX, 1)
