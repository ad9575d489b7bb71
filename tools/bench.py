"""`llamatrt bench`: every figure of one report measured in the same interleaved rounds.

Each round first measures the machine's read bandwidth over a working set the size of the weights
(what a decode step reads), then runs every timed thing once, in turn: each backend on each
artifact (a generation of --prompt-len + --new-tokens, one per --contexts length, and the --workload
mix, continuous and, on batch > 1, in lockstep batches), and the baseline. Host speed drifts within
minutes; interleaving lands the drift on all of them alike, so the ratios between them hold.
Medians over the rounds are reported.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llamatrt.base.artifact.feeds import fixed_prompt
from llamatrt.base.artifact.manifest import Manifest
from llamatrt.base.errors import InputError
from llamatrt.base.heap import trim_heap
from llamatrt.base.progress import Progress, no_progress
from llamatrt.runtime.backend import Backend
from llamatrt.runtime.generator import Generator
from llamatrt.runtime.ort_backend import physical_cores
from llamatrt.runtime.registry import canonical_backend_name, open_backend
from llamatrt.tools.bench_report import BenchReport, Measured
from llamatrt.tools.bench_workload import mixed_workload, run_workload, workload_scheduler

BASELINES = ("transformers", "onnxruntime-genai")
SETTLE_S = 0.05
CONTEXT_TOKENS = 24  # tokens decoded after each --contexts prompt (at most --new-tokens; 1000 + 24 fits C = 1024)


@dataclass
class _Timed:
    """One thing to time each round, and its runs."""

    artifact: str
    label: str  # "onnxruntime", "transformers", "workload continuous", ...
    kind: str  # "single" | "context" | "workload"
    run: Callable[[], dict[str, float]]
    context: int | None = None
    held_mb: float | None = None  # None: measured around its loading, in this process
    runs: list[dict[str, float]] = field(default_factory=list)
    note: str | None = None  # how it ran, for the report

    def measured(self) -> Measured:
        keys = self.runs[0].keys()
        median = {k: statistics.median(r[k] for r in self.runs) for k in keys}
        spread = {k: (min(r[k] for r in self.runs), max(r[k] for r in self.runs)) for k in keys}
        return Measured(self.artifact, self.label, self.kind, self.context, median, spread, self.held_mb or 0.0)


def measure_bandwidth(nbytes: int, repeat: int = 3) -> float:
    """Read bandwidth in GB/s over `nbytes` (best of `repeat` full reductions): the bytes a decode
    step reads, so on a machine whose caches hold much of the weights it measures those caches too."""
    data = torch.ones(max(nbytes // 4, 1 << 16), dtype=torch.float32)
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return data.numel() * 4 / best / 1e9


def _rss_mb() -> float:
    """Resident memory now (Linux /proc), else the peak so far. Garbage is collected and the C heap's
    free pages handed back first (glibc's malloc_trim), so memory freed late by what ran before is
    neither counted against what loads next nor given back during its window (which made a small
    artifact's difference come out below zero)."""
    gc.collect()
    trim_heap()
    try:
        resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
        return resident_pages * resource.getpagesize() / 2**20
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _load_libraries(backends: Sequence[str]) -> None:
    """Load ONNX Runtime's library and make one session before any memory is measured: its one-time
    cost (tens of MB, paid once per process) is not the first artifact's to hold."""
    if "onnxruntime" not in {canonical_backend_name(b) for b in backends}:
        return
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    value = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "warm-up",
        [value],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": np.zeros(1, np.float32)}
    )


def _generation(gen: Generator, prompts: list[list[int]], new_tokens: int) -> dict[str, float]:
    """One greedy generation of every row (no stop ids): time to first token (the median row), prefill
    tokens/s, and aggregate decode tokens/s once every row is decoding."""
    firsts: dict[int, float] = {}
    times: list[float] = []
    for step in gen.stream(prompts, max_new_tokens=new_tokens, fit="refuse"):
        firsts.setdefault(step.index, step.elapsed_s)
        if step.token_id is not None:
            times.append(step.elapsed_s)
    started = max(firsts.values())  # from here on every row decodes
    later = [t for t in times if t > started]
    ttft = statistics.median(firsts.values())
    return {
        "ttft_ms": 1000 * ttft,
        "prefill_tokens_per_s": sum(map(len, prompts)) / max(firsts.values()),
        "decode_tokens_per_s": len(later) / max(times[-1] - started, 1e-9),
    }


def _backend_timers(
    backend: Backend, artifact: str, prompt_len: int, new_tokens: int, contexts: Sequence[int], workload: int
) -> list[_Timed]:
    manifest = backend.manifest
    batch, vocab, capacity = manifest.batch_size, manifest.config.vocab_size, manifest.max_cache_len
    sizes = backend.seq_sizes("prefill", batch=1)
    pad = sizes[0] - 1 if sizes else 0  # the most padding a static prefill adds
    context_tokens = min(CONTEXT_TOKENS, new_tokens)
    if prompt_len + new_tokens + pad - 1 > capacity or max(contexts, default=0) + context_tokens + pad - 1 > capacity:
        raise InputError(
            f"prompt plus new tokens exceed the cache of {capacity}; lower --prompt-len, --new-tokens or --contexts"
        )
    gen = Generator(backend)  # no stop ids: always generates what is asked
    prompts = fixed_prompt(batch, prompt_len, vocab).tolist()
    timers = [_Timed(artifact, backend.name, "single", lambda: _generation(gen, prompts, new_tokens))]
    for length in contexts:
        rows = fixed_prompt(batch, length, vocab).tolist()
        timers.append(
            _Timed(
                artifact,
                backend.name,
                "context",
                functools.partial(_generation, gen, rows, context_tokens),
                context=length,
            )
        )
    if workload:
        mix = mixed_workload(workload, vocab, capacity)
        for admission in ("continuous", "lockstep") if batch > 1 else ("continuous",):
            label = f"{backend.name} workload {admission}" if batch > 1 else f"{backend.name} workload one at a time"
            # a scheduler (and cache) per run, made before run_workload's clock starts: held memory is
            # the Generator's one cache, not three
            run = lambda a=admission: run_workload(*workload_scheduler(backend, a), mix)  # noqa: E731
            timers.append(_Timed(artifact, label, "workload", run))
    gen.generate(prompts, max_new_tokens=4)  # warm-up: sessions, allocations, caches
    return timers


def _source_dir(manifest: Manifest) -> Path:
    """The HF folder of the artifact's checkpoint: what a baseline loads or builds from."""
    from llamatrt.models.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(manifest.source)
    if checkpoint.hf_dir is None:
        raise InputError(
            "a baseline needs the artifact's checkpoint on disk; export from smollm2, an HF folder "
            "or a .gguf, or drop --baseline"
        )
    return checkpoint.hf_dir


def _genai_timer(manifest: Manifest, artifact: str, prompt_len: int, new_tokens: int) -> _Timed:
    """onnxruntime-genai's own model of the same checkpoint, at the artifact's precision."""
    from llamatrt.tools.bench_genai import genai_model, genai_precision, genai_timer_run

    precision = genai_precision(manifest)
    model = genai_model(_source_dir(manifest), precision)
    run = genai_timer_run(model, manifest.batch_size, prompt_len, new_tokens, manifest.config.vocab_size)
    timed = _Timed(artifact, f"onnxruntime-genai {precision}", "single", run, held_mb=run.info["held_mb"])
    timed.note = (
        f"onnxruntime-genai runs in its own process (pid {run.info['pid']}) with its default "
        f"{run.info['intra_op_threads']} intra-op threads"
    )
    return timed


def _transformers_timer(manifest: Manifest, artifact: str, prompt_len: int, new_tokens: int) -> _Timed:
    """transformers eager `generate` on the same weights, timed per step by a logits-processor hook."""
    from transformers import LlamaForCausalLM, LogitsProcessor, LogitsProcessorList

    batch = manifest.batch_size
    model = LlamaForCausalLM.from_pretrained(
        _source_dir(manifest), dtype=torch.float32, attn_implementation="eager"
    ).eval()
    ids = fixed_prompt(batch, prompt_len, manifest.config.vocab_size)

    class Clock(LogitsProcessor):
        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            self.times.append(time.perf_counter())
            return scores

    def run(tokens: int = new_tokens) -> dict[str, float]:
        clock = Clock()
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
                pad_token_id=0,
                logits_processor=LogitsProcessorList([clock]),
            )
        t = clock.times
        return {
            "ttft_ms": 1000 * (t[0] - start),
            "prefill_tokens_per_s": batch * prompt_len / (t[0] - start),
            "decode_tokens_per_s": batch * (len(t) - 1) / (t[-1] - t[0]),
        }

    run(4)  # warm-up
    return _Timed(artifact, "transformers", "single", run)


