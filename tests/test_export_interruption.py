"""An export killed, terminated, raced or starved of disk leaves nothing behind but what was there.

The exports run through the installed `llamatrt` entry point; each test waits until the export's
temp folder exists (the work has started) before it interrupts it.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.safety_helpers import LLAMATRT, error_lines, run_cli, snapshot, tmpfs


def _start_export(hf: Path, out: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            str(LLAMATRT),
            "export",
            "--model",
            str(hf),
            "--out",
            str(out),
            "--max-seq-len",
            "32",
            "--prefill-chunk",
            "8",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _temp_folders(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.tmp-*")) + sorted(out.parent.glob(f".{out.name}.old-*"))


def _wait_for_temp(out: Path, proc: subprocess.Popen[str], timeout: float = 120) -> Path:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        found = _temp_folders(out)
        if found:
            return found[0]
        if proc.poll() is not None:
            raise AssertionError(f"the export ended before it wrote anything: {proc.communicate()}")
        time.sleep(0.05)
    raise AssertionError("the export never started writing")


@pytest.fixture
def existing(tiny_artifact: Path, tmp_path: Path) -> tuple[Path, Path, dict[str, str]]:
    """An existing artifact (to be replaced with --force) and the checkpoint to export into it."""
    out = Path(shutil.copytree(tiny_artifact, tmp_path / "art"))
    return tiny_artifact.parent / "hf", out, snapshot(out)


def test_sigterm_during_export_cleans_up_and_keeps_the_old_artifact(existing) -> None:
    hf, out, before = existing
    proc = _start_export(hf, out, "--force")
    _wait_for_temp(out, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    assert [line for line in stderr.splitlines() if line.startswith("error:")] == ["error: terminated"]
    assert "Traceback" not in stderr
    assert _temp_folders(out) == [] and snapshot(out) == before
    assert not (out.parent / f".{out.name}.lock").exists()


@pytest.mark.slow  # end to end, over 6 s here: `make test` runs it, `make test-fast` does not
def test_sigkill_leaves_a_temp_folder_that_the_next_export_removes(existing) -> None:
    hf, out, before = existing
    proc = _start_export(hf, out, "--force")
    _wait_for_temp(out, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert _temp_folders(out) and snapshot(out) == before  # a kill -9 cannot clean up; the artifact is intact
    result = run_cli(
        ["export", "--model", str(hf), "--out", str(out), "--force", "--max-seq-len", "32", "--prefill-chunk", "8"],
        out.parent,
    )
    assert result.returncode == 0, result.stderr
    assert _temp_folders(out) == []  # the dead process's folder is gone


@pytest.mark.slow  # end to end, over 6 s here: `make test` runs it, `make test-fast` does not
def test_a_second_export_to_the_same_out_is_refused_while_the_first_runs(existing) -> None:
    hf, out, _ = existing
    first = _start_export(hf, out, "--force")
    _wait_for_temp(out, first)
    second = run_cli(["export", "--model", str(hf), "--out", str(out), "--force"], out.parent)
    assert first.wait(timeout=300) == 0, first.communicate()
    assert second.returncode == 1
    assert error_lines(second) == [
        f"error: {out} is being written by llamatrt (pid {first.pid}); wait for it to finish or choose another --out"
    ]


@pytest.mark.slow  # end to end, over 6 s here: `make test` runs it, `make test-fast` does not
def test_disk_full_while_writing_is_one_line_and_leaves_nothing(
    tiny_artifact: Path, tmp_path: Path, monkeypatch
) -> None:
    """The space check passes (it is patched out here) but the disk fills up during the write: the
    OSError becomes one line and the half-written temp folder is removed."""
    from llamatrt.cli import main
    from llamatrt.exporter import export as export_module

    with tmpfs(tmp_path / "small", "160k") as mounted:
        if not mounted:
            pytest.skip("cannot mount a tmpfs here (needs root)")
        monkeypatch.setattr(export_module, "check_disk_space", lambda *_: None)
        out = tmp_path / "small" / "o"
        result = CliRunner().invoke(main, ["export", "--model", str(tiny_artifact.parent / "hf"), "--out", str(out)])
        assert result.exit_code == 1, result.output
        lines = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and "No space left on device" in lines[0] and "free disk space" in lines[0]
        assert list((tmp_path / "small").iterdir()) == []
