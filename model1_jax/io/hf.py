"""Hugging Face-format checkpoints (config.json + safetensors, dense or FP8/FP4) → model parameters.

`plan_checkpoint` checks a directory completely before any tensor data is read: every tensor must
map onto a parameter with the right shape and a usable dtype, every FP8/FP4 weight must come with a
block scale of the right shape and dtype, and every parameter must be covered. All problems are
reported together in one `CheckpointError`. The plan's units (a "unit" is the parameters filled from
one set of tensors; each tensor is read exactly once) are then read in parallel by `io.reader` through
`io.regions` — whole parameters, or one shard of one — either dequantized exactly to a dense dtype or
kept as `BlockQuantized` in the model's layout. `from_pretrained` and the streaming converter
(`io.convert`) both run on this.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model1_jax.config import Config
from model1_jax.config.dspark import family_problems
from model1_jax.io import schema as mtp_schema
from model1_jax.io.names import (
    Slot,
    canonical_name,
    quant_arrangement,
    scale_owner,
    slots_for,
    source_shape,
)
from model1_jax.io.safetensors_file import SafetensorsError, TensorInfo, read_header
from model1_jax.model import quant
from model1_jax.model.transformer import abstract_model

logger = logging.getLogger(__name__)

_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
_INT_DTYPES = {"I64", "I32", "I16", "U8", "I8", "U16", "U32", "U64"}
_FP4_DTYPES = {"I8", "U8"}  # packed e2m1 pairs
# Block of one FP8 scale on HF's [out, in] when config.json does not say (`weight_block_size`).
DEFAULT_FP8_BLOCK = (128, 128)

__all__ = ["Assignment", "CheckpointError", "CheckpointPlan", "TensorInfo", "Unit",
           "plan", "plan_checkpoint", "units"]


class CheckpointError(ValueError):
    """A checkpoint that does not match the model; the message lists every problem found."""

    def __init__(self, source: str, problems: list[str]):
        self.problems = problems
        shown = problems[:50]
        more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        super().__init__(f"{source}: {len(problems)} problem(s) in checkpoint:\n  " + "\n  ".join(shown) + more)


@dataclasses.dataclass(frozen=True)
class Assignment:
    """One checkpoint tensor filling one model slot; with its block scale when stored FP8/FP4.

    `hf_block` is the block of one scale on the tensor's own (unpacked) axes.
    """

    info: TensorInfo
    slot: Slot
    scale: TensorInfo | None = None
    fmt: str | None = None
    hf_block: tuple[int, ...] | None = None


@dataclasses.dataclass(frozen=True)
class Unit:
    """Parameters filled from one set of tensors, so each tensor is read once (HF's merged
    `gate_up_proj` fills two parameters; everything else fills one)."""

    paths: tuple[tuple, ...]
    assignments: tuple[Assignment, ...]

    @property
    def source_bytes(self) -> int:
        tensors = {a.info for a in self.assignments} | {a.scale for a in self.assignments if a.scale}
        return sum(t.nbytes for t in tensors)


def safetensors_files(path: str) -> list[str]:
    """The shard files of a directory: from `model.safetensors.index.json`, else `*.safetensors`."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(path, [f"{index}: no `weight_map`"])
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
        if missing:
            raise CheckpointError(path, [f"shard listed in the index is missing: {f}" for f in missing])
        return [os.path.join(path, f) for f in files]
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no model.safetensors.index.json and no *.safetensors files")
    return [os.path.join(path, f) for f in files]


def read_headers(files: list[str]) -> list[TensorInfo]:
    """Names, dtypes, shapes and byte ranges of every tensor, without reading data."""
    infos, problems = [], []
    for file in files:
        try:
            infos.extend(read_header(file))
        except SafetensorsError as e:
            problems.extend(f"{os.path.basename(file)}: unreadable safetensors file ({p})" for p in e.problems)
        except OSError as e:
            problems.append(f"{os.path.basename(file)}: unreadable safetensors file ({e})")
    if problems:
        raise CheckpointError(os.path.dirname(files[0]), problems)
    return infos


