"""Weight-only quantized artifacts on tiny models: a GGUF's Q4_0 / Q4_1 / Q8_0 blocks carried over
bit for bit (synthetic GGUF files written here with the `gguf` package), MatMulNBits graphs that
equal PyTorch on the dequantized weights, re-quantized float checkpoints, and `diff` passing a
quantized artifact and failing one with a corrupted scale."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import gguf
import numpy as np
import onnx
import pytest
import torch

from llamatrt.base.artifact.precision import PRECISIONS
from llamatrt.base.artifact.reader import read_manifest
from llamatrt.base.custom_ops import MATMUL_INT4
from llamatrt.exporter import quant_weights
from llamatrt.exporter.export import ExportOptions
from llamatrt.exporter.gguf_blocks import gguf_quantized_weights
from llamatrt.exporter.quant_weights import from_gguf_blocks, rtn_quantize
from llamatrt.models.checkpoint import load_checkpoint
from llamatrt.tools.compare import run_diff
from llamatrt.tools.pipeline import export_artifact
from tests.conftest import save_tiny_tokenizer, tiny_hf_model
from tests.safety_helpers import edit_manifest, run_cli

OPTIONS = {"max_cache_len": 32, "prefill_chunk": 8}
GGUF_NAMES = {
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "o_proj": "attn_output",
    "gate_proj": "ffn_gate",
    "up_proj": "ffn_up",
    "down_proj": "ffn_down",
}


def _block_model(layers: int = 2):
    """A tiny Llama whose every input dimension is a multiple of 32 (GGUF blocks)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=99,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0) if p.dim() > 1 else None
    return model


def _permute(rows: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (transformers undoes it on load)."""
    return rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _write_gguf(
    model,
    path: Path,
    qtype: gguf.GGMLQuantizationType,
    layer_qtypes: dict[str, gguf.GGMLQuantizationType] | None = None,
) -> dict[str, np.ndarray]:
    """Every 2-D tensor quantized to `qtype` (a layer of `layer_qtypes` to its own) as llama.cpp names
    and lays them out; returns the HF state dict as transformers would load the file (dequantized,
    q/k rows un-permuted)."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    cfg = model.config
    processor = LlamaTensorProcessor(
        {"num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads}
    )
    writer = gguf.GGUFWriter(str(path), "llama")
    loaded = {}
    for name, tensor in model.state_dict().items():
        array = tensor.float().numpy()
        if name == "model.embed_tokens.weight":
            target = "token_embd.weight"
        elif name.startswith("model.layers.") and array.ndim == 2:
            layer, kind = name.split(".")[2], name.split(".")[4]
            target = f"blk.{layer}.{GGUF_NAMES[kind]}.weight"
            if kind in ("q_proj", "k_proj"):
                array = _permute(array, cfg.num_attention_heads if kind == "q_proj" else cfg.num_key_value_heads)
        else:
            loaded[name] = array
            continue
        kind = (layer_qtypes or {}).get(name.split(".")[2], qtype) if name.startswith("model.layers.") else qtype
        blocks = gguf.quants.quantize(array, kind)
        writer.add_tensor(target, blocks, raw_dtype=kind)
        loaded[name] = processor.process(gguf.quants.dequantize(blocks, kind), target).weights
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return loaded


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_gguf_blocks_dequantize_bitwise_as_the_gguf_package_does(tmp_path: Path, qtype: str) -> None:
    kind = gguf.GGMLQuantizationType[qtype]
    weight = np.random.default_rng(1).standard_normal((48, 96)).astype(np.float32)
    writer = gguf.GGUFWriter(str(tmp_path / "w.gguf"), "llama")
    writer.add_tensor("w", gguf.quants.quantize(weight, kind), raw_dtype=kind)
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    tensor = gguf.GGUFReader(str(tmp_path / "w.gguf")).tensors[0]
    carried = from_gguf_blocks(qtype, np.asarray(tensor.data), 96)
    expected = gguf.quants.dequantize(np.asarray(tensor.data), kind)
    assert carried.dequantize().shape == (48, 96)
    assert np.array_equal(carried.dequantize(), expected)  # bit for bit
    assert carried.origin == f"gguf {qtype}" and (carried.offsets is not None) == (qtype == "Q4_1")


@pytest.fixture(scope="module", params=["Q4_0", "Q4_1", "Q8_0"])
def gguf_checkpoint(request, tmp_path_factory):
    """A tiny model written as a GGUF of one block type, and the HF folder transformers would load
    from it (the fp32 reference), as one Checkpoint that knows its GGUF file."""
    root = tmp_path_factory.mktemp(request.param)
    model = _block_model()
    loaded = _write_gguf(model, root / "m.gguf", gguf.GGMLQuantizationType[request.param])
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in loaded.items()}, strict=False)
    model.save_pretrained(root / "hf")
    save_tiny_tokenizer(root / "hf")
    return request.param, replace(load_checkpoint(root / "hf"), gguf=root / "m.gguf"), root


