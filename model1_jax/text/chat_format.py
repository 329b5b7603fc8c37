"""The literal strings of the DeepSeek-V4 chat format (special tokens, tools section, effort prefixes).

FORMAT CONSTANTS. Everything in this module is text the model was trained on, so it must match byte for
byte. The format is defined by DeepSeek's `encoding/encoding_dsv4.py` shipped with each checkpoint on the
Hugging Face hub (`deepseek-ai/DeepSeek-V4-Flash`, the preview, and `deepseek-ai/DeepSeek-V4-Flash-0731`);
public copies of that encoder live in sgl-project/sglang
`python/sglang/srt/entrypoints/openai/encoding_dsv4.py` and vllm-project/vllm
`vllm/tokenizers/deepseek_v4_encoding.py`, and the 0731 effort texts are quoted in ggml-org/llama.cpp#26398
and vllm-project/vllm#50580. How the pieces are assembled is described in docs/chat.md.
Nothing here is code logic; `chat.py` and `chat_tools.py` use these strings.
"""

# -- special tokens (`｜` is U+FF5C, `▁` is U+2581) ----------------------------------------------------
BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
LATEST_REMINDER = "<｜latest_reminder｜>"
THINK_START = "<think>"
THINK_END = "</think>"
DSML = "｜DSML｜"          # prefix of every tool-call tag: `<｜DSML｜invoke ...>`

# Task tokens: a user/developer message with `task` ends with one of these instead of the normal
# assistant transition (internal classification tasks of DeepSeek's serving stack).
TASK_TOKENS = {
    "action": "<｜action｜>",
    "query": "<｜query｜>",
    "authority": "<｜authority｜>",
    "domain": "<｜domain｜>",
    "title": "<｜title｜>",
    "read_url": "<｜read_url｜>",
}

# -- tool results and tool calls -------------------------------------------------------------------------
TOOL_RESULT_OPEN = "<tool_result>"
TOOL_RESULT_CLOSE = "</tool_result>"
TOOL_CALLS_OPEN = f"<{DSML}tool_calls>"
TOOL_CALLS_CLOSE = f"</{DSML}tool_calls>"
INVOKE_OPEN = f"<{DSML}invoke"           # followed by ` name="..."`, `>` and a newline
INVOKE_CLOSE = f"</{DSML}invoke>"
PARAM_OPEN = f"<{DSML}parameter"         # followed by ` name="..." string="true|false">`
PARAM_CLOSE = f"</{DSML}parameter>"

# The tools section appended to a system/developer message. `{tool_schemas}` is one JSON object per line
# (the OpenAI `function` objects); every other character is fixed, including the final newline.
TOOLS_SECTION = f"""## Tools

You have access to a set of tools to help answer the user's question. You can invoke tools by writing a \
"<{DSML}tool_calls>" block like the following:

<{DSML}tool_calls>
<{DSML}invoke name="$TOOL_NAME">
<{DSML}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{DSML}parameter>
...
</{DSML}invoke>
<{DSML}invoke name="$TOOL_NAME2">
...
</{DSML}invoke>
</{DSML}tool_calls>

String parameters should be specified as is and set `string="true"`. For all other types (numbers, \
booleans, arrays, objects), pass the value in JSON format and set `string="false"`.

If thinking_mode is enabled (triggered by {THINK_START}), you MUST output your complete reasoning inside \
{THINK_START}...{THINK_END} BEFORE any tool calls or final response.

Otherwise, output directly after {THINK_END} with tool calls or final response.

### Available Tool Schemas

{{tool_schemas}}

You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.
"""

# Appended (after a blank line) to a system/developer message that carries `response_format`.
RESPONSE_FORMAT_SECTION = (
    "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n{schema}"
)

# -- reasoning-effort prefixes (thinking mode only; written once, before the first message) --------------
EFFORT_TEXT_ABSOLUTE_MAXIMUM = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the "
    "root cause, rigorously stress-testing your logic against all potential paths, edge cases, and "
    "adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, "
    "considered alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked."
    "\n\n"
)
EFFORT_TEXT_BEYOND_MAXIMUM = (
    "Reasoning Effort: Beyond maximum \u2014 exhaustive, relentless, and uncompromising.\n"
    "You MUST reason with the utmost depth and rigor, leaving absolutely nothing to chance: exhaustively "
    "decompose the problem into its most fundamental components, trace every causal chain to its root, "
    "and resolve the underlying cause rather than any surface symptom.\n"
    "Do not stop reasoning until you have independently verified the solution from multiple angles and "
    "are certain that no assumption remains unchecked and no error remains undiscovered.\n\n"
)

# Per checkpoint revision: requested effort -> prefix. A value missing from a revision's table is
# rejected. 0731 shifted the tiers down by one: its `high` is the preview's `max`.
EFFORT_PREFIXES = {
    "preview": {None: "", "high": "", "max": EFFORT_TEXT_ABSOLUTE_MAXIMUM},
    "0731": {None: "", "": "", "low": "", "high": EFFORT_TEXT_ABSOLUTE_MAXIMUM,
             "max": EFFORT_TEXT_BEYOND_MAXIMUM},
}
