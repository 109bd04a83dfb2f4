"""A robot's frame loop without ROS: camera messages in, answer payloads out. The ROS 2 node (mova_export.ros2)
and `mova-export replay` both run this; only how messages arrive and where payloads go differ.

Each admitted frame gets every standing question (`questions`) through `MoVARuntime.submit`: one stream per
question, so under the `latest` policy a newer frame replaces an older one still waiting, question by question, and
the questions of one frame share its pixel-only results through the frame cache. A one-shot question (the node's
question topic) is asked of the newest frame seen.
"""
from __future__ import annotations

from collections import Counter
from concurrent.futures import CancelledError
from typing import Any, Callable, Sequence

from ..core.errors import RuntimeInputError
from .messages import Frame, Skipped, answer_payload, frame_from_message

Publish = Callable[[str, Frame, Any], None]   # (payload JSON, the source frame, the Answer)


class Pacer:
    """Which frames to answer: every `every`-th one, or at most `rate_hz` by their stamps (header stamps: a bag
    replays at its recorded pace whatever the replay's speed). Neither: every frame."""

    def __init__(self, every: int | None = None, rate_hz: float | None = None):
        if every is not None and rate_hz is not None:
            raise RuntimeInputError("pass --every N or --rate HZ, not both")
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
            raise RuntimeInputError(f"every={every!r}; pass a whole number >= 1 (1: every frame)")
        if rate_hz is not None and (isinstance(rate_hz, bool) or not isinstance(rate_hz, (int, float))
                                    or not rate_hz > 0):
            raise RuntimeInputError(f"rate={rate_hz!r}; pass a rate in Hz > 0")
        self.every, self.rate_hz = every, rate_hz
        self._seen = 0
        self._last_ns: int | None = None

    def admit(self, stamp_ns: int) -> bool:
        self._seen += 1
        if self.every is not None:
            return (self._seen - 1) % self.every == 0
        if self.rate_hz is not None:
            if self._last_ns is not None and 0 <= stamp_ns - self._last_ns < 1e9 / self.rate_hz:
                return False
            self._last_ns = stamp_ns
        return True


class RobotLoop:
    """Frames in, answers out. `publish(payload, frame, answer)` is called on the runtime's worker thread."""

    def __init__(self, runtime: Any, questions: Sequence[str], publish: Publish, *,  # noqa: PLR0913 (the node's parameters)
                 pacer: Pacer | None = None, policy: str = "latest", max_new_tokens: int = 64,
                 image_topic: str = ""):
        self.runtime, self.publish = runtime, publish
        self.questions = [q for q in (str(q).strip() for q in questions) if q]
        self.pacer = pacer or Pacer()
        self.policy, self.max_new_tokens, self.image_topic = policy, max_new_tokens, image_topic
        self.latest: Frame | None = None
        self.skipped: Counter[str] = Counter()         # reason -> frames
        self.paced = self.dropped = self.answered = 0
        self.errors: Counter[str] = Counter()

    def on_image(self, msg: Any, msgtype: str, received_ns: int = 0) -> list[Any]:
        """A camera message: decoded, paced, and every standing question submitted. Returns the futures."""
        try:
            frame = frame_from_message(msg, msgtype, received_ns)
        except Skipped as why:
            self.skipped[str(why)] += 1
            return []
        self.latest = frame
        if not self.pacer.admit(frame.stamp_ns):
            self.paced += 1
            return []
        return [self.submit(frame, q) for q in self.questions]

    def on_question(self, text: str) -> Any | None:
        """A one-shot question about the newest frame; None (counted) when no frame came yet or it is empty."""
        question = str(text).strip()
        if not question or self.latest is None:
            self.errors["question before any frame" if question else "empty question"] += 1
            return None
        return self.submit(self.latest, question, stream="question")

    def submit(self, frame: Frame, question: str, stream: str | None = None) -> Any:
        def answered(answer: Any) -> None:
            self.answered += 1
            self.publish(answer_payload(frame, question, answer, self.image_topic), frame, answer)

        def failed(exc: BaseException) -> None:
            if isinstance(exc, CancelledError):
                self.dropped += 1
            else:
                self.errors[f"{type(exc).__name__}: {exc}"] += 1

        return self.runtime.submit(frame.rgb, question, self.max_new_tokens, stream=stream or f"q:{question}",
                                   policy=self.policy, on_answer=answered, on_error=failed)

    def counts(self) -> dict[str, Any]:
        return {"answered": self.answered, "paced_out": self.paced, "dropped_for_newer": self.dropped,
                "skipped": dict(self.skipped), "errors": dict(self.errors)}
