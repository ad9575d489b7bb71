"""What a graph variant is, as data: its role, shapes, attention form and weight format. An
artifact holds a set of them, all over one weights file. Who may run a graph is not written here
nor in the manifest: each backend declares the attention forms and weight formats it runs
(`runtime.backend.Backend`), so a new backend runs the artifacts that exist.
"""

from __future__ import annotations

from dataclasses import dataclass

ROLES = ("prefill", "decode")


@dataclass(frozen=True)
class AttentionForm:
    """How a graph computes attention; the IO contract is the same for every form."""

    name: str
    description: str
    op_domain: str = ""  # the fused node's domain and type, where there is one
    op_type: str = ""
    min_onnxruntime: tuple[int, int] | None = None  # the first ONNX Runtime that loads it

    @property
    def op(self) -> str | None:
        return f"{self.op_domain}.{self.op_type}" if self.op_type else None


PORTABLE = AttentionForm(
    "portable",
    "explicit MatMul/Softmax over all C cache slots, cache written by ONNX TensorScatter (what TensorRT builds)",
)
MS_DOMAIN = "com.microsoft"  # ONNX Runtime's contrib ops (GroupQueryAttention, MatMulNBits, ...)
# Tokens per call of the small static prefill variant: a short prompt pays for 16, not S; it is also
# the most slots a static prefill pads a prompt with (the diff's built-in prompts leave room for it).
SHORT_PREFILL = 16
# ONNX Runtime's fused kernel (exporter.ort_attention): 1.32 is the first release whose
# GroupQueryAttention takes query_seqlens; 1.25.1-1.31 reject the node.
ONNXRUNTIME = AttentionForm(
    "onnxruntime",
    "one com.microsoft.GroupQueryAttention node per layer: rotary, in-place cache write, only written slots scored",
    op_domain=MS_DOMAIN,
    op_type="GroupQueryAttention",
    min_onnxruntime=(1, 32),
)
ATTENTION_FORMS = {form.name: form for form in (PORTABLE, ONNXRUNTIME)}


def version_tuple(text: str) -> tuple[int, ...]:
    """ "1.32.0" -> (1, 32, 0); non-numeric parts ("dev0") end the tuple."""
    parts = []
    for part in text.split("."):
        if not part.isdigit():
            break
        parts.append(int(part))
    return tuple(parts)


def onnxruntime_loads(form: AttentionForm) -> bool:
    """Whether the installed ONNX Runtime can load graphs of this attention form."""
    if form.min_onnxruntime is None:
        return True
    import onnxruntime

    return version_tuple(onnxruntime.__version__) >= form.min_onnxruntime
