"""The request objects of the runtime's API: a streamed answer, a frame handle, a deadline."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..core.errors import RuntimeInputError
from .frames import FrameState
from .two_pass import Answer, Request, Sampling
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


def sampling_of(temperature: Any = None, top_p: Any = None, seed: Any = None, logit_bias: Any = None,
                n_vocab: int | None = None) -> Sampling | None:
    """The answer pass's decoding from OpenAI-style values: None (plain greedy) for temperature 0 or omitted and no
    logit_bias. Raises RuntimeInputError naming the value out of range."""
    def number(name: str, value: Any, low: float, high: float) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= float(value) <= high:
            raise RuntimeInputError(f"{name}={value!r}; pass a number from {low:g} to {high:g}")
        return float(value)

    t = 0.0 if temperature is None else number("temperature", temperature, 0.0, 2.0)
    p = 1.0 if top_p is None else number("top_p", top_p, 0.0, 1.0)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RuntimeInputError(f"seed={seed!r}; pass an integer")
    if p <= 0.0:
        raise RuntimeInputError("top_p=0; pass a number above 0 (1 keeps every token)")
    bias = _logit_bias(logit_bias, n_vocab)
    return None if t == 0.0 and not bias else Sampling(t, p, seed, bias)


def _logit_bias(value: Any, n_vocab: int | None) -> tuple[tuple[int, float], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise RuntimeInputError(f"logit_bias is a {type(value).__name__}; pass an object of token id -> bias")
    out = []
    for key, bias in value.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise RuntimeInputError(f"logit_bias key {key!r} is not a token id; use integer token ids") from None
        if token < 0 or (n_vocab is not None and token >= n_vocab):
            raise RuntimeInputError(f"logit_bias token {token} is outside the vocabulary (0..{(n_vocab or 1) - 1})")
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
            raise RuntimeInputError(f"logit_bias[{token}]={bias!r}; pass a number from -100 to 100")
        out.append((token, float(bias)))
    return tuple(sorted(out))
