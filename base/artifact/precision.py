"""Compute precisions and quantized weight formats: one table each, keyed once, that every side reads.

A precision's name is the manifest's spelling ("float16"); its alias is the CLI's ("fp16"). The
table holds what each layer needs of it: the torch dtype (models, the PyTorch backend), the numpy
dtype ONNX Runtime binds (None: numpy has no bf16), the export self-check's tolerance and the
accuracy diff's thresholds. torch is imported only when a dtype is asked for, so the CLI's option
parsing (which reads this table) starts fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from llamatrt.base.errors import InputError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Thresholds:
    """What `llamatrt diff` accepts of a stage against transformers."""

    max_abs: float  # max |logits - reference| over every prompt and step
    max_kl: float  # max KL(reference || stage) of the next-token distribution
    min_top1: float  # fraction of steps whose argmax equals the reference's
    max_ppl_rel: float  # |ppl - ppl_ref| / ppl_ref
    greedy_must_match: bool  # free-running greedy tokens equal the reference's for all steps


@dataclass(frozen=True)
class Precision:
    name: str  # also torch's and numpy's name for it
    alias: str
    numpy: str | None
    export_tolerance: float  # max |logits - PyTorch at this dtype| accepted by the export self-check
    thresholds: Thresholds

    @property
    def torch(self) -> torch.dtype:
        return torch_dtype(self.name)


# fp32 is tight (the README gives what SmolLM2 measures); fp16/bf16 allow their rounding but still catch real bugs,
# whose errors are orders of magnitude larger (a wrong mask or RoPE moves logits by whole units).
PRECISIONS = {
    p.name: p
    for p in (
        Precision("float32", "fp32", "float32", 1e-3, Thresholds(1e-2, 1e-4, 1.0, 1e-3, True)),
        Precision("float16", "fp16", "float16", 0.25, Thresholds(0.5, 2e-2, 0.95, 2e-2, False)),
        Precision("bfloat16", "bf16", None, 1.0, Thresholds(2.0, 5e-2, 0.9, 5e-2, False)),
    )
}
# Every dtype a graph input or output may have: the precisions plus the integer inputs (the names
# are torch's and numpy's own).
TENSOR_DTYPES = (*PRECISIONS, "int64")
NUMPY_DTYPES: dict[str, str] = {name: p.numpy for name, p in PRECISIONS.items() if p.numpy} | {"int64": "int64"}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a manifest dtype name ("float16" -> torch.float16)."""
    import torch

    if name not in TENSOR_DTYPES:
        raise InputError(f"unknown tensor dtype {name!r}; use one of {', '.join(TENSOR_DTYPES)}")
    return getattr(torch, name)  # type: ignore[no-any-return]


def precision(name: str) -> Precision:
    """By the manifest's name or the CLI's alias; a one-line error naming the choices otherwise."""
    for p in PRECISIONS.values():
        if name in (p.name, p.alias):
            return p
    choices = ", ".join(p.alias for p in PRECISIONS.values())
    raise InputError(f"unknown dtype {name!r}; use one of {choices}")


def dtype_name(dtype: torch.dtype) -> str:
    """The manifest's name for a torch dtype ("float16", "int64")."""
    return str(dtype).removeprefix("torch.")


# What `diff` accepts of quantized weights against the float reference, by one principle: the
# thresholds of exact arithmetic on the artifact's weights, plus a stated allowance for whatever
# arithmetic is not exact, and the free-running greedy tokens must equal the reference's in every
# case (a user sees answers, not KL). "gguf-blocks": the GGUF's own blocks are the reference's very
# weights, run with fp32 activations (accuracy_level 0): exact, so fp32's thresholds.
# "+int8-activations": the same weights through MatMulNBits' int8 activations (accuracy_level 4):
# fp32's thresholds plus ACTIVATION_ALLOWANCE. "int8"/"int4": weights re-quantized from the float
# checkpoint differ from the reference by their rounding, which diff cannot tell apart from the
# arithmetic: a wider numeric budget, but the same greedy requirement.
ACTIVATION_ALLOWANCE = Thresholds(max_abs=1.0, max_kl=0.01, min_top1=-0.05, max_ppl_rel=0.01, greedy_must_match=True)


def _plus(base: Thresholds, allowance: Thresholds) -> Thresholds:
    return Thresholds(
        base.max_abs + allowance.max_abs,
        base.max_kl + allowance.max_kl,
        base.min_top1 + allowance.min_top1,
        base.max_ppl_rel + allowance.max_ppl_rel,
        True,
    )


@dataclass(frozen=True)
class WeightFormat:
    """A weight-only, block-wise quantized format: what the manifest, the CLI's --quantize, the
    exporter's writers (exporter.quant_weights: ONNX Runtime's MatMulNBits layout;
    exporter.quantize_portable: DequantizeLinear for TensorRT), the engine build and `diff` read.
    Adding one is a line here plus its writer's branch for its bits."""

    name: str  # the manifest's and the CLI's spelling
    bits: int
    tensorrt_blocks: tuple[int, ...]  # block sizes of symmetric blocks TensorRT's weight-only GEMMs take; () none
    thresholds: Thresholds  # what diff accepts of weights re-quantized from a float checkpoint

    @property
    def symmetric_zero(self) -> int:
        """The zero point of a symmetric block: the middle of the code range (MatMulNBits' default)."""
        return 1 << (self.bits - 1)


WEIGHT_FORMATS = {
    f.name: f
    for f in (
        WeightFormat("int4", 4, (64, 128), Thresholds(12.0, 0.5, 0.75, 0.25, True)),
        WeightFormat("int8", 8, (), Thresholds(8.0, 0.15, 0.9, 0.05, True)),
    )
}

QUANTIZED_THRESHOLDS = {
    "gguf-blocks": PRECISIONS["float32"].thresholds,
    "gguf-blocks+int8-activations": _plus(PRECISIONS["float32"].thresholds, ACTIVATION_ALLOWANCE),
    **{f.name: f.thresholds for f in WEIGHT_FORMATS.values()},
}


def weight_format(bits: int) -> WeightFormat:
    """The format of `bits`-bit codes."""
    return next(f for f in WEIGHT_FORMATS.values() if f.bits == bits)


def stage_thresholds(kind: str) -> Thresholds:
    """Thresholds of a stage: a precision name, or a quantized-weights kind."""
    return QUANTIZED_THRESHOLDS[kind] if kind in QUANTIZED_THRESHOLDS else PRECISIONS[kind].thresholds
