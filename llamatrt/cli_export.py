"""`llamatrt export` and `llamatrt build`: thin wrappers over the exporter."""

from __future__ import annotations

import time
from pathlib import Path

import click

from llamatrt.base.artifact.precision import PRECISIONS, WEIGHT_FORMATS
from llamatrt.base.progress import StepBar

DTYPE_CHOICE = click.Choice([p.alias for p in PRECISIONS.values()] + list(PRECISIONS))


@click.command()
@click.option("--model", "model_spec", required=True, help="smollm2, an HF model folder, or a .gguf file.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Artifact folder to create.")
@click.option("--batch", "batch_size", type=int, default=1, show_default=True, help="Batch size B.")
@click.option("--max-seq-len", type=int, default=1024, show_default=True, help="KV-cache capacity C.")
@click.option("--prefill-chunk", type=int, default=128, show_default=True, help="Tokens per prefill call S.")
@click.option("--dtype", type=DTYPE_CHOICE, default="fp32", show_default=True, help="Compute precision.")
@click.option("--full-logits", is_flag=True, help="Prefill returns [B, S, V] logits (accuracy work).")
@click.option("--no-validate", is_flag=True, help="Skip the ONNX Runtime vs PyTorch self-check.")
@click.option(
    "--quantize",
    type=click.Choice(list(WEIGHT_FORMATS)),
    default=None,
    help="Weight-only blocks for ONNX Runtime (MatMulNBits); a GGUF's own blocks are carried over.",
)
@click.option("--block-size", type=int, default=32, show_default=True, help="Weights per quantization block.")
@click.option(
    "--accuracy-level",
    type=int,
    default=0,
    show_default=True,
    help="MatMulNBits activation arithmetic: 0 = fp32 (exact: the answers of the float weights), "
    "4 = int8 (faster, may change answers; `llamatrt diff` says whether it did).",
)
@click.option(
    "--head-quantize",
    type=click.Choice(list(WEIGHT_FORMATS)),
    default=None,
    help="Blocks for the output head (and a tied embedding) of a float checkpoint.  [default: int8 beside "
    "int4 projections, as llama.cpp's Q4_0 keeps it; int4 with --block-size 64 or 128, TensorRT's form]",
)
@click.option(
    "--int4-kernel",
    type=click.Choice(["llamatrt", "onnxruntime"]),
    default="llamatrt",
    show_default=True,
    help="What runs 4-bit products at accuracy level 0: llamatrt's MatMulInt4 (fp32 activations "
    "to within fp32 rounding, near level 4's speed) or MatMulNBits' fp32-activation kernel (slower).",
)
@click.option(
    "--calibration",
    type=click.Path(path_type=Path),
    default=None,
    help="Text of the kind the model will read (a few thousand tokens): --quantize makes the decoder's "
    "blocks by GPTQ, weighing rounding errors by the inputs this text gives them, instead of round-to-nearest.",
)
@click.option("--force", is_flag=True, help="Replace an existing artifact (only an artifact, or an empty folder).")
def export(
    model_spec: str,
    out: Path,
    batch_size: int,
    max_seq_len: int,
    prefill_chunk: int,
    dtype: str,
    full_logits: bool,
    no_validate: bool,
    quantize: str | None,
    block_size: int,
    accuracy_level: int,
    head_quantize: str | None,
    int4_kernel: str,
    calibration: Path | None,
    force: bool,
) -> None:
    """Export prefill and decode ONNX graphs, one weights file and a manifest."""
    from llamatrt.exporter.export import ExportOptions, export_steps
    from llamatrt.tools.pipeline import export_artifact

    options = ExportOptions(
        batch_size,
        max_seq_len,
        prefill_chunk,
        dtype,
        full_logits,
        not no_validate,
        quantize,
        block_size,
        accuracy_level,
        head_quantize,
        int4_kernel,
        calibration,
    ).checked()
    started = time.perf_counter()
    with StepBar(export_steps(options), "export") as bar:
        manifest = export_artifact(model_spec, out, options, force=force, progress=bar)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    err = manifest.validation.get("max_abs_logits_error")
    check = f"max |logits - torch| = {err:.3g}" if err is not None else manifest.validation.get("skipped", "")
    click.echo(
        f"exported {manifest.source} -> {out} ({manifest.quantization.get('scheme', manifest.dtype)}, B={manifest.batch_size}, "
        f"S={manifest.prefill_chunk}, C={manifest.max_cache_len}, {len(manifest.graphs)} graphs) in "
        f"{time.perf_counter() - started:.1f} s; {size / 1e6:.1f} MB on disk = {size / manifest.weights_bytes:.3f}x "
        f"the {manifest.weights_bytes / 1e6:.1f} MB of weights; {check}"
    )


@click.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option(
    "--engine",
    type=click.Choice(["tensorrt", "tensorrt-rtx"]),
    default="tensorrt",
    show_default=True,
    help="tensorrt-rtx builds without a GPU (engines then run under TensorRT-RTX).",
)
@click.option(
    "--timing-cache",
    type=click.Path(path_type=Path),
    default=None,
    help="Timing cache to read and update (default: timing.cache in the artifact).",
)
@click.option("--workspace", "workspace_gib", type=float, default=None, help="Builder workspace limit in GiB.")
@click.option("--force", is_flag=True, help="Rebuild engines that exist.")
def build(artifact: Path, engine: str, timing_cache: Path | None, workspace_gib: float | None, force: bool) -> None:
    """Build TensorRT engines from the artifact's graphs into the artifact (manifest updated atomically)."""
    from llamatrt.base.artifact.engines import engine_graphs
    from llamatrt.base.artifact.reader import read_manifest
    from llamatrt.exporter.trt_build import build_engines

    graphs = len(engine_graphs(read_manifest(artifact, verify=False)))
    with StepBar(graphs, "build") as bar:
        manifest = build_engines(artifact, engine, timing_cache, workspace_gib, force, progress=bar)
    info = manifest.engines
    sizes = ", ".join(f"{name} {g['bytes'] / 1e6:.1f} MB" for name, g in info["graphs"].items())
    click.echo(
        f"built {info['builder']} {info['version']} engines in {info['build_seconds']:.1f} s: {sizes}; "
        f"timing cache {info['timing_cache']}"
    )
