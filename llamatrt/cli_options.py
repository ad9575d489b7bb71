"""Options several commands share, defined once so their names, choices and help agree."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from llamatrt.runtime.registry import DEFAULT_BACKEND, backend_choices

BACKEND_HELP = "torch, onnxruntime (alias ort) or tensorrt (alias trt)."


def backend_option(multiple: bool = False) -> Callable[[Any], Any]:
    if multiple:
        return click.option(
            "--backend",
            "backends",
            multiple=True,
            default=(DEFAULT_BACKEND,),
            show_default=True,
            type=click.Choice(backend_choices()),
            help=f"Repeatable: {BACKEND_HELP}",
        )
    return click.option(
        "--backend", type=click.Choice(backend_choices()), default=DEFAULT_BACKEND, show_default=True, help=BACKEND_HELP
    )


verify_option = click.option(
    "--no-verify",
    "no_verify",
    is_flag=True,
    help="Skip checking the artifact's files against their SHA-256 in the manifest (saves the hashing time; the "
    "structure is still checked).",
)
