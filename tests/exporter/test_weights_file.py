"""The weights writer's background stream: a reserved region filled by another thread while the
exporting thread appends after it. The file's layout and digest must not depend on thread timing,
and a stream's failure must reach the exporting thread."""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from llamatrt.base.errors import CheckpointError, ValidationError
from llamatrt.exporter.weights_file import WeightsWriter, WrittenWeights, pieced_tensor


def _model(arrays: dict[str, np.ndarray]) -> ir.Model:
    graph = ir.Graph([], [], nodes=[], name="g")
    for name, array in arrays.items():
        graph.register_initializer(ir.Value(name=name, const_value=ir.tensor(array, name=name)))
    return ir.Model(graph, ir_version=10)


def _arrays(seed: int, sizes: list[int]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"t{seed}.{i}": rng.standard_normal(n).astype(np.float32) for i, n in enumerate(sizes)}


STREAMED = _arrays(2, [1000, 33, 4096, 7])  # odd sizes: pads between them


def _write(path: Path, delay: float) -> tuple[WrittenWeights, dict[str, int]]:
    """Twin tensors, a stream of STREAMED (each made after `delay`), then appends while it runs."""
    made_on: dict[str, int] = {}

    def maker(key: str) -> ir.TensorProtocol:
        time.sleep(delay)
        made_on[key] = threading.get_ident()
        return ir.tensor(STREAMED[key])

    with WeightsWriter(path) as writer:
        writer.add(_model(_arrays(1, [300, 5])))
        writer.stream((key, a.nbytes, lambda key=key: maker(key)) for key, a in STREAMED.items())
        writer.add(_model(_arrays(3, [17, 2000])))  # after the region, while the stream fills it
        return writer.close(), made_on


def test_a_stream_gives_the_layout_and_digest_of_writing_in_order(tmp_path: Path) -> None:
    slow, made_on = _write(tmp_path / "slow.data", delay=0.05)
    fast, _ = _write(tmp_path / "fast.data", delay=0.0)
    data = (tmp_path / "slow.data").read_bytes()
    assert slow.sha256 == hashlib.sha256(data).hexdigest() == fast.sha256
    assert slow.offsets == fast.offsets and slow.bytes == len(data)
    assert set(made_on.values()) != {threading.get_ident()}  # made off the exporting thread
    for key, array in STREAMED.items():
        offset, length = slow.offsets[key]
        assert offset % 64 == 0 and data[offset : offset + length] == array.tobytes()
    region_end = max(sum(slow.offsets[k]) for k in STREAMED)
    appended = [
        v for k, v in slow.offsets.items() if k not in STREAMED and v[0] > min(slow.offsets[k][0] for k in STREAMED)
    ]
    assert appended and all(offset >= region_end for offset, _ in appended)


def test_a_stream_error_reaches_the_exporting_thread(tmp_path: Path) -> None:
    def broken() -> ir.TensorProtocol:
        raise CheckpointError("layer 3 is cut")

    with WeightsWriter(tmp_path / "w.data") as writer:
        writer.stream([("a", 400, lambda: ir.tensor(np.zeros(100, np.float32))), ("b", 400, broken)])
        with pytest.raises(CheckpointError, match="layer 3 is cut"):
            writer.written()


def test_a_tensor_of_another_size_than_reserved_fails(tmp_path: Path) -> None:
    with WeightsWriter(tmp_path / "w.data") as writer:
        writer.stream([("a", 400, lambda: ir.tensor(np.zeros(99, np.float32)))])
        with pytest.raises(ValidationError, match="396 bytes where 400 were reserved"):
            writer.close()


def test_a_failed_export_stops_the_stream(tmp_path: Path) -> None:
    made = []

    def slow(i: int) -> ir.TensorProtocol:
        time.sleep(0.05)
        made.append(i)
        return ir.tensor(np.zeros(16, np.float32))

    with pytest.raises(RuntimeError, match="tracing failed"), WeightsWriter(tmp_path / "w.data") as writer:
        writer.stream((f"k{i}", 64, lambda i=i: slow(i)) for i in range(100))
        raise RuntimeError("tracing failed")
    assert len(made) < 10 and not any(t.name.startswith("weights-stream") for t in threading.enumerate())


def test_a_pieced_tensor_is_written_as_its_pieces_come_never_whole(tmp_path: Path) -> None:
    array = np.arange(1000, dtype=np.float32)

    def whole() -> ir.TensorProtocol:
        raise AssertionError("the stream made the tensor whole")

    def pieces():  # type: ignore[no-untyped-def]
        for start in range(0, 1000, 300):
            yield memoryview(array[start : start + 300].view(np.uint8))

    tensor = pieced_tensor(whole, pieces, ir.DataType.FLOAT, [1000])
    with WeightsWriter(tmp_path / "w.data") as writer:
        writer.add(_model(_arrays(1, [7])))
        writer.stream([("p", array.nbytes, lambda: tensor)])
        written = writer.close()
    data = (tmp_path / "w.data").read_bytes()
    offset, length = written.offsets["p"]
    assert data[offset : offset + length] == array.tobytes()
    assert written.sha256 == hashlib.sha256(data).hexdigest()


def test_a_discarded_stream_leaves_an_empty_file_to_stream_again(tmp_path: Path) -> None:
    """The export streams the layers in the form it expects before the first trace; when the trace
    holds another, the region is discarded and the right tensors streamed: the file is as if only
    they had been."""
    guessed = _arrays(4, [5000, 300])
    with WeightsWriter(tmp_path / "w.data") as writer:
        writer.stream((key, a.nbytes, lambda a=a: ir.tensor(a)) for key, a in guessed.items())
        assert writer.streams((key, a.nbytes) for key, a in guessed.items())
        assert not writer.streams((key, a.nbytes) for key, a in STREAMED.items())
        writer.discard()
        writer.stream((key, a.nbytes, lambda a=a: ir.tensor(a)) for key, a in STREAMED.items())
        writer.add(_model(_arrays(3, [17, 2000])))
        again = writer.close()
    with WeightsWriter(tmp_path / "direct.data") as writer:
        writer.stream((key, a.nbytes, lambda a=a: ir.tensor(a)) for key, a in STREAMED.items())
        writer.add(_model(_arrays(3, [17, 2000])))
        direct = writer.close()
    assert again == direct
    assert (tmp_path / "w.data").read_bytes() == (tmp_path / "direct.data").read_bytes()
