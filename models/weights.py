"""HF folder (config.json + safetensors, sharded or not) -> config dict and state dict."""

from __future__ import annotations

import json
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
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in safetensors_files(folder):
        try:
            shard = load_file(str(f))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"cannot read {f} ({e}); the file is corrupt or truncated, re-download it") from e
        state.update({k: v.to(dtype) if v.is_floating_point() else v for k, v in shard.items()})
    return state
