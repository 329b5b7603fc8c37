"""An independent float64 NumPy reference of the DSpark drafter (docs/dspark.md §5–§7).

Written from the published description only, with no code shared with `model1_jax`: it takes the checkpoint's own
tensors (DeepSeek names, HF's [out, in] layout, already dequantized) and the `config.json` dict, and computes
one drafting call the plain way — loops where the description has loops, one array per step:

  main_x  = main_norm(main_proj(main_hidden))                  the captured target rows, once for all stages
  ring_s  = slot p mod W ← rope(kv_norm_s(wkv_s(main_x[p])), p)  every committed position p, in order
  h       = [anchor, NOISE × (G−1)] → embed → copied onto the c streams (positions P .. P+G−1)
  stage s = mHC(attn) → attn_norm → DSpark attention → mHC(ffn) → ffn_norm → MoE   (s = 0, 1, 2, chained on h)
            DSpark attention: every block query sees the same keys, ring[0 : min(W, P)] ++ the G block rows
  x       = hc_head(h) (sigmoid gate), U = head(norm(x))
  Markov  : out[0] = anchor; ℓ_i = U_i + markov_w2 · markov_w1[out[i]]; out[i+1] drawn from softmax(ℓ_i / T)
  conf_i  = proj · [x_i ; markov_w1[out[i]]]

`main_hidden_from_streams` is the capture rule on the target side (mean over the mHC streams of each target
layer's output, concatenated in `dspark_target_layer_ids` order).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

F64 = np.float64


def _get(config: Mapping, key: str, default):
    value = config.get(key)
    return default if value is None else value


def _w(weights: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    if name not in weights:
        raise KeyError(f"dspark_reference: weight {name!r} is missing")
    return np.asarray(weights[name], F64)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    z = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return z / np.sum(z, axis=axis, keepdims=True)


def rms(x: np.ndarray, eps: float, weight: np.ndarray | None = None) -> np.ndarray:
    """RMSNorm over the last axis; unweighted when `weight` is None."""
    y = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return y if weight is None else y * weight


def rope(x: np.ndarray, position: float, rope_dim: int, theta: float, inverse: bool = False) -> np.ndarray:
    """Rotates the trailing `rope_dim` channels of one vector (or of every row of [..., h] at one position) in
    adjacent pairs (2i, 2i+1) by position · theta^(−2i / rope_dim); plain RoPE, no YaRN (the drafter's layers
    are sliding-window layers)."""
    out = np.array(x, F64)
    sign = -1.0 if inverse else 1.0
    base = x.shape[-1] - rope_dim
    for i in range(rope_dim // 2):
        angle = sign * position * theta ** (-2.0 * i / rope_dim)
        a, b = x[..., base + 2 * i], x[..., base + 2 * i + 1]
        out[..., base + 2 * i] = a * np.cos(angle) - b * np.sin(angle)
        out[..., base + 2 * i + 1] = b * np.cos(angle) + a * np.sin(angle)
    return out


# ------------------------------------------------------------------------------------------------------
# Building blocks of one stage (one token row at a time where that is the plainest)


def hyper_pre(x_cd: np.ndarray, fn: np.ndarray, base: np.ndarray, scale: np.ndarray, cfg: Mapping
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One mHC site for one token: streams [c, d] → (block input [d], post [c], comb [c, c])."""
    c = x_cd.shape[0]
    eps, hc_eps = _get(cfg, "rms_norm_eps", 1e-6), _get(cfg, "hc_eps", 1e-6)
    mix = fn @ rms(x_cd.reshape(-1), eps)  # fn [(2+c)·c, c·d], stream-major flattening
    pre = sigmoid(mix[:c] * scale[0] + base[:c]) + hc_eps
    post = 2.0 * sigmoid(mix[c:2 * c] * scale[1] + base[c:2 * c])
    comb = softmax((mix[2 * c:] * scale[2] + base[2 * c:]).reshape(c, c), axis=-1) + hc_eps
    comb = comb / (comb.sum(axis=0, keepdims=True) + hc_eps)  # first pass: over j (the first index)
    for _ in range(_get(cfg, "hc_sinkhorn_iters", 20) - 1):
        comb = comb / (comb.sum(axis=1, keepdims=True) + hc_eps)
        comb = comb / (comb.sum(axis=0, keepdims=True) + hc_eps)
    return pre @ x_cd, post, comb


