"""DeepSeek-V4 chat format: OpenAI-style messages → prompt text / token ids, and completions → messages.

    from model1_jax.text import ChatEncoder, encode_messages, parse_completion
    text = encode_messages([{"role": "user", "content": "Hi"}], thinking=True, reasoning_effort="high")
    enc = ChatEncoder.from_file("DeepSeek-V4-Flash-0731/tokenizer.json")
    ids = enc.encode(messages, thinking=True)                  # BOS included, add_special_tokens=False
    reply = enc.parse(generated_ids, thinking=True)            # {"role", "reasoning_content", "content", "tool_calls"}

The checkpoints ship no chat template; the format is the one of DeepSeek's own encoder
(`encoding/encoding_dsv4.py` on the hub), re-implemented here from its documented rules (docs/chat.md).
Roles: system, user, developer, latest_reminder, assistant, tool (tool results are folded into user turns).
"""

import dataclasses
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

from model1_jax.text.chat_format import (
    ASSISTANT,
    BOS,
    DSML,
    EFFORT_PREFIXES,
    EOS,
    LATEST_REMINDER,
    RESPONSE_FORMAT_SECTION,
    TASK_TOKENS,
    THINK_END,
    THINK_START,
    TOOL_RESULT_CLOSE,
    TOOL_RESULT_OPEN,
    USER,
)
from model1_jax.text.chat_tools import (
    TOOL_CALLS_START,
    ChatFormatError,
    parse_tool_calls,
    render_tool_calls,
    render_tools_section,
    to_json,
)

ROLES = ("system", "user", "developer", "latest_reminder", "assistant", "tool")
_EXTRA_KEYS = {   # keys a role may carry besides `role` and `content` (anything else is an error)
    "system": {"tools", "response_format", "name"},
    "developer": {"tools", "response_format", "task", "name"},
    "user": {"task", "name", "wo_eos", "mask"},
    "latest_reminder": set(),
    "assistant": {"reasoning_content", "reasoning", "tool_calls", "wo_eos", "name", "mask",
                  "refusal", "annotations", "audio", "function_call"},   # the last four: OpenAI extras, unused
    "tool": {"tool_call_id", "name"},
}


@dataclasses.dataclass
class _Turn:
    """One rendered turn. User turns hold blocks: ("text", str) or ("tool", call_id, str)."""
    role: str
    where: str                      # e.g. "messages[3]", for errors
    msg: Mapping[str, Any]
    blocks: list = dataclasses.field(default_factory=list)
    task: str | None = None
    keep_reasoning: bool = True     # False once drop_thinking strips an earlier assistant's reasoning


# -- validation --------------------------------------------------------------------------------------------

def _mode(thinking: bool | str) -> bool:
    if thinking in (True, False):
        return bool(thinking)
    if thinking in ("thinking", "chat"):
        return thinking == "thinking"
    raise ChatFormatError(f"thinking must be True/False or 'thinking'/'chat', got {thinking!r}")


def effort_prefix(revision: str, reasoning_effort: str | None) -> str:
    """The reasoning-effort text of a checkpoint revision ('preview' or '0731'); bad values raise."""
    if revision not in EFFORT_PREFIXES:
        raise ChatFormatError(f"revision must be one of {list(EFFORT_PREFIXES)}, got {revision!r}")
    table = EFFORT_PREFIXES[revision]
    if not (reasoning_effort is None or isinstance(reasoning_effort, str)) or reasoning_effort not in table:
        allowed = [k for k in table if k]
        raise ChatFormatError(f"reasoning_effort {reasoning_effort!r} is not valid for revision {revision!r}; "
                              f"use None or one of {allowed}")
    return table[reasoning_effort]


def _text(m: Mapping, key: str, where: str, *, optional: bool = False, nonempty: bool = False) -> str | None:
    value = m.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str):
        what = "is missing" if value is None else f"must be a string, got {type(value).__name__}"
        raise ChatFormatError(f"{where} ({m.get('role')}): `{key}` {what}")
    if nonempty and not value:
        raise ChatFormatError(f"{where} ({m.get('role')}): `{key}` must not be empty")
    return value


