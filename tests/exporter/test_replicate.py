"""Exports deeper than the traced twin: layers 2.. are replicated from layer 1 and streamed.

Export validation runs the two-layer twin; these tests hold the whole replicated artifact to PyTorch
on the full model (the same check, `tools.export_check.validate_artifact`, at every depth), in every
graph form and weight format, and hold an export's memory to one layer and the embedding at any depth.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from llamatrt.base.artifact.reader import read_manifest
from llamatrt.exporter.export import ExportOptions
from llamatrt.exporter.quant_plan import ParameterQuantizer
from llamatrt.models import load_checkpoint
from llamatrt.models.llama import StaticLlama
from llamatrt.tools.export_check import validate_artifact
from llamatrt.tools.pipeline import export_artifact
from tests.conftest import TINY_BASE, TINY_VARIANTS, save_tiny_tokenizer

CACHE, CHUNK, DEPTH = 48, 8, 5


def _deep_tiny(
    folder: Path, variant: str, layers: int = DEPTH, equal_first_norms: bool = False, untrained_norms: bool = False
) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    config = {**TINY_BASE, **TINY_VARIANTS[variant], "num_hidden_layers": layers, "intermediate_size": 64}
    model = LlamaForCausalLM(LlamaConfig(**config))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0) if p.dim() > 1 else p.add_(0.1 * torch.randn_like(p))  # norms differ by layer
        if equal_first_norms:  # the exporter then merges the twin's two norms into one tensor
            model.model.layers[1].input_layernorm.weight.copy_(model.model.layers[0].input_layernorm.weight)
        if untrained_norms:  # every norm all ones, as initialized: the graphs hold one for all
            for norm in [model.model.norm] + [
                n for layer in model.model.layers for n in (layer.input_layernorm, layer.post_attention_layernorm)
            ]:
                norm.weight.fill_(1.0)
    model.save_pretrained(folder)
    save_tiny_tokenizer(folder)
    return folder


@pytest.fixture(scope="module", params=["gqa-llama3", "mha-bias-linear"])
def deep_dir(request, tmp_path_factory) -> Path:
    return _deep_tiny(tmp_path_factory.mktemp("deep") / request.param, request.param)


def _export(source: Path, out: Path, **options) -> Path:
    export_artifact(source, out, ExportOptions(max_cache_len=CACHE, prefill_chunk=CHUNK, **options))
    return out


def _full_reference(source: Path, folder: Path) -> StaticLlama:
    """The whole model in PyTorch, on the artifact's weights as they dequantize."""
    manifest = read_manifest(folder)
    checkpoint = load_checkpoint(source)
    if not manifest.quantization:
        return checkpoint.build_model(getattr(torch, manifest.dtype))
    model = checkpoint.build_model()
    quantizer = ParameterQuantizer(checkpoint, manifest.quantization["scheme"], manifest.quantization["block_size"])
    with torch.no_grad():
        for name, p in model.state_dict().items():
            if p.dim() == 2:
                p.copy_(torch.from_numpy(quantizer(name, p.numpy().copy()).dequantize()))
    return model


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"batch_size": 2},
        {"dtype": "bf16"},
        {"quantize": "int4", "block_size": 16},
        {"quantize": "int8", "block_size": 16, "accuracy_level": 4},
    ],
    ids=["fp32", "fp32-b2", "bf16", "int4", "int8-level4"],
)
def test_replicated_layers_equal_pytorch_on_the_whole_model(deep_dir: Path, tmp_path: Path, options) -> None:
    if options.get("quantize") and "bias" in deep_dir.name:
        pytest.skip("--quantize needs the fused graph, which head_dim 8 does not allow")
    folder = _export(deep_dir, tmp_path / "a", **options)
    manifest = read_manifest(folder)
    assert manifest.config.num_layers == DEPTH
    assert f"layers 2-{DEPTH - 1} are copies" in manifest.validation["checked"]
    checked = validate_artifact(folder, manifest, _full_reference(deep_dir, folder))  # every layer, every form
    assert checked["max_abs_logits_error"] <= checked["tolerance"]
    assert set(checked["max_abs_logits_error_by_graphs"]) == {g.attention for g in manifest.graphs.values()}


