"""One device allocation that every TensorRT execution context of a runtime runs in.

By default (ExecutionContextAllocationStrategy.STATIC) each context allocates its engine's activation memory when it
is made and holds it for its whole life, so a runtime with ten engines holds ten activation peaks although it runs
one engine at a time (MoVARuntime's lock serialises requests, and each run synchronises its stream before it
returns). On Jetson's unified memory that sum comes out of the pool the LLM needs; the memory planner counts the
vision activations once. `ContextMemory` makes the runtime match the plan: contexts are created USER_MANAGED and
pointed (IExecutionContext.set_device_memory) at one allocation sized to the largest engine's
`device_memory_size_v2`; loading a larger engine later (a lazily loaded expert) grows it and re-points every context.
The same trap, on the CPU: ONNX Runtime's per-session arenas (runtime/vision.py `keeps_arena`).

Written against TensorRT 10.3 / 11.x / RTX 1.7 (create_execution_context(strategy), IRuntimeConfig.
set_execution_context_allocation_strategy, device_memory_size_v2, set_device_memory) and cuda-python 12.9; tested on
a simulated device (tests/test_blackwell_engines.py). Not run on a GPU: none was lent to the machines that test it.
"""
from __future__ import annotations

import threading
import weakref
from typing import Any, Callable


def engine_activation_bytes(engine: Any) -> int:
    """The device memory a context of `engine` needs at its largest profile (TensorRT >= 10.1: the _v2 property)."""
    size = getattr(engine, "device_memory_size_v2", None)
    return int(size if size is not None else engine.device_memory_size)


def point_context(context: Any, ptr: int, size: int) -> None:
    """context.set_device_memory(ptr, size) (TensorRT >= 10.1), or the `device_memory` property before it."""
    if hasattr(context, "set_device_memory"):
        context.set_device_memory(ptr, size)
    else:
        context.device_memory = ptr


class ContextMemory:
    """The shared activation memory (module docstring). `alloc(nbytes) -> ptr` and `free(ptr)` are the device
    allocator (cudaMalloc / cudaFree, 256-byte aligned as TensorRT requires). `lock` is held by a runner from its
    enqueue until its stream is synchronised, so even callers outside MoVARuntime's lock never overlap."""

    def __init__(self, alloc: Callable[[int], int], free: Callable[[int], None]):
        self._alloc, self._free = alloc, free
        self.ptr, self.size = 0, 0
        self.lock = threading.RLock()
        self._users: weakref.WeakSet[Any] = weakref.WeakSet()   # runners with a live context

    def attach(self, runner: Any) -> None:
        """Point `runner.context` at the shared memory, growing it first when `runner.engine` needs more."""
        need = engine_activation_bytes(runner.engine)
        with self.lock:
            if need > self.size:
                self._grow(need)
            self._users.add(runner)
            if self.size:
                point_context(runner.context, self.ptr, self.size)

    def detach(self, runner: Any) -> None:
        """`runner` is closing; the memory is freed with its last user."""
        with self.lock:
            self._users.discard(runner)
            if not self._users:
                self.close()

    def _grow(self, need: int) -> None:
        if self.ptr:               # nothing runs while the lock is held: free first, so the peak is never both
            self._free(self.ptr)
            self.ptr, self.size = 0, 0
        self.ptr, self.size = self._alloc(need), need
        for user in list(self._users):
            if user.context is not None:
                point_context(user.context, self.ptr, self.size)

    def close(self) -> None:
        with self.lock:
            if self.ptr:
                self._free(self.ptr)
            self.ptr, self.size = 0, 0
            self._users = weakref.WeakSet()


__all__ = ["ContextMemory", "engine_activation_bytes", "point_context"]
