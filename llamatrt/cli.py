"""The `llamatrt` command: parse, call one function, print. Errors are one line unless --debug."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from llamatrt.errors import LlamatrtError


class _Group(click.Group):
    """Turns LlamatrtError into `error: <one line>` and exit 1; --debug shows the traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except LlamatrtError as e:
            if ctx.params.get("debug"):
                raise
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


@click.group(cls=_Group)
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
@click.version_option(package_name="llamatrt")
def main(debug: bool) -> None:
    """Llama-family decoders from PyTorch to verified ONNX Runtime and TensorRT engines."""
    import logging

    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(message)s")


class StepBar:
    """A progress bar over named steps (the long ones: export, validate, build)."""

    def __init__(self, total: int, desc: str) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=desc, unit="step", file=sys.stderr, leave=True,
                        bar_format="{desc}: {n}/{total} |{bar:20}| {elapsed} {postfix}")  # fmt: skip
        self.started = False

    def __call__(self, step: str) -> None:
        if self.started:
            self.bar.update(1)
        self.started = True
        self.bar.set_postfix_str(step)

    def __enter__(self) -> StepBar:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:  # complete the bar only on success
            self.bar.update(self.bar.total - self.bar.n)
            self.bar.set_postfix_str("done")
        self.bar.close()


@main.command()
@click.option("--model", "model_spec", required=True, help="smollm2, an HF model folder, or a .gguf file.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Artifact folder to create.")
@click.option("--batch", "batch_size", type=int, default=1, show_default=True, help="Batch size B.")
@click.option("--max-seq-len", type=int, default=1024, show_default=True, help="KV-cache capacity C.")
@click.option("--prefill-chunk", type=int, default=128, show_default=True, help="Tokens per prefill call S.")
@click.option("--dtype", default="fp32", show_default=True, help="fp32, fp16 or bf16.")
@click.option("--full-logits", is_flag=True, help="Prefill returns [B, S, V] logits (accuracy work).")
@click.option("--no-validate", is_flag=True, help="Skip the ONNX Runtime vs PyTorch self-check.")
@click.option("--force", is_flag=True, help="Overwrite an existing artifact.")
def export(model_spec: str, out: Path, batch_size: int, max_seq_len: int, prefill_chunk: int, dtype: str,
           full_logits: bool, no_validate: bool, force: bool) -> None:  # fmt: skip
    """Export prefill and decode ONNX graphs, one weights file and a manifest."""
    import time

    from llamatrt.exporter.export import ExportOptions, export_artifact, export_steps

    options = ExportOptions(batch_size, max_seq_len, prefill_chunk, dtype, full_logits, not no_validate)
    started = time.perf_counter()
    with StepBar(export_steps(options), "export") as bar:
        manifest = export_artifact(model_spec, out, options, force=force, progress=bar)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    err = manifest.validation.get("max_abs_logits_error")
    check = f"max |logits - torch| = {err:.3g}" if err is not None else manifest.validation.get("skipped", "")
    click.echo(
        f"exported {manifest.source} -> {out} ({manifest.dtype}, B={manifest.batch_size}, "
        f"S={manifest.prefill_chunk}, C={manifest.max_cache_len}) in {time.perf_counter() - started:.1f} s; "
        f"{size / 1e6:.1f} MB on disk; {check}"
    )


from llamatrt.cli_generate import chat, generate  # noqa: E402  (commands register after `main` exists)
from llamatrt.cli_tools import COMMANDS  # noqa: E402

for _command in (generate, chat, *COMMANDS):
    main.add_command(_command)