@pytest.fixture(scope="module")
def gguf_artifact(gguf_checkpoint) -> Path:
    """The int4 export of that checkpoint at accuracy level 0 (the file's blocks, fp32 activations)."""
    qtype, checkpoint, root = gguf_checkpoint
    out = root / f"art-{qtype}"
    export_artifact(checkpoint, out, ExportOptions(quantize="int4", accuracy_level=0, **OPTIONS))
    return out


def test_the_artifact_carries_the_gguf_blocks_and_equals_pytorch_on_them(gguf_checkpoint, gguf_artifact) -> None:
    qtype, checkpoint, _ = gguf_checkpoint
    carried = gguf_quantized_weights(checkpoint.gguf, checkpoint.config)
    model = checkpoint.build_model()
    for name, weight in carried.items():  # the fused q|k|v rows in transformers' order, bit for bit
        assert np.array_equal(weight.dequantize(), model.state_dict()[name].numpy()), name
    out = gguf_artifact
    manifest = read_manifest(out)
    assert set(manifest.quantization["tensors"]) == set(carried) and len(carried) == 1 + 4 * 2
    assert all(origin.startswith(f"gguf {qtype}") for origin in manifest.quantization["tensors"].values())
    # fp32 activation arithmetic against PyTorch on the very same weights; 8-bit weights run as two
    # int8 passes (tests/exporter/test_two_pass.py bounds them against one pass), held to the export's
    # fp32 tolerance rather than to fp32 rounding
    tolerance = PRECISIONS["float32"].export_tolerance if qtype == "Q8_0" else 1e-4
    assert manifest.validation["max_abs_logits_error"] < tolerance
    graph = onnx.load(out / "model.ort.onnx", load_external_data=False)
    products = [n for n in graph.graph.node if n.op_type in ("MatMulNBits", MATMUL_INT4)]
    levels = {a.i for n in products for a in n.attribute if a.name == "accuracy_level"}
    # one product per projection and the tied head: llamatrt's MatMulInt4 (fp32 activations as int8
    # digits) for 4 bits, two int8 passes of MatMulNBits for 8
    assert len(products) == 1 + 4 * 2
    if qtype == "Q8_0":  # no 4-bit product: the artifact names no kernel of llamatrt's, needs no library
        assert {n.op_type for n in products} == {"MatMulNBits"} and levels == {4}
        assert manifest.quantization["int4_kernel"] == "onnxruntime"
    else:
        assert {n.op_type for n in products} == {MATMUL_INT4} and manifest.quantization["int4_kernel"] == "llamatrt"
        # a GGUF's own blocks keep fp32's 24-bit activations: their products equal the reference's
        assert {a.i for n in products for a in n.attribute if a.name == "activation_bits"} == {24}
        assert manifest.quantization["int4_activation_bits"] == [24]
        # each layer's gate/up product applies SwiGLU in the kernel (exporter.ort_fusions.fuse_swiglu),
        # and the validation above ran that graph
        gated = [n for n in products if any(a.name == "swiglu" and a.i == 1 for a in n.attribute)]
        assert len(gated) == 2 and not [n for n in graph.graph.node if n.op_type == "Sigmoid"]
        # packing (exporter.ort_packing): each attention node reads its q/k/v product through one GatherND
        # and its output reaches the o projection through one, with no view of the trace left between them
        # (an 8-bit weight's two passes end in an Add, which keeps its view)
        producer = {out: n for n in graph.graph.node for out in n.output}
        consumers = {
            name: [n for n in graph.graph.node if name in n.input] for n in graph.graph.node for name in n.output
        }
        for attention in (n for n in graph.graph.node if n.op_type == "GroupQueryAttention"):
            gather_in = producer[attention.input[0]]
            assert gather_in.op_type == "GatherND" and producer[gather_in.input[0]].op_type in (
                "MatMulNBits",
                MATMUL_INT4,
            )
            (gather_out,) = consumers[attention.output[0]]
            assert gather_out.op_type == "GatherND"
            assert {n.op_type for n in consumers[gather_out.output[0]]} == {MATMUL_INT4}
    # the head reads the quantized rows, not a transposed float table (Q4_1 transposes its scales)
    assert all(n.input[0].endswith(".scales") for n in graph.graph.node if n.op_type == "Transpose")
    assert not [
        i.name
        for i in graph.graph.initializer
        if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2 and i.dims[0] * i.dims[1] >= 64 * 64
    ]  # no float weight matrix is left


