"""Sharding as data: the mesh, logical-axis rules, the `Layout` that places a model, expert parallelism and
multi-host start-up. Nothing here knows the model; the model's modules read an attached `Layout`."""

from model1_jax.parallel.layout import Layout, abstract_state, attach, create, initializer, shard
from model1_jax.parallel.mesh import MESH_AXES, describe, make_mesh, parse_mesh
from model1_jax.parallel.rules import ACTIVATION_AXES, LOGICAL_AXES, PARAM_AXES, PRESETS, Rules

__all__ = ["ACTIVATION_AXES", "LOGICAL_AXES", "MESH_AXES", "PARAM_AXES", "PRESETS", "Layout", "Rules",
           "abstract_state", "attach", "create", "describe", "initializer", "make_mesh", "parse_mesh", "shard"]
