"""`llamatrt generate` and `llamatrt chat`: thin wrappers over llamatrt.load()."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import click

from llamatrt.base.errors import InputError
from llamatrt.cli_options import backend_option, prefix_cache_option, verify_option
from llamatrt.runtime.sampling_params import SAMPLING_FIELDS, SamplingParams, field_kind, sampling_params

SEPARATOR = "---"  # between the answers of several prompts in plain output


def _sampling_option(f: dataclasses.Field[Any]) -> Any:
    """The option of one SamplingParams field: its name, type, default and help, as declared there."""
    return click.option(
        f"--{f.name.replace('_', '-')}",
        type=field_kind(f.name),
        default=f.default,
        show_default=f.default is not None,
        help=f.metadata["help"],
    )


def sampling_options(fn: Any) -> Any:
    for option in reversed(
        [
            backend_option(),
            verify_option,
            prefix_cache_option,
            click.option(
                "--max-new-tokens", type=int, default=128, show_default=True, help="Tokens to generate at most."
            ),
            *(_sampling_option(f) for f in dataclasses.fields(SamplingParams)),
            click.option("--stop", multiple=True, help="Stop string (repeatable); cut from the text."),
            click.option(
                "--stop-id",
                "stop_ids",
                type=int,
                multiple=True,
                help="Stop token id (repeatable), besides the checkpoint's EOS ids; not emitted.",
            ),
        ]
    ):
        fn = option(fn)
    return fn


def _sampling(kw: dict[str, Any]) -> dict[str, Any]:
    """The sampling options, checked now (before a model loads or a chat starts), as LLM takes them."""
    sampling = {k: kw[k] for k in SAMPLING_FIELDS}
    sampling_params(sampling)
    if kw["max_new_tokens"] < 1:
        raise InputError(f"max new tokens {kw['max_new_tokens']} must be >= 1; pass --max-new-tokens 1 or more")
    if any(not s for s in kw["stop"]):
        raise InputError("a stop string is empty (it would stop every row at once); give non-empty --stop strings")
    return sampling


def _generation_args(kw: dict[str, Any]) -> dict[str, Any]:
    return dict(max_new_tokens=kw["max_new_tokens"], stop=kw["stop"], stop_ids=kw["stop_ids"], **_sampling(kw))


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError as e:
        raise InputError(f"--input-ids {text!r} is not a comma-separated list of integers; give e.g. 1,2,3") from e


@click.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--prompt", "prompts", multiple=True, help="Prompt text (repeatable: several run at once).")
@click.option("--input-ids", "input_ids", multiple=True, help="Prompt as token ids, e.g. 1,2,3 (repeatable).")
@click.option("--chat", is_flag=True, help="Wrap each prompt in the checkpoint's chat template.")
@click.option("--system", default=None, help="System message (with --chat).")
@click.option("--stream", is_flag=True, help="Print tokens as they come (with --json: one JSON event per token).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per prompt (with its index).")
@click.option("--logprobs", is_flag=True, help="Each generated token's log-probability (printed, or in --json).")
@click.option("--top-logprobs", type=int, default=0, help="Also the N most likely alternatives at each token (0-20).")
@click.option(
    "--json-schema",
    "json_schema_file",
    type=click.Path(path_type=Path),
    default=None,
    help="Hold every answer to this JSON schema (a file) while generated; checked before printed.",
)
@click.option(
    "--grammar",
    "grammar_file",
    type=click.Path(path_type=Path),
    default=None,
    help="Hold every answer to a Lark grammar (a file).",
)
@sampling_options
def generate(
    artifact: Path,
    prompts: tuple[str, ...],
    input_ids: tuple[str, ...],
    chat: bool,
    system: str | None,
    stream: bool,
    as_json: bool,
    logprobs: bool,
    top_logprobs: int,
    json_schema_file: Path | None,
    grammar_file: Path | None,
    **kw: Any,
) -> None:
    """Generate text for one or more prompts."""
    import llamatrt

    all_prompts: list[Any] = list(prompts) + [_parse_ids(t) for t in input_ids]
    if not all_prompts:
        raise InputError("no prompt given; pass --prompt TEXT or --input-ids 1,2,3")
    if system is not None and not chat:
        raise InputError("--system needs --chat (a system message goes through the chat template)")
    args = dict(chat=chat, system=system, logprobs=logprobs, top_logprobs=top_logprobs, **_generation_args(kw))
    if json_schema_file is not None:
        args["json_schema"] = _json_file(json_schema_file, "--json-schema")
    if grammar_file is not None:
        args["grammar"] = _text_file(grammar_file, "--grammar")
    with llamatrt.load(
        artifact, kw["backend"], verify=not kw["no_verify"], prefix_cache_mb=kw["prefix_cache_mb"]
    ) as llm:
        if stream and as_json:
            for delta in llm.stream(all_prompts, **args):
                click.echo(json.dumps(_event(delta)))
            return
        if stream:
            _print_stream(llm.stream(all_prompts, **args), len(all_prompts))
            return
        results = llm.generate(all_prompts, **args)
        for i, result in enumerate(results):
            if as_json:
                click.echo(json.dumps(result.to_json()))
                continue
            if i:
                click.echo(SEPARATOR)
            click.echo(result.text)
            if logprobs or top_logprobs:
                _print_logprobs(llm, result)


def _text_file(path: Path, option: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{option} {path} cannot be read ({type(e).__name__}); give a UTF-8 text file") from e


def _json_file(path: Path, option: str) -> Any:
    try:
        return json.loads(_text_file(path, option))
    except json.JSONDecodeError as e:
        raise InputError(f"{option} {path} is not JSON (line {e.lineno}: {e.msg}); give a JSON schema") from e


def _event(delta: Any) -> dict[str, Any]:
    event = {
        "index": delta.index,
        "text": delta.text,
        "token_id": delta.token_id,
        "logprob": delta.logprob,
        "finish_reason": delta.finish_reason,
        "stop": delta.stop,
    }
    if delta.top_logprobs:
        event["top_logprobs"] = [list(pair) for pair in delta.top_logprobs]
    return event


def _print_logprobs(llm: Any, result: Any) -> None:
    """One line per generated token: its logprob, the token, and the alternatives if asked for."""
    for k, token in enumerate(result.token_ids):
        logprob = result.logprobs[k] if result.logprobs else float("nan")
        line = f"  {logprob:9.4f}  {_piece(llm, token)!r}"
        if result.top_logprobs:
            line += "  top: " + ", ".join(f"{_piece(llm, t)!r} {lp:.3f}" for t, lp in result.top_logprobs[k])
        click.echo(line)


def _piece(llm: Any, token: int) -> str:
    return llm.decode([token]) if llm.tokenizer is not None else str(token)


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
            if current < count:
                click.echo(SEPARATOR)


@click.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--system", default=None, help="System message.")
@sampling_options
def chat(artifact: Path, system: str | None, **kw: Any) -> None:
    """Interactive chat with the checkpoint's chat template.

    /reset clears the conversation, /exit (or Ctrl-D) quits. Ctrl-C stops the reply being written;
    Ctrl-C twice at the prompt quits. When the conversation outgrows the cache, the oldest turns
    are dropped (and it says so)."""
    from llamatrt.cli_chat import ChatSession

    if sys.stdin is None:
        raise InputError("stdin is closed; chat reads your messages from stdin (a terminal or a pipe)")
    args = _generation_args(kw)
    import llamatrt

    with llamatrt.load(
        artifact, kw["backend"], verify=not kw["no_verify"], prefix_cache_mb=kw["prefix_cache_mb"]
    ) as llm:
        ChatSession(llm, system, args).run()
