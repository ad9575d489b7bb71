"""One external-data file for both graphs: each distinct tensor stored once, matched by content.

The exporter may rename initializers, so tensors are keyed by dtype, shape and a hash of their
bytes. Disk use is then ~1x the weights, not 2x.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnx_ir as ir

ALIGNMENT = 64  # bytes; keeps every tensor aligned for vector loads when memory-mapped
INLINE_LIMIT = 1024  # smaller tensors (shape constants) stay inside the .onnx file


def write_shared_weights(
    models: Sequence[ir.Model], path: Path, progress: Callable[[int], None] | None = None
) -> tuple[int, str]:
    """Move every large initializer of `models` into `path` (deduplicated). Returns (bytes, sha256)."""
    import onnx_ir as ir

    offsets: dict[tuple[str, tuple[int, ...], str], tuple[int, int]] = {}
    digest = hashlib.sha256()
    size = 0
    with path.open("wb") as f:
        for model in models:
            for value in model.graph.initializers.values():
                tensor = value.const_value
                if tensor is None or tensor.nbytes < INLINE_LIMIT:
                    continue
                data = tensor.tobytes()
                key = (str(tensor.dtype), tuple(tensor.shape), hashlib.sha1(data).hexdigest())
                if key not in offsets:
                    pad = -size % ALIGNMENT
                    f.write(b"\0" * pad)
                    digest.update(b"\0" * pad)
                    offsets[key] = (size + pad, len(data))
                    f.write(data)
                    digest.update(data)
                    size += pad + len(data)
                    if progress:
                        progress(len(data))
                offset, length = offsets[key]
                value.const_value = ir.ExternalTensor(
                    path.name, offset, length, tensor.dtype,
                    shape=tensor.shape, name=value.name or "", base_dir=path.parent,
                )  # fmt: skip
    return size, digest.hexdigest()


def save_graph(model: ir.Model, path: Path) -> int:
    """Write the .onnx (external references kept as they are); returns its size."""
    import onnx_ir as ir

    ir.save(model, path)
    return path.stat().st_size
