"""HF folder (config.json + safetensors, sharded or not) -> config dict and state dict."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from llamatrt.base.errors import CheckpointError


def hf_config_from_dir(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder} has no config.json; pass a Hugging Face model folder or a .gguf file")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); re-download or re-save the checkpoint") from e
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} is not a JSON object; re-download or re-save the checkpoint")
    return raw


def safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, KeyError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{index} is malformed ({e}); re-download the checkpoint") from e
        files = [folder / name for name in sorted(set(weight_map.values()))]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder} has no *.safetensors weights; save the model with save_pretrained()")
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"shard {f.name} listed in the index is missing from {folder}; re-download it")
    return files


FUSED_PROJECTIONS = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}


def fuse_projections(state_dict: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """HF names -> StaticLlama's fused `qkv_proj` / `gate_up_proj` (concatenated along outputs).
    A missing part is named as the checkpoint names it, not as the fused tensor."""
    fused = dict(state_dict)
    for layer in range(num_layers):
        prefix = f"model.layers.{layer}."
        for target, parts in FUSED_PROJECTIONS.items():
            for kind in ("weight", "bias"):
                names = [f"{prefix}{p}.{kind}" for p in parts]
                present = [n for n in names if n in fused]
                if not present:
                    continue
                if len(present) != len(names):
                    missing = next(n for n in names if n not in fused)
                    raise CheckpointError(f"checkpoint lacks tensor {missing!r}; is it a complete Llama checkpoint?")
                fused[f"{prefix}{target}.{kind}"] = torch.cat([fused.pop(n) for n in names])
    return fused


def state_dict_from_dir(folder: Path, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    reader = TensorReader(folder)
    state: dict[str, torch.Tensor] = {}
    for name in reader.where:
        tensor = reader.get(name)
        state[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return state


SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class TensorReader:
    """Tensors of an HF folder's safetensors, read one at a time with plain file reads: an export
    streams a checkpoint of any size through a layer's worth of memory. (Not through a memory map:
    every page of a mapping that was read stays counted in the process's resident memory while it
    is mapped, so reading a whole checkpoint through one would hold it all.)"""

    def __init__(self, folder: Path) -> None:
        self.where: dict[str, tuple[Path, str, list[int], int, int]] = {}
        for f in safetensors_files(folder):
            try:
                with f.open("rb") as handle:
                    size = int.from_bytes(handle.read(8), "little")
                    if size > f.stat().st_size - 8:
                        raise ValueError(f"a header of {size} bytes in a file of {f.stat().st_size}")
                    header = json.loads(handle.read(size))
            except (OSError, ValueError, UnicodeDecodeError) as e:
                raise CheckpointError(f"cannot read {f} ({e}); the file is corrupt or truncated, re-download it") from e
            for name, entry in header.items():
                if name == "__metadata__":
                    continue
                try:
                    start, end = entry["data_offsets"]
                    self.where[name] = (f, entry["dtype"], list(entry["shape"]), 8 + size + start, end - start)
                except (KeyError, TypeError, ValueError) as e:
                    raise CheckpointError(f"{f} has a malformed header entry for {name!r}; re-download it") from e

    def _entry(self, name: str) -> tuple[Path, str, list[int], int, int]:
        if name not in self.where:
            raise CheckpointError(f"checkpoint lacks tensor {name!r}; is it a complete Llama checkpoint?")
        return self.where[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entry(name)[2])

    def get(self, name: str) -> torch.Tensor:
        _, dtype, shape, _, length = self._checked_entry(name)
        data = bytearray(length)
        self._read(name, data)
        if not length:
            return torch.empty(shape, dtype=SAFETENSORS_DTYPES[dtype])
        return torch.frombuffer(data, dtype=SAFETENSORS_DTYPES[dtype]).reshape(shape)

    def read_into(self, name: str, buffer: torch.Tensor) -> torch.Tensor:
        """`get(name)` read into the front of `buffer` (bytes, contiguous, at least nbytes(name)
        long): a view of it. A reader that reuses one buffer for every tensor takes no fresh pages
        for them (a page fault each: most of an export's kernel time, docs/benchmarks.md)."""
        _, dtype, shape, _, length = self._checked_entry(name)
        self._read(name, memoryview(buffer[:length].numpy()))
        return buffer[:length].view(SAFETENSORS_DTYPES[dtype]).view(shape)

    def nbytes(self, name: str) -> int:
        return self._entry(name)[4]

    def dtype(self, name: str) -> torch.dtype:
        return SAFETENSORS_DTYPES[self._checked_entry(name)[1]]

    def _checked_entry(self, name: str) -> tuple[Path, str, list[int], int, int]:
        entry = self._entry(name)
        if entry[1] not in SAFETENSORS_DTYPES:
            raise CheckpointError(
                f"tensor {name!r} in {entry[0].name} is {entry[1]}, which llamatrt does not read; save the checkpoint "
                "in bf16, fp16 or fp32"
            )
        return entry

    def _read(self, name: str, data: bytearray | memoryview) -> None:
        path, _, _, offset, length = self._entry(name)
        with path.open("rb") as f:
            f.seek(offset)
            if f.readinto(data) != length:
                raise CheckpointError(f"{path} is corrupt or truncated (tensor {name!r} is cut); re-download it")


def fused_parts(name: str) -> list[str]:
    """The HF-named tensors a StaticLlama parameter is made of, in order (`...qkv_proj.weight` is
    q|k|v, `gate_up_proj` gate|up, concatenated along outputs); any other is its own."""
    for target, parts in FUSED_PROJECTIONS.items():
        if f".{target}." in name:
            prefix, kind = name.split(f"{target}.")
            return [f"{prefix}{part}.{kind}" for part in parts]
    return [name]


def fused_shape(shape: Callable[[str], tuple[int, ...]], name: str) -> tuple[int, ...]:
    """The shape `fused_parameter` gives, from the parts' shapes alone."""
    parts = fused_parts(name)
    if len(parts) == 1:
        return shape(name)
    shapes = [shape(part) for part in parts]
    return (sum(s[0] for s in shapes), *shapes[0][1:])


def fused_parameter(get: Callable[[str], torch.Tensor], name: str) -> torch.Tensor:
    """One StaticLlama parameter from a getter of HF-named tensors: what fuse_projections makes of
    the whole state dict, for one name."""
    parts = fused_parts(name)
    return torch.cat([get(part) for part in parts]) if len(parts) > 1 else get(name)
