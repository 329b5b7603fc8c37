"""Fine-tuning data: documents → token ids with a target mask → packed fixed-length sequences → batches.

Sources (`read_documents`):
  text files (any extension but .jsonl): each file is one document;
  .jsonl: one document per line, `{"text": str}` or `{"messages": [{"role": ..., "content": ...}, ...]}`.
Chat documents are rendered with DeepSeek's chat markers (`render_chat`); only assistant turns (and
the end-of-sentence marker closing them) are training targets, system and user text is context.

Tokens come from a Hugging Face `tokenizer.json` through `tokenizers`, or are the UTF-8 bytes of the
text (ids 0..255) when no tokenizer is given. Every document ends with the model's EOS id. By default
documents are concatenated and cut into sequences of `seq_len` tokens (the incomplete tail is dropped).
With document masking (`pack_documents`, `build_dataset(align=...)`) each document (or `seq_len` piece
of a longer one) instead starts at a multiple of `align` — the model's largest compression rate — with
positions restarting at 0, so attention, compressed entries and indexer picks stay inside it
(docs/training.md §6); the gaps are masked padding. Either way the last `eval_fraction` of the sequences
is held out.

Order: epoch e visits the training sequences in a permutation seeded by (seed, e), and batch i is a
pure function of (seed, i). The data position of a run is therefore just the number of batches
taken, and a resumed run sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import sysconfig
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from model1_jax.common import positive_int

Segment = tuple[str, bool]      # (text, is it a training target)
Document = list[Segment]

# DeepSeek's chat markers (tokenizer special tokens of the released models).
BOS, EOS_TEXT = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
ROLE_PREFIX = {"system": "", "user": "<｜User｜>", "assistant": "<｜Assistant｜>"}


class DataError(ValueError):
    """Unusable training data (the message names the file and line)."""


# -- reading ------------------------------------------------------------------------------------------

def render_chat(messages: Sequence[dict], where: str = "messages") -> Document:
    """`[{"role", "content"}]` → segments: system/user text and role markers are context; assistant
    content and the end-of-sentence marker after it are targets."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise DataError(f"{where}: `messages` must be a non-empty list")
    doc: Document = [(BOS, False)]
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLE_PREFIX or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: message {i} must be {{'role': one of {sorted(ROLE_PREFIX)}, "
                            f"'content': str}}, got {str(m)[:80]!r}")
        role, content = m["role"], m["content"]
        if role == "assistant":
            doc += [(ROLE_PREFIX[role], False), (content, True), (EOS_TEXT, True)]
        else:
            doc.append((ROLE_PREFIX[role] + content, False))
    if not any(target for _, target in doc):
        raise DataError(f"{where}: no assistant message, so nothing to train on")
    return doc


def _jsonl_documents(path: str) -> Iterator[Document]:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg})") from None
            if isinstance(record, dict) and isinstance(record.get("text"), str):
                yield [(record["text"], True)]
            elif isinstance(record, dict) and "messages" in record:
                yield render_chat(record["messages"], where)
            else:
                raise DataError(f"{where}: expected {{\"text\": str}} or {{\"messages\": [...]}}, "
                                f"got {line.strip()[:80]!r}")


def read_documents(paths: Iterable[str | os.PathLike]) -> Iterator[Document]:
    """Documents of every file, in the order given."""
    for path in map(os.fspath, paths):
        if not os.path.isfile(path):
            raise DataError(f"{path}: no such file")
        if path.endswith(".jsonl"):
            yield from _jsonl_documents(path)
        else:
            with open(path, encoding="utf-8", errors="replace") as f:
                yield [(f.read(), True)]


def default_corpus(max_bytes: int = 8_000_000) -> list[str]:
    """The Python standard library's own top-level source files (present on any machine), sorted."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for path in sorted(root.glob("*.py")):
        if total >= max_bytes:
            break
        files.append(str(path))
        total += path.stat().st_size
    if not files:
        raise DataError(f"no Python source files under {root}")
    return files


# -- tokenizing ---------------------------------------------------------------------------------------

def tokenize_documents(documents: Iterable[Document], tokenizer, eos_id: int | None
                       ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Token ids (int32) and target mask (bool) of each document, closed by `eos_id`."""
    for doc in documents:
        ids: list[int] = []
        mask: list[bool] = []
        for text, target in doc:
            toks = tokenizer.encode(text)
            ids += toks
            mask += [target] * len(toks)
        if eos_id is not None and doc[-1][0] != EOS_TEXT:  # chat turns already end with the EOS marker
            ids.append(eos_id)
            mask.append(doc[-1][1])
        yield np.asarray(ids, np.int32), np.asarray(mask, bool)


