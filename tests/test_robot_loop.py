"""The runtime in a robot's loop, on the tiny trained cpu bundle (parity_build): the frame cache (bit-identical
answers, the second question skips the pixel-only stages, the MiB bound), the overlap thread (same answers),
`rt.frame` handles, `submit` with the latest and queue policies, cancel and deadline."""
from __future__ import annotations

import threading
import time
from concurrent.futures import CancelledError

import numpy as np
import pytest
from conftest import RUNTIME_EXACT

from mova_export.core.errors import RuntimeInputError
from mova_export.source.photos import demo_questions, sample_images

pytest.importorskip("llama_cpp")
MAX_NEW = 24
PIXEL_STAGES = {"base", "adapter_routing"}


@pytest.fixture(scope="module")
def plain(parity_bundle):
    """No cache, no overlap thread: what every answer here must equal bit for bit."""
    from mova_export.runtime import MoVARuntime

    with MoVARuntime.from_bundle(parity_bundle, **RUNTIME_EXACT, frame_cache_mib=0, overlap=False) as runtime:
        yield runtime


@pytest.fixture(scope="module")
def cached(parity_bundle):
    from mova_export.runtime import MoVARuntime

    with MoVARuntime.from_bundle(parity_bundle, **RUNTIME_EXACT, overlap=True) as runtime:
        yield runtime


@pytest.fixture(scope="module")
def questions():
    pairs = demo_questions()
    return pairs, sample_images([name for name, _ in pairs])


def _tensors_equal(a, b) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert np.array_equal(a[key], b[key]), key


def test_cached_answers_are_bit_identical_and_skip_the_pixel_stages(plain, cached, questions):
    pairs, images = questions
    assert cached.frames.enabled and not plain.frames.enabled and cached.overlap and not plain.overlap
    for name, question in pairs:
        want = plain.ask(images[name], question, MAX_NEW, keep_tensors=True)
        first = cached.ask(images[name], question, MAX_NEW, keep_tensors=True)
        again = cached.ask(images[name].copy(), question, MAX_NEW, keep_tensors=True)   # the content is the key
        for got in (first, again):
            assert (got.token_ids, got.routing_ids, got.experts, got.text) == (
                want.token_ids, want.routing_ids, want.experts, want.text), name
            _tensors_equal(got.tensors, want.tensors)
        assert first.cache_hits == [] and want.cache_hits == []
        computed = {f"expert_{letter}" for letter in want.experts}
        assert set(again.cache_hits) >= PIXEL_STAGES | computed, name
        assert not (PIXEL_STAGES | computed) & set(again.timings_ms), again.timings_ms   # hits are not timed
        assert again.timings_ms["llm_routing"] > 0 and again.timings_ms["total"] > 0


def test_a_second_question_runs_only_what_depends_on_it(cached, questions):
    _, images = questions
    frame = images["coffee"]
    cached.frames.clear()
    first = cached.ask(frame, "How many cups are on the table?", MAX_NEW, experts=["C"])
    second = cached.ask(frame, "What does the text on the page say?", MAX_NEW, experts=["B", "C"])
    assert {"base", "adapter_routing", "expert_C"} <= set(first.timings_ms) and first.cache_hits == []
    assert "expert_C" in second.cache_hits and "expert_B" not in second.cache_hits
    assert second.timings_ms["expert_B"] > 0 and "expert_C" not in second.timings_ms
    assert {"llm_routing", "text_encoder", "adapter_answer"} <= set(second.timings_ms)


def test_the_cache_stays_under_its_bound(parity_bundle, questions):
    from mova_export.runtime import MoVARuntime

    _, images = questions
    frames = list(images.values())
    with MoVARuntime.from_bundle(parity_bundle, **RUNTIME_EXACT, verify=False) as probe:
        probe.ask(frames[0], "Describe the scene in this image.", 1, experts=["A"])
        one = probe.frames.nbytes
    bound_mib = 2.5 * one / 2**20
    with MoVARuntime.from_bundle(parity_bundle, **RUNTIME_EXACT, frame_cache_mib=bound_mib, verify=False) as rt:
        for frame in frames:
            rt.ask(frame, "Describe the scene in this image.", 1, experts=["A"])
            assert rt.frames.nbytes <= bound_mib * 2**20
        assert len(rt.frames) == 2 and rt.frames.evictions == len(frames) - 2
        assert rt.ask(frames[-1], "Hello, who are you?", 1).cache_hits            # the newest stayed
        assert not rt.ask(frames[0], "Hello, who are you?", 1).cache_hits         # the oldest went


def test_a_frame_handle_holds_its_frame_with_the_cache_off(plain, questions):
    _, images = questions
    with plain.frame(images["chelsea"]) as frame:
        a = frame.ask("Describe the scene in this image.", MAX_NEW, experts=["A"])
        b = frame.ask("Segment the cat from the background.", MAX_NEW, experts=["A", "G"])
    assert a.cache_hits == [] and {"base", "adapter_routing", "expert_A"} <= set(b.cache_hits)
    assert b.timings_ms["expert_G"] > 0
    assert plain.ask(images["chelsea"], "Segment the cat from the background.", MAX_NEW,
                     experts=["A", "G"]).token_ids == b.token_ids
    with pytest.raises(RuntimeInputError, match="frame handle is closed"):
        frame.ask("Again?")


