"""Config validation and checkpoint loading: good inputs load, bad ones give one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llamatrt.base.errors import CheckpointError, ConfigError
from llamatrt.models import LlamaConfig, load_checkpoint
from tests.conftest import TINY_BASE, tiny_hf_model


def hf_raw(**overrides):
    return {"model_type": "llama", **TINY_BASE, "num_key_value_heads": 2, **overrides}


def test_config_reads_transformers4_and_5_rope_forms() -> None:
    v5 = LlamaConfig.from_hf_config(hf_raw(rope_parameters={"rope_type": "default", "rope_theta": 1e5}))
    v4 = LlamaConfig.from_hf_config(hf_raw(rope_theta=1e5, rope_scaling=None))
    assert v5 == v4 and v5.rope_theta == 1e5 and v5.rope_scaling is None
    l3 = LlamaConfig.from_hf_config(
        hf_raw(
            rope_theta=5e5,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
        )
    )
    assert l3.rope_scaling is not None and l3.rope_scaling.factor == 8.0
    assert LlamaConfig.from_dict(l3.to_dict()) == l3


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"model_type": "gpt2"}, "model_type='gpt2'"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "rope_type='yarn'"),
        ({"num_key_value_heads": 3}, "not a multiple"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "lacks low_freq_factor"),
    ],
)
def test_bad_configs_fail_with_one_line(overrides, needle) -> None:
    with pytest.raises(ConfigError, match=needle) as err:
        LlamaConfig.from_hf_config(hf_raw(**overrides))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("sliding_window", 4096),
        ("use_sliding_window", True),
        ("attn_logit_softcapping", 50.0),
        ("final_logit_softcapping", 30.0),
        ("use_qk_norm", True),
        ("logits_scaling", 8.0),
    ],
)
def test_a_feature_llamatrt_does_not_implement_is_refused_by_name(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"sets {key}=") as err:
        LlamaConfig.from_hf_config(hf_raw(**{key: value}))
    assert "\n" not in str(err.value) and "does not implement" in str(err.value)


def test_off_values_of_unimplemented_features_and_supported_biases_load(caplog) -> None:
    config = LlamaConfig.from_hf_config(
        hf_raw(sliding_window=None, use_sliding_window=False, attention_bias=True, mlp_bias=True, pretraining_tp=1)
    )
    assert config.attention_bias and config.mlp_bias
    assert "does not read" not in caplog.text  # every key here is known


def test_unknown_keys_are_named_not_dropped_silently(caplog) -> None:
    LlamaConfig.from_hf_config(hf_raw(my_custom_flag=True, another_key=3))
    assert "does not read (ignored): another_key, my_custom_flag" in caplog.text


def test_missing_key_is_named() -> None:
    raw = hf_raw()
    del raw["intermediate_size"]
    with pytest.raises(ConfigError, match="intermediate_size"):
        LlamaConfig.from_hf_config(raw)


def test_hf_folder_round_trip(tmp_path: Path) -> None:
    hf = tiny_hf_model("mha-untied")
    hf.save_pretrained(tmp_path)
    model = load_checkpoint(tmp_path).build_model()
    ours = model.state_dict()
    for name, tensor in hf.state_dict().items():
        if "q_proj" in name or "k_proj" in name or "v_proj" in name or "gate_proj" in name or "up_proj" in name:
            continue  # fused; checked below
        assert torch.equal(ours[name], tensor), name
    attn = hf.model.layers[1].self_attn
    fused = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
    assert torch.equal(ours["model.layers.1.self_attn.qkv_proj.weight"], fused)


def test_sharded_folder_loads(tmp_path: Path) -> None:
    hf = tiny_hf_model("gqa-tied")
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    model = load_checkpoint(tmp_path).build_model()
    assert torch.equal(model.model.norm.weight, hf.model.norm.weight)


def test_bad_checkpoints(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        load_checkpoint(empty)
    (empty / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(empty)
    with pytest.raises(CheckpointError, match="not a GGUF"):
        (tmp_path / "x.gguf").write_bytes(b"nope" * 10)
        load_checkpoint(tmp_path / "x.gguf")
    (gpt2 := tmp_path / "gpt2").mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    with pytest.raises(ConfigError, match="model_type='gpt2'"):
        load_checkpoint(gpt2)


def test_missing_tensor_and_corrupt_file(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    tiny_hf_model("mha-untied").save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    state = load_file(str(weights))
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(weights))
    with pytest.raises(CheckpointError, match=r"lacks tensor 'model.layers.1.mlp.up_proj.weight'"):
        load_checkpoint(tmp_path).build_model()
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(tmp_path).build_model()
