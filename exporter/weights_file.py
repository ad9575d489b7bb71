"""One external-data file for both graphs: each distinct tensor stored once, matched by content.

The exporter may rename initializers, so tensors are keyed by a hash of their bytes (the length is
checked on lookup). Disk use is then ~1x the weights, not 2x.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from llamatrt.base.artifact.precision import dtype_name
from llamatrt.base.errors import ValidationError

if TYPE_CHECKING:
    import onnx_ir as ir

ALIGNMENT = 64  # bytes; keeps every tensor aligned for vector loads when memory-mapped
INLINE_LIMIT = 1024  # smaller integer tensors (shape constants) stay inside the .onnx file


@dataclass(frozen=True)
class WrittenWeights:
    bytes: int
    sha256: str
    offsets: dict[str, tuple[int, int]]  # sha1 of a tensor's bytes -> (offset, length) in the file


def write_shared_weights(models: Sequence[ir.Model], path: Path) -> WrittenWeights:
    """Move every large initializer of `models` into `path`, each distinct tensor once."""
    import onnx_ir as ir

    offsets: dict[str, tuple[int, int]] = {}
    digest = hashlib.sha256()
    size = 0
    with path.open("wb") as f:
        for model in models:
            for value in model.graph.initializers.values():
                tensor = value.const_value
                if tensor is None or (tensor.nbytes < INLINE_LIMIT and not tensor.dtype.is_floating_point()):
                    continue  # every float tensor goes out, so parameters are all found in the file
                data = tensor.tobytes()
                key = hashlib.sha1(data).hexdigest()
                if key not in offsets:
                    pad = -size % ALIGNMENT
                    f.write(b"\0" * pad)
                    digest.update(b"\0" * pad)
                    offsets[key] = (size + pad, len(data))
                    f.write(data)
                    digest.update(data)
                    size += pad + len(data)
                offset, length = offsets[key]
                value.const_value = ir.ExternalTensor(
                    path.name,
                    offset,
                    length,
                    tensor.dtype,
                    shape=ir.Shape(tensor.shape.numpy()),
                    name=value.name or "",
                    base_dir=path.parent,
                )
    return WrittenWeights(size, digest.hexdigest(), offsets)


def parameter_locations(state_dict: Mapping[str, torch.Tensor], written: WrittenWeights) -> dict[str, dict[str, Any]]:
    """Where each model parameter lies in the weights file, found by content: the exporter renames
    and pre-transposes weights, and in fp16/bf16 graphs folds the fp32 upcast of RMSNorm weights
    (an exact conversion, recorded as the stored dtype). Lets the PyTorch backend run from the
    artifact's own weights; a parameter found nowhere fails the export."""
    locations: dict[str, dict[str, Any]] = {}
    for name, tensor in state_dict.items():
        for candidate, transposed in _stored_forms(tensor):
            data = candidate.contiguous().view(torch.uint8).numpy().tobytes()
            hit = written.offsets.get(hashlib.sha1(data).hexdigest())
            if hit is not None and hit[1] == len(data):
                locations[name] = {
                    "offset": hit[0],
                    "shape": list(candidate.shape),
                    "transposed": transposed,
                    "dtype": dtype_name(candidate.dtype),
                }
                break
        else:
            raise ValidationError(
                f"parameter {name!r} is not in the exported weights file in any known form; "
                "please report with the model config"
            )
    return locations


def _stored_forms(tensor: torch.Tensor) -> list[tuple[torch.Tensor, bool]]:
    """(form, transposed) in which the exporter may have stored a parameter."""
    forms = [(tensor, False)] + ([(tensor.t(), True)] if tensor.dim() == 2 else [])
    if tensor.dtype != torch.float32:
        forms += [(form.float(), transposed) for form, transposed in forms]
    return forms


def save_graph(model: ir.Model, path: Path) -> int:
    """Write the .onnx (external references kept as they are); returns its size."""
    import onnx_ir as ir

    ir.save(model, path)
    return path.stat().st_size
