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
from model1_jax.io import device_dequant, hf, orbax, orbax_load, placement, regions
from model1_jax.io.reader import progress_bar
from model1_jax.model.transformer import Model1, abstract_model, merge
from model1_jax.parallel.layout import Layout, attach

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
                    layout: Layout | None = None, workers: int | None = None, progress: bool | None = None) -> Model1:
    """Loads a DeepSeek-V4 checkpoint directory (HF format or Orbax, see the module docstring).

    `dtype` is the dtype of the weights and of compute; the parameters the reference keeps in float32 stay
    float32. FP8/FP4 tensors are dequantized exactly, or kept block-quantized (dequantized on the fly in
    each layer) with `quantized=True`; Orbax checkpoints keep whatever they stored. With a `layout` every
    array is read straight into its shards: each process reads only the byte ranges of its own devices'
    shards, one shard at a time (docs/checkpoints.md §7.3). `workers` reading threads (default: the CPUs);
    `progress` shows a bar with the read rate (default: when stderr is a terminal).
    """
    if checkpoint_kind(path) == ORBAX:
        return load(path, dtype=dtype, layout=layout, progress=progress)
    p = hf.plan_checkpoint(path, dtype=dtype, keep_quantized=quantized)
    source = sum(u.source_bytes for u in p.units)
    with progress_bar(source, "loading", progress) as bar:
        if layout is not None:
            return attach(merge(p.graphdef, p.flat, placement.read_sharded(p, layout, keep_quantized=quantized,
                                                                           workers=workers, bar=bar)), layout)
        values = {}
        # dense: FP8/FP4 weights are read kept quantized and dequantized on the device (io.device_dequant)
        on_device = frozenset() if quantized else device_dequant.dequantized_on_device(p)

        def done(key: tuple, value) -> None:
            if key in on_device:
                values[key] = device_dequant.to_dense(value, p.targets[key].dtype)
            else:
                values[key] = jax.tree.map(jax.device_put, value)  # adopts the aligned host buffer on a CPU

        regions.read_units(p.units, p.targets, keep_quantized=quantized or on_device, workers=workers, bar=bar,
                           on_complete=done)
    return merge(p.graphdef, p.flat, values)


def load(directory: str | os.PathLike, *, dtype, layout: Layout | None = None, mesh: jax.sharding.Mesh | None = None,
         shardings: orbax_load.ShardingSpec | None = None, progress: bool | None = None) -> Model1:
    """Restores an Orbax checkpoint (`m1.save`, the converter) as a `Model1` computing in `dtype`.

    With a `layout` every array is read straight into its shard and the layout is attached. Block-quantized
    parameters split their values and scales along the weight's own axes; a split that divides neither is
    reported with every other problem before anything is read. Without one, `mesh` / `shardings` are passed
    to `io.orbax_load.load` (default: one device). `progress` as in `from_pretrained`.
    """
    if layout is None:
        return orbax_load.load(directory, dtype=dtype, mesh=mesh, shardings=shardings, progress=progress)
    if mesh is not None or shardings is not None:
        raise ValueError("load: give either a layout or mesh/shardings, not both")
    _, flat = abstract_model(orbax.read_config(directory), dtype)
    layout.shardings(nnx.from_flat_state(flat))  # every dense-shape problem at once
    axes = {path: var.get_metadata()["logical_axes"] for path, var in flat}

    def sharding_of(path: tuple, sds: jax.ShapeDtypeStruct) -> NamedSharding:
        param, what = (path[:-1], f"{'/'.join(map(str, path[:-1]))} ({path[-1]})") if path not in axes else (
            path, "/".join(map(str, path)))
        return layout.sharding(axes[param], sds.shape, what)

    return attach(orbax_load.load(directory, dtype=dtype, shardings=sharding_of, progress=progress), layout)
