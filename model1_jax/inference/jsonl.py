"""Batch generation from a JSONL file of requests into a JSONL file of results (docs/serving.md §5).

One request per line, a JSON object with exactly one of
  "messages": [...]   chat messages, encoded with the DeepSeek-V4 chat format (`text.ChatEncoder`; options
                      "thinking", "reasoning_effort", "tools"); the completion is parsed back into "message";
  "prompt": "text"    tokenized with no special tokens added (write BOS into the text if the model needs it);
  "prompt_ids": [...] token ids;
and optionally "id" (any JSON value, unique in the file; default "line-N"), "max_new_tokens", "temperature",
"top_k", "top_p", "seed", "stop" (a string or a list of strings), "stop_token_ids". Other keys are errors.

Each result is appended as one line as soon as its request finishes (`{"id", "line", "prompt_tokens",
"tokens", "text", "finish_reason", "stop"}`, plus "message" or "parse_error" for chat requests), flushed, so an
interrupted run keeps everything it finished. Resuming skips every id already in the output file; a last line
cut off mid-write is removed first. Bad lines are reported with their line numbers: the caller skips them or
refuses the whole file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import zlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from tqdm.auto import tqdm

from model1_jax.inference.requests import Completion, Request
from model1_jax.inference.scheduler import Scheduler
from model1_jax.text.chat_tools import ChatFormatError

SETTINGS = ("max_new_tokens", "temperature", "top_k", "top_p", "seed")
KEYS = {"id", "messages", "prompt", "prompt_ids", "stop", "stop_token_ids", "thinking", "reasoning_effort", "tools",
        *SETTINGS}
CHAT_KEYS = ("thinking", "reasoning_effort", "tools")


@dataclasses.dataclass(frozen=True)
class Entry:
    line: int  # 1-based line number in the input file
    id: Any
    request: Request
    thinking: bool | None = None  # chat requests: the mode the completion is parsed in; None: not chat


@dataclasses.dataclass(frozen=True)
class BadLine:
    line: int
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


def id_key(value: Any) -> str:
    """Ids compare by their JSON text, so 7 and "7" are different ids."""
    return json.dumps(value, sort_keys=True)


def _entry(n: int, raw: str, vocab_size: int, defaults: Mapping[str, Any], tokenizer, encoder, seed: int) -> Entry:
    try:
        obj = json.loads(raw.strip())
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - KEYS)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown}; allowed: {sorted(KEYS)}")
    given = [k for k in ("messages", "prompt", "prompt_ids") if k in obj]
    if len(given) != 1:
        raise ValueError(f"needs exactly one of 'messages', 'prompt', 'prompt_ids', got {given or 'none'}")
    if given != ["messages"] and any(k in obj for k in CHAT_KEYS):
        raise ValueError(f"{[k for k in CHAT_KEYS if k in obj]} apply to 'messages' only")
    thinking = None
    if given == ["messages"]:
        if encoder is None:
            raise ValueError("'messages' needs a DeepSeek-V4 tokenizer.json (a ChatEncoder)")
        thinking = obj.get("thinking", False)
        if not isinstance(thinking, bool):
            raise ValueError(f"'thinking' must be true or false, got {thinking!r}")
        try:
            ids = encoder.encode(obj["messages"], thinking=thinking, reasoning_effort=obj.get("reasoning_effort"),
                                 tools=obj.get("tools"))
        except ChatFormatError as e:
            raise ValueError(f"chat format: {e}") from None
        stop_tokens = encoder.stop_token_ids
    elif given == ["prompt"]:
        if not isinstance(obj["prompt"], str):
            raise ValueError(f"'prompt' must be a string (token ids go in 'prompt_ids'), got {obj['prompt']!r:.60}")
        if tokenizer is None:
            raise ValueError("'prompt' text needs a tokenizer (tokenizer.json); give token ids as 'prompt_ids'")
        ids = tokenizer.encode(obj["prompt"])
        stop_tokens = None
    else:
        ids, stop_tokens = obj["prompt_ids"], None
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise ValueError("'prompt_ids' must be a list of integers")
    settings = {**defaults, **{k: obj[k] for k in SETTINGS if k in obj}}
    stop_tokens = obj.get("stop_token_ids", stop_tokens)
    if stop_tokens is not None and not isinstance(stop_tokens, list | tuple):
        raise ValueError(f"'stop_token_ids' must be a list of ids, got {stop_tokens!r}")
    ident = obj.get("id", f"line-{n}")
    if "seed" not in settings:  # a stream of its own, the same in a resumed run (unlike the submission index)
        settings["seed"] = zlib.crc32(f"{seed}:{id_key(ident)}".encode())
    if "max_new_tokens" not in settings:
        raise ValueError("'max_new_tokens' is required (no default was given)")
    request = Request.make(ids, settings.pop("max_new_tokens"), vocab_size=vocab_size, what=f"id {ident!r}", id=ident,
                           stop_tokens=stop_tokens, stop_strings=obj.get("stop", ()), **settings)
    return Entry(n, ident, request, thinking)


def read_requests(path: str | os.PathLike, vocab_size: int, *, defaults: Mapping[str, Any] | None = None,
                  tokenizer=None, encoder=None, seed: int = 0) -> tuple[list[Entry], list[BadLine]]:
    """Every line of a requests file as an `Entry` (its ids and settings checked), or as a `BadLine` naming the
    problem. Blank lines are skipped. `defaults` fill settings a line does not give (`max_new_tokens` is required
    one way or the other); `tokenizer` encodes "prompt" text and `encoder` (a `ChatEncoder`) "messages". A line
    without "seed" samples from a stream derived from `seed` and its id, so a resumed run repeats it."""
    entries, bad, seen = [], [], {}
    with open(path, encoding="utf-8") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                entry = _entry(n, raw, vocab_size, defaults or {}, tokenizer, encoder, seed)
            except ValueError as e:
                bad.append(BadLine(n, str(e)))
                continue
            except TypeError as e:  # a value of a type nothing above expected (e.g. inside "messages")
                bad.append(BadLine(n, f"a value of the wrong type: {e}"))
                continue
            key = id_key(entry.id)
            if key in seen:
                bad.append(BadLine(n, f"id {entry.id!r} repeats line {seen[key]}"))
                continue
            seen[key] = n
            entries.append(entry)
    return entries, bad


def admissible(entries: Iterable[Entry], scheduler: Scheduler) -> tuple[list[Entry], list[BadLine]]:
    """Splits entries into those the scheduler can run and `BadLine`s for those it never can (too long for its
    max_len or its pools, stop strings without a tokenizer)."""
    ok, bad = [], []
    for e in entries:
        try:
            scheduler.check(e.request, what=f"id {e.id!r}")
            ok.append(e)
        except ValueError as err:
            bad.append(BadLine(e.line, str(err)))
    return ok, bad


def finished_ids(path: str | os.PathLike) -> set[str]:
    """`id_key`s of the results already in an output file (none if it does not exist). A last line without its
    newline — a write cut off by an interruption — is removed from the file; any other unreadable line is an
    error (the file is not ours to rewrite)."""
    if not os.path.exists(path):
        return set()
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            f.truncate(cut)
            data = data[:cut]
    done = set()
    for n, raw in enumerate(data.decode("utf-8").splitlines(), 1):
        if not raw.strip():
            continue
        try:
            done.add(id_key(json.loads(raw)["id"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{path}: line {n} is not a result line; refusing to append to it") from None
    return done


def result_record(entry: Entry, done: Completion, encoder=None) -> dict[str, Any]:
    record = dict(id=entry.id, line=entry.line, prompt_tokens=done.prompt_tokens, tokens=done.tokens, text=done.text,
                  finish_reason=done.finish_reason, stop=done.stop)
    if entry.thinking is not None:
        try:
            record["message"] = encoder.parse(done.tokens, thinking=entry.thinking)
        except ChatFormatError as e:  # what the model wrote does not follow the format
            record["parse_error"] = str(e)
    return record


def run(scheduler: Scheduler, entries: Iterable[Entry], output: str | os.PathLike, *, encoder=None,
        progress: bool = True, on_result: Callable[[dict], None] | None = None) -> dict[str, float]:
    """Runs the entries through the scheduler, appending each result to `output` as it finishes (one line,
    flushed). Returns a summary: requests, generated tokens, seconds, tokens/s."""
    entries = list(entries)
    by_index = {scheduler.submit(e.request): e for e in entries}
    bar = tqdm(total=len(entries), unit="req", disable=not progress, desc="generate")
    t0, tokens = time.perf_counter(), scheduler.stats.generated_tokens
    with open(output, "a", encoding="utf-8") as out:
        while scheduler.waiting or scheduler.running:
            for done in scheduler.step():
                record = result_record(by_index[done.index], done, encoder)
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                out.flush()
                if on_result is not None:
                    on_result(record)
                bar.update(1)
            elapsed = time.perf_counter() - t0
            use = scheduler.pool_use()
            bar.set_postfix_str(f"{(scheduler.stats.generated_tokens - tokens) / max(elapsed, 1e-9):,.1f} tok/s, pool "
                                + " ".join(f"m{r}:{u / n:.0%}" for r, (u, n) in use.items())
                                + f", waiting {scheduler.waiting}", refresh=False)
    bar.close()
    seconds = time.perf_counter() - t0
    generated = scheduler.stats.generated_tokens - tokens
    return dict(requests=len(entries), generated_tokens=generated, seconds=seconds,
                tokens_per_s=generated / max(seconds, 1e-9))
