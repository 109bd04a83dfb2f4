"""Full-size build benchmark: times every stage unit of `build --target T` on a full-size (synthetic) MoVA-8B, with
peak RSS and disk, projects the whole build from a --components subset, then times a rebuild after one component's
precision changed (only that component's quantization should run again).

    python benchmarks/full_build.py --synth ckpt-full --target jetson-orin --components base,expert_F,adapter \\
        --calib-images 2 --work-dir work-full --out bench-results/full-build

Not a test: at full size it takes tens of minutes on 2 cores. Writes full_build.json, full_build.md and
full_build.png (minutes per unit, measured and projected) into --out.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import time
from pathlib import Path

import yaml


def peak_rss_gib() -> float:
    """Peak resident set size of this process and its children so far (GiB)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 2**20


def folder_gib(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink()) / 2**30


def calibration_folder(out: Path, count: int) -> Path:
    """The first `count` built-in sample photos with their questions, as a --calib folder."""
    from PIL import Image

    from mova_export.source.photos import SAMPLE_QUESTIONS, sample_images

    folder = out / "calib"
    folder.mkdir(parents=True, exist_ok=True)
    names = list(SAMPLE_QUESTIONS)[:count]
    for name, rgb in sample_images(names).items():
        Image.fromarray(rgb).save(folder / f"{name}.png")
    (folder / "questions.txt").write_text("".join(f"{n}.png\t{SAMPLE_QUESTIONS[n]}\n" for n in names))
    return folder


def run_build(label: str, checkpoint: Path, target: str | Path, out: Path, work: Path, components: list[str] | None,
              calib: Path) -> dict:
    from mova_export.core.progress import Console
    from mova_export.pipeline import BuildRequest, build

    start = time.perf_counter()
    result = build(BuildRequest(checkpoint=checkpoint, target=target, out=out / f"bundle-{label.replace(' ', '-')}",
                                calib=calib, components=components, work_dir=work, compile=False), console=Console())
    return {"label": label, "seconds": time.perf_counter() - start, "peak_rss_gib": peak_rss_gib(),
            "units": [r.to_json() for r in result.records], "bundle_gib": folder_gib(result.bundle),
            "work_gib": folder_gib(work)}


def projection(units: list[dict], components: list[str]) -> dict[str, dict]:
    """Minutes per component and stage: measured where built, else scaled by parameter count from the measured
    towers (seconds per parameter of the features, export and quantize units)."""
    from mova_export.components import all_specs

    params = {s.name: s.memory.params for s in all_specs()}
    measured: dict[str, dict[str, float]] = {}
    for u in units:
        measured.setdefault(u["name"], {})[u["stage"]] = measured.get(u["name"], {}).get(u["stage"], 0) + u["seconds"]
    towers = [c for c in measured if c.startswith(("base", "expert_"))]
    rate = {stage: sum(measured[c].get(stage, 0) for c in towers) / max(1, sum(params[c] for c in towers))
            for stage in ("features", "export", "quantize")}
    out = {}
    for spec in all_specs():
        if spec.kind == "llm":
            continue
        if spec.name in measured and (spec.name in components or spec.kind in ("tower", "text")):
            out[spec.name] = {"measured": True, **{k: v / 60 for k, v in measured[spec.name].items()}}
        if spec.name not in components and spec.kind in ("tower", "text"):
            entry = out.setdefault(spec.name, {"measured": False})
            for stage in ("export", "quantize"):
                entry.setdefault(stage, rate[stage] * params[spec.name] / 60)
                entry["measured"] = False
    return out


