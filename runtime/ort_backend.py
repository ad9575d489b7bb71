"""The ONNX Runtime backend (CPU; CUDA where onnxruntime-gpu is installed).

Every tensor is bound by address (IO binding), and each `present.*` output is bound to the very
buffer fed as its `past_key_values.*` input, so the cache is updated in place: no allocation and no
copy of the cache per step. The small inputs are copied into persistent buffers, so a decode step
whose cache buffers are the ones already bound reuses its binding as it is: the per-step Python
work is a few tiny copies and one `run_with_iobinding`.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llamatrt.base.artifact import names
from llamatrt.base.artifact.manifest import GraphSpec, Manifest
from llamatrt.base.artifact.precision import NUMPY_DTYPES
from llamatrt.base.artifact.reader import inside
from llamatrt.base.artifact.variants import ATTENTION_FORMS, ONNXRUNTIME, onnxruntime_loads
from llamatrt.base.custom_ops import MISSING_LIBRARY, library_path
from llamatrt.base.errors import BackendUnavailable, InputError, ManifestMismatchError
from llamatrt.base.mapped_pages import release_clean_pages
from llamatrt.runtime.backend import Backend

logger = logging.getLogger(__name__)


def physical_cores() -> int:
    """Threads for intra-op parallelism: the cores this process may use (SMT siblings add little)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


@dataclass
class _Bound:
    binding: Any
    small: dict[str, torch.Tensor]  # the bound copies of the inputs other than the cache (names.CALL_INPUTS)
    logits: torch.Tensor
    cache: list[torch.Tensor]  # keeps the bound cache tensors alive while their addresses are bound


