"""One process of tests/test_multihost.py: joins the run, then either shards the model over the global mesh
(data over the two processes, tensor inside each), runs a forward and greedy `m1.generate` and writes JSON, or
(`load CHECKPOINT ORBAX OUT`) loads a checkpoint — HF-format dense and quantized, and its Orbax conversion — straight
into a layout whose expert axis crosses the processes and writes every parameter's full value."""

from __future__ import annotations

import json
import sys

import numpy as np

PROMPTS = [1, 3, 4, 5, 9, 12, 7, 2]


def inputs() -> np.ndarray:
    from tests.test_sharding import CFG
    return np.random.default_rng(0).integers(0, CFG.vocab_size, (len(PROMPTS), 12)).astype(np.int32)


def main(out_path: str) -> None:
    import jax

    from model1_jax.parallel import distributed
    if not distributed.initialize():
        raise SystemExit("multihost_worker: JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID are not set")
    jax.config.update("jax_default_matmul_precision", "highest")
    jax.config.update("jax_disable_most_optimizations", True)
    from flax import nnx

    import model1_jax as m1
    from model1_jax import parallel as sh
    from tests.test_sharding import CFG
    from tests.util import random_model

    layout = sh.Layout.build("data=2,tensor=4", "tensor_parallel")
    model = sh.shard(random_model(CFG), layout)
    ids = inputs()
    x = distributed.from_host(ids, layout.activation_sharding(("batch", "seq"), ids.shape))
    logits = distributed.to_host(nnx.jit(lambda m, x: m(x))(model, x))
    gen = m1.generate(model, [ids[i, :n].tolist() for i, n in enumerate(PROMPTS)], 4, cache_dtype="float32",
                      stop_tokens=(), page_size=4, chunk=8)
    with open(out_path, "w") as f:
        hosts = [sorted({d.process_index for d in row.flat}) for row in layout.mesh.devices]  # per data index
        json.dump(dict(devices=[jax.device_count(), jax.local_device_count()], hosts_of_data=hosts,
                       logits=logits.tolist(), tokens=gen.tokens), f)


# The mesh's outer axis crosses the processes: here `expert` (data is 1), so process 0 holds experts 0-1, process 1
# experts 2-3; only the experts are split (by id), everything else replicated (the toy widths split no further).
LOAD_LAYOUT = ("expert=2,tensor=4", "expert_parallel", "expert_mlp=")


def load(checkpoint: str, orbax_dir: str, out_path: str) -> None:
    """`from_pretrained(layout=...)` dense, then quantized, then `m1.load(orbax_dir, layout=...)`; writes (npz) every
    parameter's leaves as all-gathered bytes, the number of weights dequantized on the devices, and how many scale
    shards this process found out of the device's exact range."""
    import jax

    from model1_jax.parallel import distributed
    if not distributed.initialize():
        raise SystemExit("multihost_worker: JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID are not set")
    jax.config.update("jax_disable_most_optimizations", True)
    import jax.numpy as jnp
    from flax import nnx

    import model1_jax as m1
    from model1_jax.io import device_dequant

    calls, rejected = [], []
    into, exact = device_dequant._dequantize_into, device_dequant.scales_exact
    device_dequant._dequantize_into = lambda w, dtype, sharding: (calls.append(1), into(w, dtype=dtype,
                                                                                        sharding=sharding))[1]
    device_dequant.scales_exact = lambda fmt, scales: exact(fmt, scales) or rejected.append(1) or False
    layout = m1.Layout.build(*LOAD_LAYOUT)
    out = {}
    for name, quantized in (("dense", False), ("quantized", True)):
        model = m1.from_pretrained(checkpoint, dtype=jnp.bfloat16, layout=layout, quantized=quantized, workers=2)
        for path, var in nnx.to_flat_state(nnx.state(model)):
            for i, leaf in enumerate(jax.tree.leaves(var.get_value())):
                bits = np.ascontiguousarray(distributed.to_host(leaf)).reshape(-1).view(np.uint8)
                out[f"{name}/{'/'.join(map(str, path))}/{i}"] = bits
        out[f"{name}/device_calls"] = np.array(len(calls))
        calls.clear()
    out["rejected_scale_shards"] = np.array(len(rejected))
    for path, var in nnx.to_flat_state(nnx.state(m1.load(orbax_dir, dtype=jnp.bfloat16, layout=layout))):
        for i, leaf in enumerate(jax.tree.leaves(var.get_value())):
            out[f"orbax/{'/'.join(map(str, path))}/{i}"] = np.ascontiguousarray(
                distributed.to_host(leaf)).reshape(-1).view(np.uint8)
    np.savez(out_path, **out)


if __name__ == "__main__":
    if sys.argv[1] == "load":
        load(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        main(sys.argv[1])