def test_diff_passes_the_lossless_import_and_fails_a_corrupted_scale(
    gguf_checkpoint, gguf_artifact, tmp_path: Path
) -> None:
    qtype, checkpoint, _ = gguf_checkpoint
    if qtype != "Q4_1":
        pytest.skip("one block type is enough for diff")
    out = gguf_artifact
    report = run_diff(out, ["onnxruntime"], reference=str(checkpoint.hf_dir), steps=6)
    assert report, str(report)
    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(out, broken)
    _scale_tensor(broken, "model.layers.1.mlp.down_proj.weight.scales", 4.0)
    edit_manifest(broken, lambda m: m.__setitem__("source", str(checkpoint.hf_dir)))
    result = run_cli(["diff", str(broken), "--no-verify", "--steps", "6"], tmp_path)
    assert result.returncode == 1 and "FAIL" in result.stdout, result.stdout + result.stderr


def _scale_tensor(artifact: Path, initializer: str, factor: float) -> None:
    """Multiply one float initializer in the weights file (found through the graph's external
    data) and re-hash: an exporter bug, not a damaged file."""
    from llamatrt.base.artifact.reader import file_sha256

    graph = onnx.load(artifact / "model.ort.onnx", load_external_data=False)
    entry = next(i for i in graph.graph.initializer if i.name == initializer)
    where = {e.key: e.value for e in entry.external_data}
    data = np.fromfile(artifact / "weights.data", dtype=np.uint8)
    offset, length = int(where["offset"]), int(where["length"])
    data[offset : offset + length].view(np.float32)[:] *= factor
    data.tofile(artifact / "weights.data")
    edit_manifest(artifact, lambda m: m["weights"].__setitem__("sha256", file_sha256(artifact / "weights.data")))
    sha = file_sha256(artifact / "model.ort.onnx")
    edit_manifest(
        artifact, lambda m: next(g for g in m["graphs"] if g["name"] == "model.ort").__setitem__("sha256", sha)
    )


@pytest.mark.parametrize(("scheme", "variant", "level"), [("int4", "gqa-tied", 0), ("int8", "mha-untied", 4)])
@pytest.mark.slow  # end to end, over 6 s here: `make test` runs it, `make test-fast` does not
def test_a_float_checkpoint_is_quantized_by_onnxruntime_and_runs_its_dequantized_weights(
    tmp_path: Path, scheme: str, variant: str, level: int
) -> None:
    tiny_hf_model(variant).save_pretrained(tmp_path / "hf")
    save_tiny_tokenizer(tmp_path / "hf")
    manifest = export_artifact(
        tmp_path / "hf", tmp_path / "q", ExportOptions(quantize=scheme, accuracy_level=level, **OPTIONS)
    )
    # level 4 (int8 activations) is validated through its accuracy_level-0 twin: the wiring, exactly
    assert manifest.validation["max_abs_logits_error"] < 1e-4 and manifest.quantization["accuracy_level"] == level
    assert ("accuracy_level 0" in manifest.validation["backend"]) == (level == 4)
    assert {g.weights for g in manifest.graphs.values()} == {scheme}
    assert all(origin.startswith("rtn") for origin in manifest.quantization["tensors"].values())
    if scheme == "int4":  # blocks made here: 16-bit activations, validated through their 24-bit twin
        graph = onnx.load(tmp_path / "q" / "model.ort.onnx", load_external_data=False)
        products = [n for n in graph.graph.node if n.op_type == MATMUL_INT4]
        assert products and {a.i for n in products for a in n.attribute if a.name == "activation_bits"} == {16}
        assert manifest.quantization["int4_activation_bits"] == [16] and "24-bit" in manifest.validation["backend"]
    fp32 = sum(p.numel() * 4 for p in tiny_hf_model(variant).parameters())
    assert manifest.weights_bytes < fp32 * (0.3 if scheme == "int4" else 0.45)
    generated = run_cli(["generate", str(tmp_path / "q"), "--prompt", "w5 w6 w7", "--max-new-tokens", "4"], tmp_path)
    assert generated.returncode == 0, generated.stderr
    on_torch = run_cli(["generate", str(tmp_path / "q"), "--backend", "torch", "--prompt", "w5"], tmp_path)
    assert on_torch.returncode == 1 and "--backend onnxruntime" in on_torch.stderr


