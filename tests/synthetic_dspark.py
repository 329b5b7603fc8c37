"""Synthetic checkpoints in the official 0731 / 0813 layout: the preview trunk plus a three-stage DSpark drafter.

What a released V4-Flash-0731 / V4-Pro-0813 directory holds (docs/dspark.md §2–§3), at toy sizes:
* DeepSeek's own names (`embed.weight`, `layers.N.attn.wq_a.weight` + `.scale`, ...), FP8 e4m3 linears with
  UE8M0 128×128 block scales, routed experts as packed FP4 (I8) with one UE8M0 scale per 32 columns;
* `mtp.{0,1,2}.*`: three sliding-window, score-routed V4 blocks; stage 0 adds `main_proj` (FP8) / `main_norm`,
  the last stage `norm`, `hc_head_*`, `markov_head.markov_w{1,2}`, `confidence_head.proj` (all dense);
* `config.json` with the released keys (no `layer_types`: the schedule is `compress_ratios`, L + 3 entries, the
  stages' entries 0), `num_nextn_predict_layers` still 1, the four `dspark_*` keys, top-level `expert_dtype`;
* sharded safetensors with an index; the trunk's shards first, then one shard per stage holding nothing else.

Trunk tensors, their random values, the FP8/FP4 storage and its exact dequantization come from `tests.synthetic`
(the preview-layout writer); only the drafter's tensors and the released file layout are added here. The
safetensors files are written by a few lines of this module, independent of the package's own writer.
"""

from __future__ import annotations

import json
import math
import os
import struct

import jax.numpy as jnp
import numpy as np

import model1_jax as m1
from tests import synthetic as syn

BF16, F32 = np.dtype(jnp.bfloat16), np.dtype(np.float32)
TRUNK = syn.CONFIG  # 3 layers (sliding, CSA, HCA), hidden 128, hc_mult 2, vocab 256
# Tiny drafter settings in the released keys (V4-Flash: 5, 128799, [40, 41, 42], 256).
DSPARK = {"dspark_block_size": 5, "dspark_noise_token_id": 253, "dspark_target_layer_ids": [0, 1, 2],
          "dspark_markov_rank": 16}
NUM_STAGES = 3
# Tensors of the preview MTP block that a DSpark stage does not have (its combiner and head).
PREVIEW_ONLY = ("e_proj.weight", "h_proj.weight", "enorm.weight", "hnorm.weight", "norm.weight", "hc_head_fn",
                "hc_head_base", "hc_head_scale")
_RATIO = {m1.SLIDING: 0, m1.CSA: 4, m1.HCA: 128}
_ST_DTYPES = {BF16: "BF16", F32: "F32", np.dtype(np.int8): "I8", np.dtype(np.int64): "I64",
              np.dtype(jnp.float8_e4m3fn): "F8_E4M3", np.dtype(jnp.float8_e8m0fnu): "F8_E8M0"}


# ------------------------------------------------------------------------------------------------------
# Tensor inventory (dense DeepSeek names → shape, dtype, kind)


def _stage_block(cfg: m1.Config) -> dict[str, tuple]:
    """The tensors every stage has, names relative to `mtp.s.`: a full sliding-window, score-routed V4 block
    (the preview MTP block's layer, without its combiner and head)."""
    preview = syn.layout(cfg.replace(num_nextn_predict_layers=1, mtp_layer_type=m1.SLIDING), mtp=True)
    block = {k[len("mtp.0."):]: v for k, v in preview.items() if k.startswith("mtp.0.")}
    return {k: v for k, v in block.items() if k not in PREVIEW_ONLY}


def stage_layout(cfg: m1.Config, dspark: dict = DSPARK, num_stages: int = NUM_STAGES) -> dict[str, tuple]:
    """Every dense drafter tensor `mtp.s.*`: name → (shape, dtype, kind)."""
    d, c, v = cfg.hidden_size, cfg.hc_mult, cfg.vocab_size
    rank, k = dspark["dspark_markov_rank"], len(dspark["dspark_target_layer_ids"])
    out = {}
    for s in range(num_stages):
        out |= {f"mtp.{s}.{name}": spec for name, spec in _stage_block(cfg).items()}
    out |= {"mtp.0.main_proj.weight": ((d, k * d), BF16, "w"), "mtp.0.main_norm.weight": ((d,), BF16, "norm")}
    last = f"mtp.{num_stages - 1}."
    out |= {last + "norm.weight": ((d,), BF16, "norm"), last + "hc_head_fn": ((c, c * d), F32, "hc_fn"),
            last + "hc_head_base": ((c,), F32, "hc_base"), last + "hc_head_scale": ((1,), F32, "hc_scale"),
            last + "markov_head.markov_w1.weight": ((v, rank), BF16, "w"),
            last + "markov_head.markov_w2.weight": ((v, rank), BF16, "w"),
            last + "confidence_head.proj.weight": ((1, d + rank), BF16, "w")}
    return out


