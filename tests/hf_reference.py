"""The oracle: tiny random `transformers.DeepseekV4ForCausalLM` models, saved as HF checkpoints.

HF's own init leaves many parameters at trivial values (mHC base 0 / scale 1, norm weights 1,
sinks 0, position biases 0, tid2eid all zeros) that would hide bugs, so `randomize` gives every
parameter a non-degenerate value before the model is saved and used as the reference.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

S, C, H = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"

BASE = dict(
    vocab_size=128, hidden_size=64, num_attention_heads=4, num_key_value_heads=1, head_dim=32,
    partial_rotary_factor=0.25, q_lora_rank=32, o_groups=2, o_lora_rank=16, index_n_heads=4,
    index_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
    hc_sinkhorn_iters=20, max_position_embeddings=512, routed_scaling_factor=1.5, swiglu_limit=10.0,
    initializer_range=0.02,
)

# Four configurations covering sliding-only / CSA / HCA layers, hash_moe and moe, hc_mult 2 and 4,
# small compress rates (so short sequences cross many windows) and index_topk below the entry count.
CONFIGS = {
    "sliding_hc2": dict(
        num_hidden_layers=2, layer_types=[S, S], mlp_layer_types=["hash_moe", "moe"], hc_mult=2,
        sliding_window=4, index_topk=2, compress_rates={C: 4, H: 8}),
    "csa_hca_hc4": dict(
        num_hidden_layers=4, layer_types=[S, C, H, C], mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe"],
        hc_mult=4, sliding_window=8, index_topk=3, compress_rates={C: 4, H: 8},
        rope_scaling={"type": "yarn", "factor": 16, "original_max_position_embeddings": 32,
                      "beta_fast": 32, "beta_slow": 1}),
    "csa_m2_hc2": dict(
        num_hidden_layers=3, layer_types=[C, C, S], mlp_layer_types=["hash_moe", "moe", "moe"], hc_mult=2,
        sliding_window=6, index_topk=2, compress_rates={C: 2, H: 4}, scoring_func="sigmoid"),
    "hca_m3_hc4": dict(
        num_hidden_layers=3, layer_types=[H, S, H], mlp_layer_types=["moe", "moe", "moe"], hc_mult=4,
        sliding_window=5, index_topk=2, compress_rates={C: 4, H: 3},
        rope_scaling={"type": "yarn", "factor": 8, "original_max_position_embeddings": 16,
                      "beta_fast": 32, "beta_slow": 1}),
}


def hf_config(name: str, **overrides) -> DeepseekV4Config:
    return DeepseekV4Config(**{**BASE, **CONFIGS[name], **overrides})


@torch.no_grad()
def randomize(model: DeepseekV4ForCausalLM, seed: int) -> DeepseekV4ForCausalLM:
    gen = torch.Generator().manual_seed(seed)

    def normal(p, std, mean=0.0):
        p.copy_(mean + std * torch.randn(p.shape, generator=gen))

    for name, p in model.named_parameters():
        if name.endswith(("attn_hc.fn", "ffn_hc.fn", "hc_head.hc_fn")):
            normal(p, 0.05)
        elif name.endswith(("attn_hc.base", "ffn_hc.base", "hc_head.hc_base")):
            normal(p, 0.5)
        elif name.endswith(("attn_hc.scale", "ffn_hc.scale", "hc_head.hc_scale")):
            normal(p, 0.3, mean=1.0)
        elif name.endswith("position_bias"):
            normal(p, 0.5)
        elif name.endswith("sinks"):
            normal(p, 1.0)
        elif p.dim() == 1:  # RMSNorm weights
            normal(p, 0.2, mean=1.0)
        else:  # projections, experts, router, embedding, lm_head: far from uniform routing/attention
            normal(p, 0.2)
    for layer in model.model.layers:
        gate = layer.mlp.gate
        if hasattr(gate, "tid2eid"):
            e, k = model.config.n_routed_experts, model.config.num_experts_per_tok
            rows = [torch.randperm(e, generator=gen)[:k] for _ in range(model.config.vocab_size)]
            gate.tid2eid.copy_(torch.stack(rows))
        else:
            gate.e_score_correction_bias.copy_(0.1 * torch.randn(gate.e_score_correction_bias.shape, generator=gen))
    return model


def make_model(name: str, seed: int = 0, **overrides) -> DeepseekV4ForCausalLM:
    torch.manual_seed(seed)
    model = DeepseekV4ForCausalLM(hf_config(name, **overrides)).eval()
    return randomize(model, seed)


@torch.no_grad()
def logits(model: DeepseekV4ForCausalLM, ids: np.ndarray) -> np.ndarray:
    return model(torch.as_tensor(ids, dtype=torch.long)).logits.float().numpy()


class IndexerScores:
    """Records the indexer scores of every CSA layer during HF forwards or generate() (to detect top-k ties:
    the pick is then arbitrary, and torch and lax break ties differently, docs/model.md §4.6)."""

    def __init__(self, model: DeepseekV4ForCausalLM):
        self.records: list[tuple[int, np.ndarray]] = []
        self.handles = []
        for layer in model.model.layers:
            comp = layer.self_attn.compressor
            if comp is not None and hasattr(comp, "indexer"):
                rate, k = comp.indexer.compress_rate, comp.indexer.index_topk
                self.handles.append(comp.indexer.scorer.register_forward_hook(
                    lambda mod, args, out, rate=rate, k=k: self.records.append((rate, k, out.detach().numpy()))))

    def boundary_ties(self) -> int:
        """Queries whose k-th and (k+1)-th best visible scores are equal (the pick is then arbitrary)."""
        ties = 0
        for rate, k, scores_bts in self.records:
            b, t, s = scores_bts.shape
            for ti in range(t):
                # A forward's query t sees entries w < (t+1)/rate; a one-token forward is either a one-token
                # prompt (no entries) or a cached generation step, which sees every entry.
                n_visible = min((ti + 1) // rate, s) if t > 1 else s
                if n_visible > k:
                    top = -np.sort(-scores_bts[:, ti, :n_visible], axis=-1)
                    ties += int(np.sum(top[:, k - 1] == top[:, k]))
        return ties

    def close(self):
        for h in self.handles:
            h.remove()


def tie_free_ids(model: DeepseekV4ForCausalLM, batch: int, length: int, seed: int, tries: int = 50) -> np.ndarray:
    """Random token ids for which no CSA layer has an exact tie at its top-k boundary (docs/model.md §4.6).

    Ties (common: ReLU makes scores exactly 0) make the selection arbitrary, and torch.topk and
    lax.top_k break them differently; the parity tests avoid them rather than loosen tolerances.
    """
    rng = np.random.default_rng(seed)
    recorder = IndexerScores(model)
    try:
        for _ in range(tries):
            ids = rng.integers(0, model.config.vocab_size, (batch, length))
            recorder.records.clear()
            logits(model, ids)
            if recorder.boundary_ties() == 0:
                return ids
    finally:
        recorder.close()
    raise RuntimeError(f"no tie-free input found in {tries} tries (length {length})")
