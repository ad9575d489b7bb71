"""What a prefill call costs, learnt from the calls the loop makes: a fixed part, paid by every call
whatever its tokens (every weight is read once, every node runs once), plus a part per token. Where
prefill rides in the decode call (a graph that packs tokens), what counts is what its tokens add to
that call (`AddedCost`).

A per-token average alone hides the fixed part: calls made small by a small budget then look dear
per token, which makes the next budget smaller still, down to its floor (on a CPU a call of 8
tokens costs about what a decode step does). A line fitted over the recent calls keeps the two
apart, so the scheduler can size calls that pay their fixed part back.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class CallCost:
    fixed_s: float  # seconds a call costs whatever its tokens
    token_s: float  # seconds each token adds


class PrefillCost:
    def __init__(self, window: int = 64) -> None:
        self.calls: deque[tuple[int, float]] = deque(maxlen=window)  # (tokens, seconds), the newest last
        self._fit: CallCost | None = None

    def observe(self, tokens: int, seconds: float) -> None:
        self.calls.append((tokens, seconds))
        self._fit = None

    def fit(self) -> CallCost | None:
        """The least-squares line through the recent calls; None until calls of two sizes ran."""
        if self._fit is None and len({tokens for tokens, _ in self.calls}) >= 2:
            n = len(self.calls)
            mean_x = sum(x for x, _ in self.calls) / n
            mean_y = sum(y for _, y in self.calls) / n
            spread = sum((x - mean_x) ** 2 for x, _ in self.calls)
            slope = sum((x - mean_x) * (y - mean_y) for x, y in self.calls) / spread
            token_s = max(slope, 1e-9)  # noise can tilt a line of few points; a token never costs nothing
            self._fit = CallCost(max(mean_y - token_s * mean_x, 0.0), token_s)
        return self._fit


class AddedCost:
    """What a prompt's tokens add to a decode call that carries them (a graph that packs tokens):
    the call's time beyond a decode call of as many rows, per token beyond one a row, over the
    recent calls. Measured directly rather than fitted: those calls differ little in their tokens,
    so a line through them would be mostly noise, and what a token adds there includes the attention
    of the decode rows' padded slots, which grows with their context."""

    def __init__(self, window: int = 8) -> None:
        # few calls: consecutive ones see the decode rows at nearly the same contexts
        self.calls: deque[tuple[int, float]] = deque(maxlen=window)  # (prompt tokens, seconds added)

    def observe(self, tokens: int, added_s: float) -> None:
        self.calls.append((tokens, added_s))

    def fit(self) -> CallCost | None:
        """No fixed part (the decode rows pay it); the added seconds per token, None before any call."""
        tokens = sum(t for t, _ in self.calls)
        if not tokens:
            return None
        return CallCost(0.0, max(sum(s for _, s in self.calls) / tokens, 1e-9))
