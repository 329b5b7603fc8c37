"""Mixture of experts (docs/model.md §4.8): every layer is MoE — k routed experts of e plus one shared expert.

Router scores σ = sqrt(softplus(x · W)) (or sigmoid). `moe` layers select the top-k of
σ + e_score_correction_bias (the bias steers selection only); `hash_moe` layers take the k experts
of the token id from the frozen table `tid2eid`. Either way the weights are the selected σ,
renormalised (+1e-20) and multiplied by routed_scaling_factor. Experts are SwiGLU with
gate ≤ L and up ∈ [−L, L] (L = swiglu_limit), the same clamp for the shared expert.

Routed experts run as a grouped matmul: assignments sorted by expert, then `lax.ragged_dot_general`
(a grouped GEMM on GPU), then scattered back. No token is ever dropped. With a sharding layout
attached, the same function runs per device on its shard of the experts (`expert_parallel`).
Their weights keep the checkpoint's arrangement, output axis first ([e, out, in]): both operands of every
expert matmul contract their last (contiguous) axis, the K-major operands GPU FP8/FP4 GEMMs take, and
loading them moves the stored bytes without a transpose.

Training reads each router's decisions: `record_routing(model)` switches the routers on, and they sow
`RoutingDecision`s that `nnx.capture(..., RoutingDecision)` returns (see `train/balance.py`): per-expert
load for the bias update and affinities for the sequence-wise balance loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from model1_jax.config import HASH_MOE, Config
from model1_jax.model.layers import Buffer, Linear, dequantize, normal_param, weight
from model1_jax.parallel import expert_parallel
from model1_jax.parallel.layout import Layout

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
        # Training switches this on (`record_routing`) to read each call's decisions through
        # `nnx.capture(RoutingDecision)`; inference records nothing and keeps its state unchanged.
        self.record = False
        e, k = config.n_routed_experts, config.num_experts_per_tok
        self.dtype = dtype
        # Its own logical name for the expert axis: the router is small and read by every token, so
        # layouts keep it whole even where the routed experts are split.
        self.kernel = normal_param(rngs, (config.hidden_size, e), ("embed", "router_experts"),
                                   config.initializer_range, param_dtype)
        if self.is_hash:
            self.tid2eid = Buffer(hash_table(rngs.params(), config.vocab_size, e, k), logical_axes=("vocab", None))
        else:
            self.e_score_correction_bias = Buffer(jnp.zeros((e,), F32), logical_axes=("router_experts",))

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
        if self.record:
            self.sow(RoutingDecision, "routing", (experts_tk.astype(jnp.int32), scores_te))
        picked_tk = jnp.take_along_axis(scores_te, experts_tk, axis=-1)
        weights_tk = picked_tk / (jnp.sum(picked_tk, axis=-1, keepdims=True) + 1e-20)
        return weights_tk * self.config.routed_scaling_factor, experts_tk.astype(jnp.int32), scores_te


# Each row of x [a, d] by the [f, d] weights of its expert (rows sorted by expert, `group_sizes` rows each),
# contracting the last axis of both: x_ad · gate_efd → [a, f], and h_af · down_edf → [a, d] alike.
_GROUPED = jax.lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(([1], [2]), ([], [])),
                                             lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])


def _grouped_matmul(x_ad: jax.Array, w_efd: jax.Array, group_sizes: jax.Array) -> jax.Array:
    return jax.lax.ragged_dot_general(x_ad, w_efd, group_sizes, _GROUPED, preferred_element_type=F32)


def routed_ffn(x_td: jax.Array, experts_tk: jax.Array, weights_tk: jax.Array, gate_efd: jax.Array,
               up_efd: jax.Array, down_edf: jax.Array, limit: float, *, first_expert: jax.Array | int = 0,
               capacity: int | None = None) -> jax.Array:
    """Σ_k weight · expert(x) over the assignments to experts first_expert .. first_expert + e − 1 (the e
    experts of these weights); assignments to other experts contribute nothing. Float32 [t, d].

    capacity=None: grouped matmul over every assignment (none dropped). Otherwise each expert takes at
    most `capacity` assignments, in token order, into a dense [e, capacity, d] buffer; the rest are dropped.
    """
    e = gate_efd.shape[0]
    t, k = experts_tk.shape
    local_a = experts_tk.reshape(-1) - first_expert
    mine_a = (local_a >= 0) & (local_a < e)
    group_a = jnp.where(mine_a, local_a, e)  # other experts' assignments form a last group nobody computes
    scale_a = jnp.where(mine_a, weights_tk.reshape(-1), 0.0)
    order = jnp.argsort(group_a, stable=True)
    if capacity is None:
        token_of = order // k
        group_sizes = jnp.bincount(group_a, length=e + 1)[:e].astype(jnp.int32)
        x_ad = jnp.take(x_td, token_of, axis=0)  # one row per (token, pick), grouped by expert
        gate_af = _grouped_matmul(x_ad, gate_efd, group_sizes)
        up_af = _grouped_matmul(x_ad, up_efd, group_sizes)
        h_af = swiglu(gate_af, up_af, limit).astype(x_td.dtype)
        y_ad = _grouped_matmul(h_af, down_edf, group_sizes)
        y_ad = jnp.where(mine_a[order][:, None], y_ad * scale_a[order][:, None], 0.0)
        return jnp.zeros((t, y_ad.shape[-1]), F32).at[token_of].add(y_ad)
    # Rank of each assignment within its expert (token order), then a slot in the expert's buffer.
    counts = jnp.bincount(group_a, length=e + 1)
    rank_sorted = jnp.arange(t * k) - (jnp.cumsum(counts) - counts)[group_a[order]]
    rank_a = jnp.zeros(t * k, jnp.int32).at[order].set(rank_sorted.astype(jnp.int32))
    kept_a = mine_a & (rank_a < capacity)
    slot_a = jnp.where(kept_a, group_a * capacity + rank_a, e * capacity)  # past the end: dropped
    x_ad = jnp.take(x_td, jnp.arange(t * k) // k, axis=0)
    x_ecd = jnp.zeros((e * capacity, x_td.shape[-1]), x_td.dtype).at[slot_a].set(x_ad, mode="drop")
    x_ecd = x_ecd.reshape(e, capacity, -1)
    gate_ecf = jnp.einsum("ecd,efd->ecf", x_ecd, gate_efd, preferred_element_type=F32)
    up_ecf = jnp.einsum("ecd,efd->ecf", x_ecd, up_efd, preferred_element_type=F32)
    h_ecf = swiglu(gate_ecf, up_ecf, limit).astype(x_td.dtype)
    y_ed = jnp.einsum("ecf,edf->ecd", h_ecf, down_edf, preferred_element_type=F32).reshape(e * capacity, -1)
    y_ad = jnp.take(y_ed, slot_a, axis=0, mode="fill", fill_value=0.0) * jnp.where(kept_a, scale_a, 0.0)[:, None]
    return jnp.sum(y_ad.reshape(t, k, -1), axis=1)


class Experts(nnx.Module):
    """Routed experts: gate_proj, up_proj [e, f, d], down_proj [e, d, f] (output axis first)."""

    def __init__(self, config: Config, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        e, d, f = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        std = config.initializer_range
        self.dtype = dtype
        self.num_experts = e
        self.limit = config.swiglu_limit
        self.layout: Layout | None = None  # set by `parallel.attach`: the experts then run expert-parallel
        self.gate_proj = normal_param(rngs, (e, f, d), ("experts", "expert_mlp", "embed"), std, param_dtype)
        self.up_proj = normal_param(rngs, (e, f, d), ("experts", "expert_mlp", "embed"), std, param_dtype)
        self.down_proj = normal_param(rngs, (e, d, f), ("experts", "embed", "expert_mlp"), std, param_dtype)

    def ffn(self, x_td: jax.Array, experts_tk: jax.Array, weights_tk: jax.Array, stored: tuple, *,
            first_expert: jax.Array | int = 0, capacity: int | None = None) -> jax.Array:
        """`routed_ffn` on stored (possibly quantized) weight values, in the compute dtype."""
        gate, up, down = (dequantize(v, self.dtype) for v in stored)
        return routed_ffn(x_td.astype(self.dtype), experts_tk, weights_tk, gate, up, down, self.limit,
                          first_expert=first_expert, capacity=capacity)

    def __call__(self, x_td: jax.Array, experts_tk: jax.Array, weights_tk: jax.Array) -> jax.Array:
        stored = tuple(v.get_value() for v in (self.gate_proj, self.up_proj, self.down_proj))
        if self.layout is not None:
            y_td = expert_parallel.routed_experts(self.layout, self.ffn, x_td, experts_tk, weights_tk, stored)
        else:
            y_td = self.ffn(x_td, experts_tk, weights_tk, stored)
        return y_td.astype(x_td.dtype)


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


def record_routing(model: nnx.Module, on: bool = True) -> nnx.Module:
    """Makes every router of `model` sow its decisions (expert ids, affinities) as `RoutingDecision`s, for
    `nnx.capture(fn, RoutingDecision)` to collect. Call it on a copy that runs only under `nnx.capture`."""
    model.set_attributes(Router, record=on)
    return model
