"""Every available backend through the same checks, so none can drift from the others."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from llamatrt.errors import BackendUnavailable, InputError, ManifestMismatchError
from llamatrt.runtime.backend import open_backend
from llamatrt.runtime.generator import Generator
from llamatrt.runtime.kv_state import KVState
from tests.conftest import tiny_hf_model

PROMPTS = [[5, 17, 42, 8, 77, 3, 9, 21, 22, 23, 11], [11, 12], [40, 41, 42, 43], [7, 7, 7]]


def available_backends() -> list[str]:
    kinds = ["torch", "onnxruntime"]
    try:
        import tensorrt  # noqa: F401

        if torch.cuda.is_available():
            kinds.append("tensorrt")
    except ImportError:
        pass
    return kinds


@pytest.fixture(params=available_backends())
def backend(request, tiny_artifact: Path):
    with open_backend(tiny_artifact, request.param) as b:
        yield b


@torch.no_grad()
def test_greedy_equals_transformers_generate_per_prompt(backend) -> None:
    hf = tiny_hf_model("gqa-llama3")
    ours = Generator(backend).generate(PROMPTS, max_new_tokens=16)  # 4 prompts, B=3: two batches
    for prompt, tokens in zip(PROMPTS, ours, strict=True):
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert tokens == ref[0, len(prompt) :].tolist()


def test_present_aliases_past_and_logits_shape(backend) -> None:
    kv = KVState(backend)
    kv.start([0, 0, 0])
    feeds = kv.feeds(backend.device)
    feeds.update(input_ids=torch.ones(3, 8, dtype=torch.long), position_ids=torch.arange(8).expand(3, 8).contiguous(),
                 cache_position=torch.arange(8))  # fmt: skip
    out = backend.run("prefill", feeds)
    assert out["logits"].shape == (3, backend.manifest.config.vocab_size) and out["logits"].dtype == torch.float32
    key0 = out["present.0.key"]
    assert key0.data_ptr() == feeds["past_key_values.0.key"].data_ptr()  # updated in place, no copy
    assert key0[:, :, :8].abs().sum() > 0 and key0[:, :, 8:].abs().sum() == 0


def test_last_slot_works_and_one_more_is_refused(backend) -> None:
    kv = KVState(backend)
    kv.start([0, 0, 0])
    feeds = kv.feeds(backend.device)
    feeds.update(input_ids=torch.ones(3, 1, dtype=torch.long), position_ids=torch.full((3, 1), 47),
                 cache_position=torch.tensor([47]))  # fmt: skip
    assert torch.isfinite(backend.run("decode", feeds)["logits"]).all()
    feeds["cache_position"] = torch.tensor([48])
    with pytest.raises(InputError, match="outside the cache of 48 slots"):
        backend.run("decode", feeds)


def test_wrong_feed_names_the_tensor(backend) -> None:
    kv = KVState(backend)
    feeds = kv.feeds(backend.device)
    feeds.update(input_ids=torch.ones(3, 2, dtype=torch.long), position_ids=torch.zeros(3, 1, dtype=torch.long),
                 cache_position=torch.tensor([0]))  # fmt: skip
    with pytest.raises(InputError, match="'input_ids' is \\(3, 2\\)"):
        backend.run("decode", feeds)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_broken_artifacts_are_refused_with_a_fix(tiny_artifact: Path, tmp_path: Path) -> None:
    with pytest.raises(ManifestMismatchError, match="does not exist"):
        open_backend(tmp_path / "nope")
    future = _copy(tiny_artifact, tmp_path / "future")
    manifest = json.loads((future / "manifest.json").read_text())
    (future / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(ManifestMismatchError, match=r"format_version=99.*re-run `llamatrt export`"):
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


def test_tensorrt_backend_unavailable_here_is_one_line(tiny_artifact: Path) -> None:
    if "tensorrt" in available_backends():
        pytest.skip("TensorRT and a GPU are present")
    with pytest.raises((BackendUnavailable, ManifestMismatchError)) as err:  # no engines here, nor TensorRT
        open_backend(tiny_artifact, "tensorrt")
    assert "\n" not in str(err.value) and "llamatrt build" in str(err.value)


def test_onnxruntime_cpu_runs_fused_attention_and_leaves_the_cores_to_its_threads(tiny_artifact: Path) -> None:
    before = torch.get_num_threads()
    with open_backend(tiny_artifact, "onnxruntime") as backend:
        assert backend.graph_files == {"prefill": "prefill.ort.onnx", "decode": "decode.ort.onnx"}
        seen = [torch.get_num_threads() for _ in Generator(backend).stream(PROMPTS[:1], max_new_tokens=2)]
    assert seen == [1, 1]  # the loop's torch work does not spin on ONNX Runtime's cores
    assert torch.get_num_threads() == before  # and torch is given back as it was


def test_an_onnxruntime_too_old_for_fused_attention_runs_the_portable_graphs(
    tiny_artifact: Path, monkeypatch, caplog
) -> None:
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "__version__", "1.31.1")
    with open_backend(tiny_artifact, "onnxruntime") as backend:
        assert backend.graph_files == {"prefill": "prefill.onnx", "decode": "decode.onnx"}
        assert Generator(backend).generate(PROMPTS[:1], max_new_tokens=4)[0]
    assert "needs >= 1.32" in caplog.text and "pip install -U onnxruntime" in caplog.text
