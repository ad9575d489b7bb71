"""The KV-cache write and the shape of the cache tensors (their names are the artifact's: llamatrt.base.artifact.names).

`write_kv` is the only place new keys/values enter the cache. Its contract is ONNX
`TensorScatter`'s: row b's S new entries land contiguously at slots cache_position[b, 0] ..
cache_position[b, 0] + S - 1, every row at its own place. Eager PyTorch writes those slots in place
(present is past, no copy of the cache per step); under export it becomes the functional custom op
`llamatrt::write_kv`, which the exporter lowers to `TensorScatter` (opset 24, `write_indices` =
cache_position[:, 0]) — ONNX Runtime runs it in place with IO binding and TensorRT maps it to its
KV-cache update layer.
"""

from __future__ import annotations

import torch

from llamatrt.base.config import LlamaConfig


def write_kv(past: torch.Tensor, new: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
    """present (batch, num_kv_heads, max_cache_len, head_dim) = past with row b of `new` (batch,
    num_kv_heads, seq, head_dim) written at slots cache_position[b, 0] .. + seq - 1."""
    if torch.compiler.is_exporting():
        return write_kv_op(past, new, cache_position)
    _write_rows(past, new, cache_position)
    return past


def _write_rows(cache: torch.Tensor, new: torch.Tensor, cache_position: torch.Tensor) -> None:
    seq = new.shape[2]
    for row, start in enumerate(cache_position[:, 0].tolist()):
        cache[row, :, start : start + seq] = new[row]


@torch.library.custom_op("llamatrt::write_kv", mutates_args=())
def write_kv_op(past: torch.Tensor, new: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
    """The functional form the exporter sees and lowers to TensorScatter."""
    present = past.clone()
    _write_rows(present, new, cache_position)
    return present


@write_kv_op.register_fake
def _write_kv_fake(past: torch.Tensor, new: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(past)


def cache_shape(config: LlamaConfig, batch_size: int, max_cache_len: int) -> tuple[int, int, int, int]:
    return (batch_size, config.num_kv_heads, max_cache_len, config.head_dim)


def empty_cache(
    config: LlamaConfig, batch_size: int, max_cache_len: int, dtype: torch.dtype, device: str | torch.device = "cpu"
) -> list[torch.Tensor]:
    """Zeroed flat cache (key0, value0, ...), allocated once per generation."""
    shape = cache_shape(config, batch_size, max_cache_len)
    return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(2 * config.num_layers)]
