"""Stop strings, found in one place: the loop ends a request when its decoded text contains one
(runtime.scheduler), and the text API cuts the text where the first one starts (runtime.llm)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

Detokenize = Callable[[Sequence[int]], str]


def find_stop(text: str, stop_strings: Sequence[str]) -> tuple[int, str] | None:
    """(where the earliest stop string starts in `text`, that string), or None."""
    hits = [(i, s) for s in stop_strings if (i := text.find(s)) >= 0]
    return min(hits) if hits else None
