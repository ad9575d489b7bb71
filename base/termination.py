"""SIGTERM: undo what is half-written, say so in one line, exit 143.

Raising an exception from the signal handler (as Ctrl-C does) is not safe here: SIGTERM can land
inside torch.export's tracer, which wraps the exception into a TorchExportError or, inside its
frame-evaluation hook, crashes the interpreter (exit -11, the temp folder left behind). So the
handler does the cleanup itself: every piece of work that leaves files behind when cut short (an
artifact's temp folder, its lock, a conversion cache being filled) registers an undo step while
it runs, and the handler runs the steps still registered, newest first, then leaves with
`os._exit` so nothing of the interrupted library runs again. A step that must not be cut in half
(renaming a finished artifact into place) runs inside `deferred()`, which holds SIGTERM back
until it is done.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

EXIT_TERMINATED = 143
_undo_steps: dict[int, Callable[[], None]] = {}
_ids = itertools.count()


@contextlib.contextmanager
def undo_on_termination(step: Callable[[], None]) -> Iterator[None]:
    """Run `step` if SIGTERM ends the process inside this block (a normal exit or an exception
    leaves it to the block's own `finally`)."""
    key = next(_ids)
    _undo_steps[key] = step  # plain dict writes: the handler runs on this thread, a lock could deadlock
    try:
        yield
    finally:
        _undo_steps.pop(key, None)


@contextlib.contextmanager
def removed_on_termination(path: Path) -> Iterator[None]:
    """`path` (a file or a folder) is deleted if SIGTERM ends the process inside this block."""

    def remove() -> None:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

    with undo_on_termination(remove):
        yield


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """SIGTERM waits until the block is done (it is delivered, and handled, right after)."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _on_sigterm(signum: int, frame: object) -> None:
    for key in sorted(_undo_steps, reverse=True):
        step = _undo_steps.pop(key, None)
        if step is not None:
            with contextlib.suppress(Exception):
                step()
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.write("\nerror: terminated\n")
        sys.stderr.flush()
    os._exit(EXIT_TERMINATED)


def install() -> None:
    """Make SIGTERM clean up and exit 143 (main thread only, where Python runs signal handlers)."""
    signal.signal(signal.SIGTERM, _on_sigterm)
