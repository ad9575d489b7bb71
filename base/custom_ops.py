"""llamatrt's own ONNX Runtime op and the library that holds it (runtime/kernels/matmul_int4.c).

`ai.llamatrt.MatMulInt4`: 4-bit weights times fp32 activations, written per block of 32 as three
int8 digits (24 bits: fp32's rounding) or, where the weights were re-quantized from floats, two (16
bits: two dot products instead of three) so that int8 dot products compute them; the exporter's form
for 4-bit products at accuracy level 0 (docs/quantization.md). The library is built
by `pip install` (setup.py); an artifact that holds the op needs it to load, and the backend
registers it from the installed package only, never from a path an artifact names.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Any

DOMAIN = "ai.llamatrt"
MATMUL_INT4 = "MatMulInt4"
INT4_ACTIVATION_BLOCK = 32  # its blocks of activations; weight blocks must be a multiple of this
EXACT_ACTIVATION_BITS = 24  # its attribute activation_bits: fp32's rounding (the default)
REQUANTIZED_ACTIVATION_BITS = 16  # for blocks re-quantized from floats
LIBRARY_MODULE = "llamatrt.runtime._matmul_int4"


def int4_activation_bits(quantization: Mapping[str, Any]) -> list[int]:
    """The activation_bits of an artifact's MatMulInt4 products, from its manifest's `quantization`:
    artifacts written before the attribute existed record none and run 24 bits."""
    return list(quantization.get("int4_activation_bits", [EXACT_ACTIVATION_BITS]))


def library_path() -> Path | None:
    """The built library, or None where the install had no C compiler."""
    spec = importlib.util.find_spec(LIBRARY_MODULE)
    return Path(spec.origin) if spec is not None and spec.origin else None


KERNEL_PATHS = {1: "portable C", 2: "AVX2", 3: "AVX-512 VNNI"}  # the library's PATH_* values


def kernel_path() -> str | None:
    """The code MatMulInt4 runs on this CPU, as the library itself chooses it (None without the
    library). The paths' products differ only in the order of their float sums, so `diff` names the
    one that ran beside its figures."""
    import ctypes

    path = library_path()
    if path is None:
        return None
    entry = ctypes.CDLL(str(path)).matmul_int4_path
    entry.restype = ctypes.c_int
    return KERNEL_PATHS.get(entry(), "unknown")


MISSING_LIBRARY = (
    "this artifact's int4 products run llamatrt's MatMulInt4 kernel, which this install lacks (it was "
    "installed without a C compiler); reinstall with gcc present (`pip install -e .`), or re-export with "
    "`--int4-kernel onnxruntime`"
)
