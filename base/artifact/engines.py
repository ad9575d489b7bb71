"""TensorRT engines in an artifact: what `llamatrt build` and the TensorRT backend both check.

`build` compares a parsed network's IO with the manifest before it writes an engine; the backend
checks that the engines the manifest names are there, whole, and built by an engine kind it has.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

from llamatrt.base.artifact.manifest import GraphSpec, Manifest
from llamatrt.base.artifact.reader import check_file
from llamatrt.base.artifact.variants import PORTABLE
from llamatrt.base.errors import BackendUnavailable, InputError, ManifestMismatchError, ValidationError
from llamatrt.base.lazy import require_tensorrt

ENGINE_KINDS = ("tensorrt", "tensorrt-rtx")


def engine_module(kind: str, fix: str = "or use --backend onnxruntime") -> ModuleType:
    """The Python module for an engine kind, imported on first use; `fix` ends the error's hint."""
    if kind == "tensorrt":
        return require_tensorrt(fix=fix)
    if kind == "tensorrt-rtx":
        try:
            import tensorrt_rtx

            return tensorrt_rtx
        except ImportError as e:
            raise BackendUnavailable("TensorRT-RTX is not installed; pip install tensorrt-rtx-cu13") from e
    raise BackendUnavailable(f"unknown engine {kind!r}; use one of {', '.join(ENGINE_KINDS)}")


def plan_name(graph: GraphSpec, kind: str) -> str:
    return f"{graph.name}.plan" if kind == "tensorrt" else f"{graph.name}.rtx.plan"


def check_network_io(io: dict[str, list[dict[str, Any]]], graph: GraphSpec) -> None:
    """A network's (or engine's) IO, as {"inputs": [...], "outputs": [...]}, equals the manifest's."""
    expected = {"inputs": [t.to_json() for t in graph.inputs], "outputs": [t.to_json() for t in graph.outputs]}
    for side in ("inputs", "outputs"):
        got, want = io[side], expected[side]
        if got == want:
            continue
        if len(got) != len(want):
            bad: tuple[Any, Any] = (f"{len(got)} tensors", f"{len(want)} tensors")
        else:
            bad = next((a, b) for a, b in zip(got, want, strict=True) if a != b)
        raise ValidationError(
            f"{graph.path}: TensorRT sees {side[:-1]} {bad[0]}, the manifest says {bad[1]}; "
            "re-run `llamatrt export --force`"
        )


def engine_graphs(manifest: Manifest) -> dict[str, GraphSpec]:
    """The graph variants `build` makes engines of: the portable ones (explicit attention; quantized
    weights as DequantizeLinear blocks, written only in forms TensorRT takes), as the TensorRT
    backend declares (`TensorRTBackend.attention_forms`)."""
    return {name: g for name, g in manifest.graphs.items() if g.attention == PORTABLE.name}


def require_engine_graphs(manifest: Manifest, folder: Path) -> dict[str, GraphSpec]:
    """The graphs TensorRT can take, or a one-line InputError saying why there are none (an
    artifact with ONNX Runtime's graphs only: MatMulNBits, Q4_1 blocks) and how to export some."""
    graphs = engine_graphs(manifest)
    if not graphs:
        why = str(manifest.quantization.get("portable", "")).removeprefix("none: ") if manifest.quantization else ""
        raise InputError(
            f"{folder} has no graph TensorRT can take ({why or 'ONNX Runtime graphs only'}); export one with "
            "`llamatrt export --dtype fp16`, or `--quantize int4 --block-size 64` from a float checkpoint"
        )
    return graphs


def check_engines(manifest: Manifest, folder: Path, verify: bool = True) -> dict[str, Path]:
    """The engine files the manifest names exist inside the artifact, whole; returns graph -> plan path."""
    require_engine_graphs(manifest, folder)
    fix = f"re-run `llamatrt build {folder} --force`"
    entries = manifest.engines.get("graphs", {})
    if set(entries) != set(engine_graphs(manifest)):
        raise ManifestMismatchError(
            f"{folder} has no TensorRT engines for its graphs; run `llamatrt build {folder}` first"
        )
    return {
        name: check_file(folder, entry["path"], entry["bytes"], entry.get("sha256", ""), f"{name} engine", verify, fix)
        for name, entry in entries.items()
    }
