"""Data: readers (text, JSONL text and chat), masks, tokenizers, packing, held-out split, resumable order."""

import json

import numpy as np
import pytest

from model1_jax.text import tokenizers
from model1_jax.train import data


def write(path, text):
    path.write_text(text)
    return str(path)


def decode_targets(ids, mask):
    return bytes(np.asarray(ids)[np.asarray(mask)].astype(np.uint8).tolist())


def test_text_and_jsonl_documents(tmp_path):
    txt = write(tmp_path / "a.txt", "plain file")
    jsonl = write(tmp_path / "b.jsonl", json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    docs = list(data.read_documents([txt, jsonl]))
    assert docs == [[("plain file", True)], [("one", True)], [("two", True)]]
    ids, mask = data.tokenize(docs, tokenizers.ByteTokenizer(), eos_id=1)
    assert bytes(ids.astype(np.uint8).tolist()) == b"plain file\x01one\x01two\x01" and mask.all()


def test_chat_targets_are_the_assistant_turns(tmp_path):
    chat = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                         {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye?"},
                         {"role": "assistant", "content": "Bye."}]}
    path = write(tmp_path / "c.jsonl", json.dumps(chat) + "\n")
    ids, mask = data.tokenize(data.read_documents([path]), tokenizers.ByteTokenizer(), eos_id=1)
    text = bytes(ids.astype(np.uint8).tolist()).decode()
    assert text == (f"{data.BOS}Be brief.<｜User｜>Hi?<｜Assistant｜>Hello.{data.EOS_TEXT}"
                    f"<｜User｜>Bye?<｜Assistant｜>Bye.{data.EOS_TEXT}")  # no extra EOS id after the marker
    assert decode_targets(ids, mask).decode() == f"Hello.{data.EOS_TEXT}Bye.{data.EOS_TEXT}"


