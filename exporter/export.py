"""`llamatrt export`: checkpoint -> artifact folder (DESIGN.md §2), atomically.

The exporter writes the graph variants (exporter.variants), one weights file, the tokenizer and the
manifest into a temp folder; the caller's `validate` (the runtime's export check, which runs the
graphs the way users will) then runs on that folder before it is renamed into place, so a failing
export leaves nothing behind.
"""

from __future__ import annotations

import functools
import logging
import shutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from llamatrt.base.artifact import names
from llamatrt.base.artifact.manifest import FORMAT_VERSION, GraphSpec, Manifest, write_manifest
from llamatrt.base.artifact.precision import WEIGHT_FORMATS, dtype_name, precision, torch_dtype
from llamatrt.base.artifact.reader import file_sha256
from llamatrt.base.artifact.variants import ONNXRUNTIME
from llamatrt.base.config import LlamaConfig
from llamatrt.base.custom_ops import library_path
from llamatrt.base.errors import CheckpointError, InputError, ValidationError
from llamatrt.base.progress import Progress, no_progress
from llamatrt.exporter.artifacts import (
    atomic_output_dir,
    check_disk_space,
    check_output,
    check_writable,
    locked,
    remove_stale_temp,
)
from llamatrt.exporter.calibration import Calibration, calibration_ids
from llamatrt.exporter.float_pieces import FloatPieces
from llamatrt.exporter.onnx_export import KV_WRITE, OPSET, graph_spec, graph_to_onnx
from llamatrt.exporter.onnx_optimize import optimize_graph
from llamatrt.exporter.ort_fusions import fuse_skip_rms_norm, fuse_swiglu
from llamatrt.exporter.ort_packing import pack_tokens
from llamatrt.exporter.quant_plan import (
    ParameterQuantizer,
    QuantPlan,
    check_quantize_options,
    default_head,
    dequantize_in_place,
    plan_quantization,
)
from llamatrt.exporter.quant_weights import INT4_STORED, STORED, QuantizedWeight
from llamatrt.exporter.quantize import held_parts, quantize_graph
from llamatrt.exporter.quantize_portable import TENSORRT_INT4_BLOCKS, dequantize_linear_graph, tensorrt_can_take
from llamatrt.exporter.replicate import (
    TWIN_DEPTH,
    LayerTensor,
    TensorMaker,
    at_layer,
    expected_layer_tensors,
    ir_float,
    replicate_layers,
    streamed_layer_tensors,
    template_tensors,
)
from llamatrt.exporter.variants import VariantPlan, fused_attention_possible, planned_variants
from llamatrt.exporter.weights_file import (
    WeightsWriter,
    WrittenWeights,
    parameter_locations,
    pieced_tensor,
    save_graph,
    write_shared_weights,
)
from llamatrt.models.checkpoint import Checkpoint, load_checkpoint
from llamatrt.models.llama import StaticLlama
from llamatrt.models.mapped_parameters import MappedParameters
from llamatrt.models.tokenizer import eos_token_ids, load_tokenizer

if TYPE_CHECKING:
    import onnx_ir as ir

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "generation_config.json",
    "vocab.json",
    "merges.txt",
)
log = logging.getLogger(__name__)
# The runtime's check of a freshly written artifact folder: (folder, its manifest, the PyTorch reference,
# what gives back the reference's mapped pages after each of its runs) -> what manifest.validation records.
Validator = Callable[[Path, Manifest, StaticLlama, Callable[[], object]], Mapping[str, Any]]


