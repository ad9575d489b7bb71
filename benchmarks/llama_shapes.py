"""Write a Llama-shaped Hugging Face folder with random bf16 weights: the sizes users deploy.

Speed and memory depend on shapes, not values, so the export and serving benchmarks of issue 27
run on these folders; nothing is downloaded (SmolLM2's tokenizer is copied from the bundled GGUF's
cached conversion, so the vocabulary is 49,152). Tensors are written one shard at a time, each
made and dropped before the next, so an 8B folder is written in a few GB.

    python benchmarks/llama_shapes.py 1b /tmp/llama-1b
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

SHAPES = {  # Llama-3.2-1B / 3B and Llama-3.1-8B, and a small one for quick runs
    "mid": {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 4,
        "num_attention_heads": 16,
        "num_key_value_heads": 4,
        "tie_word_embeddings": True,
    },
    "1b": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "tie_word_embeddings": True,
    },
    "3b": {
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "num_hidden_layers": 28,
        "num_attention_heads": 24,
        "num_key_value_heads": 8,
        "tie_word_embeddings": True,
    },
    "8b": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "tie_word_embeddings": False,
    },
}
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)


def config(shape: str, vocab: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **SHAPES[shape],
        "head_dim": SHAPES[shape]["hidden_size"] // SHAPES[shape]["num_attention_heads"],
        "vocab_size": vocab,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": LLAMA3_ROPE,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "bfloat16",
    }


def layer_tensors(cfg: dict, i: int) -> dict[str, tuple[int, ...]]:
    h, f, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    p = f"model.layers.{i}."
    return {
        p + "input_layernorm.weight": (h,),
        p + "self_attn.q_proj.weight": (q, h),
        p + "self_attn.k_proj.weight": (kv, h),
        p + "self_attn.v_proj.weight": (kv, h),
        p + "self_attn.o_proj.weight": (h, q),
        p + "post_attention_layernorm.weight": (h,),
        p + "mlp.gate_proj.weight": (f, h),
        p + "mlp.up_proj.weight": (f, h),
        p + "mlp.down_proj.weight": (h, f),
    }


def random_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return (1 + 0.1 * torch.randn(shape, generator=gen)).to(torch.bfloat16)
    return (torch.randn(shape, generator=gen) * shape[-1] ** -0.5).to(torch.bfloat16)


def write(shape: str, out: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    from safetensors.torch import save_file

    vocab = json.loads((tokenizer_dir / "config.json").read_text())["vocab_size"]
    cfg = config(shape, vocab)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    shards = [{"model.embed_tokens.weight": (vocab, cfg["hidden_size"])}]
    shards += [layer_tensors(cfg, i) for i in range(cfg["num_hidden_layers"])]
    tail = {"model.norm.weight": (cfg["hidden_size"],)}
    if not cfg["tie_word_embeddings"]:
        tail["lm_head.weight"] = (vocab, cfg["hidden_size"])
    shards.append(tail)
    weight_map = {}
    for n, shapes in enumerate(shards):
        name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: random_tensor(k, s, gen) for k, s in shapes.items()}, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shapes, name))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    for f in TOKENIZER_FILES:
        if (tokenizer_dir / f).is_file():
            shutil.copy(tokenizer_dir / f, out / f)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    from llamatrt.models.checkpoint import bundled_gguf
    from llamatrt.models.gguf import hf_dir_from_gguf

    folder = write(args.shape, args.out, hf_dir_from_gguf(bundled_gguf("smollm2")))
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    print(f"{args.shape}: {folder} ({size / 1e9:.2f} GB of bf16 weights)")


if __name__ == "__main__":
    main()
