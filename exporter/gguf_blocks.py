"""A GGUF file's quantized tensors as StaticLlama's weights, in MatMulNBits form, not re-quantized.

llama.cpp stores q_proj/k_proj with their rows permuted for its rotary layout; transformers undoes
that permutation when it loads a GGUF (its LlamaTensorProcessor), and we undo the same one on whole
rows of blocks (blocks run along the input dimension, so a row permutation moves blocks intact).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from llamatrt.base.config import LlamaConfig
from llamatrt.exporter.quant_weights import QuantizedWeight, from_gguf_blocks, stack_rows

CARRIED = ("Q4_0", "Q4_1", "Q8_0")


def _unpermute(rows: int, heads: int) -> np.ndarray:
    """transformers' _reverse_permute_weights as a row index (applied to row numbers)."""
    index = np.arange(rows)
    return index.reshape(heads, rows // heads // 2, 2).swapaxes(2, 1).reshape(rows)


def gguf_quantized_weights(path: Path, config: LlamaConfig) -> dict[str, QuantizedWeight]:
    """StaticLlama parameter name -> its weight as the GGUF stores it, for every 2-D tensor held in
    a carried block type; float tensors and other block types are absent (quantized from floats)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    raw = {t.name: t for t in reader.tensors}

    def get(name: str, heads: int | None = None) -> QuantizedWeight | None:
        tensor = raw.get(name)
        if tensor is None or tensor.tensor_type.name not in CARRIED:
            return None
        weight = from_gguf_blocks(tensor.tensor_type.name, np.asarray(tensor.data), int(tensor.shape[0]))
        return weight if heads is None else weight.rows(_unpermute(weight.n, heads))

    found: dict[str, QuantizedWeight] = {}

    def put(name: str, parts: list[QuantizedWeight | None]) -> None:
        if all(p is not None for p in parts):
            found[name] = stack_rows([p for p in parts if p is not None])

    put("model.embed_tokens.weight", [get("token_embd.weight")])
    if not config.tie_word_embeddings:
        put("lm_head.weight", [get("output.weight")])
    for i in range(config.num_layers):
        layer, block = f"model.layers.{i}", f"blk.{i}"
        put(
            f"{layer}.self_attn.qkv_proj.weight",
            [
                get(f"{block}.attn_q.weight", config.num_heads),
                get(f"{block}.attn_k.weight", config.num_kv_heads),
                get(f"{block}.attn_v.weight"),
            ],
        )
        put(f"{layer}.self_attn.o_proj.weight", [get(f"{block}.attn_output.weight")])
        put(f"{layer}.mlp.gate_up_proj.weight", [get(f"{block}.ffn_gate.weight"), get(f"{block}.ffn_up.weight")])
        put(f"{layer}.mlp.down_proj.weight", [get(f"{block}.ffn_down.weight")])
    return found