@dataclass(frozen=True)
class ExportOptions:
    batch_size: int = 1
    max_cache_len: int = 1024
    prefill_chunk: int = 128
    dtype: str = "float32"
    full_logits: bool = False  # [B, S, V] logits from prefill, for accuracy work
    validate: bool = True
    quantize: str | None = None  # "int4" | "int8": weight-only, block-wise (exporter.quant_plan)
    block_size: int = 32
    accuracy_level: int = 0  # MatMulNBits' activation arithmetic (0: fp32, exact; 4: int8, may change answers)
    head_quantize: str | None = None  # the output head's (and a tied embedding's) format; None: quant_plan.default_head
    int4_kernel: str = "llamatrt"  # what runs 4-bit products at accuracy level 0 (quant_plan.INT4_KERNELS)
    calibration: Path | None = None  # text whose inputs GPTQ weighs rounding errors by (exporter.calibration)

    def checked(self) -> ExportOptions:
        """Validate at the edge; returns a copy with the dtype spelled canonically."""
        dtype = precision(self.dtype).name
        if self.batch_size < 1:
            raise InputError(f"batch size {self.batch_size} must be >= 1; pass --batch 1 or more")
        if self.prefill_chunk < 1:
            raise InputError(f"prefill chunk {self.prefill_chunk} must be >= 1; pass --prefill-chunk 1 or more")
        if self.max_cache_len < self.prefill_chunk:
            raise InputError(
                f"max seq len {self.max_cache_len} is smaller than the prefill chunk {self.prefill_chunk}; "
                "raise --max-seq-len or lower --prefill-chunk"
            )
        if self.quantize is not None and dtype != "float32":
            raise InputError(f"--quantize runs on ONNX Runtime CPU with fp32 activations; drop --dtype {self.dtype}")
        if self.calibration is not None and self.quantize is None:
            raise InputError("--calibration goes with --quantize (GPTQ makes the blocks); add --quantize int4")
        if self.calibration is not None and not Path(self.calibration).is_file():
            raise InputError(f"calibration text {self.calibration} is not a file; give a UTF-8 text file")
        if self.head_quantize is not None and self.quantize is None:
            raise InputError(f"--head-quantize {self.head_quantize} goes with --quantize; add --quantize int4")
        if self.quantize is not None and self.full_logits:
            raise InputError(
                "--quantize makes the ONNX Runtime graph only, which returns last-token logits; drop --full-logits"
            )
        return replace(self, dtype=dtype)


def export_steps(options: ExportOptions) -> int:
    """Progress steps of export_artifact, at most: loading, each graph, weights, validation (the
    bar completes early when the fused graphs are not made)."""
    return (
        2
        + len(planned_variants(options.batch_size, options.prefill_chunk, fused=True))
        + int(options.validate)
        + int(options.quantize is not None)
    )


def export_artifact(
    model: str | Path | Any,
    out: Path,
    options: ExportOptions = ExportOptions(),
    force: bool = False,
    progress: Progress = no_progress,
    validate: Validator | None = None,
) -> Manifest:
    """Export every graph variant, one weights file, tokenizer and manifest into `out`; with
    `validate` (and options.validate), check the folder before it replaces `out`."""
    options = options.checked()
    if options.dtype != "float32":
        import torch

        if not torch.cuda.is_available():
            log.warning(
                "%s graphs are for GPUs (ONNX Runtime CUDA, TensorRT): on ONNX Runtime CPU they run slower "
                "than fp32 (bf16 not at all); export fp32 for CPU",
                options.dtype,
            )
    out = Path(out).absolute()
    protect = (Path(model),) if isinstance(model, str | Path) and Path(model).exists() else ()
    check_output(out, force, protect)
    check_writable(out.parent)
    with locked(out):
        remove_stale_temp(out)
        check_output(out, force, protect)  # again, now that no other writer can change it
        return _export_locked(model, out, options, progress, validate)


