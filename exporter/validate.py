"""Export self-check: both graphs in ONNX Runtime CPU vs PyTorch on a fixed prompt, prefill plus a
few teacher-forced decode steps. The measured max logits error goes into the manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from llamatrt.errors import ValidationError
from llamatrt.exporter.manifest import GraphSpec
from llamatrt.models.kv_cache import empty_cache
from llamatrt.models.llama import StaticLlama

# Max abs logits error accepted at export, by graph dtype (reference: PyTorch at the same dtype).
EXPORT_TOLERANCE = {"float32": 1e-3, "float16": 0.25, "bfloat16": 1.0}
DECODE_STEPS = 4  # teacher-forced decode calls after the prefill


def fixed_prompt(batch: int, seq: int, vocab: int) -> torch.Tensor:
    """Deterministic, varied token ids (no RNG): row b is a shifted arithmetic sequence."""
    ids = (torch.arange(seq)[None, :] * 7919 + torch.arange(batch)[:, None] * 104729 + 13) % vocab
    return ids.long()  # (batch, seq)


def _ort_session(path: Path) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def max_logits_error(
    folder: Path,
    prefill: GraphSpec,
    decode: GraphSpec,
    model: StaticLlama,
    steps: int = DECODE_STEPS,
    fused: bool = False,
) -> float:
    """Run prefill + `steps` decode calls through ORT and PyTorch on the same inputs (`fused`: the
    graphs with ONNX Runtime's attention)."""
    batch, seq = prefill.input("input_ids").shape
    max_cache_len = prefill.input("attention_mask").shape[1]
    dtype = model.model.embed_tokens.weight.dtype
    ids = fixed_prompt(batch, seq, model.config.vocab_size)
    mask = torch.ones(batch, max_cache_len, dtype=torch.long)
    positions = torch.arange(seq).expand(batch, seq)
    cache = empty_cache(model.config, batch, max_cache_len, dtype)
    calls = [(prefill, ids, positions, torch.arange(seq))]
    worst = 0.0
    ort_cache: list[np.ndarray] = [t.numpy().copy() for t in cache]  # eager writes in place
    sessions = {g.name: _ort_session(folder / (g.ort_path if fused else g.path)) for g in (prefill, decode)}
    with torch.no_grad():
        for step in range(steps + 1):
            graph, ids, positions, cache_position = calls[-1]
            ref = model(ids, positions, cache_position, mask, *cache)
            feeds = {"input_ids": ids.numpy(), "position_ids": positions.contiguous().numpy(),
                     "cache_position": cache_position.numpy(), "attention_mask": mask.numpy()}  # fmt: skip
            feeds.update(zip([t.name for t in graph.inputs[4:]], ort_cache, strict=True))
            out = sessions[graph.name].run(None, feeds)
            worst = max(worst, float(np.abs(out[0] - ref[0].float().numpy()).max()))
            cache, ort_cache = list(ref[1:]), out[1:]
            nxt = ref[0].argmax(-1, keepdim=True)  # teacher-forced on PyTorch's tokens
            pos = seq + step
            calls.append((decode, nxt, torch.full((batch, 1), pos), torch.tensor([pos])))
    return worst


def validate_export(
    folder: Path, prefill: GraphSpec, decode: GraphSpec, model: StaticLlama, dtype: str
) -> dict[str, Any]:
    """onnx.checker on both graphs, then the ORT-vs-PyTorch logits check; raise above tolerance."""
    import onnx

    fused = [False, True] if prefill.ort_path else [False]
    for path in [g.ort_path if f else g.path for f in fused for g in (prefill, decode)]:
        try:
            onnx.checker.check_model(str(folder / path), full_check=False)
        except onnx.checker.ValidationError as e:
            raise ValidationError(f"{path} fails onnx.checker ({str(e).splitlines()[0]}); please report") from e
    if dtype == "bfloat16":
        return {"backend": None, "skipped": "ONNX Runtime CPU cannot run bf16; run `llamatrt diff` on a GPU"}
    errors = {"ort_attention" if f else "portable": max_logits_error(folder, prefill, decode, model, fused=f)
              for f in fused}  # fmt: skip
    tolerance = EXPORT_TOLERANCE[dtype]
    for graphs, error in errors.items():
        if not error <= tolerance:
            raise ValidationError(
                f"ONNX Runtime logits of the {graphs} graphs differ from PyTorch by {error:.3g} (tolerance "
                f"{tolerance:g} for {dtype}); the export is wrong, nothing was written — please report with the model config"
            )
    return {
        "backend": "onnxruntime-cpu",
        "max_abs_logits_error": max(errors.values()),
        "max_abs_logits_error_by_graphs": errors,
        "tolerance": tolerance,
        "decode_steps": DECODE_STEPS,
    }
