"""Parity between a reference and a candidate: max abs error, relative L2 and cosine per output, per sample.

An absolute tolerance alone is a poor signal (feature scales differ by orders of magnitude between towers), so the
pass/fail decision uses cosine and relative L2; max abs is reported alongside. One `Tolerance` type serves the export's
fixed thresholds, a recipe's accuracy budget and engine parity; one `ParityReport` carries the figures of every
artifact (a graph against PyTorch, a quantized graph against its fp32 graph, an engine against its graph).
`ParityReport.check` collects every failing output before raising one ExportError that names the component, the
output, the sample and the figures. runners.compare fills a report from two runners.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterable, Mapping

import numpy as np

from .errors import ExportError


@dataclass(frozen=True)
class Tolerance:
    """Thresholds; an output passes when cosine >= min_cosine and rel_l2 <= max_rel_l2 (inf: no bound)."""
    min_cosine: float
    max_rel_l2: float = math.inf

    def to_json(self) -> dict[str, float | None]:
        """Strict JSON (no Infinity): an unbounded rel L2 is null."""
        return {"min_cosine": self.min_cosine,
                "max_rel_l2": self.max_rel_l2 if math.isfinite(self.max_rel_l2) else None}

    @classmethod
    def from_json(cls, raw: Mapping[str, float | None]) -> "Tolerance":
        bound = raw.get("max_rel_l2")
        return cls(float(raw["min_cosine"]), math.inf if bound is None else float(bound))


# fp32: the graph computes what PyTorch computes, up to op order and kernel choice (observed rel-L2 ~1e-6).
# fp16: weights and activations in half precision with softmax, norms and the bilinear alignment kept in fp32;
#       observed rel-L2 ~1e-3 on the tiny towers, bounded here at 1e-2 (cosine 0.9999).
TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(min_cosine=0.99999, max_rel_l2=1e-3),
    "fp16": Tolerance(min_cosine=0.9999, max_rel_l2=1e-2),
}


def tolerance_for(precision: str) -> Tolerance:
    try:
        return TOLERANCES[precision]
    except KeyError:
        raise ExportError(f"no parity tolerance for precision {precision!r}; known: {sorted(TOLERANCES)}") from None


@dataclass(frozen=True)
class Parity:
    """Figures of one output on one sample (or the worst over several: see `worst`)."""
    max_abs: float
    rel_l2: float
    cosine: float
    finite: bool = True

    def passes(self, tol: Tolerance) -> bool:
        return self.finite and self.cosine >= tol.min_cosine and self.rel_l2 <= tol.max_rel_l2

    def describe(self) -> str:
        text = f"max abs {self.max_abs:.3g}, rel L2 {self.rel_l2:.3g}, cosine {self.cosine:.7f}"
        return text if self.finite else text + ", NON-FINITE values"

    def to_json(self) -> dict[str, float | bool]:
        return asdict(self)


def parity(reference: np.ndarray, candidate: np.ndarray) -> Parity:
    """Figures of one candidate tensor against its reference, computed in float64."""
    ref = np.asarray(reference, dtype=np.float64).ravel()
    cand = np.asarray(candidate, dtype=np.float64).ravel()
    if ref.shape != cand.shape:
        return Parity(max_abs=float("inf"), rel_l2=float("inf"), cosine=-1.0, finite=False)
    finite = bool(np.isfinite(cand).all() or not np.isfinite(ref).all())
    if not finite:
        return Parity(max_abs=float("inf"), rel_l2=float("inf"), cosine=-1.0, finite=False)
    diff = cand - ref
    ref_norm = float(np.linalg.norm(ref))
    cand_norm = float(np.linalg.norm(cand))
    diff_norm = float(np.linalg.norm(diff))
    max_abs = float(np.abs(diff).max()) if diff.size else 0.0
    if ref_norm == 0.0:  # an all-zero reference (e.g. an empty branch): exact zeros are the only match
        return Parity(max_abs=max_abs, rel_l2=0.0 if diff_norm == 0.0 else float("inf"),
                      cosine=1.0 if cand_norm == 0.0 else 0.0)
    cosine = 0.0 if cand_norm == 0.0 else float(np.dot(ref, cand) / (ref_norm * cand_norm))
    return Parity(max_abs=max_abs, rel_l2=diff_norm / ref_norm, cosine=cosine)


def worst(figures: Iterable[Parity]) -> Parity:
    figures = list(figures)
    return Parity(max_abs=max(f.max_abs for f in figures), rel_l2=max(f.rel_l2 for f in figures),
                  cosine=min(f.cosine for f in figures), finite=all(f.finite for f in figures))


@dataclass
class ParityReport:
    """Figures of one graph (component, precision) over all its samples; `check` raises on any failure."""
    component: str
    precision: str
    tolerance: Tolerance
    samples: dict[str, dict[str, Parity]]  # sample label -> output name -> figures

    def per_output(self) -> dict[str, Parity]:
        names: dict[str, list[Parity]] = {}
        for outputs in self.samples.values():
            for name, fig in outputs.items():
                names.setdefault(name, []).append(fig)
        return {name: worst(figs) for name, figs in names.items()}

    def failures(self) -> list[str]:
        return [f"{self.component} [{self.precision}] output {name!r} on sample {label!r}: {fig.describe()}"
                for label, outputs in self.samples.items() for name, fig in outputs.items()
                if not fig.passes(self.tolerance)]

    @property
    def passed(self) -> bool:
        return not self.failures()

    def check(self) -> "ParityReport":
        failures = self.failures()
        if failures:
            tol = self.tolerance
            shown = "; ".join(failures[:6]) + (f"; ... {len(failures) - 6} more" if len(failures) > 6 else "")
            raise ExportError(f"parity failed for {len(failures)} output(s) (threshold cosine >= {tol.min_cosine}, "
                              f"rel L2 <= {tol.max_rel_l2}): {shown}; no bundle was written")
        return self

    def per_sample(self) -> dict[str, Parity]:
        """The worst figures over outputs, per sample label."""
        return {label: worst(outputs.values()) for label, outputs in self.samples.items() if outputs}

    def worst_sample(self) -> tuple[str, Parity]:
        """The sample with the lowest cosine (ties: the first) and its figures."""
        per = self.per_sample()
        label = min(per, key=lambda k: (per[k].cosine if per[k].finite else -math.inf))
        return label, per[label]

    def summary(self) -> dict[str, float]:
        """Worst figures over every output and sample: {"cosine", "rel_l2", "max_abs"}."""
        fig = worst(self.per_output().values())
        return {"cosine": fig.cosine, "rel_l2": fig.rel_l2, "max_abs": fig.max_abs}

    def to_json(self) -> dict:
        return {"tolerance": self.tolerance.to_json(), "num_samples": len(self.samples),
                "samples": sorted(self.samples),
                "worst": {name: fig.to_json() for name, fig in self.per_output().items()}}


def compare_outputs(reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray], *, component: str,
            precision: str = "fp32", sample: str = "sample", tolerance: Tolerance | None = None) -> ParityReport:
    """Compare every reference output with the candidate's; raise one ExportError listing every failing output."""
    missing = sorted(set(reference) - set(candidate))
    if missing:
        raise ExportError(f"{component} [{precision}]: candidate lacks output(s) {missing} on sample {sample!r}")
    figures = {name: parity(ref, candidate[name]) for name, ref in reference.items()}
    report = ParityReport(component, precision, tolerance or tolerance_for(precision), {sample: figures})
    return report.check()
