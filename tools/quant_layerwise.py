"""`llamatrt diff --layerwise` on a quantized artifact: where int8 activations (MatMulNBits at
accuracy level 4) depart from fp32 activations (level 0), in ONNX Runtime's own graph.

Two views, both on real prompts (the chat prompts of `diff`, prefilled from an empty cache):
- Node by node: the graph with every MatMulNBits at level 4 against the same graph at level 0, every
  tensor marked (Polygraphy, as llamatrt.tools.layerwise does for float graphs); tensors match by name
  because the graphs differ in one attribute only. The residual stream after each layer shows how
  the error grows; the first node out of tolerance says where it starts.
- Projection by projection: each MatMulNBits node run alone at levels 4 and 0 on the *same* input
  (the level-0 run's activation), so its error is its own, not inherited. Beside it the same
  product with the input quantized to int8 in blocks of the weight's block size in numpy (what a
  per-block kernel does by definition: scale = max |x| / 127 per block) and the input's outlier
  ratio (max |x| / rms x). The kernel's error equal to the simulation means the error is the
  activation blocking itself; larger means the host's kernel path does more than that.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from llamatrt.base.artifact.manifest import GraphSpec, Manifest
from llamatrt.base.artifact.reader import load_graph_with_weights, read_manifest
from llamatrt.base.artifact.variants import MS_DOMAIN
from llamatrt.base.errors import InputError
from llamatrt.base.progress import Progress, no_progress
from llamatrt.tools.layerwise import NodeDiff, compare_runs, plot_layers
from llamatrt.tools.quant_twin import as_matmulnbits, set_accuracy_level

INT8_ACTIVATIONS, FP32_ACTIVATIONS = 4, 0
KINDS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")  # the rest is the head
TOLERANCE = (1e-2, 1e-2)  # atol, rtol: int8 activations are a deliberate approximation, not a bug hunt


@dataclass(frozen=True)
class ProjectionError:
    weight: str
    kind: str  # qkv_proj, o_proj, gate_up_proj, down_proj, head
    layer: int | None
    rel_error: float  # max |y4 - y0| / max |y0| on the same input
    rms_rel_error: float  # rms(y4 - y0) / rms(y0)
    simulated_rel_error: float  # the same with numpy's per-block int8 input
    outlier_ratio: float  # max |x| / rms(x) of the input


@dataclass
class QuantLayerwiseReport:
    artifact: str
    artifact_level: int
    prompts: int
    compared: int
    first_failure: NodeDiff | None
    layers: list[tuple[str, float, float]]
    projections: list[ProjectionError]
    kernel: str
    notes: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        """An artifact at level 0 runs no int8 arithmetic (this report shows what level 4 would change);
        at level 4, no tensor may leave the tolerance."""
        return self.artifact_level == FP32_ACTIVATIONS or self.first_failure is None

    def by_kind(self) -> list[tuple[str, float, float, float, float]]:
        """(kind, mean and max own error, mean simulated error, max outlier ratio) per projection kind."""
        rows = []
        for kind in (*KINDS, "head"):
            errors = [p for p in self.projections if p.kind == kind]
            if errors:
                rows.append(
                    (
                        kind,
                        float(np.mean([p.rms_rel_error for p in errors])),
                        max(p.rms_rel_error for p in errors),
                        float(np.mean([p.simulated_rel_error for p in errors])),
                        max(p.outlier_ratio for p in errors),
                    )
                )
        return rows

    def plot(self, path: Path) -> None:
        plot_layers(self.layers, f"{Path(self.artifact).name}: int8 vs fp32 activations", path)

    def to_json(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "passed": bool(self),
            "by_kind": [
                {"kind": k, "mean_rms_rel": a, "max_rms_rel": b, "simulated_rms_rel": c, "max_outlier_ratio": d}
                for k, a, b, c, d in self.by_kind()
            ],
        }

    def __str__(self) -> str:
        lines = [
            f"int8 activations (accuracy level 4) vs fp32 activations (level 0) in {self.artifact}'s ONNX Runtime "
            f"graph (the artifact runs level {self.artifact_level}); {self.prompts} prompts, {self.compared} "
            f"tensors compared; {self.kernel}"
        ]
        lines.append("own error of each projection kind, on the same input (rms relative):")
        lines.append(f"  {'kind':<14}{'mean':>10}{'max':>10}{'simulated':>11}{'outliers':>10}")
        lines += [f"  {k:<14}{a:>10.2e}{b:>10.2e}{c:>11.2e}{d:>10.1f}" for k, a, b, c, d in self.by_kind()]
        worst = sorted(self.projections, key=lambda p: -p.rms_rel_error)[:5]
        lines.append("largest own errors: " + ", ".join(f"{p.weight} {p.rms_rel_error:.2e}" for p in worst))
        lines.append(
            "each layer's MLP output, level 4 vs level 0 (rms relative, inherited error included): "
            + ", ".join(f"{n.split()[-1]}: {r:.2g}" for n, _, r in self.layers)
        )
        f = self.first_failure
        lines.append(
            "no node out of tolerance"
            if f is None
            else f"first node out of tolerance (atol/rtol {TOLERANCE[0]:g}): {f.node} ({f.op}, {f.layer}) -> "
            f"{f.tensor}: max |Δ| {f.max_abs:.3g}"
        )
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_markdown(self) -> str:
        out = [
            f"# int8 vs fp32 activations: `{self.artifact}`",
            "",
            f"{self.kernel}; {self.prompts} prompts.",
            "",
            "| projection | mean own error | max own error | per-block int8 simulated | max outlier ratio |",
            "|---|---|---|---|---|",
        ]
        out += [f"| {k} | {a:.2e} | {b:.2e} | {c:.2e} | {d:.1f} |" for k, a, b, c, d in self.by_kind()]
        out += ["", "| layer's MLP output | max \\|Δ\\| | rms rel |", "|---|---|---|"]
        out += [f"| {n} | {a:.3g} | {r:.3g} |" for n, a, r in self.layers]
        out += ["", *(f"- {n}" for n in self.notes)] if self.notes else []
        return "\n".join(out) + "\n"


def _with_level(model: Any, level: int) -> Any:
    """A copy at `level` (saving with external data empties the saved model's tensors, so each level
    is saved from its own copy)."""
    import copy

    twin = copy.deepcopy(model)
    set_accuracy_level(twin, level)
    return twin


def _kind(weight: str) -> tuple[str, int | None]:
    layer = re.search(r"layers\.(\d+)\.", weight)
    kind = next((k for k in KINDS if f".{k}." in weight), "head")
    return kind, None if layer is None else int(layer.group(1))


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) or 1e-30


def _block_int8(x: np.ndarray, block: int) -> np.ndarray:
    """x [..., K] quantized to int8 per block of `block` along K and back (scale max |x| / 127)."""
    k = x.shape[-1]
    padded = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, -k % block)]).reshape(*x.shape[:-1], -1, block)
    scale = np.abs(padded).max(-1, keepdims=True) / 127
    scale[scale == 0] = 1
    return (np.round(padded / scale) * scale).reshape(*x.shape[:-1], -1)[..., :k].astype(np.float32)


def _dequantized(node: Any, inits: Mapping[str, np.ndarray]) -> np.ndarray:
    """W [N, K] as MatMulNBits computes it: the node's blocks at their default zero point."""
    from llamatrt.exporter.quant_weights import DEFAULT_ZERO, QuantizedWeight

    attrs = {a.name: a.i for a in node.attribute}
    n, k, bits, block = attrs["N"], attrs["K"], attrs["bits"], attrs["block_size"]
    packed = inits[node.input[1]].reshape(n, -(-k // block), block * bits // 8)
    weight = QuantizedWeight(
        bits, block, n, k, packed, inits[node.input[2]].reshape(n, -1), DEFAULT_ZERO[bits], None, node.input[1]
    )
    return weight.dequantize()


def _single_node_session(node: Any, inits: Mapping[str, np.ndarray], level: int) -> Any:
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    attrs = {a.name: a.i for a in node.attribute}
    single = helper.make_node(
        "MatMulNBits", ["x", "B", "scales"], ["y"], domain=MS_DOMAIN, **{**attrs, "accuracy_level": level}
    )
    graph = helper.make_graph(
        [single],
        "projection",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        initializer=[
            numpy_helper.from_array(inits[node.input[1]], "B"),
            numpy_helper.from_array(inits[node.input[2]], "scales"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(MS_DOMAIN, 1)])
    model.ir_version = 10
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def projection_errors(
    model: Any, inits: Mapping[str, np.ndarray], runs: Sequence[Mapping[str, np.ndarray]]
) -> list[ProjectionError]:
    """Each MatMulNBits alone at levels 4 and 0 on the level-0 run's input to it (every prompt)."""
    out = []
    for node in (n for n in model.graph.node if n.op_type == "MatMulNBits"):
        weight = node.input[1].rsplit(".", 1)[0]
        block = next(a.i for a in node.attribute if a.name == "block_size")
        fast, exact = (
            _single_node_session(node, inits, INT8_ACTIVATIONS),
            _single_node_session(node, inits, FP32_ACTIVATIONS),
        )
        w = _dequantized(node, inits)
        errs, rms_errs, sims, outliers = [], [], [], []
        for run in runs:
            x = np.asarray(run[node.input[0]], dtype=np.float32).reshape(-1, w.shape[1])
            y4, y0 = fast.run(None, {"x": x})[0], exact.run(None, {"x": x})[0]
            simulated = _block_int8(x, block) @ w.T
            errs.append(float(np.abs(y4 - y0).max() / (np.abs(y0).max() or 1e-30)))
            rms_errs.append(_rms(y4 - y0) / _rms(y0))
            sims.append(_rms(simulated - x @ w.T) / _rms(y0))
            outliers.append(float(np.abs(x).max()) / _rms(x))
        kind, layer = _kind(weight)
        out.append(ProjectionError(weight, kind, layer, max(errs), max(rms_errs), max(sims), max(outliers)))
    return out


def _prompt_feeds(graph: GraphSpec, manifest: Manifest, ids: list[int]) -> dict[str, np.ndarray]:
    import torch

    from llamatrt.base.artifact.feeds import graph_feeds

    c = manifest.config
    tokens = torch.tensor([ids])
    positions = torch.arange(len(ids))[None]
    mask = torch.zeros(1, manifest.max_cache_len, dtype=torch.long)
    mask[0, : len(ids)] = 1
    cache = [torch.zeros(1, c.num_kv_heads, manifest.max_cache_len, c.head_dim) for _ in range(2 * c.num_layers)]
    return {k: v.numpy() for k, v in graph_feeds(graph, tokens, positions, 0, mask, cache).items()}


def run_quant_layerwise(
    artifact: str | Path,
    prompts: Sequence[tuple[bool, str]] | None = None,
    progress: Progress = no_progress,
    verify: bool = True,
) -> QuantLayerwiseReport:
    """Level 4 against level 0 in the artifact's ONNX Runtime graph, node by node and projection by
    projection, on the chat prompts of `diff` (or `prompts`)."""
    import onnx
    from onnx import numpy_helper

    from llamatrt.runtime.llm import LLM
    from llamatrt.runtime.registry import open_backend
    from llamatrt.tools.compare import DEFAULT_PROMPTS, kernel_note
    from llamatrt.tools.layerwise import _marked, _run

    folder = Path(artifact)
    manifest = read_manifest(folder, verify=verify)
    if not manifest.quantization:
        raise InputError("this artifact holds float weights; int8 activations apply to --quantize artifacts")
    graph = next((g for g in manifest.graphs.values() if g.attention == "onnxruntime"), None)
    if graph is None:
        raise InputError("this artifact has no ONNX Runtime graph to compare; re-export it with this llamatrt")
    with open_backend(folder, "onnxruntime", verify=False) as backend:
        llm = LLM(backend)
        chosen = [(chat, text) for chat, text in (prompts or DEFAULT_PROMPTS) if chat] or list(prompts or ())
        ids = [llm.encode(text, chat=chat) for chat, text in chosen]
        kernel = kernel_note(backend, with_level=False)
    progress("loading the graph with its weights")
    model = load_graph_with_weights(folder, graph.path, f"graph {graph.name!r} path")
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    # llamatrt's MatMulInt4 runs no int8 arithmetic: its products are compared as MatMulNBits would run them
    own_kernel = as_matmulnbits(model, inits)
    if own_kernel:
        inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    with tempfile.TemporaryDirectory() as scratch:
        levels = {}
        for level in (INT8_ACTIVATIONS, FP32_ACTIVATIONS):
            twin = Path(scratch) / f"level{level}.onnx"
            onnx.save(_with_level(model, level), str(twin), save_as_external_data=True, location=f"level{level}.data")
            levels[level] = _marked(load_graph_with_weights(Path(scratch), twin.name, "twin graph"))
        runs4, runs0 = [], []
        for k, prompt in enumerate(ids):
            progress(f"prompt {k + 1} of {len(ids)} at levels 4 and 0, every tensor marked")
            feeds = _prompt_feeds(graph, manifest, prompt)
            runs4.append(_run(levels[INT8_ACTIVATIONS][1], feeds, "level4"))
            runs0.append(_run(levels[FP32_ACTIVATIONS][1], feeds, "level0"))
    marked = levels[INT8_ACTIVATIONS][0]
    first, compared = None, 0
    for run4, run0 in zip(runs4, runs0, strict=True):
        compared, found, _ = compare_runs(marked, run4, run0, *TOLERANCE)
        first = first or found
    if first is not None and first.op == "MatMulNBits":  # our nodes carry no namespace: name the weight
        node = next(n for n in marked.graph.node if n.name == first.node)
        kind, layer = _kind(node.input[1])
        first = replace(first, layer=f"{kind}" if layer is None else f"layer {layer} {kind}")
    layers = _accumulated(model, runs4, runs0)
    progress("each projection alone on the same input")
    projections = projection_errors(model, inits, runs0)
    notes = [
        "own error: each MatMulNBits run alone on the level-0 run's input to it, so no error is inherited; "
        "simulated: the same input quantized to int8 per weight block in numpy (scale max |x| / 127); "
        "outliers: max |x| / rms(x) of that input",
    ]
    if any(origin.startswith("gguf Q4_1") for origin in manifest.quantization.get("tensors", {}).values()):
        notes.append(
            "the Q4_1 offset term (block sums of x times m + 8d) is fp32 arithmetic on the exact input at every "
            "level: int8 activations touch only the MatMulNBits products"
        )
    if own_kernel:
        notes.append(
            f"this artifact runs its {own_kernel} 4-bit products on llamatrt's MatMulInt4 (fp32 activations as "
            "int8 digits, no int8 rounding); they are compared here as MatMulNBits would run them, at level 4 "
            "and level 0: what `--accuracy-level 4` would cost"
        )
    return QuantLayerwiseReport(
        str(artifact),
        int(manifest.quantization["accuracy_level"]),
        len(ids),
        compared,
        first,
        layers,
        projections,
        kernel,
        notes,
    )


def _accumulated(
    model: Any, runs4: Sequence[Mapping[str, np.ndarray]], runs0: Sequence[Mapping[str, np.ndarray]]
) -> list[tuple[str, float, float]]:
    """(layer, max abs, max rel) of each layer's MLP output (down_proj) between the level-4 and the
    level-0 run: the error the residual stream has gathered by then, over every prompt."""
    out = []
    for node in model.graph.node:
        kind, layer = _kind(node.input[1]) if node.op_type == "MatMulNBits" else ("", None)
        if kind != "down_proj" or layer is None:
            continue
        tensor = node.output[0]
        worst_abs = worst_rel = 0.0
        for run4, run0 in zip(runs4, runs0, strict=True):
            a, b = np.asarray(run4[tensor], np.float32), np.asarray(run0[tensor], np.float32)
            worst_abs = max(worst_abs, float(np.abs(a - b).max()))
            worst_rel = max(worst_rel, _rms(a - b) / _rms(b))
        out.append((f"layer {layer}", worst_abs, worst_rel))
    return out
