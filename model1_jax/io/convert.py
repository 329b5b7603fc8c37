"""Streaming conversion of a DeepSeek-V4 checkpoint (HF or DeepSeek names; dense or FP8/FP4) to Orbax.

The whole checkpoint is checked first (`loading.plan_checkpoint`: names, shapes, dtypes, block
scales, config) and nothing is written unless it is sound. Then parameters are built one unit at a
time (`loading.read_unit`: each tensor read once with `pread`, rearranged into the model layout,
per-expert tensors written straight into their row of the stacked parameter) and handed to a
`checkpoint.Writer`, which writes an Orbax item whenever its buffer would pass `budget_bytes`.

Host memory therefore stays at about

    peak ≈ runtime + max over units of [ max(budget, unit output) + one tensor's temporaries ]

where a unit's output is one parameter (two for HF's merged gate_up_proj) in the output format, and
a tensor's temporaries are its raw bytes (plus a float32 copy when it is dequantized). With the
default budget (the largest source file), peak ≈ runtime + 2 × largest file as long as no single
output parameter is larger than a file. `memory_plan` computes the bound for a given checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from model1_jax.common import human_bytes
from model1_jax.io import orbax as checkpoint
from model1_jax.io.hf import CheckpointPlan, Unit, plan_checkpoint, read_unit, unit_output_bytes
from model1_jax.model import quant


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    source_bytes: int
    output_bytes: int
    largest_file: int
    budget: int
    largest_unit: int       # output bytes of the largest unit
    largest_temporary: int  # raw + float32 bytes of the largest tensor being converted
    peak_bound: int         # excluding the runtime (Python, JAX, Orbax)


@dataclasses.dataclass(frozen=True)
class ConversionStats:
    path: str
    tensors: int
    parameters: int
    items: int
    source_bytes: int
    output_bytes: int
    seconds: float

    @property
    def gb_per_s(self) -> float:
        """Source bytes read and converted per second (GB = 1e9 bytes)."""
        return self.source_bytes / self.seconds / 1e9


def _temporary_bytes(unit: Unit, keep_quantized: bool) -> int:
    worst = 0
    for a in unit.assignments:
        raw = a.info.nbytes + (a.scale.nbytes if a.scale else 0)
        if a.fmt and not keep_quantized:  # float32 dequantized copy (of one expert for stacked tensors)
            per_expert = a.info.shape[0] if len(a.info.shape) == 3 else 1
            raw += 4 * int(np.prod(a.info.shape)) * (2 if a.fmt == quant.FP4 else 1) // per_expert
        worst = max(worst, raw)
    return worst


def memory_plan(plan: CheckpointPlan, *, quantized: bool, budget_bytes: int | None = None) -> MemoryPlan:
    """Bytes read and written, and the bound on host memory the conversion will need."""
    largest_file = max(os.path.getsize(f) for f in plan.files)
    budget = largest_file if budget_bytes is None else budget_bytes
    outputs = [unit_output_bytes(u, plan.targets, quantized) for u in plan.units]
    temporaries = [_temporary_bytes(u, quantized) for u in plan.units]
    peak = max(max(budget, out) + tmp for out, tmp in zip(outputs, temporaries))
    source = sum(u.source_bytes for u in plan.units)
    return MemoryPlan(source, sum(outputs), largest_file, budget, max(outputs), max(temporaries), peak)


def describe(plan: CheckpointPlan, mem: MemoryPlan, *, quantized: bool) -> str:
    """A readable summary of a checked checkpoint and of the conversion's memory plan."""
    cfg = plan.config
    tensors = {a.info.name for u in plan.units for a in u.assignments}
    formats = sorted({a.fmt for u in plan.units for a in u.assignments if a.fmt})
    kept = "kept block-quantized" if quantized else "dequantized exactly"
    hb = human_bytes
    return "\n".join([
        f"source      {plan.path}: {len(plan.files)} file(s), {len(tensors)} tensors, {human_bytes(mem.source_bytes)}",
        f"schema      {plan.schema.describe()}",
        f"model       {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {cfg.n_routed_experts} experts"
        f"{', MTP block' if cfg.num_nextn_predict_layers else ''}"
        f"{f', DSpark drafter ({cfg.dspark.num_stages} stages)' if cfg.dspark else ''}; {len(plan.targets)} "
        f"parameters in {len(plan.units)} units",
        f"storage     {', '.join(formats) + ' (' + kept + ')' if formats else 'dense'}",
        f"output      {human_bytes(mem.output_bytes)}",
        f"memory      item budget {hb(mem.budget)} (largest source file {hb(mem.largest_file)}), largest "
        f"parameter unit {hb(mem.largest_unit)}, largest tensor temporaries {hb(mem.largest_temporary)}",
        f"            peak host memory ≤ {human_bytes(mem.peak_bound)} + runtime (Python/JAX/Orbax)",
    ])


def convert(source: str | os.PathLike, output: str | os.PathLike, *, dtype=jnp.bfloat16, quantized: bool = False,
            overwrite: bool = False, budget_bytes: int | None = None, progress: bool = True) -> ConversionStats:
    """Converts a checkpoint directory to an Orbax checkpoint that `model1_jax.load` reads.

    dtype:     storage dtype of the dense parameters (FP8/FP4 dequantized exactly into it unless
               `quantized`); the parameters the reference keeps in float32 stay float32.
    quantized: keep FP8 linears as float8_e4m3fn values + UE8M0 scales and FP4 experts as packed
               e2m1 codes + scales, in the model layout (the model dequantizes them on the fly).
    Raises `CheckpointError` (every problem listed) or FileExistsError before anything is written.
    """
    checkpoint.check_destination(output, overwrite=overwrite)
    plan = plan_checkpoint(source, dtype=dtype, keep_quantized=quantized)
    mem = memory_plan(plan, quantized=quantized, budget_bytes=budget_bytes)
    start = time.perf_counter()
    bar = tqdm(total=mem.source_bytes, unit="B", unit_scale=True, desc="converting", disable=not progress)
    with checkpoint.Writer(output, plan.config, overwrite=overwrite, budget_bytes=mem.budget) as writer:
        for unit in plan.units:
            writer.reserve(unit_output_bytes(unit, plan.targets, quantized))
            values = read_unit(unit, plan.targets, keep_quantized=quantized)
            for path in list(values):
                writer.add(path, values.pop(path))  # the writer's buffer holds the only reference
            bar.update(unit.source_bytes)
    bar.close()
    tensors = {a.info.name for u in plan.units for a in u.assignments}
    return ConversionStats(writer.final, len(tensors), len(plan.targets), len(writer.items), mem.source_bytes,
                           mem.output_bytes, time.perf_counter() - start)
