"""Writing an artifact folder safely: atomic (a temp folder renamed at the end), locked against a
second writer, `--force` limited to replacing an artifact, and no temp folder left to rot.

`--force` replaces only a folder that is a llamatrt artifact (its manifest.json says so) or an
empty one: a typo in `--out` must never delete a user's folder, the current directory or the
checkpoint being exported.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from llamatrt.base.artifact import names
from llamatrt.base.errors import ArtifactExistsError, InputError
from llamatrt.base.termination import deferred, removed_on_termination

TMP_TAG, OLD_TAG = ".tmp-", ".old-"


def is_artifact(folder: Path) -> bool:
    """A folder whose manifest.json is a llamatrt manifest (any format version)."""
    try:
        raw = json.loads((folder / names.MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(raw, dict) and isinstance(raw.get("format_version"), int) and "graphs" in raw


def check_output(out: Path, force: bool, protect: tuple[Path, ...] = ()) -> None:
    """Fail before any work: an existing output without --force, or one --force may not replace;
    `protect`: paths (the checkpoint) that must not lie inside what would be replaced."""
    out = out.absolute()
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise InputError(f"--out {out} is inside {parent}, which is a file; choose another --out")
    if not out.exists():
        return
    if not out.is_dir():
        raise ArtifactExistsError(f"{out} exists and is a file; remove it or choose another --out")
    if not force:
        raise ArtifactExistsError(f"{out} exists; pass --force to overwrite it or choose another --out")
    resolved = out.resolve()
    cwd = Path.cwd().resolve()
    if cwd == resolved or resolved in cwd.parents:
        raise ArtifactExistsError(
            f"--out {out} is (or holds) the current directory; refusing to replace it, choose another --out"
        )
    for path in protect:
        if path.resolve() == resolved or resolved in path.resolve().parents:
            raise ArtifactExistsError(
                f"--out {out} holds the checkpoint {path}; refusing to replace it, choose another --out"
            )
    if any(out.iterdir()) and not is_artifact(out):
        raise ArtifactExistsError(
            f"{out} is not a llamatrt artifact (no llamatrt manifest.json) and not empty; --force only replaces "
            "an artifact, so remove it yourself or choose another --out"
        )


def check_writable(folder: Path) -> None:
    """The folder that will hold the output exists (it is made) and takes files."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise InputError(f"cannot write into {folder} ({e.strerror}); choose another --out") from e


def check_disk_space(out: Path, needed_bytes: int) -> None:
    """Fail before writing when the folder that will hold `out` has too little space."""
    parent = out.absolute().parent
    free = shutil.disk_usage(parent).free
    if free < needed_bytes:
        raise InputError(
            f"not enough disk space in {parent}: {needed_bytes / 1e9:.2f} GB needed, {free / 1e9:.2f} GB free; "
            "free some space or choose another --out"
        )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def remove_stale_temp(out: Path) -> list[Path]:
    """Remove temp folders an earlier writer of `out` left when it was killed (its pid is dead)."""
    removed = []
    for tag in (TMP_TAG, OLD_TAG):
        for path in out.parent.glob(f".{out.name}{tag}*"):
            pid_text = path.name[len(f".{out.name}{tag}") :].split("-", 1)[0]
            if path.is_dir() and pid_text.isdigit() and not _pid_alive(int(pid_text)):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


@contextlib.contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold `out`'s lock (a hidden file beside it): a second writer fails at once, in one line."""
    lock_path = out.parent / f".{out.name}.lock"
    with lock_path.open("a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            raise ArtifactExistsError(
                f"{out} is being written by {holder}; wait for it to finish or choose another --out"
            ) from e
        lock.seek(0)
        lock.truncate()
        lock.write(f"llamatrt (pid {os.getpid()})")
        lock.flush()
        try:
            with removed_on_termination(lock_path):
                yield
        finally:
            lock_path.unlink(missing_ok=True)
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextlib.contextmanager
def atomic_output_dir(out: Path) -> Iterator[Path]:
    """Yield a temp folder next to `out`; on success it replaces `out`, on any error (Ctrl-C and
    SIGTERM included) it vanishes. Its name carries our pid, so a later writer can tell a folder
    left by a killed process (remove_stale_temp) from one still being written."""
    out = out.absolute()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{TMP_TAG}{os.getpid()}-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes 0700; an artifact is a normal folder
    try:
        with removed_on_termination(tmp):
            yield tmp
            with deferred():  # the swap below is never cut in half
                old = _swap_into_place(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _swap_into_place(tmp: Path, out: Path) -> Path | None:
    """Rename `tmp` to `out`; an existing `out` moves into a folder returned for deletion."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}{OLD_TAG}{os.getpid()}-", dir=out.parent))
        out.rename(old / out.name)
    try:
        tmp.rename(out)
    except BaseException:
        if old is not None:  # put the old artifact back where it was
            (old / out.name).rename(out)
        raise
    return old
