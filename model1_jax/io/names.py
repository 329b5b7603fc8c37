"""Checkpoint tensor names → model parameters (docs/checkpoints.md §1–6).

Three naming schemes occur in the wild, all handled by first canonicalising to HF module names:
* HF module names      `model.layers.0.self_attn.q_a_proj.weight`, `lm_head.weight`, merged experts;
* DeepSeek's originals `layers.0.attn.wq_a.weight`, `head.weight`, `hc_head_fn`, per-expert
                       `ffn.experts.{e}.w1.weight`, and under `mtp.*` either the preview's MTP block
                       (`mtp.0.*`) or the DSpark drafter's stages (`mtp.{s}.*`, docs/dspark.md §3) —
                       which one is decided from the names first (`io.schema`) and passed as `drafter`;
* what transformers 5.23 `save_pretrained` writes: the originals with a `model.` prefix, except
  `model.embed_tokens.weight` / `model.hc_head.hc_fn`, and `attn.norm` for the attention kv_norm.

Each canonical name then maps to one or more `Slot`s: a parameter path in `Model1`, an optional
expert index (per-expert tensors fill one row of a stacked parameter), and a layout `kind` that
says how HF's `[out, in]` storage becomes the model's input-axes-first layout.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

# Original / HF-saved → HF module names, applied in order (docs/checkpoints.md §2; anchored where a bare
# substring would also match unrelated keys, e.g. `mtp.0.norm.weight` is not a kv_norm).
_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^embed\.weight$", "embed_tokens.weight"),
    (r"^head\.weight$", "lm_head.weight"),
    (r"(^|\.)hc_head_(fn|base|scale)$", r"\1hc_head.hc_\2"),
    (r"\.hc_(attn|ffn)_(fn|base|scale)$", r".\1_hc.\2"),
    (r"\.attn_norm\.", ".input_layernorm."),
    (r"\.ffn_norm\.", ".post_attention_layernorm."),
    (r"\.attn\.", ".self_attn."),
    (r"\.ffn\.", ".mlp."),
    (r"\.indexer\.compressor\.", ".compressor.indexer."),
    (r"\.indexer\.weights_proj\.", ".compressor.indexer.scorer.weights_proj."),
    (r"\.indexer\.wq_b\.", ".compressor.indexer.q_b_proj."),
    (r"\.attn_sink$", ".sinks"),
    (r"\.(compressor|indexer|self_attn)\.norm\.", r".\1.kv_norm."),
    (r"\.ape$", ".position_bias"),
    (r"\.wq_a\.", ".q_a_proj."),
    (r"\.wq_b\.", ".q_b_proj."),
    (r"\.wkv\.", ".kv_proj."),
    (r"\.wgate\.", ".gate_proj."),
    (r"\.wo_a\.", ".o_a_proj."),
    (r"\.wo_b\.", ".o_b_proj."),
    (r"\.q_norm\.", ".q_a_norm."),
    (r"\.gate\.bias$", ".gate.e_score_correction_bias"),
    (r"\.shared_experts\.w1\.", ".shared_experts.gate_proj."),
    (r"\.shared_experts\.w2\.", ".shared_experts.down_proj."),
    (r"\.shared_experts\.w3\.", ".shared_experts.up_proj."),
)
_RENAMES_RE = tuple((re.compile(p), r) for p, r in _RENAMES)
_DSPARK_STAGE_RE = re.compile(r"^mtp\.(\d+)\.")

def canonical_name(name: str, drafter: str = "mtp") -> str:
    """Any of the three schemes → HF module names without the `model.` prefix. Under `mtp.*`: with
    drafter="mtp" (the preview's block) `mtp.0.` → `mtp.`; with drafter="dspark" `mtp.{s}.` → `dspark.stages.{s}.`."""
    if name.startswith("model."):
        name = name[len("model."):]
    if drafter == "dspark":
        name = _DSPARK_STAGE_RE.sub(r"dspark.stages.\1.", name)
    elif name.startswith("mtp.0."):
        name = "mtp." + name[len("mtp.0."):]
    for pattern, replacement in _RENAMES_RE:
        name = pattern.sub(replacement, name)
    return name


def scale_owner(name: str) -> str | None:
    """The weight a block-scale name belongs to (same naming scheme), or None if it is not one.

    FP8/FP4 block scales (docs/checkpoints.md §2, §5) ride next to their weight as `X.scale` (DeepSeek),
    `X.weight_scale_inv` (HF's FP8 quantizer; a multiplier despite the name), or
    `mlp.experts.gate_up_proj_scale_inv` for HF's merged expert tensors, which have no `.weight` suffix.

    `X.scale` is ambiguous: mHC parameters are also called `scale`, so the caller must check that the
    returned weight exists (`X.weight`) before treating `X.scale` as a block scale.
    """
    if name.endswith("_scale_inv"):  # `X.weight_scale_inv` → `X.weight`; `…_proj_scale_inv` → `…_proj`
        return name[: -len("_scale_inv")]
    if name.endswith(".scale"):
        return name[: -len(".scale")] + ".weight"
    return None


@dataclasses.dataclass(frozen=True)
class Slot:
    """Where (part of) a checkpoint tensor lands in the model.

    kind:  copy      same layout (also the routed experts' [out, in] matrices, which the model keeps as
                     stored: one expert's slice of [e, out, in], or HF's stacked [e, out, in] whole)
           linear    [out, in] → transpose, then reshape to the parameter (first `n_in` axes = in)
           grouped   o_a_proj [g·o, m·h] → [g, m, h, o]
           reshape   [m, p·c] → [m, p, c] (position biases)
           gate/up   half of HF's merged gate_up_proj [e, 2f, d]: its first / last f rows, [e, f, d]
           index     integer table, cast to int32
    """

    path: tuple
    kind: str
    n_in: int = 1
    expert: int | None = None


# Rules on layer-relative canonical names: regex → (path suffix template, kind, n_in).
_LAYER_RULES: tuple[tuple[str, tuple, str, int], ...] = (
    (r"(input_layernorm|post_attention_layernorm)\.weight", ("{0}", "weight"), "copy", 1),
    (r"(attn_hc|ffn_hc)\.fn", ("{0}", "fn"), "linear", 2),
    (r"(attn_hc|ffn_hc)\.(base|scale)", ("{0}", "{1}"), "copy", 1),
    (r"self_attn\.sinks", ("self_attn", "sinks"), "copy", 1),
    (r"self_attn\.(q_a_proj|q_b_proj|kv_proj)\.weight", ("self_attn", "{0}", "kernel"), "linear", 1),
    (r"self_attn\.o_b_proj\.weight", ("self_attn", "o_b_proj", "kernel"), "linear", 2),
    (r"self_attn\.o_a_proj\.weight", ("self_attn", "o_a_proj", "kernel"), "grouped", 3),
    (r"self_attn\.(q_a_norm|kv_norm)\.weight", ("self_attn", "{0}", "weight"), "copy", 1),
    (r"self_attn\.compressor\.(kv_proj|gate_proj)\.weight", ("self_attn", "compressor", "{0}", "kernel"),
     "linear", 1),
    (r"self_attn\.compressor\.position_bias", ("self_attn", "compressor", "position_bias"), "reshape", 1),
    (r"self_attn\.compressor\.kv_norm\.weight", ("self_attn", "compressor", "kv_norm", "weight"), "copy", 1),
    (r"self_attn\.compressor\.indexer\.(kv_proj|gate_proj)\.weight",
     ("self_attn", "indexer", "compressor", "{0}", "kernel"), "linear", 1),
    (r"self_attn\.compressor\.indexer\.position_bias", ("self_attn", "indexer", "compressor", "position_bias"),
     "reshape", 1),
    (r"self_attn\.compressor\.indexer\.kv_norm\.weight", ("self_attn", "indexer", "compressor", "kv_norm", "weight"),
     "copy", 1),
    (r"self_attn\.compressor\.indexer\.q_b_proj\.weight", ("self_attn", "indexer", "q_b_proj", "kernel"), "linear", 1),
    (r"self_attn\.compressor\.indexer\.scorer\.weights_proj\.weight",
     ("self_attn", "indexer", "weights_proj", "kernel"),
     "linear", 1),
    (r"mlp\.gate\.weight", ("mlp", "gate", "kernel"), "linear", 1),
    (r"mlp\.gate\.e_score_correction_bias", ("mlp", "gate", "e_score_correction_bias"), "copy", 1),
    (r"mlp\.gate\.tid2eid", ("mlp", "gate", "tid2eid"), "index", 1),
    (r"mlp\.experts\.down_proj", ("mlp", "experts", "down_proj"), "copy", 1),
    (r"mlp\.shared_experts\.(gate_proj|up_proj|down_proj)\.weight", ("mlp", "shared_experts", "{0}", "kernel"),
     "linear", 1),
)
_LAYER_RULES_RE = tuple((re.compile(p + "$"), path, kind, n_in) for p, path, kind, n_in in _LAYER_RULES)
_EXPERT_RE = re.compile(r"mlp\.experts\.(\d+)\.(w1|w2|w3)\.weight$")
_EXPERT_PARAM = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}

