"""The artifact's manifest: every graph's IO (names, shapes, dtypes), sizes, precision, tokenizer.

The runtime reads only this file, never the HF config. It refuses a manifest of another format
version, or one whose files do not match it, with a message that says what to re-run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from llamatrt.errors import ManifestMismatchError
from llamatrt.exporter import ort_attention
from llamatrt.models.config import LlamaConfig
from llamatrt.models.kv_cache import cache_names

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
DTYPES = ("float32", "float16", "bfloat16")
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int64": torch.int64}


def dtype_name(dtype: torch.dtype) -> str:
    """The manifest's name for a torch dtype ("float16", ...)."""
    return next(name for name, value in TORCH_DTYPES.items() if value == dtype)


DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", **{d: d for d in DTYPES}}


@dataclass(frozen=True)
class TensorSpec:
    name: str  # "past_key_values.3.key"
    shape: tuple[int, ...]  # static
    dtype: str  # "float16", "int64"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class GraphSpec:
    name: str  # "prefill" | "decode"
    path: str  # relative to the artifact folder
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    bytes: int = 0  # size of the .onnx file, to catch truncation
    # The same graph with ONNX Runtime's fused GroupQueryAttention (exporter.ort_attention), which the
    # ONNX Runtime CPU backend runs; "" where not exported (fp16/bf16 artifacts).
    ort_path: str = ""
    ort_bytes: int = 0

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)

    @property
    def seq_len(self) -> int:
        return self.input("input_ids").shape[1]


@dataclass(frozen=True)
class Manifest:
    format_version: int
    config: LlamaConfig
    source: str  # the checkpoint the artifact was exported from
    dtype: str
    batch_size: int
    max_cache_len: int
    prefill_chunk: int
    opset: int
    kv_write: str  # "tensor_scatter"
    weights_file: str
    weights_bytes: int
    weights_sha256: str
    graphs: Mapping[str, GraphSpec]
    weights_map: Mapping[str, Any] = field(default_factory=dict)  # param -> offset/shape/transposed
    tokenizer: Mapping[str, Any] = field(default_factory=dict)  # dir, eos_token_ids, pad_token_id, chat_template
    validation: Mapping[str, Any] = field(default_factory=dict)
    engines: Mapping[str, Any] = field(default_factory=dict)  # filled by `llamatrt build`
    versions: Mapping[str, str] = field(default_factory=dict)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return tuple(self.tokenizer.get("eos_token_ids", ()))

    @property
    def cache_spec(self) -> TensorSpec:
        return self.graphs["decode"].input(cache_names(self.config.num_layers)[0])

    def with_updates(self, **changes: Any) -> Manifest:
        return replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "config": self.config.to_dict(),
            "source": self.source,
            "dtype": self.dtype,
            "batch_size": self.batch_size,
            "max_cache_len": self.max_cache_len,
            "prefill_chunk": self.prefill_chunk,
            "opset": self.opset,
            "kv_write": self.kv_write,
            "weights": {
                "file": self.weights_file,
                "bytes": self.weights_bytes,
                "sha256": self.weights_sha256,
                "tensors": dict(self.weights_map),
            },
            "graphs": {
                name: {
                    "path": g.path,
                    "bytes": g.bytes,
                    "inputs": [t.to_json() for t in g.inputs],
                    "outputs": [t.to_json() for t in g.outputs],
                    **(
                        {"onnxruntime": {"path": g.ort_path, "bytes": g.ort_bytes, **ort_attention.GRAPH_INFO}}
                        if g.ort_path
                        else {}
                    ),
                }
                for name, g in self.graphs.items()
            },
            "tokenizer": dict(self.tokenizer),
            "validation": dict(self.validation),
            "engines": dict(self.engines),
            "versions": dict(self.versions),
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Manifest:
        version = raw.get("format_version")
        if version != FORMAT_VERSION:
            raise ManifestMismatchError(
                f"manifest format_version={version!r}, this llamatrt reads version {FORMAT_VERSION}; "
                "re-run `llamatrt export` with this llamatrt"
            )
        try:
            graphs = {
                name: GraphSpec(
                    name,
                    g["path"],
                    tuple(TensorSpec(t["name"], tuple(t["shape"]), t["dtype"]) for t in g["inputs"]),
                    tuple(TensorSpec(t["name"], tuple(t["shape"]), t["dtype"]) for t in g["outputs"]),
                    int(g.get("bytes", 0)),
                    g.get("onnxruntime", {}).get("path", ""),
                    int(g.get("onnxruntime", {}).get("bytes", 0)),
                )
                for name, g in raw["graphs"].items()
            }
            weights = raw["weights"]
            return cls(
                format_version=version,
                config=LlamaConfig.from_dict(raw["config"]),
                source=raw["source"],
                dtype=raw["dtype"],
                batch_size=int(raw["batch_size"]),
                max_cache_len=int(raw["max_cache_len"]),
                prefill_chunk=int(raw["prefill_chunk"]),
                opset=int(raw["opset"]),
                kv_write=raw["kv_write"],
                weights_file=weights["file"],
                weights_bytes=int(weights["bytes"]),
                weights_sha256=weights["sha256"],
                weights_map=weights.get("tensors", {}),
                graphs=graphs,
                tokenizer=raw.get("tokenizer", {}),
                validation=raw.get("validation", {}),
                engines=raw.get("engines", {}),
                versions=raw.get("versions", {}),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ManifestMismatchError(f"manifest is malformed (missing or bad {e}); re-run `llamatrt export`") from e


def write_manifest(manifest: Manifest, folder: Path) -> None:
    """Atomic: a reader never sees half a manifest."""
    tmp = folder / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(manifest.to_json(), indent=2) + "\n")
    os.replace(tmp, folder / MANIFEST_NAME)


def read_manifest(folder: Path) -> Manifest:
    """Load and check that the files the manifest names exist with the recorded sizes."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise ManifestMismatchError(f"{folder} has no {MANIFEST_NAME}; is it an artifact? run `llamatrt export` first")
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ManifestMismatchError(f"{path} is not valid JSON ({e}); re-run `llamatrt export --force`") from e
    manifest = Manifest.from_json(raw)
    check_files(manifest, Path(folder))
    return manifest


def check_files(manifest: Manifest, folder: Path) -> None:
    expected = [(manifest.weights_file, manifest.weights_bytes)]
    expected += [(g.path, g.bytes) for g in manifest.graphs.values()]
    expected += [(g.ort_path, g.ort_bytes) for g in manifest.graphs.values() if g.ort_path]
    for rel, size in expected:
        f = folder / rel
        if not f.is_file():
            raise ManifestMismatchError(f"{f} is missing; re-run `llamatrt export --force`")
        if size and f.stat().st_size != size:
            raise ManifestMismatchError(
                f"{f} has {f.stat().st_size} bytes, the manifest says {size} (truncated or replaced); "
                "re-run `llamatrt export --force`"
            )