def hyper_post(y_d: np.ndarray, x_cd: np.ndarray, post: np.ndarray, comb: np.ndarray) -> np.ndarray:
    """New streams X'[k] = post[k]·y + Σ_j comb[j, k]·X[j]."""
    return post[:, None] * y_d[None, :] + comb.T @ x_cd


def hyper_head(x_cd: np.ndarray, fn: np.ndarray, base: np.ndarray, scale: np.ndarray, cfg: Mapping) -> np.ndarray:
    """Final collapse: a sigmoid gate per stream (no Sinkhorn, no post). [c, d] → [d]."""
    eps, hc_eps = _get(cfg, "rms_norm_eps", 1e-6), _get(cfg, "hc_eps", 1e-6)
    pre = sigmoid((fn @ rms(x_cd.reshape(-1), eps)) * scale[0] + base) + hc_eps
    return pre @ x_cd


def swiglu_ffn(x_d: np.ndarray, w1: np.ndarray, w3: np.ndarray, w2: np.ndarray, limit: float) -> np.ndarray:
    gate = np.minimum(w1 @ x_d, limit)
    up = np.clip(w3 @ x_d, -limit, limit)
    return w2 @ (gate * sigmoid(gate) * up)


def moe(x_d: np.ndarray, weights: Mapping, prefix: str, cfg: Mapping) -> np.ndarray:
    """Score-routed MoE (no hash routing in the drafter): top-k of σ + bias, weights σ renormalised × scale."""
    logits = _w(weights, prefix + "ffn.gate.weight") @ x_d
    if _get(cfg, "scoring_func", "sqrtsoftplus") == "sigmoid":
        scores = sigmoid(logits)
    else:
        scores = np.sqrt(np.log1p(np.exp(logits)))
    k = cfg["num_experts_per_tok"]
    chosen = np.argsort(-(scores + _w(weights, prefix + "ffn.gate.bias")), kind="stable")[:k]
    gates = scores[chosen] / (scores[chosen].sum() + 1e-20) * _get(cfg, "routed_scaling_factor", 1.0)
    limit = _get(cfg, "swiglu_limit", 10.0)
    out = np.zeros_like(x_d)
    for g, e in zip(gates, chosen):
        p = f"{prefix}ffn.experts.{e}."
        out += g * swiglu_ffn(x_d, _w(weights, p + "w1.weight"), _w(weights, p + "w3.weight"),
                              _w(weights, p + "w2.weight"), limit)
    p = prefix + "ffn.shared_experts."
    return out + swiglu_ffn(x_d, _w(weights, p + "w1.weight"), _w(weights, p + "w3.weight"),
                            _w(weights, p + "w2.weight"), limit)


def ring_row(main_x_d: np.ndarray, weights: Mapping, prefix: str, position: int, cfg: Mapping) -> np.ndarray:
    """What a stage writes into its ring for one committed position: rope(kv_norm(wkv(main_x)))."""
    kv = rms(_w(weights, prefix + "attn.wkv.weight") @ main_x_d, _get(cfg, "rms_norm_eps", 1e-6),
             _w(weights, prefix + "attn.kv_norm.weight"))
    return rope(kv, position, cfg["qk_rope_head_dim"], _get(cfg, "rope_theta", 10000.0))


