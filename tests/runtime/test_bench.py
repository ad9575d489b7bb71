"""`llamatrt bench` on the tiny artifact: the JSON fields, a baseline ratio, the workload, the plot.
Speed itself is measured by running bench, never asserted in tests."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from llamatrt.cli import main
from llamatrt.tools.bench import measure_bandwidth
from llamatrt.tools.bench_workload import mixed_workload


def test_bench_json_with_baseline_contexts_and_workload(tiny_artifact: Path) -> None:
    result = CliRunner().invoke(
        main,
        [
            "bench",
            str(tiny_artifact),
            "--new-tokens",
            "6",
            "--prompt-len",
            "5",
            "--repeat",
            "2",
            "--baseline",
            "transformers",
            "--contexts",
            "10,14",
            "--workload",
            "4",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{") :])
    for key in ("decode_tokens_per_s", "ttft_ms", "ceiling_tokens_per_s", "baseline_decode_tokens_per_s"):
        assert report[key] > 0, key
    assert report["baseline_ratio"] == pytest.approx(
        report["decode_tokens_per_s"] / report["baseline_decode_tokens_per_s"]
    )
    # the share of the ceiling it names, shown as at most 100% (more would mean a wrong bandwidth)
    share = 100 * report["decode_tokens_per_s"] / report["ceiling_tokens_per_s"]
    assert report["percent_of_ceiling"] == pytest.approx(min(100.0, share)) and report["percent_of_ceiling"] > 0
    assert report["bandwidth_working_set_bytes"] == report["weights_bytes"]
    backend = report["backends"][0]
    assert report["batch"] == 3 and set(backend["by_context"]) == {"10", "14"} and backend["held_mb"] >= 0
    assert [w["backend"] for w in report["workload"]] == [
        "onnxruntime workload continuous",
        "onnxruntime workload lockstep",
    ]
    for run in report["workload"]:
        assert run["output_tokens_per_s"] > 0 and run["inter_token_p99_ms"] >= run["inter_token_p50_ms"] > 0


def test_the_workload_is_fixed_and_fits_the_cache() -> None:
    a, b = mixed_workload(24, 99, 1024), mixed_workload(24, 99, 1024)
    assert a == b and len(a.prompts) == 24
    assert all(10 <= len(p) <= 300 for p in a.prompts) and all(16 <= n <= 256 for n in a.new_tokens)
    small = mixed_workload(24, 99, 64)
    assert all(len(p) + n + 16 <= 64 or len(p) == 1 for p, n in zip(small.prompts, small.new_tokens, strict=True))


def test_bench_rejects_wrong_batch_and_oversized_runs(tiny_artifact: Path) -> None:
    result = CliRunner().invoke(main, ["bench", str(tiny_artifact), "--batch", "1"])
    assert result.exit_code == 1 and "re-export with --batch 1" in result.output
    result = CliRunner().invoke(main, ["bench", str(tiny_artifact), "--prompt-len", "40", "--new-tokens", "20"])
    assert result.exit_code == 1 and "exceed the cache" in result.output


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib not installed")
def test_bench_plot(tiny_artifact: Path, tmp_path: Path) -> None:
    plot = tmp_path / "decode.png"
    result = CliRunner().invoke(
        main,
        [
            "bench",
            str(tiny_artifact),
            "--new-tokens",
            "4",
            "--repeat",
            "1",
            "--contexts",
            "8,12",
            "--baseline",
            "transformers",
            "--plot",
            str(plot),
        ],
    )
    assert result.exit_code == 0, result.output
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bandwidth_is_plausible() -> None:
    assert 0.5 < measure_bandwidth(64 << 20, repeat=2) < 2000


def test_bench_several_artifacts_in_one_run(tiny_artifact: Path) -> None:
    result = CliRunner().invoke(
        main, ["bench", str(tiny_artifact), str(tiny_artifact), "--new-tokens", "4", "--repeat", "1", "--json"]
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output[result.output.index("{") :])
    assert "runs" in payload or payload["aggregate_ratio_vs_first"] == 1.0


@pytest.mark.slow  # end to end, over 6 s here: `make test` runs it, `make test-fast` does not
def test_the_onnxruntime_genai_baseline_builds_its_own_model_of_the_checkpoint(
    tiny_artifact: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai not installed (pip install 'llamatrt[genai]')")
    monkeypatch.setenv("LLAMATRT_CACHE", str(tmp_path))
    args = [
        "bench",
        str(tiny_artifact),
        "--new-tokens",
        "6",
        "--prompt-len",
        "5",
        "--repeat",
        "1",
        "--baseline",
        "onnxruntime-genai",
        "--json",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{") :])
    assert report["baseline"]["backend"] == "onnxruntime-genai fp32" and report["baseline_decode_tokens_per_s"] > 0
    # genai runs as its users run it: a process of its own, its default threads, both sides' threads said
    assert any("its own process" in note and "intra-op threads" in note for note in report["notes"])
    assert any(note.startswith("llamatrt runs ONNX Runtime with") for note in report["notes"])
    assert report["baseline"]["held_mb"] > 0  # the worker's own memory, not this process's
    assert [p.name for p in (tmp_path / "genai").iterdir() if p.is_dir() and (p / "genai_config.json").is_file()]
    again = CliRunner().invoke(main, args)  # the built model is cached
    assert again.exit_code == 0, again.output