def test_validation_gives_the_references_pages_back_after_each_of_its_calls(
    deep_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    """Export validation's PyTorch reference reads the export's mapped twin: its pages are given back
    after every call, as ONNX Runtime's validation sessions give back theirs, so a call holds what it
    reads beside its own buffers, not every page the calls before it read (the 1B shape's validation
    peaked at 967 MiB that way, 899 this way: docs/benchmarks.md)."""
    from llamatrt.runtime.torch_backend import TorchBackend

    folder = _export(deep_dir, tmp_path / "a", validate=False)
    runs, releases = [], []
    run = TorchBackend._run
    monkeypatch.setattr(TorchBackend, "_run", lambda self, graph, feeds: runs.append(1) or run(self, graph, feeds))
    validate_artifact(folder, read_manifest(folder), _full_reference(deep_dir, folder), lambda: releases.append(1))
    assert runs and len(releases) == len(runs)


def test_layers_whose_first_norms_are_equal_still_get_their_own(tmp_path: Path) -> None:
    """Layers 0 and 1 with equal norm weights share one initializer in the twin; the copies of layer 1
    must read their own layer's norm, not that shared one."""
    source = _deep_tiny(tmp_path / "hf", "gqa-llama3", equal_first_norms=True)
    folder = _export(source, tmp_path / "a")
    manifest = read_manifest(folder)
    checked = validate_artifact(folder, manifest, _full_reference(source, folder))
    assert checked["max_abs_logits_error"] <= checked["tolerance"]
    assert set(manifest.weights_map) == set(load_checkpoint(source).build_model().state_dict())


def test_layers_not_held_in_the_form_expected_are_streamed_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With every norm equal the graphs hold one norm tensor where the stream begun before the trace
    expected two per layer: that stream is discarded and the layers streamed as the graph holds
    them. The artifact is exact and its file holds nothing of the discarded stream."""
    source = _deep_tiny(tmp_path / "hf", "gqa-llama3", untrained_norms=True)
    with caplog.at_level(logging.INFO, logger="llamatrt.exporter.export"):
        folder = _export(source, tmp_path / "a")
    assert [r for r in caplog.records if "streaming them again" in r.message]
    manifest = read_manifest(folder)
    checked = validate_artifact(folder, manifest, _full_reference(source, folder))
    assert checked["max_abs_logits_error"] <= checked["tolerance"]
    stored = {(e["offset"], 4 * math.prod(e["shape"])) for e in manifest.weights_map.values()}  # distinct tensors
    assert sum(length for _, length in stored) <= manifest.weights_bytes < 1.02 * sum(length for _, length in stored)


def test_every_parameter_of_every_layer_is_mapped_in_the_weights_file(
    deep_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The PyTorch backend runs from the artifact's own weights: the replicated layers' too — streamed
    in the form expected before the first trace, which the trace confirmed (nothing streamed again)."""
    from llamatrt.runtime.torch_backend import state_dict_from_artifact

    with caplog.at_level(logging.INFO, logger="llamatrt.exporter.export"):
        folder = _export(deep_dir, tmp_path / "a", dtype="fp16")
    assert not [r for r in caplog.records if "streaming them again" in r.message]
    manifest = read_manifest(folder)
    expected = load_checkpoint(deep_dir).build_model(torch.float16).state_dict()
    assert set(manifest.weights_map) == set(expected)
    loaded = state_dict_from_artifact(folder, manifest)
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name


def test_quantized_layers_record_their_blocks_and_half_precision_halves_the_file(
    deep_dir: Path, tmp_path: Path
) -> None:
    if "bias" in deep_dir.name:
        pytest.skip("--quantize needs the fused graph")
    int4 = read_manifest(_export(deep_dir, tmp_path / "int4", quantize="int4", block_size=16))
    layers = {name.split(".")[2] for name in int4.quantization["tensors"] if name.startswith("model.layers.")}
    assert layers == {str(i) for i in range(DEPTH)}
    projections = {k: v for k, v in int4.quantization["tensors"].items() if k.startswith("model.layers.")}
    assert set(projections.values()) == {"rtn (4-bit, block 16)"}  # (the head keeps 8 bits: quant_plan.default_head)
    fp32 = read_manifest(_export(deep_dir, tmp_path / "fp32"))
    fp16 = read_manifest(_export(deep_dir, tmp_path / "fp16", dtype="fp16"))
    # the matrices halve, the norms stay fp32 (DESIGN.md §3)
    stored = {name: entry["dtype"] for name, entry in fp16.weights_map.items()}
    assert {dtype for name, dtype in stored.items() if "norm" in name} == {"float32"}
    assert {dtype for name, dtype in stored.items() if "norm" not in name} == {"float16"}
    # so the stored parameters are a little over half (the file's 64-byte alignment of its tensors,
    # which depends on their order, is left out: at this size it moves the ratio by ~0.1%)
    assert 0.5 <= _stored_bytes(fp16) / _stored_bytes(fp32) < 0.55


def _stored_bytes(manifest: Any) -> int:
    """Bytes of the distinct stored parameters the weights map points at."""
    sizes = {
        (e["offset"], e["dtype"]): math.prod(e["shape"]) * (2 if e["dtype"] == "float16" else 4)
        for e in manifest.weights_map.values()
    }
    return sum(sizes.values())


def test_a_gguf_whose_later_layers_hold_other_blocks_is_refused(tmp_path: Path) -> None:
    """Layers 2.. are written as layer 1's graph over their own blocks; a layer of another block type
    (Q4_0 where layer 1 holds Q4_1: the same bytes, no offsets) would fit its tensors' shapes and be
    wrong, so it stops the export with one line naming the tensor and the way out."""
    from dataclasses import replace

    import gguf

    from llamatrt.base.errors import CheckpointError
    from tests.test_quantize import _block_model, _write_gguf

    model = _block_model(layers=4)
    kinds = gguf.GGMLQuantizationType
    loaded = _write_gguf(model, tmp_path / "m.gguf", kinds.Q4_1, {"3": kinds.Q4_0})
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in loaded.items()}, strict=False)
    model.save_pretrained(tmp_path / "hf")
    save_tiny_tokenizer(tmp_path / "hf")
    checkpoint = replace(load_checkpoint(tmp_path / "hf"), gguf=tmp_path / "m.gguf")
    with pytest.raises(
        CheckpointError, match=r"model.layers.3.self_attn.qkv_proj.weight is gguf Q4_0 .* layer 1 holds gguf Q4_1"
    ):
        export_artifact(
            checkpoint, tmp_path / "a", ExportOptions(max_cache_len=CACHE, prefill_chunk=CHUNK, quantize="int4")
        )
    assert not (tmp_path / "a").exists()


