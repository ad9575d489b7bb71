"""`llamatrt.load(artifact)`: text in, text out, over the one Generator.

Adds what token ids lack: the artifact's tokenizer and chat template, text deltas for streaming
(held back while a multi-byte character is incomplete), stop strings cut from the text, timings.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llamatrt.artifact.reader import tokenizer_dir
from llamatrt.errors import InputError
from llamatrt.runtime.backend import Backend
from llamatrt.runtime.generator import Generator, Step
from llamatrt.runtime.registry import open_backend
from llamatrt.runtime.sampling import SamplingParams
from llamatrt.runtime.stopping import cut_at_stop
from llamatrt.runtime.tokenizer import ArtifactTokenizer

Prompt = str | Sequence[int]
Message = Mapping[str, str]


@dataclass
class Result:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    ttft_ms: float
    decode_tokens_per_s: float
    logprobs: list[float] | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class TextDelta:
    index: int
    text: str  # text added since the previous delta of this prompt
    token_id: int | None
    finish_reason: str | None


@dataclass
class _Progress:
    prompt_tokens: int
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    emitted: str = ""
    first_s: float | None = None
    last_s: float = 0.0
    finish_reason: str | None = None


class LLM:
    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.manifest = backend.manifest
        self.tokenizer = self._load_tokenizer()
        tok = self.manifest.tokenizer
        self.generator = Generator(
            backend, stop_ids=self.manifest.eos_token_ids, pad_id=int(tok.get("pad_token_id") or 0),
            detokenize=self.decode if self.tokenizer is not None else None,
        )  # fmt: skip

    def _load_tokenizer(self) -> ArtifactTokenizer | None:
        folder = tokenizer_dir(self.backend.folder, self.manifest)
        return None if folder is None else ArtifactTokenizer(folder, self.manifest.tokenizer)

    def _need_tokenizer(self) -> ArtifactTokenizer:
        if self.tokenizer is None:
            raise InputError("this artifact has no tokenizer; pass token ids (--input-ids) instead of text")
        return self.tokenizer

    def encode(self, prompt: Prompt, chat: bool = False, system: str | None = None) -> list[int]:
        if not isinstance(prompt, str):
            return [int(t) for t in prompt]
        if not prompt:
            raise InputError("the prompt is empty; give some text")
        if chat:
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": prompt}
            ]
            return self.encode_chat(messages)
        return self._need_tokenizer().encode(prompt)

    def encode_chat(self, messages: Sequence[Message]) -> list[int]:
        tokenizer = self._need_tokenizer()
        return tokenizer.encode(tokenizer.apply_chat_template(messages), add_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self._need_tokenizer().decode(ids)

    def stream(
        self, prompts: Prompt | Sequence[Prompt], *, max_new_tokens: int = 128, chat: bool = False,
        stop: Sequence[str] = (), logprobs: bool = False, **sampling: Any,
    ) -> Iterator[TextDelta]:  # fmt: skip
        """Text deltas of every prompt as tokens arrive (interleaved across a batch)."""
        for _, delta in self._run(prompts, max_new_tokens, chat, stop, logprobs, sampling):
            if delta is not None:
                yield delta

    def generate(
        self, prompts: Prompt | Sequence[Prompt], *, max_new_tokens: int = 128, chat: bool = False,
        stop: Sequence[str] = (), logprobs: bool = False, **sampling: Any,
    ) -> list[Result]:  # fmt: skip
        states: list[_Progress] = []
        for latest, _ in self._run(prompts, max_new_tokens, chat, stop, logprobs, sampling):
            states = latest
        return [self._result(s, logprobs) for s in states]

    def _run(
        self, prompts: Prompt | Sequence[Prompt], max_new_tokens: int, chat: bool, stop: Sequence[str],
        logprobs: bool, sampling: Mapping[str, Any],
    ) -> Iterator[tuple[list[_Progress], TextDelta | None]]:  # fmt: skip
        try:
            params = SamplingParams(**sampling)
        except TypeError as e:
            raise InputError(f"unknown sampling option ({e}); use temperature, top_k, top_p, min_p, "
                             "repetition_penalty, seed") from e  # fmt: skip
        ids = [self.encode(p, chat=chat) for p in _as_prompt_list(prompts)]
        states = [_Progress(len(p)) for p in ids]
        for step in self.generator.stream(ids, max_new_tokens, params, tuple(stop), logprobs):
            yield states, self._apply(states[step.index], step, stop)

    def _apply(self, state: _Progress, step: Step, stop: Sequence[str]) -> TextDelta | None:
        state.first_s = step.elapsed_s if state.first_s is None else state.first_s
        state.last_s = step.elapsed_s
        state.finish_reason = step.finish_reason
        if step.token_id is not None:
            state.tokens.append(step.token_id)
            if step.logprob is not None:
                state.logprobs.append(step.logprob)
        if self.tokenizer is None:
            return TextDelta(step.index, "", step.token_id, step.finish_reason)
        text = cut_at_stop(self.decode(state.tokens), stop)
        if step.finish_reason is None and text.endswith("\ufffd"):
            return None  # an incomplete multi-byte character: wait for the next token
        delta, state.emitted = text[len(state.emitted) :], text
        return TextDelta(step.index, delta, step.token_id, step.finish_reason)

    def _result(self, state: _Progress, logprobs: bool) -> Result:
        decode_s = state.last_s - (state.first_s or 0.0)
        decoded = max(0, len(state.tokens) - 1)
        return Result(
            text=state.emitted if self.tokenizer is not None else "",
            token_ids=state.tokens,
            finish_reason=state.finish_reason or "length",
            prompt_tokens=state.prompt_tokens,
            ttft_ms=1000.0 * (state.first_s or 0.0),
            decode_tokens_per_s=decoded / decode_s if decode_s > 0 else 0.0,
            logprobs=state.logprobs if logprobs else None,
        )

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    """One prompt (text, or a list of token ids) or a list of them -> a list of prompts."""
    if isinstance(prompts, str) or (len(prompts) > 0 and isinstance(prompts[0], int)):
        return [prompts]  # type: ignore[list-item]
    return list(prompts)  # type: ignore[arg-type]


def load(artifact: str | Path, backend: str = "onnxruntime", device: str | None = None, verify: bool = True) -> LLM:
    """Open an exported artifact on a backend: `llamatrt.load("out/smollm2").generate("Hi")`.
    verify=False skips hashing its files (their structure is still checked)."""
    return LLM(open_backend(artifact, backend, device, verify=verify))
