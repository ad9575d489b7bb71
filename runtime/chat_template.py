"""A checkpoint's chat template, rendered in a sandbox with a time and a size limit.

The environment is transformers' own (jinja2's ImmutableSandboxedEnvironment with trim_blocks,
lstrip_blocks, loopcontrols, a non-escaping `tojson`, `raise_exception`, `strftime_now`, and the
`{% generation %}` tag parsed as a plain block), so templates render exactly as `apply_chat_template`
renders them. Written here rather than called from transformers because an artifact's template is
untrusted and transformers' renderer has no limits: jinja2's sandbox keeps templates away from
Python internals, but nested loops or `'x' * 10**10` would still run for minutes or exhaust memory.
Here every Python line the template executes checks a deadline, and string/list repetition and
powers are bounded.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from types import FrameType
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox

from llamatrt.base.errors import InputError

TIME_LIMIT_S = 2.0  # a real template renders in well under a millisecond
MAX_CHARS = 1 << 22  # 4 Mi characters: far beyond any context a prompt can fill
FIX = "drop --chat and write the prompt yourself, or re-export from a checkpoint with a working template"


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask tag) as a plain block."""

    tags = {"generation"}  # noqa: RUF012 (jinja2 declares it an instance attribute)

    def parse(self, parser: Any) -> Any:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


class _BoundedSandbox(jinja2.sandbox.ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and isinstance(right, int) and abs(right) > 256:
            raise jinja2.exceptions.SecurityError(f"the power {right} is too large")
        if operator == "*":
            for seq, count in ((left, right), (right, left)):
                if isinstance(seq, str | list | tuple) and isinstance(count, int) and len(seq) * count > MAX_CHARS:
                    raise jinja2.exceptions.SecurityError("a repetition too large for a prompt")
        return super().call_binop(context, operator, left, right)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False
) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _Deadline(Exception):
    pass


def _traced(deadline: float) -> Any:
    def tracer(frame: FrameType, event: str, arg: Any) -> Any:
        if time.monotonic() > deadline:
            raise _Deadline
        return tracer

    return tracer


class ChatTemplate:
    def __init__(self, source: str, special_tokens: Mapping[str, str]) -> None:
        env = _BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals.update(raise_exception=_raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
        try:
            self.template = env.from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise InputError(f"the chat template has a syntax error at line {e.lineno} ({e.message}); {FIX}") from e
        self.special_tokens = dict(special_tokens)

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
        """The conversation as the model's prompt text; one-line InputError if the template fails."""
        old = sys.gettrace()
        sys.settrace(_traced(time.monotonic() + TIME_LIMIT_S))
        try:
            text = self.template.render(
                messages=[dict(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                tools=None,
                documents=None,
                **self.special_tokens,
            )
        except _Deadline:
            raise InputError(f"the chat template ran longer than {TIME_LIMIT_S:g} s and was stopped; {FIX}") from None
        except jinja2.exceptions.TemplateError as e:
            raise InputError(f"the chat template refused the conversation ({e}); {FIX}") from e
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, OverflowError, RecursionError) as e:
            raise InputError(f"the chat template failed ({type(e).__name__}: {str(e)[:120]}); {FIX}") from e
        finally:
            sys.settrace(old)
        if len(text) > MAX_CHARS:
            raise InputError(f"the chat template produced {len(text)} characters, more than any prompt; {FIX}")
        return text
