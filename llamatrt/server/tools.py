"""Tool calls as OpenAI's chat API defines them (`tools`, `tool_choice`), in a documented JSON form.

The bundled models' chat templates define no tool-call format, so the server uses one of its own
and tells the model in a system message: a call is an answer that is only the JSON object
`{"name": <function name>, "arguments": {...}}`. With `tool_choice` "required" or a named function
the answer is held to exactly that form by the grammar engine (the name one of the tools', the
arguments the function's `parameters` schema) and checked before it leaves; with "auto" the model
answers freely and an answer that is such a call (checked the same way) becomes one; with "none"
the tools are not offered. A call comes back as `message.tool_calls` (an id, the name, the arguments
as a JSON string) with `finish_reason: "tool_calls"`; earlier calls and `tool` results in the
conversation are rendered in the same form.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from llamatrt.server.protocol import BadRequest

NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")  # OpenAI's rule for function names
ANY_ARGUMENTS: dict[str, Any] = {"type": "object"}


@dataclass(frozen=True)
class Tools:
    functions: tuple[dict[str, Any], ...]  # {"name", "description", "parameters"} each
    choice: str  # "auto" | "required" | "none" | "named"
    named: str | None = None

    @property
    def offered(self) -> bool:
        return self.choice != "none"

    @property
    def forced(self) -> bool:
        """The answer must be a call: held to the call form while generated."""
        return self.choice in ("required", "named")

    def call_schema(self) -> dict[str, Any]:
        """The JSON schema of one call of the tools the answer may call."""
        calls = [
            {
                "type": "object",
                "properties": {"name": {"const": f["name"]}, "arguments": f.get("parameters") or ANY_ARGUMENTS},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for f in self.functions
            if self.choice != "named" or f["name"] == self.named
        ]
        return calls[0] if len(calls) == 1 else {"anyOf": calls}

    def system_text(self) -> str:
        listing = json.dumps(
            [{k: f[k] for k in ("name", "description", "parameters") if k in f} for f in self.functions]
        )
        must = "You must call one of them." if self.forced else "Call one only if it helps."
        return (
            f"You can call these functions: {listing}. {must} To call one, answer with only a JSON object "
            '{"name": <function name>, "arguments": <its arguments as a JSON object>}.'
        )

    def call_in(self, text: str) -> dict[str, Any] | None:
        """The call an answer makes, if it is one (valid arguments for a function offered)."""
        import jsonschema

        try:
            value = json.loads(text)
        except ValueError:
            return None
        if not isinstance(value, dict) or set(value) != {"name", "arguments"}:
            return None
        function = next((f for f in self.functions if f["name"] == value["name"]), None)
        if function is None or not isinstance(value["arguments"], dict):
            return None
        try:
            jsonschema.validate(value["arguments"], function.get("parameters") or ANY_ARGUMENTS)
        except jsonschema.ValidationError:
            return None
        return {
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": value["name"], "arguments": json.dumps(value["arguments"])},
        }


def parse_tools(body: dict[str, Any]) -> Tools | None:
    """`tools` and `tool_choice` of a chat request, checked (a 400 naming what is wrong)."""
    raw, choice = body.get("tools"), body.get("tool_choice")
    if raw is None:
        if choice not in (None, "none"):
            raise BadRequest("tool_choice needs tools; send the functions the model may call", "tool_choice")
        return None
    if not isinstance(raw, list) or not raw:
        raise BadRequest('tools must be a non-empty list of {"type": "function", "function": {...}}', "tools")
    functions = []
    for i, tool in enumerate(raw):
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if (
            not isinstance(function, dict)
            or not isinstance(function.get("name"), str)
            or not NAME.match(function["name"])
        ):
            raise BadRequest(
                f'tools[{i}] must be {{"type": "function", "function": {{"name": ...}}}} with a name of 1-64 letters, '
                "digits, _ or -",
                "tools",
            )
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise BadRequest(f"tools[{i}].function.parameters must be a JSON schema (an object)", "tools")
        functions.append({k: function[k] for k in ("name", "description", "parameters") if k in function})
    names = [f["name"] for f in functions]
    if len(set(names)) != len(names):
        raise BadRequest("tools has two functions of the same name; name each once", "tools")
    if choice is None or choice in ("auto", "required", "none"):
        return Tools(tuple(functions), choice or "auto")
    named = (
        choice.get("function", {}).get("name")
        if isinstance(choice, dict) and choice.get("type") == "function"
        else None
    )
    if named not in names:
        raise BadRequest(
            'tool_choice must be "none", "auto", "required" or {"type": "function", "function": {"name": <one of tools>}}',
            "tool_choice",
        )
    return Tools(tuple(functions), "named", named)


def with_tools(messages: list[dict[str, str]], tools: Tools | None) -> list[dict[str, str]]:
    """The conversation the model sees: the tools described in the system message."""
    if tools is None or not tools.offered:
        return messages
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": f"{messages[0]['content']}\n\n{tools.system_text()}"}, *messages[1:]]
    return [{"role": "system", "content": tools.system_text()}, *messages]
