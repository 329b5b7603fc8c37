"""`scripts/generate.py --input requests.jsonl --output results.jsonl`: chat, text and id prompts with their own
settings, bad lines reported by number and skipped or refused, results appended as they finish, and a resumed
run — after an interruption or a write cut off mid-line — that skips what is done and ends with every result
exactly once, equal to an uninterrupted run."""

import contextlib
import importlib.util
import io
import json
import pathlib
import sys

import jax.numpy as jnp
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

import model1_jax as m1
from model1_jax.inference import jsonl
from model1_jax.text import ChatEncoder, HFTokenizer
from model1_jax.text.chat_format import ASSISTANT, BOS, DSML, EOS, LATEST_REMINDER, THINK_END, THINK_START, USER
from tests.util import random_model

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Byte-level BPE (ids 0..255) plus DeepSeek-V4's special tokens (256..263): BOS 256, EOS 257.
SPECIALS = [BOS, EOS, USER, ASSISTANT, THINK_START, THINK_END, LATEST_REMINDER, DSML]
CFG = m1.Config.tiny().replace(vocab_size=264, num_hidden_layers=2, layer_types=(m1.CSA, m1.HCA),
                               mlp_layer_types=(m1.HASH_MOE, m1.MOE), num_nextn_predict_layers=0)
ARGS = ["--max-batch", "2", "--max-len", "40", "--chunk", "8", "--cache-dtype", "float32", "--max-new-tokens", "6",
        "--no-progress"]

GOOD = [
    {"id": "chat", "messages": [{"role": "user", "content": "Hi there"}], "max_new_tokens": 5},
    {"id": "think", "messages": [{"role": "user", "content": "Why?"}], "thinking": True, "reasoning_effort": "low"},
    {"id": 7, "prompt": "Once upon a time", "temperature": 0.8, "top_p": 0.9, "seed": 3},
    {"prompt_ids": [5, 6, 7, 8, 9, 10, 11, 12, 13], "max_new_tokens": 9, "stop_token_ids": []},
    {"id": "stop", "prompt": "abc", "stop": ["zz", "\n"], "max_new_tokens": 8},
]
BAD = [
    '{"id": "x", "prompt": "a"',  # not JSON
    '["prompt", "a"]',  # not an object
    '{"prompt": "a", "prompt_ids": [1]}',  # two prompts
    '{"prompt": "a", "colour": "red"}',  # unknown key
    '{"prompt_ids": [1, 264]}',  # outside the vocabulary
    '{"prompt": "a", "max_new_tokens": 0}',
    '{"id": "long", "prompt_ids": [1, 2, 3], "max_new_tokens": 60}',  # never fits max_len 40
    '{"id": "chat", "prompt": "same id as line 1"}',
    '{"prompt": "a", "thinking": true}',  # chat options on a text prompt
    '{"messages": [{"role": "robot", "content": "beep"}]}',  # not the chat format
]