def tokenize(documents: Iterable[Document], tokenizer, eos_id: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated token ids (int32) and target mask (bool) of all documents, each closed by `eos_id`."""
    parts = list(tokenize_documents(documents, tokenizer, eos_id))
    if not parts:
        return np.zeros(0, np.int32), np.zeros(0, bool)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


# -- packing and batching -----------------------------------------------------------------------------

@dataclasses.dataclass
class PackedData:
    """Fixed-length training and held-out sequences with their target masks."""

    train_ids: np.ndarray    # int32 [n_train, seq_len]
    train_mask: np.ndarray   # bool  [n_train, seq_len]
    eval_ids: np.ndarray
    eval_mask: np.ndarray
    train_positions: np.ndarray | None = None  # int32 [n_train, seq_len] with document masking, else None
    eval_positions: np.ndarray | None = None

    @property
    def seq_len(self) -> int:
        return self.train_ids.shape[1]

    def fingerprint(self) -> str:
        """Identifies the training sequences (a resumed run must see the same data)."""
        h = hashlib.sha256(self.train_ids.tobytes())
        h.update(self.train_mask.tobytes())
        if self.train_positions is not None:
            h.update(self.train_positions.tobytes())
        return h.hexdigest()[:16]


def pack(ids: np.ndarray, mask: np.ndarray, seq_len: int, eval_fraction: float = 0.0) -> PackedData:
    """Cuts the token stream into sequences of `seq_len` and holds out the last `eval_fraction` of them."""
    if seq_len < 3:
        raise DataError(f"seq_len must be at least 3 (next-token and MTP targets), got {seq_len}")
    if not 0 <= eval_fraction < 1:
        raise DataError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    if ids.size == 0:
        raise DataError("the dataset is empty (no tokens)")
    n = ids.size // seq_len
    if n == 0:
        raise DataError(f"the dataset has {ids.size} tokens, fewer than one sequence of seq_len={seq_len}")
    ids, mask = ids[: n * seq_len].reshape(n, seq_len), mask[: n * seq_len].reshape(n, seq_len)
    n_eval = max(1, round(n * eval_fraction)) if eval_fraction else 0  # a held-out set is never empty
    if n - n_eval < 1:
        raise DataError(f"the dataset has {n} sequences of {seq_len} tokens: too few to hold out "
                        f"{eval_fraction:.0%} and still train")
    if not mask[: n - n_eval].any():
        raise DataError("the training sequences contain no target token (all masked)")
    return PackedData(ids[: n - n_eval], mask[: n - n_eval], ids[n - n_eval:], mask[n - n_eval:])


def pack_documents(documents: Iterable[tuple[np.ndarray, np.ndarray]], seq_len: int, align: int,
                   eval_fraction: float = 0.0, pad_id: int = 0) -> PackedData:
    """Packs (ids, mask) documents into rows of `seq_len` with document masking: each document, or each
    `seq_len` piece of a longer one, starts at a multiple of `align` with positions 0, 1, …; the tokens that
    pad it to the next multiple (or the row's end) continue its positions, hold `pad_id` and are masked.
    Documents keep their order; a piece that does not fit the current row starts the next."""
    if seq_len < 3:
        raise DataError(f"seq_len must be at least 3 (next-token and MTP targets), got {seq_len}")
    if align < 1 or seq_len % align:
        raise DataError(f"seq_len={seq_len} must be a multiple of align={align} (the largest compression rate)")
    if not 0 <= eval_fraction < 1:
        raise DataError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    def empty_row():
        return np.full(seq_len, pad_id, np.int32), np.zeros(seq_len, bool), np.zeros(seq_len, np.int32)

    ids_row, mask_row, pos_row = empty_row()
    used = 0
    for doc_ids, doc_mask in documents:
        for start in range(0, len(doc_ids), seq_len):
            piece, piece_mask = doc_ids[start:start + seq_len], doc_mask[start:start + seq_len]
            span = min(-(-len(piece) // align) * align, seq_len)
            if used + span > seq_len:
                pos_row[used:] = pos_row[used - 1] + 1 + np.arange(seq_len - used)  # the tail pads the last document
                rows.append((ids_row, mask_row, pos_row))
                (ids_row, mask_row, pos_row), used = empty_row(), 0
            ids_row[used:used + len(piece)], mask_row[used:used + len(piece)] = piece, piece_mask
            pos_row[used:used + span] = np.arange(span)
            used += span
    if used:
        pos_row[used:] = pos_row[used - 1] + 1 + np.arange(seq_len - used)  # the tail pads the last document
        rows.append((ids_row, mask_row, pos_row))
    if not rows:
        raise DataError("the dataset is empty (no tokens)")
    ids, mask, positions = (np.stack(x) for x in zip(*rows))
    n = len(rows)
    n_eval = max(1, round(n * eval_fraction)) if eval_fraction else 0
    if n - n_eval < 1:
        raise DataError(f"the dataset packs into {n} sequences of {seq_len} tokens: too few to hold out "
                        f"{eval_fraction:.0%} and still train")
    if not mask[: n - n_eval].any():
        raise DataError("the training sequences contain no target token (all masked)")
    k = n - n_eval
    return PackedData(ids[:k], mask[:k], ids[k:], mask[k:], positions[:k], positions[k:])


def build_dataset(paths: Iterable[str | os.PathLike], tokenizer, *, seq_len: int, eos_id: int | None,
                  vocab_size: int, eval_fraction: float = 0.0, align: int | None = None) -> PackedData:
    """Reads, tokenizes and packs (with document masking when `align` is given); token ids must fit the
    model's vocabulary."""
    if tokenizer.vocab_size > vocab_size:
        raise DataError(f"tokenizer {tokenizer.name} has {tokenizer.vocab_size} tokens but the model's "
                        f"vocab_size is {vocab_size}")
    if align is not None:
        return pack_documents(tokenize_documents(read_documents(paths), tokenizer, eos_id), seq_len, align,
                              eval_fraction)
    ids, mask = tokenize(read_documents(paths), tokenizer, eos_id)
    return pack(ids, mask, seq_len, eval_fraction)


class Batches:
    """Deterministic, resumable training batches: `batch(i)` is ids/mask of shape [accum, batch, seq_len]."""

    def __init__(self, data: PackedData, batch_size: int, accum_steps: int = 1, seed: int = 0):
        positive_int(batch_size, "Batches: batch_size")
        positive_int(accum_steps, "Batches: accum_steps")
        self.data, self.batch_size, self.accum_steps, self.seed = data, batch_size, accum_steps, seed
        self._perm: tuple[int, np.ndarray] | None = None  # (epoch, permutation) last used

    @property
    def sequences_per_batch(self) -> int:
        return self.batch_size * self.accum_steps

    def rows(self, i: int) -> np.ndarray:
        """Indices of the training sequences in batch i (epochs wrap in a fresh permutation)."""
        n = self.data.train_ids.shape[0]
        stream = np.arange(i * self.sequences_per_batch, (i + 1) * self.sequences_per_batch)
        rows = np.empty_like(stream)
        for epoch in np.unique(stream // n).tolist():
            if self._perm is None or self._perm[0] != epoch:
                self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(n))
            sel = stream // n == epoch
            rows[sel] = self._perm[1][stream[sel] % n]
        return rows

    def batch(self, i: int) -> dict[str, np.ndarray]:
        """ids / mask (and positions, with document masking) of batch i: [accum, batch, seq_len] each."""
        rows = self.rows(i)
        shape = (self.accum_steps, self.batch_size, self.data.seq_len)
        out = {"ids": self.data.train_ids[rows].reshape(shape), "mask": self.data.train_mask[rows].reshape(shape)}
        if self.data.train_positions is not None:
            out["positions"] = self.data.train_positions[rows].reshape(shape)
        return out


def eval_batches(data: PackedData, batch_size: int, max_batches: int | None = None) -> Iterator[tuple]:
    """Held-out sequences in fixed-size batches (the last one padded with fully masked rows): (ids, mask), or
    (ids, mask, positions) with document masking."""
    n = data.eval_ids.shape[0]
    if max_batches is not None:
        n = min(n, max_batches * batch_size)
    for start in range(0, n, batch_size):
        ids, mask = data.eval_ids[start:start + batch_size], data.eval_mask[start:start + batch_size]
        positions = None if data.eval_positions is None else data.eval_positions[start:start + batch_size]
        pad = batch_size - ids.shape[0]
        if pad:
            ids = np.concatenate([ids, np.repeat(ids[:1], pad, axis=0)])
            mask = np.concatenate([mask, np.zeros((pad, mask.shape[1]), bool)])
            positions = None if positions is None else np.concatenate([positions, np.repeat(positions[:1], pad, 0)])
        yield (ids, mask) if positions is None else (ids, mask, positions)
