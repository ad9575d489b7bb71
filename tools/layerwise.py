"""`llamatrt diff --layerwise`: the first node where an artifact's graph departs from a reference.

Polygraphy does the heavy lifting, as TensorRT users know it: every intermediate tensor marked as a
graph output (`modify_outputs(..., MARK_ALL)`), ONNX Runtime runners, and its Comparator with an
element-wise tolerance. What is ours is only the pairing of the two graphs' tensors: the reference
is the same graph variant exported again by the same exporter from the checkpoint in fp32
(`--against fp32`), so tensors of the same meaning carry the same names (dtype casts are extra
nodes of their own and do not shift the others' names); `--against onnxruntime` compares the
engine side with the same graph on ONNX Runtime. Then: the first node in topological order whose
output leaves the tolerance (its op, its layer, its inputs' ranges), and the per-layer error of the
residual stream after each decoder layer.

The fp16 safety scan runs an fp16 graph and its fp32 twin (llamatrt.tools.fp32_twin) on a few
prompts with every tensor marked, and lists the tensors that come within 2x of fp16's maximum or
underflow to zero in bulk: where an fp32 island is needed.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llamatrt.base.artifact.manifest import GraphSpec, Manifest
from llamatrt.base.artifact.reader import inside, load_graph_with_weights, read_manifest
from llamatrt.base.errors import InputError
from llamatrt.base.progress import Progress, no_progress

FP16_MAX = 65504.0
# Element-wise tolerance per candidate dtype: a mismatch is both |a - b| > atol and |a - b| / |b| > rtol.
TOLERANCE = {"float32": (1e-3, 1e-3), "float16": (5e-2, 5e-2), "bfloat16": (2e-1, 1e-1)}
UNDERFLOW_SHARE = 0.1  # a tensor with this share of its reference's nonzero values at zero underflows in bulk


@dataclass(frozen=True)
class NodeDiff:
    tensor: str
    node: str
    op: str
    layer: str  # "layer 3", "embedding", "head"
    max_abs: float
    max_rel: float
    inputs: list[tuple[str, float, float]] = field(default_factory=list)  # (tensor, min, max) of its inputs


@dataclass
class LayerwiseReport:
    artifact: str
    graph: str
    against: str
    dtype: str
    atol: float
    rtol: float
    compared: int  # tensors compared
    first_failure: NodeDiff | None
    layers: list[tuple[str, float, float]]  # (layer, max abs, max rel) of the residual stream after it
    notes: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return self.first_failure is None

    def to_json(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "passed": bool(self),
            "layers": [{"layer": n, "max_abs": a, "max_rel": r} for n, a, r in self.layers],
        }

    def __str__(self) -> str:
        lines = [
            f"layerwise diff of {self.artifact} ({self.graph} graph, {self.dtype}) against {self.against}: "
            f"{self.compared} tensors compared, tolerance atol {self.atol:g} / rtol {self.rtol:g}"
        ]
        lines += [f"note: {n}" for n in self.notes]
        lines.append(f"{'after':<12} {'max |Δ|':>10} {'max rel':>10}")
        lines += [f"{n:<12} {a:>10.3g} {r:>10.3g}" for n, a, r in self.layers]
        f = self.first_failure
        if f is None:
            lines.append("no node out of tolerance: PASS")
        else:
            ranges = ", ".join(f"{t} [{lo:.3g}, {hi:.3g}]" for t, lo, hi in f.inputs)
            lines.append(
                f"first node out of tolerance: {f.node} ({f.op}, {f.layer}) -> {f.tensor}: max |Δ| "
                f"{f.max_abs:.3g}, max rel {f.max_rel:.3g}; inputs {ranges}: FAIL"
            )
        return "\n".join(lines)

    def to_markdown(self) -> str:
        out = [
            f"# Layerwise diff: `{self.artifact}`",
            "",
            f"{self.graph} graph ({self.dtype}) against {self.against}; {self.compared} tensors compared, "
            f"atol {self.atol:g}, rtol {self.rtol:g}. **{'PASS' if self else 'FAIL'}**",
            "",
            "| after | max \\|Δ\\| | max rel |",
            "|---|---|---|",
        ]
        out += [f"| {n} | {a:.3g} | {r:.3g} |" for n, a, r in self.layers]
        if self.first_failure is not None:
            f = self.first_failure
            out += [
                "",
                f"First node out of tolerance: `{f.node}` ({f.op}, {f.layer}), output `{f.tensor}`: max "
                f"\\|Δ\\| {f.max_abs:.3g}, max rel {f.max_rel:.3g}.",
            ]
        out += ["", *(f"- {n}" for n in self.notes)] if self.notes else []
        return "\n".join(out) + "\n"

    def plot(self, path: Path) -> None:
        plot_layers(self.layers, f"{Path(self.artifact).name} {self.graph} ({self.dtype}) vs {self.against}", path)


def plot_layers(layers: list[tuple[str, float, float]], title: str, path: Path) -> None:
    """PNG of an error curve over the decoder layers (max abs and max relative)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise InputError("--plot needs matplotlib; pip install matplotlib") from e
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.semilogy(range(len(layers)), [max(a, 1e-12) for _, a, _ in layers], marker="o", label="max |Δ|")
    ax.semilogy(range(len(layers)), [max(r, 1e-12) for _, _, r in layers], marker="s", label="max rel")
    ax.set(xlabel="decoder layer", ylabel="error", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --- running graphs with every tensor marked --------------------------------------------------------


def _quiet_polygraphy() -> None:
    """Polygraphy logs every comparison, and each mismatch as an error listing every tensor; ours is
    the report, so only its critical messages pass."""
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.CRITICAL


def _marked(model: Any) -> tuple[Any, bytes]:
    """(the graph, with its weights, every intermediate marked as an output; its bytes)."""
    from polygraphy import constants
    from polygraphy.backend.onnx import modify_outputs

    _quiet_polygraphy()

    model = modify_outputs(model, outputs=constants.MARK_ALL)
    return model, model.SerializeToString()


def _run(model_bytes: bytes, feeds: Mapping[str, np.ndarray], name: str) -> dict[str, np.ndarray]:
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    with OnnxrtRunner(SessionFromOnnx(model_bytes, providers=["CPUExecutionProvider"]), name=name) as runner:
        return dict(runner.infer(dict(feeds)))


def _layer_of(node: Any) -> str:
    namespace = next((p.value for p in node.metadata_props if p.key == "namespace"), "")
    found = re.search(r"layers\.(\d+)", namespace)
    if found:
        return f"layer {found.group(1)}"
    return "embedding" if "embed" in namespace else "head"


def _residuals(model: Any) -> list[tuple[str, str]]:
    """(layer, tensor) of the residual stream after each decoder layer: the layer's last Add."""
    last: dict[str, str] = {}
    for node in model.graph.node:
        layer = _layer_of(node)
        if layer.startswith("layer ") and node.op_type == "Add":
            last[layer] = node.output[0]
    return sorted(last.items(), key=lambda kv: int(kv[0].split()[1]))


def compare_runs(
    model: Any, candidate: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], atol: float, rtol: float
) -> tuple[int, NodeDiff | None, list[tuple[str, float, float]]]:
    """Polygraphy's element-wise comparison of every tensor both runs produced, then the first node
    (in the candidate graph's topological order) whose output fails it, and the per-layer curve."""
    from polygraphy.comparator import Comparator, CompareFunc, IterationResult, RunResults

    common = [
        n
        for n in candidate
        if n in reference
        and np.issubdtype(np.asarray(candidate[n]).dtype, np.floating)
        and np.shape(candidate[n]) == np.shape(reference[n])
    ]
    as32 = {n: np.asarray(candidate[n], dtype=np.float32) for n in common}
    results = RunResults(
        [
            ("candidate", [IterationResult(as32, runner_name="candidate")]),
            (
                "reference",
                [IterationResult({n: np.asarray(reference[n], np.float32) for n in common}, runner_name="reference")],
            ),
        ]
    )
    check = CompareFunc.simple(atol=atol, rtol=rtol, check_error_stat="elemwise", infinities_compare_equal=True)
    # one AccuracyResult per compare function; its runner pair's first (only) iteration
    verdicts = Comparator.compare_accuracy(results, compare_func=check)[0][("candidate", "reference")][0]
    first = None
    for node in model.graph.node:
        for tensor in node.output:
            verdict = verdicts.get(tensor)
            if verdict is not None and not bool(verdict) and first is None:
                inputs = [
                    (t, float(np.min(candidate[t])), float(np.max(candidate[t])))
                    for t in node.input
                    if t in as32 and np.size(candidate[t])
                ]
                first = NodeDiff(
                    tensor, node.name, node.op_type, _layer_of(node), verdict.max_absdiff, verdict.max_reldiff, inputs
                )
    layers = [
        (layer, verdicts[t].max_absdiff, verdicts[t].max_reldiff) for layer, t in _residuals(model) if t in verdicts
    ]
    return len(common), first, layers