def markdown(report: dict) -> str:
    first = report["builds"][0]
    lines = [f"# Full-size build: {report['target']} on {report['machine']}", "",
             f"checkpoint {report['checkpoint']} ({report['checkpoint_gib']:.1f} GiB), components built: "
             f"{', '.join(report['components'])}, calibration images: {report['calib_images']}", "",
             "| component | features min | export min | quantize min | measured |", "|---|---:|---:|---:|---|"]
    for name, row in report["projection"].items():
        lines.append(f"| {name} | {row.get('features', 0):.1f} | {row.get('export', 0):.1f} | "
                     f"{row.get('quantize', 0):.1f} | {'yes' if row['measured'] else 'projected'} |")
    gguf = [u for u in first["units"] if u["stage"] == "gguf"]
    total = sum(sum(v for k, v in r.items() if k != "measured") for r in report["projection"].values())
    total += sum(u["seconds"] for u in gguf) / 60
    lines += ["", f"GGUF ({', '.join(u['name'] for u in gguf)}): {sum(u['seconds'] for u in gguf) / 60:.1f} min; "
              f"the whole build, projected: {total:.0f} min", ""]
    lines += ["| build | wall min | peak RSS GiB | bundle GiB | work folder GiB | units computed / reused |",
              "|---|---:|---:|---:|---:|---:|"]
    for b in report["builds"]:
        computed = sum(u["status"] == "computed" for u in b["units"])
        lines.append(f"| {b['label']} | {b['seconds'] / 60:.1f} | {b['peak_rss_gib']:.1f} | {b['bundle_gib']:.2f} | "
                     f"{b['work_gib']:.1f} | {computed} / {len(b['units']) - computed} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, help="a full-size MoVA checkpoint (default: --synth)")
    ap.add_argument("--synth", type=Path, help="write a synthetic full-size checkpoint here first (if absent)")
    ap.add_argument("--target", default="jetson-orin")
    ap.add_argument("--components", default="base,expert_F,adapter", help="the subset to build (and time)")
    ap.add_argument("--calib-images", type=int, default=2, help="built-in calibration photos to use (>= 2)")
    ap.add_argument("--changed", default="base", help="the component whose precision the rebuild changes to fp16")
    ap.add_argument("--work-dir", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    from mova_export.recipe import resolve_target

    args.out.mkdir(parents=True, exist_ok=True)
    checkpoint = args.checkpoint
    if checkpoint is None:
        if args.synth is None:
            ap.error("pass --checkpoint or --synth")
        checkpoint = args.synth
        if not (checkpoint / "config.json").exists():
            from mova_export.synth import write_synthetic_checkpoint

            write_synthetic_checkpoint(checkpoint, scale="full")
    components = [c.strip() for c in args.components.split(",") if c.strip()]
    calib = calibration_folder(args.out, args.calib_images)
    first = run_build("first", checkpoint, args.target, args.out, args.work_dir, components, calib)
    recipe = yaml.safe_load(resolve_target(args.target).read_text())
    recipe["precision"][args.changed] = "fp16"
    changed = args.out / f"{recipe['name']}-{args.changed}-fp16.yaml"
    changed.write_text(yaml.safe_dump(recipe, sort_keys=False))
    second = run_build(f"{args.changed} precision changed", checkpoint, changed, args.out, args.work_dir,
                       components, calib)
    import platform

    report = {"target": args.target, "checkpoint": str(checkpoint), "checkpoint_gib": folder_gib(checkpoint),
              "components": components, "calib_images": args.calib_images,
              "machine": f"{platform.machine()}, {__import__('os').cpu_count()} CPUs",
              "builds": [first, second], "projection": projection(first["units"], components)}
    (args.out / "full_build.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "full_build.md").write_text(markdown(report))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = list(report["projection"])
        fig, ax = plt.subplots(figsize=(9, 0.4 * len(names) + 1.5))
        left = [0.0] * len(names)
        for stage in ("features", "export", "quantize"):
            values = [report["projection"][n].get(stage, 0) for n in names]
            ax.barh(names, values, left=left, label=stage)
            left = [a + b for a, b in zip(left, values)]
        ax.set_xlabel("minutes on this machine (unmeasured components projected by parameter count)")
        ax.set_title(f"MoVA-8B build for {args.target}: minutes per component", fontsize=9)
        ax.invert_yaxis()
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.out / "full_build.png", dpi=110)
    except ImportError:
        pass
    print(markdown(report))
    shutil.rmtree(args.out / "calib", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
