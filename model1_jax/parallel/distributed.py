"""Multi-host start-up and per-device memory accounting.

Multi-host runs use JAX's own runtime: every host runs the same script, `initialize()` connects
them through `jax.distributed.initialize()`, and `jax.devices()` then lists every host's devices,
so `sharding.make_mesh` spans them all (`data` outermost, so it is the axis that crosses hosts).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from model1_jax.common import human_bytes

# Set by the launcher on every host when processes are started by hand (see the README).
ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"


def _managed_cluster() -> bool:
    """SLURM (srun) or Open MPI (mpirun) with more than one task: jax detects the rest itself."""
    return int(os.environ.get("SLURM_NTASKS", "1")) > 1 or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1


def initialize() -> bool:
    """Calls `jax.distributed.initialize()` when this process is one of several; returns whether it did.

    Hand-started processes set JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and
    JAX_PROCESS_ID; under SLURM or Open MPI with several tasks nothing is needed. Must run before
    anything touches a device.
    """
    if os.environ.get(ENV_COORDINATOR):
        missing = [v for v in (ENV_NUM_PROCESSES, ENV_PROCESS_ID) if not os.environ.get(v)]
        if missing:
            raise ValueError(f"{ENV_COORDINATOR} is set but {missing} are not; set all three on every host")
        try:
            num, pid = int(os.environ[ENV_NUM_PROCESSES]), int(os.environ[ENV_PROCESS_ID])
        except ValueError:
            raise ValueError(f"{ENV_NUM_PROCESSES} and {ENV_PROCESS_ID} must be integers") from None
        jax.distributed.initialize(os.environ[ENV_COORDINATOR], num_processes=num, process_id=pid)
        return True
    if _managed_cluster():
        jax.distributed.initialize()
        return True
    return False


def is_main_process() -> bool:
    return jax.process_index() == 0


# ------------------------------------------------------------------------------------------------
# Memory

def device_bytes(tree: Any) -> dict[jax.Device, int]:
    """Bytes each device holds for the arrays of `tree`, or would hold for its ShapeDtypeStructs with a
    sharding (a plan, before anything is allocated). Local devices only."""
    out: dict[jax.Device, int] = {}
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        if sharding is None:
            continue
        itemsize = np.dtype(leaf.dtype).itemsize
        nbytes = int(np.prod(sharding.shard_shape(leaf.shape))) * itemsize
        for device in sharding.addressable_devices:
            out[device] = out.get(device, 0) + nbytes
    return out


def device_capacity(device: jax.Device) -> tuple[int, int] | None:
    """(bytes in use, bytes limit) from the runtime, or None where it does not say (CPU)."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if not stats or "bytes_limit" not in stats:
        return None
    return int(stats.get("bytes_in_use", 0)), int(stats["bytes_limit"])


def memory_report(parts: Mapping[str, Any], devices: Sequence[jax.Device] | None = None) -> str:
    """One line per local device: bytes of each named part (e.g. {"params": state, "decode state": cache}),
    then in use / free as the runtime reports them."""
    per_part = {name: device_bytes(tree) for name, tree in parts.items()}
    devices = list(jax.local_devices() if devices is None else devices)
    lines = []
    for device in devices:
        cells = [f"{name} {human_bytes(b.get(device, 0))}" for name, b in per_part.items()]
        capacity = device_capacity(device)
        if capacity is not None:
            used, limit = capacity
            cells.append(f"in use {human_bytes(used)} of {human_bytes(limit)}, free {human_bytes(limit - used)}")
        else:
            cells.append("free: not reported by this platform")
        lines.append(f"  {device.platform}:{device.id:<3} " + ", ".join(cells))
    return "per-device memory:\n" + "\n".join(lines)


def check_fits(parts: Mapping[str, Any], budget_bytes: int | None = None, headroom: float = 0.9) -> None:
    """Raises before allocation when the named parts (trees of ShapeDtypeStructs with shardings, or arrays)
    would not fit together on some device.

    The budget is `budget_bytes` or, where the runtime reports it, `headroom` × the free bytes of each
    device (the rest is left for activations and compiled code). Platforms that report nothing pass.
    """
    per_part = {name: device_bytes(tree) for name, tree in parts.items()}
    for device in sorted({d for b in per_part.values() for d in b}, key=lambda d: d.id):
        need = sum(b.get(device, 0) for b in per_part.values())
        if budget_bytes is not None:
            budget = budget_bytes
        else:
            capacity = device_capacity(device)
            if capacity is None:
                continue
            budget = int(headroom * (capacity[1] - capacity[0]))
        if need > budget:
            detail = " + ".join(f"{name} {human_bytes(b.get(device, 0))}" for name, b in per_part.items())
            raise MemoryError(f"{device.platform}:{device.id} needs {human_bytes(need)} ({detail}) but its budget is "
                              f"{human_bytes(budget)}; use more devices, a layout that splits more (e.g. "
                              "tensor_parallel, a larger expert axis), a smaller batch or max_len, or a smaller dtype")


# ------------------------------------------------------------------------------------------------
# Host <-> global arrays (identical on every process in a multi-host run)

def from_host(value: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """A global array from a host value every process holds in full; each process places its own shards."""
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def to_host(x) -> np.ndarray:
    """The full value of a (possibly multi-host) global array on every process; host values pass through."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def all_processes(flags: Sequence[bool]) -> list[bool]:
    """Each flag AND-ed over the processes of the run: every process passes the same number of flags, in the same
    order, and gets the same answer (one all-gather; no communication in a single process)."""
    local = np.asarray(flags, np.uint8).reshape(-1)
    if jax.process_count() == 1 or not local.size:
        return local.astype(bool).tolist()
    from jax.experimental import multihost_utils
    gathered = np.asarray(multihost_utils.process_allgather(local)).reshape(-1, local.size)  # [processes, flags]
    return gathered.min(axis=0).astype(bool).tolist()
