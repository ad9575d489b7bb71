"""The TensorRT backend's logic against a fake `tensorrt` module and fake CUDA ops that record calls:
binding by address, present aliasing past, and the decode step's warm-up / capture / replay order."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from llamatrt.base.errors import ManifestMismatchError
from llamatrt.runtime.generator import Generator
from llamatrt.runtime.trt_backend import TensorRTBackend
from tests.runtime.fake_backend import fake_manifest


class FakeContext:
    def __init__(self, name: str, log: list) -> None:
        self.name, self.log, self.addresses = name, log, {}

    def set_tensor_address(self, tensor: str, ptr: int) -> None:
        self.addresses[tensor] = ptr

    def execute_async_v3(self, stream: int) -> bool:
        self.log.append(("execute", self.name))
        return True


class FakeEngine:
    def __init__(self, name: str, log: list) -> None:
        self.name, self.log = name, log

    def create_execution_context(self) -> FakeContext:
        return FakeContext(self.name, self.log)


class FakeTrt:
    class Logger:
        WARNING = 2

        def __init__(self, level: int) -> None:
            pass

    def __init__(self, log: list, broken: bool = False) -> None:
        self.log, self.broken = log, broken
        outer = self

        class Runtime:
            def __init__(self, logger: object) -> None:
                pass

            def deserialize_cuda_engine(self, data: bytes):
                return None if outer.broken else FakeEngine(data.decode(), outer.log)

        class Refitter:
            def __init__(self, engine: FakeEngine, logger: object) -> None:
                self.engine = engine

            def refit_cuda_engine(self) -> bool:
                outer.log.append(("refit", self.engine.name))
                return True

        class OnnxParserRefitter:
            num_errors = 0

            def __init__(self, refitter: Refitter, logger: object) -> None:
                self.refitter = refitter

            def refit_from_file(self, path: str) -> bool:
                outer.log.append(("weights-from", Path(path).name))
                return Path(path).is_file()

        self.Runtime, self.Refitter, self.OnnxParserRefitter = Runtime, Refitter, OnnxParserRefitter


class FakeGraph:
    def __init__(self, log: list) -> None:
        self.log = log

    def replay(self) -> None:
        self.log.append(("replay",))


class FakeCuda:
    handle = 7

    def __init__(self, log: list) -> None:
        self.log = log

    def on_stream(self):
        import contextlib

        return contextlib.nullcontext()

    def synchronize(self) -> None:
        pass

    def capture(self, launch) -> FakeGraph:
        self.log.append(("capture-begin",))
        launch()
        self.log.append(("capture-end",))
        return FakeGraph(self.log)


def make_backend(tmp_path: Path, broken: bool = False, weights: str = "stripped"):
    log: list = []
    manifest = fake_manifest(batch=2, chunk=4, cache=16)
    graphs = {}
    for name, graph in manifest.graphs.items():
        (tmp_path / f"{name}.plan").write_text(name)
        (tmp_path / graph.path).write_text("onnx")  # what a stripped engine is refit from
        graphs[name] = {"path": f"{name}.plan", "bytes": len(name)}
    manifest = replace(manifest, engines={"builder": "tensorrt", "graphs": graphs, "weights": weights})
    backend = TensorRTBackend(tmp_path, manifest, device="cpu", trt=FakeTrt(log, broken), cuda=FakeCuda(log))
    for logits in backend.logits.values():  # the fake engines compute nothing: their output must still be defined
        logits.zero_()  # (left as torch.empty, a NaN now and then failed the loop's finite-logits check)
    return backend, log


def test_stripped_engines_are_refit_from_their_graphs_at_load(tmp_path: Path) -> None:
    _, log = make_backend(tmp_path)
    assert log == [
        ("weights-from", "prefill.onnx"),
        ("refit", "prefill"),
        ("weights-from", "decode.onnx"),
        ("refit", "decode"),
    ]
    (tmp_path / "embedded").mkdir()
    _, embedded = make_backend(tmp_path / "embedded", weights="embedded")
    assert embedded == []  # an engine with its weights inside needs no refit


def test_binding_aliasing_per_row_and_capture_order(tmp_path: Path) -> None:
    backend, log = make_backend(tmp_path)
    log.clear()
    Generator(backend).generate([[1, 2, 3], [4]], max_new_tokens=4)
    decodes = [entry for entry in log if entry != ("execute", "prefill")]
    assert log.count(("execute", "prefill")) == 2  # one batch-1 prefill per request, each on its own row
    assert decodes[:4] == [("execute", "decode"), ("capture-begin",), ("execute", "decode"), ("capture-end",)]
    assert set(decodes[4:]) == {("replay",)}  # every later decode step replays the captured graph
    decode = backend.contexts["decode"].addresses
    for i in range(backend.manifest.config.num_layers):
        assert decode[f"present.{i}.key"] == decode[f"past_key_values.{i}.key"]  # in place
        assert decode[f"present.{i}.value"] == decode[f"past_key_values.{i}.value"]
    assert decode["input_ids"] == backend.static["decode"]["input_ids"].data_ptr()  # fixed for the graph
    prefill = backend.contexts["prefill"].addresses
    full, row = backend.cache[0], backend.cache[0][1]
    assert prefill["past_key_values.0.key"] == prefill["present.0.key"] == row.data_ptr() != full.data_ptr()


def test_second_generation_replays_the_same_graph(tmp_path: Path) -> None:
    backend, log = make_backend(tmp_path)
    Generator(backend).generate([[1]], max_new_tokens=3)
    log.clear()
    Generator(backend).generate([[5, 6]], max_new_tokens=3)
    assert ("capture-begin",) not in log and log.count(("replay",)) == 2
    assert len(backend.cuda_graphs) == 1


def test_engine_from_another_version_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ManifestMismatchError, match=r"another TensorRT version.*re-run `llamatrt build"):
        make_backend(tmp_path, broken=True)


def test_artifact_without_engines(tmp_path: Path) -> None:
    with pytest.raises(ManifestMismatchError, match="run `llamatrt build"):
        TensorRTBackend(tmp_path, fake_manifest(), device="cpu", trt=FakeTrt([]), cuda=FakeCuda([]))


def test_logits_buffer_is_device_resident(tmp_path: Path) -> None:
    backend, _ = make_backend(tmp_path)
    assert backend.logits["decode"].shape == (2, 32) and backend.logits["decode"].dtype == torch.float32
