"""A model's parameters written to a file of their own and read back through one memory map.

An export traces and validates a twin of the model (its first layers, the embedding and the head).
Held in ordinary memory, the twin's weights stay resident from the first trace to the last check,
beside what each phase brings of its own (ONNX Runtime's mapping of the written weights while
validation runs, a trace's transients). Mapped, they are pages of a file: read where a phase reads
them and given back between phases (`release`), so the export holds about one copy of the twin's
weights at a time. The map is private: a write (a quantized export's reference dequantizes its
weights in place) makes the page the process's own, and such a page is never given back.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from llamatrt.base.mapped_pages import release_clean_pages

ALIGNMENT = 64  # bytes; every tensor starts aligned for vector loads


class MappedParameters:
    """Tensors written one at a time to `path`, then read as views of one private memory map."""

    def __init__(self, path: Path, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        self.path = path
        layout: dict[str, tuple[int, torch.dtype, tuple[int, ...]]] = {}
        size = 0
        with path.open("wb") as f:
            for name, tensor in tensors:  # one made at a time: the caller's iterator reads and converts it
                size += -size % ALIGNMENT
                f.seek(size)
                data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
                f.write(data.data)
                layout[name] = (size, tensor.dtype, tuple(tensor.shape))
                size += data.nbytes
                del tensor, data
        mapped = np.memmap(path, dtype=np.uint8, mode="c") if size else np.zeros(0, np.uint8)
        self.tensors: dict[str, torch.Tensor] = {}
        for name, (offset, dtype, shape) in layout.items():
            count = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            flat = torch.from_numpy(mapped[offset : offset + count])
            self.tensors[name] = flat.view(dtype).view(shape)

    def release(self) -> int:
        """Give back the pages read since the last release (they are read from the file again when
        touched); returns the bytes of mapping released."""
        return release_clean_pages(self.path)
