"""What constraining costs the decode loop: the B = 4 artifact decoding 4 rows at once, every row held
to a mid-size JSON schema (a list of records, long enough to fill the token budget) against the same
rows unconstrained, interleaved rounds in one run; decode tok/s is tokens after the first over the
time after the first. Also the grammar engine's own time (mask fill and apply) per step.
Benchmarks only, never CI. Usage: python benchmarks/structured_decode.py ARTIFACT [ROUNDS]
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import llamatrt

RECORD = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "city": {"type": "string", "maxLength": 30},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "city", "tags", "active"],
    "additionalProperties": False,
}
SCHEMA = {
    "type": "object",
    "properties": {"people": {"type": "array", "items": RECORD, "minItems": 8}},
    "required": ["people"],
}
PROMPTS = [
    "List the people of the team as JSON.",
    "Give me the staff records in JSON.",
    "Describe the users of the system as JSON.",
    "Write the members of the club as JSON.",
]
NEW_TOKENS = 128


def decode_rate(llm, ids: list[list[int]], grammar) -> float:
    """The batch's decode tok/s: every row's tokens after its first over the time from the first
    row's first token to the last row's last (no row stops early: EOS is not a stop, and the
    schema is longer than the budget)."""
    first, last, tokens = None, 0.0, 0
    for step in llm.generator.stream(ids, NEW_TOKENS, use_eos=grammar is not None, grammar=grammar):
        if step.token_id is None:
            continue
        first = step.elapsed_s if first is None else first
        last, tokens = max(last, step.elapsed_s), tokens + 1
        assert grammar is None or step.finish_reason in (None, "length"), "the schema must fill the budget"
    return (tokens - len(ids)) / (last - first)


def main() -> None:
    artifact, rounds = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 3
    with llamatrt.load(artifact, verify=False, prefix_cache_mb=0) as llm:
        assert llm.manifest.batch_size == 4, "an artifact exported with --batch 4"
        ids = [llm.encode(p, chat=True) for p in PROMPTS]
        started = time.perf_counter()
        grammar = llm.grammar(json_schema=SCHEMA)  # the engine is made here, outside the decode timing
        first_compile_ms = 1000 * (time.perf_counter() - started)
        for _step in llm.generator.stream(
            ids, 4, grammar=grammar
        ):  # warm-up: the engine's first masks build its tables
            pass
        free, held, engine_s = [], [], 0.0
        for _ in range(rounds):
            free.append(decode_rate(llm, ids, None))
            before = llm.grammars.stats.mask_seconds
            held.append(decode_rate(llm, ids, grammar))
            engine_s += llm.grammars.stats.mask_seconds - before
        started = time.perf_counter()
        llm.grammar(json_schema=SCHEMA)
        compile_ms = 1000 * (time.perf_counter() - started)
    report = {
        "artifact": artifact,
        "rows": 4,
        "new_tokens": NEW_TOKENS,
        "unconstrained_decode_tok_s": statistics.median(free),
        "constrained_decode_tok_s": statistics.median(held),
        "ratio": statistics.median(held) / statistics.median(free),
        "mask_ms_per_step": 1000 * engine_s / (rounds * NEW_TOKENS),
        "engine_setup_and_first_compile_ms": first_compile_ms,
        "schema_compile_ms": compile_ms,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
