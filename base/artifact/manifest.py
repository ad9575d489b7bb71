"""The artifact's manifest: every graph variant's IO (names, shapes, dtypes), sizes, hashes,
precision, tokenizer. The runtime reads only this file, never the HF config.

Its JSON form is checked against `schema.MANIFEST_SCHEMA` before anything is built from it, so
the dataclasses below can trust their fields.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamatrt.base.artifact import names
from llamatrt.base.artifact.schema import FORMAT_VERSION, REEXPORT, check_manifest_json
from llamatrt.base.artifact.variants import ATTENTION_FORMS, AttentionForm
from llamatrt.base.config import LlamaConfig
from llamatrt.base.errors import ManifestMismatchError
from llamatrt.base.termination import removed_on_termination

__all__ = [
    "FORMAT_VERSION",
    "GraphSpec",
    "Manifest",
    "TensorSpec",
    "contract_io",
    "load_manifest_json",
    "write_manifest",
]


@dataclass(frozen=True)
class TensorSpec:
    name: str  # "past_key_values.3.key"
    shape: tuple[int | str, ...]  # a dim is a size, or a name ("batch", "tokens") a graph leaves open
    dtype: str  # "float16", "int64"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> TensorSpec:
        return cls(raw["name"], tuple(raw["shape"]), raw["dtype"])


@dataclass(frozen=True)
class GraphSpec:
    """One graph variant: what it is (role, attention form, weight format) and its IO. Which backend
    runs it is the backend's to say (`Backend.runs`), never the artifact's."""

    name: str  # unique in the artifact: "prefill", "decode", "model.ort"
    role: str  # "prefill" | "decode" | "any" (one graph with open batch and tokens dims serves both)
    path: str  # relative to the artifact folder
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    attention: str = "portable"  # a name in variants.ATTENTION_FORMS
    weights: str = "float32"  # the weight format its initializers are stored in
    bytes: int = 0  # size of the .onnx file
    sha256: str = ""

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)

    @functools.cached_property
    def batch(self) -> int | None:
        """Rows per call; None where the graph takes any number."""
        dim = self.input(names.INPUT_IDS).shape[0]
        return dim if isinstance(dim, int) else None

    @functools.cached_property
    def seq_len(self) -> int | None:
        """Tokens per call; None where the graph takes any number."""
        dim = self.input(names.INPUT_IDS).shape[1]
        return dim if isinstance(dim, int) else None

    def serves(self, role: str, batch: int, seq: int | None = None) -> bool:
        """Whether a call of `role` with `batch` rows (and `seq` tokens, if given) can run on this graph."""
        return (
            self.role in (role, "any") and self.batch in (batch, None) and (seq is None or self.seq_len in (seq, None))
        )

    @functools.cached_property
    def packs_tokens(self) -> bool:
        """Rows of different token counts share one call (names.PACKING_INPUTS): decode rows beside a
        prompt's slice, each computing only its real tokens."""
        return names.PACKED_TOKENS in self.input_names

    @property
    def full_logits(self) -> bool:
        """Logits for every position ([B, S, V]) rather than each row's last ([B, V])."""
        return len(self.outputs[0].shape) == 3

    @property
    def attention_form(self) -> AttentionForm:
        return ATTENTION_FORMS[self.attention]

    @functools.cached_property
    def input_names(self) -> frozenset[str]:
        return frozenset(t.name for t in self.inputs)

    @functools.cached_property
    def step_inputs(self) -> tuple[TensorSpec, ...]:
        """The inputs other than the past buffers: what changes from call to call."""
        return tuple(t for t in self.inputs if not names.is_cache(t.name))

    @functools.cached_property
    def cache_inputs(self) -> tuple[str, ...]:
        """The past buffers' input names, in graph order (each call feeds them all)."""
        return tuple(t.name for t in self.inputs if names.is_cache(t.name))

    @functools.cached_property
    def aliases(self) -> tuple[tuple[str, str], ...]:
        """(present output, the past input it updates) of each cache tensor: a backend that writes the
        cache in place returns the past buffer as the present. Worked out once: every step reads it."""
        return tuple((t.name, names.past_name_for(t.name)) for t in self.outputs[1:])

    def to_json(self) -> dict[str, Any]:
        form = self.attention_form
        return {
            "name": self.name,
            "role": self.role,
            "path": self.path,
            "bytes": self.bytes,
            "sha256": self.sha256,
            "attention": self.attention,
            "weights": self.weights,
            **({"requires": {"onnxruntime": ".".join(map(str, form.min_onnxruntime))}} if form.min_onnxruntime else {}),
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> GraphSpec:
        return cls(
            raw["name"],
            raw["role"],
            raw["path"],
            tuple(TensorSpec.from_json(t) for t in raw["inputs"]),
            tuple(TensorSpec.from_json(t) for t in raw["outputs"]),
            raw["attention"],
            raw["weights"],
            raw["bytes"],
            raw["sha256"],
        )


@dataclass(frozen=True)
class Manifest:
    format_version: int
    config: LlamaConfig
    source: str  # the checkpoint the artifact was exported from
    dtype: str  # compute precision: a name in precision.PRECISIONS
    batch_size: int
    max_cache_len: int
    prefill_chunk: int
    opset: int
    kv_write: str  # "tensor_scatter"
    weights_file: str
    weights_bytes: int
    weights_sha256: str
    graphs: Mapping[str, GraphSpec]  # name -> variant, in export order
    weights_map: Mapping[str, Any] = field(default_factory=dict)  # param -> offset/shape/transposed/dtype
    tokenizer: Mapping[str, Any] = field(default_factory=dict)  # dir, eos_token_ids, pad_token_id, chat_template
    validation: Mapping[str, Any] = field(default_factory=dict)
    engines: Mapping[str, Any] = field(default_factory=dict)  # filled by `llamatrt build`
    versions: Mapping[str, str] = field(default_factory=dict)
    # weight-only quantization: scheme, block size, accuracy_level, and per parameter where its
    # blocks came from ("gguf Q4_1": carried over, "rtn" or "gptq": quantized at export); {} for float weights
    quantization: Mapping[str, Any] = field(default_factory=dict)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return tuple(self.tokenizer.get("eos_token_ids", ()))

    @property
    def cache_shape(self) -> tuple[int, int, int, int]:
        """(batch, num_kv_heads, max_cache_len, head_dim) of every past/present tensor."""
        return (self.batch_size, self.config.num_kv_heads, self.max_cache_len, self.config.head_dim)

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
            "graphs": [g.to_json() for g in self.graphs.values()],
            "tokenizer": dict(self.tokenizer),
            "validation": dict(self.validation),
            "engines": dict(self.engines),
            "versions": dict(self.versions),
            **({"quantization": dict(self.quantization)} if self.quantization else {}),
        }

    @classmethod
    def from_json(cls, raw: Any) -> Manifest:
        """Check `raw` against the schema (one line naming the field otherwise), then build."""
        check_manifest_json(raw)
        weights = raw["weights"]
        graphs = [GraphSpec.from_json(g) for g in raw["graphs"]]
        return cls(
            format_version=raw["format_version"],
            config=LlamaConfig.from_dict(raw["config"]),
            source=raw["source"],
            dtype=raw["dtype"],
            batch_size=raw["batch_size"],
            max_cache_len=raw["max_cache_len"],
            prefill_chunk=raw["prefill_chunk"],
            opset=raw["opset"],
            kv_write=raw["kv_write"],
            weights_file=weights["file"],
            weights_bytes=weights["bytes"],
            weights_sha256=weights["sha256"],
            weights_map=weights.get("tensors", {}),
            graphs={g.name: g for g in graphs},
            tokenizer=raw.get("tokenizer", {}),
            validation=raw.get("validation", {}),
            engines=raw.get("engines", {}),
            versions=raw.get("versions", {}),
            quantization=raw.get("quantization", {}),
        )


