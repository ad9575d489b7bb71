"""`llamatrt build`: TensorRT (or TensorRT-RTX) engines from an artifact's ONNX graphs.

Networks are strongly typed (TensorRT 11 has no fp16/bf16 builder flags): the precision is the
graph's own, fp32 islands included. TensorScatter parses to TensorRT's KV_CACHE_UPDATE layer, so
present aliases past at run time. One code path serves TensorRT 10.15+/11 and TensorRT-RTX, whose
builder APIs agree on everything used here; RTX builds engines on a machine without a GPU.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any

from llamatrt.base.artifact.engines import check_network_io, engine_module, plan_name, require_engine_graphs
from llamatrt.base.artifact.manifest import Manifest, write_manifest
from llamatrt.base.artifact.names import BUILD_LOG, TIMING_CACHE
from llamatrt.base.artifact.precision import WEIGHT_FORMATS
from llamatrt.base.artifact.reader import read_manifest
from llamatrt.base.errors import ArtifactExistsError, ValidationError
from llamatrt.base.lazy import require_cuda
from llamatrt.base.progress import Progress, no_progress
from llamatrt.base.termination import undo_on_termination


def _file_logger(trt: ModuleType, path: Path) -> Any:
    class FileLogger(trt.ILogger):  # type: ignore[name-defined, misc]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: Any, msg: str) -> None:
            with path.open("a") as f:
                f.write(f"[{severity.name}] {msg}\n")

    return FileLogger()


def _dtype_name(trt: ModuleType, dtype: Any) -> str:
    names = {trt.DataType.FLOAT: "float32", trt.DataType.HALF: "float16", trt.DataType.INT64: "int64"}
    if hasattr(trt.DataType, "BF16"):
        names[trt.DataType.BF16] = "bfloat16"
    return names.get(dtype, str(dtype))


def network_io(trt: ModuleType, network: Any) -> dict[str, list[dict[str, Any]]]:
    """Names, shapes and dtypes of a parsed network: the IO its engine will have."""

    def spec(t: Any) -> dict[str, Any]:
        return {"name": t.name, "shape": list(t.shape), "dtype": _dtype_name(trt, t.dtype)}

    return {
        "inputs": [spec(network.get_input(i)) for i in range(network.num_inputs)],
        "outputs": [spec(network.get_output(i)) for i in range(network.num_outputs)],
    }


def engine_from_onnx(
    trt: ModuleType,
    onnx_path: Path,
    timing_cache: bytes,
    workspace_gib: float | None,
    logger: Any,
    strip_weights: bool = True,
) -> tuple[bytes, bytes, dict[str, Any]]:
    """Parse and build one strongly typed engine. Returns (engine, updated timing cache, network info)."""
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        err = parser.get_error(0)
        raise ValidationError(
            f"TensorRT cannot parse {onnx_path.name}: node {err.node_name()!r} (op "
            f"{err.node_operator()}): {err.desc()}; please report with the model config"
        )
    layers = [network.get_layer(i).type for i in range(network.num_layers)]
    info = {
        "io": network_io(trt, network),
        "kv_cache_update_layers": sum(str(t).endswith("KV_CACHE_UPDATE") for t in layers),
        "dequantize_layers": sum(str(t).endswith(".DEQUANTIZE") for t in layers),
    }
    config = builder.create_builder_config()
    if workspace_gib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    cache = config.create_timing_cache(timing_cache)
    config.set_timing_cache(cache, ignore_mismatch=False)
    if strip_weights:
        # Weight-stripped: the plan keeps no copy of the weights, which stay once in weights.data; the
        # backend refits them from the ONNX graph (and so from weights.data) when it loads the engine.
        # REFIT_IDENTICAL: the weights refit are the ones built with, so the builder may optimize for them.
        config.set_flag(trt.BuilderFlag.STRIP_PLAN)
        config.set_flag(trt.BuilderFlag.REFIT_IDENTICAL)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise ValidationError(f"TensorRT failed to build {onnx_path.name}; see {BUILD_LOG} in the artifact")
    return bytes(engine), bytes(config.get_timing_cache().serialize()), info


def _check_quantized_layers(onnx_path: Path, built: int, log_path: Path) -> None:
    """Every DequantizeLinear of the graph became a TensorRT dequantize layer (a weight-only quantized
    GEMM with the MatMul it feeds), not a float weight folded at build time; said in build.log."""
    import onnx

    expected = sum(
        n.op_type == "DequantizeLinear" for n in onnx.load(str(onnx_path), load_external_data=False).graph.node
    )
    with log_path.open("a") as log:
        log.write(
            f"{onnx_path.name}: {built} DEQUANTIZE layers (weight-only quantized GEMMs) for {expected} "
            "DequantizeLinear nodes\n"
        )
    if built != expected:
        raise ValidationError(
            f"{onnx_path.name}: TensorRT made {built} DEQUANTIZE layers of {expected} "
            "DequantizeLinear nodes (the weights would be float); please report with the model config"
        )


def build_engines(
    artifact: Path,
    engine: str = "tensorrt",
    timing_cache: Path | None = None,
    workspace_gib: float | None = None,
    force: bool = False,
    progress: Progress = no_progress,
    strip_weights: bool | None = None,
) -> Manifest:
    """Build every graph of `artifact` into an engine; the manifest is updated only when all succeed.
    strip_weights (default: wherever a CUDA device is present): weight-stripped engines, refit from
    weights.data at load, so an artifact with engines stays about 1x its weights on disk. TensorRT-RTX
    1.7 cannot build a refittable engine without a CUDA device (its Myelin compiler fails even on a
    one-MatMul network with REFIT or STRIP_PLAN), so a CPU-only RTX build embeds the weights."""
    artifact = Path(artifact)
    manifest = read_manifest(artifact)
    to_build = require_engine_graphs(manifest, artifact)  # nothing to build is an error, before anything is written
    instead = "or build with --engine tensorrt-rtx, which needs no GPU"
    trt = engine_module(engine, fix=instead)  # what cannot run here is said before anything else
    if engine == "tensorrt":
        require_cuda(fix=instead)  # TensorRT proper builds for (and needs) the local GPU; RTX can build without one
    if manifest.engines and not force:
        raise ArtifactExistsError(
            f"{artifact} already has {manifest.engines.get('builder')} engines; pass --force to rebuild"
        )
    if strip_weights is None:
        import torch

        strip_weights = torch.cuda.is_available()
    cache_path = timing_cache or artifact / TIMING_CACHE
    cache = cache_path.read_bytes() if cache_path.is_file() else b""
    log_path = artifact / BUILD_LOG
    log_path.write_text(f"llamatrt build with {engine} {trt.__version__}\n")
    logger = _file_logger(trt, log_path)
    started, graphs = time.perf_counter(), {}
    written: list[tuple[Path, Path]] = []  # (temp file, final name)

    def remove_written() -> None:
        for tmp, _ in written:
            tmp.unlink(missing_ok=True)

    try:
        with undo_on_termination(remove_written):
            for name, graph in to_build.items():
                progress(f"building {name} engine")
                plan, cache, info = engine_from_onnx(
                    trt, artifact / graph.path, cache, workspace_gib, logger, strip_weights
                )
                check_network_io(info["io"], graph)
                if info["kv_cache_update_layers"] != 2 * manifest.config.num_layers:
                    raise ValidationError(
                        f"{graph.path}: {info['kv_cache_update_layers']} KV_CACHE_UPDATE layers, "
                        f"expected {2 * manifest.config.num_layers} (the cache would be copied); re-export with "
                        "this llamatrt: `llamatrt export --force`"
                    )
                if graph.weights in WEIGHT_FORMATS:
                    _check_quantized_layers(artifact / graph.path, info["dequantize_layers"], log_path)
                target = artifact / plan_name(graph, engine)
                tmp = target.with_name(target.name + ".tmp")
                tmp.write_bytes(plan)
                written.append((tmp, target))
                graphs[name] = {
                    "path": target.name,
                    "bytes": len(plan),
                    "sha256": hashlib.sha256(plan).hexdigest(),
                    **info,
                }
    except BaseException:
        remove_written()
        raise
    for tmp, target in written:
        os.replace(tmp, target)
    cache_tmp = cache_path.with_suffix(".tmp")
    cache_tmp.write_bytes(cache)
    os.replace(cache_tmp, cache_path)
    inside = cache_path.resolve().parent == artifact.resolve()
    engines = {
        "builder": engine,
        "version": trt.__version__,
        "graphs": graphs,
        "weights": "stripped" if strip_weights else "embedded",
        "timing_cache": cache_path.name if inside else str(cache_path.resolve()),
        "build_seconds": round(time.perf_counter() - started, 2),
    }
    updated = replace(manifest, engines=engines)
    write_manifest(updated, artifact)
    return updated