class OrtBackend(Backend):
    name = "onnxruntime"
    attention_forms = (ONNXRUNTIME.name, "portable")  # narrowed by device and version: attention_order

    def __init__(
        self,
        folder: Path,
        manifest: Manifest,
        device: str = "cpu",
        check_feeds: bool = True,
        threads: int | None = None,
        attention: str | None = None,
        prepack: bool = True,
    ) -> None:
        """`attention`: run only graphs of that attention form (export validation checks each form);
        None: the fastest form this device and ONNX Runtime can run. `prepack=False`: the kernels read
        the mapped weights as they are instead of each session packing its own copy, the pages a run
        read are given back after it (each session maps the file on its own, so graphs run in turn
        would each hold the weights), and no arena keeps a run's peak: slower calls, the weights held
        about once (export validation)."""
        self.forced_attention = attention
        self.prepack = prepack
        super().__init__(folder, manifest, device, check_feeds)
        import onnxruntime as ort

        if manifest.dtype not in NUMPY_DTYPES and self.device.type == "cpu":
            raise BackendUnavailable("ONNX Runtime CPU cannot run bf16 graphs; use --backend torch or a GPU backend")
        if manifest.dtype == "float16" and self.device.type == "cpu":
            logger.warning(
                "this artifact is fp16, which ONNX Runtime CPU runs slower than fp32; export fp32 for CPU "
                "or run it on a GPU"
            )
        providers: list[Any] = ["CPUExecutionProvider"]
        if self.device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise BackendUnavailable("onnxruntime has no CUDA provider here; pip install onnxruntime-gpu")
            providers = [("CUDAExecutionProvider", {"device_id": self.device.index or 0})]
        if manifest.quantization.get("int4_kernel") == "llamatrt" and library_path() is None:
            raise BackendUnavailable(MISSING_LIBRARY)  # said before a session fails on the unknown op
        self.sessions: dict[str, Any] = {}
        for name, graph in self.graphs.items():
            path = inside(self.folder, graph.path, f"graph {name!r} path")
            try:
                options = self._options(ort, graph, threads, manifest)
                if not prepack:
                    options.add_session_config_entry("session.disable_prepacking", "1")
                    options.enable_cpu_mem_arena = False
                    # nor a block planned for all of a run's intermediates: each is freed when dead
                    options.enable_mem_pattern = False
                    # what a call makes of a weight in passing (a cast, a transpose) is made where it is
                    # read and freed before the next: the default order runs such nodes, which read
                    # only initializers, at the start, all alive at once (docs/benchmarks.md)
                    options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
                    if manifest.dtype == "float16":
                        # ONNX Runtime CPU has no fp16 MatMul here: its extended optimizers keep an fp32
                        # copy of every fp16 weight per session; the basic ones cast in passing
                        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
                # without prepacking, no folded copy of a weight either (the tied head's transpose of the
                # embedding would be one per session); a call transposes it in passing
                unfolded = {} if prepack else {"disabled_optimizers": ["ConstantFolding"]}
                self.sessions[name] = ort.InferenceSession(str(path), options, providers=providers, **unfolded)
            except Exception as e:  # ORT raises its own untyped exceptions (Fail, InvalidProtobuf, ...)
                raise ManifestMismatchError(
                    f"ONNX Runtime cannot load {graph.path} ({str(e).splitlines()[0][:200]}); "
                    "re-run `llamatrt export --force`"
                ) from e
        self.weights_path = inside(self.folder, manifest.weights_file, "weights file")
        if self.device.type == "cpu":  # the kernels hold their own packed copies now (or read the mapping)
            release_clean_pages(self.weights_path)
        self._ort_device = "cuda" if self.device.type == "cuda" else "cpu"
        # (graph, rows of the call, cache addresses) -> its binding. A decode step reuses one binding as
        # it is; a prefill on row b of the cache binds that row's addresses; a call of other tokens
        # on the same rows binds its small inputs anew (the cache's 2L stay bound).
        self._bindings: OrderedDict[tuple[object, ...], _Bound] = OrderedDict()
        self._max_bindings = 2 * manifest.batch_size + 2

    @staticmethod
    def _options(ort: Any, graph: GraphSpec, threads: int | None, manifest: Manifest) -> Any:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        library = library_path()  # the installed package's own, never a path the artifact names
        if library is not None:
            opts.register_custom_ops_library(str(library))
        opts.intra_op_num_threads = threads or physical_cores()
        opts.log_severity_level = 3
        if manifest.quantization:
            # subnormal floats take the CPU's slow microcoded path; the quantized graphs make some, and
            # values below 1.2e-38 change no logit (docs/quantization.md has the measured difference)
            opts.add_session_config_entry("session.set_denormal_as_zero", "1")
        if manifest.quantization:
            # ONNX Runtime fuses a portable graph's DequantizeLinear -> MatMul into MatMulNBits; its
            # arithmetic is then the artifact's accuracy level, as in ONNX Runtime's own graph
            opts.add_session_config_entry(
                "session.qdq_matmulnbits_accuracy_level", str(manifest.quantization["accuracy_level"])
            )
        if graph.seq_len is not None and graph.seq_len > 1:
            # Each session has its own thread pool, whose workers spin after a run. A spinning prefill
            # pool takes a core from the decode steps that follow it (measured in the README's speed
            # section); prefill's large GEMMs need no spin-waiting, so its workers sleep. (A graph with
            # open tokens is one session for prefill and decode: one pool, nothing to compete with.)
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return opts

    def attention_order(self) -> tuple[str, ...]:
        if self.forced_attention is not None:
            if self.forced_attention not in ATTENTION_FORMS:
                raise InputError(
                    f"unknown attention form {self.forced_attention!r}; use one of {', '.join(ATTENTION_FORMS)}"
                )
            return (self.forced_attention,)
        # CUDA's GroupQueryAttention takes fp16/bf16 only, so CUDA runs the portable graphs.
        if self.device.type != "cpu":
            return ("portable",)
        if onnxruntime_loads(ONNXRUNTIME):
            return (ONNXRUNTIME.name, "portable")
        if any(g.attention == ONNXRUNTIME.name for g in self.manifest.graphs.values()):
            import onnxruntime

            minimum = ".".join(map(str, ONNXRUNTIME.min_onnxruntime or ()))
            logger.warning(
                "onnxruntime %s cannot run the fused-attention graphs (needs >= %s); running the "
                "portable ones, slower: pip install -U onnxruntime",
                onnxruntime.__version__,
                minimum,
            )
        return ("portable",)

    @property
    def loop_threads(self) -> int | None:
        # ONNX Runtime's intra-op threads own the cores. torch's OpenMP workers, woken by the loop's
        # sampling (an argmax over B x vocab is above torch's parallel grain), would spin on those
        # same cores through the next graph run, which then runs on what is left of them. The loop's
        # torch work is tiny, so on CPU it runs on one thread.
        return 1 if self.device.type == "cpu" else None

    @property
    def graph_files(self) -> dict[str, str]:
        """graph -> the .onnx file this backend runs for it."""
        return {name: g.path for name, g in self.graphs.items()}

    def _bind(self, binding: Any, name: str, tensor: torch.Tensor, output: bool) -> None:
        dtype = np.dtype(NUMPY_DTYPES[str(tensor.dtype).removeprefix("torch.")])
        bind = binding.bind_output if output else binding.bind_input
        bind(name, self._ort_device, self.device.index or 0, dtype, tuple(tensor.shape), tensor.data_ptr())

    def _run(self, graph: GraphSpec, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        cache = [feeds[name] for name in graph.cache_inputs]
        # the outputs' shapes: the call's rows (and its tokens, where the graph returns every position's logits)
        rows, tokens = feeds[names.INPUT_IDS].shape
        key = (graph.name, rows, tokens if graph.full_logits else 0, *map(torch.Tensor.data_ptr, cache))
        bound = self._bindings.get(key)
        if bound is None:
            bound = self._bindings[key] = self._new_binding(graph, feeds, cache)
            if len(self._bindings) > self._max_bindings:
                self._bindings.popitem(last=False)
        else:
            self._bindings.move_to_end(key)
            for name, buffer in bound.small.items():
                if buffer.shape == feeds[name].shape:
                    buffer.copy_(feeds[name])
                else:  # a call of other tokens on the same rows: only the small inputs are bound anew
                    bound.small[name] = feeds[name].clone().contiguous()
                    self._bind(bound.binding, name, bound.small[name], output=False)
        self.sessions[graph.name].run_with_iobinding(bound.binding)
        if not self.prepack:  # each session maps the file anew: keep one graph's pages at a time
            release_clean_pages(self.weights_path)
        return self._aliased_outputs(graph, feeds, bound.logits)

    def _new_binding(self, graph: GraphSpec, feeds: Mapping[str, torch.Tensor], cache: list[torch.Tensor]) -> _Bound:
        """Bind every input and output by address: the small inputs to buffers of the binding's own
        (later calls copy into them), each present to the past buffer it updates in place."""
        small = {name: feeds[name].clone().contiguous() for name in names.CALL_INPUTS if name in graph.input_names}
        batch, seq = feeds[names.INPUT_IDS].shape
        sizes = {"batch": batch, "tokens": seq}
        shape = [sizes[d] if isinstance(d, str) else d for d in graph.outputs[0].shape]
        logits = torch.empty(shape, dtype=torch.float32, device=self.device)
        binding = self.sessions[graph.name].io_binding()
        for spec in graph.inputs:
            tensor = small.get(spec.name, feeds[spec.name])
            if not tensor.is_contiguous():
                raise InputError(f"{spec.name} must be contiguous to be bound by address")
            self._bind(binding, spec.name, tensor, output=False)
        for name, tensor in self._aliased_outputs(graph, feeds, logits).items():
            self._bind(binding, name, tensor, output=True)
        return _Bound(binding, small, logits, cache)

    def close(self) -> None:
        self._bindings.clear()
        self.sessions.clear()