_GLOBAL_RULES = {
    "embed_tokens.weight": (("embed_tokens", "embedding"), "copy", 1),
    "norm.weight": (("norm", "weight"), "copy", 1),
    "hc_head.hc_fn": (("hc_head", "hc_fn"), "linear", 2),
    "hc_head.hc_base": (("hc_head", "hc_base"), "copy", 1),
    "hc_head.hc_scale": (("hc_head", "hc_scale"), "copy", 1),
    "lm_head.weight": (("lm_head", "kernel"), "linear", 1),
}
_MTP_RULES = {
    "e_proj.weight": (("mtp", "e_proj", "kernel"), "linear", 1),
    "h_proj.weight": (("mtp", "h_proj", "kernel"), "linear", 1),
    "enorm.weight": (("mtp", "enorm", "weight"), "copy", 1),
    "hnorm.weight": (("mtp", "hnorm", "weight"), "copy", 1),
    "norm.weight": (("mtp", "norm", "weight"), "copy", 1),
    "hc_head.hc_fn": (("mtp", "hc_head", "hc_fn"), "linear", 2),
    "hc_head.hc_base": (("mtp", "hc_head", "hc_base"), "copy", 1),
    "hc_head.hc_scale": (("mtp", "hc_head", "hc_scale"), "copy", 1),
}
# The drafter's own tensors (docs/dspark.md §3.1), named relative to their stage: main_proj / main_norm live in
# stage 0 and the heads in the last stage (`io.schema` checks that), the rest of a stage is a decoder layer.
_DSPARK_RULES = {
    "main_proj.weight": (("dspark", "main_proj", "kernel"), "linear", 1),
    "main_norm.weight": (("dspark", "main_norm", "weight"), "copy", 1),
    "norm.weight": (("dspark", "norm", "weight"), "copy", 1),
    "hc_head.hc_fn": (("dspark", "hc_head", "hc_fn"), "linear", 2),
    "hc_head.hc_base": (("dspark", "hc_head", "hc_base"), "copy", 1),
    "hc_head.hc_scale": (("dspark", "hc_head", "hc_scale"), "copy", 1),
    "markov_head.markov_w1.weight": (("dspark", "markov_w1"), "copy", 1),
    "markov_head.markov_w2.weight": (("dspark", "markov_w2", "kernel"), "linear", 1),
    "confidence_head.proj.weight": (("dspark", "confidence", "kernel"), "linear", 1),
}
_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")
_DSPARK_RE = re.compile(r"^dspark\.stages\.(\d+)\.(.+)$")


