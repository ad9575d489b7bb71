"""Compute precisions: one table, keyed once, that every side reads.

A precision's name is the manifest's spelling ("float16"); its alias is the CLI's ("fp16"). The
table holds what each layer needs of it: the torch dtype (models, the PyTorch backend), the numpy
dtype ONNX Runtime binds (None: numpy has no bf16), the export self-check's tolerance and the
accuracy diff's thresholds. torch is imported only when a dtype is asked for, so the CLI's option
parsing (which reads this table) starts fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from llamatrt.errors import InputError

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


# Export validation of a quantized graph holds it to PyTorch on the same (dequantized) weights, so
# only MatMulNBits' activation arithmetic differs, by accuracy_level: 0/1 fp32 (measured 7e-7 on the
# tiny models), 2 fp16, 3 bf16, 4 int8 activations per block (measured 0.03 on the tiny models and
# 0.4 on SmolLM2's logits, whose range is about +-30; README "Quantized weights").
QUANTIZED_EXPORT_TOLERANCE = {0: 1e-3, 1: 1e-3, 2: 0.25, 3: 1.0, 4: 1.0}
