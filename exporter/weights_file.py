"""One external-data file for both graphs: each distinct tensor stored once, matched by content.

The exporter may rename initializers, so tensors are keyed by a hash of their bytes (the length is
checked on lookup). Disk use is then ~1x the weights, not 2x.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from llamatrt.base.artifact.precision import dtype_name
from llamatrt.base.errors import ValidationError
from llamatrt.base.heap import one_arena, trim_heap

if TYPE_CHECKING:
    import onnx_ir as ir

ALIGNMENT = 64  # bytes; keeps every tensor aligned for vector loads when memory-mapped
INLINE_LIMIT = 1024  # smaller integer tensors (shape constants) stay inside the .onnx file
HASH_CHUNK = 4 << 20  # bytes read back at a time to bring the digest up to the file's end


@dataclass(frozen=True)
class WrittenWeights:
    bytes: int
    sha256: str
    offsets: dict[str, tuple[int, int]]  # sha1 of a tensor's bytes, or its streamed key -> (offset, length)


STREAMED_KEY = "llamatrt.streamed"  # LazyTensor.meta key: what the tensor is, for sharing it unmade
PIECES_KEY = "llamatrt.pieces"  # LazyTensor.meta key: a maker of its bytes as consecutive blocks


def streamed_tensor(
    key: str, make: Callable[[], ir.TensorProtocol], dtype: ir.DataType, shape: Sequence[int]
) -> ir.LazyTensor:
    """A weight made only when it is written (read from the checkpoint, upcast, quantized), under a
    key naming what it is, so every graph that holds it shares one copy without making it twice."""
    import onnx_ir as ir

    lazy = ir.LazyTensor(make, dtype, ir.Shape(list(shape)), name=key)
    lazy.meta[STREAMED_KEY] = key
    return lazy


def pieced_tensor(
    make: Callable[[], ir.TensorProtocol],
    pieces: Callable[[], Iterable[memoryview | bytes]],
    dtype: ir.DataType,
    shape: Sequence[int],
) -> ir.LazyTensor:
    """A tensor that `make` makes whole and `pieces` as its bytes in consecutive blocks, each valid
    until the next is asked for (exporter.float_pieces): the stream writes those as they come, so
    the tensor is never whole in memory."""
    import onnx_ir as ir

    lazy = ir.LazyTensor(make, dtype, ir.Shape(list(shape)))
    lazy.meta[PIECES_KEY] = pieces
    return lazy


class WeightsWriter:
    """The artifact's one weights file, filled graph by graph: each graph's large initializers move
    into it as the graph is made, so only one graph's own tensors are in memory at a time. The file
    can be moved while it is written (`move`): the export writes the traced twin's weights into it,
    validates the twin over them, then moves the file into the artifact and appends what the other
    layers' graphs add.

    Tensors whose sizes are known before any graph holds them (the replicated layers' streamed
    weights) can be written by a background thread (`stream`) into a region reserved for them, while
    the caller goes on making the twin, tracing, validating and appending after it: making those
    tensors (reading, upcasting, quantizing) and the kernel's page-cache writes release the GIL, so
    on two cores they overlap the caller's Python. A float export streams them in the form it
    expects before the first trace, which then confirms it (`streams`) or has the region emptied
    and streamed again (`discard`). The layout is fixed when the region is reserved and the digest
    is taken in file order, so neither depends on thread timing."""

    def __init__(self, path: Path, params: Mapping[str, torch.Tensor] | None = None) -> None:
        """`params`: the traced model's parameters, whose graph tensors (the parameters, or views of
        them such as a pre-transposed weight) are then keyed by what they view, not hashed (or
        later, `key_parameters`)."""
        self.path = path
        self.key_parameters(params or {})
        self.earlier: set[Path] = set()  # where the file was before a move: tensors there are ours
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)  # read: `wait` hashes appends back
        self.offsets: dict[str, tuple[int, int]] = {}
        self.size = 0  # the file's length: every byte below it is written or reserved
        self.digest = hashlib.sha256()
        self.hashed = 0  # the digest covers the file up to here; the rest waits for the stream's region
        self.lock = threading.Lock()  # over digest and hashed, which the stream advances too
        self.stream_thread: threading.Thread | None = None
        self.stream_error: BaseException | None = None
        self.stopping = threading.Event()
        self.region: dict[str, int] = {}  # the last stream's tensors: key -> bytes

    def __enter__(self) -> WeightsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        """Stop a stream still running (the export failed) and close the file."""
        self.stopping.set()
        self._joined()
        self._close_fd()

    def add(self, model: ir.Model, after_write: Callable[[], object] = lambda: None) -> None:
        """Move every large initializer of `model` into the file, each distinct tensor once.
        `after_write` runs after each tensor written (the exporter gives back the pages of the mapped
        parameters a tensor read, so writing the twin holds one tensor's at a time)."""
        import onnx_ir as ir

        for value in model.graph.initializers.values():
            tensor = value.const_value
            if tensor is None or (tensor.nbytes < INLINE_LIMIT and not tensor.dtype.is_floating_point()):
                continue  # every float tensor goes out, so parameters are all found in the file
            if isinstance(tensor, ir.ExternalTensor) and Path(tensor.path) in self.earlier | {self.path}:
                offset, length = tensor.offset or 0, tensor.length or tensor.nbytes  # written here before a move
            else:
                offset, length = self._write(tensor, after_write)
            value.const_value = ir.ExternalTensor(
                self.path.name,
                offset,
                length,
                tensor.dtype,
                shape=ir.Shape(tensor.shape.numpy()),
                name=value.name or "",
                base_dir=self.path.parent,
            )

    def key_parameters(self, params: Mapping[str, torch.Tensor]) -> None:
        self.owners = ParameterViews(params)

    def stream(self, tensors: Iterable[tuple[str, int, Callable[[], ir.TensorProtocol]]]) -> None:
        """Reserve the file's next bytes for `tensors` ((streamed key, bytes, maker), in order) and
        write them from a background thread; a graph holding streamed tensors of those keys finds
        them at once. The stream's error, if any, is raised by `wait` (and so by `written`)."""
        self.wait()
        region = []
        for key, length, make in tensors:
            if key not in self.offsets:
                offset = self.size + (-self.size % ALIGNMENT)
                self.offsets[key] = (offset, length)
                self.size = offset + length
                region.append((key, make))
                self.region[key] = length
        os.ftruncate(self.fd, self.size)  # a hole until the stream fills it; appends go after it
        self.stopping.clear()
        one_arena()  # the stream's threads allocate from the process's arena, not arenas of their own
        self.stream_thread = threading.Thread(target=self._stream, args=(region,), name="weights-stream")
        self.stream_thread.start()

    def _joined(self) -> None:
        if self.stream_thread is not None:
            self.stream_thread.join()
            self.stream_thread = None

    def streams(self, tensors: Iterable[tuple[str, int, object]]) -> bool:
        """Whether the streams so far hold exactly `tensors` ((key, bytes, ...)): all of them, at
        those sizes, and nothing else."""
        wanted = {key: length for key, length, *_ in tensors}
        return wanted == self.region

    def discard(self) -> None:
        """Stop a stream and empty the file: for a stream of tensors the graphs turned out not to
        hold, before anything else was written."""
        self.stopping.set()
        self._joined()
        self.stream_error = None
        if set(self.offsets) != set(self.region):
            raise ValidationError("the weights file holds more than a stream; please report")
        os.ftruncate(self.fd, 0)
        self.offsets, self.region, self.size, self.hashed = {}, {}, 0, 0
        self.digest = hashlib.sha256()
        trim_heap()

    def _stream(self, region: list[tuple[str, Callable[[], ir.TensorProtocol]]]) -> None:
        """Make and hash each tensor while a second thread writes the one before it: a buffered
        write holds the file's lock, so the writes cannot be split, but the making can run beside
        them. Two tensors are in memory at most: one being written, one being made. A tensor made
        in pieces (`pieced_tensor`) is written here, a piece at a time, as its pieces come."""
        made: queue.SimpleQueue[tuple[memoryview | bytes, int] | None] = queue.SimpleQueue()
        room = threading.Semaphore(2)
        writer = threading.Thread(target=self._write_made, args=(made, room), name="weights-stream-writer")
        writer.start()
        start = self.hashed  # the region begins where the digest stands (`stream` waited first)
        try:
            for key, make in region:
                room.acquire()
                if self.stopping.is_set() or self.stream_error is not None:
                    break
                offset, length = self.offsets[key]
                tensor = make()
                pieces = getattr(tensor, "meta", {}).get(PIECES_KEY)
                if pieces is not None:
                    done = self._write_pieces(pieces(), start, offset)
                    room.release()
                else:
                    data = _buffer(tensor)
                    done = len(data)
                    if done == length:
                        self._hash_in_order(start, offset, data)  # nothing else writes in the region
                        made.put((data, offset))
                    del data
                del tensor
                if done != length:
                    raise ValidationError(f"{key} is {done} bytes where {length} were reserved; please report")
                start = offset + length
        except BaseException as e:  # handed to the exporting thread by `wait`
            self.stream_error = e
        finally:
            made.put(None)
            writer.join()
        if self.stream_error is None and not self.stopping.is_set():
            try:
                self._hash_to_end()  # what the caller appended meanwhile: here, not in the caller's `wait`
            except BaseException as e:
                self.stream_error = e

    def _write_pieces(self, pieces: Iterable[memoryview | bytes], start: int, offset: int) -> int:
        """Hash and write consecutive pieces from `offset` (the digest stands at `start`); returns
        the bytes written."""
        position = offset
        for piece in pieces:
            if len(piece) == 0:
                continue
            self._hash_in_order(start, position, piece)
            _write_at(self.fd, piece, position)
            position += len(piece)
            start = position
        return position - offset

    def _write_made(
        self, made: queue.SimpleQueue[tuple[memoryview | bytes, int] | None], room: threading.Semaphore
    ) -> None:
        while (item := made.get()) is not None:
            if self.stream_error is None and not self.stopping.is_set():
                try:
                    _write_at(self.fd, *item)
                except BaseException as e:
                    self.stream_error = e
            del item
            room.release()

    def wait(self) -> None:
        """Wait for the background stream to finish, raise its error, and bring the digest up to the
        file's end (what was appended after the region, read back)."""
        if self.stream_thread is None:
            return
        self._joined()
        trim_heap()  # what the stream's threads freed stays in their arenas, beside the next phase
        if self.stream_error is not None:
            error, self.stream_error = self.stream_error, None
            raise error
        self._hash_to_end()

    def _hash_to_end(self) -> None:
        """Bring the digest up to the file's end, reading back what was appended past the digest."""
        chunk = bytearray(HASH_CHUNK)  # small: this runs beside validation, whose memory is bounded
        with self.lock:
            while self.hashed < self.size:
                done = os.preadv(self.fd, [memoryview(chunk)[: self.size - self.hashed]], self.hashed)
                if not done:
                    raise ValidationError(f"{self.path} ends at {self.hashed} bytes, before {self.size}; please report")
                self.digest.update(memoryview(chunk)[:done])
                self.hashed += done

    def _write(self, tensor: ir.TensorProtocol, after_write: Callable[[], object]) -> tuple[int, int]:
        import onnx_ir as ir

        key = tensor.meta.get(STREAMED_KEY) if isinstance(tensor, ir.LazyTensor) else self.owners.key(tensor)
        if key is not None and key in self.offsets:
            return self.offsets[key]
        data = _buffer(tensor)
        key = key or hashlib.sha1(data).hexdigest()
        if key not in self.offsets:
            start = self.size
            offset = start + (-start % ALIGNMENT)
            _write_at(self.fd, data, offset)
            self.offsets[key] = (offset, len(data))
            self.size = offset + len(data)
            self._hash_in_order(start, offset, data)  # after a running stream's region: `wait` reads it back
            del data
            after_write()
        return self.offsets[key]

    def _hash_in_order(self, start: int, offset: int, data: memoryview | bytes) -> None:
        """Add the bytes from `start` (zeros up to `offset`, then `data`) to the digest if it stands at
        `start`; otherwise leave them to `wait`, which reads what lies past the digest back."""
        with self.lock:
            if self.hashed == start:
                self.digest.update(bytes(offset - start))
                self.digest.update(data)
                self.hashed = offset + len(data)

    def move(self, path: Path) -> None:
        """Rename the file (same file system) and go on writing it there."""
        os.replace(self.path, path)
        self.earlier.add(self.path)
        self.path = path

    def layout(self) -> WrittenWeights:
        """Where each tensor lies, a running stream's included, without waiting for it: the digest
        is not known until the stream ends (empty here). What the twin's validation reads while
        the stream writes the other layers; `written` is the file's record."""
        return WrittenWeights(self.size, "", dict(self.offsets))

    def written(self) -> WrittenWeights:
        """What the file holds so far (the stream finished first)."""
        self.wait()
        return WrittenWeights(self.size, self.digest.copy().hexdigest(), dict(self.offsets))

    def close(self) -> WrittenWeights:
        written = self.written()
        self._close_fd()
        return written

    def _close_fd(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _write_at(fd: int, data: memoryview | bytes, offset: int) -> None:
    """All of `data` at `offset` (positional, so the stream and the caller never share a file position)."""
    view = memoryview(data)
    while view:
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


class ParameterViews:
    """Which parameter a graph tensor is, when it is one or a whole view of one (the exporter hands
    the traced module's own tensors to the graph, and a pre-transposed weight as a transposed view):
    found by address, not by hashing its bytes, and only among the parameters, which outlive the
    export (an address of any other tensor may be reused by a later one)."""

    def __init__(self, params: Mapping[str, torch.Tensor]) -> None:
        self.by_address = {t.data_ptr(): (name, t) for name, t in params.items() if t.numel() > 1}

    def find(self, tensor: ir.TensorProtocol) -> tuple[str, bool] | None:
        """(parameter, transposed) that `tensor` views whole, or None."""
        raw = getattr(tensor, "raw", None)
        if isinstance(raw, torch.Tensor):
            address, shape, strides = raw.data_ptr(), tuple(raw.shape), tuple(raw.stride())
        elif isinstance(raw, np.ndarray) and raw.itemsize:
            address, shape = raw.__array_interface__["data"][0], raw.shape
            strides = tuple(s // raw.itemsize for s in raw.strides)
        else:
            return None
        found = self.by_address.get(address)
        if found is None or found[1].numel() != int(np.prod(shape)):
            return None
        name, param = found
        if shape == tuple(param.shape) and strides == tuple(param.stride()):
            return name, False
        if len(shape) == 2 and shape == tuple(param.shape)[::-1] and strides == tuple(param.stride())[::-1]:
            return name, True
        return None

    def key(self, tensor: ir.TensorProtocol) -> str | None:
        found = self.find(tensor)
        return None if found is None else view_key(*found)


def view_key(param: str, transposed: bool) -> str:
    return f"param:{param}{'.T' if transposed else ''}"


def _buffer(tensor: ir.TensorProtocol) -> memoryview | bytes:
    """A tensor's bytes as stored, without a copy where numpy holds them as they are."""
    import onnx_ir as ir

    if tensor.dtype in (ir.DataType.INT4, ir.DataType.UINT4):
        return tensor.tobytes()  # packed two to a byte on the way out
    array = np.ascontiguousarray(tensor.numpy())
    return memoryview(array.reshape(-1).view(np.uint8).data)


def write_shared_weights(models: Sequence[ir.Model], path: Path) -> WrittenWeights:
    """Move every large initializer of `models` into `path`, each distinct tensor once."""
    with WeightsWriter(path) as writer:
        for model in models:
            writer.add(model)
        return writer.close()


def parameter_locations(state_dict: Mapping[str, torch.Tensor], written: WrittenWeights) -> dict[str, dict[str, Any]]:
    """Where each model parameter lies in the weights file, found by content: the exporter renames
    and pre-transposes weights, and in fp16/bf16 graphs folds the fp32 upcast of RMSNorm weights
    (an exact conversion, recorded as the stored dtype). Lets the PyTorch backend run from the
    artifact's own weights; a parameter found nowhere fails the export."""
    locations: dict[str, dict[str, Any]] = {}
    for name, tensor in state_dict.items():
        for transposed in (False, True):
            hit = written.offsets.get(view_key(name, transposed))
            if hit is not None:
                shape = list(tensor.shape)[::-1] if transposed else list(tensor.shape)
                locations[name] = {
                    "offset": hit[0],
                    "shape": shape,
                    "transposed": transposed,
                    "dtype": dtype_name(tensor.dtype),
                }
                break
        if name in locations:
            continue
        same = next((other for other, t in state_dict.items() if other in locations and _equal(t, tensor)), None)
        if same is not None:  # the exporter merged equal tensors into one (norms of equal weights)
            locations[name] = dict(locations[same])
            continue
        for candidate, transposed in stored_forms(tensor):
            data = candidate.contiguous().view(torch.uint8).numpy().tobytes()
            hit = written.offsets.get(hashlib.sha1(data).hexdigest())
            if hit is not None and hit[1] == len(data):
                locations[name] = {
                    "offset": hit[0],
                    "shape": list(candidate.shape),
                    "transposed": transposed,
                    "dtype": dtype_name(candidate.dtype),
                }
                break
        else:
            raise ValidationError(
                f"parameter {name!r} is not in the exported weights file in any known form; "
                "please report with the model config"
            )
    return locations


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


def stored_forms(tensor: torch.Tensor) -> list[tuple[torch.Tensor, bool]]:
    """(form, transposed) in which the exporter may have stored a parameter."""
    forms = [(tensor, False)] + ([(tensor.t(), True)] if tensor.dim() == 2 else [])
    if tensor.dtype != torch.float32:
        forms += [(form.float(), transposed) for form, transposed in forms]
    return forms


def save_graph(model: ir.Model, path: Path) -> int:
    """Write the .onnx (external references kept as they are); returns its size."""
    import onnx_ir as ir

    ir.save(model, path)
    return path.stat().st_size