def _export_locked(
    model: Any, out: Path, options: ExportOptions, progress: Progress, validate: Validator | None
) -> Manifest:
    progress("loading checkpoint")
    checkpoint = load_checkpoint(model)
    config = checkpoint.config
    checkpoint.check_parameters()  # every layer's tensors, from the headers: before minutes of work
    if options.quantize is not None:
        check_quantize_options(
            options.quantize, options.accuracy_level, options.block_size, options.head_quantize, options.int4_kernel
        )
    dtype = precision(options.dtype).torch
    fused = fused_attention_possible(config.head_dim, options.dtype, options.full_logits)
    if options.quantize is not None and not fused:
        raise InputError(
            f"--quantize needs ONNX Runtime's fused graph (head_dim % 16 == 0, onnxruntime >= 1.32); "
            f"this model has head_dim {config.head_dim}: export it without --quantize"
        )
    plans = planned_variants(options.batch_size, options.prefill_chunk, fused)
    twin_config = replace(config, num_layers=min(TWIN_DEPTH, config.num_layers))
    # the artifact, and beside it the twin's mapped parameters and weights until the twin is validated
    check_disk_space(out, _artifact_bytes(config, options, len(plans)) + 2 * _float_bytes(twin_config, dtype))
    with atomic_output_dir(out) as tmp:
        twin_dir = tmp / TWIN_DIR
        twin_dir.mkdir()
        with WeightsWriter(twin_dir / names.WEIGHTS) as writer:
            if options.quantize is None:  # layers 2.. are written while the twin is made and traced
                writer.stream(_expected_layers(checkpoint, twin_config, dtype))
            tokenizer = _checkpoint_tokenizer(checkpoint)  # a checkpoint's problems surface before minutes of work
            # the twin's parameters are pages of a file: read where a phase reads them, given back between
            twin, mapped = checkpoint.build_prefix(TWIN_DEPTH, dtype, twin_dir / TWIN_PARAMETERS)
            manifest = _export_twin_and_layers(
                checkpoint, tokenizer, twin, mapped, plans, options, tmp, progress, validate, writer
            )
    return manifest


def _expected_layers(
    checkpoint: Checkpoint, twin_config: LlamaConfig, dtype: torch.dtype
) -> list[tuple[str, int, Callable[[], Any]]]:
    """The float tensors of layers 2.. as the graphs are expected to hold them (replicate's
    expected_layer_tensors), made from the checkpoint."""
    with torch.device("meta"):
        shapes = StaticLlama(twin_config).state_dict()
    template = {k: tuple(v.shape) for k, v in shapes.items() if k.startswith(f"model.layers.{TWIN_DEPTH - 1}.")}
    make = _layer_tensor_maker(checkpoint, dtype, None, None)
    return expected_layer_tensors(template, dtype_name(dtype), checkpoint.config.num_layers, make)


