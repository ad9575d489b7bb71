"""GPTQ: symmetric block quantization that corrects each column's rounding error in the columns
still to come, weighted by the second moments of the layer's inputs on calibration text (Frantar et
al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers", 2022).

Written here rather than taken from a library: the GPTQ implementations (GPTQModel, llm-compressor)
quantize a whole transformers model on a GPU into their own kernels' layouts, and ONNX Runtime's
route (neural-compressor) runs on a finished ONNX graph; the exporter needs one weight at a time,
streamed as every other tensor is, in the MatMulNBits blocks `rtn_quantize` writes.

Three choices, each the paper's or its reference code's option:
- static groups: a block's scale is chosen from the original weights before any update, so the
  column order below cannot change which block a scale belongs to (MatMulNBits' layout);
- activation order: columns are quantized from the largest input second moment down, so the
  columns that matter most are rounded before errors have piled up on them;
- each block's scale is the one of a small grid around max/-2^(bits-1) (the round-to-nearest
  scale) with the least squared error weighted by the inputs' second moments, instead of the max.
"""

from __future__ import annotations

import numpy as np
import torch

from llamatrt.exporter.quant_weights import (
    DEFAULT_ZERO,
    QuantizedWeight,
    block_extremes,
    check_block_size,
    pack_codes,
    scales_in_fp16,
)

DAMPING = 0.01  # of the mean diagonal, added to it: keeps the Cholesky factor of a rank-poor H finite
COLUMNS_PER_PASS = 128  # columns whose updates are applied lazily, as one matrix product
CHUNK_ELEMENTS = 1 << 23  # weights solved at once (64 MiB in float64; a few copies of it are held)
SCALE_FACTORS = torch.linspace(0.7, 1.15, 46, dtype=torch.float64)  # the grid around the max's scale
CANDIDATE_ELEMENTS = 1 << 17  # a block-scale search's weights times candidates at once (1 MiB in float64)


