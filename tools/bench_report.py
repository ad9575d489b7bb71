"""What `llamatrt bench` prints, writes as JSON and plots; every figure comes from the same rounds.

The ceiling is honest: decode reads every weight once per step, so the measured read bandwidth
over a working set the size of the weights, divided by the weights' bytes, bounds the tokens per
second per row. A percentage above 100 would mean the bandwidth was measured wrong (a cache held
the working set between reductions), so it is shown as ">=100%" and the JSON says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamatrt.base.artifact.manifest import Manifest
from llamatrt.base.errors import InputError

BASELINE_LABELS = ("transformers", "onnxruntime-genai")  # runtime.bench's baselines label their runs so


def is_baseline(measured: Measured) -> bool:
    """Whether a measurement is the baseline's (its label names the other tool)."""
    return measured.label.startswith(BASELINE_LABELS)


@dataclass(frozen=True)
class Measured:
    artifact: str
    label: str
    kind: str  # "single" | "context" | "workload"
    context: int | None
    median: dict[str, float]
    spread: dict[str, tuple[float, float]]  # (min, max) over the rounds
    held_mb: float


def _cache_bytes(m: Manifest) -> int:
    itemsize = {"float32": 4, "float16": 2, "bfloat16": 2}[m.dtype]
    return (
        2 * m.config.num_layers * m.batch_size * m.config.num_kv_heads * m.max_cache_len * m.config.head_dim * itemsize
    )


