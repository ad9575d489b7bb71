"""The TensorRT backend: engines deserialized once, tensors bound by address, one CUDA stream.

Present is bound to the same address as past, so the engine's KV-cache update writes in place.
Small inputs are copied into static device buffers and the cache buffers live as long as the
backend, so every decode step binds the same addresses: the decode step is captured in a CUDA
graph after one warm-up run and replayed from then on.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from llamatrt.base.artifact.engines import check_engines, engine_module, require_engine_graphs
from llamatrt.base.artifact.manifest import GraphSpec, Manifest
from llamatrt.base.artifact.reader import inside
from llamatrt.base.errors import BackendUnavailable, ManifestMismatchError
from llamatrt.base.lazy import require_cuda
from llamatrt.runtime.backend import Backend


class CudaOps:
    """The few CUDA calls this backend makes, behind one object so tests can record them on a CPU."""

    def __init__(self, device: torch.device) -> None:
        self.stream = torch.cuda.Stream(device)

    @property
    def handle(self) -> int:
        return self.stream.cuda_stream

    def on_stream(self) -> Any:
        return torch.cuda.stream(self.stream)

    def synchronize(self) -> None:
        self.stream.synchronize()

    def capture(self, launch: Callable[[], None]) -> Any:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self.stream):
            launch()
        return graph


class TensorRTBackend(Backend):
    name = "tensorrt"
    attention_forms = ("portable",)  # the graphs `build` makes engines of (base.artifact.engines)
    # its engines are weight-stripped: they are refit from the .onnx graphs (hence weights.data) at load

    def __init__(
        self,
        folder: Path,
        manifest: Manifest,
        device: str = "cuda",
        check_feeds: bool = True,
        cuda_graph: bool = True,
        trt: ModuleType | None = None,
        cuda: Any = None,
    ) -> None:
        require_engine_graphs(manifest, folder)  # said before anything about CUDA
        super().__init__(folder, manifest, device, check_feeds)
        plans = check_engines(manifest, self.folder)
        engines = manifest.engines["graphs"]
        if trt is None:
            trt = engine_module(manifest.engines["builder"])
        if cuda is None:
            require_cuda()
            cuda = CudaOps(self.device)
        self.trt, self.cuda = trt, cuda
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engines: dict[str, Any] = {}
        self.contexts: dict[str, Any] = {}
        for name, entry in engines.items():
            engine = self.runtime.deserialize_cuda_engine(plans[name].read_bytes())
            if engine is None:
                raise ManifestMismatchError(
                    f"{entry['path']} was built by another TensorRT version or for another "
                    f"GPU; re-run `llamatrt build {folder} --force`"
                )
            if manifest.engines.get("weights") == "stripped":
                self._refit(engine, self.graphs[name])
            self.engines[name] = engine
            self.contexts[name] = engine.create_execution_context()
        self.static = self._input_buffers()
        self.logits = self._logits_buffers()
        self.cache: torch.Tensor | None = None
        self.use_cuda_graph = cuda_graph
        self.cuda_graphs: dict[tuple[str, tuple[int, ...]], Any] = {}  # (graph, bound addresses) -> captured

    def _refit(self, engine: Any, graph: GraphSpec) -> None:
        """Fill a weight-stripped engine with its weights, read from the graph it was built from."""
        logger = self.trt.Logger(self.trt.Logger.WARNING)
        refitter = self.trt.Refitter(engine, logger)
        parser = self.trt.OnnxParserRefitter(refitter, logger)
        if not parser.refit_from_file(str(inside(self.folder, graph.path, f"graph {graph.name!r} path"))):
            error = parser.get_error(0) if parser.num_errors else None
            raise ManifestMismatchError(
                f"cannot refit the {graph.name} engine from {graph.path}"
                f"{f' ({error.desc()})' if error else ''}; re-run `llamatrt build --force`"
            )
        if not refitter.refit_cuda_engine():
            raise ManifestMismatchError(
                f"TensorRT could not refit the {graph.name} engine from {graph.path}; re-run `llamatrt build --force`"
            )

    def allocate_cache(self) -> torch.Tensor:
        """One set of cache buffers for the backend's lifetime: fixed addresses for CUDA graphs."""
        if self.cache is None:
            self.cache = super().allocate_cache()
        return self.cache

    def _bind(
        self, graph: GraphSpec, feeds: Mapping[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], tuple[int, ...]]:
        context, static = self.contexts[graph.name], self.static[graph.name]
        outputs = self._aliased_outputs(graph, feeds, self.logits[graph.name])
        addresses = []
        for name, tensor in feeds.items():
            if name in static:
                static[name].copy_(tensor, non_blocking=True)
                tensor = static[name]
            context.set_tensor_address(name, tensor.data_ptr())
            addresses.append(tensor.data_ptr())
        for name, tensor in outputs.items():
            context.set_tensor_address(name, tensor.data_ptr())
        return outputs, tuple(addresses)

    def _run(self, graph: GraphSpec, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        context = self.contexts[graph.name]
        with self.cuda.on_stream():
            outputs, addresses = self._bind(graph, feeds)
            key = (graph.name, addresses)
            if graph.role != "decode" or not self.use_cuda_graph:
                self._execute(context)
            elif key in self.cuda_graphs:
                self.cuda_graphs[key].replay()
            else:
                self._execute(context)  # warm-up: TensorRT allocates lazily on its first run
                self.cuda.synchronize()
                self.cuda_graphs[key] = self.cuda.capture(lambda: self._execute(context))
                # Capture records without running, so this step's results are the warm-up's.
        self.cuda.synchronize()
        return outputs

    def _execute(self, context: Any) -> None:
        if not context.execute_async_v3(self.cuda.handle):
            raise BackendUnavailable("TensorRT execution failed; re-run with --debug for the TensorRT log")

    def close(self) -> None:
        self.cuda_graphs.clear()
        self.contexts.clear()
        self.engines.clear()
