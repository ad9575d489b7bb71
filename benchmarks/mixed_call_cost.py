"""What putting a prefill slice into the decode call would save, before building the graph for it.

The loop runs a step's prefill as its own call beside the decode call of the running rows; vLLM and
llama-server run both in one batch (one read of the weights). A graph that does (decode rows and a
prefill slice packed into one call) costs about what a one-row call of the slice's tokens plus the
decode rows' costs, attention aside; this times, on an artifact's graph with open batch and tokens
(ONNX Runtime's), a decode call of 3 rows plus a prefill call of S tokens against one call of S + 3
tokens, and a decode call of all 4 rows (the step without prefill). Medians of 15 calls, rows at
context 300, the rounds interleaved.

On an artifact whose graph packs tokens (exporter.ort_packing) the packed call itself is timed too.

Usage: .venv/bin/python benchmarks/mixed_call_cost.py ARTIFACT [ROUNDS]   (a B >= 4 artifact)
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from llamatrt.base.artifact.reader import read_manifest
from llamatrt.runtime.kv_state import KVState
from llamatrt.runtime.ort_backend import OrtBackend

CONTEXT = 300  # the slot every timed call writes: rows part-way into their sequences
PREFILL_ROW = 3
SLICES = (8, 16, 32, 64)


def main() -> None:
    folder, rounds = Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 2
    manifest = read_manifest(folder)
    backend = OrtBackend(folder, manifest)
    graph = next((g for g in backend.graphs.values() if g.batch is None and g.seq_len is None), None)
    if graph is None or manifest.batch_size < 4:
        raise SystemExit("needs a B >= 4 artifact with ONNX Runtime's graph (open batch and tokens)")
    kv = KVState(backend)
    for row in range(4):
        kv.reset_row(row, 0)

    def prefill(tokens: int) -> None:
        ids = torch.randint(0, manifest.config.vocab_size, (tokens,))
        positions = torch.arange(CONTEXT, CONTEXT + tokens)
        kv.take(backend.run(graph.name, kv.prefill_feeds(graph, PREFILL_ROW, ids, positions, CONTEXT)), row=PREFILL_ROW)

    def decode(rows: int) -> None:
        tokens = torch.randint(0, manifest.config.vocab_size, (rows,))
        at = torch.full((rows,), CONTEXT)
        kv.take(backend.run(graph.name, kv.decode_feeds(graph, tokens, at, at)), rows=rows)

    def packed(tokens: int) -> None:
        """The packed call itself (a graph that packs tokens): 3 decode rows and row 3's slice."""
        at = torch.tensor([CONTEXT])
        ids = [torch.randint(0, manifest.config.vocab_size, (1,)) for _ in range(3)]
        ids.append(torch.randint(0, manifest.config.vocab_size, (tokens,)))
        slots = [at] * 3 + [torch.arange(CONTEXT, CONTEXT + tokens)]
        kv.take(backend.run(graph.name, kv.packed_feeds(graph, ids, slots, slots)), rows=4)

    def median_ms(call: Callable[[int], None], size: int) -> float:
        call(size)
        times = []
        for _ in range(15):
            started = time.perf_counter()
            call(size)
            times.append(time.perf_counter() - started)
        return 1000 * statistics.median(times)

    packs = graph.packs_tokens
    print(
        "| round | S | decode(3) + prefill(S), ms | one call of S + 3 tokens, ms | saved | decode(4) alone, ms |"
        + (" the packed call, ms |" if packs else "")
    )
    print("|---|---|---|---|---|---|" + ("---|" if packs else ""))
    for r in range(rounds):
        decode3, decode4 = median_ms(decode, 3), median_ms(decode, 4)
        for size in SLICES:
            apart, together = decode3 + median_ms(prefill, size), median_ms(prefill, size + 3)
            joint = f" {median_ms(packed, size):.1f} |" if packs else ""
            print(
                f"| {r + 1} | {size} | {apart:.1f} | {together:.1f} | {apart / together:.2f}x | {decode4:.1f} |{joint}"
            )


if __name__ == "__main__":
    main()
