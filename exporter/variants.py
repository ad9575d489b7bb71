"""The graph variants an export makes: adding a variant is an entry here (DESIGN.md §2).

Every variant shares the one weights file and the IO contract; the runtime picks among them by
what the manifest says each one is, never by name.
"""

from __future__ import annotations

from dataclasses import dataclass

from llamatrt.base.artifact.variants import ONNXRUNTIME, PORTABLE, SHORT_PREFILL, AttentionForm, onnxruntime_loads


@dataclass(frozen=True)
class VariantPlan:
    name: str  # unique in the artifact; the file is `{name}.onnx`
    role: str  # "prefill" | "decode" | "any"
    batch: int | str  # rows per call, or "batch": any number up to the artifact's B
    seq: int | str  # tokens per call, or "tokens": any number up to the cache
    attention: AttentionForm

    @property
    def path(self) -> str:
        return f"{self.name}.onnx"


def fused_attention_possible(head_dim: int, dtype: str, full_logits: bool) -> bool:
    """Whether the ONNX Runtime fused graph can be made. ONNX Runtime CPU is the fp32 target (GPUs
    take the portable graphs: CUDA's kernel wants fp16/bf16, TensorRT builds standard ops); the
    kernel's rotary embedding needs head_dim % 16 == 0 (every released Llama has 64 or 128); the
    export validates it, so the ONNX Runtime here must load it; and an accuracy export's full logits
    are a prefill-only form."""
    return dtype == "float32" and head_dim % 16 == 0 and onnxruntime_loads(ONNXRUNTIME) and not full_logits


def prefill_sizes(prefill_chunk: int) -> list[int]:
    """Tokens per call of the static prefill variants: the chunk S, and a short one for short prompts."""
    return sorted({min(SHORT_PREFILL, prefill_chunk), prefill_chunk})


def planned_variants(batch: int, prefill_chunk: int, fused: bool) -> list[VariantPlan]:
    """Portable graphs (every backend; static shapes, what TensorRT builds): batch-1 prefills of
    each size, which the runtime binds onto one row of the B-row cache to admit one request while
    the other rows keep decoding, and a B-row decode. With `fused`, one more graph for ONNX Runtime
    CPU whose rows and tokens per call are open, so one session (one packed copy of the weights)
    serves every prefill and decode call."""
    plans = [
        VariantPlan("prefill" if size == prefill_chunk else f"prefill.s{size}", "prefill", 1, size, PORTABLE)
        for size in reversed(prefill_sizes(prefill_chunk))
    ]
    plans.append(VariantPlan("decode", "decode", batch, 1, PORTABLE))
    if fused:
        plans.append(VariantPlan("model.ort", "any", "batch" if batch > 1 else 1, "tokens", ONNXRUNTIME))
    return plans
