"""The `llamatrt` command: parse, call one function, print.

Exit codes: 0 success; 1 the command ran and failed (bad input found on the way, a failed check,
a `diff` verdict of FAIL); 2 the command line itself is wrong (unknown option, invalid choice);
130 / 143 interrupted by Ctrl-C / SIGTERM (llamatrt.base.termination). Every failure is one `error:` line on stderr naming the
problem and the fix; `llamatrt --debug ...` shows the traceback instead.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

import click

from llamatrt.base import termination
from llamatrt.base.errors import LlamatrtError


def _fail(message: str, code: int) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


class _Group(click.Group):
    """Turns every failure into one `error:` line (see the module docstring for the exit codes)."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        try:
            kwargs["standalone_mode"] = False
            return super().main(*args, **kwargs)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.UsageError as e:
            command = e.ctx.command_path if e.ctx is not None else "llamatrt"
            _fail(f"{e.format_message()} (see `{command} --help`)", 2)
        except click.ClickException as e:
            _fail(e.format_message(), e.exit_code)
        except click.Abort:
            _fail("interrupted", 130)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as e:
            if ctx.params.get("debug"):
                raise
            _fail(_one_line(e), 1)
        except KeyboardInterrupt:
            _fail("interrupted", 130)


def _one_line(e: Exception) -> str:
    if isinstance(e, LlamatrtError):
        return str(e)
    if isinstance(e, OSError):
        where = f"{e.filename}: " if e.filename else ""
        return f"{where}{e.strerror or e}; check the path, its permissions and the free disk space"
    if isinstance(e, MemoryError):
        return "out of memory; use a smaller --batch or --max-seq-len, or a machine with more memory"
    detail = str(e).splitlines()[0][:200] if str(e) else ""
    return f"unexpected {type(e).__name__}: {detail} (a bug in llamatrt; rerun with --debug and report it)"


@click.group(cls=_Group)
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
@click.version_option(package_name="llamatrt")
def main(debug: bool) -> None:
    """Llama-family decoders from PyTorch to verified ONNX Runtime and TensorRT engines."""
    import logging

    if threading.current_thread() is threading.main_thread():
        termination.install()
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(message)s")


def _register() -> None:
    from llamatrt.cli_export import build, export
    from llamatrt.cli_generate import chat, generate
    from llamatrt.cli_serve import bench_serve, serve
    from llamatrt.cli_tools import bench, diff, verify

    for command in (export, build, verify, generate, chat, serve, diff, bench, bench_serve):
        main.add_command(command)


_register()
