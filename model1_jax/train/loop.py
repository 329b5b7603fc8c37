"""The fine-tuning run: the step loop with logs and held-out evaluation, and resumable Orbax checkpoints.

A training checkpoint (`TrainCheckpointer`) holds the `TrainState` (trainable weights, router
biases, optimizer state, step) and a JSON record of the data position, the data seed and a
fingerprint of the data. Batches are a pure function of (seed, step) (`data.Batches`), so a run
killed at any point and resumed from its last checkpoint takes exactly the steps the uninterrupted
run would have taken. Frozen weights (a LoRA base) are not saved: they come from the same source
again. Orbax writes each checkpoint to a temporary directory and renames it when complete, so a kill
during a save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from model1_jax.common import positive_int, process_memory, reset_peak_memory
from model1_jax.train import balance
from model1_jax.train.data import Batches, PackedData, eval_batches
from model1_jax.train.trainer import Trainer


class TrainCheckpointer:
    """Periodic training checkpoints in `directory/<step>/` (the newest `keep` are kept)."""

    def __init__(self, directory: str | os.PathLike, *, every: int, keep: int = 2):
        positive_int(every, "TrainCheckpointer: every (steps between checkpoints)")
        self.directory = os.path.abspath(os.fspath(directory))
        # Synchronous saves: the step donates the state's buffers right after a save returns.
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every,
                                               enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, trainer: Trainer, meta: dict[str, Any], *, force: bool = False) -> bool:
        step = int(trainer.state.step)
        if step in self.manager.all_steps():
            return False
        return self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(trainer.state),
                                                               meta=ocp.args.JsonSave(meta)), force=force)

    def restore(self, trainer: Trainer, expect: dict[str, Any] | None = None) -> dict[str, Any]:
        """Loads the newest checkpoint into `trainer`; `expect` entries must equal the saved record's."""
        step = self.latest_step()
        if step is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {self.directory}")
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        differ = {k: (meta.get(k), v) for k, v in (expect or {}).items() if meta.get(k) != v}
        if differ:
            detail = ", ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in differ.items())
            raise ValueError(f"--resume: the run differs from the checkpoint at step {step} ({detail})")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, trainer.state)
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
        trainer.state = restored["state"]
        return meta

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if k != "loads"}