# An export's growth in resident memory, in-process: after a tiny export has loaded every library and
# code path (what the process holds before it reads a weight), the kernel's peak-RSS counter is reset
# (/proc/self/clear_refs, "5") and the real export runs; growth = peak - resident before it.
KIB = textwrap.dedent(
    """
    def kib(field):  # a /proc/self/status field, in KiB
        return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field + ":"))
    """
)
GROWTH_SCRIPT = KIB + textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from llamatrt.exporter.export import ExportOptions
    from llamatrt.tools.pipeline import export_artifact

    warm, source, out = sys.argv[1:4]
    options = ExportOptions(max_cache_len=64, prefill_chunk=16, quantize=(sys.argv[4:] or [None])[0])
    export_artifact(warm, Path(out + "-warm"), options)
    open("/proc/self/clear_refs", "w").write("5")
    before = kib("VmRSS")
    export_artifact(source, Path(out), options)
    print(json.dumps({"growth": (kib("VmHWM") - before) * 1024}))
    """
)


def _export_growth(source: Path, warm: Path, out: Path, *quantize: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", GROWTH_SCRIPT, str(warm), str(source), str(out), *quantize],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(json.loads(done.stdout.strip().splitlines()[-1])["growth"])


MID = {"hidden": 1024, "ffn": 4096, "kv": 256, "vocab": 49152}  # SmolLM2's vocabulary


def _mid_size(folder: Path, layers: int) -> Path:
    """Hidden 1024, FFN 4096, 16 heads / 4 KV heads: 61 MB of fp32 weights a layer; a tied
    embedding of SmolLM2's 49,152 rows, 201 MB in fp32."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    h, f, kv, vocab = MID["hidden"], MID["ffn"], MID["kv"], MID["vocab"]
    gen = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * shape[-1] ** -0.5).to(torch.bfloat16)

    for i in range(layers):
        p = f"model.layers.{i}."
        layer = {p + "self_attn.q_proj.weight": randn(h, h), p + "self_attn.k_proj.weight": randn(kv, h)}
        layer |= {p + "self_attn.v_proj.weight": randn(kv, h), p + "self_attn.o_proj.weight": randn(h, h)}
        layer |= {p + "mlp.gate_proj.weight": randn(f, h), p + "mlp.up_proj.weight": randn(f, h)}
        layer |= {p + "mlp.down_proj.weight": randn(h, f), p + "input_layernorm.weight": randn(h) + 1}
        layer |= {p + "post_attention_layernorm.weight": randn(h) + 1}
        save_file(layer, str(folder / f"layer{i}.safetensors"))
    save_file(
        {"model.embed_tokens.weight": randn(vocab, h), "model.norm.weight": randn(h) + 1}, str(folder / "x.safetensors")
    )
    config = {**TINY_BASE, "hidden_size": h, "intermediate_size": f, "num_hidden_layers": layers}
    config |= {"num_attention_heads": 16, "num_key_value_heads": 4, "tie_word_embeddings": True, "model_type": "llama"}
    config |= {"vocab_size": vocab}
    (folder / "config.json").write_text(json.dumps(config))
    save_tiny_tokenizer(folder)
    return folder


