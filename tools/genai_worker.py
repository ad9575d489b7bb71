"""`python -m llamatrt.tools.genai_worker MODEL_DIR BATCH PROMPT_LEN VOCAB`: onnxruntime-genai's
`og.Generator` in a process of its own, as its users run it (its default session options: ONNX
Runtime's intra-op threads = the cores), for `bench --baseline onnxruntime-genai`.

Protocol: after loading and a warm-up it prints one JSON line (its threads and held memory); then
for every line holding a token count it runs one greedy generation of that many tokens on the
fixed prompt and prints its timings as one JSON line. End of input ends it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def _rss_mb() -> float:
    status = Path("/proc/self/status")
    if not status.is_file():
        return 0.0
    return next(int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith("VmRSS")) / 1024


def main(model_dir: str, batch: int, prompt_len: int, vocab: int) -> None:
    import numpy as np
    import onnxruntime_genai as og

    from llamatrt.base.artifact.feeds import fixed_prompt

    before = _rss_mb()
    model = og.Model(model_dir)
    ids = fixed_prompt(batch, prompt_len, vocab).numpy().astype(np.int32)

    def run(tokens: int) -> dict[str, float]:
        params = og.GeneratorParams(model)
        params.set_search_options(
            max_length=prompt_len + tokens, min_length=prompt_len + tokens, batch_size=batch, do_sample=False
        )
        generator = og.Generator(model, params)
        start = time.perf_counter()
        generator.append_tokens(ids)
        times = []
        while not generator.is_done():
            generator.generate_next_token()
            times.append(time.perf_counter())
        return {
            "ttft_ms": 1000 * (times[0] - start),
            "prefill_tokens_per_s": batch * prompt_len / (times[0] - start),
            "decode_tokens_per_s": batch * (len(times) - 1) / (times[-1] - times[0]),
        }

    run(4)  # warm-up
    config = json.loads((Path(model_dir) / "genai_config.json").read_text())
    session = config.get("model", {}).get("decoder", {}).get("session_options", {})
    threads = session.get("intra_op_num_threads") or len(os.sched_getaffinity(0))
    print(json.dumps({"held_mb": _rss_mb() - before, "intra_op_threads": threads, "pid": os.getpid()}), flush=True)
    for line in sys.stdin:
        print(json.dumps(run(int(line))), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
