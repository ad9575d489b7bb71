"""The one incremental detokenizer: token ids in, text out, O(1) work per token, stop strings found
and held back.

Every request that has a tokenizer gets a `TextStream` in the loop (runtime.scheduler), so the
server, the CLI and the Python API see the same text: a piece of text is released only once it
can no longer become part of a stop string (so streamed text equals the final text exactly), and a
stop string ends the request with the text cut where it starts. Pieces come from the `tokenizers`
library's `DecodeStream`, which holds an incomplete multi-byte character back until its last byte.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from llamatrt.runtime.stopping import find_stop
from llamatrt.runtime.tokenizer import CLEAN_UP


class Pieces(Protocol):
    """Text of one more token (stable: never changed by later tokens), and what is held at the end."""

    def step(self, token: int) -> str: ...

    def flush(self) -> str: ...


CLEAN_UP_PATTERNS = tuple(pattern for pattern, _ in CLEAN_UP)


class TokenizerPieces:
    """`tokenizers.decoders.DecodeStream` over an artifact's tokenizer. transformers' clean-up of
    spaces before punctuation (an artifact flag) rewrites text across token boundaries, so with it
    raw text is released only up to a point that no clean-up pattern (matched or still possible)
    spans; the rest waits for more tokens."""

    def __init__(self, tokenizer: Any, clean_up: Callable[[str], str] | None = None) -> None:
        from tokenizers.decoders import DecodeStream

        self.tokenizer, self.clean_up = tokenizer, clean_up
        self.stream = DecodeStream(skip_special_tokens=True)
        self.raw = ""  # text held for the clean-up

    def step(self, token: int) -> str:
        piece = self.stream.step(self.tokenizer, token) or ""
        if self.clean_up is None:
            return piece
        self.raw += piece
        cut = next(c for c in range(len(self.raw), -1, -1) if not _spanned(self.raw, c))
        out, self.raw = self.clean_up(self.raw[:cut]), self.raw[cut:]
        return out

    def flush(self) -> str:
        out, self.raw = (self.clean_up(self.raw) if self.clean_up else self.raw), ""
        return out


def _spanned(raw: str, cut: int) -> bool:
    """Whether a clean-up pattern that starts before `cut` matches, or could still match, past it."""
    for start in range(max(0, cut - 3), cut):
        if raw[start] != " ":
            continue
        for pattern in CLEAN_UP_PATTERNS:
            end = start + len(pattern)
            if end > cut and (raw[start:end] == pattern or (end > len(raw) and pattern.startswith(raw[start:]))):
                return True
    return False


class TextStream:
    """One request's text: `push` each generated token and get the text that is safe to show."""

    def __init__(self, pieces: Pieces, stop_strings: Sequence[str] = ()) -> None:
        self.pieces, self.stop_strings = pieces, tuple(stop_strings)
        self.longest_stop = max((len(s) for s in self.stop_strings), default=0)
        self.pending = ""  # decoded, not yet released: it could still begin a stop string
        self.released = 0  # characters released so far
        self.ends: list[int] = []  # characters decoded after each token
        self.kept: int | None = None  # after a stop string: the tokens whose text lies before it

    def push(self, token: int) -> tuple[str, str | None]:
        """(text released by this token, the stop string it completed or None)."""
        piece = self.pieces.step(token)
        self.ends.append((self.ends[-1] if self.ends else 0) + len(piece))
        return self._release(self.pending + piece)

    def flush(self) -> str:
        """Everything still held, at the request's end (nothing can complete a stop string any more)."""
        text, _ = self._release(self.pending + self.pieces.flush(), final=True)
        return text

    def _release(self, pending: str, final: bool = False) -> tuple[str, str | None]:
        hit = find_stop(pending, self.stop_strings) if self.stop_strings else None
        if hit is not None:
            at, stop = hit
            self.kept = bisect_right(self.ends, self.released + at)
            self.pending = ""
            self.released += at
            return pending[:at], stop
        hold = 0 if final else self._held(pending)
        out, self.pending = pending[: len(pending) - hold], pending[len(pending) - hold :]
        self.released += len(out)
        return out, None

    def _held(self, text: str) -> int:
        """The longest end of `text` that is the beginning of a stop string."""
        for k in range(min(len(text), self.longest_stop - 1), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self.stop_strings):
                return k
        return 0


TextStreamFactory = Callable[[Sequence[str]], TextStream]
