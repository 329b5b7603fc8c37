"""DeepSeek-V4 tools: the `## Tools` section, DSML tool-call blocks (render and strict parse).

An assistant turn that calls tools ends with a DSML block (docs/chat.md §5):

    \\n\\n<｜DSML｜tool_calls>
    <｜DSML｜invoke name="get_weather">
    <｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>
    <｜DSML｜parameter name="days" string="false">3</｜DSML｜parameter>
    </｜DSML｜invoke>
    </｜DSML｜tool_calls>

String arguments are written raw with `string="true"`; every other JSON value is written as JSON with
`string="false"`. Tool calls come and go in the OpenAI shape
`{"type": "function", "function": {"name": str, "arguments": str (JSON object) | dict}}`.
"""

import json
from collections.abc import Mapping, Sequence
from typing import Any

from model1_jax.text.chat_format import (
    INVOKE_CLOSE,
    INVOKE_OPEN,
    PARAM_CLOSE,
    PARAM_OPEN,
    TOOL_CALLS_CLOSE,
    TOOL_CALLS_OPEN,
    TOOLS_SECTION,
)

# What separates an assistant's content from its tool-call block; the parser splits on it.
TOOL_CALLS_START = "\n\n" + TOOL_CALLS_OPEN


class ChatFormatError(ValueError):
    """A message list that cannot be rendered, or a completion that is not valid DeepSeek-V4 output.
    The message names the offending message index or character offset."""


def to_json(value: Any, where: str) -> str:
    """JSON as the format writes it: `json.dumps` defaults (`", "` and `": "` separators), non-ASCII kept."""
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError) as e:
        raise ChatFormatError(f"{where}: not JSON-serialisable ({e})") from None


def render_tools_section(tools: Any, where: str) -> str:
    """OpenAI tool list `[{"type": "function", "function": {"name", ...}}]` → the `## Tools` section
    (one JSON line per `function` object, in the given order)."""
    if not isinstance(tools, Sequence) or isinstance(tools, str) or not tools:
        raise ChatFormatError(f"{where}: `tools` must be a non-empty list of OpenAI tool objects")
    lines = []
    for k, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ChatFormatError(f"{where}: tools[{k}] must be {{'type': 'function', 'function': "
                                  f"{{'name': str, ...}}}}, got {str(tool)[:80]!r}")
        if tool.get("type", "function") != "function":
            raise ChatFormatError(f"{where}: tools[{k}] has type {tool['type']!r}; only 'function' exists")
        lines.append(to_json(dict(fn), f"{where}: tools[{k}]"))
    return TOOLS_SECTION.format(tool_schemas="\n".join(lines))


def _call_name_and_arguments(call: Any, where: str) -> tuple[str, dict]:
    fn = call.get("function") if isinstance(call, Mapping) else None
    if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise ChatFormatError(f"{where}: must be {{'type': 'function', 'function': {{'name': str, "
                              f"'arguments': str | dict}}}}, got {str(call)[:80]!r}")
    name, raw = fn["name"], fn.get("arguments", "{}")
    if '"' in name or "\n" in name:
        raise ChatFormatError(f"{where}: tool name {name!r} contains a quote or newline, which DSML cannot hold")
    if isinstance(raw, Mapping):
        args = dict(raw)
    elif isinstance(raw, str):
        # DeepSeek's encoder: arguments that are not a JSON object travel as one raw-string parameter.
        try:
            args = json.loads(raw)
        except ValueError:
            args = None
        if not isinstance(args, dict):
            args = {"arguments": raw}
    else:
        raise ChatFormatError(f"{where}: `arguments` must be a JSON string or a dict, got {type(raw).__name__}")
    for key in args:
        if not isinstance(key, str) or '"' in key or "\n" in key:
            raise ChatFormatError(f"{where}: parameter name {key!r} is not a string without quotes/newlines")
    return name, args