def _layer_slots(prefix: tuple, rest: str) -> list[Slot]:
    if rest == "mlp.experts.gate_up_proj":
        return [Slot((*prefix, "mlp", "experts", "gate_proj"), "gate"),
                Slot((*prefix, "mlp", "experts", "up_proj"), "up")]
    m = _EXPERT_RE.match(rest)
    if m:
        return [Slot((*prefix, "mlp", "experts", _EXPERT_PARAM[m.group(2)]), "copy", 1, int(m.group(1)))]
    for pattern, template, kind, n_in in _LAYER_RULES_RE:
        m = pattern.match(rest)
        if m:
            return [Slot((*prefix, *(part.format(*m.groups()) for part in template)), kind, n_in)]
    return []


def slots_for(name: str, drafter: str = "mtp") -> list[Slot]:
    """Model slots that a checkpoint tensor fills; empty if the name is not a model tensor. `drafter` says what
    `mtp.*` holds, as in `canonical_name`."""
    name = canonical_name(name, drafter)
    if name in _GLOBAL_RULES:
        path, kind, n_in = _GLOBAL_RULES[name]
        return [Slot(path, kind, n_in)]
    m = _LAYER_RE.match(name)
    if m:
        return _layer_slots(("layers", int(m.group(1))), m.group(2))
    if name.startswith("mtp."):
        rest = name[len("mtp."):]
        if rest in _MTP_RULES:
            path, kind, n_in = _MTP_RULES[rest]
            return [Slot(path, kind, n_in)]
        return _layer_slots(("mtp", "layer"), rest)
    m = _DSPARK_RE.match(name)
    if m:
        if m.group(2) in _DSPARK_RULES:
            path, kind, n_in = _DSPARK_RULES[m.group(2)]
            return [Slot(path, kind, n_in)]
        return _layer_slots(("dspark", "stages", int(m.group(1))), m.group(2))
    return []