def _tool_content(m: Mapping, where: str) -> str:
    content = m.get("content")
    if isinstance(content, Sequence) and not isinstance(content, str):
        parts = []
        for k, part in enumerate(content):   # OpenAI content parts: only text can be rendered
            if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ChatFormatError(f"{where} (tool): content[{k}] is not a text part; only text tool results "
                                      f"can be rendered")
            parts.append(part["text"])
        return "\n\n".join(parts)
    return _text(m, "content", where)


def _check(messages: Sequence, name: str, offset_calls: tuple[list, bool]) -> tuple[list, bool]:
    """Validate each message of `messages` (named `name[i]` in errors); returns the tool-call state
    (ids of the last assistant's calls, whether a tool message may come next) for the next list."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise ChatFormatError(f"{name} must be a list of message dicts")
    call_ids, tool_allowed = offset_calls
    for i, m in enumerate(messages):
        where = f"{name}[{i}]"
        role = m.get("role") if isinstance(m, Mapping) else None
        if role not in ROLES:
            raise ChatFormatError(f"{where}: unknown role {role!r} (roles: {', '.join(ROLES)})"
                                  if isinstance(m, Mapping) else f"{where}: must be a dict, got {type(m).__name__}")
        extra = set(m) - {"role", "content"} - _EXTRA_KEYS[role]
        if extra:
            raise ChatFormatError(f"{where} ({role}): unsupported key(s) {sorted(extra)} for this role")
        if m.get("task") is not None and m["task"] not in TASK_TOKENS:
            raise ChatFormatError(f"{where}: task {m['task']!r} is not one of {sorted(TASK_TOKENS)}")
        if role == "system":
            _text(m, "content", where, optional=True)
        elif role == "developer":
            _text(m, "content", where, nonempty=True)
        elif role in ("user", "latest_reminder"):
            _text(m, "content", where)
        elif role == "assistant":
            _text(m, "content", where, optional=True)
            if "reasoning" in m and "reasoning_content" in m and m["reasoning"] != m["reasoning_content"]:
                raise ChatFormatError(f"{where}: `reasoning` and `reasoning_content` disagree; give one")
            _text(m, "reasoning_content" if "reasoning_content" in m else "reasoning", where, optional=True)
            if m.get("function_call") is not None:
                raise ChatFormatError(f"{where}: legacy `function_call` is not supported; use `tool_calls`")
            calls = m.get("tool_calls") or []
            render_tool_calls(calls, where)        # validates the calls' shape
            call_ids = [c.get("id") for c in calls if c.get("id")]
        else:   # tool
            if not tool_allowed:
                raise ChatFormatError(f"{where}: a tool message must follow an assistant message with "
                                      f"tool_calls (or another tool message)")
            _tool_content(m, where)
            if call_ids and m.get("tool_call_id") not in call_ids:
                raise ChatFormatError(f"{where}: tool_call_id {m.get('tool_call_id')!r} is not one of the "
                                      f"preceding assistant's tool call ids {call_ids}")
        tool_allowed = role == "tool" or (role == "assistant" and bool(m.get("tool_calls")))
    return call_ids, tool_allowed


# -- preprocessing: fold tool messages into user turns, order results, drop old reasoning -----------------

def _merge(messages: Sequence[Mapping], name: str) -> list[_Turn]:
    """Tool messages become tool-result blocks of a user turn; consecutive user/tool messages share one
    turn (a user message carrying a `task` closes its turn to further user text)."""
    turns: list[_Turn] = []
    for i, m in enumerate(messages):
        role, where = m["role"], f"{name}[{i}]"
        prev = turns[-1] if turns and turns[-1].role == "user" else None
        if role == "tool":
            block = ("tool", m.get("tool_call_id"), _tool_content(m, where))
            if prev is not None:
                prev.blocks.append(block)
            else:
                turns.append(_Turn("user", where, m, [block]))
        elif role == "user":
            if prev is not None and prev.task is None:
                prev.blocks.append(("text", m["content"]))
            else:
                turns.append(_Turn("user", where, m, [("text", m["content"])], task=m.get("task")))
        else:
            turns.append(_Turn(role, where, m, task=m.get("task")))
    return turns


def _order_tool_results(turns: list[_Turn]) -> None:
    """Within each user turn, put tool results in the order of the preceding assistant's tool calls
    (text blocks keep their places)."""
    order: dict[str, int] = {}
    for t in turns:
        if t.role == "assistant" and t.msg.get("tool_calls"):
            order = {c["id"]: k for k, c in enumerate(t.msg["tool_calls"]) if c.get("id")}
        elif t.role == "user" and order:
            slots = [k for k, b in enumerate(t.blocks) if b[0] == "tool"]
            ranked = sorted((t.blocks[k] for k in slots), key=lambda b: order.get(b[1], 0))
            for k, b in zip(slots, ranked):
                t.blocks[k] = b


def _last_user(turns: list[_Turn]) -> int:
    return max((k for k, t in enumerate(turns) if t.role in ("user", "developer")), default=-1)


def _drop_thinking(turns: list[_Turn]) -> list[_Turn]:
    """Before the last user/developer turn: assistants lose their reasoning, developer turns vanish."""
    last = _last_user(turns)
    out = []
    for k, t in enumerate(turns):
        if k >= last or t.role in ("user", "system", "latest_reminder"):
            out.append(t)
        elif t.role == "assistant":
            out.append(dataclasses.replace(t, keep_reasoning=False))
    return out


# -- rendering ---------------------------------------------------------------------------------------------

def _sections(t: _Turn) -> str:
    out = ""
    if t.msg.get("tools"):
        out += "\n\n" + render_tools_section(t.msg["tools"], t.where)
    if t.msg.get("response_format"):
        out += "\n\n" + RESPONSE_FORMAT_SECTION.format(schema=to_json(t.msg["response_format"], t.where))
    return out


def _render(k: int, turns: list[_Turn], last_user: int, thinking: bool, drop: bool) -> str:
    t = turns[k]
    if t.role == "system":
        text = (t.msg.get("content") or "") + _sections(t)
    elif t.role == "developer":
        text = USER + t.msg["content"] + _sections(t)
    elif t.role == "user":
        text = USER + "\n\n".join(b[1] if b[0] == "text" else TOOL_RESULT_OPEN + b[2] + TOOL_RESULT_CLOSE
                                  for b in t.blocks)
    elif t.role == "latest_reminder":
        text = LATEST_REMINDER + t.msg["content"]
    else:   # assistant
        reasoning = t.msg.get("reasoning_content", t.msg.get("reasoning")) or ""
        after_task = k > 0 and turns[k - 1].task is not None      # a task answer never thinks
        shown = thinking and not after_task and t.keep_reasoning and (not drop or k > last_user)
        text = (reasoning + THINK_END if shown else "") + (t.msg.get("content") or "")
        if t.msg.get("tool_calls"):
            text += render_tool_calls(t.msg["tool_calls"], t.where)
        if not t.msg.get("wo_eos"):
            text += EOS
    # The hand-over to the model: only where the next turn is the assistant's (or the conversation ends).
    if k + 1 < len(turns) and turns[k + 1].role not in ("assistant", "latest_reminder"):
        return text
    think = THINK_START if thinking and (not drop or k >= last_user) else THINK_END
    if t.task is not None and t.task != "action":
        text += TASK_TOKENS[t.task]
    elif t.task == "action":
        text += ASSISTANT + (THINK_START if thinking else THINK_END) + TASK_TOKENS["action"]
    elif t.role in ("user", "developer"):
        text += ASSISTANT + think
    return text


def encode_messages(messages: Sequence[Mapping[str, Any]], *, thinking: bool | str = False,
                    reasoning_effort: str | None = None, revision: str = "0731", tools: Sequence | None = None,
                    drop_thinking: bool = True, add_bos: bool = True,
                    context: Sequence[Mapping[str, Any]] | None = None) -> str:
    """Render OpenAI-style messages as DeepSeek-V4 prompt text (docs/chat.md §3–§6).

    thinking: False/"chat" (the reply starts after `</think>`) or True/"thinking" (after `<think>`).
    reasoning_effort: per `revision` — "preview": None | "high" | "max"; "0731": None | "low" | "high" | "max".
      Only thinking mode writes the effort text (before the first message).
    tools: OpenAI tool list, attached to a leading system/developer message or put in a new system message
      (an empty list adds nothing).
    drop_thinking: in thinking mode, drop reasoning (and developer turns) before the last user turn;
      ignored (False) whenever any message carries tools.
    context: messages already encoded earlier (their text is not repeated; no BOS is written).
    """
    mode, prefix = _mode(thinking), effort_prefix(revision, reasoning_effort)
    context = list(context or [])
    state = _check(context, "context", ([], False))
    _check(messages, "messages", state)
    if not messages:
        raise ChatFormatError("messages is empty")
    ctx_turns, new_turns = _merge(context, "context"), _merge(messages, "messages")
    if tools:
        if context:
            raise ChatFormatError("tools= cannot be combined with context=; put the tools on the context's "
                                  "system message")
        head = new_turns[0]
        if head.role in ("system", "developer"):
            if head.msg.get("tools"):
                raise ChatFormatError("tools given both as an argument and on messages[0]; give them once")
            new_turns[0] = dataclasses.replace(head, msg={**head.msg, "tools": tools})
        else:   # a content-less system message, as vLLM does: the prompt then starts with "\n\n## Tools"
            new_turns.insert(0, _Turn("system", "tools argument", {"role": "system", "tools": tools}))
    turns = ctx_turns + new_turns
    _order_tool_results(turns)
    drop = drop_thinking and not any(t.msg.get("tools") for t in turns)
    if mode and drop:
        turns = _drop_thinking(turns)
    # Context turns that survive the drop are already in the caller's text (DeepSeek's encoder counts the
    # context dropped on its own, which can skip a new message when the context ends with a developer turn).
    n_ctx = sum(t.where.startswith("context") for t in turns)
    text = "" if context else (BOS if add_bos else "") + (prefix if mode else "")
    last_user = _last_user(turns)
    return text + "".join(_render(k, turns, last_user, mode, drop) for k in range(n_ctx, len(turns)))


# -- parsing a completion -------------------------------------------------------------------------------------

_FORBIDDEN = (BOS, EOS, THINK_START, THINK_END, DSML)


def parse_completion(text: str, *, thinking: bool | str = False, require_eos: bool = False) -> dict[str, Any]:
    """Completion text (what the model wrote after the prompt) → an assistant message
    `{"role": "assistant", "reasoning_content": str | None, "content": str, "tool_calls": [OpenAI calls]}`.

    Thinking mode requires the reasoning to end with `</think>`. The content runs to EOS or to the DSML
    block; after the block only EOS may follow. A missing final EOS is accepted unless `require_eos`
    (serving loops usually strip the stop token). Stray special tokens raise ChatFormatError.
    """
    if not isinstance(text, str):
        raise ChatFormatError(f"completion must be a string, got {type(text).__name__}")
    pos, reasoning = 0, None
    if _mode(thinking):
        end, block = text.find(THINK_END), text.find(TOOL_CALLS_START)
        if end < 0 or 0 <= block < end:
            raise ChatFormatError(f"thinking-mode completion has no {THINK_END} closing the reasoning")
        reasoning, pos = text[:end], end + len(THINK_END)
    eos, block = text.find(EOS, pos), text.find(TOOL_CALLS_START, pos)
    calls: list[dict] = []
    has_block = block >= 0 and (eos < 0 or block < eos)
    if has_block:
        content = text[pos:block]
        calls, pos = parse_tool_calls(text, block)
        rest = text[pos:]
    else:
        content = text[pos:] if eos < 0 else text[pos:eos]
        rest = "" if eos < 0 else text[eos:]
    if rest not in ("", EOS):
        where = "the tool-call block" if has_block else "EOS"
        raise ChatFormatError(f"unexpected text after {where}: {rest[:40]!r}")
    if require_eos and rest != EOS:
        raise ChatFormatError("completion does not end with the EOS token")
    for name, part in (("reasoning", reasoning or ""), ("content", content)):
        for tok in _FORBIDDEN:
            if tok in part:
                raise ChatFormatError(f"special token {tok!r} inside the {name} at character {part.find(tok)}")
    return {"role": "assistant", "reasoning_content": reasoning, "content": content, "tool_calls": calls}


# -- token ids ------------------------------------------------------------------------------------------------

class ChatEncoder:
    """The chat format over a `tokenizers.Tokenizer` (the checkpoint's `tokenizer.json`).

    The special tokens are looked up among the tokenizer's added tokens (a tokenizer without BOS, EOS,
    the role markers or the think tags is refused, naming what is missing). `stop_token_ids` is what
    ends an assistant turn (EOS).
    """

    REQUIRED = (BOS, EOS, USER, ASSISTANT, THINK_START, THINK_END)
    OPTIONAL = (LATEST_REMINDER, DSML, *TASK_TOKENS.values())   # checked when a prompt uses them

    def __init__(self, tokenizer: Any, *, revision: str = "0731"):
        effort_prefix(revision, None)   # validates the revision
        self.tokenizer, self.revision = tokenizer, revision
        added = {t.content: i for i, t in tokenizer.get_added_tokens_decoder().items()}
        missing = [t for t in self.REQUIRED if t not in added]
        if missing:
            raise ChatFormatError(f"tokenizer lacks the DeepSeek-V4 special token(s) {missing}; "
                                  f"is this a DeepSeek-V4 tokenizer.json?")
        self.token_ids = {t: added[t] for t in (*self.REQUIRED, *self.OPTIONAL) if t in added}
        self.bos_id, self.eos_id = self.token_ids[BOS], self.token_ids[EOS]
        self.stop_token_ids = (self.eos_id,)

    @classmethod
    def from_file(cls, path: Any, *, revision: str = "0731") -> "ChatEncoder":
        """`path`: a `tokenizer.json` or the checkpoint directory holding one."""
        from tokenizers import Tokenizer

        path = pathlib.Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer file at {file}")
        return cls(Tokenizer.from_file(str(file)), revision=revision)

    def render(self, messages: Sequence[Mapping[str, Any]], **options: Any) -> str:
        """`encode_messages` with this encoder's revision (same keyword options)."""
        return encode_messages(messages, revision=options.pop("revision", self.revision), **options)

    def encode(self, messages: Sequence[Mapping[str, Any]], **options: Any) -> list[int]:
        """Messages → token ids. The text already holds BOS, so the tokenizer adds nothing."""
        text = self.render(messages, **options)
        missing = [t for t in self.OPTIONAL if t not in self.token_ids and t in text]
        if missing:   # would otherwise be split into ordinary pieces the model never saw as markers
            raise ChatFormatError(f"the prompt uses {missing}, which this tokenizer lacks as added tokens")
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        """Token ids → text with special tokens kept (what `parse_completion` expects)."""
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def parse(self, ids: Sequence[int], *, thinking: bool | str = False, require_eos: bool = False) -> dict:
        """Generated token ids (after the prompt) → assistant message (see `parse_completion`)."""
        return parse_completion(self.decode(ids), thinking=thinking, require_eos=require_eos)
