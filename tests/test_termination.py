"""SIGTERM runs the registered undo steps, holds off during `deferred()` blocks and exits 143."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path


def _run(body: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from llamatrt.base import termination
        termination.install()
        root = Path({str(tmp_path)!r})
    """) + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)


def test_a_registered_folder_is_removed_and_the_exit_is_143(tmp_path: Path) -> None:
    result = _run(
        """
        work = root / "half-written"
        work.mkdir()
        (work / "part").write_text("x")
        with termination.removed_on_termination(work):
            os.kill(os.getpid(), signal.SIGTERM)
            (root / "after-the-signal").write_text("x")
    """,
        tmp_path,
    )
    assert result.returncode == 143, result.stderr
    assert result.stderr.strip().splitlines()[-1] == "error: terminated"
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_finished_block_unregisters_its_step(tmp_path: Path) -> None:
    result = _run(
        """
        kept = root / "kept"
        kept.mkdir()
        with termination.removed_on_termination(kept):
            pass
        os.kill(os.getpid(), signal.SIGTERM)
    """,
        tmp_path,
    )
    assert result.returncode == 143
    assert (tmp_path / "kept").is_dir()


def test_a_deferred_block_finishes_before_the_signal_is_handled(tmp_path: Path) -> None:
    result = _run(
        """
        with termination.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            (root / "swap-done").write_text("x")
        (root / "after-the-block").write_text("x")
    """,
        tmp_path,
    )
    assert result.returncode == 143
    assert sorted(p.name for p in tmp_path.iterdir()) == ["swap-done"]
