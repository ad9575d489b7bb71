"""Structured output against any OpenAI-compatible server: a suite of JSON schemas of the kinds
people send (flat and nested objects, arrays with bounds, enums, anyOf, optional properties,
string patterns and formats, a recursive $ref), each asked for through `response_format`
(`json_schema`), each answer parsed and validated (`jsonschema`). Reported per server: answers that
validate, answers that do not (a server that returns 200 with them breaks its promise), answers cut
by max_tokens, refusals, errors. The suite's strings and arrays are bounded so that answers end."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

_S = {"type": "string", "maxLength": 12}
_I = {"type": "integer", "minimum": 0, "maximum": 99}


def _obj(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties) if required is None else required,
        "additionalProperties": False,
    }


SCHEMAS: dict[str, dict[str, Any]] = {
    "boolean": {"type": "boolean"},
    "integer-range": {"type": "integer", "minimum": -5, "maximum": 5},
    "number": {"type": "number", "minimum": 0, "maximum": 1},
    "short-string": {"type": "string", "maxLength": 8},
    "pattern": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
    "enum-sentiment": {"enum": ["positive", "negative", "neutral"]},
    "enum-mixed": {"enum": [1, "two", None, True]},
    "const": {"const": "ok"},
    "nullable": {"type": ["integer", "null"], "minimum": 0, "maximum": 9},
    "email": {"type": "string", "format": "email", "maxLength": 40},
    "date": {"type": "string", "format": "date"},
    "uuid": {"type": "string", "format": "uuid"},
    "flat-object": _obj({"name": _S, "age": _I}),
    "optional-properties": _obj({"name": _S, "nickname": _S, "age": _I}, ["name"]),
    "classification": _obj(
        {"label": {"enum": ["spam", "ham"]}, "confidence": {"type": "number", "minimum": 0, "maximum": 1}}
    ),
    "extraction": _obj({"city": _S, "country": _S, "population": {"type": "integer", "minimum": 0}}),
    "nested-object": _obj({"user": _obj({"id": _I, "name": _S}), "active": {"type": "boolean"}}),
    "deeply-nested": _obj({"a": _obj({"b": _obj({"c": _obj({"d": {"type": "boolean"}})})})}),
    "array-bounded": {"type": "array", "items": _I, "minItems": 1, "maxItems": 4},
    "array-of-strings": {"type": "array", "items": _S, "maxItems": 3},
    "array-of-objects": {"type": "array", "items": _obj({"k": _S, "v": _I}), "minItems": 1, "maxItems": 2},
    "object-with-array": _obj({"tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}}),
    "tuple": {"type": "array", "prefixItems": [_I, _S], "items": False, "minItems": 2},
    "anyof-scalars": {"anyOf": [{"type": "boolean"}, _I]},
    "anyof-objects": {
        "anyOf": [
            _obj({"kind": {"const": "cat"}, "lives": _I}),
            _obj({"kind": {"const": "dog"}, "good": {"type": "boolean"}}),
        ]
    },
    "oneof-like": {"oneOf": [_obj({"x": _I}), _obj({"y": _S})]},
    "allof": {
        "allOf": [
            {"type": "object", "properties": {"a": _I}, "required": ["a"]},
            {"type": "object", "properties": {"b": _S}},
        ]
    },
    "defs-ref": {
        "$defs": {"point": _obj({"x": _I, "y": _I})},
        **_obj({"from": {"$ref": "#/$defs/point"}, "to": {"$ref": "#/$defs/point"}}),
    },
    "recursive": {
        "$defs": {
            "node": _obj({"v": _I, "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 1}}, ["v"])
        },
        "$ref": "#/$defs/node",
    },
    "function-arguments": _obj({"location": _S, "unit": {"enum": ["celsius", "fahrenheit"]}}, ["location"]),
}


@dataclass
class StructuredReport:
    url: str
    model: str
    schemas: int
    valid: int = 0
    invalid: int = 0  # a complete answer (finish_reason "stop") that does not satisfy its schema
    cut: int = 0  # finish_reason "length": incomplete by its own account
    refused: int = 0  # a 4xx: the server said it cannot enforce the schema
    errors: int = 0
    invalid_names: list[str] = field(default_factory=list)
    refused_names: list[str] = field(default_factory=list)
    error_kinds: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def run_schemas(
    url: str, model: str | None = None, max_tokens: int = 256, api_key: str | None = None
) -> StructuredReport:
    import jsonschema
    import openai

    client = openai.OpenAI(base_url=url.rstrip("/") + "/v1", api_key=api_key or "none", max_retries=0, timeout=300)
    model = model or client.models.list().data[0].id
    report = StructuredReport(url, model, len(SCHEMAS))
    kinds: Counter[str] = Counter()
    for name, schema in SCHEMAS.items():
        request = f"Answer with JSON only. Give an example value for the schema named {name}."
        try:
            reply = client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": request}],
                response_format={
                    "type": "json_schema",
                    "json_schema": {"name": name.replace("-", "_"), "schema": schema, "strict": True},
                },
                max_tokens=max_tokens,
                temperature=0,
            )
        except openai.BadRequestError:
            report.refused += 1
            report.refused_names.append(name)
            continue
        except Exception as e:  # any other failure of the server or the client counts as an error
            report.errors += 1
            kinds[f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"] += 1
            continue
        choice = reply.choices[0]
        if choice.finish_reason == "length":
            report.cut += 1
            continue
        try:
            jsonschema.validate(json.loads(choice.message.content or ""), schema)
            report.valid += 1
        except (ValueError, jsonschema.ValidationError):
            report.invalid += 1
            report.invalid_names.append(name)
    report.error_kinds = dict(kinds)
    return report