def block_attention(x_gd: np.ndarray, ring_wh: np.ndarray, n_ring: int, positions: Sequence[int],
                    weights: Mapping, prefix: str, cfg: Mapping) -> np.ndarray:
    """DSpark attention of the G block rows (already attn_norm'ed) over ring[0:n_ring] ++ the block itself.

    Every query gets the same key set (bidirectional inside the block); one sink logit per head sits in the
    denominator only; the output's rope part is rotated back at the query's position; then the grouped
    low-rank output projection.
    """
    eps, rd, theta = _get(cfg, "rms_norm_eps", 1e-6), cfg["qk_rope_head_dim"], _get(cfg, "rope_theta", 10000.0)
    n, h, g = cfg["num_attention_heads"], cfg["head_dim"], cfg["o_groups"]
    o_rank = cfg["o_lora_rank"]
    wq_a, wq_b = _w(weights, prefix + "attn.wq_a.weight"), _w(weights, prefix + "attn.wq_b.weight")
    q_norm, wkv = _w(weights, prefix + "attn.q_norm.weight"), _w(weights, prefix + "attn.wkv.weight")
    kv_norm, sinks = _w(weights, prefix + "attn.kv_norm.weight"), _w(weights, prefix + "attn.attn_sink")
    wo_a, wo_b = _w(weights, prefix + "attn.wo_a.weight"), _w(weights, prefix + "attn.wo_b.weight")

    block_keys = [rope(rms(wkv @ x, eps, kv_norm), p, rd, theta) for x, p in zip(x_gd, positions)]
    keys = np.concatenate([ring_wh[:n_ring], np.stack(block_keys)])  # index set: ring slots, then the block
    out = []
    for x, p in zip(x_gd, positions):
        q = (wq_b @ rms(wq_a @ x, eps, q_norm)).reshape(n, h)
        q = rope(rms(q, eps), p, rd, theta)  # per-head weightless RMS, then rope at the slot's position
        o = np.zeros((n, h))
        for head in range(n):
            s = keys @ q[head] * h ** -0.5
            top = max(s.max(), sinks[head])
            e = np.exp(s - top)
            o[head] = e @ keys / (e.sum() + np.exp(sinks[head] - top))
        o = rope(o, p, rd, theta, inverse=True)
        heads_per_group = n // g
        z = [wo_a[i * o_rank:(i + 1) * o_rank] @ o[i * heads_per_group:(i + 1) * heads_per_group].reshape(-1)
             for i in range(g)]
        out.append(wo_b @ np.concatenate(z))
    return np.stack(out)


def stage_forward(streams_gcd: np.ndarray, ring_wh: np.ndarray, n_ring: int, positions: Sequence[int],
                  weights: Mapping, stage: int, cfg: Mapping) -> np.ndarray:
    """One DSpark stage on the block's streams [G, c, d]: an ordinary V4 block whose attention is the above."""
    p = f"mtp.{stage}."
    eps = _get(cfg, "rms_norm_eps", 1e-6)
    site = [hyper_pre(x, _w(weights, p + "hc_attn_fn"), _w(weights, p + "hc_attn_base"),
                      _w(weights, p + "hc_attn_scale"), cfg) for x in streams_gcd]
    normed = np.stack([rms(u, eps, _w(weights, p + "attn_norm.weight")) for u, _, _ in site])
    y = block_attention(normed, ring_wh, n_ring, positions, weights, p, cfg)
    streams_gcd = np.stack([hyper_post(y[i], streams_gcd[i], post, comb) for i, (_, post, comb) in enumerate(site)])
    out = []
    for x in streams_gcd:
        v, post, comb = hyper_pre(x, _w(weights, p + "hc_ffn_fn"), _w(weights, p + "hc_ffn_base"),
                                  _w(weights, p + "hc_ffn_scale"), cfg)
        out.append(hyper_post(moe(rms(v, eps, _w(weights, p + "ffn_norm.weight")), weights, p, cfg), x, post, comb))
    return np.stack(out)


# ------------------------------------------------------------------------------------------------------
# The whole drafter


def main_hidden_from_streams(layer_streams: Sequence[np.ndarray]) -> np.ndarray:
    """Target-side capture: each target layer's output streams [b, t, c, d], averaged over c, concatenated in
    `dspark_target_layer_ids` order → [b, t, k·d]."""
    return np.concatenate([np.asarray(s, F64).mean(axis=2) for s in layer_streams], axis=-1)


def num_stages(weights: Mapping) -> int:
    stages = {int(name.split(".")[1]) for name in weights if name.startswith("mtp.")}
    if stages != set(range(len(stages))):
        raise ValueError(f"dspark_reference: stages must be mtp.0 .. mtp.n−1, found {sorted(stages)}")
    return len(stages)


def rings(weights: Mapping, cfg: Mapping, main_hidden_ptk: np.ndarray) -> tuple[list[np.ndarray], int]:
    """The stages' rings after writing committed positions 0 .. P−1 in order (slot p mod W, later positions
    overwrite earlier ones): ([W, h] per stage, n_ring = min(W, P))."""
    eps = _get(cfg, "rms_norm_eps", 1e-6)
    width = cfg["sliding_window"]
    main_x = rms(np.asarray(main_hidden_ptk, F64) @ _w(weights, "mtp.0.main_proj.weight").T, eps,
                 _w(weights, "mtp.0.main_norm.weight"))
    out = []
    for s in range(num_stages(weights)):
        ring = np.zeros((width, cfg["head_dim"]))
        for pos, row in enumerate(main_x):
            ring[pos % width] = ring_row(row, weights, f"mtp.{s}.", pos, cfg)
        out.append(ring)
    return out, min(width, len(main_x))