@pytest.mark.parametrize("variant", ["gqa-tied", "mha-untied"])
def test_blocks_wider_than_a_row_are_padded_and_the_lookup_reads_them(tmp_path: Path, variant: str) -> None:
    """Blocks of 128 over rows of 64 (and 37): MatMulNBits pads the last block; the embedding lookup
    reads the same padded blocks (it once kept the float table instead, while the reference it was
    validated against read the quantized rows: 0.2 apart)."""
    tiny_hf_model(variant).save_pretrained(tmp_path / "hf")
    save_tiny_tokenizer(tmp_path / "hf")
    manifest = export_artifact(
        tmp_path / "hf", tmp_path / "q", ExportOptions(quantize="int4", block_size=128, **OPTIONS)
    )
    assert manifest.validation["max_abs_logits_error"] < 1e-4
    graph = onnx.load(str(tmp_path / "q" / "model.ort.onnx"), load_external_data=False)
    tables = [i.name for i in graph.graph.initializer if list(i.dims) == [99, 64]]  # [vocab, hidden]
    assert not tables, tables  # no float embedding table is kept


@pytest.mark.parametrize(
    ("variant", "head", "asked", "block", "bits"),
    [
        ("gqa-tied", "model.embed_tokens.weight", None, 32, 8),  # the default beside 4-bit projections
        ("mha-untied", "lm_head.weight", None, 32, 8),
        ("mha-untied", "lm_head.weight", "int4", 32, 4),  # --head-quantize int4
        ("gqa-tied", "model.embed_tokens.weight", None, 64, 4),  # TensorRT's block form: its graphs take int4 only
    ],
)
def test_the_head_keeps_8_bits_beside_4_bit_projections(
    tmp_path: Path, variant: str, head: str, asked: str | None, block: int, bits: int
) -> None:
    """The head (the tied embedding, which is the same matrix) in 8-bit blocks as llama.cpp's Q4_0 keeps
    it, every other matrix in 4-bit ones, validated like any other artifact; int4 where asked, or
    where the blocks are TensorRT's form."""
    tiny_hf_model(variant).save_pretrained(tmp_path / "hf")
    save_tiny_tokenizer(tmp_path / "hf")
    options = ExportOptions(quantize="int4", head_quantize=asked, block_size=block, **OPTIONS)
    manifest = export_artifact(tmp_path / "hf", tmp_path / "q", options)
    tensors = manifest.quantization["tensors"]
    assert tensors.pop(head) == f"rtn ({bits}-bit, block {block})"
    assert set(tensors.values()) == {f"rtn (4-bit, block {block})"}, tensors
    assert manifest.validation["max_abs_logits_error"] < 1e-4


def test_an_8_bit_weight_is_the_sum_of_its_two_4_bit_halves() -> None:
    rng = np.random.default_rng(0)
    weight = rtn_quantize(rng.standard_normal((48, 96)).astype(np.float32), 8, 32)
    high, low = weight.nibble_halves()
    assert (high.bits, low.bits, high.zero, low.zero) == (4, 4, 8, 0) and not low.offsets.any()
    assert high.packed.nbytes + low.packed.nbytes == weight.packed.nbytes  # still one copy of the matrix
    assert np.allclose(high.dequantize() + low.dequantize(), weight.dequantize(), rtol=0, atol=1e-6)


