"""Which MatMulNBits may run int8 activations (accuracy level 4) without changing a quantized
artifact's answers: the artifact's graph rewritten with level 4 on some projection kinds and level 0
on the rest, six chat prompts, 32 greedy tokens each, compared with all-level-0 (the exact answers).
Prints, per layout, the first step at which each prompt's answer departs (32: never) and the start of
the France answer. Usage: python benchmarks/accuracy_levels_by_projection.py INT4_ARTIFACT
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import onnx

from llamatrt.base.artifact.reader import read_manifest
from llamatrt.runtime.generator import Generator
from llamatrt.runtime.ort_backend import OrtBackend
from llamatrt.runtime.tokenizer import ArtifactTokenizer

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "How do I boil an egg?",
    "Explain what a neural network is in two sentences.",
    "Give me three tips for better sleep.",
    "What is 12 times 7?",
]
KINDS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
STEPS = 32


def kind(weight: str) -> str:
    return next((k for k in KINDS if f".{k}." in weight), "head")


LAYOUTS: dict[str, Callable[[str], int]] = {
    "all level 4": lambda w: 4,
    "level 0 on q/k/v and o": lambda w: 0 if kind(w) in ("qkv_proj", "o_proj") else 4,
    "level 0 on q/k/v": lambda w: 0 if kind(w) == "qkv_proj" else 4,
    "level 0 on o": lambda w: 0 if kind(w) == "o_proj" else 4,
    "level 0 on gate/up": lambda w: 0 if kind(w) == "gate_up_proj" else 4,
    "level 0 on down": lambda w: 0 if kind(w) == "down_proj" else 4,
    "level 0 on the head": lambda w: 0 if kind(w) == "head" else 4,
    "level 0 on every projection, head at 4": lambda w: 4 if kind(w) == "head" else 0,
}


def answers(folder: Path, levels: Callable[[str], int], ids: list[list[int]]) -> list[list[int]]:
    manifest = read_manifest(folder, verify=False)
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch)
        os.link(folder / manifest.weights_file, out / manifest.weights_file)
        for graph in manifest.graphs.values():
            model = onnx.load(str(folder / graph.path), load_external_data=False)
            for node in model.graph.node:
                if node.op_type == "MatMulNBits":
                    level = levels(node.input[1].rsplit(".", 1)[0])
                    next(a for a in node.attribute if a.name == "accuracy_level").i = level
            onnx.save(model, str(out / graph.path))
        with OrtBackend(out, manifest) as backend:
            return Generator(backend, stop_ids=manifest.eos_token_ids).generate(ids, max_new_tokens=STEPS)


def main(artifact: str) -> None:
    folder = Path(artifact)
    manifest = read_manifest(folder, verify=False)
    tokenizer = ArtifactTokenizer(folder / "tokenizer", manifest.tokenizer)
    ids = [tokenizer.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]
    exact = answers(folder, lambda w: 0, ids)
    for name, levels in LAYOUTS.items():
        got = answers(folder, levels, ids)
        departs = [
            next((i for i, (a, b) in enumerate(zip(x, y, strict=False)) if a != b), STEPS)
            for x, y in zip(exact, got, strict=True)
        ]
        print(f"{name:<40} departs at {departs}  France: {tokenizer.decode(got[0])[:40]!r}")


if __name__ == "__main__":
    main(sys.argv[1])
