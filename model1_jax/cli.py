"""Command-line pieces shared by the scripts: argument groups and the model they describe.

Scripts stay thin: they parse with these groups and call library functions. Errors in the arguments
end the script with a message naming the flag (`SystemExit`), before any model is built.
"""

from __future__ import annotations

import argparse

from flax import nnx

from model1_jax.config import Config
from model1_jax.inference.state import ATTENTION_BACKENDS, CACHE_DTYPES
from model1_jax.io.pretrained import from_pretrained
from model1_jax.model.transformer import Model1
from model1_jax.parallel.layout import Layout, create
from model1_jax.parallel.rules import PRESETS


def add_sharding_arguments(parser: argparse.ArgumentParser) -> None:
    """--mesh, --layout, --rules, --capacity-factor."""
    group = parser.add_argument_group("sharding (multi-device / multi-host)")
    group.add_argument("--mesh", help="mesh over the visible devices, e.g. data=2,expert=4 (axes data, expert, "
                                      "tensor; one may be -1); without it everything runs on one device")
    group.add_argument("--layout", choices=PRESETS, default="tensor_parallel", help="sharding preset")
    group.add_argument("--rules", default="", help="rule overrides, e.g. experts=expert+tensor,expert_mlp=")
    group.add_argument("--capacity-factor", type=float, default=None,
                       help="cap each routed expert's tokens per shard (drops the excess); default: never drop")


def layout_from_args(args: argparse.Namespace) -> Layout | None:
    """The sharding layout the flags describe, or None without --mesh."""
    if args.mesh is None:
        if args.rules or args.capacity_factor is not None:
            raise SystemExit("--rules and --capacity-factor need --mesh")
        return None
    try:
        return Layout.build(args.mesh, args.layout, args.rules, args.capacity_factor)
    except ValueError as e:
        raise SystemExit(f"--mesh/--layout/--rules: {e}") from None


def add_decode_arguments(parser: argparse.ArgumentParser) -> None:
    """--cache-dtype and --attention-backend of the decode state."""
    group = parser.add_argument_group("decode state")
    group.add_argument("--cache-dtype", choices=CACHE_DTYPES, default="auto",
                       help="KV cache: fp8 (FlashMLA's v4 format), bf16, float32, or auto (default: fp8 where the "
                            "format fits the config, else the compute dtype)")
    group.add_argument("--attention-backend", choices=ATTENTION_BACKENDS, default="auto",
                       help="attention over the caches: xla (jnp reference), pallas (the Pallas kernel, GPU), "
                            "interpret (the kernel in Pallas' interpreter), auto (default: the kernel on a GPU)")


def load_model(path: str, *, dtype, layout: Layout | None = None, quantized: bool = False) -> Model1:
    """`--model DIR`: an HF-format or Orbax checkpoint, placed by the layout (Orbax straight into the shards)."""
    try:
        return from_pretrained(path, dtype=dtype, layout=layout, quantized=quantized)
    except FileNotFoundError as e:
        raise SystemExit(f"--model: {e}") from None


def random_model(config: Config, *, seed: int, dtype, param_dtype=None, layout: Layout | None = None) -> Model1:
    """A seeded random init computing in `dtype`, weights stored in `param_dtype` (default: `dtype`), created
    directly in its shards under a layout."""
    def make():
        return Model1(config, rngs=nnx.Rngs(seed), dtype=dtype, param_dtype=param_dtype or dtype)

    try:
        return make() if layout is None else create(make, layout)
    except ValueError as e:  # the layout does not divide the model
        raise SystemExit(str(e)) from None
