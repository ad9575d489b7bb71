"""llamatrt's MatMulInt4 (runtime/kernels/matmul_int4.c) through ONNX Runtime: 4-bit weights times
fp32 activations, each block of 32 written as three int8 digits (24 bits), so the product equals
float64's to within fp32 rounding, or (activation_bits = 16) as two, within 16 bits of each block's
largest activation; on every layout the exporter writes; and bad graphs get a clear error rather
than a wrong answer."""

from __future__ import annotations

import ctypes
import itertools
from typing import Any

import numpy as np
import pytest

from llamatrt.base.custom_ops import DOMAIN, KERNEL_PATHS, MATMUL_INT4, library_path

pytestmark = pytest.mark.skipif(library_path() is None, reason="llamatrt was installed without a C compiler")


def _weights(rng: np.random.Generator, n: int, k: int, block: int, offsets: bool, fp16: bool = False):
    """Codes, scales and offsets as the artifact stores them, the float W [N, K] they mean, and the
    magnitude of W's two terms (d * q and the offset), which a product sums before they cancel.
    `fp16`: every scale and offset an fp16 value, as a GGUF stores them (the kernel then holds them so)."""
    blocks = -(-k // block)
    codes = rng.integers(0, 16, (n, blocks, block), dtype=np.uint8)
    scales = (rng.random((n, blocks), dtype=np.float32) * 0.02 + 1e-3).astype(np.float32)
    m = (rng.standard_normal((n, blocks)) * 0.05).astype(np.float32) if offsets else -8 * scales
    if fp16:
        scales[0, 0], m[0, 0] = 3e-6, -5e-6  # fp16 subnormals: the kernel's conversions must keep them too
        scales, m = (v.astype(np.float16).astype(np.float32) for v in (scales, m))
        m = m if offsets else -8 * scales
    terms = codes.astype(np.float64) * scales[..., None], np.broadcast_to(m[..., None], codes.shape)
    w = (terms[0] + terms[1]).reshape(n, blocks * block)[:, :k]
    magnitude = (np.abs(terms[0]) + np.abs(terms[1])).reshape(n, blocks * block)[:, :k]
    packed = (codes[:, :, 0::2] | (codes[:, :, 1::2] << 4)).astype(np.uint8)  # MatMulNBits: 2i low, 2i+1 high
    return packed, scales, (np.ascontiguousarray(m.T) if offsets else None), w, magnitude


def _model(
    packed,
    scales,
    offsets,
    n: int,
    k: int,
    block: int,
    b_input: bool = False,
    lead: int = 1,
    open_k: bool = False,
    offsets_input: bool = False,
    swiglu: bool = False,
    bits: int | None = None,
):
    """A graph of one MatMulInt4 node, its tensors named as an artifact names them (`swiglu`: the
    gate/up form, output N / 2 wide; `bits`: the activation_bits attribute, None for none)."""
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(scales, "proj.scales")]  # [N, K / block], as STORED[".scales"]
    leading = [f"d{i}" for i in range(lead)]
    inputs = [helper.make_tensor_value_info("a", TensorProto.FLOAT, [*leading, "K" if open_k else k])]
    if b_input:
        inputs.append(helper.make_tensor_value_info("proj.q4", TensorProto.UINT8, list(packed.shape)))
    else:
        inits.append(numpy_helper.from_array(packed, "proj.q4"))
    names = ["a", "proj.q4", "proj.scales"]
    if offsets is not None:
        if offsets_input:
            inputs.append(helper.make_tensor_value_info("proj.offsets", TensorProto.FLOAT, list(offsets.shape)))
        else:
            inits.append(numpy_helper.from_array(offsets, "proj.offsets"))
        names.append("proj.offsets")
    optional = ({"swiglu": 1} if swiglu else {}) | ({} if bits is None else {"activation_bits": bits})
    node = helper.make_node(MATMUL_INT4, names, ["y"], domain=DOMAIN, K=k, N=n, block_size=block, **optional)
    width = n // 2 if swiglu else n
    graph = helper.make_graph(
        [node], "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*leading, width])], inits
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(DOMAIN, 1)])


def _session(*args: Any, **kwargs: Any) -> Any:
    """ONNX Runtime's session of `_model(*args, **kwargs)`, with the library registered."""
    import onnxruntime as ort

    model = _model(*args, **kwargs)
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(library_path()))
    options.intra_op_num_threads = 2
    return ort.InferenceSession(model.SerializeToString(), options)


