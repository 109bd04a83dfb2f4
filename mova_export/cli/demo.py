"""`mova-export demo`: the whole flow on the embedded default, ending with a one-line verdict.

It writes the tiny trained MoVA checkpoint (its LLM routes and answers by question kind), builds the bundle for the
target (cpu: INT8 vision graphs in ONNX Runtime, Q4_K_M LLM in llama.cpp), then asks the demo's questions of the
bundle's runtime (warmed up) and of the PyTorch fp32 reference, side by side: routed experts, answers, latency.
The verdict says whether the bundle routed and answered like the reference; demo.png shows it per question.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MAX_NEW_TOKENS = 24


def run_demo(demo_dir: Path, target: str, work_dir: Path | None, console: Any) -> bool:
    """True when the bundle agreed with the reference on every question (routing and answer)."""
    from rich.table import Table

    from ..pipeline import BuildRequest, build
    from ..reference import ReferencePipeline
    from ..runtime import MoVARuntime
    from ..source.photos import demo_questions, sample_images
    from ..synth import DEMO_SCALE, write_synthetic_checkpoint
    from .render import print_build

    checkpoint, bundle = demo_dir / "checkpoint", demo_dir / f"bundle-{target}"
    if not (checkpoint / "config.json").exists():
        write_synthetic_checkpoint(checkpoint, scale=DEMO_SCALE, seed=0, overwrite=True)
    console.print(f"[bold]checkpoint[/bold] {checkpoint} ({DEMO_SCALE} MoVA: random vision towers and adapter, an LLM "
                  "trained to route by question kind)")
    result = build(BuildRequest(checkpoint=checkpoint, target=target, out=bundle, work_dir=work_dir))
    print_build(result, console)
    questions = demo_questions()
    images = sample_images(dict.fromkeys(name for name, _ in questions))
    reference = ReferencePipeline(checkpoint)
    rows = []
    with MoVARuntime.from_bundle(bundle) as runtime:
        runtime.warmup()        # one-time initialisation out of the per-question timings
        for name, question in questions:
            ref = reference.run(images[name], question, max_new_tokens=MAX_NEW_TOKENS)
            got = runtime.ask(images[name], question, max_new_tokens=MAX_NEW_TOKENS)
            rows.append({"image": name, "question": question, "reference_experts": ref.experts,
                         "bundle_experts": got.experts, "reference_answer": ref.text, "bundle_answer": got.text,
                         "routing_agree": ref.experts == got.experts, "answer_equal": ref.token_ids == got.token_ids,
                         "bundle_ms": got.timings_ms["total"], "reference_ms": ref.timings_ms["total"]})
    table = Table(title=f"PyTorch fp32 reference vs the {target} bundle (warm)", title_justify="left")
    # one answer column (the bundle's answer only where it differs) keeps the table readable at 80 columns
    for col, kw in (("image", {"overflow": "fold"}), ("question", {"overflow": "fold", "ratio": 3}),
                    ("experts ref / bundle", {"overflow": "fold"}), ("answer", {"overflow": "fold", "ratio": 4}),
                    ("ms bundle / ref", {"justify": "right"})):
        table.add_column(col, **kw)
    for r in rows:
        same = "" if r["routing_agree"] else " [red]differs[/red]"
        answer = r["reference_answer"] + ("" if r["answer_equal"] else f"\n[red]bundle: {r['bundle_answer']}[/red]")
        table.add_row(r["image"], r["question"], f"{','.join(r['reference_experts']) or 'none'} / "
                      f"{','.join(r['bundle_experts']) or 'none'}{same}", answer,
                      f"{r['bundle_ms']:.0f} / {r['reference_ms']:.0f}")
    console.print(table)
    demo_dir.mkdir(parents=True, exist_ok=True)
    (demo_dir / "demo.json").write_text(json.dumps(rows, indent=2) + "\n")
    picture = _picture(demo_dir / "demo.png", rows, target)
    routed = sum(r["routing_agree"] for r in rows)
    equal = sum(r["answer_equal"] for r in rows)
    sets = len({tuple(r["reference_experts"]) for r in rows})
    ok = routed == equal == len(rows)
    verdict = "PASS" if ok else "FAIL"
    console.print(f"[bold]{verdict}[/bold]: the {target} bundle routed like the PyTorch reference on {routed}/{len(rows)}"
                  f" questions ({sets} different expert sets) and answered token for token alike on {equal}/{len(rows)}"
                  f"; table {demo_dir / 'demo.json'}" + (f", picture {picture}" if picture else ""))
    return ok


def _picture(path: Path, rows: list[dict[str, Any]], target: str) -> Path | None:
    from ..bench.common import barh, write_figure

    labels = [f"{r['image']}: {','.join(r['reference_experts']) or 'none'}"
              + ("" if r["routing_agree"] and r["answer_equal"] else " (differs)") for r in rows]

    def draw(fig: Any) -> None:
        ax = fig.add_subplot()
        barh(ax, labels, {f"{target} bundle": [r["bundle_ms"] for r in rows],
                          "PyTorch reference": [r["reference_ms"] for r in rows]},
             "ms per question (warm), routed experts on the left")
        ax.set_title("MoVA demo: the same questions through the bundle and the reference", fontsize=9)

    return path if write_figure(path, draw, 0.5 * len(rows) + 1.6) else None
