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


prefix_cache_option = click.option(
    "--prefix-cache-mb",
    type=click.IntRange(min=0),
    default=512,
    show_default=True,
    help="Memory for the keys and values of prompt beginnings already computed (a system prompt, the "
    "conversation so far), reused by later prompts instead of prefilled again; 0 turns it off.",
)

verify_option = click.option(
    "--no-verify",
    "no_verify",
    is_flag=True,
    help="Skip checking the artifact's files against their SHA-256 in the manifest (saves the hashing time; the "
    "structure is still checked).",
)
