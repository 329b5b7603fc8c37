"""Sharding rules as data: one table from logical axis names to mesh axes, with presets.

Every parameter names its dimensions (`logical_axes` metadata, e.g. ("experts", "expert_mlp", "embed"));
activations and decode state use the activation names below. `Rules` maps each name to a mesh axis, a
tuple of mesh axes, or None (replicated); a name without a rule is an error, so a new parameter cannot
silently fall back to replication.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from model1_jax.parallel.mesh import MESH_AXES

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
