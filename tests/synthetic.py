"""Synthetic DeepSeek-V4 checkpoints in the released formats, built without torch.

`original_tensors(cfg)` lists every tensor of a checkpoint in DeepSeek's own names and HF's
[out, in] layout (docs/checkpoints.md §3, written out here independently of `hf_names`), with random values in the
released storage dtypes. `quantize_tensors` stores the FP8 linears as e4m3 + UE8M0 128×128-block
scales and the routed experts as packed FP4 + UE8M0 per-32-column scales, exactly as released;
`hf_module_names` renames to HF's module names (merged `gate_up_proj`, `weight_scale_inv`).
`dequantize_tensors` is the reference: the exactly dequantized dense weights.
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np

import model1_jax as m1
from model1_jax.config import CSA, HCA
from model1_jax.io.safetensors_file import write
from model1_jax.model import quant

BF16, F32 = np.dtype(jnp.bfloat16), np.dtype(np.float32)

# Every FP8 width is a multiple of the released 128×128 block; indexer q_b (2 heads × 64) has blocks
# that span both heads, o_b / o_a blocks fall inside one output group.
CONFIG = m1.Config(
    vocab_size=256, hidden_size=128, moe_intermediate_size=128, num_hidden_layers=3,
    num_attention_heads=2, head_dim=128, qk_rope_head_dim=32, q_lora_rank=128,
    num_experts_per_tok=2, n_routed_experts=4, max_position_embeddings=4096,
    layer_types=(m1.SLIDING, CSA, HCA), mlp_layer_types=(m1.HASH_MOE, m1.MOE, m1.MOE),
    compress_rate_csa=4, compress_rate_hca=8, hc_mult=2,
    rope_scaling=m1.RopeScaling(factor=16.0, original_max_position_embeddings=256),
    o_groups=2, o_lora_rank=128, sliding_window=8, index_n_heads=2, index_head_dim=64, index_topk=2,
)

# Released storage (docs/checkpoints.md §3, §5): FP8 linears (+ .scale), FP4 routed experts (+ .scale), the rest dense.
FP8_SUFFIXES = (".wq_a.weight", ".wq_b.weight", ".wkv.weight", ".wo_a.weight", ".wo_b.weight", ".e_proj.weight",
                ".h_proj.weight", ".shared_experts.w1.weight", ".shared_experts.w2.weight", ".shared_experts.w3.weight")
FP8_EXCLUDE = (".compressor.wkv.weight",)  # compressor projections stay BF16


def _layer(cfg: m1.Config, prefix: str, layer_type: str, mlp_type: str) -> dict[str, tuple]:
    """name → (shape, dtype, kind) for one decoder layer; kind picks the random distribution."""
    d, n, h, c = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.hc_mult
    q, g, o, e, f = cfg.q_lora_rank, cfg.o_groups, cfg.o_lora_rank, cfg.n_routed_experts, cfg.moe_intermediate_size
    t = {
        "attn_norm.weight": ((d,), BF16, "norm"), "ffn_norm.weight": ((d,), BF16, "norm"),
        "attn.attn_sink": ((n,), F32, "sink"),
        "attn.wq_a.weight": ((q, d), BF16, "w"), "attn.q_norm.weight": ((q,), BF16, "norm"),
        "attn.wq_b.weight": ((n * h, q), BF16, "w"), "attn.wkv.weight": ((h, d), BF16, "w"),
        "attn.kv_norm.weight": ((h,), BF16, "norm"),
        "attn.wo_a.weight": ((g * o, n * h // g), BF16, "w"), "attn.wo_b.weight": ((d, g * o), BF16, "w"),
        "ffn.gate.weight": ((e, d), BF16, "w"),
        "ffn.shared_experts.w1.weight": ((f, d), BF16, "w"), "ffn.shared_experts.w3.weight": ((f, d), BF16, "w"),
        "ffn.shared_experts.w2.weight": ((d, f), BF16, "w"),
    }
    for hc in ("attn", "ffn"):
        t |= {f"hc_{hc}_fn": (((2 + c) * c, c * d), F32, "hc_fn"), f"hc_{hc}_base": (((2 + c) * c,), F32, "hc_base"),
              f"hc_{hc}_scale": ((3,), F32, "hc_scale")}
    if mlp_type == m1.HASH_MOE:
        t["ffn.gate.tid2eid"] = ((cfg.vocab_size, cfg.num_experts_per_tok), np.dtype(np.int64), "tid2eid")
    else:
        t["ffn.gate.bias"] = ((e,), F32, "bias")
    for i in range(e):
        t |= {f"ffn.experts.{i}.w1.weight": ((f, d), BF16, "w"), f"ffn.experts.{i}.w3.weight": ((f, d), BF16, "w"),
              f"ffn.experts.{i}.w2.weight": ((d, f), BF16, "w")}
    if layer_type in (CSA, HCA):
        width = 2 * h if layer_type == CSA else h
        rate = cfg.compress_rate(layer_type)
        t |= {"attn.compressor.wkv.weight": ((width, d), BF16, "w"),
              "attn.compressor.wgate.weight": ((width, d), BF16, "w"),
              "attn.compressor.ape": ((rate, width), F32, "ape"), "attn.compressor.norm.weight": ((h,), BF16, "norm")}
    if layer_type == CSA:
        i, j, rate = cfg.index_n_heads, cfg.index_head_dim, cfg.compress_rate_csa
        t |= {"attn.indexer.compressor.wkv.weight": ((2 * j, d), BF16, "w"),
              "attn.indexer.compressor.wgate.weight": ((2 * j, d), BF16, "w"),
              "attn.indexer.compressor.ape": ((rate, 2 * j), F32, "ape"),
              "attn.indexer.compressor.norm.weight": ((j,), BF16, "norm"),
              "attn.indexer.wq_b.weight": ((i * j, q), BF16, "w"),
              "attn.indexer.weights_proj.weight": ((i, d), BF16, "w")}
    return {prefix + k: v for k, v in t.items()}


def layout(cfg: m1.Config, mtp: bool = True) -> dict[str, tuple]:
    """Every tensor of a checkpoint in DeepSeek's names: name → (shape, dtype, kind)."""
    d, c, v = cfg.hidden_size, cfg.hc_mult, cfg.vocab_size
    t = {"embed.weight": ((v, d), BF16, "w"), "head.weight": ((v, d), BF16, "w"), "norm.weight": ((d,), BF16, "norm"),
         "hc_head_fn": ((c, c * d), F32, "hc_fn"), "hc_head_base": ((c,), F32, "hc_base"),
         "hc_head_scale": ((1,), F32, "hc_scale")}
    for i, (lt, mt) in enumerate(zip(cfg.layer_types, cfg.mlp_layer_types)):
        t |= _layer(cfg, f"layers.{i}.", lt, mt)
    if mtp and cfg.num_nextn_predict_layers:
        t |= {"mtp.0.e_proj.weight": ((d, d), BF16, "w"), "mtp.0.h_proj.weight": ((d, d), BF16, "w"),
              "mtp.0.enorm.weight": ((d,), BF16, "norm"), "mtp.0.hnorm.weight": ((d,), BF16, "norm"),
              "mtp.0.norm.weight": ((d,), BF16, "norm"), "mtp.0.hc_head_fn": ((c, c * d), F32, "hc_fn"),
              "mtp.0.hc_head_base": ((c,), F32, "hc_base"), "mtp.0.hc_head_scale": ((1,), F32, "hc_scale")}
        t |= _layer(cfg, "mtp.0.", cfg.mtp_layer_type, m1.MOE)
    return t


