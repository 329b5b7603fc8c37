"""Random sparse-decode inputs in the style of FlashMLA's test generator (docs/kernels.md §7.2), at CPU sizes.

Caches are built with the oracle's quantizer. Every token that no valid index references (after topk_length
masking) is NaN before quantization, and every byte that belongs to no token is 0xFF, so any read of an
unreferenced byte shows up as NaN in the output.
"""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np

from tests import flashmla_oracle as oracle

INT_MIN, INT_MAX = -(2**31), 2**31 - 1


@dataclasses.dataclass(frozen=True)
class Scope:
    topk: int
    page: int
    s_k: int  # tokens per request


@dataclasses.dataclass(frozen=True)
class Case:
    kv_format: str
    b: int
    s_q: int
    h_q: int
    main: Scope
    extra: Scope | None = None
    topk_length: bool = False
    extra_topk_length: bool = False
    sink: bool = True
    all_invalid: bool = False  # some rows hold one invalid value everywhere
    zero_len: bool = False  # about half the requests have no tokens
    duplicates: bool = False
    seed: int = 0

    def __str__(self):
        x = f"+x{self.extra.topk}/{self.extra.page}" if self.extra else ""
        flags = "".join(c for c, on in [("L", self.topk_length), ("X", self.extra_topk_length), ("S", self.sink),
                                        ("I", self.all_invalid), ("Z", self.zero_len), ("D", self.duplicates)] if on)
        return (f"{self.kv_format}-b{self.b}-t{self.s_q}-h{self.h_q}-k{self.main.topk}/{self.main.page}{x}-{flags}"
                f"-s{self.seed}")


def _scope_inputs(rng, case: Case, scope: Scope, use_length: bool, d_qk: int):
    """Keys bf16 [P, G, d] (unpoisoned), indices [b, s_q, topk], topk_length [b] or None."""
    b, s_q = case.b, case.s_q
    seq_len = np.clip(rng.normal(scope.s_k, scope.s_k / 2, b), s_q, scope.s_k).astype(np.int64)
    if case.zero_len:
        seq_len[rng.random(b) < 0.5] = 0
        seq_len[0] = 0
    blocks_per_req = -(-scope.s_k // scope.page)
    num_blocks = b * blocks_per_req + 1  # one spare block nobody owns
    table = rng.permutation(num_blocks)[: b * blocks_per_req].reshape(b, blocks_per_req)
    capacity = num_blocks * scope.page
    invalid_pool = np.array([-1, INT_MIN, INT_MAX, capacity, capacity + 1, capacity + 12345], np.int64)

    idx = np.empty((b, s_q, scope.topk), np.int64)
    for i in range(b):
        for j in range(s_q):
            n_valid = min(int(seq_len[i]), scope.topk)
            pos = rng.choice(int(seq_len[i]), n_valid, replace=False) if n_valid else np.zeros(0, np.int64)
            row = np.concatenate([table[i, pos // scope.page] * scope.page + pos % scope.page,
                                  rng.choice(invalid_pool, scope.topk - n_valid)])
            if case.duplicates and n_valid >= 2:
                row[1] = row[0]
            idx[i, j] = rng.permutation(row) if rng.random() < 0.5 else row  # tail padding or mixed
    if case.all_invalid:
        for i, j in {(0, s_q - 1), (b - 1, 0)}:
            idx[i, j] = rng.choice(invalid_pool)
    length = rng.integers(0, scope.topk + 1, b).astype(np.int32) if use_length else None
    keys = (rng.standard_normal((num_blocks, scope.page, d_qk)) / 10).clip(-1, 1).astype(oracle.BF16)
    return keys, idx.astype(np.int32), length


def _poison_and_quantize(keys, idx, length, kv_format, page):
    valid = oracle.valid_positions(idx, length, keys.shape[0] * page)
    used = np.zeros(keys.shape[0] * page, bool)
    used[idx[valid]] = True
    keys = keys.reshape(-1, keys.shape[-1]).copy()
    keys[~used] = np.nan
    return oracle.quantize(keys.reshape(-1, page, keys.shape[-1]), kv_format, fill=0xFF)


def make_inputs(case: Case) -> dict:
    """Numpy arguments of `sparse_mla_decode` (keyword names of the public API) plus `softmax_scale`."""
    rng = np.random.default_rng(zlib.crc32(str(case).encode()))
    d_qk = oracle.FACTS[case.kv_format][0]
    q = rng.standard_normal((case.b, case.s_q, case.h_q, d_qk)).clip(-1, 1).astype(oracle.BF16)
    keys, idx, length = _scope_inputs(rng, case, case.main, case.topk_length, d_qk)
    args = dict(q=q, kv_cache=_poison_and_quantize(keys, idx, length, case.kv_format, case.main.page), indices=idx,
                page_size=case.main.page, topk_length=length, softmax_scale=d_qk ** -0.55)
    if case.extra:
        xkeys, xidx, xlength = _scope_inputs(rng, case, case.extra, case.extra_topk_length, d_qk)
        args.update(extra_kv_cache=_poison_and_quantize(xkeys, xidx, xlength, case.kv_format, case.extra.page),
                    extra_indices=xidx, extra_page_size=case.extra.page, extra_topk_length=xlength)
    if case.sink:
        sink = rng.standard_normal(case.h_q).astype(np.float32)
        flip = rng.standard_normal(case.h_q)
        sink[flip > 0.5], sink[flip < -0.5] = np.inf, -np.inf
        sink[:3] = [0.25, np.inf, -np.inf]  # every kind present in every case
        args["attn_sink"] = sink
    return args


def oracle_decode(case: Case, args: dict):
    scopes = [(args["kv_cache"], args["indices"], args["page_size"], args["topk_length"])]
    if case.extra:
        scopes.append((args["extra_kv_cache"], args["extra_indices"], args["extra_page_size"],
                       args["extra_topk_length"]))
    return oracle.sparse_decode(args["q"], scopes, kv_format=case.kv_format, attn_sink=args.get("attn_sink"),
                                softmax_scale=args["softmax_scale"])
