"""DeepSeek-V4 chat format: every rendering rule, both revisions' effort tiers, DSML tool calls, the parser,
and token ids through a small `tokenizers` tokenizer. Expected strings are written out by hand from the
documented format (docs/chat.md), never produced by the encoder under test."""

import json

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from model1_jax.text import ChatEncoder, ChatFormatError, encode_messages, parse_completion

# The format's literal pieces, written out here independently of model1_jax/text/chat_format.py.
B, E = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
U, A = "<｜User｜>", "<｜Assistant｜>"
TS, TE = "<think>", "</think>"

ABSOLUTE = ("Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
            "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the "
            "root cause, rigorously stress-testing your logic against all potential paths, edge cases, and "
            "adversarial scenarios.\nExplicitly write out your entire deliberation process, documenting every "
            "intermediate step, considered alternative, and rejected hypothesis to ensure absolutely no "
            "assumption is left unchecked.\n\n")
BEYOND = ("Reasoning Effort: Beyond maximum — exhaustive, relentless, and uncompromising.\n"
          "You MUST reason with the utmost depth and rigor, leaving absolutely nothing to chance: exhaustively "
          "decompose the problem into its most fundamental components, trace every causal chain to its root, and "
          "resolve the underlying cause rather than any surface symptom.\nDo not stop reasoning until you have "
          "independently verified the solution from multiple angles and are certain that no assumption remains "
          "unchecked and no error remains undiscovered.\n\n")


def tools_section(*schema_lines):
    return ("## Tools\n\nYou have access to a set of tools to help answer the user's question. You can invoke "
            "tools by writing a \"<｜DSML｜tool_calls>\" block like the following:\n\n"
            "<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"$TOOL_NAME\">\n"
            "<｜DSML｜parameter name=\"$PARAMETER_NAME\" string=\"true|false\">$PARAMETER_VALUE</｜DSML｜parameter>\n"
            "...\n</｜DSML｜invoke>\n<｜DSML｜invoke name=\"$TOOL_NAME2\">\n...\n</｜DSML｜invoke>\n"
            "</｜DSML｜tool_calls>\n\n"
            "String parameters should be specified as is and set `string=\"true\"`. For all other types (numbers, "
            "booleans, arrays, objects), pass the value in JSON format and set `string=\"false\"`.\n\n"
            "If thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning inside "
            "<think>...</think> BEFORE any tool calls or final response.\n\n"
            "Otherwise, output directly after </think> with tool calls or final response.\n\n"
            "### Available Tool Schemas\n\n" + "\n".join(schema_lines) + "\n\n"
            "You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.\n")


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}
WEATHER_LINE = ('{"name": "get_weather", "description": "Weather for a city", "parameters": {"type": "object", '
                '"properties": {"city": {"type": "string"}}}}')


def call(cid, name, arguments):
    return {"id": cid, "type": "function", "function": {"name": name, "arguments": arguments}}


def user(text):
    return {"role": "user", "content": text}


def tool(call_id, content):
    return {"role": "tool", "tool_call_id": call_id, "content": content}


# -- plain turns -------------------------------------------------------------------------------------------

def test_single_turn_chat_and_thinking():
    msgs = [{"role": "system", "content": "Be brief."}, user("Hi")]
    assert encode_messages(msgs) == B + "Be brief." + U + "Hi" + A + TE
    assert encode_messages(msgs, thinking="chat") == B + "Be brief." + U + "Hi" + A + TE
    assert encode_messages(msgs, thinking=True) == B + "Be brief." + U + "Hi" + A + TS
    assert encode_messages(msgs, thinking="thinking", add_bos=False) == "Be brief." + U + "Hi" + A + TS


