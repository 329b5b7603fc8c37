"""Test utilities: fast random models and jitted forwards."""

import os

import jax.numpy as jnp
import numpy as np
from flax import nnx

import model1_jax as m1
from model1_jax.model.layers import Buffer


def random_model(cfg: m1.Config, seed: int = 0, std: float = 0.2, dtype=jnp.float32) -> m1.Model1:
    """A model with non-degenerate random weights, filled from NumPy (no per-shape PRNG compiles).

    1-D float parameters (norm weights, mHC base/scale, sinks) get 1 ± std or N(0, std); hash tables
    get k distinct experts per token.
    """
    rng = np.random.default_rng(seed)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: m1.Model1(cfg, rngs=nnx.Rngs(0), dtype=dtype,
                                                                  param_dtype=dtype)))
    filled = []
    for path, var in nnx.to_flat_state(state):
        shape, dt = var.shape, var.dtype
        if path[-1] == "tid2eid":
            value = np.stack([rng.permutation(cfg.n_routed_experts)[: cfg.num_experts_per_tok]
                              for _ in range(shape[0])])
        elif isinstance(var, Buffer):
            value = 0.1 * rng.normal(size=shape)
        elif len(shape) == 1 and path[-1] in ("weight", "scale", "hc_scale"):
            value = 1.0 + std * rng.normal(size=shape)
        else:
            value = std * rng.normal(size=shape)
        filled.append((path, var.replace(jnp.asarray(value, dt))))
    return nnx.merge(graphdef, nnx.from_flat_state(filled))


forward = nnx.jit(lambda model, ids: model(ids))
forward_with_mtp = nnx.jit(lambda model, ids: model.forward_with_mtp(ids))
streams = nnx.jit(lambda model, ids: model.streams(ids))


def takes_direct_io(directory) -> bool:
    """Whether the file system of `directory` takes O_DIRECT at all (tmpfs before Linux 6.6 does not)."""
    if not getattr(os, "O_DIRECT", 0):
        return False
    try:
        os.close(os.open(os.path.join(directory, ".direct-io-probe"), os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644))
        return True
    except OSError:
        return False
