"""`llamatrt.load(artifact)`: text in, text out, over the one loop.

Adds what token ids lack: the artifact's tokenizer and chat template, and per request a
`TextTracker` that turns its steps into text deltas (held back while a multi-byte character is
incomplete), cuts the text at the first stop string (and drops the tokens that spelled it), and
ends in a `Result`. The server reuses the same tracker, so text behaves the same everywhere.
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
from llamatrt.runtime.stopping import Detokenize, find_stop
from llamatrt.runtime.tokenizer import ArtifactTokenizer

Prompt = str | Sequence[int]
Message = Mapping[str, str]


@dataclass
class Result:
    index: int  # the prompt's position in the call
    text: str
    token_ids: list[int]  # the tokens of `text` (a stop string's tokens are not among them)
    finish_reason: str  # "stop", "length" or "cancelled"
    stop: str | int | None  # the stop string or stop token id that ended it, if one did
    prompt_tokens: int
    ttft_ms: float
    decode_tokens_per_s: float
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None or k == "stop"}


@dataclass(frozen=True)
class TextDelta:
    index: int
    text: str  # text added since the previous delta of this prompt
    token_id: int | None
    finish_reason: str | None
    stop: str | int | None = None
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()


@dataclass
class TextTracker:
    """One request's steps -> text deltas -> its Result."""

    index: int
    prompt_tokens: int
    decode: Detokenize | None  # None: an artifact without a tokenizer (token ids only)
    stop_strings: tuple[str, ...] = ()
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[list[tuple[int, float]]] = field(default_factory=list)
    emitted: str = ""
    first_s: float | None = None
    last_s: float = 0.0
    finish_reason: str | None = None
    stop: str | int | None = None
    kept: int | None = None  # tokens kept when a stop string cut the text

    def apply(self, step: Step) -> TextDelta | None:
        """The step's text delta, or None while a multi-byte character is incomplete."""
        self.first_s = step.elapsed_s if self.first_s is None else self.first_s
        self.last_s = step.elapsed_s
        self.finish_reason, self.stop = step.finish_reason, step.stop
        if step.token_id is not None:
            self.tokens.append(step.token_id)
            if step.logprob is not None:
                self.logprobs.append(step.logprob)
            if step.top_logprobs:
                self.top.append(list(step.top_logprobs))
        if self.decode is None:
            return TextDelta(
                self.index, "", step.token_id, step.finish_reason, step.stop, step.logprob, step.top_logprobs
            )
        text = self.decode(self.tokens)
        hit = find_stop(text, self.stop_strings)
        if hit is not None:
            text = text[: hit[0]]
            self.kept = self._tokens_within(len(text))
        if step.finish_reason is None and text.endswith("\ufffd"):
            return None  # an incomplete multi-byte character: wait for the next token
        delta, self.emitted = text[len(self.emitted) :], text
        return TextDelta(
            self.index, delta, step.token_id, step.finish_reason, step.stop, step.logprob, step.top_logprobs
        )

    def _tokens_within(self, length: int) -> int:
        """The most leading tokens whose text fits in the first `length` characters."""
        assert self.decode is not None
        for count in range(len(self.tokens), -1, -1):
            if len(self.decode(self.tokens[:count])) <= length:
                return count
        return 0

    def result(self, logprobs: bool) -> Result:
        decode_s = self.last_s - (self.first_s or 0.0)
        kept = len(self.tokens) if self.kept is None else self.kept
        decoded = max(0, len(self.tokens) - 1)
        return Result(
            index=self.index,
            text=self.emitted,
            token_ids=self.tokens[:kept],
            finish_reason=self.finish_reason or "length",
            stop=self.stop,
            prompt_tokens=self.prompt_tokens,
            ttft_ms=1000.0 * (self.first_s or 0.0),
            decode_tokens_per_s=decoded / decode_s if decode_s > 0 else 0.0,
            logprobs=self.logprobs[:kept] if logprobs else None,
            top_logprobs=self.top[:kept] if self.top else None,
        )


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
            messages = [{"role": "system", "content": system}] if system else []
            return self.encode_chat([*messages, {"role": "user", "content": prompt}])
        if system:
            raise InputError("a system message needs the chat template; pass --chat with --system")
        return self._need_tokenizer().encode(prompt)

    def encode_chat(self, messages: Sequence[Message]) -> list[int]:
        tokenizer = self._need_tokenizer()
        return tokenizer.encode(tokenizer.apply_chat_template(messages), add_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self._need_tokenizer().decode(ids)

    def stream(
        self, prompts: Prompt | Sequence[Prompt], *, max_new_tokens: int = 128, chat: bool = False,
        system: str | None = None, stop: Sequence[str] = (), stop_ids: Sequence[int] = (), logprobs: bool = False,
        top_logprobs: int = 0, **sampling: Any,
    ) -> Iterator[TextDelta]:  # fmt: skip
        """Text deltas of every prompt as tokens arrive (interleaved when several run at once)."""
        for _, delta in self._run(
            prompts, max_new_tokens, chat, system, stop, stop_ids, logprobs, top_logprobs, sampling
        ):
            if delta is not None:
                yield delta

    def generate(
        self, prompts: Prompt | Sequence[Prompt], *, max_new_tokens: int = 128, chat: bool = False,
        system: str | None = None, stop: Sequence[str] = (), stop_ids: Sequence[int] = (), logprobs: bool = False,
        top_logprobs: int = 0, **sampling: Any,
    ) -> list[Result]:  # fmt: skip
        trackers: list[TextTracker] = []
        for latest, _ in self._run(
            prompts, max_new_tokens, chat, system, stop, stop_ids, logprobs, top_logprobs, sampling
        ):
            trackers = latest
        return [t.result(logprobs or bool(top_logprobs)) for t in trackers]

    def _run(
        self, prompts: Prompt | Sequence[Prompt], max_new_tokens: int, chat: bool, system: str | None,
        stop: Sequence[str], stop_ids: Sequence[int], logprobs: bool, top_logprobs: int, sampling: Mapping[str, Any],
    ) -> Iterator[tuple[list[TextTracker], TextDelta | None]]:  # fmt: skip
        params = sampling_params(sampling)
        ids = [self.encode(p, chat=chat, system=system) for p in _as_prompt_list(prompts)]
        decode = self.decode if self.tokenizer is not None else None
        trackers = [TextTracker(i, len(p), decode, tuple(stop)) for i, p in enumerate(ids)]
        steps = self.generator.stream(ids, max_new_tokens, params, tuple(stop), logprobs or bool(top_logprobs),
                                      top_logprobs, stop_ids)  # fmt: skip
        for step in steps:
            yield trackers, trackers[step.index].apply(step)

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def sampling_params(sampling: Mapping[str, Any]) -> SamplingParams:
    """Sampling options by name, checked (one line naming an unknown option)."""
    try:
        return SamplingParams(**sampling).checked()
    except TypeError as e:
        raise InputError(f"unknown sampling option ({e}); use temperature, top_k, top_p, min_p, "
                         "repetition_penalty, seed") from e  # fmt: skip


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    """One prompt (text, or a list of token ids) or a list of them -> a list of prompts."""
    if isinstance(prompts, str) or (len(prompts) > 0 and isinstance(prompts[0], int)):
        return [prompts]  # type: ignore[list-item]
    return list(prompts)  # type: ignore[arg-type]


def load(artifact: str | Path, backend: str = "onnxruntime", device: str | None = None, verify: bool = True) -> LLM:
    """Open an exported artifact on a backend: `llamatrt.load("out/smollm2").generate("Hi")`.
    verify=False skips hashing its files (their structure is still checked)."""
    return LLM(open_backend(artifact, backend, device, verify=verify))
