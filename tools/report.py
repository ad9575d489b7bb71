"""AccuracyReport: per-stage metrics, contract checks, thresholds by precision, and the verdict.

`bool(report)` is "passed under these thresholds"; `str(report)` is the terminal table;
`to_json()` / `to_markdown()` are the files `llamatrt diff --json/--report` write.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from llamatrt.base.artifact.precision import Thresholds, stage_thresholds

DIVERGE = (
    "the first step at which the stage's free-running greedy tokens differ from transformers' on any prompt "
    "(each side continues its own answer; none: equal for every step)"
)


@dataclass
class StageResult:
    name: str
    dtype: str
    max_abs: float
    mean_abs: float
    min_cosine: float
    max_kl: float
    top1: float
    top5: float
    first_divergence: int | None  # first step where free-running greedy tokens differ; None: never
    perplexity: float
    perplexity_rel: float
    passed: bool
    failures: list[str]
    per_step: dict[str, list[float]] = field(repr=False)

    @classmethod
    def summarise(
        cls,
        name: str,
        dtype: str,
        per_step: dict[str, list[float]],
        first_divergence: int | None,
        ppl: float,
        ppl_ref: float,
        t: Thresholds,
    ) -> StageResult:
        top1 = sum(per_step["top1"]) / len(per_step["top1"])
        max_abs, max_kl, rel = max(per_step["max_abs"]), max(per_step["kl"]), abs(ppl - ppl_ref) / ppl_ref
        failures = []
        if not max_abs <= t.max_abs:
            worst = per_step["max_abs"].index(max_abs)
            failures.append(f"max abs logits error {max_abs:.3g} > {t.max_abs:g} (worst at step {worst})")
        if not max_kl <= t.max_kl:
            failures.append(f"KL divergence {max_kl:.3g} > {t.max_kl:g}")
        if top1 < t.min_top1:
            first_bad = next(i for i, v in enumerate(per_step["top1"]) if v < 1.0)
            failures.append(f"top-1 agreement {top1:.3f} < {t.min_top1:g} (first disagreement at step {first_bad})")
        if t.greedy_must_match and first_divergence is not None:
            failures.append(f"greedy tokens diverge at step {first_divergence}")
        if not rel <= t.max_ppl_rel:
            failures.append(f"perplexity {ppl:.4g} vs reference {ppl_ref:.4g} (relative {rel:.2g} > {t.max_ppl_rel:g})")
        return cls(
            name,
            dtype,
            max_abs,
            sum(per_step["mean_abs"]) / len(per_step["mean_abs"]),
            min(per_step["cosine"]),
            max_kl,
            top1,
            sum(per_step["top5"]) / len(per_step["top5"]),
            first_divergence,
            ppl,
            rel,
            not failures,
            failures,
            per_step,
        )


@dataclass
class CheckResult:
    name: str
    passed: bool
    detail: str


@dataclass
class AccuracyReport:
    artifact: str
    reference: str
    precision: str
    prompts: int
    steps: int
    reference_perplexity: float
    stages: list[StageResult]
    checks: list[CheckResult]
    notes: list[str] = field(default_factory=list)  # what the diff changed to fit (a cut built-in prompt)

    def __bool__(self) -> bool:
        return all(s.passed for s in self.stages) and all(c.passed for c in self.checks)

    @property
    def thresholds(self) -> dict[str, Thresholds]:
        return {s.dtype: stage_thresholds(s.dtype) for s in self.stages}

    def to_json(self) -> dict[str, Any]:
        return {
            "passed": bool(self),
            "artifact": self.artifact,
            "reference": self.reference,
            "precision": self.precision,
            "prompts": self.prompts,
            "steps": self.steps,
            "reference_perplexity": self.reference_perplexity,
            "thresholds": {k: asdict(v) for k, v in self.thresholds.items()},
            "stages": [asdict(s) for s in self.stages],
            "checks": [asdict(c) for c in self.checks],
            "notes": list(self.notes),
        }

    def _rows(self) -> list[list[str]]:
        rows = [["stage", "dtype", "max |Δ|", "mean |Δ|", "cos", "KL", "top1", "top5", "diverge@", "ppl", "verdict"]]
        rows.append(
            [
                "transformers",
                "float32",
                "-",
                "-",
                "-",
                "-",
                "-",
                "-",
                "-",
                f"{self.reference_perplexity:.4g}",
                "reference",
            ]
        )
        for s in self.stages:
            rows.append(
                [
                    s.name,
                    s.dtype,
                    f"{s.max_abs:.2e}",
                    f"{s.mean_abs:.2e}",
                    f"{s.min_cosine:.6f}",
                    f"{s.max_kl:.1e}",
                    f"{s.top1:.3f}",
                    f"{s.top5:.3f}",
                    "none" if s.first_divergence is None else str(s.first_divergence),
                    f"{s.perplexity:.4g}",
                    "PASS" if s.passed else "FAIL",
                ]
            )
        return rows

    def __str__(self) -> str:
        rows = self._rows()
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [
            f"accuracy of {self.artifact} vs transformers on {self.reference} "
            f"({self.prompts} prompts, prefill + {self.steps} teacher-forced steps)"
        ]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
        lines += [f"  {s.name}: {f}" for s in self.stages for f in s.failures]
        lines += [f"check {'PASS' if c.passed else 'FAIL'}  {c.name}: {c.detail}" for c in self.checks]
        for dtype, t in self.thresholds.items():
            lines.append(
                f"thresholds ({dtype}): max |Δ| <= {t.max_abs:g}, KL <= {t.max_kl:g}, top-1 >= {t.min_top1:g}, "
                f"perplexity rel <= {t.max_ppl_rel:g}, greedy tokens {'must match' if t.greedy_must_match else 'reported'}"
            )
        lines.append(f"diverge@: {DIVERGE}")
        lines += [f"note: {n}" for n in self.notes]
        lines.append(f"verdict: {'PASS' if self else 'FAIL'}")
        return "\n".join(lines)

    def to_markdown(self) -> str:
        """The report as GitHub-flavoured Markdown; every cell's pipes are escaped, so the tables render."""
        rows = self._rows()
        verdict = "PASS" if self else "FAIL"
        out = [
            f"# Accuracy report: `{self.artifact}`",
            "",
            f"Reference: transformers `LlamaForCausalLM` on `{self.reference}`; {self.prompts} prompts, "
            f"prefill + {self.steps} teacher-forced decode steps. **Verdict: {verdict}**",
            "",
            _md_row(rows[0]),
            "|" + "---|" * len(rows[0]),
        ]
        out += [_md_row(r) for r in rows[1:]]
        out += ["", f"diverge@: {_md(DIVERGE)}"]
        failures = [f"- {_md(s.name)}: {_md(f)}" for s in self.stages for f in s.failures]
        out += ["", "## Failures", "", *failures] if failures else []
        out += [
            "",
            "## Thresholds applied",
            "",
            _md_row(["dtype", "max |Δ| ≤", "max KL ≤", "top-1 ≥", "ppl rel ≤", "greedy must match"]),
            "|---|---|---|---|---|---|",
        ]
        for dtype, t in self.thresholds.items():
            out.append(
                _md_row(
                    [
                        dtype,
                        f"{t.max_abs:g}",
                        f"{t.max_kl:g}",
                        f"{t.min_top1:g}",
                        f"{t.max_ppl_rel:g}",
                        "yes" if t.greedy_must_match else "no",
                    ]
                )
            )
        out += ["", "## Contract checks", "", "| check | result | detail |", "|---|---|---|"]
        out += [_md_row([c.name, "PASS" if c.passed else "FAIL", c.detail]) for c in self.checks]
        if self.notes:
            out += ["", "## Notes", "", *(f"- {_md(n)}" for n in self.notes)]
        return "\n".join(out) + "\n"


def _md(text: str) -> str:
    """Escape what would end a Markdown table cell or start markup."""
    return text.replace("\\", "\\\\").replace("|", "\\|")


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(_md(c) for c in cells) + " |"
