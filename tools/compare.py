"""`llamatrt diff`: the accuracy ladder transformers -> StaticLlama -> artifact backend(s).

Three steps, each one function: run (teacher-forced logits, greedy tokens and perplexity per
stage), compare (metrics against transformers, per step), summarise (thresholds -> verdict).
Every stage is fed the reference's tokens, so every step is compared on the same context.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from llamatrt.base.artifact.manifest import Manifest
from llamatrt.base.artifact.precision import Thresholds, stage_thresholds
from llamatrt.base.artifact.variants import SHORT_PREFILL
from llamatrt.base.custom_ops import int4_activation_bits, kernel_path
from llamatrt.base.errors import InputError
from llamatrt.base.progress import Progress, no_progress
from llamatrt.runtime.backend import Backend
from llamatrt.runtime.generator import Generator
from llamatrt.runtime.registry import open_backend
from llamatrt.runtime.torch_backend import TorchBackend
from llamatrt.tools.contract_checks import run_contract_checks
from llamatrt.tools.report import AccuracyReport, StageResult
from llamatrt.tools.teacher_forcing import score

# (chat?, text): chat and plain, short and longer than a typical prefill chunk.
DEFAULT_PROMPTS: tuple[tuple[bool, str], ...] = (
    (True, "What is the capital of France?"),
    (False, "The three primary colors are"),
    (True, "Write a haiku about autumn leaves."),
    (False, "In 1969, the first humans landed on the Moon. " * 14 + "The mission was called"),  # > 128 tokens
)
PERPLEXITY_TEXT = (
    "The Moon is Earth's only natural satellite. It orbits at an average distance of 384,400 km, about "
    "thirty times the diameter of Earth. Tidal forces between Earth and the Moon have synchronized the "
    "Moon's orbital period with its rotation period, so the same side is always facing Earth. The Moon's "
    "gravitational pull produces tidal forces on Earth which are the main driver of ocean tides."
)


@dataclass(frozen=True)
class StageOutputs:
    """What one stage produced for all prompts."""

    name: str
    dtype: str
    logits: list[torch.Tensor]  # per prompt (steps, vocab), teacher-forced
    greedy: list[list[int]]  # per prompt, free-running greedy tokens
    perplexity: float


def _reference_outputs(hf_model: object, prompts: list[list[int]], steps: int, ppl_ids: list[int]) -> StageOutputs:
    logits, greedy = [], []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            out = hf_model.generate(  # type: ignore[attr-defined]
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=steps,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
            tokens = out[0, len(ids) :].tolist()
            full = hf_model(out[:, :-1]).logits[0, len(ids) - 1 :].float()  # type: ignore[operator]
            logits.append(full)
            greedy.append(tokens)
        ppl_logits = hf_model(torch.tensor([ppl_ids])).logits[0].float()  # type: ignore[operator]
    return StageOutputs("transformers", "float32", logits, greedy, perplexity(ppl_logits, ppl_ids))


def _stage_outputs(
    name: str, backend: Backend, prompts: list[list[int]], forced: list[list[int]], ppl_ids: list[int]
) -> StageOutputs:
    gen = Generator(backend)  # no stop ids: every step is compared
    logits = score(gen, prompts, forced)
    greedy = gen.generate(prompts, max_new_tokens=len(forced[0]))
    ppl_logits = score(gen, [ppl_ids[:1]], [ppl_ids[1:]])[0]
    return StageOutputs(name, weights_kind(backend), logits, greedy, perplexity(ppl_logits, ppl_ids))


def weights_kind(backend: Backend) -> str:
    """What a stage's thresholds key on: the artifact's precision, or for a quantized artifact run as
    it is (the torch backend always runs a float model), whether its blocks are the GGUF's own."""
    quantization = backend.manifest.quantization
    if not quantization or backend.name == "torch":
        return backend.manifest.dtype
    if all(origin.startswith("gguf") for origin in quantization["tensors"].values()):
        return "gguf-blocks" if quantization["accuracy_level"] in (0, 1) else "gguf-blocks+int8-activations"
    return str(quantization["scheme"])