def byte_tokenizer(path):
    tok = Tokenizer(models.BPE({c: k for k, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    tok.save(str(path))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    m1.save(random_model(CFG, seed=4), path / "ckpt")
    byte_tokenizer(path / "ckpt" / "tokenizer.json")
    return path / "ckpt"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("generate_script", ROOT / "scripts" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_lines(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))


def run_script(script, monkeypatch, model_dir, inp, out, *extra) -> int:
    monkeypatch.setattr(sys, "argv", ["generate.py", "--model", str(model_dir), "--input", str(inp), "--output",
                                      str(out), *ARGS, *extra])
    with pytest.raises(SystemExit) as exit_info:
        script.main()
    return exit_info.value.code


def results(path) -> dict:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len({json.dumps(r["id"]) for r in rows}) == len(rows), "an id was written twice"
    return {json.dumps(r["id"]): r for r in rows}


@pytest.fixture(scope="module")
def full_run(script, model_dir, tmp_path_factory):
    """Good and bad lines interleaved, bad ones skipped: the reference results."""
    tmp = tmp_path_factory.mktemp("full")
    lines = [x for pair in zip(GOOD, BAD) for x in pair] + BAD[len(GOOD):]
    write_lines(tmp / "in.jsonl", lines)
    err = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(err):
        code = run_script(script, mp, model_dir, tmp / "in.jsonl", tmp / "out.jsonl")
    return code, err.getvalue(), tmp, results(tmp / "out.jsonl")


def test_skip_reports_every_bad_line(full_run):
    code, err, tmp, got = full_run
    assert code == 0
    bad_lines = [2, 4, 6, 8, 10, 11, 12, 13, 14, 15]
    assert [int(line.split("line ")[1].split(":")[0]) for line in err.splitlines() if "in.jsonl: line" in line] \
        == bad_lines
    assert "id 'long' can never run: prompt (3 tokens) + max_new_tokens (60) = 63 positions" in err
    assert set(got) == {json.dumps(i) for i in ("chat", "think", 7, "line-7", "stop")}
    line_of = {json.dumps(r["id"]): r["line"] for r in got.values()}
    assert line_of == {'"chat"': 1, '"think"': 3, "7": 5, '"line-7"': 7, '"stop"': 9}


def test_results_follow_each_line(full_run, model_dir):
    _, _, _, got = full_run
    enc = ChatEncoder.from_file(model_dir)
    chat = got['"chat"']
    assert chat["prompt_tokens"] == len(enc.encode([{"role": "user", "content": "Hi there"}]))
    assert len(chat["tokens"]) <= 5 and ("message" in chat) != ("parse_error" in chat)
    assert got['"think"']["prompt_tokens"] == len(enc.encode([{"role": "user", "content": "Why?"}], thinking=True,
                                                             reasoning_effort="low"))
    assert len(got["7"]["tokens"]) <= 6 and "message" not in got["7"]  # --max-new-tokens is the default
    ids = got['"line-7"']
    assert len(ids["tokens"]) == 9 and ids["finish_reason"] == "length"  # no stop token at all
    stop = got['"stop"']
    if stop["finish_reason"] == "stop" and isinstance(stop["stop"], str):
        assert stop["stop"] not in stop["text"]
    assert all(r["text"] == HFTokenizer(model_dir).decode(r["tokens"]) for r in got.values()
               if not isinstance(r["stop"], str))


def test_refuse_generates_nothing(script, model_dir, tmp_path, monkeypatch, capfd):
    write_lines(tmp_path / "in.jsonl", GOOD[:2] + BAD[:3])
    code = run_script(script, monkeypatch, model_dir, tmp_path / "in.jsonl", tmp_path / "out.jsonl",
                      "--on-error", "refuse")
    err = capfd.readouterr().err
    assert code == 1 and not (tmp_path / "out.jsonl").exists()
    assert all(f"in.jsonl: line {n}:" in err for n in (3, 4, 5)) and "3 bad line(s)" in err
    assert "not valid JSON" in err and "expected a JSON object" in err and "exactly one of" in err


def test_bad_line_reasons(model_dir, tmp_path):
    write_lines(tmp_path / "in.jsonl", GOOD + BAD)
    tok = HFTokenizer(model_dir)
    entries, bad = jsonl.read_requests(tmp_path / "in.jsonl", CFG.vocab_size, defaults=dict(max_new_tokens=6),
                                       tokenizer=tok, encoder=ChatEncoder(tok.tokenizer))
    reasons = {b.line: b.reason for b in bad}
    n = len(GOOD)
    assert len(entries) == n + 1 and entries[-1].id == "long"  # too long for a scheduler: not the reader's call
    assert "unknown key(s) ['colour']" in reasons[n + 4]
    assert "token ids must be in [0, 264)" in reasons[n + 5]
    assert "max_new_tokens must be a positive integer" in reasons[n + 6]
    assert "id 'chat' repeats line 1" in reasons[n + 8]
    assert "apply to 'messages' only" in reasons[n + 9]
    assert "chat format" in reasons[n + 10] and "robot" in reasons[n + 10]


def test_resume_after_interruption_and_a_cut_line(script, model_dir, full_run, tmp_path, monkeypatch):
    _, _, full_tmp, want = full_run
    inp = full_tmp / "in.jsonl"
    out = tmp_path / "out.jsonl"
    # An interrupted run: stopped (KeyboardInterrupt) after its second result.
    tok = HFTokenizer(model_dir)
    enc = ChatEncoder(tok.tokenizer)
    sched = m1.Scheduler(m1.load(model_dir, dtype=jnp.float32), max_batch=2, max_len=40, chunk=8,
                         cache_dtype="float32", tokenizer=enc)
    entries, _ = jsonl.read_requests(inp, CFG.vocab_size, defaults=dict(max_new_tokens=6), tokenizer=tok,
                                     encoder=enc, seed=0)
    entries, _ = jsonl.admissible(entries, sched)
    written = []

    def interrupt(record):
        written.append(record)
        if len(written) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        jsonl.run(sched, entries, out, encoder=enc, progress=False, on_result=interrupt)
    assert len(results(out)) == 2
    with open(out, "a") as f:  # and a third result cut off mid-write
        f.write(json.dumps(want['"stop"'])[:25])
    assert run_script(script, monkeypatch, model_dir, inp, out) == 0
    assert results(out) == want
