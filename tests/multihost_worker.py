"""One process of tests/test_multihost.py: joins the run, shards the model over the global mesh
(data over the two processes, tensor inside each), runs a forward and greedy `m1.generate`, writes JSON."""

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


if __name__ == "__main__":
    main(sys.argv[1])
