"""Low-rank adapters (LoRA) on chosen projections of a frozen base.

A projection `y = einsum(eqn, x, W)` (`layers.Linear`, any shaped kernel) gets
    y += (α / l) · einsum(einsum(x, A), B),   A [fan-in axes…, l],  B [l, fan-out axes…]
with axes shared by x, W and y (the output groups g of o_a_proj) kept on both factors, so that
ΔW = (α/l)·A·B has W's exact shape: `merge_lora` adds it and the merged model computes what the
adapted one does. B starts at 0 (training starts from the base model), A ~ N(0, 1/fan_in).

Adapter weights are `nnx.LoRAParam` (fp32), and the kernel read stays `layers.weight(kernel)`, so a
quantized base (values with `.dequantize`) works unchanged beneath its adapters. `nnx.state(model,
nnx.LoRAParam)` is exactly the adapters: the trainer's optimizer state covers them only, and the
base stays bit-identical.

Targets are regular expressions over module paths (`layers.3.self_attn.q_a_proj`) or presets:
  attention       the q/kv/o projections of every attention (main layers and the MTP block)
  shared_experts  the shared expert's gate/up/down projections
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from optax.contrib import MuonDimensionNumbers
from safetensors.numpy import load_file, save_file

from model1_jax.common import positive_int
from model1_jax.model.layers import Linear, weight
from model1_jax.model.quant import is_quantized

F32 = jnp.float32
RANK = "l"  # the letter of the adapter rank in einsum strings (layers.py vocabulary)
PRESETS = {
    "attention": r"self_attn\.(q_a_proj|q_b_proj|kv_proj|o_a_proj|o_b_proj)$",
    "shared_experts": r"shared_experts\.(gate_proj|up_proj|down_proj)$",
}
ADAPTERS_FILE, CONFIG_FILE = "adapters.safetensors", "adapter_config.json"


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("attention",)

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        positive_int(self.rank, "LoRAConfig.rank")
        if not self.targets:
            raise ValueError("LoRAConfig.targets: at least one target is required")
        for t in self.targets:
            try:
                re.compile(PRESETS.get(t, t))
            except re.error as e:
                raise ValueError(f"LoRAConfig.targets: {t!r} is neither a preset {sorted(PRESETS)} "
                                 f"nor a valid regular expression ({e})") from None

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _split_eqn(eqn: str) -> tuple[str, str, str]:
    lhs, out = eqn.replace(" ", "").split("->")
    x, kernel = lhs.split(",")
    if RANK in eqn:
        raise ValueError(f"LoRA: the einsum {eqn!r} already uses the rank letter {RANK!r}")
    return x, kernel, out


class LoRA(nnx.Module):
    """The adapter of one `Linear` with einsum `eqn` and kernel shape/axes: factors `a` and `b`."""

    def __init__(self, eqn: str, kernel_shape: Sequence[int], kernel_axes: Sequence[str | None], rank: int,
                 alpha: float, *, rngs: nnx.Rngs, dtype=jnp.float32):
        x, kernel, out = _split_eqn(eqn)
        size = dict(zip(kernel, kernel_shape))
        axis = dict(zip(kernel, kernel_axes))
        batch = [a for a in kernel if a in x and a in out]
        fan_in = [a for a in kernel if a in x and a not in out]
        fan_out = [a for a in kernel if a not in x and a in out]
        self.a_spec = "".join(a for a in kernel if a in batch or a in fan_in) + RANK
        self.b_spec = "".join(batch) + RANK + "".join(fan_out)
        self.kernel_spec = kernel
        # x · A keeps x's letters except the contracted ones, and adds the rank.
        self.hidden_spec = "".join(a for a in x if a not in fan_in) + RANK
        self.x_spec, self.out_spec, self.fan_in = x, out, "".join(fan_in)
        self.scale = alpha / rank
        self.dtype = dtype
        a_shape = [size[a] for a in self.a_spec[:-1]] + [rank]
        b_shape = [size[a] for a in batch] + [rank] + [size[a] for a in fan_out]
        std = float(np.prod([size[a] for a in fan_in])) ** -0.5
        # The kernel's logical axes carry over, so a sharded base shards its adapters alike; the rank is
        # small and never split (None).
        self.a = nnx.LoRAParam(std * jax.random.normal(rngs.params(), tuple(a_shape), F32),
                               logical_axes=tuple(axis[a] for a in self.a_spec[:-1]) + (None,))
        self.b = nnx.LoRAParam(jnp.zeros(tuple(b_shape), F32),
                               logical_axes=tuple(axis[a] for a in batch) + (None,) + tuple(axis[a] for a in fan_out))

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jnp.einsum(f"{self.x_spec},{self.a_spec}->{self.hidden_spec}", x.astype(self.dtype),
                       weight(self.a, self.dtype))
        y = jnp.einsum(f"{self.hidden_spec},{self.b_spec}->{self.out_spec}", h, weight(self.b, self.dtype))
        return y * jnp.asarray(self.scale, self.dtype)

    def delta(self) -> jax.Array:
        """ΔW = scale · A·B in float32, shaped like the kernel."""
        return self.scale * jnp.einsum(f"{self.a_spec},{self.b_spec}->{self.kernel_spec}",
                                       self.a.get_value().astype(F32), self.b.get_value().astype(F32))

    def muon_dims(self) -> dict[tuple, MuonDimensionNumbers]:
        """Matrix views of the factors for Muon (`optim.matrix_dims`): A is fan-in → rank, B rank → fan-out."""
        a_in = tuple(i for i, a in enumerate(self.a_spec) if a in self.fan_in)
        r = self.b_spec.index(RANK)
        return {("a",): MuonDimensionNumbers(a_in, len(self.a_spec) - 1),
                ("b",): MuonDimensionNumbers(r, tuple(range(r + 1, len(self.b_spec))))}


def _patterns(targets: Sequence[str]) -> list[tuple[str, re.Pattern]]:
    return [(t, re.compile(PRESETS.get(t, t))) for t in targets]


def find_targets(model: nnx.Module, targets: Sequence[str]) -> list[tuple[str, Linear]]:
    """(dotted path, Linear) for every projection a target matches; a target matching none is an error."""
    linears = [(".".join(map(str, path)), m) for path, m in nnx.iter_modules(model) if isinstance(m, Linear)]
    found, unmatched = {}, []
    for name, pattern in _patterns(targets):
        hits = [(p, m) for p, m in linears if pattern.search(p)]
        if not hits:
            unmatched.append(name)
        found.update(hits)
    if unmatched:
        examples = ", ".join(p for p, _ in linears[:4])
        raise ValueError(f"LoRA targets {unmatched} match no projection of this model "
                         f"(presets: {sorted(PRESETS)}; paths look like {examples}, ...)")
    return sorted(found.items())


def apply_lora(model: nnx.Module, config: LoRAConfig, *, rngs: nnx.Rngs) -> list[str]:
    """Attaches fresh adapters to every targeted projection (in place); returns their paths."""
    targets = find_targets(model, config.targets)
    taken = [p for p, linear in targets if linear.lora is not None]
    if taken:
        raise ValueError(f"LoRA: {taken[:3]} already have adapters")
    for _, linear in targets:
        kernel = linear.kernel
        axes = kernel.get_metadata().get("logical_axes") or (None,) * len(kernel.shape)
        linear.lora = LoRA(linear.eqn, kernel.shape, axes, config.rank, config.alpha, rngs=rngs, dtype=linear.dtype)
    return [p for p, _ in targets]


def adapted(model: nnx.Module) -> list[tuple[str, Linear]]:
    return [(".".join(map(str, p)), m) for p, m in nnx.iter_modules(model)
            if isinstance(m, Linear) and m.lora is not None]


def merge_lora(model: nnx.Module, dtype=None) -> nnx.Module:
    """Folds every adapter into its kernel (in place) and removes it.

    The sum is formed in float32 from the dequantized base and stored as `dtype` (default: the
    kernel's own dtype, or bfloat16 for a quantized kernel, which a merge cannot keep quantized).
    """
    for _, linear in adapted(model):
        base = linear.kernel.get_value()
        quantized = is_quantized(base)
        target = dtype or (jnp.bfloat16 if quantized else base.dtype)
        merged = weight(linear.kernel, F32) + linear.lora.delta()
        linear.kernel.set_value(merged.astype(target))
        linear.lora = None
    return model


def save_adapters(model: nnx.Module, directory: str | os.PathLike, config: LoRAConfig) -> str:
    """Writes the adapters alone: `adapters.safetensors` (fp32) and `adapter_config.json`."""
    pairs = adapted(model)
    if not pairs:
        raise ValueError("save_adapters: the model has no LoRA adapters")
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    tensors = {}
    for path, linear in pairs:
        tensors[f"{path}.lora.a"] = np.asarray(linear.lora.a.get_value(), np.float32)
        tensors[f"{path}.lora.b"] = np.asarray(linear.lora.b.get_value(), np.float32)
    save_file(tensors, os.path.join(directory, ADAPTERS_FILE))
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump({**dataclasses.asdict(config), "targets": list(config.targets),
                   "adapted": [p for p, _ in pairs]}, f, indent=2)
    return directory


def load_adapters(model: nnx.Module, directory: str | os.PathLike) -> LoRAConfig:
    """Attaches the adapters written by `save_adapters` to a base model (in place).

    Every name and shape is checked before any value is set; on a mismatch the model is left as it was.
    """
    directory = os.fspath(directory)
    cfg_path, file = os.path.join(directory, CONFIG_FILE), os.path.join(directory, ADAPTERS_FILE)
    for p in (cfg_path, file):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"load_adapters: {p} is missing")
    with open(cfg_path) as f:
        raw = json.load(f)
    config = LoRAConfig(rank=raw["rank"], alpha=raw["alpha"], targets=tuple(raw["targets"]))
    tensors = load_file(file)
    apply_lora(model, config, rngs=nnx.Rngs(0))
    variables, problems = {}, []
    for path, linear in adapted(model):
        for name in ("a", "b"):
            key, var = f"{path}.lora.{name}", getattr(linear.lora, name)
            variables[key] = var
            if key not in tensors:
                problems.append(f"missing {key}")
            elif tensors[key].shape != var.shape:
                problems.append(f"{key}: shape {list(tensors[key].shape)}, expected {list(var.shape)}")
    problems += [f"unexpected {k}" for k in tensors if k not in variables]
    if problems:
        for _, linear in adapted(model):
            linear.lora = None
        raise ValueError(f"load_adapters: {directory} does not fit this model: " + "; ".join(problems[:20]))
    for key, var in variables.items():
        var.set_value(jnp.asarray(tensors[key], F32))
    return config
