"""`llamatrt bench`: decode speed as ratios against a baseline measured in the same run.

A batch-1 decode step must read every weight once, so memory bandwidth sets a ceiling:
weights bytes / bandwidth seconds per token. We measure the bandwidth here (a large array
reduction) and report the percentage of that ceiling each backend reaches.
"""

from __future__ import annotations

import contextlib
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from llamatrt.artifact.feeds import fixed_prompt
from llamatrt.errors import InputError
from llamatrt.progress import Progress, no_progress
from llamatrt.runtime.backend import Backend
from llamatrt.runtime.generator import Generator
from llamatrt.runtime.registry import open_backend

CONTEXT_TOKENS = 16  # tokens decoded after each --contexts prompt (1000 + 16 fits C = 1024)


@dataclass
class BackendBench:
    backend: str
    decode_tokens_per_s: float  # median over runs, all rows together
    decode_min: float
    decode_max: float
    ttft_ms: float  # median: prefill of the prompt to the first token
    prefill_tokens_per_s: float
    peak_rss_mb: float  # whole process, at the end of the run (every backend loaded)
    by_context: dict[int, float] = field(default_factory=dict)  # prompt length -> decode tok/s
    loaded_mb: float = 0.0  # resident memory this backend added: loading, first generation, cache


@dataclass
class BenchReport:
    artifact: str
    prompt_len: int
    new_tokens: int
    batch: int
    repeat: int
    bandwidth_gb_s: float
    weights_bytes: int
    results: list[BackendBench]
    baseline: BackendBench | None = None

    @property
    def ceiling_tokens_per_s(self) -> float:
        return self.bandwidth_gb_s * 1e9 / self.weights_bytes * self.batch

    def to_json(self) -> dict[str, Any]:
        best = self.results[0]
        out: dict[str, Any] = {
            "artifact": self.artifact, "prompt_len": self.prompt_len, "new_tokens": self.new_tokens,
            "batch": self.batch, "repeat": self.repeat,
            "decode_tokens_per_s": best.decode_tokens_per_s, "ttft_ms": best.ttft_ms,
            "ceiling_tokens_per_s": self.ceiling_tokens_per_s, "bandwidth_gb_s": self.bandwidth_gb_s,
            "percent_of_ceiling": 100 * best.decode_tokens_per_s / self.ceiling_tokens_per_s,
            "backends": [asdict(r) for r in self.results],
        }  # fmt: skip
        if self.baseline is not None:
            out["baseline"] = asdict(self.baseline)
            out["baseline_decode_tokens_per_s"] = self.baseline.decode_tokens_per_s
            out["baseline_ratio"] = best.decode_tokens_per_s / self.baseline.decode_tokens_per_s
        return out

    def __str__(self) -> str:
        lines = [f"bench {self.artifact}: batch {self.batch}, prompt {self.prompt_len}, {self.new_tokens} new tokens, "
                 f"median of {self.repeat} interleaved rounds; bandwidth {self.bandwidth_gb_s:.1f} GB/s -> ceiling "
                 f"{self.ceiling_tokens_per_s:.1f} tok/s ({self.weights_bytes / 1e6:.0f} MB of weights per step)"]  # fmt: skip
        header = f"{'backend':<14} {'decode tok/s':>12} {'(min-max)':>14} {'% ceiling':>9} {'ttft ms':>8} {'prefill tok/s':>13} {'held MB':>8}"
        lines.append(header)
        for r in [*self.results, *([self.baseline] if self.baseline else [])]:
            lines.append(f"{r.backend:<14} {r.decode_tokens_per_s:>12.1f} {f'({r.decode_min:.1f}-{r.decode_max:.1f})':>14} "
                         f"{100 * r.decode_tokens_per_s / self.ceiling_tokens_per_s:>8.0f}% {r.ttft_ms:>8.1f} "
                         f"{r.prefill_tokens_per_s:>13.0f} {r.loaded_mb:>8.0f}")  # fmt: skip
        if self.baseline is not None:
            for r in self.results:
                lines.append(f"{r.backend} decode is {r.decode_tokens_per_s / self.baseline.decode_tokens_per_s:.2f}x "
                             f"{self.baseline.backend}")  # fmt: skip
        for r in self.results:
            if r.by_context:
                lines.append(f"{r.backend} decode tok/s by context: "
                             + ", ".join(f"{c}: {v:.1f}" for c, v in r.by_context.items()))  # fmt: skip
        return "\n".join(lines)


