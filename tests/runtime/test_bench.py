"""`llamatrt bench` on the tiny artifact: the JSON fields, a baseline ratio, the plot. Speed itself is
measured by running bench, never asserted in tests."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from llamatrt.cli import main
from llamatrt.runtime.bench import measure_bandwidth


def test_bench_json_with_baseline(tiny_artifact: Path) -> None:
    result = CliRunner().invoke(main, ["bench", str(tiny_artifact), "--new-tokens", "8", "--prompt-len", "5",
                                       "--repeat", "2", "--baseline", "transformers", "--contexts", "10,14", "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{") :])
    for key in (
        "decode_tokens_per_s",
        "ttft_ms",
        "ceiling_tokens_per_s",
        "baseline_decode_tokens_per_s",
        "baseline_ratio",
    ):
        assert report[key] > 0, key
    assert report["baseline_ratio"] == pytest.approx(
        report["decode_tokens_per_s"] / report["baseline_decode_tokens_per_s"]
    )
    assert report["batch"] == 3 and set(report["backends"][0]["by_context"]) == {"10", "14"}


def test_bench_rejects_wrong_batch_and_oversized_runs(tiny_artifact: Path) -> None:
    result = CliRunner().invoke(main, ["bench", str(tiny_artifact), "--batch", "1"])
    assert result.exit_code == 1 and "re-export with --batch 1" in result.output
    result = CliRunner().invoke(main, ["bench", str(tiny_artifact), "--prompt-len", "40", "--new-tokens", "20"])
    assert result.exit_code == 1 and "exceed the cache" in result.output


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib not installed")
def test_bench_plot(tiny_artifact: Path, tmp_path: Path) -> None:
    plot = tmp_path / "decode.png"
    result = CliRunner().invoke(main, ["bench", str(tiny_artifact), "--new-tokens", "4", "--repeat", "1",
                                       "--contexts", "8,12", "--plot", str(plot)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bandwidth_is_plausible() -> None:
    assert 0.5 < measure_bandwidth(megabytes=64, repeat=2) < 2000


def test_bench_several_artifacts_in_one_run(tiny_artifact: Path) -> None:
    result = CliRunner().invoke(main, ["bench", str(tiny_artifact), str(tiny_artifact), "--new-tokens", "4",
                                       "--repeat", "1", "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    runs = json.loads(result.output[result.output.index("{") :])["runs"]
    assert len(runs) == 2 and runs[0]["aggregate_ratio_vs_first"] == 1.0 and runs[1]["aggregate_ratio_vs_first"] > 0
