"""A scripted Backend: next token = (last input token + 1) % vocab. Records every call."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from llamatrt.base.artifact.manifest import FORMAT_VERSION, GraphSpec, Manifest, contract_io
from llamatrt.models import LlamaConfig
from llamatrt.runtime.backend import Backend

VOCAB = 32


def fake_manifest(batch: int = 1, chunk: int = 4, cache: int = 24, open_tokens: bool = False) -> Manifest:
    """A one-layer manifest: static batch-1 prefill and B-row decode graphs, or (`open_tokens`) one
    graph with open rows and tokens that serves both, like the ONNX Runtime fused graph."""
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=8,
        intermediate_size=8,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        head_dim=4,
        rms_norm_eps=1e-6,
        rope_theta=1e4,
        rope_scaling=None,
        tie_word_embeddings=True,
    )
    shapes: dict[str, tuple[int | str, int | str]] = {"prefill": (1, chunk), "decode": (batch, 1)}
    if open_tokens:
        shapes = {"any": ("batch", "tokens")}
    graphs = {
        name: GraphSpec(name, name, f"{name}.onnx", *contract_io(config, "float32", b, s, cache))
        for name, (b, s) in shapes.items()
    }
    return Manifest(
        FORMAT_VERSION,
        config,
        "fake",
        "float32",
        batch,
        cache,
        chunk,
        24,
        "tensor_scatter",
        "weights.data",
        0,
        "",
        graphs,
    )


class ScriptedBackend(Backend):
    name = "scripted"

    def __init__(self, manifest: Manifest, flat: bool = False) -> None:
        super().__init__(Path("."), manifest)
        self.calls: list[dict] = []
        self.flat = flat  # uniform logits, for sampling tests
        self.cache = torch.empty(0)

    def allocate_cache(self) -> torch.Tensor:
        self.cache = super().allocate_cache()
        return self.cache

    def _row_of(self, past: torch.Tensor) -> int | None:
        """Which row of the B-row cache a batch-1 call was bound to (None: all rows)."""
        full = self.cache[0]
        if past.shape[0] == full.shape[0]:
            return None
        return (past.data_ptr() - full.data_ptr()) // (full[0].numel() * full.element_size())

    def select_graphs(self, manifest: Manifest) -> dict[str, GraphSpec]:
        return dict(manifest.graphs)

    def _run(self, graph: GraphSpec, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.calls.append(
            {
                "graph": graph.name,
                "row": self._row_of(feeds["past_key_values.0.key"]),
                **{k: v.clone() for k, v in feeds.items() if "past" not in k},
            }
        )
        last = feeds["input_ids"][:, -1]
        logits = torch.zeros(last.shape[0], VOCAB)
        if not self.flat:
            logits[torch.arange(last.shape[0]), (last + 1) % VOCAB] = 10.0
        present = {k.replace("past_key_values.", "present.", 1): v for k, v in feeds.items() if "past" in k}
        return {"logits": logits, **present}


class SpacedIds:
    """Detokenizer pieces for token-id tests: token t reads "t " (runtime.detokenizer.Pieces)."""

    def step(self, token: int) -> str:
        return f"{token} "

    def flush(self) -> str:
        return ""
