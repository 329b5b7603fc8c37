"""Optimizers for fine-tuning: AdamW, or Muon on weight matrices with AdamW on the rest; warmup + cosine.

Everything is optax's own: `optax.adamw`, `optax.contrib.muon`, `optax.partition`,
`optax.clip_by_global_norm`, `optax.warmup_cosine_decay_schedule`.

Muon orthogonalises the update of a matrix `[fan_in, fan_out]`. MODEL1 keeps many kernels shaped
(q_b_proj [q, n, h], o_a_proj [g, m, h, o], experts [e, out, in], mHC fn [c, d, x]); each one's
matrix view is read off its einsum: contracted axes are the fan-in, new axes the fan-out, axes
shared by input, kernel and output (the output groups g, the experts e) are independent matrices.
That is exactly the matrix the checkpoint stores (e.g. HF's q_b_proj [n·h, q]).

Parameter groups, by path (`param_groups`): Muon takes every projection kernel (attention,
compressors, indexer, shared and routed experts, router gate, MTP e/h projections, mHC `fn`), and
LoRA adapters; AdamW takes the embedding, the lm_head, and every vector (RMSNorm weights, mHC base
and scale, attention sinks, compressor position biases) — the usual Muon practice (embeddings and
output head excluded). DeepSeek does not publish V4's exact split; the rule is one function here.
Muon updates are rescaled to AdamW's RMS (`consistent_rms`, Moonlight), so one learning rate fits both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from optax.contrib import MuonDimensionNumbers

from model1_jax.model.hyper import HyperConnection, HyperHead
from model1_jax.model.layers import Linear
from model1_jax.model.moe import Experts, Router

OPTIMIZERS = ("adamw", "muon")
# Matrices that stay on AdamW although they are 2-D: lookup tables and the output head.
ADAMW_MATRICES = ("embed_tokens", "lm_head")

Path = tuple


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    name: str = "adamw"
    learning_rate: float = 3e-4
    warmup_steps: int = 0
    # Cosine decay to `min_lr_ratio · learning_rate` at `total_steps`; None keeps the peak rate after warmup.
    total_steps: int | None = None
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float | None = 1.0
    muon_beta: float = 0.95
    muon_rms: float = 0.2

    def __post_init__(self):
        if self.name not in OPTIMIZERS:
            raise ValueError(f"OptimizerConfig.name: unknown optimizer {self.name!r}; expected one of {OPTIMIZERS}")
        if not self.learning_rate > 0:
            raise ValueError(f"OptimizerConfig.learning_rate: expected > 0, got {self.learning_rate!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"OptimizerConfig.warmup_steps: expected >= 0, got {self.warmup_steps!r}")
        if self.total_steps is not None and self.total_steps <= self.warmup_steps:
            raise ValueError(f"OptimizerConfig.total_steps: expected more than warmup_steps={self.warmup_steps}, "
                             f"got {self.total_steps!r}")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError(f"OptimizerConfig.clip_norm: expected > 0 or None, got {self.clip_norm!r}")


def learning_rate_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    """Linear warmup from 0 to the peak, then cosine decay to `min_lr_ratio` of it (or constant)."""
    if cfg.total_steps is None:
        if cfg.warmup_steps == 0:
            return optax.constant_schedule(cfg.learning_rate)
        return optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps)
    return optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, cfg.warmup_steps, cfg.total_steps,
                                              end_value=cfg.learning_rate * cfg.min_lr_ratio)


def einsum_dims(eqn: str) -> MuonDimensionNumbers:
    """Matrix view of the kernel (second operand) of `x, kernel -> y`: fan-in and fan-out axes."""
    lhs, out = eqn.replace(" ", "").split("->")
    x, kernel = lhs.split(",")
    reduction = tuple(i for i, a in enumerate(kernel) if a in x and a not in out)
    output = tuple(i for i, a in enumerate(kernel) if a not in x and a in out)
    return MuonDimensionNumbers(reduction_axis=reduction, output_axis=output)


def matrix_dims(model: nnx.Module) -> dict[Path, MuonDimensionNumbers]:
    """Every weight matrix of the model (path → its matrix view), whatever its optimizer group."""
    dims: dict[Path, MuonDimensionNumbers] = {}
    for path, module in nnx.iter_modules(model):
        if isinstance(module, Linear):
            dims[(*path, "kernel")] = einsum_dims(module.eqn)
        elif isinstance(module, Experts):
            for name in ("gate_proj", "up_proj", "down_proj"):
                dims[(*path, name)] = MuonDimensionNumbers(2, 1)  # [e, out, in]
        elif isinstance(module, Router):
            dims[(*path, "kernel")] = MuonDimensionNumbers(0, 1)
        elif isinstance(module, HyperConnection):
            dims[(*path, "fn")] = MuonDimensionNumbers((0, 1), 2)
        elif isinstance(module, HyperHead):
            dims[(*path, "hc_fn")] = MuonDimensionNumbers((0, 1), 2)
        if hasattr(module, "muon_dims"):  # LoRA adapters describe their own factors
            dims.update({(*path, *sub): d for sub, d in module.muon_dims().items()})
    return dims


def param_groups(model: nnx.Module, wrt: nnx.filterlib.Filter = nnx.Param) -> dict[Path, str]:
    """Path → "muon" or "adamw" for every variable selected by `wrt` (see the module docstring)."""
    dims = matrix_dims(model)
    groups = {}
    for path, _ in nnx.to_flat_state(nnx.state(model, wrt)):
        path = tuple(path)
        is_matrix = path in dims and not any(p in ADAMW_MATRICES for p in path)
        groups[path] = "muon" if is_matrix else "adamw"
    return groups


def _key(entry) -> object:
    for attr in ("key", "idx", "name"):
        if hasattr(entry, attr):
            return getattr(entry, attr)
    return entry


def _by_path(table: dict[Path, object]) -> Callable:
    """A function of a params tree that maps each leaf to `table[its path]` (optax label/mask callables)."""
    def lookup(tree):
        return jax.tree_util.tree_map_with_path(lambda kp, _: table[tuple(_key(k) for k in kp)], tree)
    return lookup


def build_optimizer(cfg: OptimizerConfig, model: nnx.Module, wrt: nnx.filterlib.Filter = nnx.Param
                    ) -> optax.GradientTransformation:
    """The optax transformation for the variables `wrt` selects, as a pure-array tree (`nnx.as_pure`).

    Weight decay is decoupled and skips vectors (norm weights, biases, sinks).
    """
    schedule = learning_rate_schedule(cfg)
    state = nnx.state(model, wrt)
    if not jax.tree.leaves(state):
        raise ValueError("build_optimizer: the filter selects no variable to train")
    ndim = {tuple(p): v.ndim for p, v in nnx.to_flat_state(state)}
    decay = _by_path({p: n >= 2 for p, n in ndim.items()})
    adamw = optax.adamw(schedule, cfg.b1, cfg.b2, cfg.eps, mu_dtype=jnp.float32, weight_decay=cfg.weight_decay,
                        mask=decay)
    if cfg.name == "adamw":
        tx = adamw
    else:
        groups = param_groups(model, wrt)
        dims = matrix_dims(model)
        muon = optax.contrib.muon(
            schedule, beta=cfg.muon_beta, eps=cfg.eps, weight_decay=cfg.weight_decay, mu_dtype=jnp.float32,
            consistent_rms=cfg.muon_rms,
            muon_weight_dimension_numbers=_by_path({p: dims[p] for p, g in groups.items() if g == "muon"}))
        tx = optax.partition({"muon": muon, "adamw": adamw}, _by_path(groups))
    if cfg.clip_norm is not None:
        tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), tx)
    return tx
