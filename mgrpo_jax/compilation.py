"""Counting XLA compilations: a recompile in a hot loop is a bug (DESIGN.md, principle 3), so we count them.

    with CompileCounter() as compiles:
        step(batch); step(batch)
    assert compiles.count == 1
"""
from __future__ import annotations

import threading

import jax

# jax records this event once per XLA backend compilation (cache hits record nothing).
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileCounter:
    """Counts XLA backend compilations in this process while active (a context manager, or start/stop)."""

    def __init__(self) -> None:
        self.count = 0
        self.seconds = 0.0
        self._lock = threading.Lock()
        self._active = False

    def _listener(self, event: str, duration_s: float, **_) -> None:
        if event == BACKEND_COMPILE_EVENT:
            with self._lock:
                self.count += 1
                self.seconds += duration_s

    def start(self) -> "CompileCounter":
        if not self._active:
            jax.monitoring.register_event_duration_secs_listener(self._listener)
            self._active = True
        return self

    def stop(self) -> None:
        if self._active:
            jax.monitoring.unregister_event_duration_listener(self._listener)
            self._active = False

    def __enter__(self) -> "CompileCounter":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
