"""The Backend interface: run one graph on torch tensors. Generation never looks past it.

Backends differ only in how they run a graph (and where the cache lives). Outputs are valid until
the next `run`: present tensors may alias the past buffers they were fed (that is the point: no
copy of the cache per step), and logits may live in a reused buffer.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType

import torch

from llamatrt.errors import InputError, ManifestMismatchError
from llamatrt.exporter.manifest import TORCH_DTYPES, GraphSpec, Manifest, read_manifest
from llamatrt.models.kv_cache import cache_names, past_name_for

SMALL_INPUTS = ("input_ids", "position_ids", "cache_position", "attention_mask")
BACKEND_NAMES = ("torch", "onnxruntime", "tensorrt")
BACKEND_ALIASES = {"ort": "onnxruntime", "pytorch": "torch", "trt": "tensorrt"}


class Backend(abc.ABC):
    name: str = "abstract"

    def __init__(self, folder: Path, manifest: Manifest, device: str = "cpu") -> None:
        self.folder = Path(folder)
        self.manifest = manifest
        self.device = torch.device(device)
        self.check_inputs = True  # benchmarks may switch the (cheap) feed check off
        # torch threads for the loop's own work (sampling, copies) while this backend runs graphs;
        # None leaves torch as it is. See OrtBackend for why a CPU backend wants 1.
        self.loop_threads: int | None = None

    def run(self, graph: str, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if graph not in self.manifest.graphs:
            raise InputError(f"graph {graph!r} is not in this artifact; it has {', '.join(self.manifest.graphs)}")
        if self.check_inputs:
            check_feeds(self.manifest.graphs[graph], feeds)
        return self._run(graph, feeds)

    @abc.abstractmethod
    def _run(self, graph: str, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...

    def allocate_cache(self) -> list[torch.Tensor]:
        """Zeroed past buffers on this backend's device, flat in graph order; once per generation."""
        spec = self.manifest.cache_spec
        return [torch.zeros(spec.shape, dtype=TORCH_DTYPES[spec.dtype], device=self.device)
                for _ in cache_names(self.manifest.config.num_layers)]  # fmt: skip

    def _input_buffers(self) -> dict[str, dict[str, torch.Tensor]]:
        """Per graph, persistent device buffers for the small inputs: backends that bind by address
        copy each call's values in, so the bound addresses never change."""
        return {
            name: {t.name: torch.zeros(t.shape, dtype=TORCH_DTYPES[t.dtype], device=self.device)
                   for t in g.inputs if t.name in SMALL_INPUTS}
            for name, g in self.manifest.graphs.items()
        }  # fmt: skip

    def _logits_buffers(self) -> dict[str, torch.Tensor]:
        """Per graph, the reused fp32 logits output buffer."""
        return {n: torch.empty(g.outputs[0].shape, dtype=torch.float32, device=self.device)
                for n, g in self.manifest.graphs.items()}  # fmt: skip

    def _aliased_outputs(
        self, graph: str, feeds: Mapping[str, torch.Tensor], logits: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The outputs of a backend that writes the cache in place: each present is its past buffer."""
        outputs = {"logits": logits}
        for spec in self.manifest.graphs[graph].outputs[1:]:
            outputs[spec.name] = feeds[past_name_for(spec.name)]
        return outputs

    def close(self) -> None:  # noqa: B027  (optional hook: most backends hold nothing to release)
        """Release sessions/engines; the default has nothing to release."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to `count` inside the block (None: unchanged)."""
    before = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def check_feeds(spec: GraphSpec, feeds: Mapping[str, torch.Tensor]) -> None:
    """One-line errors that name the tensor, instead of an ORT/TensorRT traceback."""
    expected = {t.name for t in spec.inputs}
    if set(feeds) != expected:
        missing, extra = sorted(expected - set(feeds)), sorted(set(feeds) - expected)
        raise InputError(f"{spec.name} feeds: missing {missing[:3]}, unexpected {extra[:3]}; feed exactly the "
                         "graph's inputs named in manifest.json")  # fmt: skip
    for t in spec.inputs:
        value = feeds[t.name]
        if tuple(value.shape) != t.shape or value.dtype != TORCH_DTYPES[t.dtype]:
            raise InputError(f"{spec.name} input {t.name!r} is {tuple(value.shape)} {value.dtype}, the graph takes "
                             f"{t.shape} {t.dtype}")  # fmt: skip
    seq = spec.seq_len
    max_cache_len = spec.input("attention_mask").shape[1]
    start = int(feeds["cache_position"][0])
    if start < 0 or start + seq > max_cache_len:
        raise InputError(f"cache_position {start}..{start + seq - 1} is outside the cache of {max_cache_len} slots; "
                         "the cache is full — re-export with a larger --max-seq-len")  # fmt: skip


def canonical_backend_name(name: str) -> str:
    name = BACKEND_ALIASES.get(name, name)
    if name not in BACKEND_NAMES:
        raise InputError(f"unknown backend {name!r}; use one of {', '.join(BACKEND_NAMES)}")
    return name


def open_backend(artifact: str | Path, kind: str = "onnxruntime", device: str | None = None) -> Backend:
    """Read and check the artifact's manifest, then open the named backend on it."""
    kind = canonical_backend_name(kind)
    folder = Path(artifact)
    if not folder.is_dir():
        raise ManifestMismatchError(f"artifact {folder} does not exist; run `llamatrt export --out {folder}` first")
    manifest = read_manifest(folder)
    if kind == "torch":
        from llamatrt.runtime.torch_backend import TorchBackend

        return TorchBackend(folder, manifest, device or "cpu")
    if kind == "onnxruntime":
        from llamatrt.runtime.ort_backend import OrtBackend

        return OrtBackend(folder, manifest, device or "cpu")
    from llamatrt.runtime.trt_backend import TensorRTBackend

    return TensorRTBackend(folder, manifest, device or "cuda")
