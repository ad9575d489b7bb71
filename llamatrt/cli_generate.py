"""`llamatrt generate` and `llamatrt chat`: thin wrappers over llamatrt.load()."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from llamatrt.cli_options import backend_option, verify_option
from llamatrt.errors import InputError, LlamatrtError


def sampling_options(fn: Any) -> Any:
    for option in reversed([
        backend_option(),
        verify_option,
        click.option("--max-new-tokens", type=int, default=128, show_default=True),
        click.option("--temperature", type=float, default=0.0, show_default=True, help="0 is greedy."),
        click.option("--top-k", type=int, default=0, show_default=True, help="0 turns it off."),
        click.option("--top-p", type=float, default=1.0, show_default=True),
        click.option("--min-p", type=float, default=0.0, show_default=True),
        click.option("--repetition-penalty", type=float, default=1.0, show_default=True),
        click.option("--seed", type=int, default=None, help="Same seed, same tokens."),
        click.option("--stop", multiple=True, help="Stop string (repeatable)."),
    ]):  # fmt: skip
        fn = option(fn)
    return fn


def _sampling(kw: dict[str, Any]) -> dict[str, Any]:
    """The sampling options, checked now (before a model loads or a chat starts), as LLM takes them."""
    from llamatrt.runtime.sampling import SamplingParams

    sampling = {k: kw[k] for k in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed")}
    SamplingParams(**sampling).checked()
    if kw["max_new_tokens"] < 1:
        raise InputError(f"max new tokens {kw['max_new_tokens']} must be >= 1; pass --max-new-tokens 1 or more")
    if any(not s for s in kw["stop"]):
        raise InputError("a stop string is empty (it would stop every row at once); give non-empty --stop strings")
    return sampling


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError as e:
        raise InputError(f"--input-ids {text!r} is not a comma-separated list of integers; give e.g. 1,2,3") from e


@click.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--prompt", "prompts", multiple=True, help="Prompt text (repeatable: a batch).")
@click.option("--input-ids", "input_ids", multiple=True, help="Prompt as token ids, e.g. 1,2,3 (repeatable).")
@click.option("--chat", is_flag=True, help="Wrap each prompt in the checkpoint's chat template.")
@click.option("--stream", is_flag=True, help="Print tokens as they come.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per prompt.")
@click.option("--logprobs", is_flag=True, help="Include per-token logprobs in --json output.")
@sampling_options
def generate(artifact: Path, prompts: tuple[str, ...], input_ids: tuple[str, ...], chat: bool, stream: bool,
             as_json: bool, logprobs: bool, **kw: Any) -> None:  # fmt: skip
    """Generate text for one or more prompts."""
    import llamatrt

    all_prompts: list[Any] = list(prompts) + [_parse_ids(t) for t in input_ids]
    if not all_prompts:
        raise InputError("no prompt given; pass --prompt TEXT or --input-ids 1,2,3")
    with llamatrt.load(artifact, kw["backend"], verify=not kw["no_verify"]) as llm:
        args = dict(max_new_tokens=kw["max_new_tokens"], chat=chat, stop=kw["stop"], **_sampling(kw))
        if stream and not as_json:
            _print_stream(llm.stream(all_prompts, **args), len(all_prompts))
            return
        for result in llm.generate(all_prompts, logprobs=logprobs, **args):
            if as_json:
                click.echo(json.dumps(result.to_json()))
            else:
                click.echo(result.text)


def _print_stream(deltas: Any, count: int) -> None:
    """Prompt 0 streams live; later prompts' text is held and printed in order as each turn comes."""
    held = [""] * count
    done = [False] * count
    current = 0
    for delta in deltas:
        held[delta.index] += delta.text
        done[delta.index] = delta.finish_reason is not None
        while current < count:
            click.echo(held[current], nl=False)
            held[current] = ""
            sys.stdout.flush()
            if not done[current]:
                break
            click.echo()
            current += 1


@click.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--system", default=None, help="System message.")
@sampling_options
def chat(artifact: Path, system: str | None, **kw: Any) -> None:
    """Interactive chat with the checkpoint's chat template; /reset clears history, /exit quits."""
    import llamatrt

    if sys.stdin is None:
        raise InputError("stdin is closed; chat reads your messages from stdin (a terminal or a pipe)")
    interactive = sys.stdin.isatty()
    sampling = _sampling(kw)
    with llamatrt.load(artifact, kw["backend"], verify=not kw["no_verify"]) as llm:
        history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
        if interactive:
            click.echo("chat: /reset clears the conversation, /exit quits", err=True)
        while True:
            if interactive:
                click.echo("> ", nl=False, err=True)
            raw = sys.stdin.buffer.readline()
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                click.echo("error: that line is not valid UTF-8 text; type it again", err=True)
                continue
            if not line or line.strip() == "/exit":
                return
            text = line.strip()
            if text == "/reset":
                history = history[:1] if system else []
                click.echo("(conversation cleared)", err=True)
                continue
            if not text:
                continue
            history.append({"role": "user", "content": text})
            try:
                ids = llm.encode_chat(history)
                reply = ""
                args = dict(max_new_tokens=kw["max_new_tokens"], stop=kw["stop"], **sampling)
                for delta in llm.stream([ids], **args):
                    reply += delta.text
                    click.echo(delta.text, nl=False)
                    sys.stdout.flush()
                click.echo()
                history.append({"role": "assistant", "content": reply})
            except LlamatrtError as e:  # e.g. the conversation outgrew the cache: keep the session
                history.pop()
                click.echo(f"error: {e} (type /reset to start over)", err=True)
