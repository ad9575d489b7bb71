"""A request's sampling parameters, declared once: the CLI's options (`generate`, `chat`), the
server's request fields and `LLM.generate`'s keywords are all made from these dataclass fields, so
adding one is a field here (with its help and, where OpenAI's differ, its API default and maximum),
its check in `checked`, and its use in `runtime.sampling`. Importing this costs no torch, so the
CLI builds its options fast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from llamatrt.base.errors import InputError

# Temperatures below this are greedy (vLLM's threshold): dividing logits by less would overflow them.
GREEDY_BELOW = 1e-5


class SamplingError(InputError):
    """A sampling parameter out of its range: `field` names it (the server's 400 says which), and the
    message names it as the CLI spells it (`top-p`); `api_message` as the API does (`top_p`)."""

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"{name.replace('_', '-')} {problem}")
        self.field = name
        self.api_message = f"{name} {problem}"


def _describe(help: str, **api: Any) -> dict[str, Any]:
    """A field's help (the CLI's) and, where the OpenAI API's differ, `api_default` and `api_max`."""
    return {"help": help, **api}


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = field(default=0.0, metadata=_describe("0 is greedy.", api_default=1.0, api_max=2.0))
    top_k: int = field(default=0, metadata=_describe("Sample from the k most likely; 0 turns it off."))
    top_p: float = field(
        default=1.0, metadata=_describe("Sample from the smallest set whose probability reaches p; 1 turns it off.")
    )
    min_p: float = field(
        default=0.0, metadata=_describe("Drop tokens below min-p times the top token's probability; 0 turns it off.")
    )
    repetition_penalty: float = field(
        default=1.0,
        metadata=_describe("Divide the logits of tokens already seen by this (CTRL-style); 1 turns it off."),
    )
    seed: int | None = field(  # None: a fresh random seed per call
        default=None, metadata=_describe("Same seed, same tokens (alone or in a batch).")
    )

    def checked(self) -> SamplingParams:
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise SamplingError(name, f"{getattr(self, name)} is not a finite number; pass one")
        if not self.temperature >= 0:
            raise SamplingError(
                "temperature", f"{self.temperature} must be >= 0; pass 0 for greedy or a positive temperature"
            )
        if self.top_k < 0:
            raise SamplingError("top_k", f"{self.top_k} must be >= 0; pass 0 to turn it off")
        if not 0 < self.top_p <= 1:
            raise SamplingError("top_p", f"{self.top_p} must be in (0, 1]; pass e.g. 0.9, or 1 to turn it off")
        if not 0 <= self.min_p < 1:
            raise SamplingError("min_p", f"{self.min_p} must be in [0, 1); pass e.g. 0.05, or 0 to turn it off")
        if not self.repetition_penalty > 0:
            raise SamplingError(
                "repetition_penalty", f"{self.repetition_penalty} must be > 0; pass e.g. 1.1, or 1 to turn it off"
            )
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise SamplingError("seed", f"{self.seed} must be in [0, 2**64); pick a smaller one")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


SAMPLING_FIELDS = tuple(f.name for f in fields(SamplingParams))


def field_kind(name: str) -> type:
    """int or float: the type a field's value has (the dataclass' annotations are strings)."""
    annotation = next(f.type for f in fields(SamplingParams) if f.name == name)
    return int if str(annotation).startswith("int") else float


def sampling_params(sampling: dict[str, Any]) -> SamplingParams:
    """Sampling options by name, checked (one line naming an unknown option)."""
    unknown = sorted(set(sampling) - set(SAMPLING_FIELDS))
    if unknown:
        raise InputError(f"unknown sampling option {', '.join(unknown)}; use {', '.join(SAMPLING_FIELDS)}")
    return SamplingParams(**sampling).checked()
