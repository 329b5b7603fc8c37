"""MoE load balancing during training (docs/model.md §4.8, §7.9, §8).

DeepSeek balances experts without an auxiliary loss (DeepSeek-V3 §2.1.2): after each step the
router bias of every `moe` layer moves by a fixed rate γ towards balance,

    b_e ← b_e + γ · sign(mean_load − load_e),

where load_e counts the tokens routed to expert e during the step. The bias only steers selection
(docs/model.md §4.8), so it is not a gradient-trained parameter. An optional complementary sequence-wise
balance loss (V3 eq. 17–20) keeps single sequences from collapsing onto few experts:

    L_bal = α · Σ_e f_e · P_e,   f_e = e/(k·T) · #{t : e ∈ top-k(t)},   P_e = (1/T) Σ_t σ_te / Σ_e' σ_te'

per sequence of T tokens, averaged over sequences and summed over `moe` layers. V4's exact rule and
rates are not published (docs/model.md §8); γ and α are configuration. `hash_moe` layers route by a frozen
table: they are reported but never rebalanced.

Routers sow their decisions under `nnx.capture(RoutingDecision)`; `decisions` collects them by path.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from model1_jax.model.moe import RoutingDecision

F32 = jnp.float32
BIAS = "e_score_correction_bias"

Path = tuple


@dataclasses.dataclass(frozen=True)
class BalanceConfig:
    """`bias_rate` γ (DeepSeek-V3 used 1e-3) and `sequence_loss_weight` α (V3 used 1e-4; 0 disables)."""

    bias_rate: float = 1e-3
    sequence_loss_weight: float = 0.0

    def __post_init__(self):
        if not self.bias_rate >= 0:
            raise ValueError(f"BalanceConfig.bias_rate: expected a rate >= 0, got {self.bias_rate!r}")
        if not self.sequence_loss_weight >= 0:
            raise ValueError(f"BalanceConfig.sequence_loss_weight: expected >= 0, got {self.sequence_loss_weight!r}")


def decisions(captured: nnx.State) -> dict[Path, list[tuple[jax.Array, jax.Array]]]:
    """Router path → its calls' (expert ids [t, k], affinities [t, e]), from `nnx.capture(RoutingDecision)`."""
    out: dict[Path, list] = {}
    for path, var in nnx.to_flat_state(captured):
        if path[-1] == "routing" and isinstance(var, RoutingDecision):
            out[tuple(path[:-1])] = list(var.get_value())
    return out


def expert_load(experts_tk: jax.Array, num_experts: int) -> jax.Array:
    """Tokens routed to each expert [e] (float32, so loads can be summed over micro-batches and steps)."""
    return jnp.bincount(experts_tk.reshape(-1), length=num_experts).astype(F32)


def imbalance(load_e: jax.Array) -> jax.Array:
    """max / mean of an expert load vector: 1 is perfect balance, e/k means all tokens on k experts."""
    return jnp.max(load_e, axis=-1) / jnp.maximum(jnp.mean(load_e, axis=-1), 1e-9)


def bias_paths(buffers: nnx.State) -> list[Path]:
    """Paths of the routers that carry a correction bias (`moe` layers, including the MTP block's)."""
    return [tuple(p[:-1]) for p, _ in nnx.to_flat_state(buffers) if p[-1] == BIAS]


def update_bias(buffers: nnx.State, loads: dict[Path, jax.Array], rate: float) -> nnx.State:
    """The aux-loss-free step: every router bias moves by `rate` towards its step's mean load.

    `loads` maps router paths to per-expert token counts; routers without a bias (hash layers)
    are ignored, and so are biased routers that did not run (the MTP block when its loss is off).
    """
    flat = []
    for path, value in nnx.to_flat_state(buffers):
        if path[-1] == BIAS and tuple(path[:-1]) in loads:
            load_e = loads[tuple(path[:-1])]
            value = value + rate * jnp.sign(jnp.mean(load_e) - load_e).astype(value.dtype)
        flat.append((path, value))
    return nnx.from_flat_state(flat)


def sequence_balance_loss(experts_tk: jax.Array, scores_te: jax.Array, batch: int) -> jax.Array:
    """DeepSeek-V3's sequence-wise balance loss (without α) for one router, mean over the batch's sequences."""
    t_all, k = experts_tk.shape
    e = scores_te.shape[-1]
    experts_btk = experts_tk.reshape(batch, t_all // batch, k)
    scores_bte = scores_te.reshape(batch, t_all // batch, e).astype(F32)
    t = experts_btk.shape[1]
    counts_be = jax.vmap(lambda ids: jnp.bincount(ids.reshape(-1), length=e))(experts_btk).astype(F32)
    f_be = counts_be * (e / (k * t))
    p_be = jnp.mean(scores_bte / jnp.sum(scores_bte, axis=-1, keepdims=True), axis=1)
    return jnp.mean(jnp.sum(f_be * p_be, axis=-1))


def describe(loads: dict[Path, jax.Array], biased: set | frozenset = frozenset()) -> str:
    """One log line: max/mean load per router, e.g. `L0h 1.42 L2 1.10 mtp 1.31` (h: hash-routed, not biased)."""
    parts = []
    for path, load in sorted(loads.items(), key=lambda kv: (kv[0][0] == "mtp", kv[0])):
        name = "mtp" if path[0] == "mtp" else f"L{path[1]}"
        parts.append(f"{name}{'' if path in biased else 'h'} {float(imbalance(jnp.asarray(load))):.2f}")
    return " ".join(parts)
