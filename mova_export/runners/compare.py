"""The one comparison loop: a candidate runner against a reference (a runner, or outputs computed before) on the
same feeds, every output of every feed, into one `ParityReport`. Export (graph vs PyTorch), quantize (Q/DQ graph vs
fp32 graph), compile (engine vs its graph) and the benchmarks all call it."""
from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import numpy as np

from ..core.tolerance import Parity, ParityReport, Tolerance, parity
from .base import Feed, Runner

NO_THRESHOLD = Tolerance(min_cosine=-1.0)
MISSING = Parity(math.inf, math.inf, -1.0, False)


def compare_runners(candidate: Runner, feeds: Sequence[Feed],
                    reference: Runner | Sequence[Mapping[str, np.ndarray]], tolerance: Tolerance = NO_THRESHOLD, *,
                    graph: str, precision: str, labels: Sequence[str] | None = None,
                    step: Callable[[], None] = lambda: None) -> ParityReport:
    """Figures of `candidate` against `reference` on each feed (labels name the samples; default sample0, ...).
    `reference` is a runner run on the same feeds, or one dict of expected outputs per feed. An output the candidate
    lacks counts as non-finite. The report is returned unchecked: `report.check()` raises on a miss."""
    feeds = list(feeds)
    labels = list(labels) if labels is not None else [f"sample{i}" for i in range(len(feeds))]
    if len(labels) != len(feeds):
        raise ValueError(f"{len(labels)} labels for {len(feeds)} feeds")
    expected_all = None if hasattr(reference, "infer") else list(reference)
    report = ParityReport(graph, precision, tolerance, {})
    for i, (label, feed) in enumerate(zip(labels, feeds)):
        expected = reference.infer(feed) if expected_all is None else expected_all[i]
        got = candidate.infer(feed)
        report.samples[label] = {n: parity(v, got[n]) if n in got else MISSING for n, v in expected.items()}
        step()
    return report
