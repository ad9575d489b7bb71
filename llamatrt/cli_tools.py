"""`llamatrt diff` and `llamatrt bench`: thin wrappers over runtime/."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from llamatrt.errors import InputError
from llamatrt.progress import StepBar
from llamatrt.runtime.registry import DEFAULT_BACKEND, backend_choices

BACKEND_CHOICE = click.Choice(backend_choices())


def _read_prompts(path: Path | None) -> list[tuple[bool, str]] | None:
    """One prompt per line; a line starting with `chat:` is wrapped in the chat template."""
    if path is None:
        return None
    try:
        lines = [line.rstrip("\n") for line in path.read_text().splitlines() if line.strip()]
    except OSError as e:
        raise InputError(
            f"cannot read --prompts {path} ({e.strerror}); give a text file with one prompt per line"
        ) from e
    if not lines:
        raise InputError(f"--prompts {path} has no prompts; give one prompt per line")
    return [(True, line[5:].strip()) if line.startswith("chat:") else (False, line) for line in lines]


@click.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--reference", default=None, help="Checkpoint for transformers (default: the one exported).")
@click.option("--backend", "backends", multiple=True, default=(DEFAULT_BACKEND,), show_default=True,
              type=BACKEND_CHOICE, help="Backend to run the artifact on (repeatable); ort = onnxruntime.")  # fmt: skip
@click.option("--prompts", "prompts_file", type=click.Path(path_type=Path), default=None,
              help="Text file, one prompt per line; prefix `chat:` for chat prompts.")  # fmt: skip
@click.option("--steps", type=int, default=16, show_default=True, help="Teacher-forced decode steps.")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report instead of the table.")
@click.option("--report", "report_path", type=click.Path(path_type=Path), default=None, help="Write a Markdown report.")
def diff(artifact: Path, reference: str | None, backends: tuple[str, ...], prompts_file: Path | None, steps: int,
         as_json: bool, report_path: Path | None) -> None:  # fmt: skip
    """Compare an artifact with transformers and StaticLlama; exit 0 only if every check passes."""
    from llamatrt.runtime.compare import run_diff

    prompts = _read_prompts(prompts_file)
    with StepBar(3 + 2 * len(backends), "diff") as bar:
        report = run_diff(artifact, backends, reference, prompts, steps, progress=bar)
    click.echo(json.dumps(report.to_json(), indent=2) if as_json else str(report))
    if report_path is not None:
        report_path.write_text(report.to_markdown())
    sys.exit(0 if report else 1)


def _parse_contexts(text: str | None) -> list[int]:
    if not text:
        return []
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError as e:
        raise InputError(f"--contexts {text!r} is not a comma-separated list of token counts, e.g. 128,512,1000") from e


@click.command()
@click.argument("artifacts", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--backend", "backends", multiple=True, default=(DEFAULT_BACKEND,), show_default=True,
              type=BACKEND_CHOICE, help="Backend to run the artifact on (repeatable); ort = onnxruntime.")  # fmt: skip
@click.option("--prompt-len", type=int, default=20, show_default=True)
@click.option("--new-tokens", type=int, default=128, show_default=True)
@click.option("--batch", type=int, default=None, help="Must equal the artifact's batch (shapes are static).")
@click.option(
    "--repeat",
    type=int,
    default=3,
    show_default=True,
    help="Timed rounds after a warm-up, each running every artifact, backend and baseline once in turn; medians reported.",
)
@click.option("--baseline", type=click.Choice(["transformers"]), default=None, help="Measure it in the same run.")
@click.option("--contexts", default=None, help="Prompt lengths for decode-vs-context, e.g. 128,512,1000.")
@click.option(
    "--plot", "plot_path", type=click.Path(path_type=Path), default=None, help="PNG of decode tok/s vs context."
)
@click.option("--json", "as_json", is_flag=True)
def bench(artifacts: tuple[Path, ...], backends: tuple[str, ...], prompt_len: int, new_tokens: int, batch: int | None,
          repeat: int, baseline: str | None, contexts: str | None, plot_path: Path | None, as_json: bool) -> None:  # fmt: skip
    """Time to first token, prefill and decode speed, % of the memory-bandwidth ceiling, baseline ratio.

    Several ARTIFACTS (e.g. batch 1 and batch 4 exports) are measured in the same run, and each one's
    aggregate decode speed is reported as a ratio to the first's."""
    from llamatrt.artifact.reader import read_manifest
    from llamatrt.runtime.bench import bench_steps, plot_by_context, run_benches

    manifest = read_manifest(artifacts[0], verify=False)
    if batch is not None and batch != manifest.batch_size:
        raise InputError(f"--batch {batch} but {artifacts[0]} was exported with batch {manifest.batch_size}; "
                         f"re-export with --batch {batch}")  # fmt: skip
    lengths = _parse_contexts(contexts)
    if plot_path is not None and not lengths:
        top = manifest.max_cache_len - 40
        lengths = sorted({min(n, top) for n in (128, 256, 512, top)})
    with StepBar(bench_steps(len(artifacts), repeat), "bench") as bar:
        reports = run_benches(artifacts, backends, prompt_len, new_tokens, repeat, baseline, lengths, progress=bar)
    first = reports[0].results[0].decode_tokens_per_s
    if as_json:
        payloads = [r.to_json() for r in reports]
        for payload in payloads:
            payload["aggregate_ratio_vs_first"] = payload["decode_tokens_per_s"] / first
        click.echo(json.dumps(payloads[0] if len(payloads) == 1 else {"runs": payloads}, indent=2))
    else:
        click.echo("\n\n".join(str(r) for r in reports))
        for r in reports[1:]:
            click.echo(f"{r.artifact} (batch {r.batch}) aggregate decode is {r.results[0].decode_tokens_per_s / first:.2f}x "
                       f"{reports[0].artifact} (batch {reports[0].batch}), same run")  # fmt: skip
    if plot_path is not None:
        plot_by_context(reports[0], plot_path)
