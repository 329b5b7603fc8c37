"""What a checkpoint's `mtp.*` tensors are, decided from their names alone (docs/dspark.md §4).

Released DeepSeek-V4 checkpoints store one of two different things under `mtp.*`: the preview's MTP block
(`mtp.0`, with the `e_proj`/`h_proj`/`enorm`/`hnorm` combiner) or the 0731 / 0813 DSpark drafter (`mtp.0..n−1`,
`main_proj` in stage 0, the Markov and confidence heads in the last stage). Neither `num_nextn_predict_layers`
(still 1 in 0731) nor the `dspark_*` keys (kept by fine-tunes that drop the tensors) say which, so the names
decide: the safetensors headers or the index's `weight_map` are enough, no tensor data is read. Names of the
relatives a V4 loader must refuse (Vision-Exp, V4.1) are reported here too, and `reconcile` checks the
config against the schema, so a loader reports every problem of a directory in one error.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterable
from typing import Any

from model1_jax.config import Config

NONE, MTP, DSPARK = "none", "mtp", "dspark"
_STAGE_RE = re.compile(r"^mtp\.(\d+)\.(.+)$")
_PREVIEW_SIGNS = ("e_proj.", "h_proj.", "enorm.", "hnorm.")
_DSPARK_FIRST = ("main_proj.", "main_norm.")
_DSPARK_LAST = ("markov_head.", "confidence_head.", "norm.weight", "hc_head_")
_VISION = re.compile(r"^(vision\.|aligner\.|image_)|\.gate\.bias_vl$")
_V41_MARKOV = re.compile(r"\.markov_head\.(embed|head)\.")


@dataclasses.dataclass(frozen=True)
class Schema:
    """kind: "none" (trunk only), "mtp" (the preview's MTP block) or "dspark" (the drafter's stages)."""

    kind: str
    stages: int = 0  # distinct mtp.{i} prefixes
    tensors: int = 0  # names under mtp.*
    problems: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.kind == NONE:
            return "trunk only (no mtp.* tensors)"
        what = "preview MTP block" if self.kind == MTP else f"DSpark drafter, {self.stages} stages"
        return f"{what} ({self.tensors} mtp.* tensors)"


def _examples(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" … ({len(names)} in all)" if len(names) > 3 else "")


def detect(names: Iterable[str]) -> Schema:
    """The schema of a checkpoint from its tensor names (DeepSeek's names; a `model.` prefix is ignored)."""
    names = [n[len("model."):] if n.startswith("model.") else n for n in names]
    problems = []
    vision = [n for n in names if _VISION.search(n)]
    if vision:
        problems.append(f"DeepSeek-V4-Flash-Vision-Exp tensors ({_examples(vision)}): the vision variant is not "
                        "supported")
    v41 = [n for n in names if _V41_MARKOV.search(n)]
    if v41:
        problems.append(f"DeepSeek-V4.1 Markov-head names ({_examples(v41)}): a different architecture, not V4")
    by_stage: dict[int, list[str]] = {}
    for n in names:
        m = _STAGE_RE.match(n)
        if m:
            by_stage.setdefault(int(m.group(1)), []).append(m.group(2))
    tensors = sum(len(v) for v in by_stage.values())
    if not by_stage:
        return Schema(NONE, problems=tuple(problems))
    stages = sorted(by_stage)
    preview = [f"mtp.{s}.{r}" for s in stages for r in by_stage[s] if r.startswith(_PREVIEW_SIGNS)]
    dspark = [f"mtp.{s}.{r}" for s in stages for r in by_stage[s]
              if r.startswith(_DSPARK_FIRST) or r.startswith(("markov_head.", "confidence_head."))]
    if preview and dspark:
        problems.append(f"mtp.* mixes the preview MTP block ({_examples(preview)}) and DSpark stages "
                        f"({_examples(dspark)})")
        return Schema(MTP, len(stages), tensors, tuple(problems))
    if stages != list(range(len(stages))):
        problems.append(f"mtp.* stages must be numbered 0 .. n−1, found {stages}")
    if preview:
        if stages != [0]:
            problems.append(f"the preview MTP block is one block (mtp.0); found stages {stages}")
        return Schema(MTP, len(stages), tensors, tuple(problems))
    if not dspark:
        problems.append(f"mtp.* tensors ({_examples([f'mtp.{s}.{r}' for s in stages for r in by_stage[s]])}) are "
                        "neither the preview MTP block (no e_proj/h_proj/enorm/hnorm) nor DSpark stages "
                        "(no main_proj, Markov or confidence head)")
        return Schema(NONE, len(stages), tensors, tuple(problems))
    last = stages[-1]
    for s in stages:
        for rest in by_stage[s]:
            if rest.startswith(_DSPARK_FIRST) and s != 0:
                problems.append(f"mtp.{s}.{rest}: the DSpark combiner belongs to stage 0")
            if rest.startswith(_DSPARK_LAST) and s != last:
                problems.append(f"mtp.{s}.{rest}: the DSpark head belongs to the last stage (mtp.{last})")
    return Schema(DSPARK, len(stages), tensors, tuple(problems))


def _inference_stages(path: str | None) -> int | None:
    """`n_mtp_layers` of DeepSeek's `inference/config.json` beside a checkpoint, if there is one."""
    file = os.path.join(path, "inference", "config.json") if path else None
    if not file or not os.path.isfile(file):
        return None
    with open(file) as f:
        value = json.load(f).get("n_mtp_layers")
    return value if isinstance(value, int) else None


def reconcile(config: Config, schema: Schema, raw_config: dict[str, Any], path: str | None = None
              ) -> tuple[Config, list[str]]:
    """The config the tensors describe, and every disagreement between the two.

    Tensors win where the config cannot know (docs/dspark.md §4): no `mtp.*` tensors → neither MTP block nor
    drafter, whatever `num_nextn_predict_layers` / `dspark_*` say; the preview block → MTP (with `dspark_*` keys
    ignored); DSpark stages → the drafter, which the config's `dspark_*` keys must describe.
    """
    problems = list(schema.problems)
    if schema.kind == NONE:
        return config.replace(num_nextn_predict_layers=0, dspark=None), problems
    if schema.kind == MTP:
        return config.replace(num_nextn_predict_layers=1, dspark=None), problems
    if config.dspark is None:
        problems.append(f"DSpark stages under mtp.* ({schema.stages}) but config.json has no dspark_* keys "
                        "(dspark_block_size, dspark_noise_token_id, dspark_target_layer_ids, dspark_markov_rank)")
        return config, problems
    declared = {"compress_ratios": config.dspark.num_stages if "compress_ratios" in raw_config else None,
                "inference/config.json n_mtp_layers": _inference_stages(path)}
    for where, count in declared.items():
        if count is not None and count != schema.stages:
            problems.append(f"{where} describes {count} drafter stages, the tensors have {schema.stages}")
    return config.replace(dspark=dataclasses.replace(config.dspark, num_stages=schema.stages),
                          num_nextn_predict_layers=0), problems
