"""Block-quantized weights in ONNX Runtime's MatMulNBits layout, from two sources.

- A GGUF file's own blocks, carried over without re-quantizing: Q4_0 and Q8_0 are MatMulNBits'
  symmetric forms (zero point 8 / 128) exactly; Q4_1 (`d·q + m` per block) is held as the file's
  `d`, `q` and `m` (zero 0, `offsets`), which the graph computes as MatMulNBits' symmetric kernel plus
  a small fp32 MatMul of the activations' block sums (exporter.quantize). The dequantized weights then equal the `gguf`
  package's dequantization bit for bit, which is what transformers loads: the artifact holds the
  same weights as the fp32 reference `diff` compares it with.
- A float weight, quantized round-to-nearest, symmetric (`rtn_quantize`), or by GPTQ
  (exporter.gptq), with fp16-valued scales as a GGUF's blocks have.

Layout (MatMulNBits, weight W of shape [N, K], blocks of `block` along K): `packed` is uint8
[N, K/block, block·bits/8], two 4-bit values per byte low nibble first; `scales` fp32 [N, K/block].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from llamatrt.base.artifact.precision import WEIGHT_FORMATS
from llamatrt.base.custom_ops import EXACT_ACTIVATION_BITS, INT4_ACTIVATION_BLOCK, REQUANTIZED_ACTIVATION_BITS
from llamatrt.base.errors import CheckpointError, InputError

# MatMulNBits' zero point when the graph gives none, by bits
DEFAULT_ZERO = {f.bits: f.symmetric_zero for f in WEIGHT_FORMATS.values()}


@dataclass(frozen=True)
class QuantizedWeight:
    bits: int
    block: int
    n: int
    k: int
    packed: np.ndarray  # uint8 [N, K/block, block*bits/8]
    scales: np.ndarray  # float32 [N, K/block]
    zero: int  # the one zero point of every block: DEFAULT_ZERO[bits], or 0 with `offsets`
    offsets: np.ndarray | None  # float32 [N, K/block]: Q4_1's `m`, added after the product
    origin: str  # "gguf Q4_1" (blocks carried over) or "rtn" (quantized here)

    def form(self) -> tuple[int, int, int, int, int, bool, int]:
        """What a graph over this weight depends on: a weight of the same form fits the same nodes."""
        return self.bits, self.block, self.n, self.k, self.zero, self.offsets is None, self.activation_bits()

    def fits_matmul_int4(self) -> bool:
        """Whether llamatrt's MatMulInt4 can run this weight's product: 4-bit blocks made of whole
        groups of the kernel's 32 activations (base.custom_ops)."""
        return self.bits == 4 and self.block % INT4_ACTIVATION_BLOCK == 0

    def activation_bits(self) -> int:
        """MatMulInt4's activation digits for this weight's products: fp32's 24 bits for a GGUF's own
        blocks, whose products must equal the fp32 reference's; 16 (two int8 dot products where 24 take
        three) for blocks made here from floats, whose own rounding error is orders of magnitude
        larger than 16-bit activations' (docs/quantization.md)."""
        return EXACT_ACTIVATION_BITS if self.origin.startswith("gguf") else REQUANTIZED_ACTIVATION_BITS

    def describe(self) -> str:
        """Where the blocks came from, as the manifest records it."""
        return f"{self.origin} ({self.bits}-bit, block {self.block})"

    def hollow(self) -> QuantizedWeight:
        """Its form and origin without its blocks (empty arrays of no bytes): what replication checks
        every other layer's blocks against once the twin's are in the weights file."""
        empty = np.empty((self.n, 0), np.float32)
        packed = np.empty((self.n, self.blocks, 0), np.uint8)
        return replace(self, packed=packed, scales=empty, offsets=None if self.offsets is None else empty)

    @property
    def blocks(self) -> int:
        return self.packed.shape[1]

    def codes(self) -> np.ndarray:
        """The integer codes as uint8 [N, K/block, block] (4-bit values unpacked)."""
        if self.bits == 8:
            return self.packed
        low, high = self.packed & 0x0F, self.packed >> 4
        return np.stack([low, high], axis=-1).reshape(self.n, self.blocks, self.block)

    def dequantize(self) -> np.ndarray:
        """W [N, K] in float32, computed as the format defines it (`d·(q - z)` and Q4_1's `d·q + m`,
        the very expressions of the `gguf` package), so a carried-over tensor compares bitwise."""
        w = self.codes().astype(np.float32)  # one float array, computed in place: the same values
        if self.offsets is None:
            w -= np.float32(self.zero)
            w *= self.scales[..., None]
        else:
            w *= self.scales[..., None]
            w += self.offsets[..., None]
        return w.reshape(self.n, self.blocks * self.block)[:, : self.k]

    def nibble_halves(self) -> tuple[QuantizedWeight, QuantizedWeight]:
        """An 8-bit weight as two 4-bit ones that sum to it exactly: code c = 16·h + l, so
        d·(c - 128) = 16d·(h - 8) + d·l. MatMulNBits has an fp32-activation kernel for 4 bits only
        (for 8 bits it dequantizes the whole matrix on every call), so an exact 8-bit product runs as
        the symmetric 4-bit product of the high nibbles plus the low nibbles in Q4_1's form (offset 0)."""
        assert self.bits == 8 and self.zero == DEFAULT_ZERO[8] and self.offsets is None, "a symmetric 8-bit weight"
        high, low = self.packed >> 4, self.packed & 0x0F  # [N, K/block, block] in element order

        def packed(codes: np.ndarray) -> np.ndarray:
            return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)

        scales_high = (self.scales * np.float32(16)).astype(np.float32)  # exact: a power of two
        origin = f"{self.origin} as two nibble halves"
        return (
            QuantizedWeight(4, self.block, self.n, self.k, packed(high), scales_high, DEFAULT_ZERO[4], None, origin),
            QuantizedWeight(
                4, self.block, self.n, self.k, packed(low), self.scales, 0, np.zeros_like(self.scales), origin
            ),
        )

    def rows(self, index: np.ndarray) -> QuantizedWeight:
        """The same weight with its rows (output features) reordered or selected."""
        return QuantizedWeight(
            self.bits,
            self.block,
            len(index),
            self.k,
            self.packed[index],
            self.scales[index],
            self.zero,
            None if self.offsets is None else self.offsets[index],
            self.origin,
        )


