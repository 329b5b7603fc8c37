"""A `Layout` pairs a mesh with rules: where every parameter, activation and decode-state array lives.

It checks that every split divides its dimension and is attached to the model's modules (`shard`,
`create`), which then run their sharded paths: expert parallelism through `shard_map`
(`parallel.expert_parallel`) and sharding constraints on activations. Without a layout the model runs
on one device with no sharding code at all.

    mesh = make_mesh("data=2,expert=4")
    layout = Layout(mesh, Rules.tensor_parallel())
    model = create(lambda: m1.Model1(cfg, rngs=nnx.Rngs(0)), layout)   # never whole on one device
    model = shard(m1.from_pretrained(path), layout)                     # an existing model
    model = m1.load("orbax_dir", dtype=jnp.bfloat16, layout=layout)   # read straight into the shards
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from model1_jax.parallel.mesh import MESH_AXES, format_axes, make_mesh, spec_entry
from model1_jax.parallel.rules import Rules


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where every array lives. `capacity_factor` bounds the tokens each routed expert takes per shard
    (ceil(factor · tokens · k / experts)); None (default) never drops a token."""

    mesh: Mesh
    rules: Rules
    capacity_factor: float | None = None

    def __post_init__(self):
        if not isinstance(self.mesh, Mesh):
            raise TypeError(f"Layout.mesh: expected a jax.sharding.Mesh, got {type(self.mesh).__name__}")
        if tuple(self.mesh.axis_names) != MESH_AXES:
            raise ValueError(f"Layout.mesh: axes must be {MESH_AXES} (use make_mesh), got {self.mesh.axis_names}")
        explicit = [n for n, t in zip(self.mesh.axis_names, self.mesh.axis_types) if t != AxisType.Auto]
        if explicit:
            raise ValueError(f"Layout.mesh: axes {explicit} are not Auto-typed; build the mesh with make_mesh")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ValueError(f"Layout.capacity_factor: expected None or a positive number, got {self.capacity_factor}")

    @classmethod
    def build(cls, mesh: str | Mapping[str, int] | None, preset: str = "tensor_parallel", overrides: str = "",
              capacity_factor: float | None = None, devices: Sequence[jax.Device] | None = None) -> Layout:
        """A layout from command-line style arguments: "data=2,expert=4", a preset name, rule overrides."""
        return cls(make_mesh(mesh, devices), Rules.preset(preset).parse_overrides(overrides), capacity_factor)

    def mesh_axes(self, logical: str) -> tuple[str, ...]:
        """Mesh axes of a logical name, leaving out axes of size 1 (they split nothing)."""
        return tuple(a for a in self.rules[logical] if self.mesh.shape[a] > 1)

    def size(self, axes: Iterable[str]) -> int:
        return math.prod(self.mesh.shape[a] for a in axes)

    def spec(self, logical_axes: Sequence[str | None], shape: Sequence[int] | None = None, what: str = "array") -> P:
        """PartitionSpec for a strict placement (parameters, decode state): every split must divide."""
        problems = self._problems(logical_axes, shape, what)
        if problems:
            raise ValueError("sharding: " + "; ".join(problems))
        return self._spec(logical_axes)

    def sharding(self, logical_axes: Sequence[str | None], shape: Sequence[int] | None = None,
                 what: str = "array") -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(logical_axes, shape, what))

    def _spec(self, logical_axes: Sequence[str | None]) -> P:
        return P(*[spec_entry(self.mesh_axes(name)) if name is not None else None for name in logical_axes])

    def _problems(self, logical_axes: Sequence[str | None], shape: Sequence[int] | None, what: str) -> list[str]:
        problems, used = [], {}
        if shape is not None and len(shape) != len(logical_axes):
            return [f"{what}: {len(logical_axes)} logical axes {tuple(logical_axes)} for shape {tuple(shape)}"]
        for dim, name in enumerate(logical_axes):
            if name is None:
                continue
            try:
                axes = self.mesh_axes(name)
            except KeyError as e:
                problems.append(f"{what}: {e.args[0]}")
                continue
            for a in axes:
                if a in used:
                    problems.append(f"{what}: mesh axis {a!r} splits both dimension {used[a]} and {dim} "
                                    f"(logical {tuple(logical_axes)})")
                used[a] = dim
            n = self.size(axes)
            if shape is not None and shape[dim] % n:
                problems.append(f"{what}: dimension {dim} ({name!r}, size {shape[dim]}) is not divisible by mesh "
                                f"axes {'×'.join(axes)} ({n} devices)")
        return problems

    # -- activations -------------------------------------------------------------------------------

    def activation_spec(self, logical_axes: Sequence[str | None], shape: Sequence[int]) -> P:
        """Like `spec`, but a dimension keeps only the leading mesh axes that divide it (a batch of 1
        on a data axis of 2 is replicated rather than an error)."""
        parts = []
        for name, size in zip(logical_axes, shape):
            kept: list[str] = []
            for a in (self.mesh_axes(name) if name is not None else ()):
                if size % (self.size(kept) * self.mesh.shape[a]):
                    break
                kept.append(a)
            parts.append(spec_entry(kept))
        return P(*parts)

    def activation_sharding(self, logical_axes: Sequence[str | None], shape: Sequence[int]) -> NamedSharding:
        return NamedSharding(self.mesh, self.activation_spec(logical_axes, shape))

    def constrain(self, x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
        if len(logical_axes) != x.ndim:
            raise ValueError(f"constrain: {len(logical_axes)} logical axes {tuple(logical_axes)} for shape {x.shape}")
        return jax.lax.with_sharding_constraint(x, self.activation_sharding(logical_axes, x.shape))

    # -- parameters --------------------------------------------------------------------------------

    def shardings(self, tree: Any) -> Any:
        """NamedShardings for every variable of a module or `nnx.State` (abstract or concrete), from
        its `logical_axes`. Checks everything first and reports every problem at once."""
        state = tree if isinstance(tree, nnx.State) else nnx.state(tree)
        problems = []
        for path, var in nnx.to_flat_state(state):
            axes = var.get_metadata().get("logical_axes")
            what = "/".join(map(str, path))
            if axes is None:
                problems.append(f"{what}: no logical_axes metadata")
                continue
            # A stored value may be a pytree (a block-quantized weight: values and scales); every array in
            # it splits along the weight's own axes.
            leaves = jax.tree_util.tree_leaves_with_path(var.get_value())
            for key, leaf in leaves:
                name = what if len(leaves) == 1 else f"{what} ({jax.tree_util.keystr(key, simple=True)})"
                problems += self._problems(axes, leaf.shape, name)
        if problems:
            raise ValueError(f"sharding: layout {format_axes(dict(self.mesh.shape))} does not fit the model:\n  "
                             + "\n  ".join(_merge_layers(problems)))
        return jax.tree.map(lambda var: NamedSharding(self.mesh, self._spec(var.get_metadata()["logical_axes"])),
                            state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _merge_layers(problems: list[str]) -> list[str]:
    """One line for the same problem in several layers: "layers/{0,2,3}/self_attn/..."."""
    layers: dict[str, list[str]] = {}
    for p in problems:
        m = re.match(r"(.*?\blayers/)(\d+)(/.*)", p)
        key = m.group(1) + "{}" + m.group(3) if m else p
        layers.setdefault(key, []).append(m.group(2) if m else "")
    return [k.replace("{}", ids[0] if len(ids) == 1 else "{" + ",".join(ids) + "}") for k, ids in layers.items()]


# ------------------------------------------------------------------------------------------------
# Placing a model

def attach(model: nnx.Module, layout: Layout | None) -> nnx.Module:
    """Hands the layout to every module that has a sharded path: those that declare a `layout` field (set
    through flax's public `set_attributes`; a model without any such module is an error)."""
    model.set_attributes(layout=layout)
    return model


def initializer(make_model: Callable[[], nnx.Module], layout: Layout) -> tuple[nnx.GraphDef, Callable]:
    """(graphdef, init): `init()` runs `make_model` as one jitted computation whose outputs (the model's
    state) come out sharded by the layout; each device computes only its own shards."""
    graphdef, abstract = nnx.split(nnx.eval_shape(make_model))
    return graphdef, jax.jit(lambda: nnx.state(make_model()), out_shardings=layout.shardings(abstract))


def create(make_model: Callable[[], nnx.Module], layout: Layout) -> nnx.Module:
    """Builds a model (e.g. `lambda: Model1(cfg, rngs=nnx.Rngs(0))`) directly sharded and attaches the
    layout: no parameter is ever whole on one device or on the host.

    jax's partitionable threefry makes the values identical to an unsharded init with the same seed.
    """
    graphdef, init = initializer(make_model, layout)
    return attach(nnx.merge(graphdef, init()), layout)


def shard(model: nnx.Module, layout: Layout) -> nnx.Module:
    """Places an existing model's variables by the layout (in place) and attaches the layout."""
    nnx.update(model, jax.device_put(nnx.state(model), layout.shardings(model)))
    return attach(model, layout)


def abstract_state(make_model: Callable[[], nnx.Module], layout: Layout) -> Any:
    """The model's `nnx.State` as `jax.ShapeDtypeStruct`s carrying their shardings (a restore target)."""
    state = nnx.state(nnx.eval_shape(make_model))
    shardings = layout.shardings(state)
    return jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), state, shardings,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))