def gptq_quantize(weight: np.ndarray, hessian: torch.Tensor, bits: int, block: int) -> QuantizedWeight:
    """W [N, K] in symmetric blocks of `block` along K, given H = Σ xᵀx [K, K] over the calibration
    inputs x of this weight's product. Rows are independent given H, so they are solved
    CHUNK_ELEMENTS at a time: a 128k-row head never has a float64 copy of its own."""
    check_block_size(block)
    n, k = weight.shape
    levels = 1 << (bits - 1)
    padded = -(-k // block) * block
    factors = (float(SCALE_FACTORS[0]), float(SCALE_FACTORS[-1]))
    fp16 = scales_in_fp16(block_extremes(weight, block), levels, factors)  # the weight's choice, not a chunk's
    inverse, importance, order, unseen = _solve_setup(hessian, padded)
    unorder = torch.argsort(order)
    codes = np.empty((n, padded), dtype=np.uint8)
    scales = np.empty((n, padded // block), dtype=np.float32)
    rows = max(1, CHUNK_ELEMENTS // padded)
    for first in range(0, n, rows):
        w = torch.zeros(min(rows, n - first), padded, dtype=torch.float64)
        w[:, :k] = torch.from_numpy(np.asarray(weight[first : first + rows], dtype=np.float32))
        w[:, unseen] = 0
        chunk_scales = _block_scales(w, importance, levels, block, fp16)  # [rows, K/block]
        columns = w[:, order].T.contiguous()  # the weight's columns in their order, each one contiguous
        column_scales = chunk_scales[:, order // block].T.contiguous()
        chunk_codes = _quantize_columns(columns, inverse, column_scales, levels)
        codes[first : first + rows] = (chunk_codes[unorder].T.to(torch.int16) + DEFAULT_ZERO[bits]).numpy()
        scales[first : first + rows] = chunk_scales.to(torch.float32).numpy()
    codes = codes.reshape(n, padded // block, block)
    return QuantizedWeight(bits, block, n, k, pack_codes(codes, bits), scales, DEFAULT_ZERO[bits], None, "gptq")


def _solve_setup(hessian: torch.Tensor, padded: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """From H [K, K]: the upper Cholesky factor of the damped H⁻¹ in activation order, H's diagonal
    (each input's importance), that order, and the inputs that never fired. Only this function holds
    H, and each step lets the previous one's matrix go: a down projection's H at Llama-3.1-8B's shape
    is 1.6 GB in float64."""
    k = hessian.shape[0]
    h = torch.eye(padded, dtype=torch.float64)
    h[:k, :k].copy_(hessian)
    unseen = torch.diagonal(h) == 0  # an input that never fired: its weights cannot matter
    h[unseen, unseen] = 1
    importance = torch.diagonal(h).clone()
    order = torch.argsort(importance, descending=True, stable=True)
    h = h[order]
    h = h[:, order]
    h.diagonal().add_(DAMPING * torch.diagonal(h).mean())
    factor = torch.linalg.cholesky(h)
    del h
    h_inverse = torch.cholesky_inverse(factor)
    del factor
    return torch.linalg.cholesky(h_inverse, upper=True), importance, order, unseen


def _block_scales(w: torch.Tensor, importance: torch.Tensor, levels: int, block: int, fp16: bool) -> torch.Tensor:
    """Each block's scale: of the grid around max/-levels, the one whose rounding error, weighted by
    its columns' input second moments, is least (the first such, on a tie). Stored as fp16 values
    (`fp16`, quant_weights.scales_in_fp16) or fp32, so chosen among those. Every candidate of a few
    rows at a time (CANDIDATE_ELEMENTS): the temporaries stay in the CPU's caches, where one pass per
    candidate over the whole weight streamed them from memory."""
    n, k = w.shape
    blocks = k // block
    weights = importance.reshape(1, blocks, 1, block)
    factors = SCALE_FACTORS.reshape(1, 1, -1)
    stored = torch.float16 if fp16 else torch.float32
    best = torch.empty(n, blocks, dtype=torch.float64)
    rows = max(1, CANDIDATE_ELEMENTS // (k * len(SCALE_FACTORS)))
    for first in range(0, n, rows):
        groups = w[first : first + rows].reshape(-1, blocks, block)
        extreme = groups.gather(-1, groups.abs().argmax(-1, keepdim=True))[..., 0]
        base = torch.where(extreme == 0, torch.ones_like(extreme), extreme / -levels)
        scales = (base[..., None] * factors).to(stored).to(torch.float64)  # [rows, blocks, candidates]
        values, candidate = groups[:, :, None, :], scales[..., None]
        rounded = torch.clamp(torch.round(values / candidate), -levels, levels - 1) * candidate
        error = ((values - rounded) ** 2 * weights).sum(-1)
        best[first : first + rows] = scales.gather(-1, error.argmin(-1, keepdim=True))[..., 0]
    return best


def _quantize_columns(columns: torch.Tensor, inverse: torch.Tensor, scales: torch.Tensor, levels: int) -> torch.Tensor:
    """The codes (-levels .. levels-1) of Wᵀ [K, N] (updated in place), one row (a column of W) at a
    time in the given order, each one's error carried into the later ones through `inverse`, the
    upper Cholesky factor of the damped H⁻¹ in that order (the paper's Algorithm 1, updates applied
    COLUMNS_PER_PASS columns at a time). `scales` [K, N]: each column's. W's columns are Wᵀ's rows so
    that each step reads and updates contiguous memory (3x faster than strided columns of W)."""
    k = columns.shape[0]
    codes = torch.zeros_like(columns)
    for start in range(0, k, COLUMNS_PER_PASS):
        end = min(start + COLUMNS_PER_PASS, k)
        part, errors = columns[start:end].clone(), torch.zeros(end - start, columns.shape[1], dtype=columns.dtype)
        part_inverse = inverse[start:end, start:end]
        for i in range(end - start):
            scale = scales[start + i]
            code = torch.clamp(torch.round(part[i] / scale), -levels, levels - 1)
            codes[start + i] = code
            error = (part[i] - code * scale) / part_inverse[i, i]
            part[i:].addr_(part_inverse[i, i:], error, alpha=-1)
            errors[i] = error
        columns[end:] -= inverse[start:end, end:].T @ errors
    return codes
