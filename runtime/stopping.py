"""Stop strings, found in one place: the loop's incremental detokenizer (runtime.detokenizer) ends a
request when its text contains one and cuts the text where the first one starts."""

from __future__ import annotations

from collections.abc import Sequence


def find_stop(text: str, stop_strings: Sequence[str]) -> tuple[int, str] | None:
    """(where the earliest stop string starts in `text`, that string), or None."""
    hits = [(i, s) for s in stop_strings if (i := text.find(s)) >= 0]
    return min(hits) if hits else None
