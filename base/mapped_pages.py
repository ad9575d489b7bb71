"""Give back the pages of a mapped file (weights.data, a twin's parameters) read once and held no more.

ONNX Runtime maps an external-data file into memory and builds its kernels' own packed copies of
the weights from it (MatMulNBits and fp32 GEMM prepacking) when a session is made. The mapped pages
it read stay resident afterwards although only a few of them are read again (the embedding rows
a step looks up, the norms): on the int4 SmolLM2 artifact 43 MB beside the 112 MB of weights, which
`bench` counts in the held memory. No ONNX Runtime option drops them, so this does, with
madvise(MADV_DONTNEED) on every mapping of the file that holds no page of its own: each resident
page of such a mapping is a page of the file (of the page cache), which the kernel maps again if it
is touched, so the data seen never changes. A mapping with an anonymous page (a private copy made
when ONNX Runtime wrote to it, which DONTNEED would discard) is left alone.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
from pathlib import Path

log = logging.getLogger(__name__)


def _clean_mappings(target: str, smaps: str) -> list[tuple[int, int]]:
    """(start, length) of every mapping of `target` in an /proc/<pid>/smaps text with no page of its own."""
    found, current, own = [], None, 0
    for line in smaps.splitlines():
        head = line.split(maxsplit=5)
        if head and "-" in head[0] and not head[0].endswith(":"):  # a mapping's header line
            if current is not None and own == 0:
                found.append(current)
            current, own = None, 0
            if len(head) == 6 and head[5].strip() == target:
                start, end = (int(x, 16) for x in head[0].split("-"))
                current = (start, end - start)
        elif current is not None and head and head[0] == "Anonymous:":  # copy-on-write pages
            own += int(head[1])
    if current is not None and own == 0:
        found.append(current)
    return found


def release_clean_pages(path: Path) -> int:
    """Drop this process's resident clean pages of `path`'s mappings; returns the bytes mapped
    that were released (0 where the platform has no /proc or madvise)."""
    advice = getattr(mmap, "MADV_DONTNEED", None)
    try:
        smaps = Path("/proc/self/smaps").read_text()
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return 0
    if advice is None or not hasattr(libc, "madvise"):
        return 0
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    released = 0
    for start, length in _clean_mappings(os.path.realpath(path), smaps):
        if libc.madvise(start, length, advice) == 0:
            released += length
    log.debug("released %d mapped bytes of %s", released, path)
    return released
