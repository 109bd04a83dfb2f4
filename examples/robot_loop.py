"""A robot's perception loop on a MoVA bundle: load once, warm up, answer a question per frame, keep going.

    python examples/robot_loop.py BUNDLE                       # scikit-image photos with noise, crops and shifts
    python examples/robot_loop.py BUNDLE --frames DIR --question "Is the path clear?"

Every few frames a deliberately broken frame (wrong dtype, wrong shape, None) is sent, as a flaky camera driver
would: the runtime raises RuntimeInputError, the loop logs it and the next good frame is answered as usual.
"""
from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from mova_export.core.errors import RuntimeInputError
from mova_export.runtime import MoVARuntime, peak_rss_mib


def camera(frames_dir: Path | None, seed: int = 0) -> Iterator[np.ndarray | None]:
    """Frames as a camera driver hands them over: HxWx3 uint8, with sensor noise and jittered crops; every 7th
    frame is broken (float pixels, a 2-channel buffer, or None)."""
    from mova_export.core.image_inputs import load_image

    if frames_dir is not None:
        paths = sorted(p for p in frames_dir.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"))
        if not paths:
            raise SystemExit(f"no .png/.jpg frames in {frames_dir}")
        sources = [load_image(p) for p in paths]
    else:
        from mova_export.source.photos import sample_images

        sources = list(sample_images().values())
    rng = np.random.default_rng(seed)
    broken = [lambda f: f.astype(np.float32) / 255.0, lambda f: f[:, :, :2], lambda f: None]
    for i in itertools.count():
        src = sources[i % len(sources)]
        h, w = src.shape[:2]
        top, left = rng.integers(0, h // 8 + 1), rng.integers(0, w // 8 + 1)
        frame = src[top:top + h - h // 8, left:left + w - w // 8].astype(np.int16)
        frame = np.clip(frame + rng.normal(0, 6, frame.shape), 0, 255).astype(np.uint8)
        yield broken[(i // 7) % 3](frame) if i % 7 == 6 else frame


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--frames", type=Path, default=None, help="a folder of images (default: scikit-image photos)")
    parser.add_argument("--question", default="What is in front of the robot?")
    parser.add_argument("--count", type=int, default=12, help="frames to process")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--backend", default="auto", choices=["auto", "onnxruntime", "tensorrt", "torch"])
    args = parser.parse_args()

    with MoVARuntime.from_bundle(args.bundle, device=args.device, backend=args.backend) as rt:
        warm = rt.warmup()
        print(f"loaded {args.bundle} ({rt.describe()['expert_policy']} experts), warm-up "
              f"{warm.timings_ms['total']:.0f} ms, peak RSS {peak_rss_mib():.0f} MiB")
        latencies = []
        for i, frame in enumerate(itertools.islice(camera(args.frames), args.count)):
            start = time.perf_counter()
            try:
                answer = rt.ask(frame, args.question, max_new_tokens=args.max_new_tokens)
            except RuntimeInputError as exc:  # a bad frame: log it, keep the loop alive
                print(f"frame {i:3d}: skipped ({exc})")
                continue
            ms = (time.perf_counter() - start) * 1e3
            latencies.append(ms)
            print(f"frame {i:3d}: {ms:7.1f} ms (first token {answer.timings_ms['time_to_first_token']:.0f} ms), "
                  f"experts {','.join(answer.experts) or 'none'}: {answer.text[:60]!r}")
        if latencies:
            print(f"{len(latencies)} frames: p50 {np.percentile(latencies, 50):.1f} ms, "
                  f"p95 {np.percentile(latencies, 95):.1f} ms; peak RSS {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
