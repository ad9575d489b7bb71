"""The `llamatrt chat` session: read a line, stream the reply, keep the conversation in the cache.

Ctrl-C while a reply is written stops that reply (what came so far stays in the conversation) and
returns to the prompt; Ctrl-C at the prompt asks for a second one, which quits. A conversation that
outgrows the cache loses its oldest turns, with a note on stderr, as llama-cli and ollama do.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from llamatrt.base.errors import InputError, LlamatrtError

Message = dict[str, str]


class ChatSession:
    def __init__(self, llm: Any, system: str | None, args: dict[str, Any]) -> None:
        self.llm, self.args = llm, args
        self.system: list[Message] = [{"role": "system", "content": system}] if system else []
        self.turns: list[Message] = []  # user and assistant messages, oldest first
        self.interactive = sys.stdin.isatty()

    def run(self) -> None:
        if self.interactive:
            click.echo("chat: /reset clears the conversation, /exit or Ctrl-D quits, Ctrl-C stops a reply", err=True)
        warned = False  # a Ctrl-C at the prompt, waiting for the second
        while True:
            try:
                line = self._read()
            except KeyboardInterrupt:
                if warned:
                    click.echo(err=True)
                    return
                warned = True
                click.echo("\n(press Ctrl-C again or type /exit to quit)", err=True)
                continue
            warned = False
            if line is None or line == "/exit":
                return
            if line == "/reset":
                self.turns = []
                click.echo("(conversation cleared)", err=True)
            elif line:
                self._reply(line)

    def _read(self) -> str | None:
        """The next line (stripped), None at end of input; a line that is not UTF-8 is refused."""
        while True:
            if self.interactive:
                click.echo("> ", nl=False, err=True)
            raw = sys.stdin.buffer.readline()
            if not raw:
                return None
            try:
                return raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                click.echo("error: that line is not valid UTF-8 text; type it again", err=True)

    def _prompt(self, text: str) -> tuple[list[int], list[Message]]:
        """The conversation with `text` as token ids, without its oldest turns if it would not leave
        room for a reply of --max-new-tokens in the cache."""
        capacity = self.llm.manifest.max_cache_len
        messages = [*self.turns, {"role": "user", "content": text}]
        dropped = 0
        while True:
            ids = self.llm.encode_chat([*self.system, *messages])
            if len(ids) + self.args["max_new_tokens"] <= capacity or len(messages) == 1:
                break
            messages = messages[2:]  # the oldest user message and its reply
            dropped += 1
        if len(ids) >= capacity:
            raise InputError(
                f"this message is {len(ids)} tokens with the chat template, the cache holds {capacity}; "
                "send a shorter one, or /reset"
            )
        if dropped:
            click.echo(
                f"(dropped the {dropped} oldest turn{'s' * (dropped > 1)} to fit the cache of {capacity} tokens)",
                err=True,
            )
        return ids, messages

    def _reply(self, text: str) -> None:
        try:
            ids, messages = self._prompt(text)
        except LlamatrtError as e:
            click.echo(f"error: {e}", err=True)
            return
        except KeyboardInterrupt:  # before the reply began: nothing to keep
            click.echo("\n[reply stopped]", err=True)
            return
        reply, tokens, last = "", 0, None
        try:
            for delta in self.llm.stream([ids], **self.args):
                reply += delta.text
                tokens += delta.token_id is not None
                last = delta
                click.echo(delta.text, nl=False)
                sys.stdout.flush()
        except KeyboardInterrupt:
            click.echo()
            click.echo("[reply stopped]", err=True)
        except LlamatrtError as e:
            click.echo()
            click.echo(f"error: {e}", err=True)
            return
        else:
            click.echo()
            if last is not None and last.finish_reason == "length":
                cut = tokens >= self.args["max_new_tokens"]
                click.echo(
                    f"[reply cut at --max-new-tokens {self.args['max_new_tokens']}]"
                    if cut
                    else "[reply cut: the cache is full]",
                    err=True,
                )
        self.turns = [*messages, {"role": "assistant", "content": reply}]
