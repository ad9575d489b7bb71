"""Opening an artifact: the one place its manifest is parsed, checked and its files verified.

An artifact is untrusted input (people download and pass them around), so opening one never
follows a path out of its folder, checks the manifest against the schema and the contract, checks
each graph file's real inputs/outputs and external-data references (read without its weights), and,
unless the caller opts out, verifies every file against the manifest's SHA-256.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from llamatrt.base.artifact import names
from llamatrt.base.artifact.manifest import GraphSpec, Manifest, contract_io, load_manifest_json
from llamatrt.base.artifact.schema import REEXPORT
from llamatrt.base.artifact.variants import ONNXRUNTIME
from llamatrt.base.errors import ManifestMismatchError


def inside(folder: Path, relative: str, what: str) -> Path:
    """`folder / relative`, refused unless it stays inside `folder` (no absolute path, no `..`,
    no symlink that points out)."""
    rel = Path(relative)
    if rel.is_absolute() or ".." in rel.parts or not relative:
        raise ManifestMismatchError(
            f"manifest {what} {relative!r} points outside the artifact; refusing it ({REEXPORT})"
        )
    path = folder / rel
    root = folder.resolve()
    if path.exists() and not path.resolve().is_relative_to(root):
        raise ManifestMismatchError(f"{what} {relative!r} is a link out of the artifact; refusing it ({REEXPORT})")
    return path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def check_file(
    folder: Path, relative: str, size: int, sha256: str, what: str, verify: bool, fix: str = REEXPORT
) -> Path:
    path = inside(folder, relative, what)
    if not path.is_file():
        raise ManifestMismatchError(f"{path} is missing; {fix}")
    actual = path.stat().st_size
    if actual != size:
        raise ManifestMismatchError(
            f"{path} has {actual} bytes, the manifest says {size} (truncated or replaced); {fix}"
        )
    if verify and sha256 and file_sha256(path) != sha256:
        raise ManifestMismatchError(
            f"{path} does not match its SHA-256 in the manifest (corrupted or replaced); {fix}, "
            "or pass --no-verify to use it anyway"
        )
    return path


def check_contract(manifest: Manifest) -> None:
    """Every graph's IO is the contract's for this config (so a graph cannot claim another cache),
    names are unique, and there is a decode graph at the artifact's batch."""
    seen: set[str] = set()
    for graph in manifest.graphs.values():
        if graph.name in seen:
            raise ManifestMismatchError(f"manifest names graph {graph.name!r} twice; {REEXPORT}")
        seen.add(graph.name)
        first = graph.inputs[0]
        if first.name != names.INPUT_IDS or len(first.shape) != 2:
            raise ManifestMismatchError(f"graph {graph.name!r}: its first input must be input_ids [B, S]; {REEXPORT}")
        batch, seq = first.shape
        if graph.packs_tokens and graph.attention != ONNXRUNTIME.name:
            raise ManifestMismatchError(f"graph {graph.name!r}: only ONNX Runtime's graph packs tokens; {REEXPORT}")
        want = contract_io(
            manifest.config, manifest.dtype, batch, seq, manifest.max_cache_len, graph.full_logits, graph.packs_tokens
        )
        for side, got, expected in (("input", graph.inputs, want[0]), ("output", graph.outputs, want[1])):
            if tuple(got) != expected:
                bad = next((a, b) for a, b in zip([*got, None], [*expected, None], strict=False) if a != b)
                shown = [(t.name, t.shape, t.dtype) if t else "nothing" for t in bad]
                raise ManifestMismatchError(
                    f"graph {graph.name!r} {side} {shown[0]} disagrees with the config, which implies {shown[1]}; {REEXPORT}"
                )
    if not any(g.serves("decode", manifest.batch_size) for g in manifest.graphs.values()):
        raise ManifestMismatchError(f"manifest has no decode graph of batch {manifest.batch_size}; {REEXPORT}")


