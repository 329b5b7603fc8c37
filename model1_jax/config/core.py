"""Model configuration: a frozen dataclass with the released presets and a Hugging Face reader.

Field names follow `DeepseekV4Config` (docs/model.md §1.1). Two fields differ in form because a frozen,
hashable config cannot hold dicts: `compress_rates` is stored as `compress_rate_csa` /
`compress_rate_hca`, and the compress rope's YaRN block as `rope_scaling` (a `RopeScaling`).
`Config.rope_parameters` and `Config.compress_rates` rebuild HF's nested dicts.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

from model1_jax.config.base import (
    CSA,
    HASH_MOE,
    HCA,
    LAYER_TYPES,
    MLP_LAYER_TYPES,
    MOE,
    RATIO_TO_LAYER_TYPE,
    SCORING_FUNCS,
    SLIDING,
    RopeScaling,
    default_mlp_types,
    rope_scaling_from_dict,
)
from model1_jax.config.dspark import DSPARK_KEYS, DSparkConfig, dspark_from_hf, family_problems


@dataclasses.dataclass(frozen=True)
class Config:
    vocab_size: int = 129280
    hidden_size: int = 4096
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 43
    num_attention_heads: int = 64
    num_key_value_heads: int = 1
    head_dim: int = 512
    qk_rope_head_dim: int = 64
    q_lora_rank: int = 1024
    num_experts_per_tok: int = 6
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    scoring_func: str = "sqrtsoftplus"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.5
    max_position_embeddings: int = 1048576
    rope_theta: float = 10000.0
    layer_types: tuple[str, ...] = ()
    compress_rate_csa: int = 4
    compress_rate_hca: int = 128
    compress_rope_theta: float = 160000.0
    rope_scaling: RopeScaling | None = None
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    mlp_layer_types: tuple[str, ...] = ()
    swiglu_limit: float = 10.0
    sliding_window: int = 128
    o_groups: int = 8
    o_lora_rank: int = 1024
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    num_nextn_predict_layers: int = 1
    # Attention type of the MTP block (`compress_ratios[num_hidden_layers]` in released configs).
    mtp_layer_type: str = SLIDING
    # The DSpark drafter of the 0731 / 0813 checkpoints (`mtp.{0,1,2}.*`); exclusive with the MTP block.
    dspark: DSparkConfig | None = None
    router_jitter_noise: float = 0.0
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    pad_token_id: int | None = None
    bos_token_id: int | None = 0
    eos_token_id: int | tuple[int, ...] | None = 1
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    attention_dropout: float = 0.0
    # config.json keys that do not change the model (HF's training and serving switches, the checkpoint's
    # metadata): kept only so that `to_hf()` writes them back. Sorted (key, JSON text) pairs; `hf_extras`.
    # Not compared: two configs that differ only here describe the same model.
    hf_extra: tuple[tuple[str, str], ...] = dataclasses.field(default=(), compare=False)

    def __post_init__(self):
        # Normalise list inputs so the config stays hashable (it is a static argument under jit).
        if not self.layer_types:
            raise ValueError(
                "Config.layer_types: an explicit per-layer schedule is required (one of "
                f"{LAYER_TYPES} per layer); HF's implicit default matches no released model (docs/model.md §1.3)."
            )
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if not self.mlp_layer_types:
            object.__setattr__(self, "mlp_layer_types", default_mlp_types(self.num_hidden_layers, 3))
        object.__setattr__(self, "mlp_layer_types", tuple(self.mlp_layer_types))
        if isinstance(self.hf_extra, Mapping):
            object.__setattr__(self, "hf_extra", _freeze(self.hf_extra))
        if isinstance(self.dspark, Mapping):
            object.__setattr__(self, "dspark", DSparkConfig(**self.dspark))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if isinstance(self.rope_scaling, Mapping):
            # HF defaults a missing rope_type to "default" (no YaRN); here a dict without one is almost
            # certainly a YaRN block written by hand, so require the type instead of dropping it silently.
            if "rope_type" not in self.rope_scaling and "type" not in self.rope_scaling:
                raise ValueError("Config.rope_scaling: a dict needs rope_type ('yarn' or 'default'); "
                                 "or pass a RopeScaling")
            object.__setattr__(self, "rope_scaling", rope_scaling_from_dict(dict(self.rope_scaling)))
        self.validate()

    # ----------------------------------------------------------------------------------------
    # Derived quantities

    @property
    def partial_rotary_factor(self) -> float:
        return self.qk_rope_head_dim / self.head_dim

    @property
    def compress_rates(self) -> dict[str, int]:
        return {CSA: self.compress_rate_csa, HCA: self.compress_rate_hca}

    def compress_rate(self, layer_type: str) -> int:
        """Tokens pooled per compressed entry for a CSA/HCA layer."""
        return self.compress_rates[layer_type]

    @property
    def rope_parameters(self) -> dict[str, dict[str, Any]]:
        """HF's nested `{"main": ..., "compress": ...}` rope dict (docs/model.md §1.5)."""
        main = {"rope_type": "default", "rope_theta": self.rope_theta,
                "partial_rotary_factor": self.partial_rotary_factor}
        compress = {"rope_type": "default"}
        if self.rope_scaling is not None:
            compress = self.rope_scaling.to_hf()
        compress = {**compress, "rope_theta": self.compress_rope_theta,
                    "partial_rotary_factor": self.partial_rotary_factor}
        return {"main": main, "compress": compress}

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.o_groups

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    @property
    def hf_extras(self) -> dict[str, Any]:
        """The pass-through config.json keys (see `hf_extra`) as a dict."""
        return {k: json.loads(v) for k, v in self.hf_extra}

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)

    # ----------------------------------------------------------------------------------------
    # Validation

    def validate(self) -> None:
        def need(cond: bool, field: str, allowed: str, got: Any) -> None:
            if not cond:
                raise ValueError(f"Config.{field}: expected {allowed}, got {got!r}")

        for field in ("vocab_size", "hidden_size", "moe_intermediate_size", "num_hidden_layers",
                      "num_attention_heads", "head_dim", "q_lora_rank", "num_experts_per_tok",
                      "n_routed_experts", "hc_mult", "hc_sinkhorn_iters", "sliding_window", "o_groups",
                      "o_lora_rank", "index_n_heads", "index_head_dim", "index_topk",
                      "compress_rate_csa", "compress_rate_hca", "max_position_embeddings"):
            value = getattr(self, field)
            need(isinstance(value, int) and not isinstance(value, bool) and value >= 1, field,
                 "a positive integer", value)
        need(self.num_key_value_heads == 1, "num_key_value_heads",
             "1 (MODEL1 has one shared K=V head)", self.num_key_value_heads)
        need(self.n_shared_experts == 1, "n_shared_experts",
             "1 (the architecture always has exactly one shared expert)", self.n_shared_experts)
        need(self.qk_rope_head_dim % 2 == 0 and 0 < self.qk_rope_head_dim < self.head_dim,
             "qk_rope_head_dim", f"an even number in (0, head_dim={self.head_dim})", self.qk_rope_head_dim)
        need(self.qk_rope_head_dim < self.index_head_dim, "index_head_dim",
             f"more than qk_rope_head_dim={self.qk_rope_head_dim}", self.index_head_dim)
        need(self.num_attention_heads % self.o_groups == 0, "o_groups",
             f"a divisor of num_attention_heads={self.num_attention_heads}", self.o_groups)
        need(self.num_experts_per_tok <= self.n_routed_experts, "num_experts_per_tok",
             f"at most n_routed_experts={self.n_routed_experts}", self.num_experts_per_tok)
        need(self.scoring_func in SCORING_FUNCS, "scoring_func", f"one of {SCORING_FUNCS}", self.scoring_func)
        need(self.hidden_act == "silu", "hidden_act", "'silu'", self.hidden_act)
        need(len(self.layer_types) == self.num_hidden_layers, "layer_types",
             f"{self.num_hidden_layers} entries (num_hidden_layers)", len(self.layer_types))
        bad = [t for t in self.layer_types if t not in LAYER_TYPES]
        need(not bad, "layer_types", f"entries from {LAYER_TYPES}", bad)
        need(len(self.mlp_layer_types) == self.num_hidden_layers, "mlp_layer_types",
             f"{self.num_hidden_layers} entries (num_hidden_layers)", len(self.mlp_layer_types))
        bad = [t for t in self.mlp_layer_types if t not in MLP_LAYER_TYPES]
        need(not bad, "mlp_layer_types", f"entries from {MLP_LAYER_TYPES}", bad)
        need(self.mtp_layer_type in LAYER_TYPES, "mtp_layer_type", f"one of {LAYER_TYPES}", self.mtp_layer_type)
        need(self.num_nextn_predict_layers in (0, 1), "num_nextn_predict_layers",
             "0 or 1 (one MTP block, as released)", self.num_nextn_predict_layers)
        if self.dspark is not None:
            need(isinstance(self.dspark, DSparkConfig), "dspark", "a DSparkConfig", self.dspark)
            need(not self.num_nextn_predict_layers, "num_nextn_predict_layers",
                 "0 with a DSpark drafter (checkpoints hold one of the two under mtp.*)", self.num_nextn_predict_layers)
            problems = self.dspark.problems(self.num_hidden_layers, self.vocab_size)
            need(not problems, "dspark", "a drafter that fits the model", "; ".join(problems))
        need(self.rms_norm_eps > 0, "rms_norm_eps", "a positive float", self.rms_norm_eps)
        need(self.hc_eps > 0, "hc_eps", "a positive float", self.hc_eps)
        need(self.swiglu_limit > 0, "swiglu_limit", "a positive float", self.swiglu_limit)
        need(not self.attention_bias, "attention_bias", "False (the architecture has no biases)",
             self.attention_bias)
        need(not self.mlp_bias, "mlp_bias", "False (released checkpoints have no MLP biases)", self.mlp_bias)
        # HF declares these but the architecture has one behaviour; another value would be a different model.
        need(self.norm_topk_prob is True, "norm_topk_prob",
             "True (the routing weights of the k picks are always renormalised)", self.norm_topk_prob)
        need(self.router_jitter_noise == 0, "router_jitter_noise", "0 (no router noise is implemented)",
             self.router_jitter_noise)
        need(self.attention_dropout == 0, "attention_dropout", "0 (no attention dropout is implemented)",
             self.attention_dropout)
        need(self.tie_word_embeddings in (True, False), "tie_word_embeddings", "a bool", self.tie_word_embeddings)
        bad = [k for k, _ in self.hf_extra if k in _FIELD_NAMES or k in _CONSUMED_HF_KEYS]
        need(not bad, "hf_extra", "keys that are not Config fields or keys from_hf reads", bad)
        if self.rope_scaling is not None:
            need(self.rope_scaling.factor >= 1.0, "rope_scaling.factor", "a factor >= 1", self.rope_scaling.factor)
            need(self.rope_scaling.original_max_position_embeddings >= 1,
                 "rope_scaling.original_max_position_embeddings", "a positive integer",
                 self.rope_scaling.original_max_position_embeddings)

    # ----------------------------------------------------------------------------------------
    # Presets (docs/model.md §1.3: explicit schedules, not HF's defaults)

    @classmethod
    def v4_flash(cls) -> Config:
        """DeepSeek-V4-Flash: 284B parameters, 13B active."""
        return cls(
            vocab_size=129280, hidden_size=4096, moe_intermediate_size=2048, num_hidden_layers=43,
            num_attention_heads=64, head_dim=512, qk_rope_head_dim=64, q_lora_rank=1024,
            num_experts_per_tok=6, n_routed_experts=256, routed_scaling_factor=1.5,
            layer_types=(SLIDING, SLIDING) + (CSA, HCA) * 20 + (CSA,),
            mlp_layer_types=default_mlp_types(43, 3),
            rope_scaling=RopeScaling(factor=16.0, original_max_position_embeddings=65536),
            o_groups=8, o_lora_rank=1024, index_n_heads=64, index_head_dim=128, index_topk=512,
        )

    @classmethod
    def v4_pro(cls) -> Config:
        """DeepSeek-V4-Pro: 1.6T parameters, 49B active."""
        return cls(
            vocab_size=129280, hidden_size=7168, moe_intermediate_size=3072, num_hidden_layers=61,
            num_attention_heads=128, head_dim=512, qk_rope_head_dim=64, q_lora_rank=1536,
            num_experts_per_tok=6, n_routed_experts=384, routed_scaling_factor=2.5,
            layer_types=(HCA, HCA) + (CSA, HCA) * 29 + (CSA,),
            mlp_layer_types=default_mlp_types(61, 3),
            rope_scaling=RopeScaling(factor=16.0, original_max_position_embeddings=65536),
            o_groups=16, o_lora_rank=1024, index_n_heads=64, index_head_dim=128, index_topk=1024,
        )

    @classmethod
    def tiny(cls) -> Config:
        """Every attention type and both MLP types at toy width; runs on a CPU in seconds."""
        return cls(
            vocab_size=256, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=4,
            num_attention_heads=4, head_dim=32, qk_rope_head_dim=8, q_lora_rank=32,
            num_experts_per_tok=2, n_routed_experts=8, routed_scaling_factor=1.5,
            max_position_embeddings=4096,
            layer_types=(SLIDING, CSA, HCA, CSA),
            mlp_layer_types=(HASH_MOE, HASH_MOE, MOE, MOE),
            compress_rate_csa=4, compress_rate_hca=8,
            rope_scaling=RopeScaling(factor=16.0, original_max_position_embeddings=256),
            o_groups=2, o_lora_rank=16, sliding_window=8,
            index_n_heads=2, index_head_dim=16, index_topk=3,
        )

    @classmethod
    def demo(cls) -> Config:
        """MODEL1's attention geometry at a width a CPU runs in seconds: head_dim 512 (448 FP8 + 64 RoPE dims,
        so the FP8 FlashMLA cache format applies), window 128, CSA m=4 with a lightning indexer, HCA m'=128,
        mHC with 4 streams, MoE with a hash layer, an MTP block. The model of `scripts/generate.py`."""
        return cls(
            vocab_size=1024, hidden_size=256, moe_intermediate_size=128, num_hidden_layers=3, num_attention_heads=16,
            head_dim=512, qk_rope_head_dim=64, q_lora_rank=128, num_experts_per_tok=2, n_routed_experts=8,
            max_position_embeddings=65536, layer_types=(SLIDING, CSA, HCA), mlp_layer_types=(HASH_MOE, MOE, MOE),
            rope_scaling=RopeScaling(factor=16.0, original_max_position_embeddings=4096),
            o_groups=2, o_lora_rank=64, index_n_heads=4, index_head_dim=128, index_topk=16)

    # ----------------------------------------------------------------------------------------
    # Hugging Face interop

    @classmethod
    def from_hf(cls, path_or_dict: str | os.PathLike | Mapping[str, Any]) -> Config:
        """Reads a Hugging Face `config.json` (a directory, a file path, or the parsed dict).

        Accepts the legacy keys of the released configs (`compress_ratios`, `compress_rate_csa/hca`,
        `num_hash_layers`, `qk_rope_head_dim`, flat `rope_scaling`) as HF does (docs/model.md §1.4, §1.5).
        """
        if isinstance(path_or_dict, Mapping):
            raw = dict(path_or_dict)
        else:
            path = os.fspath(path_or_dict)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"Config.from_hf: no config.json at {path!r}")
            with open(path) as f:
                raw = json.load(f)
        return cls(**_fields_from_hf(raw))

    def to_hf(self) -> dict[str, Any]:
        """A dict that `transformers.DeepseekV4Config(**d)` accepts and that `from_hf` reads back."""
        d = {**self.hf_extras, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}
        for name in ("compress_rate_csa", "compress_rate_hca", "rope_scaling", "qk_rope_head_dim",
                     "mtp_layer_type", "hf_extra", "dspark"):
            d.pop(name)
        d["model_type"] = "deepseek_v4"
        d["layer_types"] = list(self.layer_types)
        d["mlp_layer_types"] = list(self.mlp_layer_types)
        d["compress_rates"] = self.compress_rates
        d["partial_rotary_factor"] = self.partial_rotary_factor
        d["rope_parameters"] = self.rope_parameters
        # HF has no field for the MTP block's attention type nor for the drafter's stage count; released configs
        # carry them as the extra entries of the legacy `compress_ratios`, which HF ignores when `layer_types` is given.
        ratio = {SLIDING: 0, CSA: 4, HCA: 128}
        extra = [0] * self.dspark.num_stages if self.dspark is not None else [ratio[self.mtp_layer_type]]
        d["compress_ratios"] = [ratio[t] for t in self.layer_types] + extra
        if self.dspark is not None:
            d.update(self.dspark.to_hf())
        if isinstance(self.eos_token_id, tuple):
            d["eos_token_id"] = list(self.eos_token_id)
        return d


