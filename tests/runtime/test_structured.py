"""Structured output on a tiny random model over a byte-level BPE (every JSON text has tokens): the
grammar holds every answer, whatever the weights; what the engine cannot enforce is refused naming
it; a constrained row leaves the other rows' tokens unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

import llamatrt
from llamatrt.base.errors import InputError
from llamatrt.runtime.generator import Generator
from llamatrt.runtime.scheduler import Request
from tests.conftest import TINY_BASE, save_byte_level_bpe, shared_folder

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEXT = (
    '{"name": "Ada", "age": 36, "tags": ["a", "b"], "ok": true, "score": -1.5e3, "none": null} '
    "user system assistant: what is the capital of France? Paris. 0123456789 abcdefghijklmnopqrstuvwxyz"
)


def make_json_artifact(root: Path) -> None:
    """A tiny random Llama whose vocabulary is a byte-level BPE with ChatML markers, B = 2, C = 1024 (room for tools described in a system message)."""
    from tokenizers import Tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from llamatrt.exporter.export import ExportOptions
    from llamatrt.tools.pipeline import export_artifact

    folder = root / "hf"
    folder.mkdir(parents=True)
    path = save_byte_level_bpe(folder, TEXT, ["<|im_end|>", "<|im_start|>"], vocab_size=400)
    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_file(str(path)), eos_token="<|im_end|>")
    fast.chat_template = CHATML
    fast.save_pretrained(folder)
    base = {**TINY_BASE, "vocab_size": 400, "eos_token_id": 0, "bos_token_id": None, "pad_token_id": 0}
    LlamaForCausalLM(LlamaConfig(**base, num_key_value_heads=2, tie_word_embeddings=True)).save_pretrained(folder)
    export_artifact(folder, root / "art", ExportOptions(batch_size=2, max_cache_len=1024, prefill_chunk=32))


@pytest.fixture(scope="session")
def json_artifact(tmp_path_factory) -> Path:
    return shared_folder(tmp_path_factory, "json-artifact", make_json_artifact) / "art"


@pytest.fixture(scope="module")
def llm(json_artifact: Path):
    with llamatrt.load(json_artifact, verify=False) as llm:
        yield llm


# Schemas of the kinds people send; short bounds, so a random model ends them within the budget.
SCHEMAS = [
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False},
    {"enum": ["positive", "negative", "neutral"]},
    {"type": "integer", "minimum": -5, "maximum": 5},
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 1, "maxItems": 3},
    {"type": "string", "maxLength": 6},
    {"type": "string", "pattern": "^[a-c]{2,4}$"},
    {"anyOf": [{"type": "boolean"}, {"type": "null"}]},
    {
        "type": "object",
        "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}, "b": {"enum": ["x", "y"]}},
        "required": ["a", "b"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "inner": {
                "type": "object",
                "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 3}},
                "required": ["n"],
                "additionalProperties": False,
            }
        },
        "required": ["inner"],
        "additionalProperties": False,
    },
    {
        "$defs": {
            "node": {
                "type": "object",
                "properties": {
                    "v": {"type": "integer", "minimum": 0, "maximum": 1},
                    "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 1},
                },
                "required": ["v"],
                "additionalProperties": False,
            }
        },
        "$ref": "#/$defs/node",
    },
]


@pytest.mark.parametrize("schema", SCHEMAS, ids=[f"schema{i}" for i in range(len(SCHEMAS))])
def test_every_answer_satisfies_its_schema_whatever_the_weights(llm, schema: dict) -> None:
    results = llm.generate(
        ["w1", "a longer prompt here"], json_schema=schema, max_new_tokens=96, seed=3, temperature=1.0
    )
    for result in results:
        if result.finish_reason == "stop":
            jsonschema.validate(json.loads(result.text), schema)
            assert result.validated is True
        else:  # cut by max_new_tokens: incomplete, and never presented as valid
            assert result.finish_reason == "length" and result.validated is False


def test_greedy_constrained_answers_complete_and_validate(llm) -> None:
    schema = SCHEMAS[7]
    result = llm.generate("w1", json_schema=schema, max_new_tokens=64)[0]
    assert result.finish_reason == "stop" and result.validated
    assert set(json.loads(result.text)) == {"a", "b"}
    assert llm.generate("w1", grammar='start: "yes" | "no"', max_new_tokens=8)[0].text in ("yes", "no")


@pytest.mark.parametrize(
    ("schema", "named"),
    [
        ({"type": "array", "uniqueItems": True}, "uniqueItems"),
        ({"not": {"type": "string"}}, "not"),
        ({"type": "object", "propertyNames": {"maxLength": 3}}, "propertyNames"),
        ({"if": {"type": "string"}, "then": {"maxLength": 2}}, "if"),
        ({"type": "string", "format": "no-such-format"}, "no-such-format"),
        ({"type": "integer", "minimum": "zero"}, "not a valid JSON schema"),
    ],
)
def test_a_schema_the_engine_cannot_enforce_is_refused_naming_what(llm, schema: dict, named: str) -> None:
    with pytest.raises(InputError, match=named):
        llm.generate("w1", json_schema=schema, max_new_tokens=4)


def test_a_constrained_row_leaves_the_other_rows_tokens_unchanged(llm) -> None:
    prompts = [llm.encode("w1 w2 w3"), llm.encode("a longer prompt")]
    alone = Generator(llm.backend).generate(prompts, max_new_tokens=12)
    grammar = llm.grammar(json_schema=SCHEMAS[3])
    steps: dict[int, list[int]] = {0: [], 1: []}
    requests = [
        Request(prompts[0], max_new_tokens=12, use_eos=False),
        Request(prompts[1], max_new_tokens=12, grammar=grammar),
    ]
    for step in llm.generator.run(requests):
        if step.token_id is not None:
            steps[step.index].append(step.token_id)
    assert steps[0] == alone[0]
    assert steps[1] != alone[1]  # the other row was constrained
    assert llm.grammars.stats.mask_seconds > 0


def test_cli_json_schema_file(json_artifact: Path, tmp_path: Path) -> None:
    from tests.safety_helpers import invoke_cli

    (tmp_path / "s.json").write_text(json.dumps(SCHEMAS[7]))
    (tmp_path / "bad.json").write_text("{not json")
    ok = invoke_cli(["generate", str(json_artifact), "--prompt", "w1", "--json-schema", "s.json", "--json"], tmp_path)
    assert ok.returncode == 0, ok.stderr
    out = json.loads(ok.stdout)
    assert out["validated"] is True and jsonschema.validate(json.loads(out["text"]), SCHEMAS[7]) is None
    bad = invoke_cli(["generate", str(json_artifact), "--prompt", "w1", "--json-schema", "bad.json"], tmp_path)
    assert bad.returncode == 1 and "is not JSON" in bad.stderr and "Traceback" not in bad.stderr
