"""The one place that knows both checkpoint formats: `from_pretrained` and `load` (with a sharding layout).

  HF format     config.json + safetensors (single file or sharded; HF, transformers-saved or DeepSeek
                names; dense or the released FP8/FP4 storage) — `io.hf`
  Orbax         a directory written by `m1.save` or the converter — `io.orbax`
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding

from model1_jax.config import Config
from model1_jax.io import hf, orbax
from model1_jax.model.transformer import Model1, abstract_model, merge
from model1_jax.parallel.layout import Layout, attach, shard

HF, ORBAX = "hf", "orbax"


def checkpoint_kind(path: str | os.PathLike) -> str:
    """"orbax" (written by `m1.save` / the converter) or "hf" (config.json + *.safetensors), checking only the
    directory listing; a missing directory or anything else is a `FileNotFoundError` naming what is missing."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path!r}: no such directory")
    if orbax.is_checkpoint(path):
        return ORBAX
    has_config = os.path.isfile(os.path.join(path, "config.json"))
    has_tensors = any(name.endswith(".safetensors") for name in os.listdir(path))
    if has_config and has_tensors:
        return HF
    missing = [what for what, ok in (("config.json", has_config), ("*.safetensors", has_tensors)) if not ok]
    raise FileNotFoundError(f"{path!r} is neither an Orbax checkpoint (m1.save / the converter) nor an HF-format "
                            f"directory: no {' and no '.join(missing)}")


def read_config(path: str | os.PathLike) -> Config:
    """The `Config` of a checkpoint directory of either format, reading no tensor data."""
    return orbax.read_config(path) if checkpoint_kind(path) == ORBAX else Config.from_hf(path)


def from_pretrained(path: str | os.PathLike, *, dtype=jnp.bfloat16, quantized: bool = False,
                    layout: Layout | None = None) -> Model1:
    """Loads a DeepSeek-V4 checkpoint directory (HF format or Orbax, see the module docstring).

    `dtype` is the dtype of the weights and of compute; the parameters the reference keeps in float32 stay
    float32. FP8/FP4 tensors are dequantized exactly, or kept block-quantized (dequantized on the fly in
    each layer) with `quantized=True`; Orbax checkpoints keep whatever they stored. With a `layout` the
    model is placed by it (an Orbax checkpoint is read straight into the shards). For HF checkpoints
    larger than host memory, convert to Orbax first (scripts/convert_checkpoint.py).
    """
    if checkpoint_kind(path) == ORBAX:
        return load(path, dtype=dtype, layout=layout)
    p = hf.plan_checkpoint(path, dtype=dtype, keep_quantized=quantized)
    values = {}
    for unit in p.units:
        for key, value in hf.read_unit(unit, p.targets, keep_quantized=quantized).items():
            values[key] = jax.tree.map(jnp.asarray, value)
    model = merge(p.graphdef, p.flat, values)
    return model if layout is None else shard(model, layout)


def load(directory: str | os.PathLike, *, dtype, layout: Layout | None = None, mesh: jax.sharding.Mesh | None = None,
         shardings: orbax.ShardingSpec | None = None) -> Model1:
    """Restores an Orbax checkpoint (`m1.save`, the converter) as a `Model1` computing in `dtype`.

    With a `layout` every array is read straight into its shard and the layout is attached. Block-quantized
    parameters split their values and scales along the weight's own axes; a split that divides neither is
    reported with every other problem before anything is read. Without one, `mesh` / `shardings` are passed
    to `io.orbax.load` (default: one device).
    """
    if layout is None:
        return orbax.load(directory, dtype=dtype, mesh=mesh, shardings=shardings)
    if mesh is not None or shardings is not None:
        raise ValueError("load: give either a layout or mesh/shardings, not both")
    _, flat = abstract_model(orbax.read_config(directory), dtype)
    layout.shardings(nnx.from_flat_state(flat))  # every dense-shape problem at once
    axes = {path: var.get_metadata()["logical_axes"] for path, var in flat}

    def sharding_of(path: tuple, sds: jax.ShapeDtypeStruct) -> NamedSharding:
        param, what = (path[:-1], f"{'/'.join(map(str, path[:-1]))} ({path[-1]})") if path not in axes else (
            path, "/".join(map(str, path)))
        return layout.sharding(axes[param], sds.shape, what)

    return attach(orbax.load(directory, dtype=dtype, shardings=sharding_of), layout)
