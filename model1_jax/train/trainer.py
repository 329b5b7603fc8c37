"""The training step: masked next-token + MTP cross-entropy, gradient accumulation, optax update, balance.

    trainer = Trainer(model, optimizer_config, TrainConfig(mtp_weight=0.3))
    metrics = trainer.step({"ids": ids_abt, "mask": mask_abt})     # a micro-batches of [b, t]
    model = trainer.model()                                        # the trained model, merged back

Loss, for ids [b, t] and a target mask [b, t] (1 where a token is a training target; 0 for padding
and prompt tokens):
    L = Σ_t m[t+1]·CE(logits[t], ids[t+1]) / Σ m  +  w_mtp · Σ_t m[t+2]·CE(mtp_logits[t], ids[t+2]) / Σ m
      + α · Σ_moe-layers L_bal
`mtp_logits[t]` (the MTP block on the main streams at t and the embedding of token t+1) predicts
token t+2 (docs/model.md §4.10). The MTP weight is configuration: DeepSeek-V3 used 0.3, then 0.1; V4's is not
published (docs/model.md §8). Sums are normalised by the target count of the whole (accumulated) batch, so
accumulating a micro-batches gives the gradient of the large batch.

Precision: trainable parameters are kept in float32 (master weights, and so is the optimizer state)
whatever the model's storage dtype; the model computes in its own `dtype` (bf16 for training), with
the fp32 weights cast at each read (`layers.weight`). `remat` recomputes each decoder layer in the
backward pass instead of storing its activations (long sequences).

What trains (`trainable_filter`): every `nnx.Param` except (a) the lightning indexers, which receive
no gradient from the LM loss — they return integer picks (docs/model.md §4.6, §7.14) — and AdamW's
decoupled weight decay would otherwise shrink them with zero gradient, and (b) the MTP block when its
loss weight is 0. The indexers train only with `indexer_stage` (docs/training.md §4): "warmup" trains
them alone on w · KL(teacher ‖ indexer) over every visible entry (the LM losses are reported, not
optimised); "sparse" trains everything, the indexers on w · KL over their picks only (their inputs are
detached, so the KL never reaches the trunk). The KL term is the mean over CSA layers and query tokens.

Packed documents: a batch may carry `positions` [a, b, t] (positions inside documents, `train/data.py`);
a target that starts a document (position 0) is not predicted from the previous document, nor an MTP
target at position < 2. Router biases are `Buffer`s moved by `balance`,
hash tables never change. With LoRA (`lora=True`) only the adapters train and the whole base,
router biases included, stays bit-identical.

Sharding: a model placed by `model1_jax.sharding` (`create` / `shard` / `load`, e.g. the `fsdp` or
`data_parallel` presets) trains as it is laid out — parameters and optimizer moments keep their
shardings, each batch is split over the layout's batch axes, and XLA inserts the collectives.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from model1_jax.common import check_token_ids
from model1_jax.config import CSA, SLIDING
from model1_jax.model.attention import INDEXER_STAGES, IndexerTerms, train_indexer
from model1_jax.model.layers import Buffer
from model1_jax.model.moe import Router, RoutingDecision, record_routing
from model1_jax.model.quant import is_quantized
from model1_jax.train import balance
from model1_jax.train.balance import BalanceConfig
from model1_jax.train.optim import OptimizerConfig, build_optimizer, learning_rate_schedule

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    mtp_weight: float = 0.3
    remat: bool = False  # recompute decoder layers in the backward pass: long sequences, less memory
    balance: BalanceConfig = BalanceConfig()
    indexer_stage: str | None = None  # None (indexers frozen), "warmup" or "sparse" (module docstring)
    indexer_kl_weight: float = 1.0

    def __post_init__(self):
        if not self.mtp_weight >= 0:
            raise ValueError(f"TrainConfig.mtp_weight: expected >= 0, got {self.mtp_weight!r}")
        if self.indexer_stage is not None and self.indexer_stage not in INDEXER_STAGES:
            raise ValueError(f"TrainConfig.indexer_stage: expected None or one of {INDEXER_STAGES}, "
                             f"got {self.indexer_stage!r}")
        if not self.indexer_kl_weight > 0:
            raise ValueError(f"TrainConfig.indexer_kl_weight: expected > 0, got {self.indexer_kl_weight!r}")


class TrainState(struct.PyTreeNode):
    """Everything a step changes; an Orbax checkpoint of it resumes training exactly."""

    step: jax.Array          # int32 scalar: optimizer steps taken
    params: nnx.State        # trainable variables, float32, pure arrays
    buffers: nnx.State       # router biases (balance update) and hash tables (frozen)
    opt_state: Any


def trainable_filter(model: nnx.Module, config: TrainConfig, *, lora: bool = False) -> nnx.filterlib.Filter:
    """The variables that train (see the module docstring for why the indexer is excluded)."""
    if lora:
        return nnx.LoRAParam
    if config.indexer_stage == "warmup":
        return nnx.All(nnx.Param, nnx.PathContains("indexer"))
    frozen = [] if config.indexer_stage == "sparse" else [nnx.PathContains("indexer")]
    if getattr(model, "mtp", None) is not None and config.mtp_weight == 0:
        frozen.append(nnx.PathContains("mtp"))
    return nnx.All(nnx.Param, nnx.Not(nnx.Any(*frozen))) if frozen else nnx.Param


def cross_entropy_sums(logits_btv: jax.Array, targets_bt: jax.Array, mask_bt: jax.Array) -> jax.Array:
    """Σ mask · CE(logits, targets) in float32."""
    ce_bt = optax.softmax_cross_entropy_with_integer_labels(logits_btv.astype(F32), targets_bt)
    return jnp.sum(ce_bt * mask_bt.astype(F32))


def target_masks(mask_bt: jax.Array, positions_bt: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """Masks of the main targets (tokens 1..) and the MTP targets (tokens 2..); with packed documents a target
    needs 1 (main) or 2 (MTP) tokens of its own document before it."""
    main, mtp = mask_bt[..., 1:].astype(F32), mask_bt[..., 2:].astype(F32)
    if positions_bt is not None:
        main, mtp = main * (positions_bt[..., 1:] >= 1), mtp * (positions_bt[..., 2:] >= 2)
    return main, mtp


def target_counts(mask_bt: jax.Array, positions_bt: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """How many targets the main loss (positions 1..) and the MTP loss (positions 2..) see."""
    main, mtp = target_masks(mask_bt, positions_bt)
    return jnp.sum(main), jnp.sum(mtp)


def loss_sums(model: nnx.Module, ids_bt: jax.Array, mask_bt: jax.Array, *, mtp: bool, remat: bool = False,
              positions_bt: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(Σ masked next-token CE, Σ masked MTP CE) of one batch; the MTP sum is 0 when `mtp` is False."""
    streams_btcd = model.streams(ids_bt, positions_bt, remat=remat)
    main_mask, mtp_mask = target_masks(mask_bt, positions_bt)
    main = cross_entropy_sums(model.head(streams_btcd)[:, :-1], ids_bt[:, 1:], main_mask)
    if not mtp:
        return main, jnp.zeros((), F32)
    mtp_positions = None if positions_bt is None else positions_bt[:, :-1]
    mtp_logits = model.mtp_logits(streams_btcd[:, :-1], ids_bt[:, 1:], mtp_positions)  # row t predicts t+2
    return main, cross_entropy_sums(mtp_logits[:, :-1], ids_bt[:, 2:], mtp_mask)


