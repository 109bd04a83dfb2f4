"""What the HTTP server costs: the same N requests through `MoVARuntime.ask` and through `mova-export serve` (the
real app under uvicorn on a loopback port, the official `openai` client, plain and streaming), in one process and
one run, alternating so that drift hits all three alike.

    mova-export demo                                   # writes demo/bundle-cpu (the tiny trained cpu bundle)
    python benchmarks/serve.py --bundle demo/bundle-cpu --requests 30 --out benchmarks/results/serve

Per request: overhead = the client's wall time minus the runtime's own `total` for that request (the answer's
timings, measured inside the worker), so it is what HTTP, JSON, base64 and the queue add; time to first chunk (the
first content piece at the client) against the runtime's time to first token. Writes serve.json and serve.md.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def data_url(rgb: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def start_server(app):
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    return server, thread, server.servers[0].sockets[0].getsockname()[1]


def measure(bundle: Path, n: int, max_tokens: int, threads: int) -> dict:
    import openai

    from mova_export.runtime import MoVARuntime
    from mova_export.serve import ServeOptions, create_app
    from mova_export.source.photos import DEMO_QUESTIONS, sample_images

    images = sample_images(sorted({name for name, _ in DEMO_QUESTIONS}))
    jobs = [DEMO_QUESTIONS[i % len(DEMO_QUESTIONS)] for i in range(n)]
    rows: dict[str, list[dict]] = {"api": [], "server": [], "server_stream": []}
    with MoVARuntime.from_bundle(bundle, llm={"n_threads": threads}, vision_threads=threads) as rt:
        rt.warmup()
        server, thread, port = start_server(create_app(ServeOptions(model="mova", warmup=False), runtime=rt))
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0)
        try:
            for i, (name, question) in enumerate(jobs):
                messages = [{"role": "user", "content": [{"type": "text", "text": question},
                                                         {"type": "image_url",
                                                          "image_url": {"url": data_url(images[name])}}]}]
                rt.frames.clear()      # every side computes from the pixels
                t0 = time.perf_counter()
                answer = rt.ask(images[name], question, max_tokens)
                rows["api"].append({"wall_ms": (time.perf_counter() - t0) * 1e3, "runtime_ms": answer.timings_ms["total"],
                                    "ttft_ms": answer.timings_ms["time_to_first_token"], "ids": answer.token_ids})
                rt.frames.clear()
                t0 = time.perf_counter()
                got = client.chat.completions.create(model="mova", messages=messages, max_tokens=max_tokens)
                wall = (time.perf_counter() - t0) * 1e3
                mova = got.model_extra["mova"]
                rows["server"].append({"wall_ms": wall, "runtime_ms": mova["timings_ms"]["total"],
                                       "ttft_ms": mova["timings_ms"]["time_to_first_token"], "ids": mova["token_ids"]})
                rt.frames.clear()
                t0 = time.perf_counter()
                first = None
                for chunk in client.chat.completions.create(model="mova", messages=messages, max_tokens=max_tokens,
                                                            stream=True):
                    if first is None and chunk.choices and chunk.choices[0].delta.content:
                        first = (time.perf_counter() - t0) * 1e3
                    if chunk.choices and chunk.choices[0].finish_reason:
                        mova = chunk.model_extra["mova"]
                wall = (time.perf_counter() - t0) * 1e3
                rows["server_stream"].append({"wall_ms": wall, "runtime_ms": mova["timings_ms"]["total"],
                                              "ttft_ms": mova["timings_ms"]["time_to_first_token"],
                                              "first_chunk_ms": first, "ids": mova["token_ids"]})
                print(f"request {i + 1}/{n}: api {rows['api'][-1]['wall_ms']:.0f} ms, server "
                      f"{rows['server'][-1]['wall_ms']:.0f} ms, stream {wall:.0f} ms", file=sys.stderr)
        finally:
            server.should_exit = True
            thread.join(30)
    return summarize(rows, bundle, n, max_tokens)


def summarize(rows: dict, bundle: Path, n: int, max_tokens: int) -> dict:
    out: dict = {"bundle": str(bundle), "requests": n, "max_tokens": max_tokens, "sides": {}}
    for side, rs in rows.items():
        overhead = [r["wall_ms"] - r["runtime_ms"] for r in rs]
        share = [(r["wall_ms"] - r["runtime_ms"]) / r["wall_ms"] * 100 for r in rs]
        entry = {"wall_ms_p50": percentile([r["wall_ms"] for r in rs], 50),
                 "overhead_ms_p50": percentile(overhead, 50), "overhead_ms_p95": percentile(overhead, 95),
                 "overhead_pct_p50": percentile(share, 50), "ttft_ms_p50": percentile([r["ttft_ms"] for r in rs], 50)}
        if side == "server_stream":
            entry["first_chunk_ms_p50"] = percentile([r["first_chunk_ms"] for r in rs], 50)
            entry["first_chunk_minus_ttft_ms_p50"] = percentile([r["first_chunk_ms"] - r["ttft_ms"] for r in rs], 50)
        out["sides"][side] = entry
    out["same_ids_as_api"] = all(a["ids"] == s["ids"] == t["ids"]
                                 for a, s, t in zip(rows["api"], rows["server"], rows["server_stream"]))
    return out


def markdown(result: dict) -> str:
    lines = [f"Server overhead, {result['requests']} requests of up to {result['max_tokens']} tokens "
             f"({result['bundle']}); same token ids as the API: {result['same_ids_as_api']}", "",
             "| path | wall p50 ms | overhead p50 ms | overhead p95 ms | overhead p50 % of the request | TTFT p50 ms |"
             " first chunk p50 ms |", "|---|---:|---:|---:|---:|---:|---:|"]
    for side, e in result["sides"].items():
        lines.append(f"| {side} | {e['wall_ms_p50']:.1f} | {e['overhead_ms_p50']:.1f} | {e['overhead_ms_p95']:.1f} | "
                     f"{e['overhead_pct_p50']:.2f} | {e['ttft_ms_p50']:.1f} | "
                     f"{e.get('first_chunk_ms_p50', float('nan')):.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--requests", type=int, default=30)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp and ONNX Runtime threads")
    ap.add_argument("--out", type=Path, default=Path("bench-results/serve"))
    args = ap.parse_args()
    result = measure(args.bundle, args.requests, args.max_tokens, args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "serve.md").write_text(markdown(result))
    print(markdown(result))
    if not result["same_ids_as_api"]:
        sys.exit("the server's answers differ from the API's")


if __name__ == "__main__":
    main()