def check_graph_file(path: Path, graph: GraphSpec, manifest: Manifest) -> None:
    """The .onnx file's real IO equals the manifest's, and its weights are all in the weights file."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError, RuntimeError, ... for a damaged protobuf
        raise ManifestMismatchError(f"{path} is not a readable ONNX graph ({type(e).__name__}); {REEXPORT}") from e

    def io(values: object) -> list[tuple[str, tuple[int, ...], str]]:
        out = []
        for v in values:  # type: ignore[attr-defined]
            t = v.type.tensor_type
            dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name if t.elem_type else "?"
            shape = tuple(d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim)
            out.append((v.name, shape, dtype))
        return out

    for side, real, spec in (
        ("inputs", io(proto.graph.input), graph.inputs),
        ("outputs", io(proto.graph.output), graph.outputs),
    ):
        want = [(t.name, t.shape, t.dtype) for t in spec]
        if real != want:
            raise ManifestMismatchError(
                f"{path.name}'s {side} are not the ones the manifest names for graph {graph.name!r} "
                f"(a graph from another artifact?); {REEXPORT}"
            )
    for tensor in proto.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        end = int(info.get("offset", 0)) + int(info.get("length", 0))
        if info.get("location") != manifest.weights_file or end > manifest.weights_bytes:
            raise ManifestMismatchError(
                f"{path.name} reads weights from {info.get('location')!r} (bytes up to {end}), outside "
                f"the artifact's {manifest.weights_file}; {REEXPORT}"
            )


def load_graph_with_weights(folder: Path, relative: str, what: str) -> Any:
    """An artifact's ONNX graph (an onnx ModelProto) with its initializers' external data read in, by
    this reader's rules (a location inside `folder`; `check_graph_file` has held each one to the
    weights file's bounds) rather than onnx's loader: that one refuses a weights file with several
    hard links, which a copy made with `cp -l` has, and so do the twins llamatrt's own tools link."""
    import onnx

    path = inside(folder, relative, what)
    model = onnx.load(str(path), load_external_data=False)
    files: dict[str, Any] = {}
    try:
        for tensor in model.graph.initializer:
            if tensor.data_location != onnx.TensorProto.EXTERNAL:
                continue
            info = {e.key: e.value for e in tensor.external_data}
            location = info.get("location", "")
            if location not in files:
                files[location] = inside(path.parent, location, f"external data of {path.name}").open("rb")
            data = files[location]
            data.seek(int(info.get("offset", 0)))
            length = int(info["length"]) if "length" in info else -1
            tensor.raw_data = data.read(length)
            if length >= 0 and len(tensor.raw_data) != length:
                raise ManifestMismatchError(f"{location} ends before {tensor.name}'s data (truncated); {REEXPORT}")
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.DEFAULT
    finally:
        for file in files.values():
            file.close()
    return model


def read_manifest(folder: Path, verify: bool = True, graph_files: bool = True) -> Manifest:
    """Parse and check the manifest of the artifact in `folder`; check (and with `verify`, hash)
    the files it names. `graph_files=False` skips opening the .onnx files (a backend that runs
    engines, or the model, never reads them)."""
    folder = Path(folder)
    manifest = Manifest.from_json(load_manifest_json(folder))
    check_contract(manifest)
    check_file(folder, manifest.weights_file, manifest.weights_bytes, manifest.weights_sha256, "weights file", verify)
    for graph in manifest.graphs.values():
        path = check_file(folder, graph.path, graph.bytes, graph.sha256, f"graph {graph.name!r} path", verify)
        if graph_files:
            check_graph_file(path, graph, manifest)
    tokenizer_dir = manifest.tokenizer.get("dir")
    if tokenizer_dir:
        path = inside(folder, tokenizer_dir, "tokenizer dir")
        if not (path / "tokenizer.json").is_file():
            raise ManifestMismatchError(f"{path} has no tokenizer.json; {REEXPORT}")
    return manifest


def tokenizer_dir(folder: Path, manifest: Manifest) -> Path | None:
    """The artifact's tokenizer folder (checked inside the artifact), or None."""
    relative = manifest.tokenizer.get("dir")
    return inside(Path(folder), relative, "tokenizer dir") if relative else None


__all__ = ["check_file", "file_sha256", "inside", "names", "read_manifest", "tokenizer_dir"]
