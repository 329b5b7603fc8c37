"""Compile-time accounting from `jax.monitoring` events."""

from __future__ import annotations

import jax

_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")
_BACKEND_COMPILE = _COMPILE_EVENTS[-1]


class CompileClock:
    """Context manager adding up the seconds JAX spends tracing, lowering and compiling while it is open,
    and listing the functions compiled (from `jax.monitoring` events)."""

    def __init__(self):
        self.seconds = 0.0
        self.compiled: list[str] = []

    def _listen(self, event: str, duration: float, **kwargs) -> None:
        if event in _COMPILE_EVENTS:
            self.seconds += duration
        if event == _BACKEND_COMPILE:
            self.compiled.append(str(kwargs.get("fun_name", "?")))

    def __enter__(self) -> CompileClock:
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc) -> None:
        jax.monitoring.unregister_event_duration_listener(self._listen)
