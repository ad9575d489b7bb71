"""Constrained decoding: a request's answer held to a grammar while it is generated — a JSON schema,
any JSON object, or a Lark grammar — by llguidance (chosen by measurement: docs/serving.md).

The engine is made once per loop from the artifact's tokenizer. A request's grammar is compiled when
it is submitted: one the engine cannot enforce exactly (an unsupported keyword, a warning that it
would loosen the schema) is refused then, in one line that names what it cannot take. A constrained
row gets a matcher at admission; at each step the masks of all constrained rows are filled in one
call (llguidance's thread pool) and applied to their logits before sampling, and rows without a
grammar pay nothing. A decode step starts filling them before its graph runs (a row's next mask
depends only on the tokens it consumed), on a thread of the engine's, and waits for them after. The chosen token is then consumed by the row's matcher; a finished grammar
allows only the end-of-sequence tokens. An answer is checked against its JSON schema
(`jsonschema`) before it is handed out (`check_answer`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from llamatrt.base.errors import InputError

JSON_OBJECT_SCHEMA: dict[str, Any] = {"type": "object"}


@dataclass(frozen=True)
class Grammar:
    """A compiled grammar, as a request carries it."""

    source: str = field(repr=False)  # llguidance's grammar
    schema: Mapping[str, Any] | None = field(default=None, repr=False)  # what answers are validated against


@dataclass
class GrammarStats:
    """Since the engine was made (read by the server's metrics)."""

    constrained_requests: int = 0
    mask_seconds: float = 0.0  # the loop's time on masks: waiting for them and applying them
    validation_failures: int = 0


class GrammarEngine:
    def __init__(self, tokenizer_json: str, vocab_size: int, eos_ids: Sequence[int]) -> None:
        try:
            import llguidance
            import llguidance.torch
        except ImportError as e:  # a dependency of llamatrt; missing only in a broken install
            raise InputError("structured output needs llguidance; pip install llguidance") from e
        self._ll = llguidance
        try:
            self.tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=list(eos_ids))
        except (ValueError, RuntimeError) as e:  # a tokenizer whose tokens are not bytes (word-level, ...)
            raise InputError(
                f"this artifact's tokenizer cannot constrain answers ({_first_line(e)}); structured output needs a "
                "byte-level BPE or SentencePiece tokenizer"
            ) from e
        self.executor = llguidance.LLExecutor()
        self._filler: ThreadPoolExecutor | None = None  # fills masks while a graph runs
        self.vocab_size = vocab_size
        self.stats = GrammarStats()

    # --- compiling -------------------------------------------------------------------------------

    def json_schema(self, schema: Any, what: str = "the JSON schema") -> Grammar:
        if not isinstance(schema, Mapping):
            raise InputError(f"{what} must be a JSON object (a schema), got {type(schema).__name__}")
        self._check_schema(schema, what)  # first: a schema that is not one is told so, not that it cannot be enforced
        try:
            source = self._ll.LLMatcher.grammar_from_json_schema(
                json.dumps(schema), overrides={"whitespace_flexible": False}
            )
        except (ValueError, TypeError) as e:
            raise InputError(f"{what} is not valid JSON ({_first_line(e)}); give plain JSON values") from e
        self._check(source, what)
        return Grammar(source, schema)

    def json_object(self) -> Grammar:
        return self.json_schema(JSON_OBJECT_SCHEMA, "a JSON object")

    def lark(self, text: str) -> Grammar:
        source = self._ll.LLMatcher.grammar_from_lark(text)
        self._check(source, "the grammar")
        return Grammar(source)

    def _check(self, source: str, what: str) -> None:
        """Fail closed: an error, or a warning (something the engine would not enforce), refuses it."""
        is_error, messages = self._ll.LLMatcher.validate_grammar_with_warnings(source, self.tokenizer)
        if is_error or messages:
            problem = _first_line(messages[0]) if messages else "rejected"
            raise InputError(f"{what} cannot be enforced exactly ({problem}); remove or change what it names")

    @staticmethod
    def _check_schema(schema: Mapping[str, Any], what: str) -> None:
        import jsonschema

        try:
            jsonschema.validators.validator_for(schema).check_schema(schema)
        except jsonschema.exceptions.SchemaError as e:
            raise InputError(f"{what} is not a valid JSON schema: {_first_line(e.message)}; fix it") from e

    # --- running -------------------------------------------------------------------------------

    def matcher(self, grammar: Grammar) -> Any:
        self.stats.constrained_requests += 1
        return self._ll.LLMatcher(self.tokenizer, grammar.source)

    def start_masks(self, matchers: Sequence[Any]) -> PendingMasks | None:
        """Begin filling the masks of the rows whose matcher is not None (all in one call) on the
        engine's thread; None when no row is constrained. `PendingMasks.apply` waits and masks."""
        rows = [i for i, m in enumerate(matchers) if m is not None]
        if not rows:
            return None
        if self._filler is None:
            self._filler = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llamatrt-masks")
        mask = self._ll.torch.allocate_token_bitmask(len(rows), self.vocab_size)
        pairs = [(matchers[r], k) for k, r in enumerate(rows)]
        filled = self._filler.submit(self._ll.torch.fill_next_token_bitmask_par, self.executor, pairs, mask)
        return PendingMasks(self, rows, mask, filled)

    def constrain(self, matchers: Sequence[Any], logits: torch.Tensor) -> None:
        """Mask, in place, the logits (rows, vocab) of the rows whose matcher is not None: -inf
        wherever a row's grammar does not allow the token."""
        pending = self.start_masks(matchers)
        if pending is not None:
            pending.apply(logits)


@dataclass
class PendingMasks:
    engine: GrammarEngine
    rows: list[int]  # which rows of the logits the masks are for
    mask: torch.Tensor
    filled: Future[None]

    def apply(self, logits: torch.Tensor) -> None:
        started = time.perf_counter()
        self.filled.result()
        index = torch.tensor(self.rows)
        picked = logits[index]
        self.engine._ll.torch.apply_token_bitmask_inplace(picked, self.mask)
        logits[index] = picked
        self.engine.stats.mask_seconds += time.perf_counter() - started


def check_answer(grammar: Grammar | None, text: str, finish_reason: str) -> str | None:
    """Why a finished constrained answer does not satisfy its schema, or None. An answer cut short
    (finish_reason "length") is not checked: it is incomplete, and says so."""
    if grammar is None or grammar.schema is None or finish_reason != "stop":
        return None
    import jsonschema

    try:
        jsonschema.validate(json.loads(text), grammar.schema)
    except (ValueError, jsonschema.ValidationError) as e:
        return _first_line(getattr(e, "message", e))
    return None


def _first_line(e: object) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__