def _export_twin_and_layers(
    checkpoint: Checkpoint,
    tokenizer: Any,
    twin: StaticLlama,
    mapped: MappedParameters,
    plans: list[VariantPlan],
    options: ExportOptions,
    tmp: Path,
    progress: Progress,
    validate: Validator | None,
    writer: WeightsWriter,
) -> Manifest:
    """Trace, quantize and validate the twin, then replicate its layer 1 into every layer: the
    artifact, written into `tmp` (its weights by `writer`, which may be streaming layers 2.. in the
    form expected). The twin's mapped pages are given back after each phase that read them, so no
    phase holds them beside its own."""
    config = checkpoint.config
    twin_dir = tmp / TWIN_DIR
    quant, quantizer, no_portable = None, None, None
    if options.quantize is not None:
        progress("quantizing weights")
        quant, quantizer, no_portable = _quantize_twin(checkpoint, tokenizer, twin, mapped, options)
        if no_portable is not None:  # MatMulNBits is an ONNX Runtime op: ONNX Runtime's graph only
            plans = [p for p in plans if p.attention.name == ONNXRUNTIME.name]
    c = options.max_cache_len
    specs = [graph_spec(plan, config, options.dtype, c, options.full_logits) for plan in plans]
    twin_specs = [graph_spec(plan, twin.config, options.dtype, c, options.full_logits) for plan in plans]
    if quant is not None:
        # torch runs them on the dequantized weights (export validation, diff's middle rung); TensorRT
        # the portable ones, whose DequantizeLinear blocks it builds as weight-only quantized GEMMs
        specs = [replace(spec, weights=quant.scheme) for spec in specs]
        twin_specs = [replace(spec, weights=quant.scheme) for spec in twin_specs]
    params = {k: v.detach() for k, v in twin.state_dict().items()}
    make = _layer_tensor_maker(checkpoint, twin.model.embed_tokens.weight.dtype, quant, quantizer)
    writer.key_parameters(params)
    graphs, tensors = [], []
    for spec in twin_specs:
        progress(f"exporting {spec.name} graph")
        graphs.append(_twin_graph(twin, spec, options.batch_size, quant, mapped.release))
        tensors.append(template_tensors(graphs[-1], params))  # what each of layer 1's tensors is
        if len(graphs) == 1:  # layers 2.. are written in the background while the other variants trace
            layers = streamed_layer_tensors(graphs[0], config.num_layers, tensors[0], make)
            if not writer.streams(layers):
                if writer.region:
                    log.info("layers 2.. are not held in the form expected (equal norms?): streaming them again")
                    writer.discard()
                writer.stream(layers)
        writer.add(graphs[-1], after_write=mapped.release)  # its tensors leave memory before the next trace
    twin_graphs = [_saved_twin(spec, graph, twin_dir) for spec, graph in zip(twin_specs, graphs, strict=True)]
    # validation runs beside the stream of layers 2..: the twin's graphs read none of its tensors
    twin_written = writer.layout()
    quantization = {} if quant is None else _quantization_entry(quant, quantizer, no_portable)
    twin_manifest = _manifest(twin.config, checkpoint, options, twin_written, {}, twin_graphs, {}, quantization, {})
    validation: dict[str, Any] = {"skipped": "--no-validate"}
    if validate is not None and options.validate:
        progress("validating against PyTorch")
        reference = twin if quant is None else dequantize_in_place(twin, quant, mapped)
        if quant is not None:
            quant.drop_blocks()  # the twin's graphs read them from its file, the reference is dequantized
        checked = validate(twin_dir, twin_manifest, reference, mapped.release)
        validation = {**checked, "checked": _checked_note(config)}
        mapped.release()
    progress("writing weights")
    writer.move(tmp / names.WEIGHTS)  # the artifact's: layers 2.. streamed, the twin's, what replication adds
    streamed: dict[str, tuple[LayerTensor, list[int]]] = {}
    for spec, graph, template in zip(specs, graphs, tensors, strict=True):
        replicate_layers(graph, config.num_layers, template, make)
        streamed.update(
            {k: (t, list(graph.graph.initializers[k].const_value.shape.numpy())) for k, t in template.items()}
        )
        if spec.attention == ONNXRUNTIME.name:
            _ort_form(graph)
        writer.add(graph)
    written = writer.close()
    specs = [_saved(spec, graph, tmp) for spec, graph in zip(specs, graphs, strict=True)]
    del graphs
    floats = {k: v for k, v in params.items() if quant is None or k not in quant.weights}
    locations = parameter_locations(floats, written)
    locations.update(_streamed_locations(streamed.values(), config.num_layers, written))
    shutil.rmtree(twin_dir)  # the mapped parameters stay readable until the last view of them goes
    if quant is not None:
        quantization = _quantization_entry(quant, quantizer, no_portable)  # with every layer's origin now
    manifest = _manifest(
        config,
        checkpoint,
        options,
        written,
        locations,
        specs,
        _save_tokenizer(tokenizer, checkpoint, tmp),
        quantization,
        validation,
    )
    write_manifest(manifest, tmp)
    return manifest


def _runs_matmul_int4(options: ExportOptions) -> bool:
    """Whether 4-bit products run llamatrt's MatMulInt4: at accuracy level 0 unless asked not to, and
    only where the library was built (else MatMulNBits' fp32 kernel, slower, with a warning)."""
    if options.int4_kernel != "llamatrt" or options.accuracy_level != 0:
        return False
    if library_path() is None:
        log.warning(
            "llamatrt's MatMulInt4 kernel is not built here (installed without a C compiler): 4-bit products "
            "go on MatMulNBits' fp32-activation kernel, several times slower; reinstall with gcc present "
            "(`pip install -e .`) for the fast one"
        )
        return False
    return True


