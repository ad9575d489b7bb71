"""A layer's float weight in its stored form, made a block of rows at a time for the weights stream.

The export writes every layer beyond the twin straight from the checkpoint: read, transposed to the
[in, out] form MatMul takes, rounded to the compute dtype. Made whole, each of those steps takes
fresh memory (a page fault per page: most of the export's kernel time, docs/benchmarks.md) and the
weight is held whole beside its write. Made here, the checkpoint's bytes go into one staging buffer reused for
every weight, and the stored form comes out a block of rows at a time through small buffers, also
reused, that stay in the CPU's cache: the digest and the write take each block while it is hot.
"""

from __future__ import annotations

import mmap
import threading
from collections.abc import Callable, Iterator

import torch

# Of the stored form per block (8 MiB in fp32). The stream takes the GIL several times a block,
# between kernels that release it; beside the tracer's Python each take can wait out the interpreter's
# 5 ms switch interval, so fewer, larger blocks keep the stream going (docs/benchmarks.md)
BLOCK_ELEMENTS = 1 << 21

# (checkpoint's parameter name, buffer of at least n bytes) -> the parameter as stored, viewing it
StagedReader = Callable[[str, Callable[[int], torch.Tensor]], torch.Tensor]


class FloatPieces:
    """Buffers reused from one weight to the next, one set per thread that makes pieces (the
    stream's), so a block handed out stays valid until that thread asks for the next."""

    def __init__(self, read: StagedReader) -> None:
        self.read = read
        self.local = threading.local()

    def pieces(self, param: str, transposed: bool, compute: torch.dtype, stored: torch.dtype) -> Iterator[memoryview]:
        """Parameter `param` as the export stores it — transposed or not, rounded to `compute`, held
        as `stored` (what exporter.export's _stored_float makes whole) — as consecutive blocks of
        whole rows of that form, in bytes. A block is valid until the next one is asked for."""
        source = self.read(param, lambda n: self._buffer("staging", n))
        form = source.t() if transposed else source.reshape(1, -1) if source.dim() < 2 else source
        rows, cols = form.shape
        step = max(1, BLOCK_ELEMENTS // max(cols, 1))
        for start in range(0, rows, step):
            end = min(rows, start + step)
            count = (end - start) * cols
            if transposed:  # a column block of the source, then its transpose: both contiguous copies
                columns = self._typed("columns", count, source.dtype).view(cols, end - start)
                columns.copy_(source[:, start:end])
                block = self._typed("turned", count, source.dtype).view(end - start, cols).copy_(columns.t())
            else:
                block = form[start:end]
            for slot, dtype in (("compute", compute), ("stored", stored)):
                if block.dtype != dtype:
                    block = self._typed(slot, count, dtype).view(end - start, cols).copy_(block)
            yield memoryview(block.reshape(-1).view(torch.uint8).numpy())

    def _typed(self, slot: str, count: int, dtype: torch.dtype) -> torch.Tensor:
        size = count * torch.finfo(dtype).bits // 8
        return self._buffer(slot, size)[:size].view(dtype)

    def _buffer(self, slot: str, nbytes: int) -> torch.Tensor:
        """A reused buffer of at least `nbytes`: an anonymous mapping of its own, not the C heap's.
        Freeing a heap block of a few MiB raises glibc's dynamic mmap threshold to its size, after
        which the tracer's and validation's blocks below it stay in the heap when freed, and the
        export grows past its memory bound (docs/benchmarks.md)."""
        held = getattr(self.local, slot, None)
        if held is None or held.numel() < nbytes:
            setattr(self.local, slot, None)  # the old one goes before the new one is made
            held = torch.frombuffer(mmap.mmap(-1, max(nbytes, 1)), dtype=torch.uint8)
            setattr(self.local, slot, held)
        return held