def signed_codes_kn(weight: QuantizedWeight) -> np.ndarray:
    """int8 [K, N] holding the int4 values code - 8 (what DequantizeLinear's int4 input stores)."""
    codes = weight.codes().reshape(weight.n, -1)[:, : weight.k].astype(np.int8) - np.int8(DEFAULT_ZERO[4])
    return np.ascontiguousarray(codes.T)


def _offsets(weight: QuantizedWeight) -> np.ndarray:
    assert weight.offsets is not None, "only Q4_1 blocks have offsets"
    return weight.offsets


# Every graph tensor made of a quantized weight, by the suffix of its initializer's name
# (`{parameter}{suffix}`): the graph rewrites (exporter.quantize, exporter.quantize_portable) and the
# layer replication (exporter.replicate) make them from this one table.
STORED: dict[str, Callable[[QuantizedWeight], np.ndarray]] = {
    ".q4": lambda w: w.packed,
    ".q8": lambda w: w.packed,
    ".scales": lambda w: w.scales,
    ".offsets": lambda w: np.ascontiguousarray(_offsets(w).T),  # [blocks, N]
    ".offsets.rows": lambda w: _offsets(w),
    ".scales.kn": lambda w: np.ascontiguousarray(w.scales.T),
    ".int4": signed_codes_kn,  # held as ONNX INT4
    ".dequantized": lambda w: w.dequantize(),
}
INT4_STORED = frozenset({".int4"})


def stack_rows(parts: list[QuantizedWeight]) -> QuantizedWeight:
    """Row-wise concatenation (the fused q|k|v and gate|up projections), all of one format."""
    first = parts[0]
    if any(
        (p.bits, p.block, p.k, p.zero, p.offsets is None)
        != (first.bits, first.block, first.k, first.zero, first.offsets is None)
        for p in parts
    ):
        raise CheckpointError(
            "the q/k/v (or gate/up) tensors of one layer are quantized differently in the GGUF; "
            "export it without --quantize, or from a float checkpoint"
        )
    offsets = None if first.offsets is None else np.concatenate([p.offsets for p in parts])  # type: ignore[misc]
    return QuantizedWeight(
        first.bits,
        first.block,
        sum(p.n for p in parts),
        first.k,
        np.concatenate([p.packed for p in parts]),
        np.concatenate([p.scales for p in parts]),
        first.zero,
        offsets,
        first.origin,
    )


def check_block_size(block: int) -> None:
    """The block sizes MatMulNBits takes (the export checks before any work)."""
    if block < 16 or block & (block - 1):
        raise InputError(
            f"block size {block} is not supported; pass --block-size a power of two >= 16 (32 is the usual)"
        )


RTN_CHUNK_BYTES = 16 << 20  # the rows quantized at once: a large weight (a 49,152-row head) is never copied whole
FP16_NORMAL = (2.0**-14, 65504.0)  # the fp16 normal range: rounding into it errs by at most 2^-11 relatively


