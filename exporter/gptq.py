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

from llamatrt.exporter.quant_weights import DEFAULT_ZERO, QuantizedWeight, check_block_size

DAMPING = 0.01  # of the mean diagonal, added to it: keeps the Cholesky factor of a rank-poor H finite
COLUMNS_PER_PASS = 128  # columns whose updates are applied lazily, as one matrix product
CHUNK_ELEMENTS = 1 << 23  # weights solved at once (64 MiB in float64; a few copies of it are held)
SCALE_FACTORS = torch.linspace(0.7, 1.15, 46, dtype=torch.float64)  # the grid around the max's scale


def gptq_quantize(weight: np.ndarray, hessian: torch.Tensor, bits: int, block: int) -> QuantizedWeight:
    """W [N, K] in symmetric blocks of `block` along K, given H = Σ xᵀx [K, K] over the calibration
    inputs x of this weight's product. Rows are independent given H, so they are solved
    CHUNK_ELEMENTS at a time: a 128k-row head never has a float64 copy of its own."""
    check_block_size(block)
    n, k = weight.shape
    levels = 1 << (bits - 1)
    padded = -(-k // block) * block
    h = torch.eye(padded, dtype=torch.float64)
    h[:k, :k] = hessian.to(torch.float64)
    unseen = torch.diagonal(h) == 0  # an input that never fired: its weights cannot matter
    h[unseen, unseen] = 1
    importance = torch.diagonal(h).clone()
    order = torch.argsort(importance, descending=True, stable=True)
    unorder = torch.argsort(order)
    h = h[order][:, order]
    h += DAMPING * torch.diagonal(h).mean() * torch.eye(padded, dtype=h.dtype)
    inverse = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes = np.empty((n, padded), dtype=np.uint8)
    scales = np.empty((n, padded // block), dtype=np.float32)
    rows = max(1, CHUNK_ELEMENTS // padded)
    for first in range(0, n, rows):
        w = torch.zeros(min(rows, n - first), padded, dtype=torch.float64)
        w[:, :k] = torch.from_numpy(np.asarray(weight[first : first + rows], dtype=np.float32))
        w[:, unseen] = 0
        chunk_scales = _block_scales(w, importance, levels, block)  # [rows, K/block]
        chunk_codes = _quantize_columns(w[:, order], inverse, chunk_scales[:, order // block], levels)
        codes[first : first + rows] = (chunk_codes[:, unorder].to(torch.int16) + DEFAULT_ZERO[bits]).numpy()
        scales[first : first + rows] = chunk_scales.to(torch.float32).numpy()
    codes = codes.reshape(n, padded // block, block)
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8) if bits == 4 else codes
    return QuantizedWeight(bits, block, n, k, packed, scales, DEFAULT_ZERO[bits], None, "gptq")


def _block_scales(w: torch.Tensor, importance: torch.Tensor, levels: int, block: int) -> torch.Tensor:
    """Each block's scale: of the grid around max/-levels, the one whose rounding error, weighted by
    its columns' input second moments, is least. Stored in fp32, so chosen in fp32."""
    n, k = w.shape
    groups = w.reshape(n, k // block, block)
    weights = importance.reshape(1, k // block, block)
    extreme = groups.gather(-1, groups.abs().argmax(-1, keepdim=True))[..., 0]
    base = torch.where(extreme == 0, torch.ones_like(extreme), extreme / -levels)
    best, best_error = base.clone(), torch.full_like(base, torch.inf)
    for factor in SCALE_FACTORS:
        scale = (base * factor).to(torch.float32).to(torch.float64)
        rounded = torch.clamp(torch.round(groups / scale[..., None]), -levels, levels - 1) * scale[..., None]
        error = ((groups - rounded) ** 2 * weights).sum(-1)
        better = error < best_error
        best, best_error = torch.where(better, scale, best), torch.where(better, error, best_error)
    return best


def _quantize_columns(w: torch.Tensor, inverse: torch.Tensor, scales: torch.Tensor, levels: int) -> torch.Tensor:
    """The codes (-levels .. levels-1) of W [N, K] (updated in place), column by column in the given
    order, each column's error carried into the later ones through `inverse`, the upper Cholesky
    factor of the damped H⁻¹ in that order (the paper's Algorithm 1, updates applied
    COLUMNS_PER_PASS columns at a time). `scales` [N, K]: each column's."""
    k = w.shape[1]
    codes = torch.zeros_like(w)
    for start in range(0, k, COLUMNS_PER_PASS):
        end = min(start + COLUMNS_PER_PASS, k)
        part, errors = w[:, start:end].clone(), torch.zeros(w.shape[0], end - start, dtype=w.dtype)
        part_inverse = inverse[start:end, start:end]
        for i in range(end - start):
            scale = scales[:, start + i]
            code = torch.clamp(torch.round(part[:, i] / scale), -levels, levels - 1)
            codes[:, start + i] = code
            error = (part[:, i] - code * scale) / part_inverse[i, i]
            part[:, i:] -= error[:, None] * part_inverse[i, i:][None, :]
            errors[:, i] = error
        w[:, end:] -= errors @ inverse[start:end, end:]
    return codes
