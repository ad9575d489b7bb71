"""LlamaConfig: the one config object past the edge, validated once from an HF config dict."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from llamatrt.base.errors import ConfigError

log = logging.getLogger(__name__)

# Keys of an HF Llama config this loader reads (the rest of this list changes nothing in the math).
READ_HF_KEYS = frozenset(
    {
        "model_type",
        "hidden_act",
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "rms_norm_eps",
        "rope_theta",
        "rope_scaling",
        "rope_parameters",
        "tie_word_embeddings",
        "attention_bias",
        "mlp_bias",
        "max_position_embeddings",
    }
)
# Keys that do not change the math of inference: ignored on purpose.
IGNORED_HF_KEYS = frozenset(
    {
        "_name_or_path",
        "_model_name_or_path",
        "architectures",
        "attention_dropout",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "unk_token_id",
        "sep_token_id",
        "decoder_start_token_id",
        "dtype",
        "torch_dtype",
        "initializer_range",
        "transformers_version",
        "use_cache",
        "quantization_config",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "is_decoder",
        "is_encoder_decoder",
        "id2label",
        "label2id",
        "chunk_size_feed_forward",
        "problem_type",
        "tokenizer_class",
        "prefix",
        "task_specific_params",
        "finetuning_task",
        "torchscript",
        "tie_encoder_decoder",
        "add_cross_attention",
        "cross_attention_hidden_size",
        "pruned_heads",
        "output_scores",
        "return_dict_in_generate",
        "pretraining_tp",  # pretraining_tp slices the
        # same matmuls; the result is the same function
    }
)
# Keys that change the model when set to anything but their "off" value: refused with the key named.
UNSUPPORTED_WHEN_SET: dict[str, tuple[Any, ...]] = {
    "sliding_window": (None,),
    "use_sliding_window": (False, None),
    "attn_logit_softcapping": (None,),
    "final_logit_softcapping": (None,),
    "logits_scaling": (None, 1, 1.0),
    "embedding_multiplier": (None, 1, 1.0),
    "residual_multiplier": (None, 1, 1.0),
    "attention_multiplier": (None,),
    "use_qk_norm": (False, None),
    "no_rope_layers": (None,),
    "layer_types": (None,),
    "moe_layers": (None,),
    "num_experts": (None, 0),
}

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True, slots=True)
class RopeScaling:
    """RoPE frequency scaling. `linear` uses only `factor`; `llama3` uses all fields."""

    rope_type: str
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True, slots=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    tie_word_embeddings: bool
    attention_bias: bool = False
    mlp_bias: bool = False
    max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"config field {name}={getattr(self, name)} must be >= 1; fix config.json")
        if self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}; fix the config"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for RoPE; fix the config")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> LlamaConfig:
        """Inverse of to_dict (the manifest's form, not HF's)."""
        fields = dict(raw)
        scaling = fields.pop("rope_scaling", None)
        try:
            return cls(**fields, rope_scaling=RopeScaling(**scaling) if scaling else None)
        except TypeError as e:
            raise ConfigError(f"manifest config is malformed ({e}); re-run `llamatrt export`") from e

    @classmethod
    def from_hf_config(cls, raw: Mapping[str, Any]) -> LlamaConfig:
        """Validate an HF `config.json` dict; raise ConfigError naming the field and the fix."""
        model_type = raw.get("model_type")
        if model_type != "llama":
            raise ConfigError(
                f"model_type={model_type!r} is not supported; llamatrt exports Llama-family "
                "checkpoints (model_type 'llama')"
            )
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"hidden_act={act!r} is not supported; Llama uses 'silu'")
        missing = [k for k in _REQUIRED_HF_KEYS if k not in raw]
        if missing:
            raise ConfigError(f"config.json lacks {', '.join(missing)}; is this a Llama config?")
        for key, off in UNSUPPORTED_WHEN_SET.items():
            if key in raw and raw[key] not in off:
                raise ConfigError(
                    f"config.json sets {key}={raw[key]!r}, which llamatrt does not implement; "
                    "export a plain Llama checkpoint (llamatrt would compute another model)"
                )
        unknown = sorted(set(raw) - READ_HF_KEYS - IGNORED_HF_KEYS - set(UNSUPPORTED_WHEN_SET))
        if unknown:
            log.warning("config.json keys llamatrt does not read (ignored): %s", ", ".join(unknown))
        num_heads = int(raw["num_attention_heads"])
        head_dim = raw.get("head_dim") or int(raw["hidden_size"]) // num_heads
        theta, scaling = _rope_from_hf(raw)
        return cls(
            vocab_size=int(raw["vocab_size"]),
            hidden_size=int(raw["hidden_size"]),
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=bool(raw.get("attention_bias", False)),
            mlp_bias=bool(raw.get("mlp_bias", False)),
            max_position_embeddings=int(raw.get("max_position_embeddings", 8192)),
        )


_REQUIRED_HF_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)


def _rope_from_hf(raw: Mapping[str, Any]) -> tuple[float, RopeScaling | None]:
    """Read RoPE from transformers 5 (`rope_parameters`) or 4 (`rope_theta` + `rope_scaling`)."""
    params = dict(raw.get("rope_parameters") or {})
    theta = float(params.pop("rope_theta", raw.get("rope_theta", 10000.0)))
    scaling = params or dict(raw.get("rope_scaling") or {})
    if float(scaling.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ConfigError("partial_rotary_factor != 1 is not supported; Llama rotates full heads")
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(f"rope_type={rope_type!r} is not supported; use one of {', '.join(SUPPORTED_ROPE_TYPES)}")
    if rope_type == "default":
        return theta, None
    if "factor" not in scaling:
        raise ConfigError(f"rope scaling {rope_type!r} needs a 'factor'; add it to the config")
    if rope_type == "linear":
        return theta, RopeScaling("linear", factor=float(scaling["factor"]))
    need = ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in need if k not in scaling]
    if missing:
        raise ConfigError(f"llama3 rope scaling lacks {', '.join(missing)}; add them to the config")
    return theta, RopeScaling(
        "llama3",
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
    )
