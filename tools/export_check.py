"""Export validation: a freshly written artifact is checked the way users will run it.

Every attention form ONNX Runtime CPU can run is opened through OrtBackend (IO binding, the cache
updated in place, the generation loop's own feeds) and compared with the PyTorch backend running
the exporter's StaticLlama: prompts that use every prefill variant, all in flight at once, then
teacher-forced decode steps, through the loop (tools.teacher_forcing).
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llamatrt.base.artifact.feeds import fixed_prompt
from llamatrt.base.artifact.manifest import Manifest
from llamatrt.base.artifact.precision import PRECISIONS
from llamatrt.base.custom_ops import EXACT_ACTIVATION_BITS, int4_activation_bits
from llamatrt.base.errors import ValidationError
from llamatrt.base.heap import map_large_blocks
from llamatrt.models.llama import StaticLlama
from llamatrt.runtime.backend import Backend
from llamatrt.runtime.generator import Generator
from llamatrt.runtime.ort_backend import OrtBackend
from llamatrt.runtime.torch_backend import TorchBackend
from llamatrt.tools.fp32_twin import fp32_twin
from llamatrt.tools.quant_twin import exact_twin
from llamatrt.tools.teacher_forcing import score

DECODE_STEPS = 4  # teacher-forced decode calls after the prefill
# MatMulNBits' fp32 kernel sums a row block by block, in its own order: SmolLM2 measures 1.2e-4 on
# its GGUF blocks and 1.3e-3 re-quantized to int4 (larger scales); a wrong wire moves logits by units.
QUANTIZED_TOLERANCE = 1e-2


def _loop_error(candidate: Backend, reference: Backend) -> float:
    """Max |logits| difference over prompts that use every prefill size the candidate has (and a
    chunked one), then DECODE_STEPS teacher-forced decode steps, all prompts in flight at once so
    decode calls hold rows at different positions."""
    m = candidate.manifest
    sizes = candidate.seq_sizes("prefill", batch=1) or [1, 5]
    chunk = max(sizes) if candidate.seq_sizes("prefill", batch=1) else m.prefill_chunk
    lengths = sorted({*sizes, max(1, min(chunk + 3, m.max_cache_len - DECODE_STEPS - chunk))})
    prompts = [
        fixed_prompt(1, n, m.config.vocab_size)[0].add(i).remainder(m.config.vocab_size).tolist()
        for i, n in enumerate(lengths)
    ]
    forced = fixed_prompt(len(prompts), DECODE_STEPS + 5, m.config.vocab_size)[:, 5:].tolist()
    want = score(Generator(reference), prompts, forced)
    got = score(Generator(candidate), prompts, forced)
    return max(float((a - b).abs().max()) for a, b in zip(got, want, strict=True))


def validate_artifact(
    folder: Path, manifest: Manifest, model: StaticLlama, release: Callable[[], object] = lambda: None
) -> dict[str, Any]:
    """Raise ValidationError above the precision's tolerance; return what the manifest records.
    `release` gives back the pages of `model`'s mapped weights (the export's twin): called after each
    PyTorch call, so the weights are held once, by PyTorch or by ONNX Runtime, not by both, and a call
    holds only the pages it reads beside its own buffers.

    A bf16 artifact (ONNX Runtime CPU has no bf16 kernels) is checked through fp32 twins of its
    graphs (runtime.fp32_twin) against PyTorch in fp32 on the same bf16-rounded weights: the same
    arithmetic on both sides, so the fp32 tolerance applies and a wrong wire in the graph cannot hide
    in bf16 rounding. A quantized artifact is checked against PyTorch on its dequantized weights, its
    graph run at accuracy_level 0 and 24-bit MatMulInt4 activations (tools.quant_twin) so that the
    fp32 tolerance applies too."""
    map_large_blocks()  # the runs' large buffers leave memory when freed (the export's memory bound)
    twin = PRECISIONS[manifest.dtype].numpy is None
    tolerance = PRECISIONS["float32" if twin else manifest.dtype].export_tolerance
    quantization = manifest.quantization or {}
    int8_activations = quantization.get("accuracy_level", 0) != 0
    inexact = int8_activations or int4_activation_bits(quantization) != [EXACT_ACTIVATION_BITS]
    if manifest.quantization:
        tolerance = QUANTIZED_TOLERANCE
    forms = list(dict.fromkeys(g.attention for g in manifest.graphs.values()))  # ONNX Runtime runs every form
    errors = {}
    with tempfile.TemporaryDirectory() as scratch:
        candidate_folder, candidate_manifest = folder, manifest
        if twin:
            candidate_folder, candidate_manifest = Path(scratch), fp32_twin(folder, manifest, Path(scratch))
            model, forms = copy.deepcopy(model).float(), ["portable"]
        elif inexact:
            candidate_folder, candidate_manifest = Path(scratch), exact_twin(folder, manifest, Path(scratch))
        # each side gives back the pages of its mapped weights after each call: PyTorch's through
        # `release`, ONNX Runtime's sessions (without prepacking) their own
        with TorchBackend(candidate_folder, candidate_manifest, model=model, after_run=release) as reference:
            for form in forms:
                with OrtBackend(candidate_folder, candidate_manifest, attention=form, prepack=False) as candidate:
                    errors[form] = _loop_error(candidate, reference)
    for form, error in errors.items():
        if not error <= tolerance:
            raise ValidationError(
                f"ONNX Runtime logits of the {form} graphs{' (fp32 twins)' if twin else ''} differ from PyTorch by "
                f"{error:.3g} (tolerance {tolerance:g}); the export is wrong, nothing was written — please report "
                "with the model config"
            )
    if twin:
        how = "onnxruntime-cpu, fp32 twins of the bf16 graphs vs PyTorch fp32 on the bf16 weights"
    elif int8_activations:
        how = "onnxruntime-cpu, the graph's twin at accuracy_level 0 vs PyTorch on the dequantized weights"
    elif inexact:
        how = (
            "onnxruntime-cpu, the graph's twin with 24-bit MatMulInt4 activations vs PyTorch on the dequantized weights"
        )
    elif manifest.quantization:
        how = "onnxruntime-cpu vs PyTorch on the dequantized weights"
    else:
        how = "onnxruntime-cpu"
    return {
        "backend": how,
        "max_abs_logits_error": max(errors.values()),
        "max_abs_logits_error_by_graphs": errors,
        "tolerance": tolerance,
        "decode_steps": DECODE_STEPS,
    }
