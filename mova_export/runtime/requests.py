"""The request objects of the runtime's API: a streamed answer, a frame handle, a deadline."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..core.errors import RuntimeInputError
from .frames import FrameState
from .two_pass import Answer, Request
from .worker import AnswerFuture

if TYPE_CHECKING:
    from .session import MoVARuntime


class StreamingAnswer:
    """Iterate for the answer's text pieces; `.answer` (an Answer) is set once the iterator is exhausted.
    While iterating it holds the runtime's lock: exhaust it or `close()` it (a `with` block does)."""

    def __init__(self, runtime: "MoVARuntime", request: Request):
        self.answer: Answer | None = None
        self._gen = runtime._serve(request, self)

    def __iter__(self) -> "StreamingAnswer":
        return self

    def __next__(self) -> str:
        return next(self._gen)

    def close(self) -> None:
        self._gen.close()

    def __enter__(self) -> "StreamingAnswer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class FrameHandle:
    """Questions on one frame (`MoVARuntime.frame`): ask, ask_stream and submit as on the runtime, without the
    image. Holds the frame's state until closed (a `with` block closes it)."""

    def __init__(self, runtime: "MoVARuntime", state: FrameState):
        self._runtime, self.state = runtime, state

    def state_for(self, runtime: "MoVARuntime") -> FrameState:
        if self.state is None:
            raise RuntimeInputError("this frame handle is closed; open a new one with rt.frame(image)")
        if runtime is not self._runtime:
            raise RuntimeInputError("this frame handle belongs to another MoVARuntime; open one with its frame()")
        return self.state

    def ask(self, question: str, max_new_tokens: int = 64, **options: Any) -> Answer:
        return self._runtime.ask(self, question, max_new_tokens, **options)

    def ask_stream(self, question: str, max_new_tokens: int = 64, **options: Any) -> StreamingAnswer:
        return self._runtime.ask_stream(self, question, max_new_tokens, **options)

    def submit(self, question: str, max_new_tokens: int = 64, **options: Any) -> AnswerFuture:
        return self._runtime.submit(self, question, max_new_tokens, **options)

    def close(self) -> None:
        self.state = None

    def __enter__(self) -> "FrameHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@dataclass
class PreparedRequest:
    """A request checked at submit time, answered later by the worker through ask()."""
    request: Request


def deadline_after(seconds: Any) -> float | None:
    """A monotonic deadline `seconds` from now; RuntimeInputError for anything but a positive number."""
    if seconds is None:
        return None
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
        raise RuntimeInputError(f"deadline_s={seconds!r}; pass a number of seconds > 0 (or None for no deadline)")
    return time.monotonic() + float(seconds)