def _can_reset_peak() -> bool:
    return sys.platform == "linux" and os.access("/proc/self/clear_refs", os.W_OK)


@pytest.mark.slow
@pytest.mark.skipif(not _can_reset_peak(), reason="measures the peak through Linux's /proc/self/clear_refs")
def test_export_memory_is_bounded_by_one_layer_and_the_embedding(tmp_path: Path, tiny_hf_dir: Path) -> None:
    """An fp32 export grows the process by at most 1.5x one layer's fp32 weights plus the embedding
    (issue 27's bound), at 4 layers and at 16, and an int4 one at 4: the twin's parameters are mapped
    pages given back between phases, so tracing, validation (PyTorch, then ONNX Runtime) and writing
    each hold one copy of them; the other layers are streamed a tensor at a time. Measured at a small
    cache and chunk, so the weights' part of the export is what is held to the bound
    (docs/benchmarks.md has the phases, and the defaults' validation transients)."""
    h, f, kv = MID["hidden"], MID["ffn"], MID["kv"]
    layer = 4 * (2 * h * h + 2 * kv * h + 3 * f * h + 2 * h)
    embedding = 4 * MID["vocab"] * h
    bound = 1.5 * (layer + embedding)
    growth = {}
    for depth in (4, 16):
        growth[depth] = _export_growth(_mid_size(tmp_path / f"l{depth}", depth), tiny_hf_dir, tmp_path / f"a{depth}")
        assert growth[depth] <= bound, (depth, growth[depth] / 2**20, bound / 2**20)
    # and it does not grow with depth: within a quarter of the 12 extra layers' fp32 weights
    assert growth[16] - growth[4] < 12 * layer / 4, growth
    assert np.isclose(read_manifest(tmp_path / "a16").weights_bytes, 16 * layer + embedding, rtol=0.01)
    # an int4 export is held to the same bound (its output is smaller): the twin's blocks leave memory
    # once written, and no weight is copied whole to be quantized (438 MiB before, 332 after)
    quantized = _export_growth(tmp_path / "l4", tiny_hf_dir, tmp_path / "q4", "int4")
    assert quantized <= bound, (quantized / 2**20, bound / 2**20)


