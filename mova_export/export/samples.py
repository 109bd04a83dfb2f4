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

from ..components import one_of_kind
from ..core.bert_inputs import text_inputs
from ..core.errors import ExportError
from ..core.prompts import adapter_text, mask_label
from ..core.slots import fill_slots
from ..core.spec import GraphForm
from ..core.tolerance import ParityReport, tolerance_for
from ..runners.compare import compare_runners

if TYPE_CHECKING:  # pragma: no cover
    from ..core.facts import ModelFacts
    from ..core.spec import TensorSpec

# A full-size adapter reference costs seconds: above this many sweep masks the sweep keeps the empty mask, every
# single-expert mask and this stated subset (the tiny scale checks all of them).
UNROUTED = "+unrouted"     # label suffix of a dense-graph sample fed every expert's real features, routed or not
REDUCED_SWEEP = ("AB", "CG", "DE", "AF", "ACG", "BDE", "AEF", "CDG")


@dataclass
class Sample:
    """One named feed (numpy arrays by input name) and the reference outputs for it."""
    label: str
    feed: dict[str, np.ndarray]
    reference: dict[str, np.ndarray] = field(default_factory=dict)


def validate_graph(runner: Any, samples: Sequence[Sample], graph: str, precision: str,
                   step: Callable[[], None] = lambda: None, check: bool = True) -> ParityReport:
    """Run the graph on every sample and compare with the samples' reference outputs (raises on any failure unless
    check is False)."""
    report = compare_runners(runner, [s.feed for s in samples], [s.reference for s in samples],
                             tolerance_for(precision), graph=graph, precision=precision,
                             labels=[s.label for s in samples], step=step)
    return report.check() if check else report


def spot_check(samples: Sequence[Sample], every: int = 8) -> list[Sample]:
    """The fp16 graphs' samples: every non-sweep sample and every 8th mask of the adapter's sweep (the fp32 graph
    carries the full sweep; fp16 only changes arithmetic precision, not which branches run)."""
    sweep = [s for s in samples if "/" in s.label and not s.label.endswith(UNROUTED)]
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


def adapter_context(features: Mapping[str, Mapping[str, np.ndarray]], facts: "ModelFacts",
                    full_sweep: bool = True) -> AdapterContext:
    """The adapter's inputs on some images: {component: {image label: features}} of the base, every expert and the
    text encoder."""

    text = one_of_kind("text").name
    missing = [c for c in [facts.base.component, *(e.component for e in facts.experts), text] if c not in features]
    if missing:
        raise ExportError(f"the adapter's samples need the features of {', '.join(missing)}; export those "
                          "components first (the build does it in order)")
    channels = [next(iter(features[e.component].values())).shape[-1] for e in facts.experts]
    return AdapterContext(features[facts.base.component], [features[e.component] for e in facts.experts],
                          features[text], facts.letters, facts.topk_experts, full_sweep, channels)


def adapter_feed(form: GraphForm, ctx: AdapterContext, label: str, mask: Sequence[int],
                  zero_unrouted: bool = True) -> dict[str, np.ndarray]:
    """One image's feed of an adapter form: the routing form's base alone; the slot form's base, slots (fill_slots),
    text and mask; the dense form's base, every expert's features (zeros for unrouted ones, or their real features
    to show they cannot leak), text and mask."""

    specs = {t.name: t for t in form.inputs}
    out = {"base": as_numpy(ctx.base[label], specs["base"].dtype)}
    if form.role == "adapter_routing":
        return out
    out["text_features"] = as_numpy(ctx.text[label], specs["text_features"].dtype)
    if form.role == "adapter_answer":
        features = {j: ctx.experts[j][label] for j, on in enumerate(mask) if on}
        slots = fill_slots(mask, features, specs["slot_expert"].shape[0], ctx.channels, specs["base"].shape[1])
        return {**out, **slots}
    for j, letter in enumerate(ctx.letters):
        t = specs[f"expert_{letter}"]
        out[t.name] = (np.zeros(t.shape, t.dtype) if zero_unrouted and not mask[j]
                       else as_numpy(ctx.experts[j][label], t.dtype))
    out["routing_mask"] = np.asarray([mask], dtype=specs["routing_mask"].dtype)
    return out


def adapter_samples(form: GraphForm, ctx: AdapterContext, labels: Sequence[str]) -> list[Sample]:
    """The masks each form serves, on image 0 every one of them (the first a full top-K mask, the trace example),
    on the other images one (and, for the dense graph, with every expert's real features in place).
    routing: the empty mask; slots: every sweep mask with 1..topk experts; dense: masks with more than topk."""
    if form.role == "adapter_routing":
        return [Sample(f"{label}/none", adapter_feed(form, ctx, label, (0,) * len(ctx.letters))) for label in labels]
    many = form.role == "adapter_fallback"
    masks = ctx.wide_masks() if many else [m for m in sweep_masks(ctx.letters, ctx.topk, ctx.full_sweep) if any(m)]
    samples = []
    for i, label in enumerate(labels):
        first = ctx.wide_masks()[i % len(ctx.wide_masks())] if many else ctx.top_mask(i)
        chosen = [first] + [m for m in masks if m != first] if i == 0 else [first]
        samples += [Sample(f"{label}/{mask_label(m, ctx.letters)}", adapter_feed(form, ctx, label, m)) for m in chosen]
        if many and i > 0:
            samples.append(Sample(f"{label}/{mask_label(first, ctx.letters)}{UNROUTED}",
                                  adapter_feed(form, ctx, label, first, zero_unrouted=False)))
    return samples


def adapter_calibration_feeds(form: GraphForm, features: Mapping[str, Mapping[str, np.ndarray]],
                              facts: "ModelFacts", labels: Sequence[str]) -> list[dict[str, np.ndarray]]:
    """One feed per image for quantizing an adapter form: the masks this form serves (a top-K mask rotated per
    image; masks of more than K experts for the dense graph) with every expert's real features."""
    ctx = adapter_context(features, facts)
    masks = ctx.wide_masks() if form.role == "adapter_fallback" else [ctx.top_mask(i) for i in range(len(labels))]
    return [adapter_feed(form, ctx, label, masks[i % len(masks)], zero_unrouted=False)
            for i, label in enumerate(labels)]
