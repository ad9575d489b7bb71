"""The KV-cache write and the names/shapes of the cache tensors.

`write_kv` is the only place new keys/values enter the cache. It is a torch custom op so the
exporter can lower it to ONNX `TensorScatter` (opset 24), which ONNX Runtime runs and TensorRT
maps to its in-place KV-cache update. Its contract matches TensorScatter's: the S new entries
land contiguously at slots cache_position[0] .. cache_position[0] + S - 1, for every row.
"""

from __future__ import annotations

import torch

from llamatrt.models.config import LlamaConfig


@torch.library.custom_op("llamatrt::write_kv", mutates_args=())
def write_kv(past: torch.Tensor, new: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
    """present (batch, num_kv_heads, max_cache_len, head_dim) = past with `new` written at
    the slots starting at cache_position[0] along the sequence axis."""
    start = int(cache_position[0])
    present = past.clone()
    present[:, :, start : start + new.shape[2]] = new
    return present


@write_kv.register_fake
def _write_kv_fake(past: torch.Tensor, new: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(past)


def past_key_name(layer: int) -> str:
    return f"past_key_values.{layer}.key"


def past_value_name(layer: int) -> str:
    return f"past_key_values.{layer}.value"


def present_key_name(layer: int) -> str:
    return f"present.{layer}.key"


def present_value_name(layer: int) -> str:
    return f"present.{layer}.value"


def cache_names(num_layers: int, prefix: str = "past") -> list[str]:
    """Flat names in graph order: key0, value0, key1, value1, ..."""
    key, value = (past_key_name, past_value_name) if prefix == "past" else (present_key_name, present_value_name)
    return [n for i in range(num_layers) for n in (key(i), value(i))]


def cache_shape(config: LlamaConfig, batch_size: int, max_cache_len: int) -> tuple[int, int, int, int]:
    return (batch_size, config.num_kv_heads, max_cache_len, config.head_dim)


def empty_cache(
    config: LlamaConfig, batch_size: int, max_cache_len: int, dtype: torch.dtype, device: str | torch.device = "cpu"
) -> list[torch.Tensor]:
    """Zeroed flat cache (key0, value0, ...), allocated once per generation."""
    shape = cache_shape(config, batch_size, max_cache_len)
    return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(2 * config.num_layers)]