def fp8_block_size(raw_config: dict) -> tuple[int, int]:
    """`quantization_config.weight_block_size` of a released config.json (docs/checkpoints.md §5.4), default 128×128."""
    block = (raw_config.get("quantization_config") or {}).get("weight_block_size") or DEFAULT_FP8_BLOCK
    if len(block) != 2 or not all(isinstance(b, int) and b >= 1 for b in block):
        raise ValueError(f"config.json: quantization_config.weight_block_size must be two positive ints, got {block}")
    return tuple(block)


def _quant_format(info: TensorInfo, scale: TensorInfo | None, fp8_block: tuple[int, int]
                  ) -> tuple[str | None, tuple[int, ...] | None, str | None]:
    """(format, block on the tensor's axes, problem) of a weight and its optional scale."""
    if scale is None:
        if info.dtype.startswith("F8"):
            return None, None, (f"{info.name}: {info.dtype} weight without its block scale "
                                "(`.scale` / `.weight_scale_inv`)")
        return None, None, None
    if info.dtype == "F8_E4M3":
        fmt, block = quant.FP8, fp8_block
    elif info.dtype in _FP4_DTYPES:
        fmt, block = quant.FP4, quant.FP4_BLOCK
    else:
        return None, None, (f"{info.name}: has a block scale but dtype {info.dtype} (FP8 weights are F8_E4M3, "
                            "FP4 weights packed I8/U8)")
    if scale.dtype != "F8_E8M0":
        return None, None, f"{scale.name}: scale dtype {scale.dtype}, expected F8_E8M0 (UE8M0 powers of two)"
    return fmt, (1,) * (len(info.shape) - 2) + tuple(block), None


