"""`bench --baseline onnxruntime-genai`: the tool a CPU user would pick instead, on the same checkpoint.

onnxruntime-genai's own model builder makes its model from the artifact's source checkpoint, at the
precision that matches the artifact (int4 beside an int4 artifact, fp32 beside fp32), once, cached;
its `og.Generator` then decodes the same prompt greedily in the same interleaved rounds. An optional
extra (`pip install 'llamatrt[genai]'`); the builder is their tool, so it runs as they document it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from llamatrt.artifact.feeds import fixed_prompt
from llamatrt.artifact.manifest import Manifest
from llamatrt.errors import InputError
from llamatrt.models.gguf import cache_root

GENAI_PRECISION = {"int4": "int4", "int8": "int8", "float32": "fp32"}


def genai_precision(manifest: Manifest) -> str:
    kind = manifest.quantization.get("scheme", manifest.dtype)
    if kind not in GENAI_PRECISION:
        raise InputError(f"the onnxruntime-genai baseline runs on CPU in fp32, int8 or int4, not {kind}; "
                         "bench an fp32 or quantized artifact")  # fmt: skip
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
    done = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(source), "-o",
                           str(staging), "-p", precision, "-e", "cpu", "-c", str(staging.with_suffix(".cache"))],
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0 or not (staging / "genai_config.json").is_file():
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise InputError(f"onnxruntime-genai's model builder failed ({tail[0][:200]}); drop --baseline")
    staging.rename(target)
    return target


def genai_timer_run(model_dir: Path, batch: int, prompt_len: int, new_tokens: int, vocab: int) -> Any:
    """A callable: one greedy generation of `new_tokens` on the fixed prompt, timed per token."""
    try:
        import onnxruntime_genai as og
    except ImportError as e:
        raise InputError("the onnxruntime-genai baseline needs it installed: pip install 'llamatrt[genai]'") from e
    import numpy as np

    model = og.Model(str(model_dir))
    ids = fixed_prompt(batch, prompt_len, vocab).numpy().astype(np.int32)

    def run(tokens: int = new_tokens) -> dict[str, float]:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=prompt_len + tokens, min_length=prompt_len + tokens, batch_size=batch,
                                  do_sample=False)  # fmt: skip
        generator = og.Generator(model, params)
        start = time.perf_counter()
        generator.append_tokens(ids)
        times = []
        while not generator.is_done():
            generator.generate_next_token()
            times.append(time.perf_counter())
        return {"ttft_ms": 1000 * (times[0] - start), "prefill_tokens_per_s": batch * prompt_len / (times[0] - start),
                "decode_tokens_per_s": batch * (len(times) - 1) / (times[-1] - times[0])}  # fmt: skip

    run(4)  # warm-up
    return run
