"""What the robot-loop features buy, measured on one loaded runtime in one run (part of `bench latency`):

* frame cache: three questions on one frame with the cache (the first computes the pixel-only stages, the next two
  reuse them) against the same three with the frame's state dropped before each question;
* overlap: time to first token with BERT computed during the routing generation and the routed towers' inputs
  preprocessed ahead (a second thread) against the same requests one stage after another.

Requests alternate between the two arms so that drifting machine load hits both alike.
"""
from __future__ import annotations

from typing import Any, Sequence

from .common import stats

# three questions a robot asks of one frame (what is ahead, can I grasp it, what does the sign say)
THREE_QUESTIONS = ("Describe the scene in this image.", "How many cups are on the table?",
                   "What does the text on the page say?")


def frame_cache_comparison(rt: Any, frames: Sequence[tuple[str, Any, str]], runs: int, max_new_tokens: int,
                           experts: Sequence[str] | None) -> dict[str, Any]:
    """ms for three questions on one frame, cache on vs off, p50 over `runs` frames; the answers must agree."""
    on, off, hits = [], [], []
    for i in range(runs):
        _, rgb, _ = frames[i % len(frames)]
        for arm in ("on", "off") if i % 2 == 0 else ("off", "on"):
            rt.frames.clear()
            total = 0.0
            texts = []
            for question in THREE_QUESTIONS:
                if arm == "off":
                    rt.frames.clear()
                answer = rt.ask(rgb, question, max_new_tokens, experts=experts)
                total += answer.timings_ms["total"]
                texts.append(answer.token_ids)
                if arm == "on":
                    hits.append(len(answer.cache_hits))
            (on if arm == "on" else off).append((total, texts))
    if any(a[1] != b[1] for a, b in zip(on, off)):
        raise RuntimeError("the frame cache changed an answer; this is a bug, please report it")
    rt.frames.clear()
    on_ms, off_ms = stats([t for t, _ in on]), stats([t for t, _ in off])
    return {"questions": list(THREE_QUESTIONS), "with_cache_ms": on_ms, "without_cache_ms": off_ms,
            "speedup": off_ms["p50"] / on_ms["p50"] if on_ms["p50"] else None,
            "mean_cache_hits_per_question": sum(hits) / len(hits) if hits else 0.0}


def overlap_comparison(rt: Any, frames: Sequence[tuple[str, Any, str]], runs: int, max_new_tokens: int,
                       experts: Sequence[str] | None) -> dict[str, Any]:
    """Time to first token and total, overlap on vs off, p50 over `runs` requests each (frame state dropped)."""
    arms: dict[bool, dict[str, list[float]]] = {True: {"ttft": [], "total": []}, False: {"ttft": [], "total": []}}
    before = rt.overlap
    try:
        for i in range(runs):
            _, rgb, question = frames[i % len(frames)]
            for overlap in (True, False) if i % 2 == 0 else (False, True):
                rt.overlap = overlap
                rt.frames.clear()
                t = rt.ask(rgb, question, max_new_tokens, experts=experts).timings_ms
                arms[overlap]["ttft"].append(t["time_to_first_token"])
                arms[overlap]["total"].append(t["total"])
    finally:
        rt.overlap = before
        rt.frames.clear()
    on, off = stats(arms[True]["ttft"]), stats(arms[False]["ttft"])
    return {"ttft_overlap_ms": on, "ttft_sequential_ms": off,
            "total_overlap_ms": stats(arms[True]["total"]), "total_sequential_ms": stats(arms[False]["total"]),
            "ttft_ratio": off["p50"] / on["p50"] if on["p50"] else None}


def robot_markdown(result: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    cache, overlap = result.get("frame_cache"), result.get("overlap")
    if cache:
        lines += ["", "## Three questions on one frame: frame cache on vs off", "",
                  "| | p50 ms (3 questions) | p95 ms |", "|---|---:|---:|",
                  f"| cache off | {cache['without_cache_ms']['p50']:.1f} | {cache['without_cache_ms']['p95']:.1f} |",
                  f"| cache on | {cache['with_cache_ms']['p50']:.1f} | {cache['with_cache_ms']['p95']:.1f} |",
                  "", f"{cache['speedup']:.2f}x; answers identical; questions: "
                  + "; ".join(cache["questions"])]
    if overlap:
        lines += ["", "## Time to first token: BERT and expert inputs overlapped vs sequential", "",
                  "| | TTFT p50 ms | TTFT p95 ms | total p50 ms |", "|---|---:|---:|---:|",
                  f"| sequential | {overlap['ttft_sequential_ms']['p50']:.1f} | "
                  f"{overlap['ttft_sequential_ms']['p95']:.1f} | {overlap['total_sequential_ms']['p50']:.1f} |",
                  f"| overlapped | {overlap['ttft_overlap_ms']['p50']:.1f} | {overlap['ttft_overlap_ms']['p95']:.1f} "
                  f"| {overlap['total_overlap_ms']['p50']:.1f} |",
                  "", f"sequential / overlapped TTFT: {overlap['ttft_ratio']:.2f}x"]
    return lines