def draft(weights: Mapping[str, np.ndarray], cfg: Mapping, main_hidden: np.ndarray, anchor: Sequence[int], *,
          temperature: float = 0.0, tokens: np.ndarray | None = None,
          choose: Callable[[int, np.ndarray], int] | None = None) -> dict[str, np.ndarray]:
    """One drafting call for each sequence of a batch.

    weights: DeepSeek names → arrays (dequantized): `embed.weight`, `head.weight` and every `mtp.{s}.*` tensor.
    cfg: the checkpoint's `config.json` dict (dspark_block_size G, dspark_noise_token_id, ...).
    main_hidden: [b, P, k·d], the captured target rows of every committed position 0 .. P−1 (P ≥ 1).
    anchor: [b] the token at position P (sampled by the target, not yet fed to it).
    temperature: 0 → each draft is the argmax of its biased logits; > 0 → drawn from softmax(ℓ/T) by
      `choose(i, probs_v) -> token` (default: inverse-CDF with a fixed NumPy generator).
    tokens: optional [b, G] drafts to use instead of drawing (the distributions are then those a drafter that
      drew exactly these tokens reports: ℓ_i depends on the token drawn before it).

    Returns dict: tokens [b, G+1] (anchor then the G drafts), logits ℓ [b, G, v] (Markov bias included,
    temperature not applied), probs [b, G, v] (softmax(ℓ/T), or one-hot argmax at T = 0), confidence [b, G]
    (logits; sigmoid gives the acceptance estimate), hidden [b, G, d] (hc_head output before the final norm).
    """
    main_hidden = np.asarray(main_hidden, F64)
    b, p_len, _ = main_hidden.shape
    if p_len < 1:
        raise ValueError("dspark_reference.draft: needs at least one committed position (P ≥ 1)")
    g_len, noise = cfg["dspark_block_size"], cfg["dspark_noise_token_id"]
    eps = _get(cfg, "rms_norm_eps", 1e-6)
    c = cfg["hc_mult"]
    embed, head = _w(weights, "embed.weight"), _w(weights, "head.weight")
    last = f"mtp.{num_stages(weights) - 1}."
    w1, w2 = _w(weights, last + "markov_head.markov_w1.weight"), _w(weights, last + "markov_head.markov_w2.weight")
    proj = _w(weights, last + "confidence_head.proj.weight")[0]
    rng = np.random.default_rng(0)
    positions = [p_len + i for i in range(g_len)]

    out = {k: [] for k in ("tokens", "logits", "probs", "confidence", "hidden")}
    for row in range(b):
        ring_list, n_ring = rings(weights, cfg, main_hidden[row])
        ids = [int(anchor[row])] + [noise] * (g_len - 1)
        streams = np.repeat(embed[ids][:, None, :], c, axis=1)  # [G, c, d]
        for s, ring in enumerate(ring_list):
            streams = stage_forward(streams, ring, n_ring, positions, weights, s, cfg)
        x = np.stack([hyper_head(h, _w(weights, last + "hc_head_fn"), _w(weights, last + "hc_head_base"),
                                 _w(weights, last + "hc_head_scale"), cfg) for h in streams])
        base_logits = rms(x, eps, _w(weights, last + "norm.weight")) @ head.T  # U [G, v]
        seq, logits, probs, conf = [int(anchor[row])], [], [], []
        for i in range(g_len):
            e = w1[seq[i]]
            ell = base_logits[i] + w2 @ e
            if temperature == 0:
                pr = np.zeros_like(ell)
                pr[int(np.argmax(ell))] = 1.0
            else:
                pr = softmax(ell / temperature)
            if tokens is not None:
                nxt = int(tokens[row][i])
            elif temperature == 0:
                nxt = int(np.argmax(ell))
            elif choose is not None:
                nxt = int(choose(i, pr))
            else:
                nxt = int(min(np.searchsorted(np.cumsum(pr), rng.random() * pr.sum()), len(pr) - 1))
            seq.append(nxt)
            logits.append(ell)
            probs.append(pr)
            conf.append(proj @ np.concatenate([x[i], e]))
        for key, value in zip(out, (seq, logits, probs, conf, x)):
            out[key].append(np.asarray(value))
    return {k: np.stack(v) for k, v in out.items()}
