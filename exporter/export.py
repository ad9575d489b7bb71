"""`llamatrt export`: checkpoint -> artifact folder (DESIGN.md §2), atomically, self-checked."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from llamatrt.errors import InputError
from llamatrt.exporter.artifacts import atomic_output_dir, check_disk_space, check_output
from llamatrt.exporter.manifest import (
    DTYPE_ALIASES,
    FORMAT_VERSION,
    TORCH_DTYPES,
    Manifest,
    write_manifest,
)
from llamatrt.exporter.onnx_export import KV_WRITE, OPSET, graph_spec, graph_to_onnx
from llamatrt.exporter.onnx_optimize import optimize_graph
from llamatrt.exporter.ort_attention import fusable
from llamatrt.exporter.validate import validate_export
from llamatrt.exporter.weights_file import parameter_locations, save_graph, write_shared_weights
from llamatrt.models.checkpoint import Checkpoint, load_checkpoint
from llamatrt.models.tokenizer import eos_token_ids, load_tokenizer

WEIGHTS_FILE = "weights.data"
TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "chat_template.jinja", "generation_config.json", "vocab.json", "merges.txt",
)  # fmt: skip

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ExportOptions:
    batch_size: int = 1
    max_cache_len: int = 1024
    prefill_chunk: int = 128
    dtype: str = "float32"
    full_logits: bool = False  # [B, S, V] logits from prefill, for accuracy work
    validate: bool = True

    def checked(self) -> ExportOptions:
        """Validate at the edge; returns a copy with the dtype spelled canonically."""
        if self.dtype not in DTYPE_ALIASES:
            raise InputError(f"unknown dtype {self.dtype!r}; use fp32, fp16 or bf16")
        if self.batch_size < 1:
            raise InputError(f"batch size {self.batch_size} must be >= 1")
        if self.prefill_chunk < 1:
            raise InputError(f"prefill chunk {self.prefill_chunk} must be >= 1")
        if self.max_cache_len < self.prefill_chunk:
            raise InputError(
                f"max seq len {self.max_cache_len} is smaller than the prefill chunk {self.prefill_chunk}; "
                "raise --max-seq-len or lower --prefill-chunk"
            )
        return ExportOptions(self.batch_size, self.max_cache_len, self.prefill_chunk, DTYPE_ALIASES[self.dtype],
                             self.full_logits, self.validate)  # fmt: skip


def graph_variants(fused: bool) -> list[tuple[str, bool]]:
    """(graph, fused attention) pairs to export: the portable pair, plus the pair ONNX Runtime CPU
    runs (exporter.ort_attention) when `fused`."""
    return [(name, f) for f in ([False, True] if fused else [False]) for name in ("prefill", "decode")]


def export_steps(options: ExportOptions) -> int:
    """Progress steps of export_artifact, at most: loading, each graph, weights, validation (the
    bar completes early when the fused pair is not made)."""
    return 2 + len(graph_variants(fused=True)) + int(options.validate)


def export_artifact(
    model: str | Path | Any, out: Path, options: ExportOptions = ExportOptions(), force: bool = False,
    progress: Progress | None = None,
) -> Manifest:  # fmt: skip
    """Export prefill + decode graphs, one weights file, tokenizer and manifest into `out`."""
    options = options.checked()
    out = Path(out)
    check_output(out, force)
    step = progress or (lambda _: None)
    step("loading checkpoint")
    checkpoint = load_checkpoint(model)
    config = checkpoint.config
    torch_model = checkpoint.build_model(TORCH_DTYPES[options.dtype], full_logits=options.full_logits)
    weight_bytes = sum(p.numel() * p.element_size() for p in torch_model.parameters())  # tied head counted once
    check_disk_space(out, int(weight_bytes * 1.1))
    b, s, c = options.batch_size, options.prefill_chunk, options.max_cache_len
    specs = {
        "prefill": graph_spec("prefill", torch_model, b, s, c),
        "decode": graph_spec("decode", torch_model, b, 1, c),
    }
    with atomic_output_dir(out) as tmp:
        graphs = {}
        for name, fused in graph_variants(fusable(config.head_dim, options.dtype)):
            step(f"exporting {name} graph" + (" (ONNX Runtime attention)" if fused else ""))
            graphs[name, fused] = optimize_graph(graph_to_onnx(torch_model, specs[name], fused_attention=fused))
        step("writing weights")
        written = write_shared_weights(list(graphs.values()), tmp / WEIGHTS_FILE)
        locations = parameter_locations(torch_model.state_dict(), written)
        for (name, fused), graph in graphs.items():
            path = f"{name}.ort.onnx" if fused else specs[name].path
            size = save_graph(graph, tmp / path)
            specs[name] = replace(specs[name], **({"ort_path": path, "ort_bytes": size} if fused else {"bytes": size}))
        del graphs
        tokenizer = _save_tokenizer(checkpoint, tmp)
        validation: dict[str, Any] = {"skipped": "--no-validate"}
        if options.validate:
            step("validating against PyTorch")
            validation = validate_export(tmp, specs["prefill"], specs["decode"], torch_model, options.dtype)
        manifest = Manifest(
            format_version=FORMAT_VERSION, config=config, source=checkpoint.source, dtype=options.dtype,
            batch_size=b, max_cache_len=c, prefill_chunk=s, opset=OPSET, kv_write=KV_WRITE,
            weights_file=WEIGHTS_FILE, weights_bytes=written.bytes, weights_sha256=written.sha256,
            weights_map=locations, graphs=specs,
            tokenizer=tokenizer, validation=validation, versions=_versions(),
        )  # fmt: skip
        write_manifest(manifest, tmp)
    return manifest


def _save_tokenizer(checkpoint: Checkpoint, folder: Path) -> dict[str, Any]:
    """Copy the checkpoint's tokenizer files; record EOS ids, pad id and chat template."""
    if checkpoint.hf_dir is None:
        return {}
    target = folder / TOKENIZER_DIR
    target.mkdir()
    for name in TOKENIZER_FILES:
        if (checkpoint.hf_dir / name).is_file():
            shutil.copy2(checkpoint.hf_dir / name, target / name)
    if not any(target.iterdir()):
        return {}
    tokenizer = load_tokenizer(target)
    eos = eos_token_ids(checkpoint.hf_dir, tokenizer, checkpoint.hf_config)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    return {
        "dir": TOKENIZER_DIR,
        "eos_token_ids": eos,
        "pad_token_id": pad,
        "bos_token_id": tokenizer.bos_token_id,
        "chat_template": tokenizer.chat_template,
    }


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import transformers

    from llamatrt import __version__

    return {"llamatrt": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "transformers": transformers.__version__}  # fmt: skip
