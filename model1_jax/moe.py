"""Mixture of experts (spec §4.8): every layer is MoE — k routed experts of e plus one shared expert.

Router scores σ = sqrt(softplus(x · W)) (or sigmoid). `moe` layers select the top-k of
σ + e_score_correction_bias (the bias steers selection only); `hash_moe` layers take the k experts
of the token id from the frozen table `tid2eid`. Either way the weights are the selected σ,
renormalised (+1e-20) and multiplied by routed_scaling_factor. Experts are SwiGLU with
gate ≤ L and up ∈ [−L, L] (L = swiglu_limit), the same clamp for the shared expert.

Routed experts run as a grouped matmul: assignments sorted by expert, then `lax.ragged_dot`
(a grouped GEMM on GPU), then scattered back. No token is ever dropped.

Training reads each router's decisions through `nnx.capture(RoutingDecision)` (see `balance.py`):
per-expert load for the bias update and affinities for the sequence-wise balance loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from model1_jax.config import HASH_MOE, Config
from model1_jax.layers import Buffer, Linear, normal_param, weight

F32 = jnp.float32


def swiglu(gate: jax.Array, up: jax.Array, limit: float) -> jax.Array:
    """silu(min(gate, L)) · clip(up, −L, L), in fp32."""
    gate = jnp.minimum(gate.astype(F32), limit)
    return jax.nn.silu(gate) * jnp.clip(up.astype(F32), -limit, limit)


def hash_table(key: jax.Array, vocab_size: int, num_experts: int, k: int) -> jax.Array:
    """A random tid2eid: k distinct experts per token id (HF initialises it to zeros, which is degenerate)."""
    _, experts_vk = jax.lax.top_k(jax.random.uniform(key, (vocab_size, num_experts)), k)
    return experts_vk.astype(jnp.int32)


class RoutingDecision(nnx.Intermediate):
    """One router call's (expert ids [t, k] int32, affinities σ [t, e] fp32), sown under `nnx.capture`."""


