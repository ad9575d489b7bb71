"""`bench --baseline onnxruntime-genai`: the tool a CPU user would pick instead, on the same checkpoint.

onnxruntime-genai's own model builder makes its model from the artifact's source checkpoint, at the
precision that matches the artifact (int4 beside an int4 artifact, fp32 beside fp32), once, cached;
its `og.Generator` then decodes the same prompt greedily in the same interleaved rounds, in a process
of its own with its default threads (runtime.genai_worker). An optional extra
(`pip install 'llamatrt[genai]'`); the builder is their tool, so it runs as they document it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from llamatrt.base.artifact.manifest import Manifest
from llamatrt.base.errors import InputError
from llamatrt.models.gguf import cache_root

GENAI_PRECISION = {"int4": "int4", "int8": "int8", "float32": "fp32"}


def genai_precision(manifest: Manifest) -> str:
    kind = manifest.quantization.get("scheme", manifest.dtype)
    if kind not in GENAI_PRECISION:
        raise InputError(
            f"the onnxruntime-genai baseline runs on CPU in fp32, int8 or int4, not {kind}; "
            "bench an fp32 or quantized artifact"
        )
    return GENAI_PRECISION[kind]


def genai_model(hf_dir: Path, precision: str) -> Path:
    """The builder's model for `hf_dir`, made once into the cache (atomic rename)."""
    target = cache_root() / "genai" / f"{hf_dir.name}-{precision}-cpu"
    if (target / "genai_config.json").is_file():
        return target
    source = target.with_name(target.name + ".src")
    source.mkdir(parents=True, exist_ok=True)
    for item in hf_dir.iterdir():  # the builder trips on `"quantization_config": null`: a cleaned config
        link = source / item.name
        if item.name != "config.json" and not link.exists():
            link.symlink_to(item.resolve())
    config = json.loads((hf_dir / "config.json").read_text())
    config.pop("quantization_config", None)
    (source / "config.json").write_text(json.dumps(config))
    staging = target.with_name(target.name + ".tmp")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "onnxruntime_genai.models.builder",
            "-i",
            str(source),
            "-o",
            str(staging),
            "-p",
            precision,
            "-e",
            "cpu",
            "-c",
            str(staging.with_suffix(".cache")),
        ],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0 or not (staging / "genai_config.json").is_file():
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise InputError(f"onnxruntime-genai's model builder failed ({tail[0][:200]}); drop --baseline")
    staging.rename(target)
    return target


def genai_timer_run(model_dir: Path, batch: int, prompt_len: int, new_tokens: int, vocab: int) -> GenaiWorker:
    """A callable: one greedy generation of `new_tokens` on the fixed prompt, timed per token, in
    onnxruntime-genai's own process (runtime.genai_worker), as its users run it: in llamatrt's
    process it would share the cores with llamatrt's ONNX Runtime threads and torch's."""
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError as e:
        raise InputError("the onnxruntime-genai baseline needs it installed: pip install 'llamatrt[genai]'") from e
    return GenaiWorker(model_dir, batch, prompt_len, new_tokens, vocab)


class GenaiWorker:
    """The worker process, driven one line at a time: a token count in, one JSON line of timings out."""

    def __init__(self, model_dir: Path, batch: int, prompt_len: int, new_tokens: int, vocab: int) -> None:
        import weakref

        self.new_tokens = new_tokens
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "llamatrt.tools.genai_worker",
                str(model_dir),
                str(batch),
                str(prompt_len),
                str(vocab),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        weakref.finalize(self, self.proc.kill)
        self.info: dict[str, Any] = self._read()  # after its warm-up: its threads and held memory

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise InputError(
                "the onnxruntime-genai worker exited; run `python -m llamatrt.tools.genai_worker` "
                "to see why, or drop --baseline"
            )
        return dict(json.loads(line))

    def __call__(self, tokens: int | None = None) -> dict[str, float]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{tokens or self.new_tokens}\n")
        self.proc.stdin.flush()
        return {k: float(v) for k, v in self._read().items()}

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
