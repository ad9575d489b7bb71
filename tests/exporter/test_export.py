"""Exported graphs equal PyTorch; one weights file; fp16 keeps fp32 islands; atomic, checked output."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from llamatrt.base.artifact import precision as precision_module
from llamatrt.base.artifact.feeds import graph_feeds
from llamatrt.base.artifact.manifest import Manifest
from llamatrt.base.artifact.reader import read_manifest
from llamatrt.base.errors import ArtifactExistsError, CheckpointError, InputError, ValidationError
from llamatrt.exporter.export import ExportOptions
from llamatrt.models import load_checkpoint
from llamatrt.models.kv_cache import empty_cache
from llamatrt.runtime.registry import BACKENDS, backend_class
from llamatrt.tools.pipeline import export_artifact
from tests.conftest import save_tiny_tokenizer, tiny_hf_model

CACHE, CHUNK = 48, 8


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny") / "llama3-gqa"
    tiny_hf_model("gqa-llama3").save_pretrained(folder)
    save_tiny_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def artifacts(tiny_dir: Path, tmp_path_factory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("art")
    return {b: _export(tiny_dir, root / f"b{b}", batch_size=b) for b in (1, 3)}


def _export(model, out: Path, **kw) -> Path:
    opts = {"batch_size": 1, "max_cache_len": CACHE, "prefill_chunk": CHUNK, **kw}
    export_artifact(model, out, ExportOptions(**opts))
    return out


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _run_graph(session: ort.InferenceSession, spec, feeds: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    return [torch.from_numpy(t) for t in session.run(None, {k: v.numpy() for k, v in feeds.items()})]


@torch.no_grad()
@pytest.mark.parametrize("graphs", ["portable", "ort_attention"])
@pytest.mark.parametrize("batch", [1, 3])
def test_onnx_equals_pytorch_prefill_and_16_decode_steps(artifacts, tiny_dir: Path, batch: int, graphs: str) -> None:
    """Each row prefilled alone (batch 1, on its row of the cache, left-padded to the chunk), then
    16 decode steps of all rows, run on the graph files directly and on PyTorch with the same feeds."""
    folder = artifacts[batch]
    model = load_checkpoint(tiny_dir).build_model()
    manifest = read_manifest(folder)
    if graphs == "portable":
        prefill, decode = manifest.graphs["prefill"], manifest.graphs["decode"]
    else:
        prefill = decode = manifest.graphs["model.ort"]  # one graph with open rows and tokens
    sessions = {spec.name: _session(folder / spec.path) for spec in (prefill, decode)}
    cache = empty_cache(model.config, batch, CACHE, torch.float32)
    ort_cache = [t.clone() for t in cache]  # eager torch writes its cache in place
    mask = torch.ones(batch, CACHE, dtype=torch.long)
    last = []
    for b, n in enumerate([CHUNK, 5, 2][:batch]):  # rows shorter than the chunk are left-padded
        ids = torch.zeros(1, CHUNK, dtype=torch.long)
        ids[0, CHUNK - n :] = torch.arange(n) * 7 % 90 + 3 + b
        positions = (torch.arange(CHUNK) - (CHUNK - n)).clamp(min=0)[None]
        mask[b, : CHUNK - n] = 0
        rows = [t[b : b + 1] for t in cache]
        ref = model(*graph_feeds(prefill, ids, positions, 0, mask[b : b + 1], rows).values())
        out = _run_graph(
            sessions[prefill.name],
            prefill,
            graph_feeds(prefill, ids, positions, 0, mask[b : b + 1], [t[b : b + 1] for t in ort_cache]),
        )
        assert (out[0] - ref[0]).abs().max() <= 1e-4, f"prefill of row {b}"
        for t, new in zip(ort_cache, out[1:], strict=True):
            t[b : b + 1] = new
        last.append((ref[0].argmax(-1), n))
    ids = torch.stack([t for t, _ in last])  # (batch, 1)
    positions = torch.tensor([[n] for _, n in last])
    for step in range(16):
        ref = model(*graph_feeds(decode, ids, positions, CHUNK + step, mask, cache).values())
        out = _run_graph(
            sessions[decode.name], decode, graph_feeds(decode, ids, positions, CHUNK + step, mask, ort_cache)
        )
        assert (out[0] - ref[0]).abs().max() <= 1e-4, f"decode step {step}"
        cache, ort_cache = list(ref[1:]), out[1:]
        ids, positions = ref[0].argmax(-1, keepdim=True), positions + 1


def test_manifest_round_trips_and_names_every_tensor(artifacts) -> None:
    folder = artifacts[3]
    manifest = read_manifest(folder)
    assert Manifest.from_json(manifest.to_json()) == manifest
    described = {(g.role, g.batch, g.seq_len, g.attention) for g in manifest.graphs.values()}
    assert described == {
        ("prefill", 1, CHUNK, "portable"),  # one request's prompt into one row of the B-row cache
        ("decode", 3, 1, "portable"),  # every row at its own slot
        ("any", None, None, "onnxruntime"),  # rows and tokens open: one session serves both
    }
    # what runs each graph is each backend's declaration, not the manifest's
    assert "backends" not in json.loads((folder / "manifest.json").read_text())["graphs"][0]
    runners = {g.attention: {k for k in BACKENDS if backend_class(k).runs(g)} for g in manifest.graphs.values()}
    assert runners == {"portable": {"torch", "onnxruntime", "tensorrt"}, "onnxruntime": {"torch", "onnxruntime"}}
    fused_entry = next(g for g in manifest.to_json()["graphs"] if g["name"] == "model.ort")
    assert fused_entry["path"] == "model.ort.onnx" and fused_entry["requires"] == {"onnxruntime": "1.32"}
    assert fused_entry["inputs"][0]["shape"] == ["batch", "tokens"]
    for graph in manifest.graphs.values():
        proto = onnx.load(str(folder / graph.path), load_external_data=False)
        io = [
            (v.name, tuple(d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim)) for v in proto.graph.input
        ]
        assert io == [(t.name, t.shape) for t in graph.inputs], graph.name
        assert [v.name for v in proto.graph.output] == [t.name for t in graph.outputs]
        ops = [n.op_type for n in proto.graph.node]
        assert proto.opset_import[0].version == 24 and not set(ops) & {"If", "Loop", "Scan"}
        if graph.attention == "portable":
            assert ops.count("TensorScatter") == 2 * manifest.config.num_layers, graph.name
        else:
            assert ops.count("GroupQueryAttention") == manifest.config.num_layers and "TensorScatter" not in ops
    assert manifest.eos_token_ids == (2,) and manifest.validation["max_abs_logits_error"] <= 1e-4


def test_one_weights_file_shared_by_all_graphs(artifacts, tiny_dir: Path) -> None:
    folder = artifacts[1]
    params = sum(p.numel() for p in load_checkpoint(tiny_dir).build_model().parameters())
    weights = (folder / "weights.data").stat().st_size
    assert 0.95 * params * 4 <= weights <= 1.1 * params * 4  # each parameter once, for all three graphs
    parameters = {str(t["offset"]) for t in read_manifest(folder).weights_map.values()}
    assert list(read_manifest(folder).graphs) == ["prefill", "decode", "model.ort"]
    for graph in ("prefill", "decode", "model.ort"):
        proto = onnx.load(str(folder / f"{graph}.onnx"), load_external_data=False)
        ext = [{e.key: e.value for e in i.external_data} for i in proto.graph.initializer if i.external_data]
        assert {e["location"] for e in ext} == {"weights.data"}
        assert parameters <= {e["offset"] for e in ext}, graph
    assert sorted(p.name for p in folder.iterdir()) == [
        "decode.onnx",
        "manifest.json",
        "model.ort.onnx",
        "prefill.onnx",
        "tokenizer",
        "weights.data",
    ]


def test_a_head_dim_the_fused_kernel_cannot_take_gets_the_portable_graphs_only(tmp_path: Path) -> None:
    folder = _export(tiny_hf_model("mha-bias-linear"), tmp_path / "head-dim-8")  # head_dim 8, not 16k
    manifest = read_manifest(folder)
    assert {g.attention for g in manifest.graphs.values()} == {"portable"} and not list(folder.glob("*.ort.onnx"))
    assert set(manifest.validation["max_abs_logits_error_by_graphs"]) == {"portable"}


def test_an_onnxruntime_too_old_for_fused_attention_gets_the_portable_graphs_only(
    tiny_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "__version__", "1.31.1")  # cannot validate the fused graphs
    manifest = read_manifest(_export(tiny_dir, tmp_path / "old-ort"))
    assert {g.attention for g in manifest.graphs.values()} == {"portable"}


def test_fp16_keeps_fp32_norms_softmax_logits_and_finite_constants(tiny_dir: Path, tmp_path: Path) -> None:
    folder = _export(tiny_dir, tmp_path / "fp16", dtype="fp16")
    proto = onnx.load(str(folder / "decode.onnx"))
    types = {
        v.name: v.type.tensor_type.elem_type for v in [*proto.graph.value_info, *proto.graph.input, *proto.graph.output]
    }
    fp32, fp16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    seen = set()
    for node in proto.graph.node:
        if node.op_type in ("Softmax", "ReduceMean", "RMSNormalization"):
            seen.add(node.op_type)
            stash = next((a.i for a in node.attribute if a.name == "stash_type"), 1)
            assert types[node.input[0]] == fp32 or (node.op_type == "RMSNormalization" and stash == 1), node.name
    assert {"Softmax", "RMSNormalization"} <= seen
    assert types["logits"] == fp32 and types["past_key_values.0.key"] == fp16
    constants = [onnx.numpy_helper.to_array(i) for i in proto.graph.initializer]
    constants += [
        onnx.numpy_helper.to_array(a.t)
        for n in proto.graph.node
        if n.op_type == "Constant"
        for a in n.attribute
        if a.name == "value"
    ]
    for c in constants:
        if c.dtype == np.float16:
            assert np.isfinite(c).all()
    assert read_manifest(folder).validation["max_abs_logits_error"] <= 0.25


@pytest.mark.slow  # end to end, over 6 s here: `make test` runs it, `make test-fast` does not
def test_existing_output_needs_force_and_survives_errors(
    artifacts, tiny_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    out = tmp_path / "a"
    _export(tiny_dir, out)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(ArtifactExistsError, match="pass --force"):
        _export(tiny_dir, out)
    fp32 = precision_module.PRECISIONS["float32"]
    monkeypatch.setitem(precision_module.PRECISIONS, "float32", replace(fp32, export_tolerance=-1.0))  # all fail
    with pytest.raises(ValidationError, match="differ from PyTorch"):
        export_artifact(tiny_dir, out, ExportOptions(max_cache_len=CACHE, prefill_chunk=CHUNK), force=True)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # old artifact intact
    assert [p.name for p in tmp_path.iterdir()] == ["a"]  # no temp folder left behind
    with pytest.raises(ValidationError):
        _export(tiny_dir, tmp_path / "b")
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    ("opts", "error", "needle"),
    [
        ({"max_cache_len": 4, "prefill_chunk": 8}, InputError, "smaller than the prefill chunk"),
        ({"batch_size": 0}, InputError, "must be >= 1"),
        ({"dtype": "int3"}, InputError, "unknown dtype"),
    ],
)
def test_bad_options_fail_before_work(tiny_dir: Path, tmp_path: Path, opts, error, needle) -> None:
    with pytest.raises(error, match=needle):
        export_artifact(tiny_dir, tmp_path / "x", ExportOptions(**opts))
    assert not (tmp_path / "x").exists()


def test_unreadable_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        export_artifact(tmp_path / "missing", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_no_disk_space_fails_before_work(tiny_dir: Path, tmp_path: Path, monkeypatch) -> None:
    import shutil as shutil_module
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil_module, "disk_usage", lambda _: usage(10**9, 10**9, 10))
    with pytest.raises(InputError, match="not enough disk space"):
        export_artifact(tiny_dir, tmp_path / "x", ExportOptions(max_cache_len=CACHE, prefill_chunk=CHUNK))
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_reduced_precision_artifact_maps_every_parameter(tiny_dir: Path, tmp_path: Path, dtype: str) -> None:
    from llamatrt.runtime.torch_backend import state_dict_from_artifact

    folder = _export(tiny_dir, tmp_path / dtype, dtype=dtype)
    manifest = read_manifest(folder)
    expected = load_checkpoint(tiny_dir).build_model(torch.float16 if dtype == "fp16" else torch.bfloat16).state_dict()
    assert set(manifest.weights_map) == set(expected)
    assert manifest.weights_map["model.norm.weight"]["dtype"] == "float32"  # folded fp32 upcast, found by content
    loaded = state_dict_from_artifact(folder, manifest)
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name


def test_the_space_an_export_needs_counts_its_weights_as_stored(tiny_dir: Path, tmp_path: Path) -> None:
    """The disk check's bound: a half-precision export's weights at two bytes each, not four; a
    quantized export's at its blocks' size (an int4 export needs a fraction of fp32's space), and
    never less than what the export writes (TensorRT's graphs' own copy of int4 blocks of 64 too)."""
    from llamatrt.exporter.export import _artifact_bytes, _float_bytes, _quantized_bytes

    config = load_checkpoint(tiny_dir).config
    params = sum(p.numel() for p in load_checkpoint(tiny_dir).build_model().parameters())
    fp32, fp16 = _artifact_bytes(config, ExportOptions(), 3), _artifact_bytes(config, ExportOptions(dtype="fp16"), 3)
    assert abs((fp32 - fp16) - 1.02 * 2 * params) <= 2
    int4 = ExportOptions(quantize="int4")
    assert _quantized_bytes(config, int4) < _float_bytes(config, torch.float32) / 3
    for block in (32, 64):
        options = replace(int4, block_size=block, max_cache_len=CACHE, prefill_chunk=CHUNK)
        folder = tmp_path / f"int4-{block}"
        export_artifact(tiny_dir, folder, options)
        written = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        manifest = read_manifest(folder)
        assert manifest.weights_bytes <= _quantized_bytes(config, options), block
        assert written <= _artifact_bytes(config, options, len(manifest.graphs)), block


def test_the_graphs_of_an_export_share_one_registry_of_lowerings(tiny_dir: Path, tmp_path: Path) -> None:
    """torch.onnx builds its registry of lowerings anew for every graph (about 1 s each); the exporter
    builds it once a process (exporter.onnx_export._lowerings), and gives torch.onnx its own builder
    back after each trace. The other tests here check the graphs it makes."""
    from torch.onnx._internal.exporter import _registration

    from llamatrt.exporter import onnx_export

    original = _registration.ONNXRegistry.__dict__["from_torchlib"]
    onnx_export._lowerings.cache_clear()
    manifest = read_manifest(_export(tiny_dir, tmp_path / "a"))
    calls = onnx_export._lowerings.cache_info()
    assert calls.misses == 1 and calls.hits == len(manifest.graphs) - 1 >= 2
    assert _registration.ONNXRegistry.__dict__["from_torchlib"] is original
