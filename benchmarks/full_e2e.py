"""MoVA-8B end to end at full size: synth -> build for each target (every component, the built-in calibration set, no
TensorRT compile) -> the runtime answering the demo's six question kinds, with what it costs and how close it stays.

    python benchmarks/full_e2e.py --checkpoint ckpt-full --synth --work-dir work-full \\
        --out benchmarks/results/full-e2e --targets cpu,jetson-orin

Each build and each runtime session runs as its own process, so its peak RSS is its own (os.wait4). Per target:
build minutes and peak RSS, minutes per unit, bundle and work-folder size; per shipped graph, the worst cosine over
the parity images against the PyTorch fp32 reference at full size (towers and the text encoder measured here against
their features units, the adapter's from its export's proof); the runtime's p50 ms per stage over the six questions
(experts forced to each question kind's set: a random LLM routes at random), time to first token, the answer pass's
LLM prefill (576 image tokens + the prompt) and decode tokens/s, peak RSS. Writes full_e2e.json, full_e2e.md and
full_e2e.png into --out. Not a test: hours on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

# (question, experts forced) per demo question kind: what a trained MoVA routes these kinds to
KINDS = (("astronaut", "Describe the scene in this image.", "A"),
         ("coffee", "How many cups are on the table?", "C"),
         ("page", "What does the text on the page say?", "B,D"),
         ("immunohistochemistry", "What kind of cells are in the micrograph?", "F"),
         ("chelsea", "Segment the cat from the background.", "G"),
         ("rocket", "Hello, who are you?", ""))


def run(cmd: list[str], log: Path, every_s: float = 2.0) -> dict:
    """Run `cmd` as a child with its output in `log`; wall seconds, exit code, the child's own peak RSS (os.wait4)
    and its RSS every `every_s` seconds with the log's last line then (which unit held the memory)."""
    start = time.perf_counter()
    trace: list[tuple[float, float, str]] = []
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            trace.append((round(time.perf_counter() - start, 1), rss_gib(proc.pid), last_line(log)))
            time.sleep(every_s)
    proc.returncode = os.waitstatus_to_exitcode(status)
    peak = max(trace, key=lambda t: t[1], default=(0.0, 0.0, ""))
    return {"cmd": " ".join(cmd), "seconds": round(time.perf_counter() - start, 1), "exit": proc.returncode,
            "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2), "log": str(log),
            "peak_sampled": {"at_s": peak[0], "rss_gib": peak[1], "during": peak[2]},
            "rss_trace": [t[:2] for t in trace]}


