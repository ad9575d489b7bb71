"""Export validation: a freshly written artifact is checked the way users will run it.

Every attention form ONNX Runtime CPU can run is opened through OrtBackend (IO binding, the cache
updated in place, the generation loop's own feeds) and compared with the PyTorch backend running
the exporter's StaticLlama: a chunked prefill of a fixed prompt plus teacher-forced decode steps
through the loop's `score`, and one call of every other prefill variant on a row of the cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from llamatrt.artifact import names
from llamatrt.artifact.feeds import fixed_prompt, graph_feeds
from llamatrt.artifact.manifest import Manifest
from llamatrt.artifact.precision import PRECISIONS
from llamatrt.errors import ValidationError
from llamatrt.models.llama import StaticLlama
from llamatrt.runtime.backend import Backend
from llamatrt.runtime.generator import Generator
from llamatrt.runtime.ort_backend import OrtBackend
from llamatrt.runtime.torch_backend import TorchBackend

DECODE_STEPS = 4  # teacher-forced decode calls after the prefill


def _loop_error(candidate: Backend, reference: Backend) -> float:
    """Max |logits| difference over a full-chunk prefill and DECODE_STEPS teacher-forced steps."""
    m = candidate.manifest
    prompts = fixed_prompt(m.batch_size, candidate.graph("prefill").seq_len, m.config.vocab_size).tolist()
    forced = fixed_prompt(m.batch_size, DECODE_STEPS + 5, m.config.vocab_size)[:, 5:].tolist()
    got, want = Generator(candidate).score(prompts, forced), Generator(reference).score(prompts, forced)
    return max(float((a - b).abs().max()) for a, b in zip(got, want, strict=True))


def _row_prefill_error(candidate: Backend, reference: Backend) -> float:
    """Every prefill variant narrower than the artifact's batch, run on row 0 of a cache."""
    worst = 0.0
    for graph in candidate.graphs.values():
        if graph.role != "prefill" or graph.batch == candidate.manifest.batch_size:
            continue
        ids = fixed_prompt(graph.batch, graph.seq_len, candidate.manifest.config.vocab_size)
        positions = torch.arange(graph.seq_len).expand(graph.batch, -1).contiguous()
        mask = torch.ones(graph.batch, candidate.manifest.max_cache_len, dtype=torch.long)
        logits = []
        for backend in (candidate, reference):
            same = backend.graph("prefill", graph.batch, graph.seq_len)
            rows = [t[: graph.batch] for t in backend.allocate_cache()]  # a contiguous view of the first rows
            feeds = graph_feeds(same, ids, positions, 0, mask, rows, backend.device)
            logits.append(backend.run(same.name, feeds)[names.LOGITS].float().cpu().clone())
        worst = max(worst, float((logits[0] - logits[1]).abs().max()))
    return worst


def validate_artifact(folder: Path, manifest: Manifest, model: StaticLlama) -> dict[str, Any]:
    """Raise ValidationError above the precision's tolerance; return what the manifest records."""
    if PRECISIONS[manifest.dtype].numpy is None:
        return {"backend": None, "skipped": "ONNX Runtime CPU cannot run bf16; run `llamatrt diff` on a GPU"}
    tolerance = PRECISIONS[manifest.dtype].export_tolerance
    forms = list(dict.fromkeys(g.attention for g in manifest.graphs.values() if "onnxruntime" in g.backends))
    errors = {}
    with TorchBackend(folder, manifest, model=model) as reference:
        for form in forms:
            with OrtBackend(folder, manifest, attention=form) as candidate:
                errors[form] = max(_loop_error(candidate, reference), _row_prefill_error(candidate, reference))
    for form, error in errors.items():
        if not error <= tolerance:
            raise ValidationError(
                f"ONNX Runtime logits of the {form} graphs differ from PyTorch by {error:.3g} (tolerance "
                f"{tolerance:g} for {manifest.dtype}); the export is wrong, nothing was written — please report "
                "with the model config"
            )
    return {
        "backend": "onnxruntime-cpu",
        "max_abs_logits_error": max(errors.values()),
        "max_abs_logits_error_by_graphs": errors,
        "tolerance": tolerance,
        "decode_steps": DECODE_STEPS,
    }
