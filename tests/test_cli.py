"""The CLI end to end on a tiny artifact: exit codes, one-line errors, JSON output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from llamatrt.cli import main


def invoke(*args: str, input: str | None = None):
    return CliRunner().invoke(main, [str(a) for a in args], input=input)


def test_generate_json_and_ids(tiny_artifact: Path) -> None:
    result = invoke(
        "generate",
        tiny_artifact,
        "--prompt",
        "w5 w6 w7",
        "--input-ids",
        "5,6,7",
        "--json",
        "--max-new-tokens",
        "5",
        "--logprobs",
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.output.strip().splitlines()]
    assert len(rows) == 2 and rows[0]["token_ids"] == rows[1]["token_ids"]  # "w5 w6 w7" encodes to 5,6,7
    assert {"text", "token_ids", "finish_reason", "prompt_tokens", "ttft_ms", "decode_tokens_per_s"} <= set(rows[0])
    assert rows[0]["prompt_tokens"] == 3 and len(rows[0]["logprobs"]) == len(rows[0]["token_ids"])


def test_generate_stream_matches_plain(tiny_artifact: Path) -> None:
    plain = invoke("generate", tiny_artifact, "--prompt", "w9 w10", "--max-new-tokens", "6")
    streamed = invoke("generate", tiny_artifact, "--prompt", "w9 w10", "--max-new-tokens", "6", "--stream")
    as_json = json.loads(
        invoke("generate", tiny_artifact, "--prompt", "w9 w10", "--max-new-tokens", "6", "--json").output
    )
    assert plain.exit_code == streamed.exit_code == 0 and len(as_json["token_ids"]) == 6
    expected = " ".join(f"w{t}" for t in as_json["token_ids"])  # the word-level tokenizer's own text
    assert plain.output.strip() == streamed.output.strip() == as_json["text"] == expected


def test_chat_reads_stdin_and_resets(tiny_artifact: Path) -> None:
    result = invoke("chat", tiny_artifact, "--max-new-tokens", "3", input="w5 w6\n/reset\nw7\n/exit\nw8\n")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()  # one reply line per turn (may be empty: EOS first), none after /exit
    first = invoke("generate", tiny_artifact, "--chat", "--prompt", "w5 w6", "--max-new-tokens", "3").output.strip()
    after_reset = invoke("generate", tiny_artifact, "--chat", "--prompt", "w7", "--max-new-tokens", "3").output.strip()
    assert lines == [first, after_reset] and "(conversation cleared)" in result.stderr


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--prompt", ""], "prompt is empty"),
        (["--temperature", "-1", "--prompt", "w5"], "temperature"),
        (["--top-p", "1.5", "--prompt", "w5"], "top-p"),
        (["--input-ids", "1,x"], "not a comma-separated list"),
        (["--input-ids", ",".join(["5"] * 60)], "cache holds 48"),
        ([], "no prompt given"),
    ],
)
def test_generate_bad_input_is_one_line(tiny_artifact: Path, args, needle) -> None:
    result = invoke("generate", tiny_artifact, *args)
    assert result.exit_code == 1 and needle in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_bad_artifacts_and_backends(tiny_artifact: Path, tmp_path: Path) -> None:
    assert invoke("generate", tmp_path / "none", "--prompt", "w5").exit_code == 1
    result = invoke("generate", tiny_artifact, "--backend", "tpu", "--prompt", "w5")
    assert result.exit_code == 2 and "tpu" in result.output  # click's own usage error
    result = invoke("generate", tiny_artifact, "--backend", "tensorrt", "--prompt", "w5")
    assert (result.exit_code == 1 and "TensorRT" in result.output) or "CUDA" in result.output


def test_export_errors_and_force(tiny_artifact: Path, tmp_path: Path) -> None:
    hf = tiny_artifact.parent / "hf"
    result = invoke("export", "--model", hf, "--out", tiny_artifact)
    assert result.exit_code == 1 and "pass --force" in result.output
    result = invoke("export", "--model", hf, "--out", tmp_path / "x", "--max-seq-len", "4", "--prefill-chunk", "8")
    assert result.exit_code == 1 and "smaller than the prefill chunk" in result.output
    result = invoke("export", "--model", "gpt2-nope", "--out", tmp_path / "y")
    assert result.exit_code == 1 and "not found" in result.output
    result = invoke("export", "--model", hf, "--out", tmp_path / "z", "--max-seq-len", "32", "--prefill-chunk", "4")
    assert result.exit_code == 0 and "max |logits - torch|" in result.output
    assert (tmp_path / "z" / "manifest.json").is_file()
