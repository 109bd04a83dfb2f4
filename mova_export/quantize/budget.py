"""The accuracy budget: quantize, judge every held-out sample, leave the most error-adding nodes out, else fall back.

1. Q/DQ graph of every eligible node (try 1). Every held-out sample within budget -> final = precision.
2. Otherwise rank the quantized nodes by the error each adds (sensitivity.node_sensitivity on the worst held-out
   sample; a layered graph only the nodes of its worst blocks) and re-quantize excluding the top 1, 2, 4, ... nodes
   (sensitivity.exclusion_schedule); the calibration ranges of try 1 serve every later try. The first within budget -> final = "<precision>-partial".
   The tries stop early when the gain per excluded node so far cannot reach the budget (sensitivity.futile_exclusions):
   at full size a try is minutes, and a graph 0.03 below its budget gains 0.001 per try.
3. Otherwise the recipe's fallback: the fp16 graph (graph_io.fp16_from_onnx; its figures recorded, budget_met says
   whether it met it), or the fp32 graph itself when the recipe falls back to fp32 (or to nothing: the build refuses).

The gate is the worst held-out sample: a graph that is good on average and bad on one photo misses the budget. The
decision records every held-out sample's figures, which one was worst, and what the calibration set lacked.
"""
from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..core.progress import Log, quiet
from ..core.tolerance import ParityReport, Tolerance
from ..export.fp16 import fp16_from_onnx
from ..export.graph_io import graph_io
from ..runners.ort import OrtRunner
from .feeds import FeedSplit
from .fp8_sim import simulate_fp8
from .measure import accuracy_check, measure
from .qdq import QuantResult, qdq_from_onnx
from .sensitivity import exclusion_schedule, futile_exclusions, node_sensitivity
from .settings import QuantSettings

GATE = "worst held-out sample"


@dataclass
class QuantDecision:
    """What `quantize_with_budget` shipped and why; `to_json()` goes into the manifest and the report."""
    component: str
    requested: str
    final: str                        # "<precision>" | "<precision>-partial" | "fp16"
    path: Path
    excluded_nodes: list[str]
    measured: dict[str, float]        # worst over outputs and held-out samples, of the shipped graph
    worst_sample: str                 # the held-out sample with the lowest cosine
    held_out: dict[str, dict[str, float]]   # every held-out sample's worst figures, of the shipped graph
    budget: dict[str, float | None]
    budget_met: bool
    tries: int                        # quantization attempts (the fp16 fallback is not counted)
    parity_method: str                # how the shipped graph's figures were measured ("ort" | "simulated-fp8")
    calibration: dict[str, Any]
    gate: str = GATE
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["path"] = str(self.path)
        return out


def _per_sample(report: ParityReport) -> dict[str, dict[str, float]]:
    return {label: {"cosine": fig.cosine, "rel_l2": fig.rel_l2} for label, fig in report.per_sample().items()}


def quantize_with_budget(src: str | Path, dst_dir: str | Path, component: str, settings: QuantSettings,
                         feeds: FeedSplit, keep_fp32: Sequence[str] | None = (), log: Log = quiet) -> QuantDecision:
    """Quantize the fp32 graph `src` as `settings` says, judge it on `feeds.held_out` and keep it only within the
    budget (the module docstring has the steps). Files: <dst_dir>/<component>.<precision>.onnx, or
    <component>.fp16.onnx on fallback (the failed Q/DQ graph is removed). `keep_fp32`: the nodes the component's
    fp16 graph keeps in fp32 (the fp16 base and the fallback keep them too); None when no fp16 graph of it meets the
    fp16 tolerance: the fallback is then the fp32 graph itself (final "fp32", path `src`), as it is when
    `settings.fallback` is not fp16."""
    src, dst_dir, precision, budget = Path(src), Path(dst_dir), settings.precision, settings.budget
    held_out, labels = feeds.held_out, feeds.held_out_labels
    calibration = feeds.calibration + (held_out if settings.augment_calibration else [])
    dst = dst_dir / f"{component}.{precision}.onnx"
    calib_json = {**feeds.to_json(), "held_out_in_calibration": settings.augment_calibration,
                  "method": settings.method, "base": settings.base, "backend": settings.backend, "qdq": settings.qdq}
    runner = OrtRunner(src)
    reference = [runner.infer(f) for f in held_out]      # the fp32 graph's outputs, once for every try
    del runner
    history: list[dict[str, Any]] = []

    def decision(final: str, path: Path, excluded: list[str], report: ParityReport, how: str) -> QuantDecision:
        worst_label, _ = report.worst_sample()
        tries = len(history) - (final in ("fp16", "fp32"))          # the fallback is no quantization try
        return QuantDecision(component, precision, final, path, excluded, report.summary(), worst_label,
                             _per_sample(report), budget.to_json(), report.passed, tries, how, calib_json, GATE, history)

    def attempt(result: QuantResult) -> tuple[ParityReport, str]:
        report, how = measure(reference, result, held_out, budget, component=component, qdq=settings.qdq,
                              labels=labels)
        worst_label, _ = report.worst_sample()
        history.append({"excluded": len(result.excluded_nodes), "quantized": len(result.quantized_nodes),
                        **report.summary(), "worst_sample": worst_label, "parity_method": how})
        log(f"{component} [{precision}] try {len(history)}: {len(result.excluded_nodes)} excluded, worst held-out "
            f"sample {worst_label}: cosine {report.summary()['cosine']:.6f} ({how}); budget cosine >= "
            f"{budget.min_cosine} on every sample")
        return report, how

    with tempfile.TemporaryDirectory() as ranges:
        result = qdq_from_onnx(src, dst, settings, calibration, ranges_dir=Path(ranges), keep_fp32=keep_fp32 or (),
                               log=log)
        report, how = attempt(result)
        if report.passed:
            return decision(precision, dst, [], report, how)
        quantized = list(result.quantized_nodes)
        worst = held_out[labels.index(history[-1]["worst_sample"])] if labels else held_out[0]
        ranking = _ranking(src, result, worst, quantized, settings, log)
        log(f"{component} [{precision}]: most error-adding nodes {ranking[:5]}")
        schedule = exclusion_schedule(len(ranking), len(quantized), settings.max_excluded, settings.max_tries - 1)
        for k in schedule:
            result = qdq_from_onnx(src, dst, settings, calibration, exclude_nodes=ranking[:k],
                                   ranges_dir=Path(ranges), keep_fp32=keep_fp32 or (), log=log)
            report, how = attempt(result)
            if report.passed:
                return decision(f"{precision}-partial", dst, ranking[:k], report, how)
            if k < schedule[-1] and _gives_up(history, schedule[-1], budget, f"{component} [{precision}]", log):
                break
    for f in result.files:
        f.unlink(missing_ok=True)
    fallback, path, report = _fallback(src, dst_dir, component, settings, reference, feeds, keep_fp32, log)
    _record_fallback(history, fallback, report, component, log)
    return decision(fallback, path, [], report, "ort")


