"""Decode speed of one artifact with ONNX Runtime's `session.set_denormal_as_zero` on and off (the
runtime turns it on for quantized artifacts), both sessions in this process, interleaved rounds.

Usage: python benchmarks/denormals_ab.py ARTIFACT [ROUNDS]   (prints tok/s of each round and the medians)
"""

from __future__ import annotations

import statistics
import sys
import time

import llamatrt
from llamatrt.runtime import ort_backend

PROMPT = "Tell me a long story about a dragon."


def loaded(artifact: str, flush: bool) -> llamatrt.LLM:
    options = ort_backend.OrtBackend._options

    def with_flag(ort, graph, threads, manifest):  # type: ignore[no-untyped-def]
        opts = options(ort, graph, threads, manifest)
        opts.add_session_config_entry("session.set_denormal_as_zero", "1" if flush else "0")
        return opts

    ort_backend.OrtBackend._options = staticmethod(with_flag)  # type: ignore[method-assign]
    try:
        return llamatrt.load(artifact, "onnxruntime")
    finally:
        ort_backend.OrtBackend._options = staticmethod(options)  # type: ignore[method-assign]


def main(artifact: str, rounds: int = 6) -> None:
    llms = {flush: loaded(artifact, flush) for flush in (False, True)}
    speeds: dict[bool, list[float]] = {flush: [] for flush in llms}
    for r in range(rounds):
        for flush, llm in sorted(llms.items(), reverse=bool(r % 2)):
            ids = llm.encode(PROMPT, chat=True)
            start = time.perf_counter()
            tokens = sum(1 for _ in llm.generator.stream([ids], 128, use_eos=False))
            speeds[flush].append(tokens / (time.perf_counter() - start))
    for flush, values in speeds.items():
        print(
            f"denormals {'flushed' if flush else 'kept   '}: median {statistics.median(values):6.1f} tok/s  "
            f"rounds {[round(v, 1) for v in values]}"
        )


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:3]))
