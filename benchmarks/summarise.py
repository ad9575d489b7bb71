"""Print the README's figures from a `llamatrt bench --json` run of a batch-1 and a batch-4 artifact."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(path: str) -> None:
    b1, b4 = json.loads(Path(path).read_text())["runs"]
    ctx = b1["backends"][0]["by_context"]
    print(
        f"batch 1: decode {b1['decode_tokens_per_s']:.1f} tok/s = {b1['baseline_ratio']:.2f}x transformers "
        f"({b1['baseline_decode_tokens_per_s']:.1f}); {b1['percent_of_ceiling']:.0f}% of the "
        f"{b1['ceiling_tokens_per_s']:.1f} tok/s ceiling ({b1['bandwidth_gb_s']:.1f} GB/s)"
    )
    print(
        f"batch 1: 20-token prompt TTFT {b1['ttft_ms']:.1f} ms = {b1['baseline_ttft_ratio']:.2f}x transformers "
        f"({b1['baseline']['ttft_ms']:.1f} ms)"
    )
    print(
        f"decode at context 1000 vs 100: {ctx['1000']:.1f} vs {ctx['100']:.1f} tok/s ({ctx['1000'] / ctx['100']:.2f}); "
        f"1000-token prefill {b1['backends'][0]['min_max']['prefill_tokens_per_s']} tok/s (min, max over rounds)"
    )
    print(
        f"batch 4: {b4['decode_tokens_per_s']:.1f} tok/s aggregate = {b4['aggregate_ratio_vs_first']:.2f}x batch 1; "
        f"{b4['baseline_ratio']:.2f}x transformers batch 4"
    )
    for run in (b1, b4):
        b = run["backends"][0]
        print(
            f"batch {run['batch']}: held {b['held_mb']:.0f} MB = {b['held_vs_weights_and_cache']:.2f}x "
            f"(weights {run['weights_bytes'] / 2**20:.0f} MiB + cache {run['cache_bytes'] / 2**20:.0f} MiB)"
        )
    one = b1["workload"][0]
    cont, lock = b4["workload"]
    print(
        f"workload: in-flight B=4 {cont['output_tokens_per_s']:.1f} tok/s = {cont['output_tokens_per_s'] / lock['output_tokens_per_s']:.2f}x "
        f"lockstep batches of 4 ({lock['output_tokens_per_s']:.1f}) and {cont['output_tokens_per_s'] / one['output_tokens_per_s']:.2f}x "
        f"one at a time on B=1 ({one['output_tokens_per_s']:.1f})"
    )
    print(
        f"workload in-flight: inter-token p50/p99 {cont['inter_token_p50_ms']:.1f}/{cont['inter_token_p99_ms']:.1f} ms, "
        f"median decode step {cont['decode_step_p50_ms']:.1f} ms: p99 = {cont['inter_token_p99_ms'] / cont['decode_step_p50_ms']:.2f}x; "
        f"TTFT p50 {cont['ttft_p50_ms']:.0f} ms"
    )


if __name__ == "__main__":
    main(sys.argv[1])
