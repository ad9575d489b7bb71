"""`llamatrt chat` and the progress bar as a person sees them: through a pseudo-terminal (pexpect)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pexpect
import pytest

from tests.safety_helpers import LLAMATRT, run_cli


def _spawn(*args: str, timeout: float = 120) -> pexpect.spawn:
    return pexpect.spawn(
        str(LLAMATRT),
        list(args),
        encoding="utf-8",
        timeout=timeout,
        dimensions=(40, 200),
        env={"PATH": str(Path(sys.executable).parent), "PYTHONWARNINGS": "ignore"},
    )


@pytest.mark.slow
def test_ctrl_c_stops_the_reply_and_twice_at_the_prompt_quits(smollm2_artifact: Path) -> None:
    chat = _spawn("chat", str(smollm2_artifact), "--max-new-tokens", "400", "--no-verify")
    chat.expect("> ")
    chat.sendline("Write a very long story about a dragon who learns to cook.")
    chat.expect("cook.\r\n")  # the terminal's echo of the line
    chat.expect(r"\w+ \w+ \w+")  # the reply has started
    chat.sendintr()
    chat.expect(r"\[reply stopped\]")
    chat.expect("> ")  # back at the prompt, the session goes on
    chat.sendline("/reset")
    chat.expect(r"\(conversation cleared\)")
    chat.expect("> ")
    chat.sendintr()
    chat.expect(r"press Ctrl-C again or type /exit to quit")
    chat.sendintr()
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 0 and "Traceback" not in (chat.before or "")


def test_a_long_conversation_drops_its_oldest_turns_and_a_cut_reply_is_marked(
    tiny_artifact: Path, tmp_path: Path
) -> None:
    turns = "".join(" ".join(f"w{(7 * t + i) % 90 + 3}" for i in range(9)) + "\n" for t in range(6))
    result = run_cli(["chat", str(tiny_artifact), "--max-new-tokens", "3"], tmp_path, stdin=turns.encode())
    assert result.returncode == 0, result.stderr
    assert re.search(r"\(dropped the \d+ oldest turns? to fit the cache of 48 tokens\)", result.stderr)
    replies = result.stdout.splitlines()
    assert len(replies) == 6  # every turn answered, none refused
    cut = result.stderr.count("[reply cut at --max-new-tokens 3]")
    assert cut == sum(len(r.split()) == 3 for r in replies) and cut > 0


@pytest.mark.slow  # end to end, over 6 s here: `make test` runs it, `make test-fast` does not
def test_the_progress_clock_ticks_through_a_long_step_on_a_terminal(tiny_artifact: Path, tmp_path: Path) -> None:
    export = _spawn(
        "export",
        "--model",
        str(tiny_artifact.parent / "hf"),
        "--out",
        str(tmp_path / "o"),
        "--max-seq-len",
        "32",
        "--prefill-chunk",
        "8",
    )
    export.expect(pexpect.EOF)
    export.close()
    assert export.exitstatus == 0
    frames = re.findall(r"export: exporting prefill graph \d+/\d+ \|[^|]*\| (\d\d:\d\d)", export.before)
    clocks = set(frames)
    assert len(clocks) >= 2, frames  # one step, its clock redrawn as it ran
