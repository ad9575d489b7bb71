"""What a prefill call costs, learnt from the calls the loop makes: a fixed part, paid by every call
whatever its tokens (every weight is read once, every node runs once), plus a part per token.

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