def run_benches(
    artifacts: Sequence[str | Path],
    backends: Sequence[str] = ("onnxruntime",),
    prompt_len: int = 20,
    new_tokens: int = 128,
    repeat: int = 3,
    baseline: str | None = None,
    contexts: Sequence[int] = (),
    workload: int = 0,
    progress: Progress = no_progress,
    verify: bool = True,
) -> BenchReport:
    """Every backend on every artifact (and the baseline per artifact), in `repeat` interleaved rounds."""
    if repeat < 1 or new_tokens < 2 or prompt_len < 1 or workload < 0:
        raise InputError(
            "--repeat must be >= 1, --new-tokens >= 2, --prompt-len >= 1 and --workload >= 0; raise the "
            "one that is lower"
        )
    if baseline not in (None, *BASELINES):
        raise InputError(f"unknown baseline {baseline!r}; use one of {', '.join(BASELINES)}")
    _load_libraries(backends)
    with contextlib.ExitStack() as stack:
        timers: list[_Timed] = []
        manifests = []
        for artifact in artifacts:
            name = Path(artifact).name
            progress(f"loading {name}")
            for k, kind in enumerate(backends):
                before = _rss_mb()
                backend = stack.enter_context(open_backend(artifact, kind, check_feeds=False, verify=verify))
                mix = workload if k == 0 else 0  # the workload runs on the first backend only (it is long)
                added = _backend_timers(backend, name, prompt_len, new_tokens, contexts, mix)
                held = _rss_mb() - before
                for timer in added:
                    timer.held_mb = held
                timers += added
            manifest = backend.manifest
            manifests.append((name, manifest))
            if baseline:
                before = _rss_mb()
                make = _transformers_timer if baseline == "transformers" else _genai_timer
                base = make(manifest, name, prompt_len, new_tokens)
                if base.held_mb is None:
                    base.held_mb = _rss_mb() - before
                timers.append(base)
        weights = max(m.weights_bytes for _, m in manifests)
        bandwidths = []
        for round_index in range(repeat):
            progress(f"round {round_index + 1} of {repeat}")
            bandwidths.append(measure_bandwidth(weights))
            for timer in timers:
                time.sleep(SETTLE_S)  # the previous run's spinning worker threads go idle first
                timer.runs.append(timer.run())
    threads = (
        f"llamatrt runs ONNX Runtime with {physical_cores()} intra-op threads and its loop's torch work on one thread"
    )
    notes = [threads, *dict.fromkeys(t.note for t in timers if t.note)]
    return BenchReport(
        prompt_len,
        new_tokens,
        repeat,
        statistics.median(bandwidths),
        dict(manifests),
        [t.measured() for t in timers],
        baseline,
        notes,
    )


def bench_steps(artifacts: int, repeat: int) -> int:
    """Progress steps of run_benches: loading each artifact, then each round."""
    return artifacts + repeat
