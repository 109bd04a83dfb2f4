"""A robot's frame loop, soaked: N distinct frames through `rt.submit` (latest policy, as a camera node runs it),
answered one after another, to show that memory stays flat (the frame cache evicts, nothing accumulates) and that
latency does not drift.

    mova-export demo                                   # writes demo/bundle-cpu (the tiny trained cpu bundle)
    python benchmarks/soak.py --bundle demo/bundle-cpu --frames 2200 --warmup-frames 200 --out benchmarks/results/soak

Every frame is a sample photo with a per-frame pattern added, so no two frames share a cache key. RSS is sampled
after each answer. The first --warmup-frames are warm-up: the frame cache fills to its bound and ONNX Runtime's
arenas grow for each expert combination the questions route to (measured: RSS rises for about 150 frames, then
stays). The verdict compares the mean RSS of the first 100 frames after warm-up with the last 100 (flat: within 2%). Writes soak.json, soak.md and soak.png (latency percentiles and RSS per 100 frames).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def soak(bundle: Path, frames: int, max_tokens: int, threads: int, warmup_frames: int) -> dict:
    from mova_export.runtime import MoVARuntime
    from mova_export.source.photos import DEMO_QUESTIONS, sample_images

    photos = sample_images(sorted({name for name, _ in DEMO_QUESTIONS}))
    rows = []
    with MoVARuntime.from_bundle(bundle, llm={"n_threads": threads}, vision_threads=threads) as rt:
        rt.warmup()
        start = time.perf_counter()
        for i in range(frames):
            name, question = DEMO_QUESTIONS[i % len(DEMO_QUESTIONS)]
            rgb = photos[name].copy()
            rgb[i % rgb.shape[0], :, 0] ^= np.uint8(1 + i % 251)    # a new frame: a new cache key
            answer = rt.submit(rgb, question, max_tokens, stream="camera").result()
            rows.append({"frame": i, "total_ms": answer.timings_ms["total"],
                         "ttft_ms": answer.timings_ms["time_to_first_token"], "rss_mib": rss_mib(),
                         "cache_mib": rt.frames.nbytes / 2**20})
            if (i + 1) % 100 == 0:
                block = rows[-100:]
                print(f"frames {i + 1}/{frames}: p50 {np.percentile([r['total_ms'] for r in block], 50):.0f} ms, "
                      f"RSS {block[-1]['rss_mib']:.0f} MiB, {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return summarize(rows, bundle, max_tokens, warmup_frames)


def summarize(rows: list[dict], bundle: Path, max_tokens: int, warmup_frames: int) -> dict:
    blocks = []
    for start in range(0, len(rows), 100):
        block = rows[start:start + 100]
        totals = [r["total_ms"] for r in block]
        blocks.append({"frames": f"{start + 1}-{start + len(block)}",
                       **{f"p{q}_ms": float(np.percentile(totals, q)) for q in (50, 95, 99)},
                       "rss_mib_mean": float(np.mean([r["rss_mib"] for r in block]))})
    measured = rows[warmup_frames:]
    first = float(np.mean([r["rss_mib"] for r in measured[:100]]))
    last = float(np.mean([r["rss_mib"] for r in measured[-100:]]))
    growth = (last - first) / first * 100
    return {"bundle": str(bundle), "frames": len(rows), "warmup_frames": warmup_frames, "max_tokens": max_tokens,
            "blocks": blocks, "rss_after_warmup_peak_mib": max(r["rss_mib"] for r in measured[:100]),
            "rss_end_peak_mib": max(r["rss_mib"] for r in measured[-100:]),
            "rss_first_100_mib": first, "rss_last_100_mib": last, "rss_growth_pct": growth,
            "flat": abs(growth) <= 2.0, "rows": rows}


def markdown(result: dict) -> str:
    lines = [f"Soak: {result['frames']} distinct frames through rt.submit ({result['bundle']}, up to "
             f"{result['max_tokens']} tokens each), the first {result['warmup_frames']} as warm-up. RSS: the 100 "
             f"frames after warm-up {result['rss_first_100_mib']:.0f} MiB (peak {result['rss_after_warmup_peak_mib']:.0f}),"
             f" the last 100 {result['rss_last_100_mib']:.0f} MiB (peak {result['rss_end_peak_mib']:.0f}): "
             f"{result['rss_growth_pct']:+.2f}%, {'flat' if result['flat'] else 'GROWING'}", "",
             "| frames | p50 ms | p95 ms | p99 ms | RSS MiB |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {b['frames']} | {b['p50_ms']:.0f} | {b['p95_ms']:.0f} | {b['p99_ms']:.0f} | {b['rss_mib_mean']:.0f} |"
              for b in result["blocks"]]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [int(b["frames"].split("-")[1]) for b in result["blocks"]]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4))
    for q in (50, 95, 99):
        a.plot(x, [blk[f"p{q}_ms"] for blk in result["blocks"]], "o-", ms=3, label=f"p{q}")
    a.set(xlabel="frames answered", ylabel="ms per answer", title="latency per 100 frames")
    a.legend()
    b.plot([r["frame"] for r in result["rows"]], [r["rss_mib"] for r in result["rows"]], lw=0.8)
    b.axvline(result["warmup_frames"], color="grey", linestyle="--", label="end of warm-up")
    b.set(xlabel="frame", ylabel="RSS MiB", title="process memory")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--frames", type=int, default=2000, help="frames in all, warm-up included")
    ap.add_argument("--warmup-frames", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("bench-results/soak"))
    args = ap.parse_args()
    if args.frames - args.warmup_frames < 200:
        sys.exit("--frames must exceed --warmup-frames by at least 200 (the verdict compares the first and last 100)")
    result = soak(args.bundle, args.frames, args.max_tokens, args.threads, args.warmup_frames)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "soak.md").write_text(markdown(result))
    plot(result, args.out / "soak.png")
    print(markdown(result))


if __name__ == "__main__":
    main()
