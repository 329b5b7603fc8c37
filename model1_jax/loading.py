"""`from_pretrained`: a Hugging Face-format directory (config.json + safetensors) → `Model1`.

The checkpoint is checked completely before any tensor is read: every tensor must map onto a
parameter with the right shape and a usable dtype, and every parameter must be covered. All
problems are reported together in one `CheckpointError`. The model is built abstractly
(`nnx.eval_shape`), so no random weights are ever materialised.
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
from safetensors import safe_open

from model1_jax.config import Config
from model1_jax.hf_names import QUANT_SCALE_SUFFIXES, Slot, slots_for, source_shape, to_model_layout
from model1_jax.model import Model1

logger = logging.getLogger(__name__)

_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
_INT_DTYPES = {"I64", "I32", "I16", "U8", "I8", "U16", "U32", "U64"}
_QUANT_DTYPES = {"F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "F8_E4M3FN"}


class CheckpointError(ValueError):
    """A checkpoint that does not match the model; the message lists every problem found."""

    def __init__(self, source: str, problems: list[str]):
        self.problems = problems
        shown = problems[:50]
        more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        super().__init__(f"{source}: {len(problems)} problem(s) in checkpoint:\n  " + "\n  ".join(shown) + more)


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    file: str
    name: str
    dtype: str
    shape: tuple[int, ...]


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
    """Names, dtypes and shapes of every tensor, without reading data."""
    infos, problems = [], []
    for file in files:
        try:
            with safe_open(file, framework="numpy") as f:
                for name in f.keys():
                    view = f.get_slice(name)
                    infos.append(TensorInfo(file, name, view.get_dtype(), tuple(view.get_shape())))
        except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
            problems.append(f"{os.path.basename(file)}: unreadable safetensors file ({e})")
    if problems:
        raise CheckpointError(os.path.dirname(files[0]), problems)
    return infos


def plan(infos: list[TensorInfo], targets: dict[tuple, jax.ShapeDtypeStruct], source: str
         ) -> list[tuple[TensorInfo, Slot]]:
    """Matches tensors to parameters; raises `CheckpointError` with every mismatch."""
    names = {i.name for i in infos}
    problems: list[str] = []
    assignments: list[tuple[TensorInfo, Slot]] = []
    covered: dict[tuple, set] = defaultdict(set)
    seen: dict[tuple, str] = {}
    quantized = [i.name for i in infos if is_quant_scale(i.name, names) or i.dtype in _QUANT_DTYPES]
    if quantized:
        raise CheckpointError(source, [
            f"quantized (FP8/FP4) tensors are not supported by from_pretrained yet, e.g. {quantized[:3]}; "
            "dequantize the checkpoint to bf16/fp32 first"])
    for info in infos:
        slots = slots_for(info.name)
        if not slots:
            problems.append(f"unexpected tensor {info.name!r} {list(info.shape)} (no such parameter)")
            continue
        for slot in slots:
            target = targets.get(slot.path)
            part = "all" if slot.expert is None else slot.expert
            if target is not None:  # present, even if unusable below: report it once, not also as missing
                covered[slot.path].add(part)
            if target is None:
                problems.append(f"unexpected tensor {info.name!r}: the model has no parameter "
                                f"{'.'.join(map(str, slot.path))} (check layer_types / config)")
                continue
            want = source_shape(slot, target.shape)
            if info.shape != want:
                problems.append(f"{info.name}: shape {list(info.shape)}, expected {list(want)} "
                                f"for {'.'.join(map(str, slot.path))}")
                continue
            integer_target = jnp.issubdtype(target.dtype, jnp.integer)
            if (info.dtype not in _INT_DTYPES) if integer_target else (info.dtype not in _FLOAT_DTYPES):
                problems.append(f"{info.name}: dtype {info.dtype} cannot fill {'.'.join(map(str, slot.path))} "
                                f"({target.dtype})")
                continue
            key = (slot.path, part, slot.kind)
            if key in seen:
                problems.append(f"{info.name}: duplicate of {seen[key]}")
                continue
            seen[key] = info.name
            assignments.append((info, slot))
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


def is_quant_scale(name: str, names: set[str]) -> bool:
    """A block scale of an FP8/FP4 weight: `X.weight_scale_inv`, or `X.scale` next to `X.weight`.

    (mHC parameters are also called `scale`, so the suffix alone proves nothing.)
    """
    for suffix in QUANT_SCALE_SUFFIXES:
        if name.endswith(suffix):
            stem = name[: -len(suffix)]
            return suffix == ".weight_scale_inv" or f"{stem}.weight" in names
    return False


def _abstract_model(config: Config, dtype) -> tuple[nnx.GraphDef, list]:
    abstract = nnx.eval_shape(lambda: Model1(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype))
    graphdef, state = nnx.split(abstract)
    return graphdef, list(nnx.to_flat_state(state))


def from_pretrained(path: str | os.PathLike, *, dtype=jnp.bfloat16) -> Model1:
    """Loads an HF-format DeepSeek-V4 directory (single-file or sharded safetensors, HF or DeepSeek names).

    `dtype` is the dtype of the weights and of compute; the parameters the reference keeps in float32
    (norms, mHC, sinks, position biases, router bias) stay float32.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"from_pretrained: {path!r} is not a directory")
    config = Config.from_hf(path)
    with open(os.path.join(path, "config.json")) as f:
        raw_config = json.load(f)
    if raw_config.get("quantization_config"):
        raise CheckpointError(path, [
            "config.json declares quantization_config (FP8/FP4 checkpoint); quantized checkpoints are not "
            "supported by from_pretrained yet — dequantize to bf16/fp32 first"])
    infos = read_headers(safetensors_files(path))
    if config.num_nextn_predict_layers and not any(s.path[0] == "mtp" for i in infos for s in slots_for(i.name)):
        # HF drops `mtp.*` when it loads or saves, so HF-saved checkpoints carry no MTP block.
        logger.info("%s: no MTP tensors in the checkpoint; loading without the MTP block", path)
        config = config.replace(num_nextn_predict_layers=0)
    graphdef, flat = _abstract_model(config, dtype)
    targets = {p: v.get_value() for p, v in flat}
    assignments = plan(infos, targets, path)

    host: dict[tuple, np.ndarray] = {}
    by_file: dict[str, list[tuple[TensorInfo, Slot]]] = defaultdict(list)
    for info, slot in assignments:
        by_file[info.file].append((info, slot))
    for file, items in by_file.items():
        with safe_open(file, framework="numpy") as f:
            for info, slot in items:
                target = targets[slot.path]
                np_dtype = np.dtype(target.dtype)
                value = to_model_layout(slot, f.get_tensor(info.name), target.shape).astype(np_dtype)
                if slot.expert is None:
                    host[slot.path] = value
                else:  # one expert's row of a stacked parameter
                    host.setdefault(slot.path, np.empty(target.shape, np_dtype))[slot.expert] = value
    state = nnx.from_flat_state([(p, v.replace(jnp.asarray(host[p]))) for p, v in flat])
    return nnx.merge(graphdef, state)
