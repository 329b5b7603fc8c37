"""The DSpark drafter's sub-config, read from the `dspark_*` keys of the 0731 / 0813 `config.json` (docs/dspark.md §2).

Also the config-side checks that tell DeepSeek-V4 apart from its relatives a loader must refuse (docs/dspark.md
§2.4, §4.3): V4.1 (different architecture) and Vision-Exp (same `architectures` string, vision tower added).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

# config.json key → DSparkConfig field.
DSPARK_KEYS = {"dspark_block_size": "block_size", "dspark_noise_token_id": "noise_token_id",
               "dspark_target_layer_ids": "target_layer_ids", "dspark_markov_rank": "markov_rank"}
# Keys only DeepSeek-V4.1 configs have.
V41_KEYS = ("dspark_n_routed_experts", "dspark_num_experts_per_tok", "text_config")


@dataclasses.dataclass(frozen=True)
class DSparkConfig:
    """The drafter stored as `mtp.{0..num_stages−1}.*`: G = `block_size` slots per call (the anchor and G−1 noise
    tokens, G drafts), the target layers whose output streams it reads, the Markov head's rank. V4-Flash:
    5, 128799, (40, 41, 42), 256; V4-Pro: 5, 128799, (58, 59, 60), 512; three stages in both."""

    block_size: int = 5
    noise_token_id: int = 128799
    target_layer_ids: tuple[int, ...] = (40, 41, 42)
    markov_rank: int = 256
    num_stages: int = 3

    def __post_init__(self):
        if isinstance(self.target_layer_ids, Sequence) and not isinstance(self.target_layer_ids, str):
            object.__setattr__(self, "target_layer_ids", tuple(self.target_layer_ids))

    def problems(self, num_layers: int, vocab_size: int) -> list[str]:
        """Every way this sub-config does not fit a model of `num_layers` layers and `vocab_size` tokens."""
        out = []
        for name in ("block_size", "markov_rank", "num_stages"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                out.append(f"dspark.{name}: expected a positive integer, got {value!r}")
        if not _is_int(self.noise_token_id) or not 0 <= self.noise_token_id < vocab_size:
            out.append(f"dspark.noise_token_id: expected a token id in [0, {vocab_size}), got {self.noise_token_id!r}")
        ids = self.target_layer_ids
        if (not isinstance(ids, tuple) or not ids or not all(_is_int(i) and 0 <= i < num_layers for i in ids)
                or len(set(ids)) != len(ids)):
            out.append(f"dspark.target_layer_ids: expected distinct layer indices in [0, {num_layers}), got {ids!r}")
        return out

    def to_hf(self) -> dict[str, Any]:
        """The four config.json keys (the stage count is written as the tail of `compress_ratios`)."""
        return {key: list(getattr(self, f)) if f == "target_layer_ids" else getattr(self, f)
                for key, f in DSPARK_KEYS.items()}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def family_problems(raw: Mapping[str, Any]) -> list[str]:
    """config.json keys of checkpoints that are not DeepSeek-V4 text models, one problem per family."""
    out = []
    v41 = [k for k in V41_KEYS if k in raw]
    nextn = raw.get("num_nextn_predict_layers")
    if _is_int(nextn) and nextn > 1:
        v41.append(f"num_nextn_predict_layers={nextn}")
    if v41:
        out.append(f"DeepSeek-V4.1 configuration ({', '.join(v41)}): a different architecture, not DeepSeek-V4")
    vision = sorted(k for k in raw if k.startswith("vision"))
    if vision:
        out.append(f"DeepSeek-V4-Flash-Vision-Exp configuration ({', '.join(vision)}): the vision variant is not "
                   "supported (its `architectures` string is the text model's; the vision keys tell it apart)")
    return out


def dspark_from_hf(raw: Mapping[str, Any], num_layers: int) -> tuple[DSparkConfig | None, list[str]]:
    """The drafter's sub-config from a config.json dict and the problems found.

    The stage count is the number of `compress_ratios` entries past `num_layers` (docs/dspark.md §2.2), each of
    which must be 0 (sliding-window-only); without `compress_ratios` it defaults to 3. Without any `dspark_*` key
    there is no drafter, and a tail longer than one entry (more than the preview's MTP block) is a problem.
    """
    present = [k for k in DSPARK_KEYS if k in raw]
    ratios = raw.get("compress_ratios")
    tail = list(ratios[num_layers:]) if isinstance(ratios, Sequence) and len(ratios) > num_layers else []
    if not present:
        if len(tail) > 1:
            return None, [f"compress_ratios: {len(tail)} entries past num_hidden_layers={num_layers} (extra blocks) "
                          "but no dspark_* keys; the preview describes one MTP block there"]
        return None, []
    problems = []
    missing = [k for k in DSPARK_KEYS if k not in raw]
    if missing:
        problems.append(f"dspark_* keys incomplete: has {present}, missing {missing}")
    if isinstance(ratios, Sequence) and not tail:
        problems.append(f"compress_ratios: {len(ratios)} entries, num_hidden_layers={num_layers}; a DSpark config "
                        "has one more entry per drafter stage")
    if any(r != 0 for r in tail):
        problems.append(f"compress_ratios: the drafter stages' entries {tail} must all be 0 (sliding-window-only)")
    if missing:
        return None, problems
    ids = raw["dspark_target_layer_ids"]
    dspark = DSparkConfig(block_size=raw["dspark_block_size"], noise_token_id=raw["dspark_noise_token_id"],
                          target_layer_ids=tuple(ids) if isinstance(ids, Sequence) else ids,
                          markov_rank=raw["dspark_markov_rank"], num_stages=len(tail) if ratios is not None else 3)
    return dspark, problems