class Router(nnx.Module):
    """gate: kernel [d, e]; `e_score_correction_bias` [e] (moe) or `tid2eid` [v, k] (hash_moe)."""

    def __init__(self, config: Config, mlp_type: str, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        self.config = config
        self.is_hash = mlp_type == HASH_MOE
        e, k = config.n_routed_experts, config.num_experts_per_tok
        self.dtype = dtype
        self.kernel = normal_param(rngs, (config.hidden_size, e), ("embed", "experts"), config.initializer_range,
                                   param_dtype)
        if self.is_hash:
            self.tid2eid = Buffer(hash_table(rngs.params(), config.vocab_size, e, k), logical_axes=("vocab", None))
        else:
            self.e_score_correction_bias = Buffer(jnp.zeros((e,), F32), logical_axes=("experts",))

    def scores(self, x_td: jax.Array) -> jax.Array:
        """Router affinities σ [t, e] in fp32."""
        logits_te = jnp.einsum("td,de->te", x_td.astype(self.dtype), weight(self.kernel, self.dtype)).astype(F32)
        if self.config.scoring_func == "sigmoid":
            return jax.nn.sigmoid(logits_te)
        return jnp.sqrt(jax.nn.softplus(logits_te))

    def __call__(self, x_td: jax.Array, ids_t: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Returns (routing weights [t, k] fp32, expert ids [t, k] int32, affinities [t, e] fp32)."""
        scores_te = self.scores(x_td)
        if self.is_hash:
            if ids_t is None:
                raise ValueError("Router: hash_moe layers route by token id; input_ids are required")
            experts_tk = jnp.take(self.tid2eid.get_value(), ids_t, axis=0)
        else:
            biased_te = scores_te + self.e_score_correction_bias.get_value()
            _, experts_tk = jax.lax.top_k(biased_te, self.config.num_experts_per_tok)
        # Outside `nnx.capture`, `sow` would attach new state to the module (deprecated in flax), so inference
        # records nothing and keeps its state and outputs unchanged.
        if hasattr(self, "__captures__"):
            self.sow(RoutingDecision, "routing", (experts_tk.astype(jnp.int32), scores_te))
        picked_tk = jnp.take_along_axis(scores_te, experts_tk, axis=-1)
        weights_tk = picked_tk / (jnp.sum(picked_tk, axis=-1, keepdims=True) + 1e-20)
        return weights_tk * self.config.routed_scaling_factor, experts_tk.astype(jnp.int32), scores_te


class Experts(nnx.Module):
    """Routed experts: gate_proj, up_proj [e, d, f], down_proj [e, f, d]."""

    def __init__(self, config: Config, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        e, d, f = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        std = config.initializer_range
        self.dtype = dtype
        self.num_experts = e
        self.limit = config.swiglu_limit
        self.gate_proj = normal_param(rngs, (e, d, f), ("experts", "embed", "expert_mlp"), std, param_dtype)
        self.up_proj = normal_param(rngs, (e, d, f), ("experts", "embed", "expert_mlp"), std, param_dtype)
        self.down_proj = normal_param(rngs, (e, f, d), ("experts", "expert_mlp", "embed"), std, param_dtype)

    def __call__(self, x_td: jax.Array, experts_tk: jax.Array, weights_tk: jax.Array) -> jax.Array:
        t, k = experts_tk.shape
        flat_experts = experts_tk.reshape(-1)
        order = jnp.argsort(flat_experts, stable=True)
        token_of = order // k
        group_sizes = jnp.bincount(flat_experts, length=self.num_experts).astype(jnp.int32)
        x_ad = jnp.take(x_td.astype(self.dtype), token_of, axis=0)  # one row per (token, pick), grouped by expert
        gate_af = jax.lax.ragged_dot(x_ad, weight(self.gate_proj, self.dtype), group_sizes, preferred_element_type=F32)
        up_af = jax.lax.ragged_dot(x_ad, weight(self.up_proj, self.dtype), group_sizes, preferred_element_type=F32)
        h_af = swiglu(gate_af, up_af, self.limit).astype(self.dtype)
        y_ad = jax.lax.ragged_dot(h_af, weight(self.down_proj, self.dtype), group_sizes, preferred_element_type=F32)
        y_ad = y_ad * weights_tk.reshape(-1)[order][:, None]
        return jnp.zeros((t, y_ad.shape[-1]), F32).at[token_of].add(y_ad).astype(x_td.dtype)


class SharedExpert(nnx.Module):
    """The always-on expert: gate_proj, up_proj [d, f], down_proj [f, d]."""

    def __init__(self, config: Config, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        d, f = config.hidden_size, config.moe_intermediate_size
        kw = dict(rngs=rngs, std=config.initializer_range, dtype=dtype, param_dtype=param_dtype)
        self.limit = config.swiglu_limit
        self.gate_proj = Linear("btd,df->btf", (d, f), ("embed", "mlp"), **kw)
        self.up_proj = Linear("btd,df->btf", (d, f), ("embed", "mlp"), **kw)
        self.down_proj = Linear("btf,fd->btd", (f, d), ("mlp", "embed"), **kw)

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        h_btf = swiglu(self.gate_proj(x_btd), self.up_proj(x_btd), self.limit).astype(x_btd.dtype)
        return self.down_proj(h_btf)


class MoE(nnx.Module):
    def __init__(self, config: Config, mlp_type: str, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.gate = Router(config, mlp_type, **kw)
        self.experts = Experts(config, **kw)
        self.shared_experts = SharedExpert(config, **kw)

    def __call__(self, x_btd: jax.Array, ids_bt: jax.Array | None = None) -> jax.Array:
        b, t, d = x_btd.shape
        x_td = x_btd.reshape(b * t, d)
        weights_tk, experts_tk, _ = self.gate(x_td, None if ids_bt is None else ids_bt.reshape(-1))
        routed_btd = self.experts(x_td, experts_tk, weights_tk).reshape(b, t, d)
        return routed_btd + self.shared_experts(x_btd)