def indexer_sums(captured: nnx.State) -> tuple[jax.Array, jax.Array, jax.Array, int]:
    """(Σ KL, recall hits, recall slots, CSA layer calls) of the `IndexerTerms` a forward sowed."""
    kl, hits, slots, calls = jnp.zeros((), F32), jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32), 0
    for path, var in nnx.to_flat_state(captured):
        if path[-1] == "indexer" and isinstance(var, IndexerTerms):
            for k, h, s in var.get_value():
                kl, hits, slots, calls = kl + k, hits + h, slots + s, calls + 1
    return kl, hits, slots, calls


def _routing_terms(captured: nnx.State, batch: int, num_experts: int, biased: set, with_loss: bool
                   ) -> tuple[dict, jax.Array]:
    """Per-router expert loads and the summed sequence-wise balance loss of the biased routers."""
    loads, bal = {}, jnp.zeros((), F32)
    for path, calls in balance.decisions(captured).items():
        loads[path] = sum(balance.expert_load(experts, num_experts) for experts, _ in calls)
        if with_loss and path in biased:
            bal = bal + sum(balance.sequence_balance_loss(experts, scores, batch) for experts, scores in calls)
    return loads, bal


class _Program:
    """The jitted step and eval functions for one model structure and configuration.

    Cached by (graph, configs), so Trainers of identically shaped models share compilations.
    """

    def __init__(self, graphdef: nnx.GraphDef, tx: optax.GradientTransformation, config: TrainConfig,
                 schedule: optax.Schedule, use_mtp: bool, num_experts: int, routers: tuple, biased: frozenset, *,
                 update_bias: bool):
        self.graphdef, self.tx, self.config, self.schedule = graphdef, tx, config, schedule
        self.use_mtp, self.num_experts, self.routers, self.biased = use_mtp, num_experts, routers, biased
        # A LoRA base stays frozen, router biases included.
        self.update_bias = update_bias and config.balance.bias_rate > 0 and bool(biased)
        self.train_step = jax.jit(self._step_fn, donate_argnums=0)
        self.eval_step = jax.jit(self._eval_fn)

    def _micro_loss(self, params, buffers, frozen, ids_bt, mask_bt, positions_bt, n_main, n_mtp, n_queries, accum):
        model = record_routing(nnx.merge(self.graphdef, params, buffers, frozen))  # a traced copy
        stage = self.config.indexer_stage
        kinds = (RoutingDecision,) if stage is None else (RoutingDecision, IndexerTerms)
        if stage is not None:
            train_indexer(model, stage)
        fwd = nnx.capture(lambda m: loss_sums(m, ids_bt, mask_bt, mtp=self.use_mtp, remat=self.config.remat,
                                              positions_bt=positions_bt), *kinds)
        (main, mtp), captured, *indexer = fwd(model)
        alpha = self.config.balance.sequence_loss_weight
        loads, bal = _routing_terms(captured, ids_bt.shape[0], self.num_experts, self.biased, alpha > 0)
        loss = main / n_main + self.config.mtp_weight * mtp / n_mtp + alpha * bal / accum
        aux = {"main": main, "mtp": mtp, "balance_loss": bal / accum, "loads": loads}
        if stage is not None:
            kl, hits, slots, calls = indexer_sums(indexer[0])
            kl = kl / (n_queries * max(calls, 1))  # mean over CSA layers and all query tokens of the batch
            weighted = self.config.indexer_kl_weight * kl
            loss = weighted if stage == "warmup" else loss + weighted  # warm-up: the indexers alone train
            aux |= {"indexer_kl": kl, "recall_hits": hits, "recall_slots": slots}
        return loss, aux

    def _step_fn(self, state: TrainState, frozen, batch):
        ids_abt, mask_abt = batch["ids"], batch["mask"]
        positions_abt = batch.get("positions")
        accum = ids_abt.shape[0]
        n_main, n_mtp = target_counts(mask_abt, positions_abt)
        n_main, n_mtp = jnp.maximum(n_main, 1.0), jnp.maximum(n_mtp, 1.0)
        n_queries = float(np.prod(ids_abt.shape))
        grad_fn = jax.value_and_grad(self._micro_loss, has_aux=True)

        def micro(carry, xs):
            grads, aux_sum = carry
            ids, mask, positions = xs
            (_, aux), g = grad_fn(state.params, state.buffers, frozen, ids, mask, positions, n_main, n_mtp,
                                  n_queries, accum)
            return (jax.tree.map(jnp.add, grads, g), jax.tree.map(jnp.add, aux_sum, aux)), None

        zero, izero = jnp.zeros((), F32), jnp.zeros((), jnp.int32)
        aux0 = {"main": zero, "mtp": zero, "balance_loss": zero,
                "loads": {p: jnp.zeros((self.num_experts,), F32) for p in self.routers}}
        if self.config.indexer_stage is not None:
            aux0 |= {"indexer_kl": zero, "recall_hits": izero, "recall_slots": izero}
        grads0 = jax.tree.map(jnp.zeros_like, state.params)
        (grads, aux), _ = jax.lax.scan(micro, (grads0, aux0), (ids_abt, mask_abt, positions_abt))

        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        buffers = state.buffers
        if self.update_bias:
            buffers = balance.update_bias(buffers, aux["loads"], self.config.balance.bias_rate)
        main, mtp = aux["main"] / n_main, aux["mtp"] / n_mtp
        alpha = self.config.balance.sequence_loss_weight
        loss = main + self.config.mtp_weight * mtp + alpha * aux["balance_loss"]
        metrics = {
            "loss": loss, "main_loss": main, "mtp_loss": mtp, "balance_loss": aux["balance_loss"],
            "grad_norm": optax.tree.norm(grads),
            "grads_finite": jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)])),
            "learning_rate": self.schedule(state.step),
            "loads": aux["loads"],
        }
        if self.config.indexer_stage is not None:
            weighted = self.config.indexer_kl_weight * aux["indexer_kl"]
            metrics |= {"loss": weighted if self.config.indexer_stage == "warmup" else loss + weighted,
                        "indexer_kl": aux["indexer_kl"]}
            if self.config.indexer_stage == "warmup":  # over the picks (sparse stage) recall would be 1
                metrics["indexer_recall"] = aux["recall_hits"] / jnp.maximum(aux["recall_slots"], 1)
        return TrainState(step=state.step + 1, params=params, buffers=buffers, opt_state=opt_state), metrics

    def _eval_fn(self, params, buffers, frozen, ids_bt, mask_bt, positions_bt):
        model = nnx.merge(self.graphdef, params, buffers, frozen)
        fn = lambda m: loss_sums(m, ids_bt, mask_bt, mtp=self.use_mtp, positions_bt=positions_bt)  # noqa: E731
        n_main, n_mtp = target_counts(mask_bt, positions_bt)
        out = {"n_main": n_main, "n_mtp": n_mtp}
        if self.config.indexer_stage is None:
            out["main"], out["mtp"] = fn(model)
            return out
        # Held out, the indexers are scored against the warm-up teacher (every visible entry) in both stages.
        (out["main"], out["mtp"]), captured = nnx.capture(fn, IndexerTerms)(train_indexer(model, "warmup"))
        kl, hits, slots, calls = indexer_sums(captured)
        return out | {"kl": kl / max(calls, 1), "n_queries": float(np.prod(ids_bt.shape)), "hits": hits,
                      "slots": slots}


