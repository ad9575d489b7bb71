"""`llamatrt export`: checkpoint -> artifact folder (DESIGN.md §2), atomically.

The exporter writes the graph variants (exporter.variants), one weights file, the tokenizer and the
manifest into a temp folder; the caller's `validate` (the runtime's export check, which runs the
graphs the way users will) then runs on that folder before it is renamed into place, so a failing
export leaves nothing behind.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from llamatrt.base.artifact import names
from llamatrt.base.artifact.manifest import FORMAT_VERSION, GraphSpec, Manifest, write_manifest
from llamatrt.base.artifact.precision import precision
from llamatrt.base.artifact.reader import file_sha256
from llamatrt.base.artifact.variants import ONNXRUNTIME
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
from llamatrt.exporter.onnx_export import KV_WRITE, OPSET, graph_spec, graph_to_onnx
from llamatrt.exporter.onnx_optimize import optimize_graph
from llamatrt.exporter.ort_fusions import fuse_skip_rms_norm
from llamatrt.exporter.quant_plan import QuantPlan, dequantized_model, plan_quantization
from llamatrt.exporter.quantize import quantize_graph
from llamatrt.exporter.quantize_portable import TENSORRT_INT4_BLOCKS, dequantize_linear_graph, tensorrt_can_take
from llamatrt.exporter.variants import VariantPlan, fused_attention_possible, planned_variants
from llamatrt.exporter.weights_file import parameter_locations, save_graph, write_shared_weights
from llamatrt.models.checkpoint import Checkpoint, load_checkpoint
from llamatrt.models.llama import StaticLlama
from llamatrt.models.tokenizer import eos_token_ids, load_tokenizer

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
# The runtime's check of a freshly written artifact folder; returns what goes into manifest.validation.
Validator = Callable[[Path, Manifest, StaticLlama], Mapping[str, Any]]


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
    tokenizer = _checkpoint_tokenizer(checkpoint)  # a checkpoint's problems surface before minutes of work
    torch_model = checkpoint.build_model(precision(options.dtype).torch)
    b, s, c = options.batch_size, options.prefill_chunk, options.max_cache_len
    fused = fused_attention_possible(config.head_dim, options.dtype, options.full_logits)
    plans = planned_variants(b, s, fused)
    quant, no_portable = None, None
    if options.quantize is not None:
        if not fused:
            raise InputError(
                f"--quantize needs ONNX Runtime's fused graph (head_dim % 16 == 0, onnxruntime >= 1.32); "
                f"this model has head_dim {config.head_dim}: export it without --quantize"
            )
        progress("quantizing weights")
        quant = plan_quantization(checkpoint, torch_model, options.quantize, options.block_size, options.accuracy_level)
        no_portable = tensorrt_can_take(quant.weights)
        if no_portable is not None:  # MatMulNBits is an ONNX Runtime op: ONNX Runtime's graph only
            log.warning(
                "no TensorRT graphs: TensorRT takes symmetric int4 blocks of %s, and %s; for them export "
                "a float checkpoint with --quantize int4 --block-size 64",
                " or ".join(map(str, TENSORRT_INT4_BLOCKS)),
                no_portable,
            )
            plans = [p for p in plans if p.attention.name == ONNXRUNTIME.name]
    specs = [graph_spec(plan, torch_model, c, options.full_logits) for plan in plans]
    if quant is not None:
        # torch runs them on the dequantized weights (export validation, diff's middle rung); TensorRT
        # the portable ones, whose DequantizeLinear blocks it builds as weight-only quantized GEMMs
        specs = [replace(spec, weights=quant.scheme) for spec in specs]
    check_disk_space(out, _artifact_bytes(torch_model, len(specs)))
    with atomic_output_dir(out) as tmp:
        graphs = []
        for spec in specs:
            progress(f"exporting {spec.name} graph")
            graphs.append(_onnx_graph(torch_model, spec, b))
            if quant is not None and spec.attention == ONNXRUNTIME.name:
                quantize_graph(graphs[-1], quant.weights, quant.floats, quant.accuracy_level)
            elif quant is not None:
                dequantize_linear_graph(graphs[-1], quant.weights, quant.floats)
        progress("writing weights")
        written = write_shared_weights(graphs, tmp / names.WEIGHTS)
        floats = {k: v for k, v in torch_model.state_dict().items() if quant is None or k not in quant.weights}
        locations = parameter_locations(floats, written)
        specs = [_saved(spec, graph, tmp) for spec, graph in zip(specs, graphs, strict=True)]
        del graphs
        manifest = Manifest(
            format_version=FORMAT_VERSION,
            config=config,
            source=checkpoint.source,
            dtype=options.dtype,
            batch_size=b,
            max_cache_len=c,
            prefill_chunk=s,
            opset=OPSET,
            kv_write=KV_WRITE,
            weights_file=names.WEIGHTS,
            weights_bytes=written.bytes,
            weights_sha256=written.sha256,
            weights_map=locations,
            graphs={g.name: g for g in specs},
            tokenizer=_save_tokenizer(tokenizer, checkpoint, tmp),
            validation={"skipped": "--no-validate"},
            versions=_versions(),
            quantization={}
            if quant is None
            else {
                "scheme": quant.scheme,
                "block_size": quant.block_size,
                "accuracy_level": quant.accuracy_level,
                "tensors": quant.origins(),
                "portable": _portable_note(quant, no_portable),
            },
        )
        write_manifest(manifest, tmp)
        if validate is not None and options.validate:
            progress("validating against PyTorch")
            reference = torch_model if quant is None else dequantized_model(torch_model, quant)
            manifest = replace(manifest, validation=dict(validate(tmp, manifest, reference)))
            write_manifest(manifest, tmp)
    return manifest


def _portable_note(quant: QuantPlan, reason: str | None) -> str:
    """The manifest's word on the TensorRT graphs; `reason`: why there are none (None: there are)."""
    if reason is None:
        return f"DequantizeLinear int4 blocks of {quant.block_size} feeding MatMul (TensorRT weight-only GEMMs)"
    return f"none: {reason} (TensorRT takes symmetric int4 blocks of 64 or 128)"


def export_graph(model: StaticLlama, plan: VariantPlan, max_cache_len: int, folder: Path, max_batch: int) -> GraphSpec:
    """One graph variant of `model` as a standalone file in `folder`, with its own weights file: the
    reference an artifact's graph is compared with, node by node (`llamatrt diff --layerwise`). The
    same exporter makes both, so tensors of the same meaning carry the same names."""
    spec = graph_spec(plan, model, max_cache_len, full_logits=False)
    graph = _onnx_graph(model, spec, max_batch)
    write_shared_weights([graph], folder / names.WEIGHTS)
    return _saved(spec, graph, folder)


def _onnx_graph(model: StaticLlama, spec: GraphSpec, max_batch: int) -> Any:
    """Exported and optimized; a graph only ONNX Runtime runs gets its contrib-op fusions too."""
    graph = optimize_graph(graph_to_onnx(model, spec, max_batch))
    if spec.attention == ONNXRUNTIME.name:
        fuse_skip_rms_norm(graph)
    return graph


def _artifact_bytes(model: StaticLlama, graphs: int) -> int:
    """An upper bound of the artifact's size: the weights once (the tied head counted once), each
    graph's nodes and inlined constants (tens of KB per layer), the tokenizer and the manifest."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return int(weights * 1.02) + graphs * (64 + 48 * model.config.num_layers) * 1024 + (32 << 20)


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
