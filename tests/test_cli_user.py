"""What a new user trips over, each through the installed `llamatrt` command: the diff's Markdown
report, diff on a small cache, precisions checked on CPU, build hints, generate's output forms and
flags, progress output, help texts. (Chat through a pseudo-terminal: tests/test_chat_terminal.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from markdown_it import MarkdownIt

from llamatrt.base.artifact.reader import read_manifest
from tests.safety_helpers import error_lines, run_cli


def _generate(art: Path, *args: str) -> tuple[int, str, str]:
    result = run_cli(["generate", str(art), *args], art.parent)
    return result.returncode, result.stdout, result.stderr


@pytest.fixture(scope="module")
def report(tiny_artifact: Path, tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("report")
    prompts = folder / "prompts.txt"
    prompts.write_text("w5 w17 w42 w8\nchat:w11 w12\n" + " ".join(f"w{i % 90 + 3}" for i in range(20)) + "\n")
    result = run_cli(
        [
            "diff",
            str(tiny_artifact),
            "--prompts",
            str(prompts),
            "--steps",
            "4",
            "--report",
            str(folder / "accuracy.md"),
            "--json",
        ],
        folder,
    )
    assert result.returncode == 0, result.stderr
    return folder / "accuracy.md", json.loads(result.stdout)


def _tables(markdown: str) -> list[list[list[str]]]:
    """Every table a real Markdown parser finds: rows of cell texts (header row first)."""
    tables, rows, cells, inside = [], [], [], False
    for token in MarkdownIt("commonmark").enable("table").parse(markdown):
        if token.type == "table_open":
            rows = []
        elif token.type == "tr_open":
            cells = []
        elif token.type in ("th_open", "td_open"):
            inside = True
        elif token.type == "inline" and inside:
            cells.append(token.content)
            inside = False
        elif token.type == "tr_close":
            rows.append(cells)
        elif token.type == "table_close":
            tables.append(rows)
    return tables


def test_the_markdown_report_renders_as_tables_with_the_thresholds(report) -> None:
    path, payload = report
    tables = _tables(path.read_text())
    results, thresholds, checks = tables  # stages, thresholds applied, contract checks
    assert len(results) == 1 + 1 + len(payload["stages"]) and {len(r) for r in results} == {11}
    assert results[0][2] == "max \\|Δ\\|" or "max" in results[0][2]  # the header cell kept whole
    assert thresholds[1][0] == "float32" and thresholds[1][1] == "0.01" and len(thresholds[0]) == 6
    assert {len(r) for r in checks} == {3} and len(checks) == 1 + len(payload["checks"])
    assert all("max |diff|" in r[2] for r in checks[1:] if "diff" in r[2])  # the detail's pipes survived
    assert payload["thresholds"]["float32"]["max_abs"] == 0.01


@pytest.mark.slow  # end to end, over 6 s here: `make test` runs it, `make test-fast` does not
def test_diff_with_its_built_in_prompts_fits_a_small_cache(tiny_artifact: Path, tmp_path: Path) -> None:
    out = tmp_path / "c40"
    exported = run_cli(
        [
            "export",
            "--model",
            str(tiny_artifact.parent / "hf"),
            "--out",
            str(out),
            "--max-seq-len",
            "40",
            "--prefill-chunk",
            "8",
            "--no-validate",
        ],
        tmp_path,
    )
    assert exported.returncode == 0, exported.stderr
    result = run_cli(["diff", str(out), "--steps", "4", "--json"], tmp_path)
    assert error_lines(result) == [], result.stderr
    notes = json.loads(result.stdout)["notes"]
    assert any("built-in prompt 3 cut" in n and "cache of 40" in n for n in notes)
    assert any("last cache slot" in c["name"] for c in json.loads(result.stdout)["checks"])  # the probe stays


@pytest.mark.slow  # end to end, over 6 s here: `make test` runs it, `make test-fast` does not
def test_bf16_graphs_are_checked_on_cpu_through_fp32_twins(tiny_artifact: Path, tmp_path: Path) -> None:
    result = run_cli(
        [
            "export",
            "--model",
            str(tiny_artifact.parent / "hf"),
            "--out",
            str(tmp_path / "bf16"),
            "--dtype",
            "bf16",
            "--max-seq-len",
            "32",
            "--prefill-chunk",
            "8",
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "run slower than fp32" in result.stderr  # said once, at export, on a machine without a GPU
    validation = read_manifest(tmp_path / "bf16").validation
    assert validation["backend"].startswith("onnxruntime-cpu, fp32 twins of the bf16 graphs")
    assert 0 < validation["max_abs_logits_error"] <= validation["tolerance"]


def test_a_broken_bf16_graph_fails_its_export_check(tiny_artifact: Path, tmp_path: Path, monkeypatch) -> None:
    import torch

    from llamatrt.base.errors import ValidationError
    from llamatrt.exporter.export import ExportOptions
    from llamatrt.models import llama, mask
    from llamatrt.tools.pipeline import export_artifact

    def off_by_one(cache_position: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return mask.causal_mask(cache_position - 1, attention_mask)

    real = llama.causal_mask
    calls = {"n": 0}

    def broken_in_the_graph_only(cache_position: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        exporting = torch.compiler.is_exporting()
        calls["n"] += exporting
        return (off_by_one if exporting else real)(cache_position, attention_mask)

    monkeypatch.setattr(llama, "causal_mask", broken_in_the_graph_only)
    with pytest.raises(ValidationError, match="differ from PyTorch"):
        export_artifact(
            tiny_artifact.parent / "hf",
            tmp_path / "bad",
            ExportOptions(max_cache_len=32, prefill_chunk=8, dtype="bf16"),
        )
    assert calls["n"] > 0 and not (tmp_path / "bad").exists()


@pytest.mark.slow  # end to end, over 6 s here: `make test` runs it, `make test-fast` does not
def test_fp16_on_cpu_is_said_at_load(tiny_artifact: Path, tmp_path: Path) -> None:
    out = tmp_path / "fp16"
    assert (
        run_cli(
            [
                "export",
                "--model",
                str(tiny_artifact.parent / "hf"),
                "--out",
                str(out),
                "--dtype",
                "fp16",
                "--max-seq-len",
                "32",
                "--prefill-chunk",
                "8",
            ],
            tmp_path,
        ).returncode
        == 0
    )
    code, _, err = _generate(out, "--prompt", "w5", "--max-new-tokens", "2")
    assert code == 0 and "fp16, which ONNX Runtime CPU runs slower than fp32" in err


def test_build_on_cpu_points_to_tensorrt_rtx(tiny_artifact: Path) -> None:
    pytest.importorskip("tensorrt_rtx")
    import importlib.util

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here")
    result = run_cli(["build", str(tiny_artifact), "--engine", "tensorrt"], tiny_artifact.parent)
    assert result.returncode == 1 and "--engine tensorrt-rtx" in error_lines(result)[0]
    assert "--backend" not in error_lines(result)[0]  # build has no --backend


def test_several_prompts_are_separated_and_json_rows_carry_their_index(tiny_artifact: Path) -> None:
    code, out, _ = _generate(tiny_artifact, "--prompt", "w5 w6", "--prompt", "w20", "--max-new-tokens", "3")
    assert code == 0 and out.splitlines()[1] == "---" and len(out.splitlines()) == 3
    code, out, _ = _generate(tiny_artifact, "--prompt", "w5 w6", "--prompt", "w20", "--max-new-tokens", "3", "--json")
    assert [json.loads(line)["index"] for line in out.splitlines()] == [0, 1]


def test_stream_json_prints_one_event_per_token(tiny_artifact: Path) -> None:
    code, out, _ = _generate(tiny_artifact, "--prompt", "w5 w6", "--max-new-tokens", "4", "--stream", "--json")
    events = [json.loads(line) for line in out.splitlines()]
    _, full, _ = _generate(tiny_artifact, "--prompt", "w5 w6", "--max-new-tokens", "4", "--json")
    result = json.loads(full)
    assert code == 0 and [e["token_id"] for e in events if e["token_id"] is not None] == result["token_ids"]
    assert (
        "".join(e["text"] for e in events) == result["text"] and events[-1]["finish_reason"] == result["finish_reason"]
    )


def test_logprobs_show_without_json_and_top_alternatives_with_it(tiny_artifact: Path) -> None:
    code, out, _ = _generate(tiny_artifact, "--prompt", "w5 w6", "--max-new-tokens", "3", "--logprobs")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 1 + 3 and all(float(line.split()[0]) <= 0 for line in lines[1:])
    code, out, _ = _generate(
        tiny_artifact, "--prompt", "w5 w6", "--max-new-tokens", "3", "--json", "--top-logprobs", "2"
    )
    row = json.loads(out)
    assert [len(alts) for alts in row["top_logprobs"]] == [2, 2, 2]
    assert all(alts[0][1] >= alts[1][1] for alts in row["top_logprobs"])


@pytest.mark.slow  # end to end, over 6 s here: `make test` runs it, `make test-fast` does not
def test_a_stop_string_cuts_the_text_and_its_tokens_and_says_which_stop(tiny_artifact: Path) -> None:
    _, out, _ = _generate(tiny_artifact, "--input-ids", "3,9,21", "--max-new-tokens", "6", "--json")
    free = json.loads(out)
    words = free["text"].split()
    assert len(words) >= 3 and words[2] not in words[:2] and free["token_ids"][1] not in free["token_ids"][:1]
    code, out, _ = _generate(
        tiny_artifact, "--input-ids", "3,9,21", "--max-new-tokens", "6", "--json", "--stop", words[2]
    )
    cut = json.loads(out)
    assert code == 0 and cut["finish_reason"] == "stop" and cut["stop"] == words[2]
    assert cut["text"].split() == words[:2] and cut["token_ids"] == free["token_ids"][:2]
    code, out, _ = _generate(
        tiny_artifact,
        "--input-ids",
        "3,9,21",
        "--max-new-tokens",
        "6",
        "--json",
        "--stop-id",
        str(free["token_ids"][1]),
    )
    by_id = json.loads(out)
    assert by_id["token_ids"] == free["token_ids"][:1] and by_id["stop"] == free["token_ids"][1]


def test_generate_takes_a_system_message(tiny_artifact: Path) -> None:
    code, with_system, _ = _generate(tiny_artifact, "--chat", "--system", "w40 w41 w42", "--prompt", "w5", "--json")
    _, without, _ = _generate(tiny_artifact, "--chat", "--prompt", "w5", "--json")
    assert code == 0 and json.loads(with_system)["prompt_tokens"] == json.loads(without)["prompt_tokens"] + 3
    code, _, err = _generate(tiny_artifact, "--system", "w40", "--prompt", "w5")
    assert code == 1 and "--system needs --chat" in err


def test_progress_is_plain_lines_off_a_terminal_and_libraries_stay_quiet(tiny_artifact: Path, tmp_path: Path) -> None:
    result = run_cli(["diff", str(tiny_artifact), "--steps", "2", "--prompts", str(_one_prompt(tmp_path))], tmp_path)
    progress = [line for line in result.stderr.splitlines() if line.startswith("diff: ")]
    assert progress[0].startswith("diff: [1/5] loading the reference") and progress[-1].startswith("diff: done in")
    assert "\r" not in result.stderr and "Loading weights" not in result.stderr


def _one_prompt(folder: Path) -> Path:
    path = folder / "p.txt"
    path.write_text("w5 w6 w7\n")
    return path


@pytest.mark.parametrize(
    ("command", "needles"),
    [
        ("bench", ["--json", "Print the report as JSON", "--workload", "--plot"]),
        ("generate", ["--backend", "alias ort", "--top-p", "--min-p", "--repetition-penalty", "--stop-id"]),
        ("export", ["--dtype", "fp32|fp16|bf16", "--force"]),
    ],
)
def test_every_option_has_help(command: str, needles: list[str], tmp_path: Path) -> None:
    result = run_cli([command, "--help"], tmp_path)
    text = " ".join(result.stdout.split())
    assert result.returncode == 0 and all(n in text for n in needles), text


def test_the_usage_errors_convention_is_one_line_exit_2(tiny_artifact: Path, tmp_path: Path) -> None:
    result = run_cli(["generate", str(tiny_artifact), "--backend", "foo", "--prompt", "w5"], tmp_path)
    assert (
        result.returncode == 2 and len(error_lines(result)) == 1 and "see `llamatrt generate --help`" in result.stderr
    )
    missing = run_cli(["generate", str(tmp_path / "none"), "--prompt", "w5"], tmp_path)
    assert missing.returncode == 1 and "llamatrt export --model MODEL --out" in missing.stderr