@pytest.mark.slow  # end to end, over 6 s here: `make test` runs it, `make test-fast` does not
@pytest.mark.parametrize("bits", [4, 8])
def test_a_weight_quantized_a_slice_of_rows_at_a_time_equals_it_quantized_whole(monkeypatch, bits: int) -> None:
    """rtn_quantize works a few rows at a time (no whole fp32 copy of a large head): each row's blocks
    are its own and the fp16 choice is the weight's, so the result is the same bytes, whatever the slice."""
    weight = np.random.default_rng(1).standard_normal((300, 96)).astype(np.float32)
    whole = rtn_quantize(weight, bits, 32)
    monkeypatch.setattr(quant_weights, "RTN_CHUNK_BYTES", 7 * 96 * 4)  # 7 rows a slice, the last of 6
    sliced = rtn_quantize(weight, bits, 32)
    assert np.array_equal(sliced.packed, whole.packed) and np.array_equal(sliced.scales, whole.scales)
    assert sliced.packed.shape[0] == sliced.scales.shape[0] == 300


@pytest.mark.parametrize("bits", [4, 8])
def test_round_to_nearest_keeps_onnxruntimes_scales_as_fp16_values(bits: int) -> None:
    """The scale of each block is ONNX Runtime's quantizer's (its largest-magnitude value over
    -2^(bits-1)) rounded to fp16, as a GGUF's Q4_0 keeps it, and each code is its value rounded with
    that scale, clipped to the codes there are (a value of the extreme's magnitude and the other sign
    clips to 2^(bits-1) - 1)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, DefaultWeightOnlyQuantizer

    weight = np.random.default_rng(2).standard_normal((40, 80)).astype(np.float32) * 0.05  # 80: a padded block
    ours = rtn_quantize(weight, bits, 32)
    config = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True, bits=bits)
    _, theirs, _ = DefaultWeightOnlyQuantizer(config).qbits_block_quant(np.ascontiguousarray(weight.T))
    theirs = theirs.astype(np.float32).reshape(40, -1)
    assert np.array_equal(ours.scales, theirs.astype(np.float16).astype(np.float32))
    assert not np.array_equal(ours.scales, theirs)  # the rounding did something here
    padded = np.zeros((40, 96), np.float32)
    padded[:, :80] = weight
    levels = 1 << (bits - 1)
    rounded = np.clip(np.rint(padded.reshape(40, 3, 32) / ours.scales[..., None]), -levels, levels - 1)
    assert np.array_equal(ours.codes().astype(np.int64) - levels, rounded)


def test_scales_outside_fp16s_normal_range_stay_fp32() -> None:
    weight = np.random.default_rng(3).standard_normal((16, 64)).astype(np.float32)
    weight[3, :32] *= 1e-5  # one block's scale below 2^-14
    quantized = rtn_quantize(weight, 4, 32)
    extremes = np.take_along_axis(
        weight.reshape(16, 2, 32), np.abs(weight.reshape(16, 2, 32)).argmax(-1)[..., None], -1
    )
    assert np.array_equal(quantized.scales, extremes[..., 0] / np.float32(-8))  # exact fp32 scales, every block
    assert not np.array_equal(quantized.scales, quantized.scales.astype(np.float16).astype(np.float32))


def test_quantize_refuses_what_it_cannot_make(tmp_path: Path) -> None:
    tiny_hf_model("gqa-tied").save_pretrained(tmp_path / "hf")
    save_tiny_tokenizer(tmp_path / "hf")
    short = tmp_path / "short.txt"
    short.write_text("w5 w6 w7")
    for args, words in [
        (["--quantize", "int4", "--dtype", "fp16"], "drop --dtype"),
        (["--quantize", "int4", "--block-size", "24"], "block size 24"),
        (["--quantize", "int2"], "int2"),
        (["--quantize", "int4", "--accuracy-level", "2"], "--accuracy-level 2"),
        (["--head-quantize", "int8"], "--head-quantize int8 goes with --quantize"),
        (["--calibration", str(short)], "--calibration goes with --quantize"),
        (["--quantize", "int4", "--calibration", str(tmp_path / "none.txt")], "is not a file"),
        (["--quantize", "int4", "--calibration", str(short)], "is 3 tokens; give at least 256"),
    ]:
        result = run_cli(["export", "--model", str(tmp_path / "hf"), "--out", str(tmp_path / "x"), *args], tmp_path)
        assert result.returncode != 0 and words in result.stderr and "Traceback" not in result.stderr, result.stderr
        assert not (tmp_path / "x").exists()


def test_build_with_no_graph_tensorrt_takes_fails_and_leaves_the_artifact(
    gguf_checkpoint, gguf_artifact, tmp_path: Path
) -> None:
    qtype, _, _ = gguf_checkpoint
    if qtype != "Q4_1":
        pytest.skip("one block type is enough")
    before = {p.name: p.read_bytes() for p in gguf_artifact.iterdir() if p.is_file()}
    for args in (
        ["build", str(gguf_artifact), "--engine", "tensorrt-rtx"],
        ["generate", str(gguf_artifact), "--backend", "tensorrt", "--prompt", "w5"],
    ):
        result = run_cli(args, tmp_path)
        assert result.returncode == 1, result.stderr
        assert result.stderr.startswith("error: ") and "no graph TensorRT can take" in result.stderr, result.stderr
        assert "--block-size 64" in result.stderr and "CUDA" not in result.stderr
    assert {p.name: p.read_bytes() for p in gguf_artifact.iterdir() if p.is_file()} == before


@pytest.mark.slow  # end to end, over 6 s here: `make test` runs it, `make test-fast` does not
def test_layerwise_compares_int8_with_fp32_activations_in_onnx_runtimes_graph(
    gguf_checkpoint, gguf_artifact, tmp_path: Path
) -> None:
    qtype, checkpoint, _ = gguf_checkpoint
    if qtype != "Q4_1":
        pytest.skip("one block type is enough")
    from llamatrt.tools.quant_layerwise import run_quant_layerwise

    report = run_quant_layerwise(gguf_artifact, prompts=[(True, "w5 w6 w7 w8"), (True, "w9 w10")], verify=False)
    assert report and report.artifact_level == 0  # the artifact itself runs no int8 arithmetic
    layers = checkpoint.config.num_layers
    assert len(report.projections) == 4 * layers + 1 and len(report.layers) == layers
    assert {k for k, *_ in report.by_kind()} == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj", "head"}
    # int8 activations cost something, but a fraction of a percent to a few percent, never a wrong wire
    assert all(0 < p.rms_rel_error < 0.1 and 0 < p.simulated_rel_error < 0.1 for p in report.projections)
    result = run_cli(
        ["diff", str(gguf_artifact), "--layerwise", "--no-verify", "--report", str(tmp_path / "l.md")], tmp_path
    )
    assert result.returncode == 0 and "own error of each projection kind" in result.stdout, result.stderr
    assert "| down_proj |" in (tmp_path / "l.md").read_text()


@pytest.mark.slow  # an export end to end
def test_without_the_built_kernel_an_export_falls_back_and_an_artifact_that_needs_it_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An install without a C compiler has no MatMulInt4 library: exporting still works, on
    MatMulNBits, and an artifact made where it was built names what is missing when opened."""
    import llamatrt.exporter.export as export_module
    import llamatrt.runtime.ort_backend as ort_backend
    from llamatrt.base.errors import BackendUnavailable
    from llamatrt.runtime.registry import open_backend

    tiny_hf_model("gqa-tied").save_pretrained(tmp_path / "hf")
    save_tiny_tokenizer(tmp_path / "hf")
    built = export_artifact(tmp_path / "hf", tmp_path / "built", ExportOptions(quantize="int4", **OPTIONS))
    assert built.quantization["int4_kernel"] == "llamatrt"
    monkeypatch.setattr(export_module, "library_path", lambda: None)
    fallback = export_artifact(tmp_path / "hf", tmp_path / "fallback", ExportOptions(quantize="int4", **OPTIONS))
    assert fallback.quantization["int4_kernel"] == "onnxruntime"
    graph = onnx.load(tmp_path / "fallback" / "model.ort.onnx", load_external_data=False)
    assert MATMUL_INT4 not in {n.op_type for n in graph.graph.node}
    assert "not built here" in caplog.text and "pip install -e ." in caplog.text
    monkeypatch.setattr(ort_backend, "library_path", lambda: None)
    with pytest.raises(BackendUnavailable, match=r"lacks .* reinstall with gcc present"):
        open_backend(tmp_path / "built", "onnxruntime", verify=False)
    open_backend(tmp_path / "fallback", "onnxruntime", verify=False).close()  # needs nothing more
