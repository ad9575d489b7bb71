"""KL of an artifact against a reference artifact on a text, measured the way llama.cpp's
`llama-perplexity --kl-divergence` measures it: chunks of CONTEXT tokens, scored on their second
half (each position sees at least CONTEXT/2 tokens before it). Prints one JSON line: mean KL, its
99th percentile and maximum, the share of positions with the same top token, and perplexities.

Usage: python benchmarks/kl_on_text.py REFERENCE_ARTIFACT ARTIFACT TEXT_FILE [CONTEXT]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from llamatrt.runtime.generator import Generator
from llamatrt.runtime.llm import load
from llamatrt.tools.teacher_forcing import score


def scored(artifact: str, chunks: list[list[int]], half: int) -> list[torch.Tensor]:
    with load(artifact, verify=False) as llm:
        gen = Generator(llm.backend)
        return score(gen, [c[:half] for c in chunks], [c[half:] for c in chunks])


def main(reference: str, artifact: str, text_file: str, context: int = 256) -> None:
    with load(reference, verify=False) as llm:
        ids = llm.encode(Path(text_file).read_text(encoding="utf-8"))
    half = context // 2
    chunks = [ids[i : i + context] for i in range(0, len(ids) - context + 1, context)]
    ref, got = scored(reference, chunks, half), scored(artifact, chunks, half)
    kls, same, nll_ref, nll = [], 0, [], []
    for chunk, a, b in zip(chunks, ref, got, strict=True):
        targets = torch.tensor(chunk[half:])
        p, q = a.log_softmax(-1), b.float().log_softmax(-1)
        kls.append((p.exp() * (p - q)).sum(-1))
        same += int((a.argmax(-1) == b.argmax(-1)).sum())
        nll_ref.append(-p.gather(-1, targets[:, None])[:, 0])
        nll.append(-q.gather(-1, targets[:, None])[:, 0])
    kl = torch.cat(kls)
    print(
        json.dumps(
            {
                "artifact": artifact,
                "chunks": len(chunks),
                "context": context,
                "positions": int(kl.numel()),
                "mean_kl": float(kl.mean()),
                "p99_kl": float(kl.quantile(0.99)),
                "max_kl": float(kl.max()),
                "same_top_token": same / kl.numel(),
                "ppl_reference": float(torch.cat(nll_ref).mean().exp()),
                "ppl": float(torch.cat(nll).mean().exp()),
            }
        )
    )


if __name__ == "__main__":
    main(*sys.argv[1:4], *(int(a) for a in sys.argv[4:5]))
