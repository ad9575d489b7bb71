"""The backends, listed once: the CLI's choices, `open_backend`, and the conformance test read this.

Importing it costs nothing (no torch, no ONNX Runtime): a backend's module is imported when it is
opened. Adding a backend is one entry here and one module with a `Backend` subclass.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llamatrt.base.errors import InputError

if TYPE_CHECKING:
    from llamatrt.runtime.backend import Backend


@dataclass(frozen=True)
class BackendInfo:
    name: str
    target: str  # "module:Class"
    default_device: str
    aliases: tuple[str, ...]
    summary: str


BACKENDS = {
    b.name: b
    for b in (
        BackendInfo(
            "torch",
            "llamatrt.runtime.torch_backend:TorchBackend",
            "cpu",
            ("pytorch",),
            "PyTorch StaticLlama on the artifact's weights: the reference, any machine",
        ),
        BackendInfo(
            "onnxruntime",
            "llamatrt.runtime.ort_backend:OrtBackend",
            "cpu",
            ("ort",),
            "ONNX Runtime CPU (CUDA with onnxruntime-gpu and --device cuda)",
        ),
        BackendInfo(
            "tensorrt",
            "llamatrt.runtime.trt_backend:TensorRTBackend",
            "cuda",
            ("trt",),
            "TensorRT engines made by `llamatrt build` (GPU)",
        ),
    )
}
ALIASES = {alias: b.name for b in BACKENDS.values() for alias in b.aliases}
DEFAULT_BACKEND = "onnxruntime"


def backend_choices() -> list[str]:
    """Every name the CLI accepts: the backends, then their aliases."""
    return [*BACKENDS, *ALIASES]


def canonical_backend_name(name: str) -> str:
    name = ALIASES.get(name, name)
    if name not in BACKENDS:
        raise InputError(f"unknown backend {name!r}; use one of {', '.join(BACKENDS)}")
    return name


def backend_class(name: str) -> type[Backend]:
    module, _, cls = BACKENDS[canonical_backend_name(name)].target.partition(":")
    return getattr(importlib.import_module(module), cls)  # type: ignore[no-any-return]


def open_backend(
    artifact: str | Path, kind: str = DEFAULT_BACKEND, device: str | None = None, **options: Any
) -> Backend:
    """Read and check the artifact (llamatrt.base.artifact.reader), then open the named backend on it.
    `options` go to the backend: `verify=False` skips hashing the files, `check_feeds=False` the
    per-call feed check."""
    from llamatrt.base.artifact.reader import read_manifest

    info = BACKENDS[canonical_backend_name(kind)]
    folder = Path(artifact)
    cls = backend_class(info.name)
    manifest = read_manifest(folder, verify=options.pop("verify", True), graph_files=cls.reads_graph_files)
    return cls(folder, manifest, device or info.default_device, **options)
