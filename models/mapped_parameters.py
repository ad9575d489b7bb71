"""A model's parameters written to a file of their own and read back through one memory map.

An export traces and validates a twin of the model (its first layers, the embedding and the head).
Held in ordinary memory, the twin's weights stay resident from the first trace to the last check,
beside what each phase brings of its own (ONNX Runtime's mapping of the written weights while
validation runs, a trace's transients). Mapped, they are pages of a file: read where a phase reads
them and given back between phases (`release`), so the export holds about one copy of the twin's
weights at a time. The map is private: a write through a tensor makes its page the process's own,
never given back; new values (a quantized export's reference, dequantized) go through the file
instead (`overwrite`), so their pages stay the file's.
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
        self.offsets = {name: offset for name, (offset, _, _) in layout.items()}
        self.tensors: dict[str, torch.Tensor] = {}
        for name, (offset, dtype, shape) in layout.items():
            count = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            flat = torch.from_numpy(mapped[offset : offset + count])
            self.tensors[name] = flat.view(dtype).view(shape)

    def release(self) -> int:
        """Give back the pages read since the last release (they are read from the file again when
        touched); returns the bytes of mapping released."""
        return release_clean_pages(self.path)

    def overwrite(self, values: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Give tensors new values (of their shape and dtype; made one at a time by the iterator)
        through the file, so their pages stay the file's and can still be given back: each value is
        written to the file, then the map's pages are dropped and the next read faults the new
        values in. Where the map holds pages of its own (written through a tensor) or pages cannot
        be dropped here, the tensors are written in place as well, so they read the new values
        either way."""
        written = []
        with self.path.open("r+b") as f:
            for name, value in values:
                tensor = self.tensors[name]
                if value.shape != tensor.shape or value.dtype != tensor.dtype:
                    raise ValueError(
                        f"{name}: {value.dtype} {tuple(value.shape)} is not the mapped "
                        f"{tensor.dtype} {tuple(tensor.shape)}"
                    )
                f.seek(self.offsets[name])
                f.write(value.contiguous().reshape(-1).view(torch.uint8).numpy().data)
                written.append(name)
        if self.release() == 0:
            with torch.no_grad(), self.path.open("rb") as f:
                for name in written:  # read back what was written, one tensor at a time
                    tensor = self.tensors[name]
                    f.seek(self.offsets[name])
                    data = bytearray(f.read(tensor.numel() * tensor.element_size()))
                    tensor.copy_(torch.frombuffer(data, dtype=tensor.dtype).view(tensor.shape))
