"""`llamatrt.load(artifact)`: text in, text out, over the one loop.

Adds what token ids lack: the artifact's tokenizer and chat template, and per request a
`TextTracker` that gathers its steps (whose text the loop's one incremental detokenizer made, cut
at the first stop string) into text deltas and a `Result` (without the tokens that spelled the stop
string). The server reuses the same tracker, so text behaves the same everywhere.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llamatrt.base.artifact.reader import tokenizer_dir
from llamatrt.base.errors import ConstraintError, InputError
from llamatrt.runtime.backend import Backend
from llamatrt.runtime.detokenizer import TextStream, TokenizerPieces
from llamatrt.runtime.generator import Generator, Step
from llamatrt.runtime.prefix_cache import DEFAULT_PREFIX_CACHE_MB, PrefixCache
from llamatrt.runtime.registry import open_backend
from llamatrt.runtime.sampling_params import sampling_params
from llamatrt.runtime.scheduler import Scheduler
from llamatrt.runtime.structured import Grammar, GrammarEngine, check_answer
from llamatrt.runtime.tokenizer import ArtifactTokenizer, clean_up_tokenization

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
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache, not prefilled
    # with a grammar: the answer was checked against its JSON schema (finish_reason "stop"); a
    # "length" answer is cut short and never presented as valid
    validated: bool | None = None

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
    """One request's steps -> text deltas -> its Result. The text itself comes from the loop's one
    incremental detokenizer (runtime.detokenizer), already cut at a stop string."""

    index: int
    prompt_tokens: int
    has_text: bool = True  # False: an artifact without a tokenizer (token ids only)
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[list[tuple[int, float]]] = field(default_factory=list)
    emitted: str = ""
    first_s: float | None = None
    last_s: float = 0.0
    finish_reason: str | None = None
    stop: str | int | None = None
    kept: int | None = None  # tokens kept when a stop string cut the text
    cached_tokens: int = 0

    def apply(self, step: Step) -> TextDelta | None:
        """The step's text delta, or None while its text is held back (an incomplete multi-byte
        character, or the beginning of a stop string)."""
        self.first_s = step.elapsed_s if self.first_s is None else self.first_s
        self.last_s = step.elapsed_s
        self.finish_reason, self.stop = step.finish_reason, step.stop
        self.cached_tokens = max(self.cached_tokens, step.cached_tokens)
        if step.token_id is not None:
            self.tokens.append(step.token_id)
            if step.logprob is not None:
                self.logprobs.append(step.logprob)
            if step.top_logprobs:
                self.top.append(list(step.top_logprobs))
        if step.kept is not None:
            self.kept = step.kept
        if self.has_text and not step.text and step.finish_reason is None:
            return None
        self.emitted += step.text
        return TextDelta(
            self.index, step.text, step.token_id, step.finish_reason, step.stop, step.logprob, step.top_logprobs
        )

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
            cached_tokens=self.cached_tokens,
        )


class LLM:
    def __init__(self, backend: Backend, prefix_cache_mb: int = DEFAULT_PREFIX_CACHE_MB) -> None:
        """`prefix_cache_mb`: memory for the keys and values of prompt beginnings already computed
        (runtime.prefix_cache), on the backend's device; 0 turns the prefix cache off."""
        if prefix_cache_mb < 0:
            raise InputError(f"prefix cache of {prefix_cache_mb} MB; give 0 (off) or more")
        self.backend = backend
        self.manifest = backend.manifest
        self.tokenizer = self._load_tokenizer()
        tok = self.manifest.tokenizer
        self.generator = Generator(
            backend,
            stop_ids=self.manifest.eos_token_ids,
            pad_id=int(tok.get("pad_token_id") or 0),
            text=self.text_stream if self.tokenizer is not None else None,
            prefix_cache=PrefixCache(prefix_cache_mb << 20),
        )

    @property
    def grammars(self) -> GrammarEngine:
        """The grammar engine of this LLM's loop, made on first use from the artifact's tokenizer."""
        scheduler = self.generator.scheduler
        if scheduler.grammars is None:
            tokenizer = self._need_tokenizer()
            scheduler.grammars = GrammarEngine(
                tokenizer.backend.to_str(), self.manifest.config.vocab_size, self.manifest.eos_token_ids
            )
        return scheduler.grammars

    def grammar(
        self, json_schema: Mapping[str, Any] | None = None, grammar: str | None = None, json_object: bool = False
    ) -> Grammar | None:
        """The compiled grammar of at most one of: a JSON schema, a Lark grammar, any JSON object."""
        if sum(x is not None and x is not False for x in (json_schema, grammar, json_object)) > 1:
            raise InputError("give one of json_schema, grammar and json_object, not several")
        if json_schema is not None:
            return self.grammars.json_schema(json_schema)
        if grammar is not None:
            return self.grammars.lark(grammar)
        return self.grammars.json_object() if json_object else None

    def checked(self, result: Result, grammar: Grammar | None) -> Result:
        """`result` with its answer checked against the grammar's schema; a complete answer that does
        not satisfy it is an error, never handed out."""
        if grammar is None:
            return result
        problem = check_answer(grammar, result.text, result.finish_reason)
        if problem is not None:
            self.grammars.stats.validation_failures += 1
            raise ConstraintError(f"the answer does not satisfy its schema ({problem}); report this as a bug")
        result.validated = result.finish_reason == "stop" and grammar.schema is not None
        return result

    @property
    def scheduler(self) -> Scheduler:
        """The one loop this LLM runs: a server drives it (`serve_forever`) and submits to it."""
        return self.generator.scheduler

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
        return self._need_tokenizer().encode_chat(messages)

    def text_stream(self, stop_strings: Sequence[str]) -> TextStream:
        """A request's incremental text (runtime.detokenizer)."""
        tokenizer = self._need_tokenizer()
        clean_up = clean_up_tokenization if tokenizer.clean_up_spaces else None
        return TextStream(TokenizerPieces(tokenizer.backend, clean_up), stop_strings)

    def decode(self, ids: Sequence[int]) -> str:
        return self._need_tokenizer().decode(ids)

    def stream(
        self,
        prompts: Prompt | Sequence[Prompt],
        *,
        max_new_tokens: int = 128,
        chat: bool = False,
        system: str | None = None,
        stop: Sequence[str] = (),
        stop_ids: Sequence[int] = (),
        logprobs: bool = False,
        top_logprobs: int = 0,
        json_schema: Mapping[str, Any] | None = None,
        grammar: str | None = None,
        **sampling: Any,
    ) -> Iterator[TextDelta]:
        """Text deltas of every prompt as tokens arrive (interleaved when several run at once).
        `json_schema` (a dict) or `grammar` (Lark) holds every answer to it while generated."""
        compiled = self.grammar(json_schema, grammar)
        for _, delta in self._run(
            prompts, max_new_tokens, chat, system, stop, stop_ids, logprobs, top_logprobs, sampling, compiled
        ):
            if delta is not None:
                yield delta

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        *,
        max_new_tokens: int = 128,
        chat: bool = False,
        system: str | None = None,
        stop: Sequence[str] = (),
        stop_ids: Sequence[int] = (),
        logprobs: bool = False,
        top_logprobs: int = 0,
        json_schema: Mapping[str, Any] | None = None,
        grammar: str | None = None,
        **sampling: Any,
    ) -> list[Result]:
        """Every prompt's Result. `json_schema` (a dict) or `grammar` (Lark) holds every answer to it
        while generated; an answer to a schema is checked against it before it is returned
        (`Result.validated`)."""
        compiled = self.grammar(json_schema, grammar)
        trackers: list[TextTracker] = []
        for latest, _ in self._run(
            prompts, max_new_tokens, chat, system, stop, stop_ids, logprobs, top_logprobs, sampling, compiled
        ):
            trackers = latest
        return [self.checked(t.result(logprobs or bool(top_logprobs)), compiled) for t in trackers]

    def _run(
        self,
        prompts: Prompt | Sequence[Prompt],
        max_new_tokens: int,
        chat: bool,
        system: str | None,
        stop: Sequence[str],
        stop_ids: Sequence[int],
        logprobs: bool,
        top_logprobs: int,
        sampling: Mapping[str, Any],
        grammar: Grammar | None = None,
    ) -> Iterator[tuple[list[TextTracker], TextDelta | None]]:
        params = sampling_params(sampling)
        ids = [self.encode(p, chat=chat, system=system) for p in _as_prompt_list(prompts)]
        trackers = [TextTracker(i, len(p), self.tokenizer is not None) for i, p in enumerate(ids)]
        steps = self.generator.stream(
            ids,
            max_new_tokens,
            params,
            tuple(stop),
            logprobs or bool(top_logprobs),
            top_logprobs,
            stop_ids,
            fit="cap",
            grammar=grammar,
        )
        for step in steps:
            yield trackers, trackers[step.index].apply(step)

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


def load(
    artifact: str | Path,
    backend: str = "onnxruntime",
    device: str | None = None,
    verify: bool = True,
    prefix_cache_mb: int = DEFAULT_PREFIX_CACHE_MB,
) -> LLM:
    """Open an exported artifact on a backend: `llamatrt.load("out/smollm2").generate("Hi")`.
    verify=False skips hashing its files (their structure is still checked); prefix_cache_mb=0
    turns the prefix cache off."""
    if prefix_cache_mb < 0:
        raise InputError(f"prefix cache of {prefix_cache_mb} MB; give 0 (off) or more")
    return LLM(open_backend(artifact, backend, device, verify=verify), prefix_cache_mb)