def _quantize_twin(
    checkpoint: Checkpoint, tokenizer: Any, twin: StaticLlama, mapped: MappedParameters, options: ExportOptions
) -> tuple[QuantPlan, ParameterQuantizer, str | None]:
    """The twin's quantized weights, their quantizer (which every other layer's go through), and
    why TensorRT's graphs cannot take them (None where they can)."""
    assert options.quantize is not None
    calibration = None
    if options.calibration is not None:
        text = Path(options.calibration)
        calibration = Calibration(checkpoint, calibration_ids(tokenizer, text), text.name)
    quantizer = ParameterQuantizer(checkpoint, options.quantize, options.block_size, options.head_quantize, calibration)
    quant = plan_quantization(
        quantizer,
        twin,
        options.quantize,
        options.block_size,
        options.accuracy_level,
        after_each=mapped.release,
        own_int4=_runs_matmul_int4(options),
    )
    no_portable = tensorrt_can_take({**quantizer.carried, **quant.weights})
    if no_portable is not None:
        log.warning(
            "no TensorRT graphs: TensorRT takes symmetric int4 blocks of %s, and %s; for them export "
            "a float checkpoint with --quantize int4 --block-size 64",
            " or ".join(map(str, TENSORRT_INT4_BLOCKS)),
            no_portable,
        )
    return quant, quantizer, no_portable


TWIN_DIR = ".twin"  # inside the export's temp folder: the two-layer artifact that validation runs
TWIN_PARAMETERS = "parameters.bin"  # in TWIN_DIR: the twin's parameters, mapped (models.mapped_parameters)


def _checked_note(config: LlamaConfig) -> str:
    """What export validation covered, for the manifest (docs/artifact.md says why)."""
    if config.num_layers <= TWIN_DEPTH:
        return "every layer"
    return (
        f"layers 0-{TWIN_DEPTH - 1} of {config.num_layers} with the embedding and head (the traced twin); layers "
        f"{TWIN_DEPTH}-{config.num_layers - 1} are copies of layer {TWIN_DEPTH - 1}'s graph over their own weights"
    )


def _twin_graph(
    twin: StaticLlama,
    spec: GraphSpec,
    max_batch: int,
    quant: QuantPlan | None,
    release: Callable[[], object] = lambda: None,
) -> Any:
    """One variant of the twin: exported, optimized, quantized — everything but the ONNX Runtime
    fusions, which run after the layers are replicated (they merge nodes across layer boundaries).
    `release` gives back the twin's mapped pages after each parameter the quantizing rewrite reads."""
    graph = optimize_graph(graph_to_onnx(twin, spec, max_batch))
    if quant is not None and spec.attention == ONNXRUNTIME.name:
        quantize_graph(graph, quant.weights, quant.floats, quant.accuracy_level, release, quant.own_int4)
    elif quant is not None:
        dequantize_linear_graph(graph, quant.weights, quant.floats, release)
    return graph


def _saved_twin(spec: GraphSpec, graph: Any, folder: Path) -> GraphSpec:
    """The twin's graph as validation runs it (the ONNX Runtime fusions applied to a copy read back
    from disk, so the graph in memory stays one that replicates)."""
    import onnx_ir as ir

    saved = _saved(spec, graph, folder)
    if spec.attention != ONNXRUNTIME.name:
        return saved
    copy = ir.load(folder / spec.path)
    _ort_form(copy)
    return _saved(spec, copy, folder)


def _ort_form(graph: Any) -> None:
    """What only ONNX Runtime's graph gets, once its layers are all there: the fused residual norms and
    SwiGLU (exporter.ort_fusions) and packed tokens (exporter.ort_packing)."""
    fuse_skip_rms_norm(graph)
    fuse_swiglu(graph)
    pack_tokens(graph)