def _activations(rng: np.random.Generator, rows: int, k: int) -> np.ndarray:
    """Normal activations with what real ones have: an outlier channel (200x), a block of zeros."""
    a = rng.standard_normal((rows, k)).astype(np.float32)
    a[:, 3] *= 200
    a[:, 32:64] = 0
    return a


UNIT_ROUNDOFF = 2.0**-24  # fp32's
DIGITS_LIMIT = {24: 127 * 65536, 16: 127 * 256}  # a block's largest activation is written as this integer


def _fp32_error_bound(a: np.ndarray, w_magnitude: np.ndarray, bits: int = 24) -> np.ndarray:
    """What the product may be off by: each activation rounded to the nearest of its block of 32's
    `bits`-bit grid (max|x| / (2 * DIGITS_LIMIT) per element: fp32's own rounding for 24 bits), and
    a K-term sum in fp32 (Higham's K * u of the sum of magnitudes). int8 activations would miss the
    24-bit bound by 65536x, the 16-bit one by 256x."""
    k = a.shape[1]
    padded = np.zeros((a.shape[0], -(-k // 32) * 32))
    padded[:, :k] = np.abs(a)
    block_max = np.repeat(padded.reshape(a.shape[0], -1, 32).max(axis=2), 32, axis=1)[:, :k]
    digits = (block_max / (2 * DIGITS_LIMIT[bits])) @ w_magnitude.T
    summation = (k + 2) * UNIT_ROUNDOFF * (np.abs(a.astype(np.float64)) @ w_magnitude.T)
    return digits + summation


@pytest.mark.parametrize(
    ("n", "k", "block", "offsets"),
    [
        (100, 96, 32, True),  # Q4_1 (a GGUF's), N not a multiple of the 16-row tile
        (96, 576, 32, False),  # Q4_0 / round-to-nearest: symmetric, offsets -8 d
        (48, 256, 64, False),  # wider blocks, as --block-size 64 writes them
        (17, 128, 128, True),
        (40, 80, 32, True),  # K not a multiple of the block: the last block padded (MatMulNBits' layout)
        (24, 37, 128, False),  # a block wider than the row: whole groups of 32 past K are padding
    ],
)
@pytest.mark.parametrize("rows", [1, 2, 3, 17])
@pytest.mark.parametrize("fp16", [False, True], ids=["fp32-scales", "fp16-scales"])
@pytest.mark.parametrize("bits", [None, 16], ids=["24-bit", "16-bit"])
def test_the_product_is_within_its_activations_rounding(
    n: int, k: int, block: int, offsets: bool, rows: int, fp16: bool, bits: int | None
) -> None:
    """No activation_bits attribute means 24 bits (the artifacts written before it existed)."""
    rng = np.random.default_rng(n * 1000 + k + rows)
    packed, scales, stored_offsets, w, w_magnitude = _weights(rng, n, k, block, offsets, fp16)
    a = _activations(rng, rows, k)
    y = _session(packed, scales, stored_offsets, n, k, block, bits=bits).run(None, {"a": a})[0]
    exact = a.astype(np.float64) @ w.T
    bound = _fp32_error_bound(a, w_magnitude, bits or 24)
    assert y.shape == (rows, n)
    assert np.all(np.abs(y - exact) <= bound), np.max(np.abs(y - exact) / bound)
    if bits == 16:  # the attribute chose the digits: not the 24-bit product
        assert not np.array_equal(y, _session(packed, scales, stored_offsets, n, k, block).run(None, {"a": a})[0])


def test_leading_dimensions_and_an_empty_batch_pass_through() -> None:
    rng = np.random.default_rng(1)
    packed, scales, offsets, w, _ = _weights(rng, 32, 64, 32, True)
    session = _session(packed, scales, offsets, 32, 64, 32, lead=2)  # [B, S, K], as the graphs call it
    a = rng.standard_normal((2, 3, 64)).astype(np.float32)
    y = session.run(None, {"a": a})[0]
    assert y.shape == (2, 3, 32)
    assert np.allclose(y, a.astype(np.float64) @ w.T, rtol=1e-5, atol=1e-5)
    assert session.run(None, {"a": np.zeros((0, 3, 64), np.float32)})[0].shape == (0, 3, 32)


# the kernel's code paths (its PATH_* values, KERNEL_PATHS' keys); a test on one this CPU lacks skips
PORTABLE, AVX2, VNNI = 1, 2, 3


@pytest.mark.parametrize("path", [AVX2, VNNI], ids=["avx2", "avx512-vnni"])
def test_a_vector_path_equals_the_portable_one(path: int) -> None:
    """The vector kernels (AVX2's int16 pair sums, AVX-512 VNNI's int32 ones) and the plain C one (any
    CPU) compute the same digits and integer sums; only the float accumulation of each output's K / 32
    group terms differs (FMA), by at most that sum's rounding in either order: (groups + 2) * u of the
    terms' magnitudes, twice."""
    rng = np.random.default_rng(2)
    n, k, rows = 50, 160, 5
    # symmetric blocks pack no offsets; fp16 scales are held as fp16; 16-bit activations are two digits
    for fp16, asymmetric, bits in itertools.product((False, True), (False, True), (24, 16)):
        packed, scales, offsets, _, magnitude = _weights(rng, n, k, 32, asymmetric, fp16)
        a = _activations(rng, rows, k)
        vector, portable = (_ctypes_product(a, packed, scales, offsets, n, k, p, bits=bits) for p in (path, PORTABLE))
        accumulation = 2 * (k // 32 + 2) * UNIT_ROUNDOFF * (np.abs(a.astype(np.float64)) @ magnitude.T)
        assert np.all(np.abs(vector - portable) <= accumulation)


def test_the_vector_paths_sum_the_same_integers() -> None:
    """AVX2 and AVX-512 VNNI differ only in how the integer products are summed, which is exact in
    both: their outputs are bit-identical (same digits, same float steps in the same order)."""
    rng = np.random.default_rng(7)
    n, k = 64, 256
    for offsets, rows, bits in itertools.product((False, True), (1, 2, 3), (24, 16)):
        packed, scales, stored_offsets, *_ = _weights(rng, n, k, 32, offsets, fp16=offsets)
        a = _activations(rng, rows, k)
        avx2, vnni = (_ctypes_product(a, packed, scales, stored_offsets, n, k, p, bits=bits) for p in (AVX2, VNNI))
        assert np.array_equal(avx2, vnni)


@pytest.mark.parametrize("path", KERNEL_PATHS, ids=KERNEL_PATHS.values())
@pytest.mark.parametrize("bits", [24, 16])
def test_a_nan_or_inf_activation_spoils_its_own_row_only(path: int, bits: int) -> None:
    """As in an fp32 product: a row holding a NaN or an inf comes out NaN/inf everywhere (the loop's
    check then names the broken graph), and the rows beside it are untouched."""
    rng = np.random.default_rng(3)
    n, k = 40, 96
    packed, scales, offsets, w, magnitude = _weights(rng, n, k, 32, True)
    a = _activations(rng, 3, k)
    a[0, 5], a[1, 70] = np.nan, np.inf
    y = _ctypes_product(a, packed, scales, offsets, n, k, path, bits=bits)
    assert not np.isfinite(y[:2]).any()
    assert np.all(np.abs(y[2] - a[2].astype(np.float64) @ w.T) <= _fp32_error_bound(a[2:], magnitude, bits)[0])


def _ctypes_product(
    a, packed, scales, offsets, n: int, k: int, path: int, swiglu: int = 0, bits: int = 24
) -> np.ndarray:
    """The kernel's product through its ctypes entry, on code path `path` (skips where this CPU
    lacks it)."""
    y = np.zeros((a.shape[0], n // 2 if swiglu else n), np.float32)
    status = _ctypes_call(a, packed, scales, offsets, n, k, path, swiglu, bits, y)
    if status == 3:
        pytest.skip(f"this CPU has no {KERNEL_PATHS[path]} instructions")
    assert status == 0
    return y


def _ctypes_call(a, packed, scales, offsets, n: int, k: int, path: int, swiglu: int, bits: int, y) -> int:
    """The ctypes entry's status: 0 done, 3 where this CPU lacks `path`."""
    entry = ctypes.CDLL(str(library_path())).matmul_int4
    entry.restype = ctypes.c_int
    pointer, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    entry.argtypes = [pointer, pointer, pointer, pointer, i64, i64, i64, i64, pointer, i32, i32, i32]
    args = [np.ascontiguousarray(a), packed, scales, offsets]
    pointers = (None if x is None else x.ctypes.data for x in args)  # no offsets: symmetric blocks
    return entry(*pointers, a.shape[0], n, k, 32, y.ctypes.data, path, swiglu, bits)


def _swiglu_bound(a: np.ndarray, w: np.ndarray, magnitude: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """silu(gate) * up in float64 from the exact product, and what fp32 may be off by: the product's
    own bound carried through (silu's slope is at most 1.1) plus a few ulps of the activation's
    arithmetic (exp, a division, two products)."""
    exact = a.astype(np.float64) @ w.T
    bound = _fp32_error_bound(a, magnitude)
    half = w.shape[0] // 2
    gate, up, gate_bound, up_bound = exact[:, :half], exact[:, half:], bound[:, :half], bound[:, half:]
    silu = gate * 0.5 * (1 + np.tanh(gate / 2))  # sigmoid without overflow
    result = silu * up
    carried = 1.1 * gate_bound * (np.abs(up) + up_bound) + np.abs(silu) * up_bound
    return result, carried + 8 * UNIT_ROUNDOFF * np.abs(result)


@pytest.mark.parametrize(
    ("n", "k", "block", "offsets"), [(96, 64, 32, True), (64, 576, 32, False), (32, 256, 128, True)]
)
@pytest.mark.parametrize("rows", [1, 2, 3, 17])
def test_swiglu_is_silu_of_the_gate_half_times_the_up_half(
    n: int, k: int, block: int, offsets: bool, rows: int
) -> None:
    """A Llama MLP's gate/up weight with the activation in the kernel: the first N/2 outputs are the
    gate, the rest the up projection, as the graph's Slice -> Sigmoid -> Mul -> Mul computed them."""
    rng = np.random.default_rng(n + k + rows)
    packed, scales, stored_offsets, w, magnitude = _weights(rng, n, k, block, offsets, fp16=offsets)
    a = _activations(rng, rows, k) * 0.05  # gate values over a range where silu bends
    y = _session(packed, scales, stored_offsets, n, k, block, swiglu=True).run(None, {"a": a})[0]
    expected, bound = _swiglu_bound(a, w, magnitude)
    assert y.shape == (rows, n // 2)
    assert np.all(np.abs(y - expected) <= bound), np.max(np.abs(y - expected) / bound)
    if block == 32:  # the portable path (any CPU) too, through the ctypes entry
        portable = _ctypes_product(a, packed, scales, stored_offsets, n, k, PORTABLE, swiglu=1)
        assert np.all(np.abs(portable - expected) <= bound)


def test_swiglu_saturates_as_silu_does() -> None:
    """Gates far below zero give 0 (not NaN from an overflowing exp), far above give the gate itself."""
    rng = np.random.default_rng(6)
    packed, scales, offsets, w, magnitude = _weights(rng, 32, 64, 32, False)
    a = _activations(rng, 4, 64) * 40
    y = _session(packed, scales, offsets, 32, 64, 32, swiglu=True).run(None, {"a": a})[0]
    expected, bound = _swiglu_bound(a, w, magnitude)
    assert np.isfinite(y).all() and np.all(np.abs(y - expected) <= bound)


def test_weights_that_are_not_initializers_are_refused() -> None:
    """The kernel packs its weights once, when the session is made: a B fed at run time would be
    silently stale, so the session refuses it."""
    rng = np.random.default_rng(3)
    packed, scales, offsets, *_ = _weights(rng, 16, 64, 32, True)
    with pytest.raises(Exception, match="must be constant initializers"):
        _session(packed, scales, offsets, 16, 64, 32, b_input=True)
    with pytest.raises(Exception, match="must be constant initializers"):  # not read as symmetric blocks
        _session(packed, scales, offsets, 16, 64, 32, offsets_input=True)


def test_inconsistent_shapes_are_refused_with_what_is_wrong() -> None:
    rng = np.random.default_rng(4)
    packed, scales, offsets, *_ = _weights(rng, 16, 64, 32, True)
    with pytest.raises(Exception, match=r"B must be \[N, K / block_size, block_size / 2\]"):
        _session(packed, scales, offsets, 16, 128, 32)  # K says 128, B holds 64
    with pytest.raises(Exception, match="block_size a multiple of 32"):
        _session(packed, scales, offsets, 16, 64, 16)
    odd = _weights(rng, 24, 64, 32, True)[:3]  # gate and up halves of 12 rows: not whole half-tiles
    with pytest.raises(Exception, match="with 1, N a multiple of 16"):
        _session(*odd, 24, 64, 32, swiglu=True)
    with pytest.raises(Exception, match="activation_bits must be 24 or 16"):
        _session(packed, scales, offsets, 16, 64, 32, bits=8)
    session = _session(packed, scales, offsets, 16, 64, 32, open_k=True)  # ONNX Runtime's own check passes
    with pytest.raises(Exception, match="A's last dimension must be K"):
        session.run(None, {"a": np.zeros((1, 65), np.float32)})


@pytest.mark.parametrize("offsets", [True, False], ids=["q4_1", "symmetric"])
def test_layerwise_reads_a_matmulint4_node_as_the_matmulnbits_nodes_the_exporter_writes(offsets: bool) -> None:
    """`diff --layerwise` compares MatMulNBits at levels 4 and 0: on a MatMulInt4 artifact it first
    rewrites each node into the exporter's MatMulNBits form, which must compute the same product."""
    import onnxruntime as ort
    from onnx import numpy_helper

    from llamatrt.tools.quant_twin import as_matmulnbits

    rng = np.random.default_rng(5)
    packed, scales, stored_offsets, w, _ = _weights(rng, 48, 96, 32, offsets)
    session = _session(packed, scales, stored_offsets, 48, 96, 32, lead=2)
    model = _model(packed, scales, stored_offsets, 48, 96, 32, lead=2)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert as_matmulnbits(model, inits) == 1
    kept = {i.name for i in model.graph.initializer}
    assert {"proj.q4", "proj.scales"} <= kept and "proj.q4.q4" not in kept  # the same tensors, by name
    assert {n.op_type for n in model.graph.node} >= {"MatMulNBits"} and MATMUL_INT4 not in {
        n.op_type for n in model.graph.node
    }
    a = rng.standard_normal((2, 3, 96)).astype(np.float32)
    rewritten = ort.InferenceSession(model.SerializeToString()).run(None, {"a": a})[0]
    assert np.allclose(rewritten, session.run(None, {"a": a})[0], rtol=1e-5, atol=1e-5)
    assert np.allclose(rewritten, a.astype(np.float64) @ w.T, rtol=1e-4, atol=1e-4)


def test_layerwise_reads_a_swiglu_node_as_the_product_and_the_activation_it_fused() -> None:
    import onnxruntime as ort
    from onnx import numpy_helper

    from llamatrt.tools.quant_twin import as_matmulnbits

    rng = np.random.default_rng(7)
    packed, scales, offsets, *_ = _weights(rng, 64, 96, 32, True)
    model = _model(packed, scales, offsets, 64, 96, 32, lead=2, swiglu=True)
    fused = _session(packed, scales, offsets, 64, 96, 32, lead=2, swiglu=True)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert as_matmulnbits(model, inits) == 1
    assert {"MatMulNBits", "Slice", "Sigmoid", "Mul"} <= {n.op_type for n in model.graph.node}
    assert [o.name for o in model.graph.output] == ["y"]  # the activation keeps the fused node's name
    a = rng.standard_normal((2, 3, 96)).astype(np.float32) * 0.1
    rewritten = ort.InferenceSession(model.SerializeToString()).run(None, {"a": a})[0]
    assert rewritten.shape == (2, 3, 32)
    assert np.allclose(rewritten, fused.run(None, {"a": a})[0], rtol=1e-5, atol=1e-6)


def test_the_library_names_the_path_this_cpu_runs() -> None:
    """`diff`'s kernel note names the path the library chose: the fastest one the ctypes entry can
    run here, and no faster one."""
    from llamatrt.base.custom_ops import kernel_path

    rng = np.random.default_rng(8)
    packed, scales, offsets, *_ = _weights(rng, 16, 64, 32, True)
    a = _activations(rng, 1, 64)
    chosen = {name: number for number, name in KERNEL_PATHS.items()}[kernel_path()]
    y = np.zeros((1, 16), np.float32)
    assert _ctypes_call(a, packed, scales, offsets, 16, 64, chosen, 0, 24, y) == 0
    if chosen < max(KERNEL_PATHS):
        assert _ctypes_call(a, packed, scales, offsets, 16, 64, chosen + 1, 0, 24, y) == 3
