"""The ONNX Runtime backend (CPU; CUDA where onnxruntime-gpu is installed).

Every tensor is bound by address (IO binding), and each `present.*` output is bound to the very
buffer fed as its `past_key_values.*` input, so TensorScatter updates the cache in place: no
allocation and no copy of the cache per step. The small inputs are copied into persistent
buffers, so a decode step whose cache buffers are the ones already bound reuses its binding as it
is: the per-step Python work is a few tiny copies and one `run_with_iobinding`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llamatrt.errors import BackendUnavailable, InputError, ManifestMismatchError
from llamatrt.exporter.manifest import GraphSpec, Manifest
from llamatrt.exporter.ort_attention import MIN_ONNXRUNTIME_TEXT, onnxruntime_runs_fused
from llamatrt.runtime.backend import Backend

logger = logging.getLogger(__name__)
NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64}


def physical_cores() -> int:
    """Threads for intra-op parallelism: the cores this process may use (SMT siblings add little)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class OrtBackend(Backend):
    name = "onnxruntime"

    def __init__(self, folder: Path, manifest: Manifest, device: str = "cpu", threads: int | None = None) -> None:
        super().__init__(folder, manifest, device)
        import onnxruntime as ort

        if manifest.dtype == "bfloat16" and self.device.type == "cpu":
            raise BackendUnavailable("ONNX Runtime CPU cannot run bf16 graphs; use --backend torch or a GPU backend")
        providers: list[Any] = ["CPUExecutionProvider"]
        if self.device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise BackendUnavailable("onnxruntime has no CUDA provider here; pip install onnxruntime-gpu")
            providers = [("CUDAExecutionProvider", {"device_id": self.device.index or 0})]

        def options(graph: GraphSpec) -> Any:
            opts = ort.SessionOptions()
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            opts.intra_op_num_threads = threads or physical_cores()
            opts.log_severity_level = 3
            if graph.seq_len > 1:
                # Each session has its own thread pool, whose workers spin after a run. A spinning
                # prefill pool took a core from the decode steps that follow: SmolLM2's 16 decode steps
                # right after a prefill (`llamatrt bench --contexts 100,1000`) ran at 85.6 / 74.0 tok/s,
                # 96.2 / 87.7 with this. Prefill's large GEMMs need no spin-waiting; its workers sleep.
                opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            return opts

        self.sessions: dict[str, Any] = {}
        # CPU runs the graphs with ONNX Runtime's fused attention where the export made them; CUDA's
        # GroupQueryAttention takes fp16/bf16 only, so it runs the portable graphs, as does an
        # ONNX Runtime too old to load the fused node (correct, only slower).
        fused = self.device.type == "cpu" and all(g.ort_path for g in manifest.graphs.values())
        if fused and not onnxruntime_runs_fused():
            fused = False
            logger.warning("onnxruntime %s cannot run the fused-attention graphs (needs >= %s); running the "
                           "portable ones, slower: pip install -U onnxruntime", ort.__version__,
                           MIN_ONNXRUNTIME_TEXT)  # fmt: skip
        self.graph_files: dict[str, str] = {}  # graph -> the .onnx file this backend runs
        for name, graph in manifest.graphs.items():
            path = graph.ort_path if fused else graph.path
            try:
                self.sessions[name] = ort.InferenceSession(str(self.folder / path), options(graph), providers=providers)
            except Exception as e:  # ORT raises its own untyped exceptions (Fail, InvalidProtobuf, ...)
                raise ManifestMismatchError(f"ONNX Runtime cannot load {path} ({str(e).splitlines()[0][:200]}); "
                                            "re-run `llamatrt export --force`") from e  # fmt: skip
            self.graph_files[name] = path
        self.logits = self._logits_buffers()
        self._ort_device = "cuda" if self.device.type == "cuda" else "cpu"
        self._small = self._input_buffers()
        self._bindings: dict[str, tuple[Any, tuple[int, ...], list[torch.Tensor]]] = {}
        # ONNX Runtime's intra-op threads own the cores. torch's OpenMP workers, woken by the loop's
        # sampling (an argmax over B x vocab is above torch's parallel grain), would spin on those same
        # cores through the next graph run: in a cProfile of SmolLM2 batch-4 generation (2 cores) a decode
        # step's run_with_iobinding took 27 ms instead of 19.5. The loop's torch work is tiny, so it runs
        # on one thread.
        if self.device.type == "cpu":
            self.loop_threads = 1

    def _bind(self, binding: Any, name: str, tensor: torch.Tensor, output: bool) -> None:
        dtype = NUMPY_DTYPES[str(tensor.dtype).removeprefix("torch.")]
        bind = binding.bind_output if output else binding.bind_input
        bind(name, self._ort_device, self.device.index or 0, dtype, tuple(tensor.shape), tensor.data_ptr())

    def _run(self, graph: str, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        small = self._small[graph]
        for name, buffer in small.items():
            buffer.copy_(feeds[name])
        cache = [feeds[t.name] for t in self.manifest.graphs[graph].inputs if t.name not in small]
        key = tuple(t.data_ptr() for t in cache)
        if graph not in self._bindings or self._bindings[graph][1] != key:
            self._bindings[graph] = (self._new_binding(graph, {**feeds, **small}), key, cache)  # keeps cache alive
        self.sessions[graph].run_with_iobinding(self._bindings[graph][0])
        return self._aliased_outputs(graph, feeds, self.logits[graph])

    def _new_binding(self, graph: str, feeds: Mapping[str, torch.Tensor]) -> Any:
        binding = self.sessions[graph].io_binding()
        for spec in self.manifest.graphs[graph].inputs:
            tensor = feeds[spec.name]
            if not tensor.is_contiguous():
                raise InputError(f"{spec.name} must be contiguous to be bound by address")
            self._bind(binding, spec.name, tensor, output=False)
        for name, tensor in self._aliased_outputs(graph, feeds, self.logits[graph]).items():
            self._bind(binding, name, tensor, output=True)
        return binding

    def close(self) -> None:
        self._bindings.clear()
        self.sessions.clear()