# --- feeds ------------------------------------------------------------------------------------------


def _feeds(graph: GraphSpec, manifest: Manifest, dtype: str) -> dict[str, np.ndarray]:
    """One call of `graph` on a fixed prompt: a prefill from slot 0, or a decode step after it (the
    cache then holds deterministic values, the same for both sides)."""
    import torch

    from llamatrt.base.artifact.feeds import fixed_prompt, graph_feeds
    from llamatrt.base.artifact.precision import torch_dtype

    batch, seq = graph.batch or 1, graph.seq_len or 1
    vocab, capacity, c = manifest.config.vocab_size, manifest.max_cache_len, manifest.config
    start = 0 if graph.role == "prefill" else min(capacity // 2, 64)
    ids = fixed_prompt(batch, seq, vocab)
    positions = (torch.arange(seq) + start).expand(batch, seq).contiguous()
    generator = torch.Generator().manual_seed(0)
    cache = []
    for _ in range(2 * c.num_layers):
        values = torch.randn(batch, c.num_kv_heads, capacity, c.head_dim, generator=generator)
        values[:, :, start:] = 0  # only the slots before this call are written
        cache.append(values.to(torch_dtype(dtype)))
    mask = torch.ones(batch, capacity, dtype=torch.long)
    feeds = graph_feeds(graph, ids, positions, start, mask, cache)
    return {k: v.numpy() if v.dtype != torch.bfloat16 else v.float().numpy() for k, v in feeds.items()}


def _as(feeds: Mapping[str, np.ndarray], dtype: type) -> dict[str, np.ndarray]:
    return {k: v.astype(dtype) if np.issubdtype(v.dtype, np.floating) else v for k, v in feeds.items()}


# --- the command -----------------------------------------------------------------------------------


def _candidate_graph(manifest: Manifest, role: str) -> GraphSpec:
    graphs = [g for g in manifest.graphs.values() if g.attention == "portable" and g.role == role]
    if not graphs:
        raise InputError(f"this artifact has no portable {role} graph to compare; re-export it with this llamatrt")
    return max(graphs, key=lambda g: g.seq_len or 0)


def run_layerwise(
    artifact: str | Path,
    against: str = "fp32",
    role: str = "prefill",
    progress: Progress = no_progress,
    verify: bool = True,
) -> LayerwiseReport:
    """Compare the artifact's portable `role` graph with a reference, tensor by tensor."""
    import torch

    folder = Path(artifact)
    manifest = read_manifest(folder, verify=verify)
    portable = any(g.attention == "portable" for g in manifest.graphs.values())
    if against == "level0" or (manifest.quantization and not portable):
        from llamatrt.tools.quant_layerwise import (
            run_quant_layerwise,  # int8 vs fp32 activations in ONNX Runtime's graph
        )

        return run_quant_layerwise(folder, progress=progress, verify=False)  # type: ignore[return-value]
    graph = _candidate_graph(manifest, role)
    notes = []
    if against == "onnxruntime":
        if manifest.engines and not torch.cuda.is_available():
            notes.append(
                "the artifact's TensorRT engines need a GPU to run, which this machine lacks; comparing its "
                "ONNX graph with the fp32 reference instead"
            )
        elif not manifest.engines:
            notes.append(
                "the artifact has no engines to compare with ONNX Runtime; comparing its ONNX graph with "
                "the fp32 reference instead"
            )
        else:  # pragma: no cover - needs TensorRT and a GPU
            return _engine_vs_onnxruntime(folder, manifest, graph, progress)
        against = "fp32"
    if against not in ("fp32", "torch"):
        raise InputError(f"unknown --against {against!r}; use fp32, onnxruntime, torch or level0")
    atol, rtol = TOLERANCE[manifest.dtype]
    progress(f"running {graph.name} with every tensor marked")
    model, candidate_bytes = _marked(load_graph_with_weights(folder, graph.path, f"graph {graph.name!r} path"))
    feeds = _feeds(graph, manifest, manifest.dtype)
    candidate_dtype = np.float16 if manifest.dtype == "float16" else np.float32
    if manifest.dtype == "bfloat16":
        raise InputError("ONNX Runtime CPU cannot run bf16 graphs; compare the fp16 or fp32 export instead")
    candidate = _run(candidate_bytes, _as(feeds, candidate_dtype), "candidate")
    if against == "torch":
        progress("running PyTorch with a hook on each decoder layer")
        return _against_torch(folder, manifest, graph, model, candidate, feeds, atol, rtol, notes)
    progress("exporting the fp32 reference graph from the checkpoint")
    with tempfile.TemporaryDirectory() as scratch:
        reference_path = _reference_graph(manifest, graph, Path(scratch))
        progress("running the fp32 reference with every tensor marked")
        reference = _run(
            _marked(load_graph_with_weights(reference_path.parent, reference_path.name, "reference graph"))[1],
            _as(feeds, np.float32),
            "reference",
        )
    compared, first, layers = compare_runs(model, candidate, reference, atol, rtol)
    return LayerwiseReport(
        str(artifact),
        graph.name,
        f"fp32 export of {manifest.source}",
        manifest.dtype,
        atol,
        rtol,
        compared,
        first,
        layers,
        notes,
    )


def _reference_graph(manifest: Manifest, graph: GraphSpec, folder: Path) -> Path:
    from llamatrt.base.artifact.variants import PORTABLE
    from llamatrt.exporter.export import export_graph
    from llamatrt.exporter.variants import VariantPlan
    from llamatrt.models.checkpoint import load_checkpoint

    model = load_checkpoint(manifest.source).build_model()
    plan = VariantPlan(graph.name, graph.role, graph.batch or 1, graph.seq_len or 1, PORTABLE)
    spec = export_graph(model, plan, manifest.max_cache_len, folder, manifest.batch_size)
    return folder / spec.path


def _against_torch(
    folder: Path,
    manifest: Manifest,
    graph: GraphSpec,
    model: Any,
    candidate: Mapping[str, np.ndarray],
    feeds: Mapping[str, np.ndarray],
    atol: float,
    rtol: float,
    notes: list[str],
) -> LayerwiseReport:
    """The residual stream after each layer against PyTorch's (forward hooks); no node-level pairing."""
    import torch

    from llamatrt.models.checkpoint import load_checkpoint

    reference = load_checkpoint(manifest.source).build_model()
    captured: dict[str, np.ndarray] = {}
    residuals = _residuals(model)
    for (_, tensor), module in zip(residuals, reference.model.layers, strict=False):
        module.register_forward_hook(lambda _m, _i, out, t=tensor: captured.__setitem__(t, out[0].detach().numpy()))
    inputs = [
        torch.from_numpy(np.asarray(feeds[t.name], dtype=np.float32 if "past" in t.name else feeds[t.name].dtype))
        for t in graph.inputs
    ]
    with torch.no_grad():
        reference(*inputs)
    compared, first, layers = compare_runs(model, candidate, captured, atol, rtol)
    notes.append(
        "against PyTorch the residual stream after each layer is compared; node-level pairing needs --against fp32"
    )
    return LayerwiseReport(
        str(folder),
        graph.name,
        "PyTorch (StaticLlama, fp32)",
        manifest.dtype,
        atol,
        rtol,
        compared,
        first,
        layers,
        notes,
    )


def _engine_vs_onnxruntime(
    folder: Path, manifest: Manifest, graph: GraphSpec, progress: Progress
) -> LayerwiseReport:  # pragma: no cover
    """On a GPU: the graph built by TensorRT with every tensor marked, against ONNX Runtime."""
    from polygraphy.backend.trt import EngineFromNetwork, NetworkFromOnnxPath, TrtRunner
    from polygraphy.backend.trt import modify_network_outputs as mark

    from llamatrt.base.artifact.engines import engine_module

    engine_module(manifest.engines["builder"])
    path = inside(folder, graph.path, f"graph {graph.name!r} path")
    atol, rtol = TOLERANCE[manifest.dtype]
    feeds = _feeds(graph, manifest, manifest.dtype)
    progress("building the graph in TensorRT with every tensor marked")
    from polygraphy import constants

    with TrtRunner(
        EngineFromNetwork(mark(NetworkFromOnnxPath(str(path), strongly_typed=True), constants.MARK_ALL))
    ) as runner:
        candidate = dict(runner.infer(feeds))
    model, model_bytes = _marked(load_graph_with_weights(folder, graph.path, f"graph {graph.name!r} path"))
    reference = _run(model_bytes, feeds, "reference")
    compared, first, layers = compare_runs(model, candidate, reference, atol, rtol)
    return LayerwiseReport(str(folder), graph.name, "onnxruntime", manifest.dtype, atol, rtol, compared, first, layers)


# --- the fp16 safety scan --------------------------------------------------------------------------


@dataclass(frozen=True)
class Fp16Finding:
    tensor: str
    op: str
    layer: str
    max_abs: float  # in the fp32 twin
    underflow_share: float  # of the twin's nonzero values that are zero in fp16
    reason: str  # "near the fp16 maximum" | "underflows to zero"


def fp16_scan(artifact: str | Path, prompts: int = 2) -> list[Fp16Finding]:
    """Every tensor of the fp16 prefill graph within 2x of fp16's maximum, or underflowing to zero in
    bulk, on `prompts` calibration prompts (against its fp32 twin)."""
    from llamatrt.tools.fp32_twin import fp32_twin

    folder = Path(artifact)
    manifest = read_manifest(folder, verify=False)
    if manifest.dtype != "float16":
        raise InputError("the fp16 safety scan is for fp16 artifacts; export with --dtype fp16")
    graph = _candidate_graph(manifest, "prefill")
    model, fp16_bytes = _marked(load_graph_with_weights(folder, graph.path, f"graph {graph.name!r} path"))
    findings: dict[str, Fp16Finding] = {}
    with tempfile.TemporaryDirectory() as scratch:
        twin = fp32_twin(folder, manifest, Path(scratch))
        twin_bytes = _marked(load_graph_with_weights(Path(scratch), twin.graphs[graph.name].path, "twin graph"))[1]
        for k in range(prompts):
            feeds = _feeds(graph, manifest, "float16")
            feeds["input_ids"] = (feeds["input_ids"] + 977 * k) % manifest.config.vocab_size
            low, high = _run(fp16_bytes, feeds, "fp16"), _run(twin_bytes, _as(feeds, np.float32), "fp32")
            for node in model.graph.node:
                for tensor in node.output:
                    if tensor not in low or tensor not in high or np.asarray(low[tensor]).dtype != np.float16:
                        continue
                    reference = np.asarray(high[tensor], dtype=np.float32)
                    peak = float(np.max(np.abs(reference))) if reference.size else 0.0
                    nonzero = reference != 0
                    share = float(np.mean(low[tensor][nonzero] == 0)) if nonzero.any() else 0.0
                    if peak >= FP16_MAX / 2 or share >= UNDERFLOW_SHARE:
                        reason = "near the fp16 maximum" if peak >= FP16_MAX / 2 else "underflows to zero"
                        findings.setdefault(
                            tensor, Fp16Finding(tensor, node.op_type, _layer_of(node), peak, share, reason)
                        )
    return list(findings.values())