def original_tensors(cfg: m1.Config, seed: int = 0, mtp: bool = True) -> dict[str, np.ndarray]:
    """Random dense tensors (non-degenerate: routing and attention far from uniform)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, (shape, dtype, kind) in layout(cfg, mtp).items():
        if kind == "tid2eid":
            value = np.stack([rng.permutation(cfg.n_routed_experts)[: shape[1]] for _ in range(shape[0])])
        else:
            mean, std = {"norm": (1.0, 0.2), "hc_scale": (1.0, 0.3), "hc_base": (0.0, 0.5), "hc_fn": (0.0, 0.05),
                         "sink": (0.0, 1.0), "ape": (0.0, 0.5), "bias": (0.0, 0.1), "w": (0.0, 0.1)}[kind]
            value = mean + std * rng.standard_normal(shape, dtype=np.float32)
        out[name] = value.astype(dtype)
    return out


def is_fp8(name: str) -> bool:
    return name.endswith(FP8_SUFFIXES) and not name.endswith(FP8_EXCLUDE)


def is_fp4(name: str) -> bool:
    return ".experts." in name and ".shared_experts." not in name


def quantize_tensors(tensors: dict[str, np.ndarray], fp8_block=(128, 128)) -> dict[str, np.ndarray]:
    """DeepSeek-named dense tensors → released storage: `X.weight` (e4m3 / packed e2m1 as I8) + `X.scale`."""
    out = {}
    for name, w in tensors.items():
        if is_fp8(name):
            q = quant.quantize(w, quant.FP8, fp8_block)
        elif is_fp4(name):
            q = quant.quantize(w, quant.FP4, quant.FP4_BLOCK, pack_axis=1)
        else:
            out[name] = w
            continue
        out[name] = q.values.view(np.int8) if q.fmt == quant.FP4 else q.values
        out[name[: -len(".weight")] + ".scale"] = q.scales
    return out


def dequantize_tensors(stored: dict[str, np.ndarray], fp8_block=(128, 128)) -> dict[str, np.ndarray]:
    """Released storage → the exactly dequantized dense float32 tensors (what the checkpoint means)."""
    out = {}
    for name, w in stored.items():
        if name.endswith(".scale") and name[: -len(".scale")] + ".weight" in stored:
            continue
        scale = stored.get(name[: -len(".weight")] + ".scale") if name.endswith(".weight") else None
        if scale is None:
            out[name] = w.astype(np.float32) if w.dtype.kind == "f" else w
        elif w.dtype == quant.E4M3:
            out[name] = quant.BlockQuantized(w, scale, quant.FP8, fp8_block).dequantize(np.float32)
        else:
            q = quant.BlockQuantized(w.view(np.uint8), scale, quant.FP4, quant.FP4_BLOCK, pack_axis=1)
            out[name] = q.dequantize(np.float32)
    return out


def hf_module_names(stored: dict[str, np.ndarray], cfg: m1.Config) -> dict[str, np.ndarray]:
    """DeepSeek names → HF module names (as `DeepseekV4ForCausalLM.state_dict()` has them): renamed keys,
    routed experts merged into `gate_up_proj` [e, 2f, d] / `down_proj` [e, d, f], scales as
    `weight_scale_inv` (`gate_up_proj_scale_inv` for the merged experts). MTP tensors are dropped (HF has none)."""
    from model1_jax.io.names import canonical_name

    out, experts = {}, {}
    for name, value in stored.items():
        if name.startswith("mtp."):
            continue
        parts = name.split(".")
        if ".experts." in name and ".shared_experts." not in name:  # layers.{i}.ffn.experts.{e}.w{k}.{weight|scale}
            experts[(int(parts[1]), parts[5], parts[6], int(parts[4]))] = value
            continue
        is_scale = name.endswith(".scale") and name[: -len(".scale")] + ".weight" in stored
        key = canonical_name(name[: -len(".scale")] + ".weight") + "_scale_inv" if is_scale else canonical_name(name)
        out[key if key == "lm_head.weight" else "model." + key] = value
    for layer in sorted({k[0] for k in experts}):
        for kind in ("weight", "scale"):
            if (layer, "w1", kind, 0) not in experts:
                continue
            stack = {w: np.stack([experts[(layer, w, kind, e)] for e in range(cfg.n_routed_experts)])
                     for w in ("w1", "w2", "w3")}
            suffix = "" if kind == "weight" else "_scale_inv"
            gate_up = np.concatenate([stack["w1"], stack["w3"]], axis=1)
            out[f"model.layers.{layer}.mlp.experts.gate_up_proj{suffix}"] = gate_up
            out[f"model.layers.{layer}.mlp.experts.down_proj{suffix}"] = stack["w2"]
    return out


QUANTIZATION_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                       "weight_block_size": [128, 128], "scale_fmt": "ue8m0", "expert_dtype": "fp4"}


def write_checkpoint(path, cfg: m1.Config, tensors: dict[str, np.ndarray], shards: int = 1,
                     quantization_config: dict | None = None) -> str:
    """config.json + `shards` safetensors files of about equal size (+ index json when sharded)."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    config = cfg.to_hf()
    if quantization_config:
        config["quantization_config"] = quantization_config
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    names = list(tensors)
    total = sum(t.nbytes for t in tensors.values())
    groups, current, size = [], [], 0
    for name in names:
        current.append(name)
        size += tensors[name].nbytes
        if size >= total * (len(groups) + 1) / shards and len(groups) < shards - 1:
            groups.append(current)
            current = []
    groups.append(current)
    groups = [g for g in groups if g]
    if len(groups) == 1:
        write(os.path.join(path, "model.safetensors"), tensors)
        return path
    weight_map = {}
    for k, group in enumerate(groups):
        file = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        write(os.path.join(path, file), {n: tensors[n] for n in group})
        weight_map.update(dict.fromkeys(group, file))
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    return path


def random_stored_tensors(cfg: m1.Config, seed: int = 0, mtp: bool = True) -> dict[str, np.ndarray]:
    """Released-format tensors with random codes and scales (no quantization pass: fast at any size)."""
    rng = np.random.default_rng(seed)
    finite_e4m3 = np.array([b for b in range(256) if b & 0x7F != 0x7F], np.uint8)
    out = {}
    for name, (shape, dtype, kind) in layout(cfg, mtp).items():
        if is_fp8(name) or is_fp4(name):
            block = (128, 128) if is_fp8(name) else quant.FP4_BLOCK
            out[name[: -len(".weight")] + ".scale"] = rng.integers(118, 128, quant.scale_shape(shape, block),
                                                                   dtype=np.uint8).view(quant.E8M0)
            if is_fp8(name):
                out[name] = rng.choice(finite_e4m3, shape).view(quant.E4M3)
            else:
                out[name] = rng.integers(0, 256, (shape[0], shape[1] // 2), dtype=np.uint8).view(np.int8)
        elif kind == "tid2eid":
            out[name] = np.stack([rng.permutation(cfg.n_routed_experts)[: shape[1]] for _ in range(shape[0])])
        else:
            out[name] = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
    return out