def test_multi_turn_thinking_drops_earlier_reasoning():
    msgs = [{"role": "system", "content": "Be brief."}, user("2+2?"),
            {"role": "assistant", "reasoning_content": "Add.", "content": "4"}, user("Times 3?"),
            {"role": "assistant", "reasoning_content": "Multiply.", "content": "12"}, user("Minus 2?")]
    dropped = B + "Be brief." + U + "2+2?" + A + TE + "4" + E + U + "Times 3?" + A + TE + "12" + E \
        + U + "Minus 2?" + A + TS
    kept = B + "Be brief." + U + "2+2?" + A + TS + "Add." + TE + "4" + E + U + "Times 3?" + A + TS + "Multiply." \
        + TE + "12" + E + U + "Minus 2?" + A + TS
    chat = B + "Be brief." + U + "2+2?" + A + TE + "4" + E + U + "Times 3?" + A + TE + "12" + E \
        + U + "Minus 2?" + A + TE
    assert encode_messages(msgs, thinking=True) == dropped
    assert encode_messages(msgs, thinking=True, drop_thinking=False) == kept
    assert encode_messages(msgs, thinking=False) == chat
    assert encode_messages(msgs, thinking=False, drop_thinking=False) == chat
    # An assistant turn after the last user turn keeps its reasoning (a training / scoring layout).
    done = msgs[:5]
    assert encode_messages(done, thinking=True) == B + "Be brief." + U + "2+2?" + A + TE + "4" + E \
        + U + "Times 3?" + A + TS + "Multiply." + TE + "12" + E
    # OpenAI response extras are ignored; `reasoning` is accepted as the name of the same field.
    extras = [user("q"), {"role": "assistant", "content": "a", "refusal": None, "annotations": [], "name": "bot"}]
    assert encode_messages(extras) == B + U + "q" + A + TE + "a" + E
    alias = [user("q"), {"role": "assistant", "reasoning": "r", "content": "a"}]
    assert encode_messages(alias, thinking=True) == B + U + "q" + A + TS + "r" + TE + "a" + E


def test_user_runs_merge_and_developer_turns():
    assert encode_messages([user("U1"), user("U2"), {"role": "assistant", "content": "A1"}, user("U3")]) \
        == B + U + "U1\n\nU2" + A + TE + "A1" + E + U + "U3" + A + TE
    dev = [{"role": "system", "content": "S"}, {"role": "developer", "content": "D1"}, user("q1"),
           {"role": "assistant", "content": "a1"}, {"role": "developer", "content": "D2"}]
    assert encode_messages(dev) == B + "S" + U + "D1" + U + "q1" + A + TE + "a1" + E + U + "D2" + A + TE
    # Thinking mode with drop_thinking removes developer turns before the last user/developer turn.
    assert encode_messages(dev, thinking=True) == B + "S" + U + "q1" + A + TE + "a1" + E + U + "D2" + A + TS


def test_latest_reminder_and_prefill():
    msgs = [{"role": "system", "content": "S"}, {"role": "latest_reminder", "content": "Today is Monday."}, user("q")]
    assert encode_messages(msgs) == B + "S<｜latest_reminder｜>Today is Monday." + U + "q" + A + TE
    # A reminder after the user turn follows the hand-over to the assistant.
    assert encode_messages([user("q"), {"role": "latest_reminder", "content": "R"}]) \
        == B + U + "q" + A + TE + "<｜latest_reminder｜>R"
    # wo_eos leaves the last assistant turn open, for continuing a partial answer.
    prefill = [user("q"), {"role": "assistant", "reasoning_content": "r", "content": "Sure", "wo_eos": True}]
    assert encode_messages(prefill) == B + U + "q" + A + TE + "Sure"
    assert encode_messages(prefill, thinking=True) == B + U + "q" + A + TS + "r" + TE + "Sure"


def test_task_tokens():
    assert encode_messages([{"role": "user", "content": "find docs", "task": "query"}]) \
        == B + U + "find docs<｜query｜>"
    assert encode_messages([{"role": "user", "content": "do it", "task": "action"}], thinking=True) \
        == B + U + "do it" + A + TS + "<｜action｜>"
    # The answer to a task has no reasoning part, even in thinking mode.
    msgs = [{"role": "user", "content": "x", "task": "title"}, {"role": "assistant", "reasoning_content": "r",
                                                                "content": "A title"}]
    assert encode_messages(msgs, thinking=True) == B + U + "x<｜title｜>A title" + E