def is_fp8(name: str) -> bool:
    return syn.is_fp8(name) or name.endswith(".main_proj.weight")


def storage_layout(dense: dict[str, tuple], fp8_block: int = 128) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """What the released files hold for a dense layout: name → (shape, dtype), FP8 / FP4 weights with `.scale`."""
    e4m3, e8m0 = np.dtype(jnp.float8_e4m3fn), np.dtype(jnp.float8_e8m0fnu)
    out = {}
    for name, (shape, dtype, _) in dense.items():
        if is_fp8(name):
            out[name] = (shape, e4m3)
            out[name[: -len(".weight")] + ".scale"] = (tuple(-(-n // fp8_block) for n in shape), e8m0)
        elif syn.is_fp4(name):
            out[name] = ((shape[0], shape[1] // 2), np.dtype(np.int8))
            out[name[: -len(".weight")] + ".scale"] = ((shape[0], -(-shape[1] // 32)), e8m0)
        else:
            out[name] = (shape, dtype)
    return out


# ------------------------------------------------------------------------------------------------------
# Values


def _random(shape, dtype, kind: str, rng: np.random.Generator) -> np.ndarray:
    mean, std = {"norm": (1.0, 0.2), "hc_scale": (1.0, 0.3), "hc_base": (0.0, 0.5), "hc_fn": (0.0, 0.05),
                 "w": (0.0, 0.1)}[kind]
    return (mean + std * rng.standard_normal(shape, dtype=np.float32)).astype(dtype)


def original_tensors(cfg: m1.Config = TRUNK, dspark: dict = DSPARK, seed: int = 0, num_stages: int = NUM_STAGES,
                     drafter: bool = True) -> dict[str, np.ndarray]:
    """Dense tensors of a 0731-layout checkpoint: the trunk (`tests.synthetic`), then the stages' tensors."""
    out = syn.original_tensors(cfg, seed=seed, mtp=False)
    if not drafter:
        return out
    preview_cfg = cfg.replace(num_nextn_predict_layers=1, mtp_layer_type=m1.SLIDING)
    for s in range(num_stages):  # each stage's block: the preview writer's MTP layer, drawn with its own seed
        preview = syn.original_tensors(preview_cfg, seed=seed + 1 + s, mtp=True)
        out |= {f"mtp.{s}.{k[len('mtp.0.'):]}": v for k, v in preview.items()
                if k.startswith("mtp.0.") and k[len("mtp.0."):] not in PREVIEW_ONLY}
    rng = np.random.default_rng(seed + 1 + num_stages)
    for name, (shape, dtype, kind) in stage_layout(cfg, dspark, num_stages).items():
        if name not in out:  # main_proj / main_norm, the head, Markov and confidence tensors
            out[name] = _random(shape, dtype, kind, rng)
    return out


def quantize_tensors(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Released storage (`tests.synthetic.quantize_tensors`), plus `main_proj` in FP8 like the other linears."""
    plain = {k: v for k, v in tensors.items() if not k.endswith(".main_proj.weight")}
    out = syn.quantize_tensors(plain)
    for name in tensors.keys() - plain.keys():
        # Quantized under a name the preview writer stores as FP8, then renamed: one quantizer for every linear.
        q = syn.quantize_tensors({"_.wq_a.weight": tensors[name]})
        out[name], out[name[: -len(".weight")] + ".scale"] = q["_.wq_a.weight"], q["_.wq_a.scale"]
    return {k: out[k] for k in sorted(out, key=_file_order)}


dequantize_tensors = syn.dequantize_tensors  # exact value · scale for every stored weight, main_proj included


# ------------------------------------------------------------------------------------------------------
# config.json


def released_config(cfg: m1.Config = TRUNK, dspark: dict | None = DSPARK, num_stages: int = NUM_STAGES) -> dict:
    """config.json as DeepSeek writes it (keys of the released V4 files), for a trunk `cfg` and a drafter.

    `dspark=None` writes the preview's config (one MTP entry in `compress_ratios`, no `dspark_*` keys).
    """
    n_hash = cfg.mlp_layer_types.count(m1.HASH_MOE)
    if cfg.mlp_layer_types[:n_hash] != (m1.HASH_MOE,) * n_hash:
        raise ValueError("released configs describe hash layers as a leading count (num_hash_layers)")
    extra = [0] * num_stages if dspark is not None else [_RATIO[cfg.mtp_layer_type]]
    scaling = cfg.rope_scaling
    out = {
        "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "moe_intermediate_size": cfg.moe_intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": 1, "head_dim": cfg.head_dim, "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "q_lora_rank": cfg.q_lora_rank, "o_groups": cfg.o_groups, "o_lora_rank": cfg.o_lora_rank,
        "n_routed_experts": cfg.n_routed_experts, "n_shared_experts": 1, "num_experts_per_tok": cfg.num_experts_per_tok,
        "scoring_func": cfg.scoring_func, "topk_method": "noaux_tc", "norm_topk_prob": True,
        "routed_scaling_factor": cfg.routed_scaling_factor, "swiglu_limit": cfg.swiglu_limit, "hidden_act": "silu",
        "index_n_heads": cfg.index_n_heads, "index_head_dim": cfg.index_head_dim, "index_topk": cfg.index_topk,
        "sliding_window": cfg.sliding_window,
        "compress_ratios": [_RATIO[t] for t in cfg.layer_types] + extra,
        # The released files leave the per-type rates at HF's defaults (4, 128); tiny configs need their own.
        "compress_rates": {m1.CSA: cfg.compress_rate_csa, m1.HCA: cfg.compress_rate_hca},
        "compress_rope_theta": cfg.compress_rope_theta, "rope_theta": cfg.rope_theta,
        "rope_scaling": None if scaling is None else {
            "type": "yarn", "factor": scaling.factor, "beta_fast": scaling.beta_fast, "beta_slow": scaling.beta_slow,
            "original_max_position_embeddings": scaling.original_max_position_embeddings},
        "hc_mult": cfg.hc_mult, "hc_sinkhorn_iters": cfg.hc_sinkhorn_iters, "hc_eps": cfg.hc_eps,
        "rms_norm_eps": cfg.rms_norm_eps, "max_position_embeddings": cfg.max_position_embeddings,
        "num_hash_layers": n_hash, "num_nextn_predict_layers": 1,  # still 1 in 0731, though it ships no MTP block
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "expert_dtype": "fp4",
        "quantization_config": {k: v for k, v in syn.QUANTIZATION_CONFIG.items() if k != "expert_dtype"},
    }
    return out | (dspark or {})


# ------------------------------------------------------------------------------------------------------
# Files


def _file_order(name: str) -> tuple:
    """Trunk first, then the stages in order (the released shards keep `mtp.*` to the last files)."""
    return (int(name.split(".")[1]) + 1 if name.startswith("mtp.") else 0,)


def write_safetensors(path: str, tensors: dict[str, np.ndarray]) -> None:
    """The safetensors format: u64 header length, JSON header (padded to 8 bytes), raw little-endian data."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, value in tensors.items():
        nbytes = value.nbytes
        header[name] = {"dtype": _ST_DTYPES[np.dtype(value.dtype)], "shape": list(value.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for value in tensors.values():
            f.write(np.ascontiguousarray(value).tobytes())


def write_released(path, config: dict, tensors: dict[str, np.ndarray], trunk_shards: int = 2,
                   inference_config: bool = True) -> str:
    """config.json, sharded safetensors (`trunk_shards` files for the trunk by size, then one per stage) and
    `model.safetensors.index.json`; with `inference_config`, DeepSeek's `inference/config.json` holding the stage
    count (`n_mtp_layers`, the one key of that file the loader cross-checks)."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    trunk = [n for n in tensors if not n.startswith("mtp.")]
    stages = sorted({int(n.split(".")[1]) for n in tensors if n.startswith("mtp.")})
    groups, total, size, current = [], sum(tensors[n].nbytes for n in trunk), 0, []
    for name in trunk:
        current.append(name)
        size += tensors[name].nbytes
        if size >= total * (len(groups) + 1) / trunk_shards and len(groups) < trunk_shards - 1:
            groups.append(current)
            current = []
    groups = [g for g in [*groups, current] if g]
    groups += [[n for n in tensors if n.startswith(f"mtp.{s}.")] for s in stages]
    weight_map = {}
    for i, group in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        write_safetensors(os.path.join(path, file), {n: tensors[n] for n in group})
        weight_map |= dict.fromkeys(group, file)
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    if inference_config and stages:
        os.makedirs(os.path.join(path, "inference"), exist_ok=True)
        with open(os.path.join(path, "inference", "config.json"), "w") as f:
            json.dump({"n_mtp_layers": len(stages)}, f)
    return path


# ------------------------------------------------------------------------------------------------------
# Variants a loader must tell apart (docs/dspark.md §4)


def without_drafter(stored: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A fine-tune of 0731: the `dspark_*` keys stay in config.json, every `mtp.*` tensor is gone."""
    return {k: v for k, v in stored.items() if not k.startswith("mtp.")}


def vision_exp(config: dict, stored: dict[str, np.ndarray], seed: int = 0) -> tuple[dict, dict[str, np.ndarray]]:
    """The Vision-Exp variant's additions: `vision_*` config keys, `vision.*` / `aligner.*` / `image_*` tensors and a
    routing bias for image tokens (`ffn.gate.bias_vl`) in each stage. The same `architectures` string."""
    rng = np.random.default_rng(seed)
    d = config["hidden_size"]
    extra = {"vision.blocks.0.attn.qkv.weight": rng.standard_normal((3 * 16, 16)).astype(BF16),
             "aligner.proj.weight": rng.standard_normal((d, 16)).astype(BF16),
             "image_newline": rng.standard_normal((d,)).astype(BF16)}
    stages = sorted({int(n.split(".")[1]) for n in stored if n.startswith("mtp.")})
    extra |= {f"mtp.{s}.ffn.gate.bias_vl": np.zeros((config["n_routed_experts"],), F32) for s in stages}
    return config | {"vision_config": {"hidden_size": 16, "num_hidden_layers": 1}}, stored | extra


def v41_markov_names(stored: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """V4.1's names for the Markov head (`markov_head.embed` / `markov_head.head`): a different architecture."""
    rename = {"markov_head.markov_w1.weight": "markov_head.embed.weight",
              "markov_head.markov_w2.weight": "markov_head.head.weight"}
    out = {}
    for name, value in stored.items():
        for old, new in rename.items():
            name = name.replace(old, new)
        out[name] = value
    return out


def write_dspark_checkpoint(path, *, cfg: m1.Config = TRUNK, dspark: dict = DSPARK, seed: int = 0,
                            num_stages: int = NUM_STAGES, trunk_shards: int = 2) -> tuple[str, dict[str, np.ndarray]]:
    """A complete 0731-layout directory; returns (path, the stored tensors) — `dequantize_tensors(stored)` is
    exactly what the checkpoint means."""
    stored = quantize_tensors(original_tensors(cfg, dspark, seed, num_stages))
    return write_released(path, released_config(cfg, dspark, num_stages), stored, trunk_shards), stored


def count_by_dtype(layout: dict[str, tuple]) -> dict[str, int]:
    """Tensor count per safetensors dtype name of a `storage_layout`."""
    out: dict[str, int] = {}
    for _, dtype in layout.values():
        out[_ST_DTYPES[np.dtype(dtype)]] = out.get(_ST_DTYPES[np.dtype(dtype)], 0) + 1
    return out


def nbytes(layout: dict[str, tuple]) -> int:
    return sum(math.prod(shape) * np.dtype(dtype).itemsize for shape, dtype in layout.values())


def agree(model, sequences, strength=100.0, wrong_after: int | None = None):
    """Sets the Markov head so that the draft after token a is f(a), f read off `sequences` (first successor wins):
    markov_w1[a] = strength · u_f(a), markov_w2 = u (unit rows), so the bias peaks at f(a) by a wide margin.
    `wrong_after`: f(a) for the token at that index of the first sequence is replaced by another token."""
    v, r = model.config.vocab_size, model.config.dspark.markov_rank
    u = np.random.default_rng(0).standard_normal((v, r))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    successor = {}
    for seq in sequences:
        for a, b in zip(seq, seq[1:]):
            successor.setdefault(a, b)
    if wrong_after is not None:
        a = sequences[0][wrong_after]
        successor[a] = (successor[a] + 1) % v
    w1 = np.zeros((v, r))
    for a, b in successor.items():
        w1[a] = strength * u[b]
    model.dspark.markov_w1.set_value(jnp.asarray(w1, jnp.float32))
    model.dspark.markov_w2.kernel.set_value(jnp.asarray(u.T, jnp.float32))
