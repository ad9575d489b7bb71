"""What the bad-input battery and the security tests share: running `llamatrt` (the installed entry
point, or in this process through click's CliRunner), snapshots of folders by content, and small
ways to damage an artifact."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

LLAMATRT = Path(sys.executable).with_name("llamatrt")


def run_cli(
    args: list[str], cwd: Path, stdin: bytes | None = b"", timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    """`llamatrt ARGS` as a user runs it; stdin=None runs it with stdin closed."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    closed = {"stdin": subprocess.DEVNULL, "preexec_fn": lambda: os.close(0)} if stdin is None else {"input": stdin}
    raw = subprocess.run([str(LLAMATRT), *args], cwd=cwd, capture_output=True, timeout=timeout, env=env, **closed)
    return subprocess.CompletedProcess(
        raw.args, raw.returncode, raw.stdout.decode(errors="replace"), raw.stderr.decode(errors="replace")
    )


def invoke_cli(args: list[str], cwd: Path, stdin: bytes = b"") -> subprocess.CompletedProcess[str]:
    """`llamatrt ARGS` in this process, through click's CliRunner: the same command, parsing and
    one-line errors as the entry point without a fresh interpreter importing torch each time. What a
    command sets process-wide (the working directory, signal handlers, torch's threads) is put back.
    An exception the CLI let through comes back as a traceback on stderr, as the real command prints."""
    import torch
    from click.testing import CliRunner

    from llamatrt.cli import main

    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    threads, before = torch.get_num_threads(), os.getcwd()
    os.chdir(cwd)
    try:
        result = CliRunner().invoke(main, args, input=stdin, prog_name="llamatrt")
    finally:
        os.chdir(before)
        torch.set_num_threads(threads)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    stderr = result.stderr
    if result.exc_info is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(*result.exc_info))
    return subprocess.CompletedProcess(["llamatrt", *args], result.exit_code, result.stdout, stderr)


def snapshot(*roots: Path) -> dict[str, str]:
    """path -> sha256 of every file under `roots` (symlinks recorded by target, not followed)."""
    out = {}
    for root in roots:
        paths = [root] if root.is_file() else sorted(root.rglob("*")) if root.exists() else []
        for path in paths:
            if path.is_symlink():
                out[str(path)] = "link:" + os.readlink(path)
            elif path.is_file():
                out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def error_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("error:")]


def edit_manifest(artifact: Path, change: Callable[[dict[str, Any]], None]) -> None:
    path = artifact / "manifest.json"
    raw = json.loads(path.read_text())
    change(raw)
    path.write_text(json.dumps(raw))


def perturb_parameter(artifact: Path, name: str, delta: float) -> None:
    """Move every float32 value of one parameter away from zero by `delta` and re-hash the weights:
    an exporter bug, not a corrupted file (the manifest's hash is the perturbed file's own)."""
    import numpy as np

    from llamatrt.base.artifact.reader import file_sha256

    where = json.loads((artifact / "manifest.json").read_text())["weights"]["tensors"][name]
    data = np.fromfile(artifact / "weights.data", dtype=np.uint8)
    count = 1
    for size in where["shape"]:
        count *= size
    tensor = data[where["offset"] : where["offset"] + 4 * count].view(np.float32)
    tensor += delta * np.sign(tensor)
    data.tofile(artifact / "weights.data")
    edit_manifest(artifact, lambda m: m["weights"].__setitem__("sha256", file_sha256(artifact / "weights.data")))


def graph_entry(raw: dict[str, Any], name: str) -> dict[str, Any]:
    return next(g for g in raw["graphs"] if g["name"] == name)


@contextlib.contextmanager
def tmpfs(path: Path, size: str, readonly: bool = False) -> Iterator[bool]:
    """A small tmpfs at `path` (a full disk, a read-only folder); yields False where it cannot be mounted."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if readonly else "")
    mounted = (
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode == 0
    )
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def can_mount_tmpfs(scratch: Path) -> bool:
    with tmpfs(scratch / "probe", "1m") as ok:
        return ok