def test_context_renders_only_the_new_messages():
    ctx = [user("q1"), {"role": "assistant", "content": "a1"}]
    new = [user("q2")]
    assert encode_messages(ctx) == B + U + "q1" + A + TE + "a1" + E
    assert encode_messages(new, context=ctx) == U + "q2" + A + TE
    assert encode_messages(ctx) + encode_messages(new, context=ctx) == encode_messages(ctx + new)
    # Thinking mode: a context ending with a developer turn (dropped once a later user turn exists) still
    # renders the new message.
    ctx = [user("q1"), {"role": "assistant", "reasoning_content": "r", "content": "a1"},
           {"role": "developer", "content": "D"}]
    assert encode_messages([user("q2")], context=ctx, thinking=True) == U + "q2" + A + TS
    # Tool results answering a call made in the context are ordered by that call.
    ctx = [user("q"), {"role": "assistant", "content": "", "tool_calls": [call("a", "t", "{}"), call("b", "t", "{}")]}]
    new = [tool("b", "RB"), tool("a", "RA")]
    assert encode_messages(new, context=ctx) == U + "<tool_result>RA</tool_result>\n\n<tool_result>RB</tool_result>" \
        + A + TE


# -- reasoning effort per revision ------------------------------------------------------------------------------

@pytest.mark.parametrize("revision,effort,prefix", [
    ("0731", None, ""), ("0731", "low", ""), ("0731", "high", ABSOLUTE), ("0731", "max", BEYOND),
    ("preview", None, ""), ("preview", "high", ""), ("preview", "max", ABSOLUTE)])
def test_effort_tiers(revision, effort, prefix):
    msgs = [{"role": "system", "content": "S"}, user("q")]
    assert encode_messages(msgs, thinking=True, revision=revision, reasoning_effort=effort) \
        == B + prefix + "S" + U + "q" + A + TS
    # Chat mode never writes the effort text.
    assert encode_messages(msgs, revision=revision, reasoning_effort=effort) == B + "S" + U + "q" + A + TE


def test_effort_default_revision_is_0731_and_context_skips_the_prefix():
    assert encode_messages([user("q")], thinking=True, reasoning_effort="max") == B + BEYOND + U + "q" + A + TS
    assert encode_messages([user("q2")], context=[user("q1"), {"role": "assistant", "content": "a"}],
                           thinking=True, drop_thinking=False, reasoning_effort="max") == U + "q2" + A + TS


@pytest.mark.parametrize("revision,effort", [("preview", "low"), ("preview", "medium"), ("0731", "medium"),
                                             ("0731", "xhigh"), ("0731", 3)])
def test_effort_rejected(revision, effort):
    with pytest.raises(ChatFormatError, match=f"not valid for revision '{revision}'"):
        encode_messages([user("q")], thinking=True, revision=revision, reasoning_effort=effort)


# -- tools -----------------------------------------------------------------------------------------------------------

def test_tools_section_placement_and_response_format():
    assert encode_messages([{"role": "system", "content": "S"}, user("hi")], tools=[WEATHER]) \
        == B + "S\n\n" + tools_section(WEATHER_LINE) + U + "hi" + A + TE
    # No leading system message: a content-less one carries the section.
    assert encode_messages([user("hi")], tools=[WEATHER]) \
        == B + "\n\n" + tools_section(WEATHER_LINE) + U + "hi" + A + TE
    assert encode_messages([user("hi")], tools=[]) == B + U + "hi" + A + TE
    dev = [{"role": "developer", "content": "D", "tools": [WEATHER], "response_format": {"type": "json_object"}}]
    assert encode_messages(dev) == B + U + "D\n\n" + tools_section(WEATHER_LINE) + "\n\n## Response Format:\n\n" \
        "You MUST strictly adhere to the following schema to reply:\n{\"type\": \"json_object\"}" + A + TE
    two = [{"type": "function", "function": {"name": "a", "parameters": {"type": "object"}}},
           {"type": "function", "function": {"name": "ping", "description": "出力"}}]
    assert encode_messages([{"role": "system", "content": None, "tools": two}]) == B + "\n\n" + tools_section(
        '{"name": "a", "parameters": {"type": "object"}}', '{"name": "ping", "description": "出力"}')