_PROGRAMS: dict[tuple, _Program] = {}


def _check_positions(positions, shape: tuple, align: int, where: str) -> np.ndarray:
    """Positions inside packed documents: int, the batch's shape, each row counting up from 0 and restarting at 0
    only at multiples of `align` (so no compressor window spans two documents)."""
    positions = np.asarray(positions)
    if positions.shape != tuple(shape) or not np.issubdtype(positions.dtype, np.integer):
        raise ValueError(f"{where}: positions must be integers of shape {tuple(shape)}, got "
                         f"{positions.dtype} {positions.shape}")
    step = np.diff(positions, axis=-1)
    if positions[..., 0].any() or not ((step == 1) | (positions[..., 1:] == 0)).all():
        raise ValueError(f"{where}: positions must start at 0 and either count up by 1 or restart at 0 "
                         "(a new document)")
    starts = np.nonzero(positions == 0)[-1]
    if (starts % align).any():
        raise ValueError(f"{where}: packed documents must start at multiples of {align} (the largest compression "
                         f"rate), found a start at token {int(starts[(starts % align) != 0][0])}")
    return positions.astype(np.int32)


class Trainer:
    """Owns the split model (static graph, trainable state, frozen rest), the optimizer and the jitted step."""

    def __init__(self, model: nnx.Module, optimizer: OptimizerConfig, config: TrainConfig = TrainConfig(), *,
                 lora: bool = False):
        self.config = config
        self.optimizer_config = optimizer
        self.lora = lora
        wrt = trainable_filter(model, config, lora=lora)
        if lora and not jax.tree.leaves(nnx.state(model, nnx.LoRAParam)):
            raise ValueError("Trainer(lora=True): the model has no LoRA adapters (attach them with lora.apply_lora)")
        if config.indexer_stage is not None and (lora or CSA not in model.config.layer_types):
            raise ValueError(f"Trainer: indexer_stage={config.indexer_stage!r} trains the lightning indexers, "
                             + ("which LoRA training leaves frozen" if lora else "but the model has no CSA layer"))
        self.align = max([model.config.compress_rate(t) for t in set(model.config.layer_types) if t != SLIDING],
                         default=1)
        graphdef, params, buffers, frozen = nnx.split(model, wrt, Buffer, ...)
        quantized = [".".join(map(str, p)) for p, v in nnx.to_flat_state(params)
                     if is_quantized(v.get_value())]
        if quantized:
            raise ValueError(f"Trainer: {len(quantized)} trainable parameters are FP8/FP4-quantized (e.g. "
                             f"{quantized[0]}); full fine-tuning needs dense weights: load the model dequantized, "
                             "or train LoRA adapters on the quantized base")
        params = nnx.as_pure(params)
        self._storage_dtypes = jax.tree.map(lambda x: x.dtype, params)
        params = jax.tree.map(lambda x: x.astype(F32), params)  # fp32 master weights
        self.frozen = nnx.as_pure(frozen)
        buffers = nnx.as_pure(buffers)
        self.max_len, self.vocab_size = model.config.max_position_embeddings, model.config.vocab_size
        key = (graphdef, optimizer, config, lora)
        if key not in _PROGRAMS:
            use_mtp = getattr(model, "mtp", None) is not None and config.mtp_weight > 0
            routers = tuple(path for path, m in nnx.iter_modules(model) if isinstance(m, Router)
                            and (use_mtp or path[0] != "mtp"))
            _PROGRAMS[key] = _Program(graphdef, build_optimizer(optimizer, model, wrt), config,
                                      learning_rate_schedule(optimizer), use_mtp, model.config.n_routed_experts,
                                      routers, frozenset(balance.bias_paths(buffers)), update_bias=not lora)
        self.program = _PROGRAMS[key]
        self.use_mtp = self.program.use_mtp
        self.biased_paths = self.program.biased
        state = TrainState(step=jnp.zeros((), jnp.int32), params=params, buffers=buffers,
                           opt_state=self.program.tx.init(params))  # moments follow their parameters' shardings
        # A sharded model (`sharding.create` / `shard` / `load`) carries its layout: the batch is split by it,
        # and the state's scalars (step, optimizer counts) are replicated over its mesh.
        self.layout = getattr(model, "layout", None)
        home = None if self.layout is None else NamedSharding(self.layout.mesh, P())

        def place(x):
            sharding = x.sharding if home is None or isinstance(x.sharding, NamedSharding) else home
            return jax.device_put(jnp.array(x, copy=True), sharding)

        # Own copies (each step donates the state, which must not delete the caller's arrays), committed to
        # their devices like a restored checkpoint's arrays, so that both share one compilation.
        self.state = jax.tree.map(place, state)

    # -- host API -----------------------------------------------------------------------------------

    def step(self, batch: dict[str, jax.Array]) -> dict[str, Any]:
        """One optimizer step on `{"ids": int [a, b, t], "mask": [a, b, t]}` (a micro-batches accumulated),
        optionally with `"positions"` [a, b, t] of packed documents (`train/data.py`)."""
        self.state, metrics = self.program.train_step(self.state, self.frozen, self._checked(batch, "Trainer.step"))
        return metrics

    def memory_estimate(self, batch: dict[str, jax.Array]) -> dict[str, int]:
        """XLA's buffer plan for one step on a batch of this shape, per device, in bytes: arguments (state and
        batch), outputs, temporaries, what outputs reuse of the (donated) arguments, and `peak` = arguments +
        outputs + temporaries − reused. Compiles the step (once more: the jit cache is separate)."""
        placed = self._checked(batch, "Trainer.memory_estimate")
        ma = self.program.train_step.lower(self.state, self.frozen, placed).compile().memory_analysis()
        out = {"arguments": ma.argument_size_in_bytes, "outputs": ma.output_size_in_bytes,
               "temporaries": ma.temp_size_in_bytes, "reused": ma.alias_size_in_bytes}
        return out | {"peak": out["arguments"] + out["outputs"] + out["temporaries"] - out["reused"]}

    def _checked(self, batch: dict[str, jax.Array], where: str) -> dict[str, jax.Array]:
        """The batch checked and placed as the step takes it."""
        ids, mask = np.asarray(batch["ids"]), np.asarray(batch["mask"])
        if ids.ndim != 3 or mask.shape != ids.shape:
            raise ValueError(f"{where}: expected ids and mask of shape [micro-batches, batch, tokens], "
                             f"got {ids.shape} and {mask.shape}")
        check_token_ids(ids.reshape(-1, ids.shape[-1]), self.vocab_size, f"{where}: ids")
        if ids.shape[-1] < (3 if self.use_mtp else 2):
            raise ValueError(f"{where}: sequences of {ids.shape[-1]} tokens are too short to have targets")
        if ids.shape[-1] > self.max_len:
            raise ValueError(f"{where}: sequences of {ids.shape[-1]} tokens exceed the model's "
                             f"max_position_embeddings ({self.max_len})")
        placed = {"ids": jnp.asarray(ids, jnp.int32), "mask": jnp.asarray(mask)}
        if batch.get("positions") is not None:
            placed["positions"] = jnp.asarray(_check_positions(batch["positions"], ids.shape, self.align, where))
        return self._place(placed, leading=1)

    def _place(self, batch: dict[str, jax.Array], leading: int) -> dict[str, jax.Array]:
        """Splits [(micro-batches,) batch, tokens] arrays over the layout's batch axes (no-op unsharded)."""
        if self.layout is None:
            return batch
        shape = batch["ids"].shape
        spec = P(*(None,) * leading, *self.layout.activation_spec(("batch", "seq"), shape[leading:]))
        return jax.device_put(batch, NamedSharding(self.layout.mesh, spec))

    def evaluate(self, batches) -> dict[str, float]:
        """Mean held-out next-token (and MTP) cross-entropy over `(ids [b, t], mask [b, t](, positions))`
        batches; while training the indexers also their KL to the warm-up teacher and recall@k."""
        sums: dict[str, float] = {}
        for ids, mask, *positions in batches:
            check_token_ids(np.asarray(ids), self.vocab_size, "Trainer.evaluate: ids")
            b = {"ids": jnp.asarray(ids, jnp.int32), "mask": jnp.asarray(mask)}
            if positions and positions[0] is not None:
                positions = _check_positions(positions[0], np.shape(ids), self.align, "Trainer.evaluate")
                b["positions"] = jnp.asarray(positions)
            b = self._place(b, leading=0)
            out = self.program.eval_step(self.state.params, self.state.buffers, self.frozen, b["ids"], b["mask"],
                                         b.get("positions"))
            sums = {k: sums.get(k, 0.0) + float(v) for k, v in out.items()}
        if sums.get("n_main", 0) == 0:
            raise ValueError("Trainer.evaluate: the held-out batches contain no targets")
        result = {"eval_loss": sums["main"] / sums["n_main"]}
        if self.use_mtp and sums["n_mtp"] > 0:
            result["eval_mtp_loss"] = sums["mtp"] / sums["n_mtp"]
        if "kl" in sums:
            result["eval_indexer_kl"] = sums["kl"] / sums["n_queries"]
            result["eval_indexer_recall"] = sums["hits"] / max(sums["slots"], 1.0)
        return result

    def model(self) -> nnx.Module:
        """A snapshot of the current model, trained weights cast back to the storage dtypes they came in.

        Its arrays are copies: the next step donates (reuses) the training state's buffers.
        """
        params = jax.tree.map(lambda x, dt: jnp.array(x, dtype=dt, copy=True), self.state.params,
                              self._storage_dtypes)
        buffers = jax.tree.map(lambda x: jnp.array(x, copy=True), self.state.buffers)
        return nnx.merge(self.program.graphdef, params, buffers, self.frozen)
