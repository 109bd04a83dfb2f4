"""Requests for a camera loop: `rt.submit(frame, question) -> AnswerFuture`, answered by one worker thread.

A robot streams frames faster than MoVA answers and only the newest matters. Each request names a `stream` (a camera,
a topic) and a policy: `latest` (a newer request on the same stream drops the queued older one, whose future is
cancelled) or `queue` (every request is answered in order). The worker answers one request at a time through the
runtime's lock, so `submit`, the blocking `ask` and `ask_stream` share one set of sessions and never overlap.

Stopping: `future.cancel()` on a queued request cancels it (standard Future semantics); on a running one it stops
the generation after the current token and the future's result is the partial Answer with `cut="cancelled"`
(`cancel()` then returns True although `cancelled()` stays False: the request ran). `deadline_s` (seconds from
submission) does the same with `cut="deadline"`; a request whose deadline passes while queued is cancelled unrun.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass
from typing import Any, Callable

LOG = logging.getLogger(__name__)

POLICIES = ("latest", "queue")


class AnswerFuture(Future):
    """A Future[Answer] whose cancel() also stops a running request after its current token."""

    def __init__(self, stream: str, policy: str, deadline: float | None):
        super().__init__()
        self.stream, self.policy, self.deadline = stream, policy, deadline
        self._stop = threading.Event()
        self.answer_hooks: list[Callable[[Any], None]] = []   # run on the worker before the future resolves

    def cancel(self) -> bool:
        if super().cancel():
            return True
        if self.running():
            self._stop.set()
            return True
        return False

    def stop_reason(self) -> str | None:
        """What should end the running request now: "cancelled", "deadline" or None."""
        if self._stop.is_set():
            return "cancelled"
        if self.deadline is not None and time.monotonic() > self.deadline:
            return "deadline"
        return None


@dataclass
class _Job:
    future: AnswerFuture
    run: Callable[[AnswerFuture], Any]     # answers the request (the runtime's lock taken inside)


class RequestWorker:
    """One daemon thread answering queued jobs in order, started on the first submit."""

    def __init__(self, wait_idle: Callable[[], None], name: str = "mova-runtime"):
        self.wait_idle, self.name = wait_idle, name
        self._jobs: deque[_Job] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._current: AnswerFuture | None = None
        self.dropped = 0                    # queued requests replaced by a newer frame (latest policy)

    def submit(self, future: AnswerFuture, run: Callable[[AnswerFuture], Any]) -> AnswerFuture:
        with self._cond:
            if self._closed:
                raise RuntimeError("the worker is closed")
            if future.policy == "latest":
                for old in [j for j in self._jobs if j.future.stream == future.stream and j.future.policy == "latest"]:
                    self._jobs.remove(old)
                    old.future.cancel()
                    self.dropped += 1
            self._jobs.append(_Job(future, run))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
                self._thread.start()
            self._cond.notify()
        return future

    @property
    def queued(self) -> int:
        with self._cond:
            return len(self._jobs)

    def _next(self) -> _Job | None:
        """The next job once the runtime is idle (None once closed): while the runtime is busy with another request
        a job stays in the queue, where a newer frame of its stream can still replace it."""
        while True:
            with self._cond:
                while not self._jobs and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return None
            self.wait_idle()
            with self._cond:
                if self._jobs:
                    return self._jobs.popleft()

    def _loop(self) -> None:
        while (job := self._next()) is not None:
            future = job.future
            if future.deadline is not None and time.monotonic() > future.deadline:
                future.cancel()             # expired in the queue: never started
            if not future.set_running_or_notify_cancel():
                continue
            self._current = future
            try:
                answer = job.run(future)
            except BaseException as exc:  # handed to the caller through the future
                future.set_exception(exc)
            else:
                for hook in future.answer_hooks:
                    try:
                        hook(answer)
                    except Exception:     # the app's handler failed; as Future does for its callbacks
                        LOG.exception("on_answer handler of stream %r raised", future.stream)
                future.set_result(answer)
            finally:
                self._current = None

    def close(self, wait: bool = True) -> None:
        """Cancel what is queued and stop the running request after its current token."""
        with self._cond:
            self._closed = True
            pending = list(self._jobs)
            self._jobs.clear()
            self._cond.notify_all()
        for job in pending:
            job.future.cancel()
        current = self._current
        if current is not None:
            current.cancel()
        if wait and self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()


def callbacks(future: AnswerFuture, on_answer: Callable[[Any], None] | None,
              on_error: Callable[[BaseException], None] | None) -> None:
    """The callback form: on_answer(answer) for every answer (cut ones too), on_error(exception) for a failure and
    for a request dropped or cancelled before it ran (a concurrent.futures.CancelledError). on_answer runs on the
    worker before the future resolves: once `future.result()` returns, the answer's handler has run."""
    if on_answer is None and on_error is None:
        return

    def done(f: Future) -> None:
        try:
            f.result()
        except (CancelledError, Exception) as exc:  # the app's handler decides
            if on_error is not None:
                on_error(exc)

    if on_answer is not None:
        future.answer_hooks.append(on_answer)
    future.add_done_callback(done)
