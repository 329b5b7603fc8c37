"""Tokenizers: UTF-8 bytes (ids 0..255) or a Hugging Face `tokenizer.json` through `tokenizers`.

Both expose `encode(text) -> list[int]`, `decode(ids) -> str`, `vocab_size`, `name` and `save(path)` (a
tokenizer.json), so the data pipeline, generation and the scripts treat them alike.
"""

from __future__ import annotations

import os


def _byte_symbols() -> list[str]:
    """The printable stand-in character of each byte in byte-level BPE vocabularies (GPT-2's table):
    printable Latin-1 bytes stand for themselves, the others map to U+0100 onwards in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, extra = {}, 0
    for b in range(256):
        if b in printable:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255."""

    vocab_size = 256
    name = "bytes"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        """Bytes → text; an incomplete or invalid UTF-8 sequence becomes U+FFFD."""
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def save(self, path: str | os.PathLike) -> None:
        """The same mapping as a `tokenizer.json` (byte-level BPE without merges), so tools that read
        tokenizer.json (scripts/generate.py) encode and decode text exactly as training did."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # noqa: PLC0415 (optional at import)
        tok = Tokenizer(models.BPE(vocab={s: b for b, s in enumerate(_byte_symbols())}, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        tok.save(os.fspath(path))


class HFTokenizer:
    """A `tokenizer.json` through the `tokenizers` library (special tokens in the text are recognised)."""

    def __init__(self, path: str | os.PathLike):
        from tokenizers import Tokenizer
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no tokenizer.json")
        self.tokenizer = Tokenizer.from_file(path)
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        self.name = path

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        """Token ids → text, special tokens kept."""
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, path: str | os.PathLike) -> None:
        self.tokenizer.save(os.fspath(path))


def load_tokenizer(path: str | os.PathLike | None):
    """`HFTokenizer(path)` (a tokenizer.json or a directory holding one), or `ByteTokenizer()` for None."""
    return ByteTokenizer() if path is None else HFTokenizer(path)