def measure_bandwidth(megabytes: int = 512, repeat: int = 5) -> float:
    """Read bandwidth in GB/s: best of `repeat` full reductions over an array larger than any cache."""
    data = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return data.numel() * 4 / best / 1e9


def _rss_mb() -> float:
    """Resident memory now (Linux /proc), else the peak so far."""
    try:
        resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
        return resident_pages * resource.getpagesize() / 2**20
    except (OSError, ValueError, IndexError):
        return _peak_rss_mb()


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed_run(gen: Generator, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
    """(ttft seconds, decode tokens/s over all rows) of one greedy generation with no stop ids."""
    first = last = None
    count = 0
    for step in gen.stream(prompts, max_new_tokens=new_tokens):
        first = step.elapsed_s if first is None else first
        last = step.elapsed_s
        count += step.token_id is not None
    decoded = count - len(prompts)  # the first token of each row comes from prefill
    return first or 0.0, decoded / max((last or 0.0) - (first or 0.0), 1e-9)


@dataclass
class _Timed:
    """One thing to time (a backend on an artifact, or the transformers baseline) and its runs."""

    name: str
    run: Callable[[], tuple[float, float]]  # one timed generation -> (ttft s, decode tok/s)
    batch: int
    prefill_width: int  # tokens a prefill processes per row (the prompt, or a full chunk)
    runs: list[tuple[float, float]] = field(default_factory=list)
    loaded_mb: float = 0.0

    def result(self, by_context: dict[int, float] | None = None) -> BackendBench:
        ttft = statistics.median(r[0] for r in self.runs)
        decode = [r[1] for r in self.runs]
        return BackendBench(self.name, statistics.median(decode), min(decode), max(decode), 1000 * ttft,
                            self.batch * self.prefill_width / ttft, _peak_rss_mb(), by_context or {},
                            self.loaded_mb)  # fmt: skip


def _backend_timer(backend: Backend, prompt_len: int, new_tokens: int, contexts: Sequence[int]) -> _Timed:
    manifest = backend.manifest
    batch = manifest.batch_size
    if (
        prompt_len + new_tokens > manifest.max_cache_len
        or max(contexts, default=0) + CONTEXT_TOKENS > manifest.max_cache_len
    ):
        raise InputError(f"prompt plus new tokens exceed the cache of {manifest.max_cache_len}; lower --prompt-len, "
                         "--new-tokens or --contexts")  # fmt: skip
    gen = Generator(backend)  # no stop ids: always generates new_tokens
    prompts = fixed_prompt(batch, prompt_len, manifest.config.vocab_size).tolist()
    gen.generate(prompts, max_new_tokens=4)  # warm-up: sessions, allocations, caches
    return _Timed(backend.name, lambda: _timed_run(gen, prompts, new_tokens), batch,
                  max(prompt_len, manifest.prefill_chunk))  # fmt: skip


def _by_context(backend: Backend, contexts: Sequence[int], repeat: int) -> dict[int, float]:
    """Decode tok/s right after prompts of each length (CONTEXT_TOKENS decoded), the lengths
    interleaved in `repeat` rounds (at least 3) so they see the same host conditions; medians."""
    gen, manifest = Generator(backend), backend.manifest
    prompts = {n: fixed_prompt(manifest.batch_size, n, manifest.config.vocab_size).tolist() for n in contexts}
    speeds: dict[int, list[float]] = {n: [] for n in contexts}
    for _ in range(max(3, repeat)):
        for length, rows in prompts.items():
            speeds[length].append(_timed_run(gen, rows, CONTEXT_TOKENS)[1])
    return {length: statistics.median(values) for length, values in speeds.items()}


def _transformers_timer(source: str, batch: int, prompt_len: int, new_tokens: int, vocab: int) -> _Timed:
    """transformers eager `generate` on the same weights, timed per step by a logits-processor hook."""
    from transformers import LlamaForCausalLM, LogitsProcessor, LogitsProcessorList

    from llamatrt.models.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(source)
    if checkpoint.hf_dir is None:
        raise InputError("the transformers baseline needs a checkpoint on disk; export from smollm2, an HF folder "
                         "or a .gguf, or drop --baseline")  # fmt: skip
    model = LlamaForCausalLM.from_pretrained(checkpoint.hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    ids = fixed_prompt(batch, prompt_len, vocab)

    class Clock(LogitsProcessor):
        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            self.times.append(time.perf_counter())
            return scores

    def run(tokens: int = new_tokens) -> tuple[float, float]:
        clock = Clock()
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, min_new_tokens=tokens,
                           do_sample=False, pad_token_id=0, logits_processor=LogitsProcessorList([clock]))  # fmt: skip
        t = clock.times
        return t[0] - start, batch * (len(t) - 1) / (t[-1] - t[0])

    run(4)  # warm-up
    return _Timed("transformers", run, batch, prompt_len)


def run_benches(
    artifacts: Sequence[str | Path], backends: Sequence[str] = ("onnxruntime",), prompt_len: int = 20,
    new_tokens: int = 128, repeat: int = 3, baseline: str | None = None, contexts: Sequence[int] = (),
    progress: Progress | None = None,
) -> list[BenchReport]:  # fmt: skip
    """Every backend on every artifact (plus the baseline per artifact), timed in `repeat` rounds:
    each round runs each of them once, in turn, so drift in the host's speed (its read bandwidth can
    move by a factor of two within minutes) lands on all of them alike and the ratios between them hold. Decode-vs-context runs on the first artifact."""
    if repeat < 1 or new_tokens < 2 or prompt_len < 1:
        raise InputError("--repeat must be >= 1, --new-tokens >= 2 and --prompt-len >= 1; raise the one that is lower")
    if baseline not in (None, "transformers"):
        raise InputError(f"unknown baseline {baseline!r}; the one baseline is `transformers`")
    step = progress or no_progress
    with contextlib.ExitStack() as stack:
        opened: list[tuple[Path, list[Backend], list[_Timed], _Timed | None]] = []
        for artifact in artifacts:
            step(f"loading {Path(artifact).name}")
            handles, timers = [], []
            for kind in backends:
                before = _rss_mb()
                # the feed check is not part of what we time (the generator's feeds are the contract's)
                handles.append(stack.enter_context(open_backend(artifact, kind, check_feeds=False)))
                timers.append(_backend_timer(handles[-1], prompt_len, new_tokens, contexts))
                timers[-1].loaded_mb = _rss_mb() - before
            manifest = handles[0].manifest
            base = None
            if baseline:
                before = _rss_mb()
                base = _transformers_timer(manifest.source, manifest.batch_size, prompt_len, new_tokens,
                                           manifest.config.vocab_size)  # fmt: skip
                base.loaded_mb = _rss_mb() - before
            opened.append((Path(artifact), handles, timers, base))
        bandwidths = []
        for round_index in range(repeat):
            step(f"round {round_index + 1} of {repeat}")
            bandwidths.append(measure_bandwidth())
            for _, _, timers, base in opened:
                for timer in [*timers, *([base] if base else [])]:
                    timer.runs.append(timer.run())
        by_context = [_by_context(b, contexts, repeat) for b in opened[0][1]] if contexts else []
        bandwidth = statistics.median(bandwidths)
        reports = []
        for i, (artifact, handles, timers, base) in enumerate(opened):
            results = [t.result(by_context[k] if i == 0 and by_context else None) for k, t in enumerate(timers)]
            manifest = handles[0].manifest
            reports.append(BenchReport(str(artifact), prompt_len, new_tokens, manifest.batch_size, repeat, bandwidth,
                                       manifest.weights_bytes, results, base.result() if base else None))  # fmt: skip
    return reports


def bench_steps(artifacts: int, repeat: int) -> int:
    """Progress steps of run_benches: loading each artifact, then each round."""
    return artifacts + repeat


def plot_by_context(report: BenchReport, path: Path) -> None:
    """Decode tok/s against context length, one line per backend."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise InputError("--plot needs matplotlib; pip install matplotlib") from e
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in report.results:
        if r.by_context:
            ax.plot(list(r.by_context), list(r.by_context.values()), marker="o", label=r.backend)
    ax.axhline(report.ceiling_tokens_per_s, linestyle="--", color="gray", label="bandwidth ceiling")
    ax.set(xlabel="context length (tokens)", ylabel="decode tokens/s", title=f"decode speed, batch {report.batch}")
    ax.set_ylim(bottom=0)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