def plan(infos: list[TensorInfo], targets: dict[tuple, jax.ShapeDtypeStruct], source: str, *,
         fp8_block: tuple[int, int] = DEFAULT_FP8_BLOCK, keep_quantized: bool = False, drafter: str = "mtp",
         problems: list[str] | None = None) -> list[Assignment]:
    """Matches tensors (and block scales) to parameters; raises `CheckpointError` with every mismatch.

    `keep_quantized`: the FP8/FP4 blocks will be kept as `BlockQuantized` in the model's arrangement, so each
    block must map onto a box of model axes (a 128-row block of q_b must not straddle two heads, say). A dense
    load dequantizes in the checkpoint's own [out, in] axes first, so any spec-valid block grid loads.
    `drafter` says what `mtp.*` holds ("mtp" or "dspark", from `io.schema`); `problems` found earlier (config,
    schema) are reported with these.
    """
    problems = list(problems or [])
    canonical = {canonical_name(i.name, drafter): i for i in infos}
    scales: dict[str, TensorInfo] = {}
    weights: list[TensorInfo] = []
    for info in infos:
        owner = scale_owner(canonical_name(info.name, drafter))
        if owner is not None and owner in canonical:
            scales[owner] = info
        elif owner is not None and slots_for(owner, drafter):  # looks like the scale of a model weight that is absent
            problems.append(f"block scale {info.name!r} has no weight")
        else:
            weights.append(info)

    assignments: list[Assignment] = []
    covered: dict[tuple, set] = defaultdict(set)
    seen: dict[tuple, str] = {}
    for info in weights:
        slots = slots_for(info.name, drafter)
        if not slots:
            problems.append(f"unexpected tensor {info.name!r} {list(info.shape)} (no such parameter)")
            continue
        scale = scales.get(canonical_name(info.name, drafter))
        fmt, hf_block, problem = _quant_format(info, scale, fp8_block)
        for slot in slots:  # present, even if unusable below: report it once, not also as missing
            if slot.path in targets:
                covered[slot.path].add("all" if slot.expert is None else slot.expert)
        if problem:
            problems.append(problem)
            continue
        for slot in slots:
            target = targets.get(slot.path)
            part = "all" if slot.expert is None else slot.expert
            where = ".".join(map(str, slot.path))
            if target is None:
                problems.append(f"unexpected tensor {info.name!r}: the model has no parameter {where} "
                                "(check layer_types / config)")
                continue
            want = source_shape(slot, target.shape)
            stored = want[:-1] + (want[-1] // 2,) if fmt == quant.FP4 else want
            if info.shape != stored or (fmt == quant.FP4 and want[-1] % 2):
                packed = " (FP4: two codes per byte)" if fmt == quant.FP4 else ""
                problems.append(f"{info.name}: shape {list(info.shape)}, expected {list(stored)}{packed} for {where}")
                continue
            if fmt is not None:
                want_scale = quant.scale_shape(want, hf_block)
                if scale.shape != want_scale:
                    problems.append(f"{scale.name}: shape {list(scale.shape)}, expected {list(want_scale)} "
                                    f"(one scale per {'x'.join(map(str, hf_block))} block of {info.name} {list(want)})")
                    continue
                if not jnp.issubdtype(target.dtype, jnp.floating):
                    problems.append(f"{info.name}: block-quantized tensor cannot fill {where} ({target.dtype})")
                    continue
                try:
                    if keep_quantized:
                        quant_arrangement(slot, target.shape, hf_block)
                except ValueError as e:
                    problems.append(f"{info.name}: {e} (model parameter {where} {list(target.shape)}); it can be "
                                    "loaded dequantized, not kept block-quantized")
                    continue
            else:
                integer_target = jnp.issubdtype(target.dtype, jnp.integer)
                if (info.dtype not in _INT_DTYPES) if integer_target else (info.dtype not in _FLOAT_DTYPES):
                    hint = " (packed FP4 without its block scale?)" if info.dtype in _FP4_DTYPES else ""
                    problems.append(f"{info.name}: dtype {info.dtype} cannot fill {where} ({target.dtype}){hint}")
                    continue
            key = (slot.path, part, slot.kind)
            if key in seen:
                problems.append(f"{info.name}: duplicate of {seen[key]}")
                continue
            seen[key] = info.name
            assignments.append(Assignment(info, slot, scale, fmt, hf_block))

    formats: dict[tuple, set] = defaultdict(set)
    for a in assignments:
        arrangement = None
        if a.fmt and keep_quantized:
            arrangement = quant_arrangement(a.slot, targets[a.slot.path].shape, a.hf_block)
        formats[a.slot.path].add((a.fmt, arrangement))
    for path, found in formats.items():
        if len(found) > 1:
            problems.append(f"{'.'.join(map(str, path))}: its tensors are stored in different formats "
                            f"{sorted(str(f) for f, _ in found)}")
    for path, target in targets.items():
        parts = covered.get(path, set())
        n_experts = target.shape[0] if len(target.shape) == 3 and path[-2:-1] == ("experts",) else None
        if "all" in parts or (n_experts is not None and parts >= set(range(n_experts))):
            continue
        if n_experts is not None and parts:
            missing_experts = sorted(set(range(n_experts)) - parts)
            problems.append(f"missing experts {missing_experts[:8]} of {'.'.join(map(str, path))}")
        else:
            problems.append(f"missing tensor for {'.'.join(map(str, path))} {list(target.shape)}")
    if problems:
        raise CheckpointError(source, problems)
    return assignments


def units(assignments: list[Assignment]) -> list[Unit]:
    """Groups assignments into units (connected by shared tensors), in checkpoint file order."""
    by_path: dict[tuple, list[Assignment]] = defaultdict(list)
    for a in assignments:
        by_path[a.slot.path].append(a)
    paths_of_tensor: dict[TensorInfo, set] = defaultdict(set)
    for a in assignments:
        paths_of_tensor[a.info].add(a.slot.path)
    done, result = set(), []
    for path in by_path:
        if path in done:
            continue
        group, todo = set(), [path]
        while todo:  # parameters reachable through shared tensors
            p = todo.pop()
            if p not in group:
                group.add(p)
                todo.extend(q for a in by_path[p] for q in paths_of_tensor[a.info])
        done |= group
        members = sorted(group, key=lambda p: [str(x) for x in p])
        parts = [a for p in members for a in sorted(by_path[p], key=lambda a: -1 if a.slot.expert is None
                                                     else a.slot.expert)]
        result.append(Unit(tuple(members), tuple(parts)))
    return sorted(result, key=lambda u: min((a.info.file, a.info.offset) for a in u.assignments))


def output_arrangement(assignment: Assignment, target_shape: tuple[int, ...]
                  ) -> tuple[tuple[int, ...], tuple[int, ...], int | None]:
    """(values shape, scales shape, pack axis) of a parameter kept block-quantized."""
    block, pack_axis = quant_arrangement(assignment.slot, target_shape, assignment.hf_block)
    if assignment.fmt == quant.FP4:
        return quant.packed_shape(target_shape, pack_axis), quant.scale_shape(target_shape, block), pack_axis
    return tuple(target_shape), quant.scale_shape(target_shape, block), None


def unit_output_bytes(unit: Unit, targets: dict, keep_quantized: bool) -> int:
    """Host bytes of a unit's parameters once built."""
    total = 0
    for path in unit.paths:
        first = next(a for a in unit.assignments if a.slot.path == path)
        shape = targets[path].shape
        if keep_quantized and first.fmt:
            values, scales, _ = output_arrangement(first, shape)
            total += int(np.prod(values)) + int(np.prod(scales))  # one byte per FP8 value / FP4 pair / scale
        else:
            total += int(np.prod(shape)) * np.dtype(targets[path].dtype).itemsize
    return total


@dataclasses.dataclass(frozen=True)
class CheckpointPlan:
    """A checked HF-format checkpoint: what to read, and what it becomes."""

    path: str
    config: Config
    schema: mtp_schema.Schema
    files: tuple[str, ...]
    graphdef: nnx.GraphDef
    flat: list
    targets: dict
    units: list[Unit]

    @property
    def quantized(self) -> bool:
        return any(a.fmt for u in self.units for a in u.assignments)


def plan_checkpoint(path: str | os.PathLike, *, dtype=jnp.bfloat16, keep_quantized: bool = False) -> CheckpointPlan:
    """Reads config.json and every safetensors header, and matches them to the model (no tensor data read).
    `keep_quantized` as in `plan`."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path!r} is not a directory")
    with open(os.path.join(path, "config.json")) as f:
        raw_config = json.load(f)
    files = safetensors_files(path)
    infos = read_headers(files)
    # What `mtp.*` holds comes from the names, not from config keys (docs/dspark.md §4). A relative of V4
    # (Vision-Exp, V4.1) is reported with every sign of it in the config and the names, and nothing else.
    schema = mtp_schema.detect(i.name for i in infos)
    family = family_problems(raw_config) + [p for p in schema.problems if p.startswith("DeepSeek-V4")]
    if family:
        raise CheckpointError(path, family)
    config = Config.from_hf(raw_config)
    declared = "an MTP block" if config.num_nextn_predict_layers else "a DSpark drafter" if config.dspark else None
    config, problems = mtp_schema.reconcile(config, schema, raw_config, path)
    if declared and schema.kind == mtp_schema.NONE:
        # HF drops `mtp.*` when it loads or saves, and fine-tunes keep the dspark_* keys without the tensors.
        logger.info("%s: config.json declares %s but there are no mtp.* tensors; loading the trunk", path, declared)
    graphdef, flat = abstract_model(config, dtype)
    targets = {p: v.get_value() for p, v in flat}
    assignments = plan(infos, targets, path, fp8_block=fp8_block_size(raw_config), keep_quantized=keep_quantized,
                       drafter=schema.kind, problems=problems)
    return CheckpointPlan(path, config, schema, tuple(files), graphdef, flat, targets, units(assignments))
