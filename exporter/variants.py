"""The graph variants an export makes: adding a variant is an entry here (DESIGN.md §2).

Every variant shares the one weights file and the IO contract; the runtime picks among them by
what the manifest says each one is, never by name.
"""

from __future__ import annotations

from dataclasses import dataclass

from llamatrt.artifact.variants import ONNXRUNTIME, PORTABLE, AttentionForm, onnxruntime_loads


@dataclass(frozen=True)
class VariantPlan:
    name: str  # unique in the artifact; the file is `{name}.onnx`
    role: str  # "prefill" | "decode"
    batch: int
    seq: int  # tokens per call
    attention: AttentionForm

    @property
    def path(self) -> str:
        return f"{self.name}.onnx"


def fused_attention_possible(head_dim: int, dtype: str) -> bool:
    """Whether the ONNX Runtime fused graphs can be made. ONNX Runtime CPU is the fp32 target (GPUs
    take the portable graphs: CUDA's kernel wants fp16/bf16, TensorRT builds standard ops); the
    kernel's rotary embedding needs head_dim % 16 == 0 (every released Llama has 64 or 128); and the
    export validates them, so the ONNX Runtime here must load them."""
    return dtype == "float32" and head_dim % 16 == 0 and onnxruntime_loads(ONNXRUNTIME)


def planned_variants(batch: int, prefill_chunk: int, fused: bool) -> list[VariantPlan]:
    """The portable graphs (every backend), then the same shapes with ONNX Runtime's fused
    attention when `fused`. A batch-B artifact also gets a batch-1 prefill, which the runtime binds
    onto one row of the B-row cache to admit one request while the other rows keep their state."""
    shapes = [("prefill", batch, prefill_chunk), ("decode", batch, 1)]
    if batch > 1:
        shapes.append(("prefill", 1, prefill_chunk))
    forms = [PORTABLE, ONNXRUNTIME] if fused else [PORTABLE]
    return [VariantPlan(_name(role, b, batch, form), role, b, seq, form) for form in forms for role, b, seq in shapes]


def _name(role: str, batch: int, artifact_batch: int, form: AttentionForm) -> str:
    return role + (f".b{batch}" if batch != artifact_batch else "") + (".ort" if form is ONNXRUNTIME else "")