def test_the_camera_buffer_may_be_reused_after_asking(cached, questions):
    _, images = questions
    buffer = images["astronaut"].copy()
    want = cached.ask(images["astronaut"], "Describe the scene in this image.", MAX_NEW)
    future = cached.submit(buffer, "Describe the scene in this image.", MAX_NEW, policy="queue")
    buffer[:] = 0                                 # the camera writes its next frame into the same array
    assert future.result(timeout=120).token_ids == want.token_ids


def test_latest_policy_answers_the_newest_frame_and_drops_the_rest(cached, plain, questions):
    _, images = questions
    frames = [np.ascontiguousarray(np.roll(images["chelsea"], 7 * i, axis=1)) for i in range(10)]
    question = "What animal is this?"
    busy = cached.ask_stream(images["coffee"], "How many cups are on the table?", MAX_NEW)
    next(busy)                                    # the runtime is busy: every submit below waits in the queue
    futures = [cached.submit(f, question, MAX_NEW, stream="cam0") for f in frames]
    other = cached.submit(images["coffee"], question, MAX_NEW, stream="cam1")   # another stream is not dropped
    busy.close()
    newest = futures[-1].result(timeout=120)
    assert all(f.cancelled() for f in futures[:-1])
    assert newest.token_ids == plain.ask(frames[-1], question, MAX_NEW).token_ids
    assert other.result(timeout=120).text
    with pytest.raises(CancelledError):
        futures[0].result()


def test_queue_policy_answers_every_frame_in_order(cached, questions):
    _, images = questions
    names = ["astronaut", "coffee", "chelsea"]
    done: list[str] = []
    futures = [cached.submit(images[n], "Describe the scene in this image.", 4, stream="cam0", policy="queue",
                             on_answer=lambda a, n=n: done.append(n)) for n in names]
    for f in futures:
        f.result(timeout=120)
    assert done == names


def test_cancel_stops_a_running_generation_within_a_token(cached, questions):
    _, images = questions
    frame, question = images["chelsea"], "What animal is this?"
    full = cached.ask(frame, question, MAX_NEW)
    assert len(full.token_ids) > 8
    holder: dict = {}
    pieces: list[str] = []

    def first_piece(piece: str) -> None:
        pieces.append(piece)
        if len(pieces) == 1:
            holder["future"].cancel()

    gate = threading.Event()
    holder["future"] = cached.submit(frame, question, MAX_NEW, on_piece=lambda p: (gate.wait(), first_piece(p)))
    gate.set()
    cut = holder["future"].result(timeout=120)
    assert cut.cut == "cancelled" and 1 <= len(cut.token_ids) <= 2 < len(full.token_ids)
    assert cut.token_ids == full.token_ids[:len(cut.token_ids)]
    assert cached.ask(frame, question, MAX_NEW).token_ids == full.token_ids     # the next request is whole


def test_a_deadline_cuts_the_answer_and_an_expired_queued_request_never_runs(cached, questions):
    _, images = questions
    frame, question = images["chelsea"], "What animal is this?"
    full = cached.ask(frame, question, MAX_NEW)           # the frame is cached: the answer starts at once
    deadline_s = 5.0
    start = time.monotonic()
    stream = cached.ask_stream(frame, question, MAX_NEW, deadline_s=deadline_s)
    first = next(stream)
    assert first and time.monotonic() - start < deadline_s, "the first piece came after the deadline"
    time.sleep(max(0.0, deadline_s - (time.monotonic() - start)) + 0.05)
    rest = list(stream)
    assert stream.answer.cut == "deadline" and len(rest) <= 1
    assert len(stream.answer.token_ids) <= 2 < len(full.token_ids)
    busy = cached.ask_stream(frame, question, MAX_NEW)
    next(busy)
    expired = cached.submit(frame, question, MAX_NEW, deadline_s=0.2)
    time.sleep(0.4)
    busy.close()
    with pytest.raises(CancelledError):
        expired.result(timeout=120)


@pytest.mark.parametrize("kwargs, message", [
    ({"policy": "newest"}, "unknown policy 'newest'; use one of latest, queue"),
    ({"deadline_s": 0}, "deadline_s=0; pass a number of seconds > 0"),
    ({"stream": ""}, "stream=''; pass a non-empty name"),
])
def test_submit_refuses_bad_options_at_once(cached, questions, kwargs, message):
    _, images = questions
    with pytest.raises(RuntimeInputError, match=message.replace("(", r"\(")):
        cached.submit(images["chelsea"], "What animal is this?", **kwargs)


def test_a_negative_cache_size_is_refused(parity_bundle):
    from mova_export.runtime import MoVARuntime

    with pytest.raises(RuntimeInputError, match=r"frame_cache_mib=-1; pass a size in MiB >= 0"):
        MoVARuntime.from_bundle(parity_bundle, **RUNTIME_EXACT, frame_cache_mib=-1, verify=False)
