"""The Backend interface: run one graph on torch tensors. Generation never looks past it.

Backends differ only in how they run a graph (and where the cache lives). Each declares what it
runs (`attention_forms`, `weight_formats`): the manifest says what a graph is, never who may run
it, so a backend added later runs the artifacts that exist. From the artifact's graph variants a
backend picks the ones it runs (`graphs`); the loop asks for one by role and batch.
Outputs are valid until the next `run`: present tensors may alias the past buffers they were fed
(that is the point: no copy of the cache per step), and logits may live in a reused buffer.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import ClassVar

import torch

from llamatrt.base.artifact import names
from llamatrt.base.artifact.feeds import check_feeds
from llamatrt.base.artifact.manifest import GraphSpec, Manifest
from llamatrt.base.artifact.precision import torch_dtype
from llamatrt.base.errors import InputError, ManifestMismatchError


class Backend(abc.ABC):
    name: ClassVar[str] = "abstract"
    # Whether opening needs the .onnx files checked (a backend that runs engines or the model does not).
    reads_graph_files: ClassVar[bool] = True
    # What it runs: attention forms (base.artifact.variants), preferred first, and weight formats
    # (a precision or a quantized format's name; None: every one the exporter writes).
    attention_forms: ClassVar[tuple[str, ...]] = ("portable",)
    weight_formats: ClassVar[frozenset[str] | None] = None

    def __init__(self, folder: Path, manifest: Manifest, device: str = "cpu", check_feeds: bool = True) -> None:
        self.folder = Path(folder)
        self.manifest = manifest
        self.device = torch.device(device)
        self.check_feeds = check_feeds  # benchmarks skip the (cheap) per-call check
        self.graphs = self.select_graphs(manifest)

    def attention_order(self) -> tuple[str, ...]:
        """Attention forms this backend runs here, preferred first (a backend may narrow its
        declared `attention_forms` by device or library version)."""
        return self.attention_forms

    @classmethod
    def runs(cls, graph: GraphSpec) -> bool:
        """Whether this kind of backend can run `graph`, by what the graph is."""
        return graph.attention in cls.attention_forms and (
            cls.weight_formats is None or graph.weights in cls.weight_formats
        )

    def select_graphs(self, manifest: Manifest) -> dict[str, GraphSpec]:
        """The variants this backend runs, of the first attention form in `attention_order` that has
        a whole set: a decode at the artifact's batch and a batch-1 prefill (one form, so a backend
        holds one set of sessions or engines)."""
        for form in self.attention_order():
            graphs = {n: g for n, g in manifest.graphs.items() if g.attention == form and self.runs(g)}
            values = graphs.values()
            if any(g.serves("decode", manifest.batch_size) for g in values) and any(
                g.serves("prefill", 1) for g in values
            ):
                return graphs
        raise ManifestMismatchError(
            f"{self.folder} has no graphs the {self.name} backend can run; re-export with this llamatrt or pick "
            "another --backend"
        )

    def graph(self, role: str, batch: int | None = None, seq: int | None = None) -> GraphSpec:
        """The variant this backend runs for `role` at `batch` rows (default: the artifact's batch)
        and `seq` tokens per call (default: the widest it has; a graph with open tokens is widest)."""
        batch = self.manifest.batch_size if batch is None else batch
        found = [g for g in self.graphs.values() if g.serves(role, batch, seq)]
        if not found:
            raise InputError(
                f"this artifact has no {role} graph of batch {batch}"
                f"{'' if seq is None else f' and {seq} tokens'} for the {self.name} backend; "
                "re-export it with this llamatrt"
            )
        return max(found, key=lambda g: g.seq_len or 1 << 30)

    def seq_sizes(self, role: str, batch: int) -> list[int] | None:
        """Tokens per call of this backend's `role` graphs at `batch` rows, ascending; None where a
        graph takes any number."""
        found = [g for g in self.graphs.values() if g.serves(role, batch)]
        if any(g.seq_len is None for g in found):
            return None
        return sorted({g.seq_len for g in found if g.seq_len is not None})

    @property
    def loop_threads(self) -> int | None:
        """torch threads for the loop's own work (sampling, copies) while this backend runs graphs;
        None leaves torch as it is. See OrtBackend for why a CPU backend wants 1."""
        return None

    def run(self, graph: str, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        spec = self.graphs.get(graph)
        if spec is None:
            raise InputError(
                f"graph {graph!r} is not one the {self.name} backend runs here; it runs {', '.join(self.graphs)}"
            )
        if self.check_feeds:
            check_feeds(spec, feeds)
        return self._run(spec, feeds)

    @abc.abstractmethod
    def _run(self, graph: GraphSpec, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...

    def allocate_cache(self) -> torch.Tensor:
        """Zeroed past buffers on this backend's device, once per generation: one tensor
        (2 x layers, *cache_shape) whose entries along dim 0 are the graph's past inputs in graph order,
        each contiguous. One allocation rather than one per input, so that a row's slots of every layer
        are one strided view: the prefix cache copies a block of all layers in one op, not 2 x layers."""
        dtype = torch_dtype(self.manifest.dtype)
        count = len(names.cache_names(self.manifest.config.num_layers))
        return torch.zeros((count, *self.manifest.cache_shape), dtype=dtype, device=self.device)

    def _input_buffers(self) -> dict[str, dict[str, torch.Tensor]]:
        """Per graph, persistent device buffers for the small inputs: backends that bind by address
        copy each call's values in, so the bound addresses never change."""
        return {
            name: {
                t.name: torch.zeros(_fixed(t.shape), dtype=torch_dtype(t.dtype), device=self.device)
                for t in g.inputs
                if not names.is_cache(t.name)
            }
            for name, g in self.graphs.items()
        }

    def _logits_buffers(self) -> dict[str, torch.Tensor]:
        """Per graph, the reused fp32 logits output buffer."""
        return {
            n: torch.empty(_fixed(g.outputs[0].shape), dtype=torch.float32, device=self.device)
            for n, g in self.graphs.items()
        }

    @staticmethod
    def _aliased_outputs(
        graph: GraphSpec, feeds: Mapping[str, torch.Tensor], logits: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The outputs of a backend that writes the cache in place: each present is its past buffer."""
        outputs = {names.LOGITS: logits}
        for present, past in graph.aliases:
            outputs[present] = feeds[past]
        return outputs

    def close(self) -> None:  # noqa: B027  (optional hook: most backends hold nothing to release)
        """Release sessions/engines; the default has nothing to release."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _fixed(shape: tuple[int | str, ...]) -> tuple[int, ...]:
    """A graph's shape as numbers: the address-bound buffers belong to fixed-shape variants only."""
    if any(isinstance(d, str) for d in shape):
        raise ManifestMismatchError(f"a buffer of shape {shape} is open; bind buffers of fixed-shape graphs only")
    return tuple(int(d) for d in shape)


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