def _gives_up(history: list[dict[str, Any]], most_excluded: int, budget: Tolerance, what: str, log: Log) -> bool:
    """Whether the exclusion tries so far say the rest cannot meet the budget (recorded on the last try, logged)."""
    futile = futile_exclusions(history[0]["cosine"], [(h["excluded"], h["cosine"]) for h in history[1:]],
                               most_excluded, budget.min_cosine)
    if futile:
        history[-1]["gave_up"] = futile
        log(f"{what}: no more tries: {futile}")
    return bool(futile)


def _record_fallback(history: list[dict[str, Any]], fallback: str, report: ParityReport, component: str,
                     log: Log) -> None:
    history.append({"excluded": None, "quantized": 0, **report.summary(), "parity_method": "ort",
                    "fallback": fallback})
    log(f"{component}: the quantized graph missed the budget after {len(history) - 1} tries; {fallback} fallback, "
        f"worst held-out cosine {report.summary()['cosine']:.6f}"
        f"{'' if report.passed else f' ({fallback} misses the budget too)'}")


def _ranking(src: Path, result: QuantResult, worst: Mapping[str, np.ndarray], quantized: list[str],
             settings: QuantSettings, log: Log) -> list[str]:
    """The quantized nodes by the error each adds, on the sample the gate failed (the worst one) and coarse to fine
    (node_sensitivity's pool): a full-size probe of every node on every held-out sample would be hours."""
    with tempfile.TemporaryDirectory(dir=result.path.parent, prefix=".sim-") as tmp:     # in the unit's folder
        probe = result.path if result.parity_method == "ort" else simulate_fp8(result.path, Path(tmp) / "sim.onnx")
        return [name for name, _ in node_sensitivity(src, probe, [worst], quantized, pool=2 * settings.max_excluded,
                                                     log=log)]


def _fallback(src: Path, dst_dir: Path, component: str, settings: QuantSettings, reference: list, feeds: FeedSplit,
              keep_fp32: Sequence[str] | None, log: Log) -> tuple[str, Path, ParityReport]:
    """What ships in place of a Q/DQ graph that missed the budget on every try: the fp16 graph (keeping in fp32 what
    the component's fp16 export kept), or the fp32 graph itself where the recipe falls back to fp32 (or to nothing)
    or no fp16 graph meets the fp16 tolerance; (which, its path, its figures)."""
    import onnx

    if keep_fp32 is None or settings.fallback != "fp16":
        # the reference is this very graph's outputs on the held-out feeds: replayed, not run again
        return "fp32", src, accuracy_check(reference, _Replay(reference), feeds.held_out, settings.budget,
                                           component=component, precision="fp32", labels=feeds.held_out_labels)
    dst = dst_dir / f"{component}.fp16.onnx"
    inputs, outputs = graph_io(onnx.load(str(src), load_external_data=False))
    fp16_from_onnx(src, dst, inputs, outputs, component, log, keep_fp32=keep_fp32)
    return "fp16", dst, accuracy_check(reference, dst, feeds.held_out, settings.budget, component=component,
                                       precision="fp16", labels=feeds.held_out_labels)


class _Replay:
    """Outputs already computed, as a runner answering the feeds in order (compare_runners asks once per feed, in
    order): the fp32 fallback's figures without 8 more full-size passes of the graph that made the reference."""

    def __init__(self, outputs: Sequence[Mapping[str, np.ndarray]]):
        self._outputs = iter(outputs)

    def infer(self, feed: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        return next(self._outputs)
