"""The device mesh: three named axes, outermost first (so `data` is the one that spans hosts).

  data    replicas of the whole computation, each on its own slice of the batch
  expert  routed experts split by expert id (the batch is split over it too outside the experts)
  tensor  query heads, shared-expert and routed-expert FFN widths, vocabulary

Mesh axes are Auto-typed (classic sharding propagation): the model's einsums need no per-call
output shardings, and the parts that must not be left to the partitioner run under `shard_map`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "expert", "tensor")


def parse_mesh(spec: str | Mapping[str, int] | None, num_devices: int) -> dict[str, int]:
    """Axis sizes from "data=2,expert=4" (missing axes are 1; one axis may be -1: the devices left).

    None or "" puts every device on `expert` (routed experts are most of MODEL1's parameters).
    """
    if spec is None or spec == "":
        spec = {"expert": -1}
    if isinstance(spec, str):
        parsed: dict[str, int] = {}
        for part in spec.split(","):
            name, eq, size = part.partition("=")
            name = name.strip()
            if not eq or name in parsed:
                raise ValueError(f"mesh {spec!r}: expected comma-separated axis=size with distinct axes "
                                 f"from {MESH_AXES}, got {part!r}")
            try:
                parsed[name] = int(size)
            except ValueError:
                raise ValueError(f"mesh {spec!r}: size of {name!r} must be an integer, got {size!r}") from None
        spec = parsed
    unknown = sorted(set(spec) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"mesh: unknown axes {unknown}; the axes are {MESH_AXES}")
    sizes = {name: int(spec.get(name, 1)) for name in MESH_AXES}
    bad = {n: s for n, s in sizes.items() if s < 1 and s != -1}
    rest = [n for n, s in sizes.items() if s == -1]
    if bad or len(rest) > 1:
        raise ValueError(f"mesh {dict(spec)}: sizes must be positive (one axis may be -1), got {sizes}")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if rest:
        if num_devices % fixed:
            raise ValueError(f"mesh {dict(spec)}: {num_devices} devices do not split into the fixed axes ({fixed})")
        sizes[rest[0]] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(f"mesh {format_axes(sizes)} needs {math.prod(sizes.values())} devices, but {num_devices} are "
                         "available; give sizes whose product is the device count (or -1 for one axis)")
    return sizes


def make_mesh(spec: str | Mapping[str, int] | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "expert", "tensor") mesh with Auto axes over `devices` (default: every visible device,
    on every host once `jax.distributed` is initialised)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh(spec, len(devices))
    return jax.make_mesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES,
                         axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def format_axes(sizes: Mapping[str, int]) -> str:
    return ",".join(f"{k}={v}" for k, v in sizes.items())


def describe(mesh: Mesh) -> str:
    return f"{format_axes(dict(mesh.shape))} over {mesh.size} {mesh.devices.flat[0].platform} devices"



def spec_entry(axes: Sequence[str]) -> str | tuple[str, ...] | None:
    """One PartitionSpec entry for a dimension split over `axes`: None (replicated), a name, or a tuple."""
    axes = tuple(axes)
    return (axes[0] if len(axes) == 1 else axes) if axes else None
