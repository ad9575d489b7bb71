"""Atomic artifact output: build in a sibling temp folder, rename at the end, --force to replace."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from llamatrt.errors import ArtifactExistsError, InputError


def check_output(out: Path, force: bool) -> None:
    """Fail before any work: an existing output without --force."""
    if out.exists() and not force:
        raise ArtifactExistsError(f"{out} exists; pass --force to overwrite it or choose another --out")
    if out.exists() and not out.is_dir():
        raise ArtifactExistsError(f"{out} exists and is not a folder; remove it or choose another --out")


def check_disk_space(out: Path, needed_bytes: int) -> None:
    """Fail before writing when the folder that will hold `out` has too little space."""
    parent = out.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(parent).free
    if free < needed_bytes:
        raise InputError(
            f"not enough disk space in {parent}: {needed_bytes / 1e9:.2f} GB needed, {free / 1e9:.2f} GB free; "
            "free some space or choose another --out"
        )


@contextmanager
def atomic_output_dir(out: Path) -> Iterator[Path]:
    """Yield a temp folder next to `out`; on success it replaces `out`, on error it vanishes."""
    out = out.resolve()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes 0700; an artifact is a normal folder
    try:
        yield tmp
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            out.rename(old / out.name)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
