"""Expert parallelism: the routed experts split over mesh axes, run with `shard_map`.

Routed weights [e, out, in] are split by expert id over the `experts` mesh axes and by FFN width over
the `expert_mlp` axes; tokens (and their routing, computed outside by the replicated or
batch-split router) are split like the batch. On each device:

  dispatch  all-gather the tokens over the token axes that also split the experts, so every device
            holding a slice of the experts sees every token that may need it;
  compute   the local experts on the assignments that picked them (`moe.routed_ffn`: a grouped
            matmul, `lax.ragged_dot`), skipping the rest; a local FFN slice gives a partial sum;
  combine   reduce-scatter the partial outputs back to each device's own tokens over the gathered
            axes, and all-reduce over expert axes the tokens were already replicated on.

The expert weights never move (no all-gather of routed weights), and no assignment is dropped
unless the layout sets a capacity factor. The token count is padded to a multiple of the token
shards with assignments to no expert.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from model1_jax.parallel.layout import Layout
from model1_jax.parallel.mesh import spec_entry


def routed_experts(layout: Layout, ffn: Callable, x_td: jax.Array, experts_tk: jax.Array, weights_tk: jax.Array,
                   stored: tuple) -> jax.Array:
    """Routed-expert output, float32 [t, d].

    `ffn(x, experts, weights, stored, first_expert=, capacity=)` computes one device's partial sum from
    its local (possibly quantized) weight values `stored` = (gate [e, f, d], up [e, f, d], down [e, d, f]).
    """
    expert_axes, f_axes = layout.mesh_axes("experts"), layout.mesh_axes("expert_mlp")
    token_axes = layout.mesh_axes("batch")
    gather_axes = tuple(a for a in token_axes if a in expert_axes + f_axes)
    sum_axes = tuple(a for a in expert_axes + f_axes if a not in gather_axes)
    num_experts = stored[0].shape[0]
    if num_experts % layout.size(expert_axes):
        raise ValueError(f"expert parallelism: {num_experts} routed experts do not split over mesh axes "
                         f"{expert_axes} ({layout.size(expert_axes)} devices)")
    local_experts = num_experts // layout.size(expert_axes)

    t, k = experts_tk.shape
    pad = -t % layout.size(token_axes)
    if pad:  # padding tokens are assigned to expert −1, which no device holds
        x_td = jnp.pad(x_td, ((0, pad), (0, 0)))
        experts_tk = jnp.pad(experts_tk, ((0, pad), (0, 0)), constant_values=-1)
        weights_tk = jnp.pad(weights_tk, ((0, pad), (0, 0)))
    tokens_per_shard = (t + pad) // layout.size(token_axes) * layout.size(gather_axes)
    capacity = None
    if layout.capacity_factor is not None:
        capacity = min(tokens_per_shard, math.ceil(layout.capacity_factor * tokens_per_shard * k / num_experts))

    def local(x_td, experts_tk, weights_tk, stored):
        if gather_axes:
            x_td, experts_tk, weights_tk = (jax.lax.all_gather(a, gather_axes, axis=0, tiled=True)
                                            for a in (x_td, experts_tk, weights_tk))
        first = jax.lax.axis_index(expert_axes) * local_experts if expert_axes else 0
        y_td = ffn(x_td, experts_tk, weights_tk, stored, first_expert=first, capacity=capacity)
        if gather_axes:
            y_td = jax.lax.psum_scatter(y_td, gather_axes, scatter_dimension=0, tiled=True)
        if sum_axes:
            y_td = jax.lax.psum(y_td, sum_axes)
        return y_td

    tokens = P(spec_entry(token_axes))
    up_spec = P(spec_entry(expert_axes), spec_entry(f_axes), None)    # gate and up [e, f, d]
    down_spec = P(spec_entry(expert_axes), None, spec_entry(f_axes))  # down [e, d, f]
    y_td = jax.shard_map(local, mesh=layout.mesh, in_specs=(tokens, tokens, tokens, (up_spec, up_spec, down_spec)),
                         out_specs=tokens)(x_td, experts_tk, weights_tk, stored)
    return y_td[:t]