def padded_rows(weight: np.ndarray, start: int, rows: int, block: int) -> np.ndarray:
    """Rows start..start+rows of W [N, K] in float32 blocks [rows, K/block, block], K zero-padded to
    whole blocks (MatMulNBits pads a last partial block)."""
    k = weight.shape[1]
    part = weight[start : start + rows]
    groups = np.zeros((len(part), -(-k // block) * block), np.float32)
    groups[:, :k] = part
    return groups.reshape(len(part), -1, block)


def block_extremes(weight: np.ndarray, block: int) -> np.ndarray:
    """Each block's value of largest magnitude, signed, float32 [N, K/block], RTN_CHUNK_BYTES of rows
    at a time."""
    n, k = weight.shape
    rows = max(1, RTN_CHUNK_BYTES // (4 * k))
    extremes = np.empty((n, -(-k // block)), np.float32)
    for start in range(0, n, rows):
        groups = padded_rows(weight, start, rows, block)
        at = np.abs(groups).argmax(-1)[..., None]
        extremes[start : start + rows] = np.take_along_axis(groups, at, -1)[..., 0]
    return extremes


def scales_in_fp16(extremes: np.ndarray, levels: int, factors: tuple[float, float] = (1.0, 1.0)) -> bool:
    """Whether a weight's block scales (its blocks' extremes over `levels`, times any of `factors`'
    range) are kept as fp16 values (in fp32 arrays), as a GGUF's Q4_0 / Q8_0 blocks keep them:
    MatMulInt4 then packs them in half the bytes, and a decode step reads every weight byte once
    (docs/quantization.md has the measured cost of fp32 scales). Within fp16's normal range the
    rounding moves a scale by at most 2^-11 of itself, a hundredth of what 4-bit rounding already
    errs by; a weight with scales outside it keeps fp32 ones."""
    magnitudes = np.abs(extremes[extremes != 0]) / levels
    if magnitudes.size == 0:
        return True
    low, high = float(magnitudes.min()) * factors[0], float(magnitudes.max()) * factors[1]
    return FP16_NORMAL[0] <= low and high <= FP16_NORMAL[1]


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned codes [..., block] in MatMulNBits' bytes: two 4-bit codes a byte, low nibble first."""
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8) if bits == 4 else codes.astype(np.uint8)


def rtn_quantize(weight: np.ndarray, bits: int, block: int) -> QuantizedWeight:
    """Symmetric round-to-nearest blocks of W [N, K]: each block's scale is its largest-magnitude
    value over -2^(bits-1) (llama.cpp's Q4_0 / Q8_0 and ONNX Runtime's quantizer choose the same), as
    an fp16 value where `scales_in_fp16` allows, and the codes are rounded with that scale. Written here
    (ONNX Runtime's quantizer makes fp32 scales) in two passes of RTN_CHUNK_BYTES of rows: the
    scales of the whole weight first (the fp16 choice is the weight's), then its codes."""
    check_block_size(block)
    n, k = weight.shape
    levels = 1 << (bits - 1)
    extremes = block_extremes(weight, block)
    scales = extremes / np.float32(-levels)
    if scales_in_fp16(extremes, levels):
        scales = scales.astype(np.float16).astype(np.float32)
    packed = np.empty((n, scales.shape[1], block * bits // 8), np.uint8)
    rows = max(1, RTN_CHUNK_BYTES // (4 * k))
    for start in range(0, n, rows):
        chunk = scales[start : start + rows, :, None]
        signed = np.rint(padded_rows(weight, start, rows, block) / np.where(chunk == 0, 1, chunk))
        codes = (np.clip(signed, -levels, levels - 1) + DEFAULT_ZERO[bits]).astype(np.uint8)
        packed[start : start + rows] = pack_codes(codes, bits)
    return QuantizedWeight(bits, block, n, k, packed, scales, DEFAULT_ZERO[bits], None, "rtn")


def from_gguf_blocks(type_name: str, data: np.ndarray, k: int) -> QuantizedWeight:
    """A GGUF tensor's raw blocks (uint8 [N, bytes per row]; rows of K values) in MatMulNBits form."""
    n = data.shape[0]
    blocks = data.reshape(n, k // 32, -1)
    d = np.ascontiguousarray(blocks[..., :2]).view(np.float16)[..., 0].astype(np.float32)
    if type_name == "Q8_0":  # d (fp16), 32 int8 q: w = d·q, i.e. code q+128 with zero point 128
        q = np.ascontiguousarray(blocks[..., 2:]).view(np.int8)
        packed = (q.astype(np.int16) + 128).astype(np.uint8)
        return QuantizedWeight(8, 32, n, k, packed, d, 128, None, "gguf Q8_0")
    if type_name in ("Q4_0", "Q4_1"):  # d [, m], 16 bytes: value j in the low nibble of byte j, j+16 in its high
        start = 2 if type_name == "Q4_0" else 4
        qs = blocks[..., start:]
        codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # [N, K/32, 32] in element order
        packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)  # MatMulNBits: 2i low, 2i+1 high
        if type_name == "Q4_0":
            return QuantizedWeight(4, 32, n, k, packed, d, 8, None, "gguf Q4_0")
        m = np.ascontiguousarray(blocks[..., 2:4]).view(np.float16)[..., 0].astype(np.float32)
        return QuantizedWeight(4, 32, n, k, packed, d, 0, m, "gguf Q4_1")
    raise CheckpointError(f"GGUF block type {type_name} is not carried over (Q4_0, Q4_1, Q8_0 are)")