def contract_io(
    config: LlamaConfig,
    dtype: str,
    batch: int | str,
    seq: int | str,
    max_cache_len: int,
    full_logits: bool = False,
    packs_tokens: bool = False,
) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """(inputs, outputs) of a graph of `batch` rows and `seq` tokens per call (either may be a name
    the graph leaves open): DESIGN.md §1. `packs_tokens`: with the inputs that let rows of different
    token counts share a call (names.PACKING_INPUTS)."""
    kv = (batch, config.num_kv_heads, max_cache_len, config.head_dim)
    logits = (batch, seq, config.vocab_size) if full_logits else (batch, config.vocab_size)
    inputs = (
        TensorSpec(names.INPUT_IDS, (batch, seq), "int64"),
        TensorSpec(names.POSITION_IDS, (batch, seq), "int64"),
        TensorSpec(names.CACHE_POSITION, (batch, seq), "int64"),
        TensorSpec(names.ATTENTION_MASK, (batch, max_cache_len), "int64"),
        *(TensorSpec(n, kv, dtype) for n in names.cache_names(config.num_layers, "past")),
    )
    if packs_tokens:
        inputs += (
            TensorSpec(names.PACKED_TOKENS, ("packed",), "int64"),
            TensorSpec(names.PADDED_TOKENS, (batch, seq), "int64"),
            TensorSpec(names.QUERY_LENGTHS, (batch,), "int64"),
        )
    outputs = (
        TensorSpec(names.LOGITS, logits, "float32"),
        *(TensorSpec(n, kv, dtype) for n in names.cache_names(config.num_layers, "present")),
    )
    return inputs, outputs


def write_manifest(manifest: Manifest, folder: Path) -> None:
    """Atomic: a reader never sees half a manifest."""
    tmp = Path(folder) / (names.MANIFEST + ".tmp")
    with removed_on_termination(tmp):
        tmp.write_text(json.dumps(manifest.to_json(), indent=2) + "\n")
        os.replace(tmp, Path(folder) / names.MANIFEST)


def load_manifest_json(folder: Path) -> Any:
    """The manifest's raw JSON, with one-line errors for a missing or unreadable file."""
    folder = Path(folder)
    path = folder / names.MANIFEST
    if not folder.exists():
        raise ManifestMismatchError(
            f"artifact {folder} does not exist; make it with `llamatrt export --model MODEL --out {folder}`"
        )
    if not folder.is_dir():
        raise ManifestMismatchError(
            f"{folder} is a file, not an artifact folder; pass the folder `llamatrt export` made"
        )
    if not path.is_file():
        raise ManifestMismatchError(
            f"{folder} has no {names.MANIFEST}, so it is not an artifact; "
            f"make one with `llamatrt export --model MODEL --out {folder}`"
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestMismatchError(f"{path} is not valid JSON ({e}); {REEXPORT}") from e
