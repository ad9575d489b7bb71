"""Every available backend through the same checks, so none can drift from the others."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from llamatrt.base.errors import BackendUnavailable, InputError, ManifestMismatchError
from llamatrt.runtime.generator import Generator
from llamatrt.runtime.kv_state import KVState
from llamatrt.runtime.registry import BACKENDS, open_backend
from llamatrt.runtime.scheduler import Scheduler
from llamatrt.tools.teacher_forcing import score
from tests.conftest import tiny_hf_model
from tests.inflight_helpers import alone, assert_each_as_alone, joining_and_leaving

PROMPTS = [[5, 17, 42, 8, 77, 3, 9, 21, 22, 23, 11], [11, 12], [40, 41, 42, 43], [7, 7, 7]]


def unavailable_reason(kind: str) -> str | None:
    """Why `kind` cannot run on this machine, or None. Every backend in the registry is tried."""
    if kind == "tensorrt":
        if importlib.util.find_spec("tensorrt") is None:
            return "tensorrt not installed"
        if not torch.cuda.is_available():
            return "no CUDA device"
    return None


@pytest.fixture(scope="module")
def engines_artifact(tiny_artifact: Path, tmp_path_factory) -> Path:
    """The tiny artifact with TensorRT engines, built where TensorRT and a GPU are present."""
    from llamatrt.exporter.trt_build import build_engines

    out = Path(shutil.copytree(tiny_artifact, tmp_path_factory.mktemp("engines") / "art"))
    build_engines(out, "tensorrt")
    return out


@pytest.fixture(params=list(BACKENDS))
def backend(request, tiny_artifact: Path):
    reason = unavailable_reason(request.param)
    if reason:
        pytest.skip(f"{request.param}: {reason}")
    artifact = request.getfixturevalue("engines_artifact") if request.param == "tensorrt" else tiny_artifact
    with open_backend(artifact, request.param) as b:
        yield b


@torch.no_grad()
def test_greedy_equals_transformers_generate_per_prompt(backend) -> None:
    hf = tiny_hf_model("gqa-llama3")
    ours = Generator(backend).generate(PROMPTS, max_new_tokens=16)  # 4 prompts, B=3: two batches
    for prompt, tokens in zip(PROMPTS, ours, strict=True):
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert tokens == ref[0, len(prompt) :].tolist()


def test_a_row_prefill_writes_its_row_in_place_and_leaves_the_others(backend) -> None:
    """A batch-1 prefill bound to row 1 of the B-row cache: present is that row's own memory (no
    copy), it holds the 8 new keys, and rows 0 and 2 are untouched."""
    kv = KVState(backend)
    for t in kv.buffers:
        t.fill_(0.5)
    prefill = backend.graph("prefill", 1, 8)
    ids, positions = torch.tensor([5, 17, 42, 8, 77, 3, 9, 21]), torch.arange(8)
    feeds = kv.prefill_feeds(prefill, 1, ids, positions, 0)
    out = backend.run(prefill.name, feeds)
    assert out["logits"].shape == (1, backend.manifest.config.vocab_size) and out["logits"].dtype == torch.float32
    key0 = out["present.0.key"]
    assert key0.data_ptr() == kv.buffers[0][1].data_ptr()  # updated in place, in row 1's own block
    kv.take(out, row=1)
    row1 = kv.buffers[0][1]
    assert not torch.equal(row1[:, :8], torch.full_like(row1[:, :8], 0.5)) and bool((row1[:, 8:] == 0.5).all())
    assert bool((kv.buffers[0][0] == 0.5).all()) and bool((kv.buffers[0][2] == 0.5).all())
    fresh = KVState(backend)  # the same prompt on row 0 of a fresh cache: the same logits
    again = backend.run(prefill.name, fresh.prefill_feeds(prefill, 0, ids, positions, 0))["logits"]
    assert torch.allclose(again, out["logits"], atol=1e-5)


def test_rows_at_different_positions_in_one_decode_call_equal_each_alone(backend) -> None:
    prompts = [[5, 17, 42, 8, 77, 3, 9, 21, 22, 23, 11], [11, 12], [40, 41, 42, 43]]
    together = score(Generator(backend), prompts, [[1, 2, 3]] * 3)
    alone = [score(Generator(backend), [p], [[1, 2, 3]])[0] for p in prompts]
    for a, b in zip(together, alone, strict=True):
        assert torch.allclose(a, b, atol=1e-4)


def test_requests_joining_and_leaving_the_batch_get_their_tokens_alone(backend) -> None:
    """Seven requests of different lengths through the B = 3 rows: three at first, one more every
    fourth loop iteration, one cancelled half-way; each gets the greedy tokens it gets alone."""
    words = [17, 42, 8, 77, 3, 9, 21, 22, 23, 11, 40, 41, 42, 43, 7, 7, 12, 60, 61]
    prompts = [[5 + i, *words][:n] for i, n in enumerate([2, 11, 5, 19, 3, 14, 8])]  # 1 to 3 prefill windows
    budgets = [12, 4, 20, 8, 16, 6, 10]
    cancelled = 2
    roles: list[str] = []
    scheduler = Scheduler(backend, observer=lambda role, seconds, rows: roles.append(role))
    together = joining_and_leaving(scheduler, prompts, budgets, every=4, cancelled=cancelled)
    assert_each_as_alone(together, alone(Scheduler(backend), prompts, budgets), budgets, cancelled)
    if scheduler.packed_graph is not None:  # ONNX Runtime's graph: decode rows and prompts shared calls
        assert roles.count("mixed") >= 3


def test_last_slot_works_and_one_more_is_refused(backend) -> None:
    kv = KVState(backend)
    decode = backend.graph("decode")
    ones, last = torch.ones(3, dtype=torch.long), torch.full((3,), 47)
    assert torch.isfinite(backend.run(decode.name, kv.decode_feeds(decode, ones, last, last))["logits"]).all()
    with pytest.raises(InputError, match="outside the cache of 48 slots"):
        backend.run(decode.name, kv.decode_feeds(decode, ones, last + 1, last + 1))


def test_wrong_feed_names_the_tensor(backend) -> None:
    kv = KVState(backend)
    decode = backend.graph("decode")
    zeros = torch.zeros(3, dtype=torch.long)
    feeds = kv.decode_feeds(decode, zeros, zeros, zeros)
    feeds["input_ids"] = torch.ones(3, 1, dtype=torch.int32)
    with pytest.raises(InputError, match=r"'input_ids' is \(3, 1\) torch\.int32"):
        backend.run(decode.name, feeds)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_broken_artifacts_are_refused_with_a_fix(tiny_artifact: Path, tmp_path: Path) -> None:
    with pytest.raises(ManifestMismatchError, match="does not exist"):
        open_backend(tmp_path / "nope")
    future = _copy(tiny_artifact, tmp_path / "future")
    manifest = json.loads((future / "manifest.json").read_text())
    (future / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(ManifestMismatchError, match=r"format_version=99.*re-run `llamatrt export --force`"):
        open_backend(future)
    missing = _copy(tiny_artifact, tmp_path / "missing")
    (missing / "decode.onnx").unlink()
    with pytest.raises(ManifestMismatchError, match=r"decode\.onnx is missing"):
        open_backend(missing)
    truncated = _copy(tiny_artifact, tmp_path / "truncated")
    data = (truncated / "prefill.onnx").read_bytes()
    (truncated / "prefill.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(ManifestMismatchError, match="truncated"):
        open_backend(truncated, "onnxruntime")
    with pytest.raises(InputError, match="unknown backend 'tpu'"):
        open_backend(tiny_artifact, "tpu")


def test_a_version_3_manifest_that_names_backends_per_graph_still_opens(tiny_artifact: Path, tmp_path: Path) -> None:
    """Version 3 listed who may run each graph; version 4 leaves that to the backends. An artifact
    written before opens and answers alike on every backend that runs here."""
    old = _copy(tiny_artifact, tmp_path / "v3")
    raw = json.loads((old / "manifest.json").read_text())
    raw["format_version"] = 3
    for graph in raw["graphs"]:
        portable = graph["attention"] == "portable"
        graph["backends"] = ["torch", "onnxruntime", "tensorrt"] if portable else ["onnxruntime"]
    (old / "manifest.json").write_text(json.dumps(raw))
    for kind in ("onnxruntime", "torch"):
        with open_backend(old, kind) as then, open_backend(tiny_artifact, kind) as now:
            assert set(then.graphs) == set(now.graphs)
            assert Generator(then).generate(PROMPTS[:2], 6) == Generator(now).generate(PROMPTS[:2], 6)


def test_tensorrt_backend_unavailable_here_is_one_line(tiny_artifact: Path) -> None:
    if unavailable_reason("tensorrt") is None:
        pytest.skip("TensorRT and a GPU are present")
    with pytest.raises((BackendUnavailable, ManifestMismatchError)) as err:  # no engines here, nor TensorRT
        open_backend(tiny_artifact, "tensorrt")
    assert "\n" not in str(err.value) and "llamatrt build" in str(err.value)


def test_onnxruntime_cpu_runs_fused_attention_and_leaves_the_cores_to_its_threads(tiny_artifact: Path) -> None:
    before = torch.get_num_threads()
    with open_backend(tiny_artifact, "onnxruntime") as backend:
        assert set(backend.graph_files.values()) == {"model.ort.onnx"}  # one session for every call
        seen = [torch.get_num_threads() for _ in Generator(backend).stream(PROMPTS[:1], max_new_tokens=2)]
    assert seen == [1, 1]  # the loop's torch work does not spin on ONNX Runtime's cores
    assert torch.get_num_threads() == before  # and torch is given back as it was


def test_an_onnxruntime_too_old_for_fused_attention_runs_the_portable_graphs(
    tiny_artifact: Path, monkeypatch, caplog
) -> None:
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "__version__", "1.31.1")
    with open_backend(tiny_artifact, "onnxruntime") as backend:
        assert set(backend.graph_files.values()) == {"prefill.onnx", "decode.onnx"}
        portable_tokens = Generator(backend).generate(PROMPTS[:1], max_new_tokens=4)[0]
    monkeypatch.undo()
    with open_backend(tiny_artifact, "onnxruntime") as fused:
        assert portable_tokens == Generator(fused).generate(PROMPTS[:1], max_new_tokens=4)[0]
    assert "needs >= 1.32" in caplog.text and "pip install -U onnxruntime" in caplog.text
