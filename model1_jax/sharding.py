"""Sharding as data: a device mesh with named axes and one table from logical axis names to mesh axes.

The mesh has three axes, outermost first (so `data` is the one that spans hosts):
  data    replicas of the whole computation, each on its own slice of the batch
  expert  routed experts split by expert id (the batch is split over it too outside the experts)
  tensor  query heads, shared-expert and routed-expert FFN widths, vocabulary

Every parameter names its dimensions (`logical_axes` metadata, e.g. ("experts", "embed",
"expert_mlp")); activations and decode state use the activation names below. `Rules` maps each
name to a mesh axis, a tuple of mesh axes, or None (replicated); a name without a rule is an
error, so a new parameter cannot silently fall back to replication. A `Layout` pairs a mesh with
rules, checks that every split divides its dimension, and is attached to the model's modules
(`shard`, `create`), which then run their sharded paths: expert parallelism through `shard_map`
(`model1_jax.expert_parallel`) and sharding constraints on activations. Without a layout the model
runs on one device exactly as before.

Mesh axes are Auto-typed (classic sharding propagation): the model's einsums need no per-call
output shardings, and the parts that must not be left to the partitioner run under `shard_map`.

    mesh = make_mesh("data=2,expert=4")
    layout = Layout(mesh, Rules.tensor_parallel())
    model = create(lambda: m1.Model1(cfg, rngs=nnx.Rngs(0)), layout)   # never whole on one device
    model = load("orbax_dir", layout, dtype=jnp.bfloat16)             # read straight into the shards
    model = shard(m1.from_pretrained(path), layout)                     # an existing model
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from model1_jax import checkpoint
from model1_jax.loading import abstract_model

MESH_AXES = ("data", "expert", "tensor")

MeshAxes = str | tuple[str, ...] | None

# Logical names of parameter dimensions (the `logical_axes` metadata of the model's variables).
PARAM_AXES = (
    "vocab", "embed", "embed_out",                                    # embedding, lm_head, MTP projections
    "q_lora", "heads", "head_dim", "o_groups", "heads_per_group", "o_lora",  # attention
    "kv_series", "compress_dim",                                      # CSA/HCA compressors
    "index_heads", "index_head_dim",                                  # lightning indexer
    "experts", "expert_mlp", "router_experts", "mlp",                 # routed experts, router, shared expert
    "hc", "hc_mix",                                                   # mHC hyper-connections
)
# Logical names of activation and decode-state dimensions. Parameter names that also describe an
# activation dimension ("heads", "head_dim", "index_heads", "experts") are shared with it.
ACTIVATION_AXES = (
    "batch",       # sequences: activations, token ids, logits, every decode-state array
    "seq",         # query tokens of a call, cache positions and compressed entries
    "act_embed",   # hidden size of activations and residual streams
    "act_vocab",   # logits' vocabulary
)
LOGICAL_AXES = PARAM_AXES + ACTIVATION_AXES


# ------------------------------------------------------------------------------------------------
# Mesh

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
        raise ValueError(f"mesh {_fmt(sizes)} needs {math.prod(sizes.values())} devices, but {num_devices} are "
                         "available; give sizes whose product is the device count (or -1 for one axis)")
    return sizes


def make_mesh(spec: str | Mapping[str, int] | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "expert", "tensor") mesh with Auto axes over `devices` (default: every visible device,
    on every host once `jax.distributed` is initialised)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh(spec, len(devices))
    return jax.make_mesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES,
                         axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def _fmt(sizes: Mapping[str, int]) -> str:
    return ",".join(f"{k}={v}" for k, v in sizes.items())


def describe(mesh: Mesh) -> str:
    return f"{_fmt(dict(mesh.shape))} over {mesh.size} {mesh.devices.flat[0].platform} devices"


# ------------------------------------------------------------------------------------------------
# Rules

def _as_tuple(axes: MeshAxes | Sequence[str]) -> tuple[str, ...]:
    if axes is None:
        return ()
    if isinstance(axes, str):
        return (axes,)
    return tuple(axes)


@dataclasses.dataclass(frozen=True)
class Rules:
    """Logical axis → mesh axes. Hashable (it is static in the model's graph).

    Build from a preset and override single names: `Rules.expert_parallel().replace(vocab="tensor")`.
    """

    table: tuple[tuple[str, tuple[str, ...]], ...]

    @classmethod
    def of(cls, mapping: Mapping[str, MeshAxes | Sequence[str]]) -> Rules:
        unknown = sorted(set(mapping) - set(LOGICAL_AXES))
        if unknown:
            raise ValueError(f"Rules: unknown logical axes {unknown}; known: {LOGICAL_AXES}")
        missing = [a for a in LOGICAL_AXES if a not in mapping]
        if missing:
            raise ValueError(f"Rules: no rule for logical axes {missing} (use None to replicate)")
        table = tuple((name, _as_tuple(mapping[name])) for name in LOGICAL_AXES)
        bad = sorted({a for _, axes in table for a in axes} - set(MESH_AXES))
        if bad:
            raise ValueError(f"Rules: unknown mesh axes {bad}; the mesh axes are {MESH_AXES}")
        return cls(table)

    def as_dict(self) -> dict[str, tuple[str, ...]]:
        return dict(self.table)

    def __getitem__(self, logical: str) -> tuple[str, ...]:
        for name, axes in self.table:
            if name == logical:
                return axes
        raise KeyError(f"sharding rules: no rule for logical axis {logical!r}; add it to "
                       "model1_jax.sharding.LOGICAL_AXES and to every preset")

    def replace(self, **overrides: MeshAxes | Sequence[str]) -> Rules:
        return Rules.of({**self.as_dict(), **overrides})

    def parse_overrides(self, text: str) -> Rules:
        """Overrides from the command line: "heads=tensor,experts=expert+tensor,vocab=" ("" = replicated)."""
        overrides: dict[str, tuple[str, ...]] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, eq, axes = part.partition("=")
            if not eq:
                raise ValueError(f"rules {text!r}: expected logical=mesh_axis[+mesh_axis], got {part!r}")
            overrides[name.strip()] = tuple(a for a in axes.strip().split("+") if a)
        return self.replace(**overrides)

    # -- presets -----------------------------------------------------------------------------------

    @classmethod
    def replicated(cls, **rules: MeshAxes) -> Rules:
        return cls.of({**{name: None for name in LOGICAL_AXES}, **rules})

    @classmethod
    def data_parallel(cls) -> Rules:
        """Every parameter replicated; the batch split over every mesh axis."""
        return cls.replicated(batch=MESH_AXES)

    @classmethod
    def expert_parallel(cls) -> Rules:
        """Routed experts split by id over `expert` and by FFN width over `tensor`; the rest replicated.

        Outside the experts the batch is split over `data` and `expert`, so attention is data parallel
        there (DeepSeek's own inference layout) and tokens are gathered only for the expert FFNs.
        """
        return cls.replicated(batch=("data", "expert"), experts="expert", expert_mlp="tensor")

    @classmethod
    def tensor_parallel(cls) -> Rules:
        """Expert parallel, plus attention, the indexer, the shared expert and the vocabulary split over
        `tensor` (query heads; whole output groups, so the grouped output projection reduces across it)."""
        return cls.expert_parallel().replace(
            heads="tensor", o_groups="tensor", index_heads="tensor", mlp="tensor", vocab="tensor",
            act_vocab="tensor")

    @classmethod
    def fsdp(cls) -> Rules:
        """Training: tensor parallel, with every weight's hidden dimension also split over `data` (gathered
        where it is used); optimizer state follows the parameters."""
        return cls.tensor_parallel().replace(embed="data")

    @classmethod
    def preset(cls, name: str) -> Rules:
        presets = {"data_parallel": cls.data_parallel, "expert_parallel": cls.expert_parallel,
                   "tensor_parallel": cls.tensor_parallel, "fsdp": cls.fsdp}
        if name not in presets:
            raise ValueError(f"sharding preset {name!r}: expected one of {sorted(presets)}")
        return presets[name]()


PRESETS = ("data_parallel", "expert_parallel", "tensor_parallel", "fsdp")


# ------------------------------------------------------------------------------------------------
# Layout: mesh + rules

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
        parts = [self.mesh_axes(name) if name is not None else () for name in logical_axes]
        return P(*[(p[0] if len(p) == 1 else p) if p else None for p in parts])

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
            parts.append((kept[0] if len(kept) == 1 else tuple(kept)) if kept else None)
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
            value = var.get_value()
            if hasattr(value, "dequantize"):  # block-quantized: values and scales both split along the weight's axes
                problems += self._problems(axes, value.values.shape, f"{what} (values)")
                problems += self._problems(axes, value.scales.shape, f"{what} (scales)")
            else:
                problems += self._problems(axes, var.shape, what)
        if problems:
            raise ValueError(f"sharding: layout {_fmt(dict(self.mesh.shape))} does not fit the model:\n  "
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The scripts' sharding flags: --mesh, --layout, --rules, --capacity-factor."""
    group = parser.add_argument_group("sharding (multi-device / multi-host)")
    group.add_argument("--mesh", help="mesh over the visible devices, e.g. data=2,expert=4 (axes data, expert, "
                                      "tensor; one may be -1); without it everything runs on one device")
    group.add_argument("--layout", choices=PRESETS, default="tensor_parallel", help="sharding preset")
    group.add_argument("--rules", default="", help="rule overrides, e.g. experts=expert+tensor,expert_mlp=")
    group.add_argument("--capacity-factor", type=float, default=None,
                       help="cap each routed expert's tokens per shard (drops the excess); default: never drop")


def layout_from_args(args: argparse.Namespace) -> Layout | None:
    if args.mesh is None:
        if args.rules or args.capacity_factor is not None:
            raise SystemExit("--rules and --capacity-factor need --mesh")
        return None
    try:
        return Layout.build(args.mesh, args.layout, args.rules, args.capacity_factor)
    except ValueError as e:
        raise SystemExit(f"--mesh/--layout/--rules: {e}") from None


# ------------------------------------------------------------------------------------------------
# Placing a model

def attach(model: nnx.Module, layout: Layout | None) -> nnx.Module:
    """Hands the layout to every module that has a sharded path (those declaring a `layout` attribute)."""
    for _, module in nnx.iter_modules(model):
        if hasattr(type(module), "layout"):
            module.layout = layout
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


def load(directory: str, layout: Layout, *, dtype) -> nnx.Module:
    """`m1.load` (Orbax) with every array read straight into its shard, and the layout attached.

    Block-quantized parameters split their values and scales along the weight's own axes; a split
    that does not divide either is reported with the others before anything is read.
    """
    _, flat = abstract_model(checkpoint.read_config(directory), dtype)
    layout.shardings(nnx.from_flat_state(flat))  # every dense-shape problem at once
    axes = {path: var.get_metadata()["logical_axes"] for path, var in flat}

    def sharding_of(path: tuple, sds: jax.ShapeDtypeStruct) -> NamedSharding:
        param, what = (path[:-1], f"{'/'.join(map(str, path[:-1]))} ({path[-1]})") if path not in axes else (
            path, "/".join(map(str, path)))
        return layout.sharding(axes[param], sds.shape, what)

    return attach(checkpoint.load(directory, dtype=dtype, shardings=sharding_of), layout)


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
