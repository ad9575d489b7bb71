"""llamatrt: Llama-family decoders from PyTorch to verified ONNX Runtime / TensorRT engines.

import llamatrt
llamatrt.export("smollm2", "artifacts/smollm2-fp32")
with llamatrt.load("artifacts/smollm2-fp32") as llm:
    print(llm.generate("What is 2+2?", chat=True, max_new_tokens=32)[0].text)
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llamatrt.base.artifact.manifest import Manifest
    from llamatrt.runtime.llm import LLM

from llamatrt.base import __version__

__all__ = ["__version__", "export", "load"]


def load(
    artifact: str | Path,
    backend: str = "onnxruntime",
    device: str | None = None,
    verify: bool = True,
    prefix_cache_mb: int | None = None,
) -> LLM:
    """Open an exported artifact on a backend (torch | onnxruntime | tensorrt); verify=False skips
    hashing its files against the manifest; prefix_cache_mb: memory for prompt beginnings already
    computed, reused by later prompts (default 512; 0 turns it off)."""
    from llamatrt.runtime.llm import load as _load
    from llamatrt.runtime.prefix_cache import DEFAULT_PREFIX_CACHE_MB

    return _load(
        artifact, backend, device, verify, DEFAULT_PREFIX_CACHE_MB if prefix_cache_mb is None else prefix_cache_mb
    )


def export(model: Any, out: str | Path, force: bool = False, **options: Any) -> Manifest:
    """Export a checkpoint (smollm2, an HF folder, a .gguf, a transformers model) to an artifact
    folder, validated by the runtime before it replaces anything. `options` are ExportOptions'
    fields: batch_size, max_cache_len, prefill_chunk, dtype, full_logits, validate."""
    from llamatrt.exporter.export import ExportOptions
    from llamatrt.tools.pipeline import export_artifact

    return export_artifact(model, Path(out), ExportOptions(**options), force=force)