def source_shape(slot: Slot, target_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The checkpoint tensor shape that fills `target_shape` through `slot` (dense, unpacked)."""
    shape = target_shape[1:] if slot.expert is not None else target_shape
    if slot.kind in ("copy", "index"):
        return shape
    if slot.kind == "linear":
        return (math.prod(shape[slot.n_in:]), math.prod(shape[:slot.n_in]))
    if slot.kind == "grouped":
        g, m, h, o = shape
        return (g * o, m * h)
    if slot.kind == "reshape":
        return (shape[0], math.prod(shape[1:]))
    if slot.kind in ("gate", "up"):
        e, f, d = shape
        return (e, 2 * f, d)
    raise ValueError(f"unknown slot kind {slot.kind!r}")


def to_model_arrangement(slot: Slot, array: np.ndarray, target_shape: tuple[int, ...]) -> np.ndarray:
    """Rearranges a checkpoint tensor into the model's layout (without the expert axis for per-expert slots)."""
    shape = target_shape[1:] if slot.expert is not None else target_shape
    if slot.kind in ("copy", "index"):
        return array.reshape(shape)
    if slot.kind == "linear":
        return array.T.reshape(shape)
    if slot.kind == "grouped":
        g, m, h, o = shape
        return array.reshape(g, o, m, h).transpose(0, 2, 3, 1)
    if slot.kind == "reshape":
        return array.reshape(shape)
    if slot.kind in ("gate", "up"):
        f = shape[1]
        return array[:, :f] if slot.kind == "gate" else array[:, f:]
    raise ValueError(f"unknown slot kind {slot.kind!r}")


# -- block-quantized tensors ------------------------------------------------------------------------
#
# A block of a checkpoint tensor covers `bo` output × `bi` input elements of HF's [out, in]. The model
# splits those flattened axes into several (e.g. q_b: out = n·h → [q, n, h]); a block still maps onto a
# box in the model layout as long as it tiles the split axes: `_split_block` gives the box size per axis.
# Values and scales then go through `to_model_arrangement` like any dense tensor.

def _split_block(block: int, dims: tuple[int, ...]) -> tuple[int, ...]:
    """Per-axis sizes of a block of `block` consecutive elements of the row-major flattening of `dims`."""
    sizes = []
    for i in range(len(dims) - 1, -1, -1):
        d, outer = dims[i], math.prod(dims[:i])
        if block == 1 or outer == 1:  # the outermost axis in play: ceil-blocks at its edge are fine
            sizes.append(block)
            block = 1
        elif block % d == 0:
            sizes.append(d)
            block //= d
        elif d % block == 0:
            sizes.append(block)
            block = 1
        else:
            raise ValueError(f"a block of {block} elements does not tile the axes {list(dims[:i + 1])}")
    return tuple(reversed(sizes))


def quant_arrangement(slot: Slot, target_shape: tuple[int, ...], hf_block: tuple[int, ...]
                      ) -> tuple[tuple[int, ...], int]:
    """(block per model axis, model axis of the checkpoint's input axis) for a block-quantized tensor.

    `hf_block` is the block on the checkpoint tensor's axes: (bo, bi), or (1, bo, bi) for HF's stacked
    expert tensors. The input axis is where FP4 codes are packed: the innermost model input axis.
    Raises ValueError when the blocks cannot be expressed in the model layout.
    """
    shape = target_shape[1:] if slot.expert is not None else target_shape
    if slot.kind == "linear":
        bo, bi = hf_block
        block = _split_block(bi, shape[:slot.n_in]) + _split_block(bo, shape[slot.n_in:])
        pack_axis = slot.n_in - 1
    elif slot.kind == "grouped":
        bo, bi = hf_block
        g, m, h, o = shape
        (bg, bo2), (bm, bh) = _split_block(bo, (g, o)), _split_block(bi, (m, h))
        block, pack_axis = (bg, bm, bh, bo2), 2
    elif slot.kind in ("copy", "gate", "up") and len(hf_block) in (2, 3) and len(hf_block) == len(shape):
        # kept as stored (routed experts): the checkpoint's blocks, FP4 packed along the last (input) axis
        if len(hf_block) == 3 and hf_block[0] != 1:
            raise ValueError(f"blocks span {hf_block[0]} experts (expected one scale grid per expert)")
        if slot.kind != "copy" and shape[1] % hf_block[1]:
            raise ValueError(f"the merged gate_up_proj cannot be split in halves of {shape[1]} rows with "
                             f"blocks of {hf_block[1]} rows")
        block, pack_axis = tuple(hf_block), len(shape) - 1
    else:
        raise ValueError(f"{'.'.join(map(str, slot.path))} ({slot.kind}) is never stored block-quantized")
    if slot.expert is not None:
        block, pack_axis = (1, *block), pack_axis + 1
    return block, pack_axis