def rss_gib(pid: int) -> float:
    """Resident memory of a live process from /proc (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 2**20, 2)
    except OSError:
        pass
    return 0.0


def last_line(log: Path) -> str:
    """The last non-empty line written to the log so far (progress lines end in a carriage return or newline)."""
    with log.open("rb") as f:
        f.seek(max(0, log.stat().st_size - 400))
        tail = f.read().decode(errors="replace").replace("\r", "\n").strip().splitlines()
    return tail[-1].strip()[:160] if tail else ""


def folder_gib(path: Path) -> float:
    """Disk use of a folder, hard links counted once (bundle files are links into the work folder)."""
    seen, total = set(), 0
    for p in path.rglob("*"):
        if p.is_file() and not p.is_symlink():
            st = p.stat()
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return round(total / 2**30, 2)


def answer(bundle: Path, out: Path) -> None:
    """Child mode: the runtime on the six question kinds (experts forced), timings and answers as JSON."""
    import resource

    from mova_export.runtime import MoVARuntime
    from mova_export.source.photos import sample_images

    images = sample_images([k[0] for k in KINDS])
    rows = []
    t0 = time.perf_counter()
    with MoVARuntime.from_bundle(bundle) as rt:
        load_s = time.perf_counter() - t0
        rt.warmup()
        for name, question, experts in KINDS:
            ans = rt.ask(images[name], question, max_new_tokens=16, experts=experts.split(",") if experts else [])
            rows.append({"image": name, "question": question, "experts": ans.experts, "text": ans.text,
                         "timings_ms": ans.timings_ms, "tokens_per_s": ans.tokens_per_s, "tokens": len(ans.token_ids)})
    out.write_text(json.dumps({"load_s": load_s, "rows": rows,
                               "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}, indent=2))


def cosines(bundle: Path, work: Path, out: Path) -> None:
    """Child mode: each shipped graph's worst cosine over the parity images against PyTorch fp32 (the features units
    of the build), per sample; the adapter's graphs from their export's proof against the skipping reference."""
    import numpy as np

    from mova_export.bundle import load_bundle
    from mova_export.core.bert_inputs import BertTextTokenizer, text_inputs
    from mova_export.core.image_inputs import preprocess_input
    from mova_export.core.tolerance import parity
    from mova_export.export.component import read_features
    from mova_export.runners import OrtRunner
    from mova_export.source.photos import sample_images

    b = load_bundle(bundle, verify=False)
    m, facts = b.manifest, b.manifest.model
    cal = m.export["calibration"]
    labels = cal["parity_images"]
    questions = dict(zip(cal["images"], cal["questions"]))
    images = sample_images(labels)
    tok = BertTextTokenizer.from_folder(b.tokenizer_dir("text"))
    result = {}
    for name, graph in m.graphs.items():
        precision = m.runtime.precision[name]
        if graph.role.startswith("adapter"):
            worst = graph.variants[precision].parity["worst"]
            result[name] = {"precision": precision, "worst_cosine": min(f["cosine"] for f in worst.values()),
                            "per_sample": None, "against": "the skipping reference, every sweep mask (export proof)"}
            continue
        unit = m.stages[f"features/{graph.component}"]["key"]
        reference = read_features(work / "features" / graph.component / unit / "features.npz")
        # a Q/DQ graph runs as its target does: fused integer kernels on the cpu target, float math under TensorRT
        qdq = ((m.quantize.get(name) or {}).get("calibration") or {}).get("qdq", "fused")
        runner = OrtRunner(b.graph_path(name, precision), qdq=qdq)
        per = {}
        for label in labels:
            if graph.role == "text":
                ids, mask = text_inputs(tok, questions[label], facts.text_buckets)
                feed = {"input_ids": ids, "attention_mask": mask}
            else:
                tower = next(t for t in (facts.base, *facts.experts) if t.component == graph.component)
                arrays = [a for kind in tower.image_inputs
                          for a in preprocess_input(images[label], facts.image_inputs[kind], facts)]
                feed = dict(zip(runner.input_names, arrays))
            got = next(iter(runner.infer(feed).values()))
            per[label] = parity(reference[label], np.asarray(got, np.float32)).cosine
        result[name] = {"precision": precision, "worst_cosine": min(per.values()), "per_sample": per, "qdq": qdq,
                        "against": "PyTorch fp32 (features units), each parity image"}
    out.write_text(json.dumps(result, indent=2))


def markdown(results: dict) -> str:
    lines = ["# MoVA-8B end to end (full-size synthetic checkpoint, 2 CPU cores)", ""]
    lines += ["| target | build min | build peak RSS GiB | bundle GiB | work GiB | units computed / reused |",
              "|---|---:|---:|---:|---:|---|"]
    for t, r in results["targets"].items():
        if "units" not in r:                       # the build failed: its exit code and log say why
            lines.append(f"| {t} | failed (exit {r['build']['exit']}) after {r['build']['seconds'] / 60:.1f} | "
                         f"{r['build']['peak_rss_gib']} | - | - | see {r['build']['log']} |")
            continue
        units = r["units"]
        computed = sum(u["status"] == "computed" for u in units)
        lines.append(f"| {t} | {r['build']['seconds'] / 60:.1f} | {r['build']['peak_rss_gib']} | {r['bundle_gib']} | "
                     f"{r['work_gib']} | {computed} / {len(units) - computed} |")
    for t, r in results["targets"].items():
        p = r["build"]["peak_sampled"]
        lines.append(f"\n{t}: the highest sampled RSS, {p['rss_gib']} GiB at minute {p['at_s'] / 60:.1f}, "
                     f"while the log said: `{p['during']}`")
    for t, r in results["targets"].items():
        lines += ["", f"## {t}: minutes per unit (a reused unit: what producing it took, where recorded)", "",
                  "| unit | status | min |", "|---|---|---:|"]
        for u in r.get("units", []):
            seconds = u["seconds"] if u["status"] == "computed" else u.get("computed_s")
            lines.append(f"| {u['stage']} {u['name']} | {u['status']} | "
                         f"{'-' if seconds is None else f'{seconds / 60:.2f}'} |")
        if r.get("cosines"):
            lines += ["", f"## {t}: each shipped graph against PyTorch fp32, worst parity image", "",
                      "| graph | precision | worst cosine | per image |", "|---|---|---:|---|"]
            for g, c in r["cosines"].items():
                per = ", ".join(f"{k} {v:.5f}" for k, v in (c["per_sample"] or {}).items()) or c["against"]
                lines.append(f"| {g} | {c['precision']} | {c['worst_cosine']:.6f} | {per} |")
        a = r.get("answers")
        if a:
            stages = list(dict.fromkeys(k for row in a["rows"] for k in row["timings_ms"]))   # in pipeline order
            lines += ["", f"## {t}: runtime, p50 over the six question kinds (ms)", "",
                      f"load {a['load_s']:.1f} s, peak RSS {a['peak_rss_gib']:.2f} GiB, decode "
                      f"{statistics.median(row['tokens_per_s'] for row in a['rows']):.2f} tokens/s (p50)", "",
                      "| stage | p50 ms |", "|---|---:|"]
            for s in stages:
                values = [row["timings_ms"][s] for row in a["rows"] if s in row["timings_ms"]]
                lines.append(f"| {s} | {statistics.median(values):.0f} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = list(results["targets"])
    fig, axes = plt.subplots(1, 3, figsize=(19, 5))
    # where the time to first token goes, per question kind, on each target whose bundle answered
    parts = ("base", "adapter_routing", "llm_routing", "experts", "text_encoder", "adapter_answer", "llm_prefill")
    bars = [(f"{t}\n{row['image']}", row["timings_ms"]) for t in targets
            for row in (results["targets"][t].get("answers") or {}).get("rows", [])]
    for j, (_, ms) in enumerate(bars):
        bottom = 0.0
        for k, part in enumerate(parts):
            seconds = ms.get(part, 0.0) / 1000
            axes[0].bar(j, seconds, bottom=bottom, color=f"C{k}", label=part if j == 0 else None)
            bottom += seconds
    axes[0].set(xticks=range(len(bars)), xticklabels=[b[0] for b in bars], ylabel="seconds",
                title="runtime: time to first token by stage")
    axes[0].tick_params(axis="x", rotation=60)
    axes[0].legend(fontsize=8)
    for t in targets:
        cos = results["targets"][t].get("cosines") or {}
        names = list(cos)
        axes[1].plot(names, [max(1 - cos[n]["worst_cosine"], 1e-9) for n in names], "o-", label=t)
    axes[1].set(yscale="log", ylabel="1 - worst cosine vs PyTorch fp32", title="shipped graphs at full size")
    axes[1].tick_params(axis="x", rotation=60)
    axes[1].legend()
    for t in targets:
        trace = results["targets"][t]["build"]["rss_trace"]
        units = results["targets"][t].get("units") or []
        reused = sum(u.get("status") == "reused" for u in units)
        axes[2].plot([x[0] / 60 for x in trace], [x[1] for x in trace],
                     label=f"build {t} ({reused} of {len(units)} units reused)")
    axes[2].axhline(16, color="red", linestyle="--", label="16 GiB goal")
    # a resumed build's last run reuses what earlier runs computed: the per-unit peaks are in the README and logs
    axes[2].set(xlabel="minutes", ylabel="RSS GiB", title="memory of the last build run")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--synth", action="store_true", help="write a synthetic checkpoint there first")
    ap.add_argument("--scale", default="full", help="synth scale (tiny: a minute-long smoke run of this script)")
    ap.add_argument("--work-dir", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--targets", default="cpu,jetson-orin")
    ap.add_argument("--measure-only", action="store_true",
                    help="measure the bundles already in --out again (cosines, answers), keeping their build records")
    ap.add_argument("--answer", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--cosines", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.answer:
        return answer(args.answer, args.result)
    if args.cosines:
        return cosines(args.cosines, args.work_dir, args.result)
    args.out.mkdir(parents=True, exist_ok=True)
    logs = args.out / "logs"
    logs.mkdir(exist_ok=True)
    cli = [sys.executable, "-m", "mova_export.cli"]
    # targets measured by an earlier run of this script stay in the results (one target is hours)
    previous = args.out / "full_e2e.json"
    results: dict = {"checkpoint": str(args.checkpoint), "targets": {}}
    if previous.is_file():
        results["targets"] = json.loads(previous.read_text()).get("targets", {})
    if args.synth and not (args.checkpoint / "config.json").is_file():
        results["synth"] = run([*cli, "synth", "--scale", args.scale, "--out", str(args.checkpoint)], logs / "synth.log")
    for target in args.targets.split(","):
        bundle = args.out / f"bundle-{target}"
        if args.measure_only:
            if not (bundle / "manifest.json").is_file() or target not in results["targets"]:
                sys.exit(f"error: --measure-only needs {bundle} and its build record in {previous}; build it first")
            entry = results["targets"][target]
        else:
            build = run([*cli, "build", "--target", target, "--checkpoint", str(args.checkpoint), "--out",
                         str(bundle), "--work-dir", str(args.work_dir), "--no-compile"], logs / f"build-{target}.log")
            entry = {"build": build}
            results["targets"][target] = entry
            if build["exit"] != 0:
                print(f"build {target} failed, see {build['log']}", file=sys.stderr)
                continue
            manifest = json.loads((bundle / "manifest.json").read_text())
            entry["units"] = [u for k, u in manifest["stages"].items() if k != "compile"]
            entry["bundle_gib"], entry["work_gib"] = folder_gib(bundle), folder_gib(args.work_dir)
        me = [sys.executable, __file__, "--checkpoint", str(args.checkpoint), "--work-dir", str(args.work_dir),
              "--out", str(args.out)]
        for mode in ("cosines", "answer"):
            result = args.out / f"{mode}-{target}.json"
            entry[f"{mode}_run"] = run([*me, f"--{mode}", str(bundle), "--result", str(result)],
                                       logs / f"{mode}-{target}.log")
            if result.is_file():
                entry["answers" if mode == "answer" else "cosines"] = json.loads(result.read_text())
        (args.out / "full_e2e.json").write_text(json.dumps(results, indent=2))
    (args.out / "full_e2e.json").write_text(json.dumps(results, indent=2))
    (args.out / "full_e2e.md").write_text(markdown(results))
    plot(results, args.out / "full_e2e.png")
    print((args.out / "full_e2e.md").read_text())


if __name__ == "__main__":
    main()