@pytest.mark.parametrize("line, message", [
    ("{not json", "b.jsonl:2: not valid JSON"),
    ('{"prompt": "x"}', 'expected {"text": str} or {"messages": [...]}'),
    ('{"messages": []}', "non-empty list"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "message 0 must be"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant message"),
])
def test_bad_jsonl_names_file_and_line(tmp_path, line, message):
    path = write(tmp_path / "b.jsonl", json.dumps({"text": "fine"}) + "\n" + line + "\n")
    with pytest.raises(data.DataError, match=message.replace("[", r"\[").replace("]", r"\]").replace("{", r"\{")):
        list(data.read_documents([path]))


def test_missing_file(tmp_path):
    with pytest.raises(data.DataError, match="no such file"):
        list(data.read_documents([tmp_path / "nope.txt"]))


def test_byte_tokenizer_as_tokenizer_json(tmp_path):
    tokenizers.ByteTokenizer().save(tmp_path / "tokenizer.json")
    hf = tokenizers.HFTokenizer(tmp_path / "tokenizer.json")
    text = "déjà vu\n\tdef f(): return '✓'\x00\x7f"
    assert hf.vocab_size == 256 and hf.encode(text) == tokenizers.ByteTokenizer().encode(text)
    assert hf.tokenizer.decode(hf.encode(text)) == text


def test_hf_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {"[UNK]": 0, "<eos>": 1, "hello": 2, "world": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    hf = tokenizers.HFTokenizer(tmp_path)  # a directory holding tokenizer.json
    assert hf.vocab_size == 4 and hf.encode("hello world again") == [2, 3, 0]
    path = write(tmp_path / "t.txt", "hello world " * 8)
    packed = data.build_dataset([path], hf, seq_len=4, eos_id=1, vocab_size=8)
    assert packed.train_ids.shape == (4, 4) and set(packed.train_ids.ravel().tolist()) == {2, 3}  # EOS in the tail
    with pytest.raises(data.DataError, match="has 4 tokens but the model's vocab_size is 3"):
        data.build_dataset([path], hf, seq_len=4, eos_id=1, vocab_size=3)
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        tokenizers.HFTokenizer(tmp_path / "missing")


def test_packing_and_held_out_split():
    ids, mask = np.arange(103, dtype=np.int32), np.ones(103, bool)
    packed = data.pack(ids, mask, seq_len=10, eval_fraction=0.2)
    assert packed.train_ids.shape == (8, 10) and packed.eval_ids.shape == (2, 10)  # the 3-token tail is dropped
    np.testing.assert_array_equal(packed.eval_ids.ravel(), np.arange(80, 100))
    batches = list(data.eval_batches(packed, 3))
    assert [b[0].shape for b in batches] == [(3, 10)]  # padded to a full batch ...
    assert batches[0][1].sum() == 20                  # ... with rows that carry no target


@pytest.mark.parametrize("n, seq_len, frac, message", [
    (0, 8, 0.0, "dataset is empty"),
    (5, 8, 0.0, "fewer than one sequence"),
    (16, 8, 0.9, "too few to hold out"),
    (16, 2, 0.0, "at least 3"),
])
def test_packing_errors(n, seq_len, frac, message):
    with pytest.raises(data.DataError, match=message):
        data.pack(np.zeros(n, np.int32), np.ones(n, bool), seq_len, frac)


def test_fully_masked_data_is_refused():
    with pytest.raises(data.DataError, match="no target token"):
        data.pack(np.zeros(32, np.int32), np.zeros(32, bool), 8)


def test_batches_are_a_pure_function_of_seed_and_step():
    packed = data.pack(np.arange(70, dtype=np.int32), np.ones(70, bool), seq_len=10)  # 7 sequences
    a, b = data.Batches(packed, 2, accum_steps=2, seed=5), data.Batches(packed, 2, accum_steps=2, seed=5)
    rows = [a.rows(i) for i in range(7)]  # 28 sequences: 4 epochs of 7
    np.testing.assert_array_equal(b.rows(5), rows[5])  # any step, any order, any instance
    stream = np.concatenate(rows)
    for epoch in range(4):
        assert sorted(stream[7 * epoch: 7 * epoch + 7]) == list(range(7))  # each epoch sees every sequence once
    assert not np.array_equal(stream[:7], stream[7:14])                 # in a fresh order
    batch = a.batch(3)
    assert batch["ids"].shape == (2, 2, 10)
    np.testing.assert_array_equal(batch["ids"].reshape(4, 10), packed.train_ids[rows[3]])
    assert not np.array_equal(data.Batches(packed, 2, seed=6).rows(0), data.Batches(packed, 2, seed=5).rows(0))


def test_default_corpus_is_the_standard_library():
    files = data.default_corpus(max_bytes=10_000)
    assert files and all(f.endswith(".py") for f in files)


def test_pack_documents_aligns_and_restarts_positions():
    """Documents (and seq_len pieces of longer ones) start at multiples of `align` with position 0; padding
    continues the previous document's positions, holds id 0 and is masked; order is kept."""
    docs = [(np.arange(1, 6, dtype=np.int32), np.ones(5, bool)), (np.arange(10, 13, dtype=np.int32), np.ones(3, bool)),
            (np.arange(20, 38, dtype=np.int32), np.ones(18, bool))]
    packed = data.pack_documents(docs, seq_len=16, align=4)
    ids, mask, pos = packed.train_ids, packed.train_mask, packed.train_positions
    assert ids.shape == (3, 16)
    assert list(ids[0, :12]) == [1, 2, 3, 4, 5, 0, 0, 0, 10, 11, 12, 0]
    assert list(pos[0]) == [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7]  # the tail pads document 2
    assert list(mask[0]) == [True] * 5 + [False] * 3 + [True] * 3 + [False] * 5
    assert list(ids[1]) == list(range(20, 36)) and list(pos[1]) == list(range(16))  # an 18-token document: 16 + 2
    assert list(ids[2, :2]) == [36, 37] and pos[2, 0] == 0 and not mask[2, 2:].any()
    starts = np.nonzero(pos == 0)
    assert (starts[1] % 4 == 0).all()
    with pytest.raises(data.DataError, match="multiple of align"):
        data.pack_documents(docs, seq_len=18, align=4)


def test_batches_carry_positions_with_document_masking():
    docs = [(np.arange(1, 30, dtype=np.int32), np.ones(29, bool))] * 6
    packed = data.pack_documents(docs, seq_len=32, align=8, eval_fraction=0.2)
    batch = data.Batches(packed, batch_size=2).batch(0)
    assert batch["positions"].shape == batch["ids"].shape == (1, 2, 32)
    ids, mask, positions = next(data.eval_batches(packed, 2))
    assert positions.shape == ids.shape