# Growth in resident memory over one validation call of an artifact's S=128 prefill graph on ONNX
# Runtime CPU (a session and heap as export validation sets them up), after a first call has set it up.
VALIDATION_CALL_SCRIPT = KIB + textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from llamatrt.base.heap import map_large_blocks
    from llamatrt.base.artifact.feeds import fixed_prompt
    from llamatrt.base.artifact.reader import read_manifest
    from llamatrt.runtime.generator import Generator
    from llamatrt.runtime.ort_backend import OrtBackend
    from llamatrt.tools.teacher_forcing import score

    map_large_blocks()
    folder = Path(sys.argv[1])
    manifest = read_manifest(folder)
    vocab = manifest.config.vocab_size
    with OrtBackend(folder, manifest, attention="portable", prepack=False) as backend:
        prompt, forced = fixed_prompt(1, 128, vocab)[0].tolist(), fixed_prompt(1, 6, vocab)[:, 5:].tolist()
        score(Generator(backend), [prompt[:8]], forced)
        open("/proc/self/clear_refs", "w").write("5")
        before = kib("VmRSS")
        score(Generator(backend), [prompt], forced)
        print(json.dumps({"growth": (kib("VmHWM") - before) * 1024, "kept": (kib("VmRSS") - before) * 1024}))
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not _can_reset_peak(), reason="measures the peak through Linux's /proc/self/clear_refs")
def test_an_fp16_validation_call_casts_each_weight_where_it_is_read(tmp_path: Path) -> None:
    """ONNX Runtime CPU has no fp16 MatMul: a validation session (no prepacking, no folding) casts
    each fp16 weight to fp32 during a call. It must cast each where it is read and free it before
    the next, not run every cast first: then a call holds the mapped fp16 weights, which grow with
    depth, and one weight's fp32 cast at a time, which does not — not an fp32 copy of every layer.
    (The 8B fp16 export's validation peaked at 4.36 GiB with every cast alive, 2.86 GiB one at a time.)"""
    h, f, kv = MID["hidden"], MID["ffn"], MID["kv"]
    layer_fp16 = 2 * (2 * h * h + 2 * kv * h + 3 * f * h + 2 * h)
    growth = {}
    for depth in (2, 6):
        out = tmp_path / f"fp16-{depth}"
        export_artifact(_mid_size(tmp_path / f"m{depth}", depth), out, ExportOptions(dtype="fp16", validate=False))
        growth[depth] = _call_growth(out)["growth"]
    # 4 more layers: their fp16 pages, and at most a quarter of their fp32 casts' worth besides
    assert growth[6] - growth[2] <= 4 * layer_fp16 + 4 * (2 * layer_fp16) / 4, {d: g / 2**20 for d, g in growth.items()}


def _call_growth(artifact: Path) -> dict[str, int]:
    """The call's peak growth ("growth") and what it left resident once its weights' pages were given
    back ("kept")."""
    done = subprocess.run(
        [sys.executable, "-c", VALIDATION_CALL_SCRIPT, str(artifact)], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not _can_reset_peak(), reason="measures the peak through Linux's /proc/self/clear_refs")
def test_a_validation_call_gives_back_what_it_freed(tmp_path: Path) -> None:
    """At the default cache and chunk, a validation call of the portable S=128 prefill graph scores
    all 1,024 slots for 128 queries of 16 heads (8 MiB a tensor in fp32). What it frees must leave
    memory, not stay in glibc's heap (whose dynamic threshold rises to the largest block freed) beside
    everything after it: once the call's weights are given back, less than one such tensor is left,
    and its peak is its weights and at most two. (Kept in the heap, 17.6 MiB stayed here, and the mid
    shape's 4-layer export validated at 409 MiB against the issue's bound of 375; given back, 369:
    docs/benchmarks.md.)"""
    out = tmp_path / "fp32-2"
    export_artifact(_mid_size(tmp_path / "m2", 2), out, ExportOptions(validate=False))
    scores = 4 * 16 * 128 * ExportOptions().max_cache_len  # heads x chunk x slots, fp32
    call = _call_growth(out)
    weights = read_manifest(out).weights_bytes
    assert call["kept"] < scores, {k: v / 2**20 for k, v in call.items()}
    assert call["growth"] <= weights + 2 * scores, (call["growth"] / 2**20, weights / 2**20)
