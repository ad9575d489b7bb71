"""Which grammar engine constrains decoding, measured on this CPU: llguidance and xgrammar on the
bundled SmolLM2's tokenizer (49,152 tokens). For each: the one-off tokenizer set-up; the time to
compile each schema of a small suite (a mid-size record, an enum, nested arrays, anyOf, a recursive
$ref); and the time per decode step to fill the token masks of B = 4 rows, every row stepped through
a valid answer of the mid-size schema (llguidance: all rows in one call on its thread pool;
xgrammar: a call per row, as vLLM calls it). Medians of repeated runs.
Benchmarks only, never CI. Usage: pip install llguidance xgrammar; python benchmarks/grammar_engines.py
"""

from __future__ import annotations

import json
import statistics
import time

ROWS = 4
RECORD = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "format": "email"},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "address": {
            "type": "object",
            "properties": {"street": {"type": "string"}, "city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["street", "city"],
        },
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 5},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "address", "tags", "active"],
    "additionalProperties": False,
}
ANSWER = {
    "name": "Ada Lovelace",
    "age": 36,
    "email": "ada@example.org",
    "role": "admin",
    "address": {"street": "12 St James's Square", "city": "London", "zip": "SW1Y 4JH"},
    "tags": ["math", "engines", "poetry"],
    "active": True,
}
SUITE = {
    "record": RECORD,
    "enum": {"enum": ["positive", "negative", "neutral"]},
    "nested-arrays": {"type": "array", "items": {"type": "array", "items": {"type": "number"}, "maxItems": 3}},
    "any-of": {"anyOf": [{"type": "string"}, {"type": "object", "properties": {"id": {"type": "integer"}}}]},
    "recursive": {
        "$defs": {
            "node": {
                "type": "object",
                "properties": {
                    "value": {"type": "integer"},
                    "children": {"type": "array", "items": {"$ref": "#/$defs/node"}},
                },
                "required": ["value"],
            }
        },
        "$ref": "#/$defs/node",
    },
}


def _median_ms(samples: list[float]) -> float:
    return 1000 * statistics.median(samples)


def _compile_ms(compile_one) -> dict[str, float]:
    """Each schema of the suite: the median of 5 compiles (and the first mask)."""
    out = {}
    for name, schema in SUITE.items():
        times = []
        for _ in range(5):
            started = time.perf_counter()
            compile_one(schema)
            times.append(time.perf_counter() - started)
        out[name] = _median_ms(times)
    return out


def llguidance_numbers(hf_tokenizer, answer_tokens: list[int]) -> dict[str, float]:
    import llguidance
    import llguidance.hf
    import llguidance.torch

    started = time.perf_counter()
    tokenizer = llguidance.hf.from_tokenizer(hf_tokenizer)
    setup = time.perf_counter() - started

    def compile_one(schema: dict) -> None:
        matcher = llguidance.LLMatcher(tokenizer, llguidance.LLMatcher.grammar_from_json_schema(schema))
        matcher.compute_bitmask()  # the first mask: some of the work is lazy
        assert not matcher.is_error(), matcher.get_error()

    compile_ms = _compile_ms(compile_one)
    executor = llguidance.LLExecutor()
    mask = llguidance.torch.allocate_token_bitmask(ROWS, tokenizer.vocab_size)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(RECORD)
    step_times = []
    for _ in range(3):
        matchers = [llguidance.LLMatcher(tokenizer, grammar) for _ in range(ROWS)]
        for token in answer_tokens:
            started = time.perf_counter()
            llguidance.torch.fill_next_token_bitmask_par(executor, [(m, i) for i, m in enumerate(matchers)], mask)
            step_times.append(time.perf_counter() - started)
            for m in matchers:
                assert m.consume_token(token), m.get_error()
        assert all(m.is_accepting() for m in matchers)
    return {
        "setup_ms": 1000 * setup,
        **{f"compile_{k}_ms": v for k, v in compile_ms.items()},
        "mask_step_ms": _median_ms(step_times),
    }


def xgrammar_numbers(hf_tokenizer, vocab_size: int, answer_tokens: list[int]) -> dict[str, float]:
    import xgrammar as xgr

    started = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(hf_tokenizer, vocab_size=vocab_size)
    compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
    setup = time.perf_counter() - started

    def compile_one(schema: dict) -> None:
        matcher = xgr.GrammarMatcher(compiler.compile_json_schema(json.dumps(schema)))
        matcher.fill_next_token_bitmask(xgr.allocate_token_bitmask(1, vocab_size), 0)

    compile_ms = _compile_ms(compile_one)
    compiled = compiler.compile_json_schema(json.dumps(RECORD))
    mask = xgr.allocate_token_bitmask(ROWS, vocab_size)
    step_times = []
    for _ in range(3):
        matchers = [xgr.GrammarMatcher(compiled) for _ in range(ROWS)]
        for token in answer_tokens:
            started = time.perf_counter()
            for i, m in enumerate(matchers):
                m.fill_next_token_bitmask(mask, i)
            step_times.append(time.perf_counter() - started)
            for m in matchers:
                assert m.accept_token(token)
        assert all(m.is_terminated() or m.accept_token(hf_tokenizer.eos_token_id) for m in matchers)
    return {
        "setup_ms": 1000 * setup,
        **{f"compile_{k}_ms": v for k, v in compile_ms.items()},
        "mask_step_ms": _median_ms(step_times),
    }


def main() -> None:
    from transformers import AutoTokenizer

    from llamatrt.models import load_checkpoint

    hf_tokenizer = AutoTokenizer.from_pretrained(load_checkpoint("smollm2").hf_dir)
    answer_tokens = hf_tokenizer.encode(json.dumps(ANSWER), add_special_tokens=False)
    report = {
        "answer_tokens": len(answer_tokens),
        "llguidance": llguidance_numbers(hf_tokenizer, answer_tokens),
        "xgrammar": xgrammar_numbers(hf_tokenizer, len(hf_tokenizer), answer_tokens),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
