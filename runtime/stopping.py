"""When a row stops: a stop id (any of several EOS ids), a stop string, or its token budget."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

Detokenize = Callable[[Sequence[int]], str]


@dataclass(frozen=True)
class StopCriteria:
    stop_ids: frozenset[int]
    stop_strings: tuple[str, ...] = ()
    detokenize: Detokenize | None = None

    def stop_string_at(self, tokens: Sequence[int]) -> int | None:
        """Index in the decoded text where the first stop string starts, if any."""
        if not self.stop_strings or self.detokenize is None:
            return None
        text = self.detokenize(tokens)
        hits = [i for i in (text.find(s) for s in self.stop_strings) if i >= 0]
        return min(hits) if hits else None