@dataclass
class BenchReport:
    prompt_len: int
    new_tokens: int
    repeat: int
    bandwidth_gb_s: float  # median over the rounds, over a working set the size of the largest weights
    manifests: dict[str, Manifest]  # artifact name -> manifest
    measured: list[Measured]
    baseline: str | None = None
    notes: list[str] = field(default_factory=list)  # how things ran: threads, processes

    def _of(self, artifact: str, kind: str) -> list[Measured]:
        return [m for m in self.measured if m.artifact == artifact and m.kind == kind]

    def ceiling(self, artifact: str) -> float:
        manifest = self.manifests[artifact]
        return self.bandwidth_gb_s * 1e9 / manifest.weights_bytes * manifest.batch_size

    def percent_of_ceiling(self, artifact: str, tokens_per_s: float) -> float:
        return min(100.0, 100 * tokens_per_s / self.ceiling(artifact))

    def to_json(self) -> dict[str, Any]:
        runs = []
        first = None
        for artifact, manifest in self.manifests.items():
            singles = [m for m in self._of(artifact, "single") if not is_baseline(m)]
            base = next((m for m in self._of(artifact, "single") if is_baseline(m)), None)
            best = singles[0].median
            first = first or best["decode_tokens_per_s"]
            cache = _cache_bytes(manifest)
            run: dict[str, Any] = {
                "artifact": artifact,
                "batch": manifest.batch_size,
                "prompt_len": self.prompt_len,
                "new_tokens": self.new_tokens,
                "repeat": self.repeat,
                "weights_bytes": manifest.weights_bytes,
                "cache_bytes": cache,
                "bandwidth_gb_s": self.bandwidth_gb_s,
                "bandwidth_working_set_bytes": max(m.weights_bytes for m in self.manifests.values()),
                "ceiling_tokens_per_s": self.ceiling(artifact),
                "decode_tokens_per_s": best["decode_tokens_per_s"],
                "ttft_ms": best["ttft_ms"],
                "percent_of_ceiling": self.percent_of_ceiling(artifact, best["decode_tokens_per_s"]),
                "at_or_above_ceiling": best["decode_tokens_per_s"] >= self.ceiling(artifact),
                "aggregate_ratio_vs_first": best["decode_tokens_per_s"] / first,
                "backends": [self._entry(m, manifest, cache) for m in singles],
                "by_context": {m.label: {} for m in singles},
                "workload": [self._entry(m, manifest, cache) for m in self._of(artifact, "workload")],
            }
            for m in self._of(artifact, "context"):
                run["by_context"][m.label][str(m.context)] = m.median["decode_tokens_per_s"]
            for b in run["backends"]:
                b["by_context"] = run["by_context"][b["backend"]]
            if base is not None:
                run["baseline"] = self._entry(base, manifest, cache)
                run["baseline_decode_tokens_per_s"] = base.median["decode_tokens_per_s"]
                run["baseline_ratio"] = best["decode_tokens_per_s"] / base.median["decode_tokens_per_s"]
                run["baseline_ttft_ratio"] = best["ttft_ms"] / base.median["ttft_ms"]
            run["notes"] = list(self.notes)
            runs.append(run)
        return runs[0] if len(runs) == 1 else {"runs": runs}

    @staticmethod
    def _entry(m: Measured, manifest: Manifest, cache: int) -> dict[str, Any]:
        return {
            "backend": m.label,
            **m.median,
            "min_max": {k: list(v) for k, v in m.spread.items()},
            "held_mb": m.held_mb,
            "held_vs_weights_and_cache": m.held_mb * 2**20 / (manifest.weights_bytes + cache),
        }

    def __str__(self) -> str:
        working_set = max(m.weights_bytes for m in self.manifests.values())
        lines = [
            f"bench: prompt {self.prompt_len} tokens, {self.new_tokens} new tokens, median of {self.repeat} "
            f"interleaved rounds; read bandwidth {self.bandwidth_gb_s:.1f} GB/s over {working_set / 1e6:.0f} MB "
            "(the weights' size)"
        ]
        first = None
        for artifact, manifest in self.manifests.items():
            cache = _cache_bytes(manifest)
            lines += [
                "",
                f"{artifact}: batch {manifest.batch_size}, {manifest.weights_bytes / 1e6:.0f} MB of weights, "
                f"{cache / 1e6:.0f} MB of cache; ceiling {self.ceiling(artifact):.1f} tok/s",
            ]
            lines.append(
                f"{'run':<16} {'decode tok/s':>12} {'(min-max)':>15} {'% ceiling':>9} {'ttft ms':>8} "
                f"{'prefill tok/s':>13} {'held MB':>8} {'held/(w+c)':>10}"
            )
            singles = self._of(artifact, "single")
            for m in singles:
                d = m.median["decode_tokens_per_s"]
                lo, hi = m.spread["decode_tokens_per_s"]
                pct = self.percent_of_ceiling(artifact, d)
                shown = ">=100%" if pct >= 100 else f"{pct:.0f}%"
                ratio = m.held_mb * 2**20 / (manifest.weights_bytes + cache)
                lines.append(
                    f"{m.label:<16} {d:>12.1f} {f'({lo:.1f}-{hi:.1f})':>15} {shown:>9} {m.median['ttft_ms']:>8.1f} "
                    f"{m.median['prefill_tokens_per_s']:>13.0f} {m.held_mb:>8.0f} {ratio:>10.2f}"
                )
            base = next((m for m in singles if is_baseline(m)), None)
            ours = [m for m in singles if not is_baseline(m)]
            if base is not None:
                for m in ours:
                    lines.append(
                        f"{m.label} vs {base.label}, same rounds: decode "
                        f"{m.median['decode_tokens_per_s'] / base.median['decode_tokens_per_s']:.2f}x, "
                        f"time to first token {m.median['ttft_ms'] / base.median['ttft_ms']:.2f}x"
                    )
            first = first or ours[0].median["decode_tokens_per_s"]
            if len(self.manifests) > 1:
                lines.append(
                    f"aggregate decode {ours[0].median['decode_tokens_per_s'] / first:.2f}x the first artifact's"
                )
            for label in dict.fromkeys(m.label for m in self._of(artifact, "context")):
                by = {m.context: m.median for m in self._of(artifact, "context") if m.label == label}
                lines.append(
                    f"{label} decode tok/s after a prompt of N tokens: "
                    + ", ".join(f"{c}: {v['decode_tokens_per_s']:.1f}" for c, v in by.items())
                    + "; prefill tok/s: "
                    + ", ".join(f"{c}: {v['prefill_tokens_per_s']:.0f}" for c, v in by.items())
                )
            lines += self._workload_lines(artifact)
        lines += ["", *(f"note: {n}" for n in self.notes)] if self.notes else []
        return "\n".join(lines)

    def _workload_lines(self, artifact: str) -> list[str]:
        runs = self._of(artifact, "workload")
        if not runs:
            return []
        lines = [
            f"{'workload run':<36} {'output tok/s':>12} {'ttft p50 ms':>11} {'gap p50/p99 ms':>15} "
            f"{'decode step ms':>14} {'p99 gap/step':>12}"
        ]
        for m in runs:
            w = m.median
            gaps = f"{w['inter_token_p50_ms']:.1f}/{w['inter_token_p99_ms']:.1f}"
            lines.append(
                f"{m.label:<36} {w['output_tokens_per_s']:>12.1f} {w['ttft_p50_ms']:>11.0f} {gaps:>15} "
                f"{w['decode_step_p50_ms']:>14.1f} {w['inter_token_p99_ms'] / w['decode_step_p50_ms']:>12.2f}"
            )
        return lines


def plot_by_context(report: BenchReport, path: Path) -> str:
    """Decode tok/s against context length per artifact and backend, with the baseline and the
    ceiling, the model and the machine's bandwidth in the title (returned)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise InputError("--plot needs matplotlib; pip install matplotlib") from e
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for artifact in report.manifests:
        for label in dict.fromkeys(m.label for m in report._of(artifact, "context")):
            points = [
                (m.context, m.median["decode_tokens_per_s"])
                for m in report._of(artifact, "context")
                if m.label == label
            ]
            ax.plot(*zip(*points, strict=True), marker="o", label=f"{artifact} / {label}")
        base = next((m for m in report._of(artifact, "single") if is_baseline(m)), None)
        if base is not None:
            ax.axhline(
                base.median["decode_tokens_per_s"],
                linestyle=":",
                color="black",
                label=f"{artifact} / {base.label}, prompt {report.prompt_len}",
            )
        ax.axhline(report.ceiling(artifact), linestyle="--", color="gray", label=f"{artifact} bandwidth ceiling")
    source = next(iter(report.manifests.values())).source
    title = (
        f"{Path(source).name} ({', '.join(report.manifests)}): decode vs context, "
        f"{report.bandwidth_gb_s:.0f} GB/s measured"
    )
    ax.set(xlabel="context length (tokens)", ylabel="decode tokens/s", title=title)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return title
