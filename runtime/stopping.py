"""When a row stops: a stop id (any of several EOS ids), a stop string, or its token budget.

Stop strings are found here and nowhere else: the loop ends a row when its decoded text contains
one, and the text API cuts the text where the first one starts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

Detokenize = Callable[[Sequence[int]], str]


def find_stop(text: str, stop_strings: Sequence[str]) -> tuple[int, str] | None:
    """(where the earliest stop string starts in `text`, that string), or None."""
    hits = [(i, s) for s in stop_strings if (i := text.find(s)) >= 0]
    return min(hits) if hits else None


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """`text` up to (not including) the earliest stop string."""
    hit = find_stop(text, stop_strings)
    return text if hit is None else text[: hit[0]]


@dataclass(frozen=True)
class StopCriteria:
    stop_ids: frozenset[int]
    stop_strings: tuple[str, ...] = ()
    detokenize: Detokenize | None = None

    def stop_string_in(self, tokens: Sequence[int]) -> str | None:
        """The stop string the decoded `tokens` contain (the earliest), if any."""
        if not self.stop_strings or self.detokenize is None:
            return None
        hit = find_stop(self.detokenize(tokens), self.stop_strings)
        return None if hit is None else hit[1]