def fit(trainer: Trainer, batches: Batches, steps: int, *, checkpointer: TrainCheckpointer | None = None,
        meta: dict[str, Any] | None = None, eval_data: PackedData | None = None, eval_every: int = 0,
        eval_batches_max: int | None = None, log_every: int = 10, log: Callable[[str], None] = print,
        progress: bool = True, stop_after: int | None = None) -> list[dict[str, float]]:
    """Trains from the trainer's current step to `steps`; returns the logged records (the loss curve).

    Logs every `log_every` steps: losses, learning rate, tokens/s (first, compiling, step excluded),
    and per-layer expert load imbalance. The last record also holds `step_memory_bytes`: the device's peak on a
    GPU; on a CPU, how far the process's resident memory rose above its level after the compiling step (and
    after each evaluation). `stop_after` ends the run early after that step, as a kill would (used to test
    resuming).
    """
    start = int(trainer.state.step)
    tokens_per_step = batches.sequences_per_batch * batches.data.seq_len
    history: list[dict[str, float]] = []
    bar = tqdm(total=steps, initial=start, disable=not progress, unit="step", dynamic_ncols=True)
    say = bar.write if progress else log
    window_start, window_steps = None, 0
    for i in range(start, steps):
        metrics = trainer.step(batches.batch(i))
        done = i + 1
        if window_start is None:  # the first step compiles: time (and peak memory) from its end
            jax.block_until_ready(metrics["loss"])
            window_start, window_steps = time.perf_counter(), 0
            reset_peak()
            resident, step_peak = resident_bytes(), 0.0
        else:
            window_steps += 1
        last = done == steps or done == stop_after
        saving = checkpointer is not None and (last or checkpointer.manager.should_save(done))
        if done % log_every == 0 or last or saving:  # never log or save a state that went non-finite
            record = {"step": done, **_scalars(metrics)}
            if not math.isfinite(record["loss"]) or not record.pop("grads_finite"):
                raise FloatingPointError(f"step {done}: non-finite loss or gradients ({record}); the newest "
                                         "checkpoint holds an earlier, finite state")
        if done % log_every == 0 or last:
            elapsed = time.perf_counter() - window_start
            record["tokens_per_s"] = window_steps * tokens_per_step / elapsed if window_steps else float("nan")
            window_start, window_steps = time.perf_counter(), 0
            if eval_data is not None and eval_every and (done % eval_every == 0 or done == steps):
                step_peak = max(step_peak, _step_memory(resident))
                record.update(trainer.evaluate(eval_batches(eval_data, batches.batch_size, eval_batches_max)))
                window_start = time.perf_counter()  # evaluation is not training throughput (nor its memory)
                reset_peak()
                resident = resident_bytes()
            history.append(record)
            say(format_record(record, balance.describe(jax.device_get(metrics["loads"]), trainer.biased_paths)))
            bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:,.0f}",
                            lr=f"{record['learning_rate']:.1e}")
        bar.update(1)
        if saving and checkpointer.save(trainer, {**(meta or {}), "step": done, "data_position": done}, force=last):
            window_start, window_steps = time.perf_counter(), 0  # saving is not training throughput
        if done == stop_after:
            break
    bar.close()
    if history and window_start is not None:  # what the steps needed, to set beside Trainer.memory_estimate
        history[-1]["step_memory_bytes"] = max(step_peak, _step_memory(resident))
    return history


def _step_memory(resident: int) -> float:
    peak, what = measured_peak()
    return float(peak - resident if what == "process peak RSS" else peak)


def format_record(record: dict[str, float], imbalance: str = "") -> str:
    line = (f"step {record['step']:6d}  loss {record['loss']:.4f}  next-token {record['main_loss']:.4f}  "
            f"mtp {record['mtp_loss']:.4f}  lr {record['learning_rate']:.2e}  "
            f"{record['tokens_per_s']:,.0f} tok/s")
    if "indexer_kl" in record:
        line += f"  indexer KL {record['indexer_kl']:.4f}"
        if "indexer_recall" in record:
            line += f" recall@k {record['indexer_recall']:.3f}"
    if "eval_loss" in record:
        line += f"  eval {record['eval_loss']:.4f}"
    if "eval_indexer_recall" in record:
        line += f" (indexer KL {record['eval_indexer_kl']:.4f} recall@k {record['eval_indexer_recall']:.3f})"
    if imbalance:
        line += f"  load max/mean: {imbalance}"
    return line


def measured_peak() -> tuple[int, str]:
    """(bytes, what): the first device's peak allocation where the runtime reports it (GPU), else the process's
    peak resident memory since the last `reset_peak` (CPU: XLA's buffers live in the process, next to Python,
    the runtime and the compiled code)."""
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device peak"
    return process_memory("VmHWM") or 0, "process peak RSS"


def resident_bytes() -> int:
    """The process's current resident memory (0 where /proc is unavailable)."""
    return process_memory("VmRSS") or 0


def reset_peak() -> None:
    """Restarts the process's peak-RSS count, e.g. after compiling, so that the next `measured_peak` covers only
    what ran since (`common.reset_peak_memory`); a no-op elsewhere (the device peak of a GPU is not reset)."""
    reset_peak_memory()


def tokens_per_second(history: list[dict[str, float]]) -> float:
    """Mean training throughput over the logged windows (NaN windows skipped)."""
    values = [r["tokens_per_s"] for r in history if np.isfinite(r["tokens_per_s"])]
    return float(np.mean(values)) if values else float("nan")