_FIELD_NAMES = {f.name for f in dataclasses.fields(Config)}
_DIRECT_FIELDS = _FIELD_NAMES - {
    "layer_types", "mlp_layer_types", "compress_rate_csa", "compress_rate_hca", "rope_scaling",
    "qk_rope_head_dim", "mtp_layer_type", "rope_theta", "compress_rope_theta", "hf_extra", "dspark"}
# config.json keys `from_hf` reads into other fields (aliases, legacy forms, derived values).
_CONSUMED_HF_KEYS = {"model_type", "num_local_experts", "intermediate_size", "compress_rates", "compress_ratios",
                     "num_hash_layers", "partial_rotary_factor", "rope_parameters", "rope_scaling",
                     "qk_rope_head_dim", "layer_types", "mlp_layer_types", "rope_theta", "compress_rope_theta",
                     *DSPARK_KEYS}


def _freeze(extra: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((str(k), json.dumps(v, sort_keys=True)) for k, v in extra.items()))


def _fields_from_hf(raw: dict[str, Any]) -> dict[str, Any]:
    model_type = raw.get("model_type", "deepseek_v4")
    if model_type != "deepseek_v4":
        raise ValueError(f"Config.from_hf: model_type must be 'deepseek_v4', got {model_type!r}")
    kw: dict[str, Any] = {k: raw[k] for k in _DIRECT_FIELDS if k in raw}
    # HF aliases (`attribute_map`).
    if "num_local_experts" in raw and "n_routed_experts" not in raw:
        kw["n_routed_experts"] = raw["num_local_experts"]
    if "intermediate_size" in raw and "moe_intermediate_size" not in raw:
        kw["moe_intermediate_size"] = raw["intermediate_size"]
    num_layers = kw.get("num_hidden_layers", Config.num_hidden_layers)
    # Relatives that are not DeepSeek-V4 text models, and the drafter's keys: every problem in one error.
    dspark, problems = dspark_from_hf(raw, num_layers) if isinstance(num_layers, int) else (None, [])
    problems = family_problems(raw) + problems
    if problems:
        raise ValueError("Config.from_hf: " + "; ".join(problems))
    if dspark is not None:  # 0731 still writes num_nextn_predict_layers=1 though it ships no MTP block
        kw.update(dspark=dspark, num_nextn_predict_layers=0)

    rates = dict(raw.get("compress_rates") or {})
    if "compress_rate_csa" in raw:
        rates[CSA] = raw["compress_rate_csa"]
    if "compress_rate_hca" in raw:
        rates[HCA] = raw["compress_rate_hca"]
    unknown = set(rates) - {CSA, HCA}
    if unknown:
        raise ValueError(f"Config.compress_rates: keys must be from {(CSA, HCA)}, got {sorted(unknown)}")
    if CSA in rates:
        kw["compress_rate_csa"] = rates[CSA]
    if HCA in rates:
        kw["compress_rate_hca"] = rates[HCA]

    layer_types = raw.get("layer_types")
    ratios = raw.get("compress_ratios")
    if ratios is not None:
        bad = [r for r in ratios if r not in RATIO_TO_LAYER_TYPE]
        if bad:
            raise ValueError(f"Config.compress_ratios: entries must be from {sorted(RATIO_TO_LAYER_TYPE)}, "
                             f"got {bad}")
        # Entries past num_hidden_layers describe the MTP block or the drafter's stages (dspark_from_hf).
        if len(ratios) > num_layers and dspark is None:
            kw["mtp_layer_type"] = RATIO_TO_LAYER_TYPE[ratios[num_layers]]
        if layer_types is None:
            layer_types = [RATIO_TO_LAYER_TYPE[r] for r in ratios]
    if layer_types is None:
        raise ValueError("Config.from_hf: config.json has neither `layer_types` nor `compress_ratios`; "
                         "an explicit schedule is required (HF's implicit default matches no released model)")
    kw["layer_types"] = tuple(layer_types[:num_layers])

    mlp_types = raw.get("mlp_layer_types")
    if mlp_types is None:
        n_hash = raw.get("num_hash_layers")
        mlp_types = default_mlp_types(num_layers, 3 if n_hash is None else n_hash)
    kw["mlp_layer_types"] = tuple(mlp_types[:num_layers])

    head_dim = kw.get("head_dim", Config.head_dim)
    if raw.get("partial_rotary_factor") is not None:
        kw["qk_rope_head_dim"] = int(head_dim * raw["partial_rotary_factor"])
    elif raw.get("qk_rope_head_dim") is not None:
        kw["qk_rope_head_dim"] = int(raw["qk_rope_head_dim"])
    else:  # HF's default factor is 64/512 whatever head_dim is.
        kw["qk_rope_head_dim"] = int(head_dim * 64 / 512)

    rope = raw.get("rope_parameters") or {}
    main, compress = rope.get("main"), rope.get("compress")
    if isinstance(main, Mapping) and isinstance(compress, Mapping):
        if main.get("rope_type", "default") != "default":
            raise ValueError(f"Config.rope_parameters.main: rope_type must be 'default', got {main['rope_type']!r}")
        kw["rope_theta"] = float(main.get("rope_theta", raw.get("rope_theta", Config.rope_theta)))
        kw["compress_rope_theta"] = float(compress.get("rope_theta",
                                                       raw.get("compress_rope_theta", Config.compress_rope_theta)))
        kw["rope_scaling"] = rope_scaling_from_dict(dict(compress))
    else:
        # A flat dict (rope_parameters or legacy rope_scaling) describes the compress rope only.
        flat = {k: v for k, v in {**(raw.get("rope_scaling") or {}), **rope}.items() if k not in ("main", "compress")}
        kw["rope_theta"] = float(raw.get("rope_theta", Config.rope_theta))
        kw["compress_rope_theta"] = float(raw.get("compress_rope_theta", Config.compress_rope_theta))
        kw["rope_scaling"] = rope_scaling_from_dict(flat)

    if raw.get("num_key_value_heads") is None:
        kw.pop("num_key_value_heads", None)
    # Everything else in config.json (HF's switches such as use_cache or output_router_logits, the checkpoint's
    # quantization_config, torch_dtype, architectures...) does not change the model: carried for to_hf() only.
    kw["hf_extra"] = _freeze({k: v for k, v in raw.items() if k not in _FIELD_NAMES and k not in _CONSUMED_HF_KEYS})
    return kw