def test_tool_call_arguments():
    def rendered(arguments):
        turn = {"role": "assistant", "content": "", "tool_calls": [call("c", "f", arguments)]}
        text = encode_messages([user("q"), turn])
        prompt = B + U + "q" + A + TE + "\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n"
        assert text.startswith(prompt) and text.endswith("\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>" + E)
        return text[len(prompt):-len("\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>" + E)]

    p = '<｜DSML｜parameter name="{}" string="{}">{}</｜DSML｜parameter>'.format
    assert rendered('{"q": "café \\"x\\"", "n": 1.5, "ok": true, "none": null, "xs": [1, "二"], "o": {"k": 1}}') \
        == "\n".join([p("q", "true", 'café "x"'), p("n", "false", "1.5"), p("ok", "false", "true"),
                      p("none", "false", "null"), p("xs", "false", '[1, "二"]'), p("o", "false", '{"k": 1}')])
    assert rendered("{}") == ""                                   # the empty line between the tags
    assert rendered("not json") == p("arguments", "true", "not json")
    assert rendered("[1, 2]") == p("arguments", "true", "[1, 2]")  # not an object: one raw parameter
    assert rendered({"city": "Paris", "days": 2}) == p("city", "true", "Paris") + "\n" + p("days", "false", "2")


def test_full_tool_round_trip_conversation():
    """Thinking mode, tools defined, two calls, results arriving out of order, a final answer and a
    follow-up question. Tools switch drop_thinking off, so every turn keeps its reasoning."""
    turn1 = {"role": "assistant", "reasoning_content": "Two cities, two calls.", "content": "",
             "tool_calls": [call("call_1", "get_weather", '{"city": "Paris", "days": 2}'),
                            call("call_2", "get_weather", '{"city": "東京", "days": 1}')]}
    turn2 = {"role": "assistant", "reasoning_content": "Both results are in.", "content": "Paris 18C, Tokyo 25C."}
    msgs = [{"role": "system", "content": "You are a weather bot."}, user("Weather in Paris and Tokyo?"), turn1,
            {"role": "tool", "tool_call_id": "call_2", "content": "Tokyo: 25C"},
            {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "Paris: 18C"}]},
            turn2, user("Thanks!")]
    dsml = ("\n\n<｜DSML｜tool_calls>\n"
            "<｜DSML｜invoke name=\"get_weather\">\n"
            "<｜DSML｜parameter name=\"city\" string=\"true\">Paris</｜DSML｜parameter>\n"
            "<｜DSML｜parameter name=\"days\" string=\"false\">2</｜DSML｜parameter>\n"
            "</｜DSML｜invoke>\n"
            "<｜DSML｜invoke name=\"get_weather\">\n"
            "<｜DSML｜parameter name=\"city\" string=\"true\">東京</｜DSML｜parameter>\n"
            "<｜DSML｜parameter name=\"days\" string=\"false\">1</｜DSML｜parameter>\n"
            "</｜DSML｜invoke>\n"
            "</｜DSML｜tool_calls>")
    expected = (B + ABSOLUTE + "You are a weather bot.\n\n" + tools_section(WEATHER_LINE)
                + U + "Weather in Paris and Tokyo?" + A + TS + "Two cities, two calls." + TE + dsml + E
                + U + "<tool_result>Paris: 18C</tool_result>\n\n<tool_result>Tokyo: 25C</tool_result>"
                + A + TS + "Both results are in." + TE + "Paris 18C, Tokyo 25C." + E
                + U + "Thanks!" + A + TS)
    assert encode_messages(msgs, thinking=True, reasoning_effort="high", tools=[WEATHER]) == expected

    # Each assistant turn parses back from the text the model would have written after its prompt.
    for k, turn in ((2, turn1), (5, turn2)):
        prompt = encode_messages(msgs[:k], thinking=True, reasoning_effort="high", tools=[WEATHER])
        full = encode_messages(msgs[:k + 1], thinking=True, reasoning_effort="high", tools=[WEATHER])
        assert full.startswith(prompt)
        parsed = parse_completion(full[len(prompt):], thinking=True, require_eos=True)
        assert parsed["reasoning_content"] == turn["reasoning_content"] and parsed["content"] == turn["content"]
        want = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in turn.get("tool_calls", [])]
        assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in parsed["tool_calls"]] == want


