"""`llamatrt diff`, `llamatrt bench` and `llamatrt verify`: thin wrappers over runtime/ and the artifact reader."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import click

from llamatrt.base.errors import InputError
from llamatrt.base.progress import StepBar
from llamatrt.cli_options import backend_option, verify_option


def _read_prompts(path: Path | None) -> list[tuple[bool, str]] | None:
    """One prompt per line; a line starting with `chat:` is wrapped in the chat template."""
    if path is None:
        return None
    try:
        lines = [line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except OSError as e:
        raise InputError(
            f"cannot read --prompts {path} ({e.strerror}); give a text file with one prompt per line"
        ) from e
    except UnicodeDecodeError as e:
        raise InputError(
            f"--prompts {path} is not UTF-8 text (byte {e.start}); give a text file with one prompt per line"
        ) from e
    if not lines:
        raise InputError(f"--prompts {path} has no prompts; give one prompt per line")
    return [(True, line[5:].strip()) if line.startswith("chat:") else (False, line) for line in lines]


@click.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--reference", default=None, help="Checkpoint for transformers (default: the one exported).")
@backend_option(multiple=True)
@click.option(
    "--prompts",
    "prompts_file",
    type=click.Path(path_type=Path),
    default=None,
    help="Text file, one prompt per line; prefix `chat:` for chat prompts.",
)
@click.option("--steps", type=int, default=16, show_default=True, help="Teacher-forced decode steps.")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report instead of the table.")
@click.option("--report", "report_path", type=click.Path(path_type=Path), default=None, help="Write a Markdown report.")
@click.option(
    "--layerwise", is_flag=True, help="Name the first node where the artifact's graph departs from a reference."
)
@click.option(
    "--against",
    type=click.Choice(["fp32", "onnxruntime", "torch", "level0"]),
    default="fp32",
    show_default=True,
    help="With --layerwise: the fp32 graph exported again, ONNX Runtime (for engines), "
    "PyTorch, or (quantized artifacts, their default) the graph's int8 activations against fp32 ones.",
)
@click.option(
    "--graph",
    "graph_role",
    type=click.Choice(["prefill", "decode"]),
    default="prefill",
    show_default=True,
    help="With --layerwise: which graph to compare.",
)
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(path_type=Path),
    default=None,
    help="With --layerwise: PNG of the per-layer error.",
)
@verify_option
def diff(
    artifact: Path,
    reference: str | None,
    backends: tuple[str, ...],
    prompts_file: Path | None,
    steps: int,
    as_json: bool,
    report_path: Path | None,
    layerwise: bool,
    against: str,
    graph_role: str,
    plot_path: Path | None,
    no_verify: bool,
) -> None:
    """Compare an artifact with transformers and StaticLlama; exit 0 only if every check passes.

    With --layerwise: run one call of its graph and of a reference with every tensor marked
    (Polygraphy), and report the first node out of tolerance and the error after each layer."""
    from llamatrt.tools.compare import run_diff

    prompts = _read_prompts(prompts_file)
    for path in (report_path, plot_path):
        if path is not None:  # found now, not after minutes of work
            _check_report_path(path)
    if layerwise:
        from llamatrt.tools.layerwise import run_layerwise

        with StepBar(3, "diff --layerwise") as bar:
            result = run_layerwise(artifact, against, graph_role, progress=bar, verify=not no_verify)
        click.echo(json.dumps(result.to_json(), indent=2) if as_json else str(result))
        if report_path is not None:
            report_path.write_text(result.to_markdown(), encoding="utf-8")
        if plot_path is not None:
            result.plot(plot_path)
        sys.exit(0 if result else 1)
    with StepBar(3 + 2 * len(backends), "diff") as bar:
        report = run_diff(artifact, backends, reference, prompts, steps, progress=bar, verify=not no_verify)
    click.echo(json.dumps(report.to_json(), indent=2) if as_json else str(report))
    if report_path is not None:
        report_path.write_text(report.to_markdown(), encoding="utf-8")
    sys.exit(0 if report else 1)


def _check_report_path(path: Path) -> None:
    folder = path.absolute().parent
    if path.is_dir():
        raise InputError(f"--report {path} is a folder; give a file name such as {path / 'accuracy.md'}")
    if not folder.is_dir():
        raise InputError(
            f"--report {path}: the folder {folder} does not exist; create it or write the report elsewhere"
        )
    if not os.access(folder, os.W_OK):
        raise InputError(f"--report {path}: cannot write into {folder}; write the report elsewhere")


def _parse_contexts(text: str | None) -> list[int]:
    if not text:
        return []
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError as e:
        raise InputError(
            f"--contexts {text!r} is not a comma-separated list of token counts; give e.g. 128,512,1000"
        ) from e


@click.command()
@click.argument("artifacts", nargs=-1, required=True, type=click.Path(path_type=Path))
@backend_option(multiple=True)
@click.option("--prompt-len", type=int, default=20, show_default=True, help="Prompt tokens of the timed generation.")
@click.option("--new-tokens", type=int, default=128, show_default=True, help="Tokens it generates.")
@click.option("--batch", type=int, default=None, help="Must equal the artifact's batch (shapes are static).")
@click.option(
    "--repeat",
    type=int,
    default=3,
    show_default=True,
    help="Timed rounds after a warm-up, each running everything once in turn; medians reported.",
)
@click.option(
    "--baseline",
    type=click.Choice(["transformers", "onnxruntime-genai"]),
    default=None,
    help="Time transformers' eager generate, or onnxruntime-genai's model of the same checkpoint at the "
    "artifact's precision (built once, cached), in the same rounds.",
)
@click.option("--contexts", default=None, help="Prompt lengths for decode speed vs context, e.g. 100,1000.")
@click.option(
    "--workload",
    type=int,
    default=0,
    show_default=True,
    help="Also run a fixed mix of N requests (prompts 10-300, outputs 16-256 tokens) submitted at once, on "
    "the first --backend: in-flight batching, lockstep batches (batch > 1) or one at a time (batch 1).",
)
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(path_type=Path),
    default=None,
    help="PNG of decode tok/s vs context (with the baseline and the ceiling).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (the same figures).")
@verify_option
def bench(
    artifacts: tuple[Path, ...],
    backends: tuple[str, ...],
    prompt_len: int,
    new_tokens: int,
    batch: int | None,
    repeat: int,
    baseline: str | None,
    contexts: str | None,
    workload: int,
    plot_path: Path | None,
    as_json: bool,
    no_verify: bool,
) -> None:
    """Time to first token, prefill and decode speed, % of the bandwidth ceiling, held memory, a mixed
    workload and a baseline: every figure from the same interleaved rounds.

    Several ARTIFACTS (e.g. batch 1 and batch 4 exports) are measured in the same run, and each one's
    aggregate decode speed is reported as a ratio to the first's."""
    from llamatrt.base.artifact.reader import read_manifest
    from llamatrt.tools.bench import bench_steps, run_benches
    from llamatrt.tools.bench_report import plot_by_context

    manifest = read_manifest(artifacts[0], verify=False)
    if batch is not None and batch != manifest.batch_size:
        raise InputError(
            f"--batch {batch} but {artifacts[0]} was exported with batch {manifest.batch_size}; "
            f"re-export with --batch {batch}"
        )
    lengths = _parse_contexts(contexts)
    if plot_path is not None and not lengths:
        top = manifest.max_cache_len - 40
        lengths = sorted({min(n, top) for n in (128, 256, 512, top)})
    with StepBar(bench_steps(len(artifacts), repeat), "bench") as bar:
        report = run_benches(
            artifacts,
            backends,
            prompt_len,
            new_tokens,
            repeat,
            baseline,
            lengths,
            workload,
            progress=bar,
            verify=not no_verify,
        )
    click.echo(json.dumps(report.to_json(), indent=2) if as_json else str(report))
    if plot_path is not None:
        plot_by_context(report, plot_path)


@click.command()
@click.argument("artifact", type=click.Path(path_type=Path))
def verify(artifact: Path) -> None:
    """Check an artifact against its manifest: schema, paths, each graph's IO, and every file's SHA-256."""
    from llamatrt.base.artifact.engines import check_engines
    from llamatrt.base.artifact.reader import read_manifest

    started = time.perf_counter()
    manifest = read_manifest(artifact, verify=True)
    checked = [manifest.weights_bytes] + [g.bytes for g in manifest.graphs.values()]
    if manifest.engines:
        check_engines(manifest, artifact, verify=True)
        checked += [e["bytes"] for e in manifest.engines["graphs"].values()]
    click.echo(
        f"ok: {artifact}: manifest, {len(manifest.graphs)} graphs, the weights file"
        f"{' and ' + str(len(manifest.engines['graphs'])) + ' engines' if manifest.engines else ''} match "
        f"({sum(checked) / 1e6:.1f} MB hashed in {time.perf_counter() - started:.2f} s)"
    )
