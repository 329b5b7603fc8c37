"""Inference over a static-shape decode state: the state and its memory, prefill/decode steps, their sharded
kernel calls, sampling, the continuous-batching `Scheduler` over a paged state, and `generate`."""

from model1_jax.inference.generation import Generation, GenerationStats, generate
from model1_jax.inference.memory import MemoryReport, max_len_for_budget, memory_report
from model1_jax.inference.requests import Completion, Request
from model1_jax.inference.sampling import Sampling
from model1_jax.inference.scheduler import Scheduler
from model1_jax.inference.state import ATTENTION_BACKENDS, CACHE_DTYPES, CacheSpec, DecodeState, init_state, make_spec
from model1_jax.inference.steps import decode_step, prefill

__all__ = ["ATTENTION_BACKENDS", "CACHE_DTYPES", "CacheSpec", "Completion", "DecodeState", "Generation",
           "GenerationStats", "MemoryReport", "Request", "Sampling", "Scheduler", "decode_step", "generate",
           "init_state", "make_spec", "max_len_for_budget", "memory_report", "prefill"]