def _layer_tensor_maker(
    checkpoint: Checkpoint, compute: torch.dtype, quant: QuantPlan | None, quantizer: ParameterQuantizer | None
) -> TensorMaker:
    """Layer i's tensor for one of the template's initializers, from the checkpoint: the parameter
    in the graph's `compute` dtype and the stored form, or its blocks as the quantizer makes them."""
    import onnx_ir as ir

    @functools.lru_cache(maxsize=4)  # a weight's codes, scales and offsets are written one after another
    def blocks(param: str, template: str) -> QuantizedWeight:
        assert quant is not None and quantizer is not None
        weight, like = quantizer(param, checkpoint.parameter(param).numpy()), quant.weights[template]
        if weight.form() != like.form():
            raise CheckpointError(
                f"{param} is {weight.describe()} where layer 1 holds {like.describe()}: llamatrt writes every "
                "layer as layer 1's graph, so their blocks must be of one kind; export the float checkpoint "
                "(an HF folder) instead"
            )
        return weight

    accuracy_level = 0 if quant is None else quant.accuracy_level
    pieces = FloatPieces(checkpoint.stored_parameter_into)

    def make(tensor: LayerTensor, layer: int) -> ir.TensorProtocol:
        param = at_layer(tensor.param, layer)
        if tensor.quantized:
            weight = blocks(param, tensor.param)
            held = held_parts(weight, accuracy_level)[tensor.part] if tensor.part else weight
            array = STORED[tensor.suffix](held)
            return ir.Tensor(array, dtype=ir.DataType.INT4) if tensor.suffix in INT4_STORED else ir.tensor(array)
        shape = checkpoint.parameter_shape(param)
        return pieced_tensor(
            lambda: _stored_float(checkpoint.stored_parameter(param), tensor, compute),
            lambda: pieces.pieces(param, tensor.transposed, compute, torch_dtype(tensor.dtype)),
            ir_float(tensor.dtype),
            shape[::-1] if tensor.transposed else shape,
        )

    return make


def _stored_float(value: torch.Tensor, tensor: LayerTensor, compute: torch.dtype) -> ir.TensorProtocol:
    """A layer's parameter, rounded to the graph's compute dtype, in the form its template tensor
    holds it."""
    import onnx_ir as ir

    value = (value.t() if tensor.transposed else value).contiguous()  # before the upcast: fewer bytes moved
    value = value.to(compute).to(torch_dtype(tensor.dtype))
    if value.dtype == torch.bfloat16:  # numpy has no bf16: its bits, typed by onnx_ir
        return ir.Tensor(value.view(torch.uint16).numpy(), dtype=ir.DataType.BFLOAT16)
    return ir.tensor(value.numpy())


def _streamed_locations(
    streamed: Iterable[tuple[LayerTensor, list[int]]], num_layers: int, written: WrittenWeights
) -> dict[str, dict[str, Any]]:
    """weights_map entries of the replicated layers' float parameters, by their streamed keys."""
    locations: dict[str, dict[str, Any]] = {}
    for tensor, shape in streamed:
        if tensor.quantized:
            continue
        for layer in range(TWIN_DEPTH, num_layers):
            param = at_layer(tensor.param, layer)
            if param not in locations:
                offset, _ = written.offsets[tensor.name(layer)]
                locations[param] = {
                    "offset": offset,
                    "shape": shape,
                    "transposed": tensor.transposed,
                    "dtype": tensor.dtype,
                }
    return locations


def _quantization_entry(quant: QuantPlan, quantizer: Any, no_portable: str | None) -> dict[str, Any]:
    return {
        "scheme": quant.scheme,
        "block_size": quant.block_size,
        "accuracy_level": quant.accuracy_level,
        "int4_kernel": quant.int4_kernel,
        **({"int4_activation_bits": bits} if (bits := quant.int4_activation_bits) else {}),
        "tensors": {**quant.origins(), **quantizer.origins},
        "portable": _portable_note(quant, no_portable),
        **({} if quantizer.calibration is None else {"calibration": quantizer.calibration.describe()}),
    }


