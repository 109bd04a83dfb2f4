"""Parity samples: real-image feeds (and seeded random ones) for each graph, with the PyTorch module's outputs.

Towers get their preprocessed inputs (the same numpy preprocessing the device runs), the text encoder the question
asked about each image, padded to every length bucket, the adapter the base / expert / text features those
components produce from the same images (read from their export units). References come from the fp32 torch module
(the adapter's from `forward_reference`, upstream's skipping B == 1 inference).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np

from ..core.bert_inputs import text_inputs
from ..core.prompts import adapter_text, mask_label
from ..core.tolerance import ParityReport, tolerance_for
from ..runners.compare import compare_runners

if TYPE_CHECKING:  # pragma: no cover
    from ..core.spec import TensorSpec

# A full-size adapter reference costs seconds: above this many sweep masks the sweep keeps the empty mask, every
# single-expert mask and this stated subset (the tiny scale checks all of them).
REDUCED_SWEEP = ("AB", "CG", "DE", "AF", "ACG", "BDE", "AEF", "CDG")


@dataclass
class Sample:
    """One named feed (numpy arrays by input name) and the reference outputs for it."""
    label: str
    feed: dict[str, np.ndarray]
    reference: dict[str, np.ndarray] = field(default_factory=dict)


def validate_graph(runner: Any, samples: Sequence[Sample], graph: str, precision: str,
                   step: Callable[[], None] = lambda: None) -> ParityReport:
    """Run the graph on every sample and compare with the samples' reference outputs (raises on any failure)."""
    return compare_runners(runner, [s.feed for s in samples], [s.reference for s in samples],
                           tolerance_for(precision), graph=graph, precision=precision,
                           labels=[s.label for s in samples], step=step).check()


def spot_check(samples: Sequence[Sample], every: int = 8) -> list[Sample]:
    """The fp16 graphs' samples: every non-sweep sample and every 8th mask of the adapter's sweep (the fp32 graph
    carries the full sweep; fp16 only changes arithmetic precision, not which branches run)."""
    sweep = [s for s in samples if "/" in s.label and not s.label.endswith("+unrouted")]
    drop = {id(s) for s in sweep} - {id(s) for s in sweep[::every]}
    return [s for s in samples if id(s) not in drop]


def routing_masks(num_experts: int, k_max: int) -> list[tuple[int, ...]]:
    """Every multi-hot mask with at most k_max experts on (64 for 7 experts, K <= 3), empty mask first."""
    masks = []
    for k in range(k_max + 1):
        for chosen in combinations(range(num_experts), k):
            masks.append(tuple(1 if i in chosen else 0 for i in range(num_experts)))
    return masks


def sweep_masks(letters: Sequence[str], k_max: int, full: bool) -> list[tuple[int, ...]]:
    """The adapter's parity sweep: every mask with K <= k_max (full), or the empty mask, every single-expert mask
    and the REDUCED_SWEEP subset (those of its sets made of known letters with at most k_max experts)."""
    masks = routing_masks(len(letters), k_max)
    if full:
        return masks
    wanted = set(REDUCED_SWEEP)
    return [m for m in masks if sum(m) <= 1 or mask_label(m, letters) in wanted]


def as_numpy(value: Any, dtype: str | None = None) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    arr = np.ascontiguousarray(value)
    return arr.astype(dtype, copy=False) if dtype else arr


def random_samples(spec: Any, cfg: Any, inputs: Sequence["TensorSpec"], count: int,
                   sample_inputs: Callable[[Any, int], Mapping[str, Any]] | None = None) -> list[Sample]:
    """Seeded random feeds (seeds 1000, 1001, ...): sample_inputs (a graph form's own), else the spec's."""
    make = sample_inputs or spec.sample_inputs
    if make is None:
        return []
    out = []
    for i in range(count):
        raw = make(cfg, 1000 + i)
        out.append(Sample(f"random{i}", {t.name: as_numpy(raw[t.name], t.dtype) for t in inputs}))
    return out


def text_feeds(tokenizer: Any, question: str, buckets: Sequence[int]) -> list[tuple[int, dict[str, np.ndarray]]]:
    """(bucket, feed) of one question at every bucket that holds it: the [CLS] feature must not depend on which."""

    _, mask = text_inputs(tokenizer, question, buckets)
    used = int(mask.sum())
    out = []
    for bucket in (b for b in buckets if b >= used):
        ids, mask = text_inputs(tokenizer, question, (bucket,))
        out.append((bucket, {"input_ids": ids, "attention_mask": mask}))
    return out


@dataclass
class AdapterContext:
    """What the adapter's samples read: per image label, the base features, every expert's features (routing order)
    and the text feature of the image's question."""
    base: Mapping[str, np.ndarray]
    experts: Sequence[Mapping[str, np.ndarray]]
    text: Mapping[str, np.ndarray]
    letters: Sequence[str]
    topk: int
    full_sweep: bool
    channels: Sequence[int]             # C_j of every expert's features

    def top_mask(self, shift: int) -> tuple[int, ...]:
        """A full top-K mask (the first K experts), rotated per image."""
        n = len(self.letters)
        top = [1 if j < min(self.topk, n) else 0 for j in range(n)]
        return tuple(top[(j - shift) % n] for j in range(n))

    def wide_masks(self) -> list[tuple[int, ...]]:
        """Masks with more than topk experts (the answer "A B C D" parses to four), for the dense fallback graph:
        topk + 1 consecutive experts from every start, and all of them."""
        n = len(self.letters)
        k = min(self.topk + 1, n)
        masks = [tuple(1 if (j - start) % n < k else 0 for j in range(n)) for start in range(n)]
        return list(dict.fromkeys(masks + [(1,) * n]))


def question_label(image: str, question: str) -> str:
    return f"{image}: {adapter_text(question).strip()}"
