"""`llamatrt diff`, `llamatrt bench`, `llamatrt build`: thin wrappers over runtime/ and exporter/."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from llamatrt.errors import InputError


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
@click.option("--backend", "backends", multiple=True, default=("onnxruntime",), show_default=True,
              type=click.Choice(["torch", "onnxruntime", "ort", "tensorrt"]), help="Repeatable.")  # fmt: skip
@click.option("--prompts", "prompts_file", type=click.Path(path_type=Path), default=None,
              help="Text file, one prompt per line; prefix `chat:` for chat prompts.")  # fmt: skip
@click.option("--steps", type=int, default=16, show_default=True, help="Teacher-forced decode steps.")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report instead of the table.")
@click.option("--report", "report_path", type=click.Path(path_type=Path), default=None, help="Write a Markdown report.")
def diff(artifact: Path, reference: str | None, backends: tuple[str, ...], prompts_file: Path | None, steps: int,
         as_json: bool, report_path: Path | None) -> None:  # fmt: skip
    """Compare an artifact with transformers and StaticLlama; exit 0 only if every check passes."""
    from llamatrt.cli import StepBar
    from llamatrt.runtime.compare import run_diff

    prompts = _read_prompts(prompts_file)
    with StepBar(3 + 2 * len(backends), "diff") as bar:
        report = run_diff(artifact, backends, reference, prompts, steps, progress=bar)
    click.echo(json.dumps(report.to_json(), indent=2) if as_json else str(report))
    if report_path is not None:
        report_path.write_text(report.to_markdown())
    sys.exit(0 if report else 1)


COMMANDS: list[Any] = [diff]