def _manifest(
    config: LlamaConfig,
    checkpoint: Checkpoint,
    options: ExportOptions,
    written: WrittenWeights,
    locations: dict[str, dict[str, Any]],
    specs: list[GraphSpec],
    tokenizer: dict[str, Any],
    quantization: dict[str, Any],
    validation: dict[str, Any],
) -> Manifest:
    return Manifest(
        format_version=FORMAT_VERSION,
        config=config,
        source=checkpoint.source,
        dtype=options.dtype,
        batch_size=options.batch_size,
        max_cache_len=options.max_cache_len,
        prefill_chunk=options.prefill_chunk,
        opset=OPSET,
        kv_write=KV_WRITE,
        weights_file=names.WEIGHTS,
        weights_bytes=written.bytes,
        weights_sha256=written.sha256,
        weights_map=locations,
        graphs={g.name: g for g in specs},
        tokenizer=tokenizer,
        validation=validation,
        versions=_versions(),
        quantization=quantization,
    )


def _portable_note(quant: QuantPlan, reason: str | None) -> str:
    """The manifest's word on the TensorRT graphs; `reason`: why there are none (None: there are)."""
    if reason is None:
        return f"DequantizeLinear int4 blocks of {quant.block_size} feeding MatMul (TensorRT weight-only GEMMs)"
    return f"none: {reason} (TensorRT takes symmetric int4 blocks of 64 or 128)"


def export_graph(model: StaticLlama, plan: VariantPlan, max_cache_len: int, folder: Path, max_batch: int) -> GraphSpec:
    """One graph variant of `model` as a standalone file in `folder`, with its own weights file: the
    reference an artifact's graph is compared with, node by node (`llamatrt diff --layerwise`). Made
    as exports make graphs (a two-layer twin, layers replicated), so tensors of the same meaning carry
    the same names."""
    dtype = dtype_name(model.model.embed_tokens.weight.dtype)
    spec = graph_spec(plan, model.config, dtype, max_cache_len, full_logits=False)
    twin = _model_twin(model)
    graph = _twin_graph(twin, graph_spec(plan, twin.config, dtype, max_cache_len, False), max_batch, None)
    params = {k: v.detach() for k, v in twin.state_dict().items()}
    full = {k: v.detach() for k, v in model.state_dict().items()}

    def make(tensor: LayerTensor, layer: int) -> Any:
        value = full[at_layer(tensor.param, layer)]
        return _stored_float(value, tensor, value.dtype)

    replicate_layers(graph, model.config.num_layers, template_tensors(graph, params), make)
    if plan.attention.name == ONNXRUNTIME.name:
        _ort_form(graph)
    write_shared_weights([graph], folder / names.WEIGHTS)
    return _saved(spec, graph, folder)


def _model_twin(model: StaticLlama) -> StaticLlama:
    """`model` cut to its first TWIN_DEPTH layers, sharing its tensors."""
    config = replace(model.config, num_layers=min(TWIN_DEPTH, model.config.num_layers))
    keep = {
        k: v
        for k, v in model.state_dict().items()
        if not k.startswith("model.layers.") or int(k.split(".")[2]) < TWIN_DEPTH
    }
    return StaticLlama.from_weights(config, keep).to(model.model.embed_tokens.weight.dtype).eval()


def _artifact_bytes(config: LlamaConfig, options: ExportOptions, graphs: int) -> int:
    """An upper bound of the artifact's size: the weights once (the tied head counted once), each
    graph's nodes and inlined constants (tens of KB per layer), the tokenizer and the manifest."""
    if options.quantize is None:
        weights = _float_bytes(config, precision(options.dtype).torch)
    else:
        weights = _quantized_bytes(config, options)
    return int(weights * 1.02) + graphs * (64 + 48 * config.num_layers) * 1024 + (32 << 20)