CPU_FEATURES = ("avx2", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16", "asimddp", "sve")


def cpu_features() -> list[str]:
    """The CPU features that select ONNX Runtime's (MLAS) int8 and fp32 kernels, from /proc/cpuinfo."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = set(
        next(
            (line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith(("flags", "Features"))), []
        )
    )
    return [f for f in CPU_FEATURES if f in flags]


def kernel_note(backend: Backend, with_level: bool = True) -> str:
    """Which kernels ran a stage: results of int8 activation arithmetic differ between CPU kernel paths."""
    import onnxruntime

    quantization = backend.manifest.quantization
    level = quantization.get("accuracy_level") if quantization and with_level else None
    arithmetic = (
        ""
        if level is None
        else f", MatMulNBits accuracy level {level} ({'fp32' if level in (0, 1) else 'int8'} activations)"
    )
    if level is not None and quantization.get("int4_kernel") == "llamatrt":
        path = kernel_path()
        digits = {24: "three int8 digits (24 bits)", 16: "two int8 digits (16 bits)"}
        written = " or ".join(digits[b] for b in int4_activation_bits(quantization))
        arithmetic += (
            f"; 4-bit products on llamatrt's MatMulInt4, {path} path (fp32 activations as {written} per block of 32)"
        )
    return (
        f"kernel path of {backend.name}: onnxruntime {onnxruntime.__version__} on a CPU with "
        f"{', '.join(cpu_features()) or 'no listed features'}{arithmetic}"
    )


def perplexity(logits: torch.Tensor, ids: Sequence[int]) -> float:
    """exp(mean NLL) of ids[1:], where logits[i] predicts ids[i + 1]."""
    target = torch.tensor(ids[1:])
    nll = -logits[: len(target)].float().log_softmax(-1).gather(-1, target[:, None])[:, 0]
    return float(nll.mean().exp())


def compare_stage(stage: StageOutputs, ref: StageOutputs, thresholds: Thresholds) -> StageResult:
    """Per-step metrics against the reference, then the verdict under `thresholds`."""
    steps = ref.logits[0].shape[0]
    per_step: dict[str, list[float]] = {k: [] for k in ("max_abs", "mean_abs", "cosine", "kl", "top1", "top5")}
    for s in range(steps):
        a = torch.stack([r[s] for r in ref.logits])  # (prompts, vocab)
        b = torch.stack([c[s].float() for c in stage.logits])
        diff = (a - b).abs()
        log_p, log_q = a.log_softmax(-1), b.log_softmax(-1)
        top5_a, top5_b = a.topk(5).indices, b.topk(5).indices
        overlap = [len(set(x.tolist()) & set(y.tolist())) / 5 for x, y in zip(top5_a, top5_b, strict=True)]
        per_step["max_abs"].append(float(diff.max()))
        per_step["mean_abs"].append(float(diff.mean()))
        per_step["cosine"].append(float(torch.nn.functional.cosine_similarity(a, b, dim=-1).min()))
        per_step["kl"].append(float((log_p.exp() * (log_p - log_q)).sum(-1).max()))
        per_step["top1"].append(float((a.argmax(-1) == b.argmax(-1)).float().mean()))
        per_step["top5"].append(sum(overlap) / len(overlap))
    divergence = [_first_divergence(r, c) for r, c in zip(ref.greedy, stage.greedy, strict=True)]
    first = min((d for d in divergence if d is not None), default=None)
    return StageResult.summarise(stage.name, stage.dtype, per_step, first, stage.perplexity, ref.perplexity, thresholds)


def _first_divergence(a: Sequence[int], b: Sequence[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)


def run_diff(
    artifact: str | Path,
    backends: Sequence[str] = ("onnxruntime",),
    reference: str | None = None,
    prompts: Sequence[tuple[bool, str]] | None = None,
    steps: int = 16,
    progress: Progress = no_progress,
    verify: bool = True,
) -> AccuracyReport:
    """The whole ladder on one artifact; the report's bool is the verdict."""
    from transformers import LlamaForCausalLM

    from llamatrt.models.checkpoint import load_checkpoint
    from llamatrt.runtime.llm import LLM

    if steps < 1:
        raise InputError(f"--steps {steps} must be >= 1; pass --steps 1 or more")
    step = progress
    step("loading the reference")
    first = open_backend(artifact, backends[0], verify=verify)
    manifest: Manifest = first.manifest
    checkpoint = load_checkpoint(reference or manifest.source)
    if checkpoint.hf_dir is None:
        raise InputError("the reference must be a checkpoint on disk; pass --reference")
    hf_model = LlamaForCausalLM.from_pretrained(checkpoint.hf_dir, dtype=torch.float32).eval()
    llm = LLM(first)
    token_prompts = [llm.encode(text, chat=chat) for chat, text in (prompts or DEFAULT_PROMPTS)]
    notes: list[str] = []
    # Built-in texts are cut to fit a small cache (the user's own prompts are refused if they do not):
    # room for the prompt, the teacher-forced steps and a static prefill's padding.
    room = manifest.max_cache_len - steps - SHORT_PREFILL  # the most slots a static prefill pads with
    if prompts is None:
        for i, ids in enumerate(token_prompts):
            if len(ids) > room:
                token_prompts[i] = ids[-room:]  # the end of a prompt is where its answer starts
                notes.append(
                    f"built-in prompt {i} cut from {len(ids)} to its last {room} tokens to fit the cache of "
                    f"{manifest.max_cache_len}"
                )
    full = llm.encode(PERPLEXITY_TEXT)
    ppl_ids = full[: manifest.max_cache_len - SHORT_PREFILL]
    if len(ppl_ids) < len(full):
        notes.append(
            f"perplexity text cut from {len(full)} to {len(ppl_ids)} tokens to fit the cache of "
            f"{manifest.max_cache_len}"
        )
    step("running transformers")
    ref = _reference_outputs(hf_model, token_prompts, steps, ppl_ids)
    del hf_model
    forced = [g[:steps] for g in ref.greedy]
    stages = []
    step("running StaticLlama")
    with TorchBackend(first.folder, manifest, model=checkpoint.build_model()) as static:
        stages.append(_stage_outputs("StaticLlama", static, token_prompts, forced, ppl_ids))
    checks = []
    for i, kind in enumerate(backends):
        backend = first if i == 0 else open_backend(artifact, kind, verify=verify)
        with backend:
            step(f"running {kind}")
            stages.append(_stage_outputs(f"artifact/{kind}", backend, token_prompts, forced, ppl_ids))
            if backend.name == "onnxruntime":
                notes.append(kernel_note(backend))
            step(f"contract checks on {kind}")
            checks += run_contract_checks(backend, token_prompts, stage_thresholds(weights_kind(backend)).max_abs)
    results = [compare_stage(s, ref, stage_thresholds(s.dtype)) for s in stages]
    return AccuracyReport(
        str(artifact),
        checkpoint.source,
        manifest.dtype,
        len(token_prompts),
        steps,
        ref.perplexity,
        results,
        checks,
        notes,
    )
