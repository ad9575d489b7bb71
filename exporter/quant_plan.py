"""Which weights an `export --quantize` stores quantized, and from where.

Every linear layer, the output head and the embedding are stored block-quantized; norms stay fp32.
From a GGUF the file's own blocks are carried over whatever `--quantize` says (they are the
checkpoint's weights; re-quantizing them would only lose accuracy), and only tensors the file holds
as floats are quantized to the requested bits. From float checkpoints, round-to-nearest symmetric
blocks with fp16-valued scales (quant_weights.rtn_quantize) make every block, or, given calibration
text (`--calibration`), GPTQ makes the decoder projections' and a 4-bit head's (exporter.gptq; a
tied embedding reads the head's blocks, an untied one keeps round-to-nearest: no product weighs its
rows).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from llamatrt.base.artifact.precision import WEIGHT_FORMATS
from llamatrt.base.errors import InputError
from llamatrt.exporter.calibration import Calibration, is_calibrated
from llamatrt.exporter.gguf_blocks import gguf_quantized_weights
from llamatrt.exporter.gptq import gptq_quantize
from llamatrt.exporter.quant_weights import QuantizedWeight, check_block_size, rtn_quantize
from llamatrt.models.checkpoint import Checkpoint
from llamatrt.models.llama import StaticLlama
from llamatrt.models.mapped_parameters import MappedParameters

log = logging.getLogger(__name__)
# MatMulNBits' CPU kernels: 0 (fp32 activations, exact) and 4 (int8 activations per block, faster;
# their speeds: docs/quantization.md)
ACCURACY_LEVELS = (0, 4)
# What runs the 4-bit products at accuracy level 0: llamatrt's MatMulInt4 (fp32-grade activations,
# base.custom_ops) or MatMulNBits' fp32-activation kernel
INT4_KERNELS = ("llamatrt", "onnxruntime")


@dataclass(frozen=True)
class QuantPlan:
    scheme: str  # "int4" | "int8": the bits of the tensors quantized at export
    block_size: int
    accuracy_level: int
    weights: dict[str, QuantizedWeight]  # StaticLlama parameter -> its blocks
    floats: dict[str, np.ndarray]  # the same parameters as the exporter's model holds them (found by content)
    own_int4: bool = False  # 4-bit products run llamatrt's MatMulInt4, not MatMulNBits

    @property
    def int4_kernel(self) -> str:
        """The manifest's name for what runs the 4-bit products: llamatrt's kernel only where some
        product runs it (an int8 artifact's hold none, and need no library to open)."""
        runs = self.own_int4 and any(w.fits_matmul_int4() for w in self.weights.values())
        return "llamatrt" if runs else "onnxruntime"

    @property
    def int4_activation_bits(self) -> list[int]:
        """The activation_bits of the MatMulInt4 products (QuantizedWeight.activation_bits), for the
        manifest; none where no product runs the kernel."""
        if self.int4_kernel != "llamatrt":
            return []
        return sorted({w.activation_bits() for w in self.weights.values() if w.fits_matmul_int4()})

    def origins(self) -> dict[str, str]:
        return {name: w.describe() for name, w in self.weights.items()}

    def drop_blocks(self) -> None:
        """Keep the weights' forms only (QuantizedWeight.hollow), and no floats: once the twin's graphs
        read their blocks from the weights file and the reference is dequantized, nothing needs the
        arrays, which would otherwise sit beside validation's runs (0.2 GiB for the 1B shape's twin)."""
        self.weights.update({name: w.hollow() for name, w in self.weights.items()})
        self.floats.clear()

    def summary(self) -> str:
        counts = Counter(w.origin for w in self.weights.values())
        return ", ".join(f"{n} {origin}" for origin, n in counts.most_common())


def _quantized_params(model: StaticLlama) -> dict[str, torch.Tensor]:
    """The 2-D parameters stored quantized: every projection, the embedding, an untied head."""
    return {name: p.detach() for name, p in model.state_dict().items() if p.dim() == 2}


def check_quantize_options(
    scheme: str,
    accuracy_level: int,
    block_size: int | None = None,
    head: str | None = None,
    int4_kernel: str = "llamatrt",
) -> None:
    """Before any work (a width that is no multiple of the block size is fine: its last block is padded,
    as MatMulNBits lays it out)."""
    if scheme not in WEIGHT_FORMATS:
        raise InputError(f"unknown --quantize {scheme!r}; use one of {', '.join(WEIGHT_FORMATS)}")
    if head is not None and head not in WEIGHT_FORMATS:
        raise InputError(f"unknown --head-quantize {head!r}; use one of {', '.join(WEIGHT_FORMATS)}")
    if accuracy_level not in ACCURACY_LEVELS:
        raise InputError(f"--accuracy-level {accuracy_level} is not 0 (fp32, exact) or 4 (int8 activations, fast)")
    if int4_kernel not in INT4_KERNELS:
        raise InputError(f"unknown --int4-kernel {int4_kernel!r}; use one of {', '.join(INT4_KERNELS)}")
    if block_size is not None:
        check_block_size(block_size)


def default_head(scheme: str, block_size: int) -> str:
    """The head's format where --head-quantize is not given: 8 bits beside 4-bit projections, as
    llama.cpp's Q4_0 keeps its output (a 4-bit head's error is a sizeable share of the model's, and
    with fp32 activations an 8-bit head is no slower: it runs the int8 kernel in two exact passes;
    measured in docs/benchmarks.md), except where the blocks are TensorRT's int4 form, whose graphs
    take no 8-bit head; else the scheme's own."""
    if scheme == "int4" and block_size not in WEIGHT_FORMATS["int4"].tensorrt_blocks:
        return "int8"
    return scheme


class ParameterQuantizer:
    """One parameter's blocks at a time: the GGUF's own where the file holds them (and they are the
    weights transformers loaded), else GPTQ of the float where calibration text is given (the decoder
    projections and a 4-bit head; exporter.gptq), else round-to-nearest. The export calls it for the traced twin's
    parameters and again, tensor by tensor, for every replicated layer's."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        scheme: str,
        block_size: int,
        head: str | None = None,
        calibration: Calibration | None = None,
    ) -> None:
        """`head`: the output head's format (and the tied embedding's, which is the same matrix); None:
        `default_head`."""
        self.bits, self.block_size = WEIGHT_FORMATS[scheme].bits, block_size
        self.calibration = calibration
        self.solved: dict[str, QuantizedWeight] = {}  # GPTQ's blocks, made once: the export asks for some twice
        self.head_bits = WEIGHT_FORMATS[head or default_head(scheme, block_size)].bits
        self.head_name = "model.embed_tokens.weight" if checkpoint.config.tie_word_embeddings else "lm_head.weight"
        self.carried = gguf_quantized_weights(checkpoint.gguf, checkpoint.config) if checkpoint.gguf is not None else {}
        self.origins: dict[str, str] = {}  # parameter -> where its blocks came from, as the manifest says it

    def __call__(self, name: str, array: np.ndarray) -> QuantizedWeight:
        weight = self.carried.get(name)
        if weight is not None and not np.array_equal(weight.dequantize(), array):
            log.warning(
                "%s: the GGUF's blocks do not dequantize to the weights transformers loaded; quantizing "
                "it from the floats instead",
                name,
            )
            weight = None
        bits = self.head_bits if name == self.head_name else self.bits
        gptq_head = name == self.head_name and bits == 4  # an 8-bit head's rounding costs too little to pay a pass for
        if weight is None and self.calibration is not None and (is_calibrated(name) or gptq_head):
            if name not in self.solved:
                calibration = self.calibration
                hessian = calibration.head_hessian() if name == self.head_name else calibration.hessian(name)
                self.solved[name] = gptq_quantize(array, hessian, bits, self.block_size)
            weight = self.solved[name]
        if weight is None:
            weight = rtn_quantize(array, bits, self.block_size)
        self.origins[name] = weight.describe()
        return weight


def plan_quantization(
    quantizer: ParameterQuantizer,
    model: StaticLlama,
    scheme: str,
    block_size: int,
    accuracy_level: int,
    after_each: Callable[[], object] = lambda: None,
    own_int4: bool = False,
) -> QuantPlan:
    """The twin's quantized weights. `after_each` runs after each weight is quantized (the exporter
    gives back the pages of the mapped parameter it read)."""
    check_quantize_options(scheme, accuracy_level)
    weights: dict[str, QuantizedWeight] = {}
    floats: dict[str, np.ndarray] = {}
    for name, tensor in _quantized_params(model).items():
        floats[name] = tensor.float().numpy()
        weights[name] = quantizer(name, floats[name])
        after_each()
    plan = QuantPlan(scheme, block_size, accuracy_level, weights, floats, own_int4)
    log.info("quantized weights: %s", plan.summary())
    return plan


def dequantize_in_place(model: StaticLlama, plan: QuantPlan, mapped: MappedParameters) -> StaticLlama:
    """`model` made the artifact's weights as they dequantize, in place (the exporter is done with
    its floats once the graphs are made; a copy would hold the twin twice): the reference that export
    validation holds the quantized graph to, so only arithmetic is left between them. Written
    through `mapped`, the file the model's parameters are mapped from, so their pages can still be
    given back while ONNX Runtime runs."""
    dtypes = {name: t.dtype for name, t in model.state_dict().items()}
    mapped.overwrite((name, torch.from_numpy(w.dequantize()).to(dtypes[name])) for name, w in plan.weights.items())
    return model