def _float_bytes(config: LlamaConfig, dtype: torch.dtype) -> int:
    with torch.device("meta"):
        shapes = StaticLlama(config)
    return sum(p.numel() for p in shapes.parameters()) * (torch.finfo(dtype).bits // 8)


def _quantized_bytes(config: LlamaConfig, options: ExportOptions) -> int:
    """Blocks of the scheme's bits with an fp32 scale and an offset or zero point each (8 bits for
    the head and a tied embedding where they keep them), fp32 norms; twice where TensorRT's int4
    graphs hold their own copy of the blocks."""
    assert options.quantize is not None
    with torch.device("meta"):
        shapes = StaticLlama(config)
    head = options.head_quantize or default_head(options.quantize, options.block_size)
    block, total = options.block_size, 0
    for name, p in shapes.named_parameters():
        if p.dim() != 2:
            total += p.numel() * 4
            continue
        scheme = head if name in ("lm_head.weight", "model.embed_tokens.weight") else options.quantize
        blocks = p.shape[0] * -(-p.shape[1] // block)  # a row's last block padded whole
        total += blocks * (block * WEIGHT_FORMATS[scheme].bits // 8 + 8)
    copies = 2 if options.quantize == "int4" and block in TENSORRT_INT4_BLOCKS else 1
    return total * copies


def _saved(spec: GraphSpec, graph: Any, folder: Path) -> GraphSpec:
    """Write one graph, check it with onnx.checker, and record its size and hash."""
    import onnx

    path = folder / spec.path
    size = save_graph(graph, path)
    try:
        onnx.checker.check_model(str(path), full_check=False)
    except onnx.checker.ValidationError as e:
        raise ValidationError(f"{spec.path} fails onnx.checker ({str(e).splitlines()[0]}); please report") from e
    return replace(spec, bytes=size, sha256=file_sha256(path))


def _checkpoint_tokenizer(checkpoint: Checkpoint) -> Any:
    """The checkpoint's tokenizer, or None where it has none (the artifact then takes token ids)."""
    if checkpoint.hf_dir is None or not any((checkpoint.hf_dir / n).is_file() for n in TOKENIZER_FILES):
        return None
    return load_tokenizer(checkpoint.hf_dir)


def _save_tokenizer(tokenizer: Any, checkpoint: Checkpoint, folder: Path) -> dict[str, Any]:
    """Save the checkpoint's tokenizer (tokenizer.json, what the runtime reads) and record in the
    manifest what the runtime needs beside it: EOS ids, pad/bos ids, special tokens, chat template."""
    if tokenizer is None or checkpoint.hf_dir is None:
        return {}
    target = folder / names.TOKENIZER_DIR
    tokenizer.save_pretrained(target)
    if not (target / "tokenizer.json").is_file():
        raise CheckpointError(
            f"the tokenizer in {checkpoint.hf_dir} has no fast (tokenizer.json) form, which "
            "llamatrt runs; install `sentencepiece` so transformers can convert it, or save a "
            "fast tokenizer into the checkpoint"
        )
    eos = eos_token_ids(checkpoint.hf_dir, tokenizer, checkpoint.hf_config)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    template = tokenizer.chat_template
    if isinstance(template, dict):  # several named templates: the default one is the chat's
        template = template.get("default")
    return {
        "dir": names.TOKENIZER_DIR,
        "eos_token_ids": eos,
        "pad_token_id": pad,
        "bos_token_id": tokenizer.bos_token_id,
        "chat_template": template,
        "special_tokens": {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)},
        "clean_up_tokenization_spaces": bool(getattr(tokenizer, "clean_up_tokenization_spaces", False)),
    }


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch
    import transformers

    from llamatrt.base import __version__

    return {
        "llamatrt": __version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "transformers": transformers.__version__,
    }