def test_tool_results_keep_text_blocks_in_place():
    msgs = [user("Run both"), {"role": "assistant", "content": "", "tool_calls": [call("a", "t", "{}"),
                                                                                 call("b", "t", "{}")]},
            tool("b", "RB"), tool("a", "RA"), user("Summarize")]
    assert encode_messages(msgs).endswith(
        E + U + "<tool_result>RA</tool_result>\n\n<tool_result>RB</tool_result>\n\nSummarize" + A + TE)


# -- bad input ---------------------------------------------------------------------------------------------------

TC = {"role": "assistant", "content": "", "tool_calls": [call("c1", "f", "{}")]}


@pytest.mark.parametrize("messages,pattern", [
    ([user("q"), {"role": "robot", "content": "x"}], r"messages\[1\]: unknown role 'robot'"),
    (["hello"], r"messages\[0\]: must be a dict"),
    ([user("q"), {"role": "tool", "content": "r"}], r"messages\[1\]: a tool message must follow an assistant"),
    ([{"role": "tool", "content": "r"}], r"messages\[0\]: a tool message must follow"),
    ([TC, {"role": "tool", "tool_call_id": "zz", "content": "r"}], r"messages\[1\]: tool_call_id 'zz' is not one"),
    ([TC, {"role": "tool", "tool_call_id": "c1"}], r"messages\[1\] \(tool\): `content` is missing"),
    ([TC, {"role": "tool", "tool_call_id": "c1", "content": [{"type": "image_url"}]}], r"content\[0\] is not a text"),
    ([{"role": "user"}], r"messages\[0\] \(user\): `content` is missing"),
    ([{"role": "user", "content": ["a"]}], r"messages\[0\] \(user\): `content` must be a string"),
    ([{"role": "developer", "content": ""}], r"messages\[0\] \(developer\): `content` must not be empty"),
    ([{"role": "latest_reminder"}], r"messages\[0\] \(latest_reminder\): `content` is missing"),
    ([{"role": "user", "content": "q", "tools": [WEATHER]}], r"messages\[0\] \(user\): unsupported key\(s\) \['tools'"),
    ([{"role": "user", "content": "q", "task": "summarise"}], r"messages\[0\]: task 'summarise' is not one of"),
    ([user("q"), {"role": "assistant", "reasoning": "a", "reasoning_content": "b"}], r"messages\[1\]: `reasoning`"),
    ([user("q"), {"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}],
     r"messages\[1\]: tool_calls\[0\]: must be"),
    ([{"role": "system", "content": "s", "tools": [{"type": "function"}]}], r"messages\[0\]: tools\[0\] must be"),
    ([user("q"), {"role": "assistant", "content": "a", "function_call": {"name": "f"}}], "legacy `function_call`"),
    ([], "messages is empty"),
])
def test_bad_messages_are_named(messages, pattern):
    with pytest.raises(ChatFormatError, match=pattern):
        encode_messages(messages)


def test_bad_options():
    with pytest.raises(ChatFormatError, match="revision must be one of"):
        encode_messages([user("q")], revision="0813")
    with pytest.raises(ChatFormatError, match="thinking must be"):
        encode_messages([user("q")], thinking="yes")
    with pytest.raises(ChatFormatError, match="must be a list of message dicts"):
        encode_messages(user("q"))
    with pytest.raises(ChatFormatError, match="given both as an argument and on messages"):
        encode_messages([{"role": "system", "content": "s", "tools": [WEATHER]}], tools=[WEATHER])
    with pytest.raises(ChatFormatError, match="cannot be combined with context"):
        encode_messages([user("q")], context=[user("p"), {"role": "assistant", "content": "a"}], tools=[WEATHER])
    with pytest.raises(ChatFormatError, match=r"context\[0\]: unknown role"):
        encode_messages([user("q")], context=[{"role": "bot", "content": "a"}])


# -- parsing completions -----------------------------------------------------------------------------------------

def test_parse_plain_completions():
    assert parse_completion("Hello!" + E) == {"role": "assistant", "reasoning_content": None, "content": "Hello!",
                                              "tool_calls": []}
    assert parse_completion("Hello!") ["content"] == "Hello!"     # a stripped stop token is fine ...
    with pytest.raises(ChatFormatError, match="does not end with the EOS"):
        parse_completion("Hello!", require_eos=True)              # ... unless EOS is required
    got = parse_completion("Let me think.\nDone." + TE + "Answer" + E, thinking=True)
    assert got["reasoning_content"] == "Let me think.\nDone." and got["content"] == "Answer"


def test_parse_tool_calls():
    text = ("Checking" + TE + "Looking it up.\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"weather\">\n"
            "<｜DSML｜parameter name=\"city\" string=\"true\">東京 \"central\"</｜DSML｜parameter>\n"
            "<｜DSML｜parameter name=\"opts\" string=\"false\">{\"days\": 3, \"units\": [\"C\"]}</｜DSML｜parameter>\n"
            "</｜DSML｜invoke>\n<｜DSML｜invoke name=\"ping\">\n\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>" + E)
    got = parse_completion(text, thinking=True)
    assert got["reasoning_content"] == "Checking" and got["content"] == "Looking it up."
    weather_args = '{"city": "東京 \\"central\\"", "opts": {"days": 3, "units": ["C"]}}'
    assert got["tool_calls"] == [{"type": "function", "function": {"name": "weather", "arguments": weather_args}},
                                 {"type": "function", "function": {"name": "ping", "arguments": "{}"}}]
    # The round trip through the encoder gives the same block back.
    again = encode_messages([user("q"), {"role": "assistant", **got}], thinking=True)
    assert again == B + U + "q" + A + TS + text


BLOCK = "a\n\n<｜DSML｜tool_calls>\n"
INVOKE_F = '<｜DSML｜invoke name="f">\n'
CLOSE = "</｜DSML｜invoke>\n</｜DSML｜tool_calls>"


def param(name, flag, value):
    return f'<｜DSML｜parameter name="{name}" string="{flag}">{value}</｜DSML｜parameter>\n'


@pytest.mark.parametrize("text,thinking,pattern", [
    ("no end of reasoning" + E, True, "no </think>"),
    ("r\n\n<｜DSML｜tool_calls>\n</｜DSML｜tool_calls>" + TE + "c", True, "no </think>"),
    ("a" + E + "b", False, "unexpected text after EOS"),
    (BLOCK + "</｜DSML｜tool_calls>x", False, "unexpected text after the tool-call block"),
    (BLOCK + INVOKE_F, False, "expected '</｜DSML｜invoke>"),
    (BLOCK + INVOKE_F + "</｜DSML｜invoke>\n", False, "unterminated tool_calls"),
    (BLOCK + "not-an-invoke", False, "expected '<｜DSML｜invoke name=\""),
    (BLOCK + INVOKE_F + param("x", "maybe", "1") + CLOSE, False, 'string="maybe"'),
    (BLOCK + INVOKE_F + param("x", "false", "{bad") + CLOSE, False, "parameter 'x' has string=\"false\""),
    (BLOCK + INVOKE_F + param("x", "true", "1") + param("x", "true", "2") + CLOSE, False, "repeats parameter 'x'"),
    (BLOCK + INVOKE_F + param("x", "true", "1") + "</｜DSML｜invoke>", False, r"expected '</｜DSML｜invoke>\\n'"),
    ("a\n<｜DSML｜tool_calls>\n</｜DSML｜tool_calls>", False, "special token '｜DSML｜' inside the content"),
    ("x" + TE + "y", False, "special token '</think>' inside the content"),
    ("r" + TS + "r" + TE + "c", True, "special token '<think>' inside the reasoning"),
])
def test_parse_rejects_malformed(text, thinking, pattern):
    with pytest.raises(ChatFormatError, match=pattern):
        parse_completion(text, thinking=thinking)


# -- token ids ----------------------------------------------------------------------------------------------------

SPECIALS = [B, E, U, A, TS, TE, "<｜latest_reminder｜>", "｜DSML｜"]


def word_tokenizer(specials):
    words = ["[UNK]", "Be", "brief", ".", "Hi", "there", "!"]
    tok = Tokenizer(models.WordLevel({w: k for k, w in enumerate(specials + words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(specials)     # already in the vocabulary: keeps ids 0..len-1
    return tok


def byte_tokenizer():
    tok = Tokenizer(models.BPE({c: k for k, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)     # ids 256..263
    return tok


def test_token_ids_and_special_token_lookup():
    enc = ChatEncoder(word_tokenizer(SPECIALS))
    # B=0 E=1 U=2 A=3 <think>=4 </think>=5 reminder=6 DSML=7 [UNK]=8 Be=9 brief=10 .=11 Hi=12 there=13 !=14
    assert enc.encode([{"role": "system", "content": "Be brief."}, user("Hi there!")]) \
        == [0, 9, 10, 11, 2, 12, 13, 14, 3, 5]
    assert enc.encode([user("Hi"), {"role": "assistant", "reasoning_content": "Hi", "content": "there"}],
                      thinking=True) == [0, 2, 12, 3, 4, 12, 5, 13, 1]
    assert enc.encode([user("Hi")], thinking=True, add_bos=False) == [2, 12, 3, 4]
    assert (enc.bos_id, enc.eos_id, enc.stop_token_ids) == (0, 1, (1,))
    assert enc.token_ids["<think>"] == 4 and enc.token_ids["｜DSML｜"] == 7


def test_tokenizer_without_the_special_tokens_is_refused():
    with pytest.raises(ChatFormatError, match=r"lacks the DeepSeek-V4 special token\(s\) \['<think>', '</think>'\]"):
        ChatEncoder(word_tokenizer([B, E, U, A]))
    enc = ChatEncoder(word_tokenizer([B, E, U, A, TS, TE]))   # no reminder / DSML tokens: fine until used
    assert enc.encode([user("Hi")]) == [0, 2, 10, 3, 5]
    with pytest.raises(ChatFormatError, match="uses \\['<｜latest_reminder｜>'\\], which this tokenizer lacks"):
        enc.encode([{"role": "latest_reminder", "content": "Hi"}, user("Hi")])


def test_byte_level_round_trip_and_parse_from_ids(tmp_path):
    byte_tokenizer().save(str(tmp_path / "tokenizer.json"))
    enc = ChatEncoder.from_file(tmp_path, revision="preview")       # a directory holding tokenizer.json
    assert enc.revision == "preview" and (enc.bos_id, enc.eos_id) == (256, 257)
    msgs = [{"role": "system", "content": "Sé breve."}, user("¿Clima en 東京?"),
            {"role": "assistant", "reasoning_content": "Call it.", "content": "",
             "tool_calls": [call("c1", "get_weather", '{"city": "東京"}')]},
            {"role": "tool", "tool_call_id": "c1", "content": "25C"}]
    text = encode_messages(msgs, thinking=True, revision="preview", reasoning_effort="max", tools=[WEATHER])
    ids = enc.encode(msgs, thinking=True, reasoning_effort="max", tools=[WEATHER])
    assert enc.decode(ids) == text
    assert ids[0] == 256 and ids[-2:] == [259, 260]                  # BOS ... <｜Assistant｜><think>
    assert ids.count(263) == text.count("｜DSML｜") and all(i < 264 for i in ids)
    answer = "Warm." + TE + "25C in Tokyo." + E
    reply = enc.parse(enc.tokenizer.encode(answer, add_special_tokens=False).ids, thinking=True)
    assert reply == {"role": "assistant", "reasoning_content": "Warm.", "content": "25C in Tokyo.", "tool_calls": []}
    with pytest.raises(FileNotFoundError, match="no tokenizer file"):
        ChatEncoder.from_file(tmp_path / "missing")
