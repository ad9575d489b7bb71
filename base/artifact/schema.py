"""The manifest's JSON schema.

An artifact is untrusted input: a manifest with `graphs` as a string, `eos_token_ids` as a string
(which would silently disable EOS) or a cache of 10^12 slots must fail when the artifact is opened,
in one line that names the field. jsonschema checks the types and ranges here; what a schema cannot
say (every graph's IO is the one DESIGN.md §1 derives from the config) is `reader.check_contract`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llamatrt.base.artifact import names
from llamatrt.base.artifact.precision import PRECISIONS, TENSOR_DTYPES, WEIGHT_FORMATS
from llamatrt.base.artifact.variants import ATTENTION_FORMS, ROLES
from llamatrt.base.errors import ManifestMismatchError

# 2: graphs are a list of variants described by data (role, batch, attention form, ...), each with a hash.
# 3: cache_position is [B, S] (each row writes at its own slots: in-flight batching); a graph's batch
#    and tokens-per-call dims may be symbolic ("batch", "tokens") where one graph serves every shape.
# 4: a graph says what it is, not who may run it (each backend declares what it runs): no `backends`.
#    Version 3 manifests still open; their `backends` lists are read past.
FORMAT_VERSION = 4
READABLE_VERSIONS = (3, 4)
REEXPORT = "re-run `llamatrt export --force` with this llamatrt"
MAX_DIM = 1 << 24  # no real shape comes near; 10^12 is a tampered or corrupt manifest
_COUNT = {"type": "integer", "minimum": 1, "maximum": MAX_DIM}
SYMBOLIC_DIMS = ("batch", "tokens", "packed")  # open dims: rows per call, tokens per row, real tokens in all
_DIM = {"anyOf": [_COUNT, {"enum": list(SYMBOLIC_DIMS)}]}
_SIZE = {"type": "integer", "minimum": 0}
_NAME = {"type": "string", "minLength": 1, "maxLength": 255}
_SHA256 = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
_TENSOR = {
    "type": "object",
    "required": ["name", "shape", "dtype"],
    "properties": {
        "name": _NAME,
        "shape": {"type": "array", "items": _DIM, "minItems": 1, "maxItems": 4},
        "dtype": {"enum": sorted(TENSOR_DTYPES)},
    },
}
_CONFIG_SIZES = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
)
_GRAPH = {
    "type": "object",
    "required": ["name", "role", "path", "bytes", "sha256", "attention", "weights", "inputs", "outputs"],
    "properties": {
        "name": _NAME,
        "role": {"enum": [*ROLES, "any"]},
        "path": _NAME,
        "bytes": _SIZE,
        "sha256": _SHA256,
        "attention": {"enum": sorted(ATTENTION_FORMS)},
        "weights": {"enum": [*sorted(PRECISIONS), *WEIGHT_FORMATS]},
        "backends": {"type": "array", "items": _NAME},  # version 3 only, read past
        "inputs": {"type": "array", "items": _TENSOR, "minItems": len(names.SMALL_INPUTS) + 2},
        "outputs": {"type": "array", "items": _TENSOR, "minItems": 3},
    },
}
MANIFEST_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": [
        "format_version",
        "config",
        "source",
        "dtype",
        "batch_size",
        "max_cache_len",
        "prefill_chunk",
        "opset",
        "kv_write",
        "weights",
        "graphs",
    ],
    "properties": {
        "format_version": {"type": "integer"},
        "config": {
            "type": "object",
            "required": [*_CONFIG_SIZES, "rms_norm_eps", "rope_theta", "tie_word_embeddings"],
            "properties": {
                **dict.fromkeys((*_CONFIG_SIZES, "max_position_embeddings"), _COUNT),
                "rms_norm_eps": {"type": "number", "exclusiveMinimum": 0},
                "rope_theta": {"type": "number", "exclusiveMinimum": 0},
                "rope_scaling": {"type": ["object", "null"]},
                "tie_word_embeddings": {"type": "boolean"},
                "attention_bias": {"type": "boolean"},
                "mlp_bias": {"type": "boolean"},
            },
        },
        "source": {"type": "string"},
        "dtype": {"enum": sorted(PRECISIONS)},
        "batch_size": _COUNT,
        "max_cache_len": _COUNT,
        "prefill_chunk": _COUNT,
        "opset": {"type": "integer", "minimum": 1},
        "kv_write": {"const": "tensor_scatter"},
        "weights": {
            "type": "object",
            "required": ["file", "bytes", "sha256"],
            "properties": {
                "file": _NAME,
                "bytes": _SIZE,
                "sha256": _SHA256,
                "tensors": {
                    "type": "object",
                    "additionalProperties": {
                        "type": "object",
                        "required": ["offset", "shape", "transposed"],
                        "properties": {
                            "offset": _SIZE,
                            "shape": {"type": "array", "items": _COUNT, "maxItems": 2},
                            "transposed": {"type": "boolean"},
                            "dtype": {"enum": sorted(PRECISIONS)},
                        },
                    },
                },
            },
        },
        "graphs": {"type": "array", "items": _GRAPH, "minItems": 1},
        "tokenizer": {
            "type": "object",
            "properties": {
                "dir": _NAME,
                "eos_token_ids": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                "pad_token_id": {"type": ["integer", "null"], "minimum": 0},
                "bos_token_id": {"type": ["integer", "null"], "minimum": 0},
                "chat_template": {"type": ["string", "null"]},
                "special_tokens": {"type": "object", "additionalProperties": {"type": "string"}},
                "clean_up_tokenization_spaces": {"type": "boolean"},
            },
        },
        "validation": {"type": "object"},
        "engines": {"type": "object"},
        "versions": {"type": "object"},
        "quantization": {
            "type": "object",
            "required": ["scheme", "block_size", "accuracy_level", "tensors"],
            "properties": {
                "scheme": {"enum": list(WEIGHT_FORMATS)},
                "block_size": {"type": "integer", "minimum": 16},
                "accuracy_level": {"type": "integer", "minimum": 0, "maximum": 4},
                # what runs the 4-bit products: MatMulNBits, or llamatrt's MatMulInt4 (base.custom_ops)
                "int4_kernel": {"enum": ["onnxruntime", "llamatrt"]},
                # MatMulInt4's activation digits, 24 or 16 bits (absent: 24, as written before 16 existed)
                "int4_activation_bits": {"type": "array", "items": {"enum": [16, 24]}},
                "tensors": {"type": "object", "additionalProperties": {"type": "string"}},
                # how the portable graphs (TensorRT's) hold the weights, or why there are none
                "portable": {"type": "string"},
                # the text GPTQ's blocks were calibrated on (export --calibration): its name and tokens
                "calibration": {
                    "type": "object",
                    "required": ["text", "tokens"],
                    "properties": {"text": {"type": "string"}, "tokens": {"type": "integer", "minimum": 1}},
                },
            },
        },
    },
}


def _where(path: Any) -> str:
    """jsonschema's deque path -> `graphs[2].inputs[0].shape`."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "the top level"


def check_manifest_json(raw: Any) -> None:
    """The format version first (an old artifact is told to re-export), then the schema."""
    version = raw.get("format_version") if isinstance(raw, Mapping) else None
    if version not in READABLE_VERSIONS:
        raise ManifestMismatchError(
            f"manifest format_version={version!r}, this llamatrt reads version {FORMAT_VERSION}; {REEXPORT}"
        )
    import jsonschema

    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(MANIFEST_SCHEMA).iter_errors(raw))
    if error is not None:
        message = error.message if len(error.message) <= 160 else error.message[:157] + "..."
        raise ManifestMismatchError(f"manifest field {_where(error.absolute_path)} is invalid: {message}; {REEXPORT}")