def render_tool_calls(tool_calls: Any, where: str) -> str:
    """OpenAI tool calls → `"\\n\\n<｜DSML｜tool_calls>\\n" … "</｜DSML｜tool_calls>"` (appended to content)."""
    if not isinstance(tool_calls, Sequence) or isinstance(tool_calls, str):
        raise ChatFormatError(f"{where}: `tool_calls` must be a list")
    invokes = []
    for k, call in enumerate(tool_calls):
        name, args = _call_name_and_arguments(call, f"{where}: tool_calls[{k}]")
        params = []
        for key, value in args.items():
            text = value if isinstance(value, str) else to_json(value, f"{where}: tool_calls[{k}].{key}")
            flag = "true" if isinstance(value, str) else "false"
            params.append(f'{PARAM_OPEN} name="{key}" string="{flag}">{text}{PARAM_CLOSE}')
        # With no parameters the block still has the empty line between the open and close tags.
        invokes.append(f'{INVOKE_OPEN} name="{name}">\n' + "\n".join(params) + f"\n{INVOKE_CLOSE}")
    return f"{TOOL_CALLS_START}\n" + "\n".join(invokes) + f"\n{TOOL_CALLS_CLOSE}"


class _Cursor:
    """Strict left-to-right reader over a completion; every failure names the character offset."""

    def __init__(self, text: str, pos: int):
        self.text, self.pos = text, pos

    def fail(self, what: str) -> ChatFormatError:
        found = self.text[self.pos:self.pos + 40]
        return ChatFormatError(f"malformed tool-call block at character {self.pos}: {what}; found {found!r}")

    def at(self, literal: str) -> bool:
        return self.text.startswith(literal, self.pos)

    def expect(self, literal: str) -> None:
        if not self.at(literal):
            raise self.fail(f"expected {literal!r}")
        self.pos += len(literal)

    def until(self, literal: str, what: str) -> str:
        end = self.text.find(literal, self.pos)
        if end < 0:
            raise self.fail(f"unterminated {what} (no {literal!r})")
        value, self.pos = self.text[self.pos:end], end + len(literal)
        return value


def _parse_value(raw: str, is_string: str, where: str) -> Any:
    if is_string == "true":
        return raw
    try:
        return json.loads(raw)
    except ValueError:
        raise ChatFormatError(f'{where} has string="false" but its value {raw[:60]!r} is not JSON') from None


def parse_tool_calls(text: str, pos: int) -> tuple[list[dict], int]:
    """Parse the DSML block that starts at `text[pos:]` (with its leading blank line).

    Returns (OpenAI tool calls, offset just past `</｜DSML｜tool_calls>`). Arguments come back as a JSON
    object string; a `string="false"` value that is not JSON, a duplicate parameter, a missing tag or
    an unterminated block raises ChatFormatError.
    """
    cur = _Cursor(text, pos)
    cur.expect(TOOL_CALLS_START + "\n")
    calls: list[dict] = []
    while not cur.at(TOOL_CALLS_CLOSE):
        if cur.pos >= len(text):
            raise cur.fail(f"unterminated tool_calls block (no {TOOL_CALLS_CLOSE!r})")
        cur.expect(INVOKE_OPEN + ' name="')
        name = cur.until('">\n', "invoke name")
        if '"' in name or "\n" in name or not name:
            raise ChatFormatError(f"malformed tool-call block: bad tool name {name!r}")
        where = f"tool call {len(calls)} ({name!r})"
        args: dict[str, Any] = {}
        while cur.at(PARAM_OPEN):
            cur.expect(PARAM_OPEN + ' name="')
            key = cur.until('" string="', f"{where} parameter name")
            if '"' in key or "\n" in key or ">" in key:
                raise ChatFormatError(f"malformed tool-call block: {where} has a bad parameter name {key!r}")
            is_string = cur.until('">', f"{where} parameter {key!r}")
            if is_string not in ("true", "false"):
                raise ChatFormatError(f'{where} parameter {key!r}: string="{is_string}" is not "true" or "false"')
            raw = cur.until(PARAM_CLOSE, f"{where} parameter {key!r}")
            cur.expect("\n")
            if key in args:
                raise ChatFormatError(f"{where} repeats parameter {key!r}")
            args[key] = _parse_value(raw, is_string, f"{where} parameter {key!r}")
        if not args and cur.at("\n" + INVOKE_CLOSE):
            cur.pos += 1            # the empty line the encoder writes for a call without parameters
        cur.expect(INVOKE_CLOSE + "\n")
        calls.append({"type": "function", "function": {"name": name, "arguments": json.dumps(
            args, ensure_ascii=False)}})
    cur.expect(TOOL_CALLS_CLOSE)
    return calls, cur.pos
