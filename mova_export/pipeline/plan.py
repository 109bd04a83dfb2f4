"""Memory planner: will MoVA fit on the target under the recipe, and if not, what would.

Inputs are plain tables, so the planner needs neither weights nor torch:
  * bytes per component: real file sizes from a bundle's manifest (`files` table; engines and the GGUF when present)
    via `plan_from_manifest`, or parameter counts x bytes per precision via `plan_from_params`
    (`plan_from_config` takes the counts from `checkpoint.describe_config(cfg)`);
  * the LLM's shape (`LLMShape`) for the KV cache: 2 x layers x kv_heads x head_dim x context x 2 bytes (f16 KV),
    plus llama.cpp's compute buffer (KQ scores for one 512-token micro-batch and its logits);
  * vision activations: the largest graph's biggest intermediate, tokens x width x ACTIVATION_FACTOR x 4 bytes,
    plus, where ONNX Runtime runs the graphs (the cpu target), its widest attention's score tensors (heads x
    tokens^2 x 4 bytes, as many as its spec says live at once), counted once (graphs run one after another; the
    runtime frees each full-size graph's peak after its run, runtime/vision.py). At full size on the cpu target,
    measured after one run: SAM-H 4.4 GB (estimated 4.5), Co-DETR 3.5 (estimated 5.5), CLIP 0.5 (0.8).

The adapter counts its resident graphs (routing and top-K slots); its dense fallback graph runs only for a routing
answer naming more than K experts and is dropped after that request (noted, not counted).
Expert policy: `resident` loads all seven experts; `lazy` loads base + text encoder + adapter + LLM and at most
`min(experts.max_loaded, 3)` experts, planned as the largest ones (the router may pick any K <= 3).
Verdict: fits (peak <= 90 % of memory.budget_mib), warn (within the last 10 %), refuse (over); a refusal comes with
a fix computed by re-planning with lazy experts and each smaller LLM quant.
Memory kind (`memory_kind`): on unified memory (Jetson Orin and Thor, DGX Spark) the budget is one pool for the LLM,
the engines, the process and what the OS keeps (device.memory_mib - budget_mib), so every layer of the LLM counts
and a lazily loaded expert's file counts while it loads; on a discrete card (RTX, H100) it is the card's memory and
only the LLM layers offloaded to it count.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from ..bundle import load_bundle
from ..components import all_specs, get_spec
from ..core.errors import BundleError, RecipeError
from ..core.qtypes import BITS_PER_WEIGHT
from ..core.spec import BYTES_PER_PRECISION
from ..recipe import ExpertPolicy, Recipe, expert_components, graph_components, llm_quants
from .llm_shape import KV_BYTES, LLAMA_UBATCH, LLMShape, full_llm

if TYPE_CHECKING:  # pragma: no cover
    from rich.table import Table

    from ..bundle import Manifest
    from ..source.config import MoVAConfig

MIB = 1 << 20
GIB = 1 << 30
WARN_FRACTION = 0.9
MAX_ROUTED = 3                 # the router activates K <= 3 experts per question
ACTIVATION_FACTOR = 8          # live intermediates of a transformer block (MLP 4x plus residual, q/k/v) per token
FALLBACK_ROLE = "adapter_fallback"   # the dense adapter graph, for the rare mask with more than K experts


def full_params() -> dict[str, int]:
    """Full-size (MoVA-8B) parameter counts from the components' own memory figures, for planning with no
    checkpoint and no component modules."""

    return {s.name: s.memory.params for s in all_specs()}


def full_activations() -> dict[str, tuple[int, int]]:
    """Full-size (tokens, width) of each graph's widest stage, for the activation estimate."""

    return {s.name: s.memory.activation for s in all_specs() if s.kind != "llm"}


def full_attention_scores() -> dict[str, tuple[int, str]]:
    """Full-size bytes of each graph's live attention scores in ONNX Runtime, with how they were counted."""
    out = {}
    for s in all_specs():
        heads, tokens, live = s.memory.attention
        if heads:
            out[s.name] = (heads * tokens * tokens * 4 * live, f"{live} x {heads} heads x {tokens}^2 x 4 B scores")
    return out


@dataclass(frozen=True)
class MemoryItem:
    name: str          # component or "kv cache", "activations", ...
    kind: str          # weights | kv | compute | activations | runtime
    bytes: int
    detail: str        # where the figure comes from


@dataclass(frozen=True)
class MemoryPlan:
    recipe: str
    policy: str
    llm_quant: str
    source: str                    # "bundle" | "params"
    items: tuple[MemoryItem, ...]
    skipped: tuple[str, ...]       # experts a lazy policy leaves on disk
    budget_bytes: int
    peak_bytes: int
    verdict: str                   # fits | warn | refuse
    message: str
    fix: str
    memory: str = ""               # memory_kind(): unified memory | GPU memory | RAM

    def to_json(self) -> dict[str, Any]:
        return {"recipe": self.recipe, "policy": self.policy, "llm_quant": self.llm_quant, "source": self.source,
                "memory": self.memory,
                "items": [vars(i) for i in self.items], "skipped_experts": list(self.skipped),
                "budget_bytes": self.budget_bytes, "peak_bytes": self.peak_bytes,
                "peak_gib": round(self.peak_bytes / GIB, 2), "budget_gib": round(self.budget_bytes / GIB, 2),
                "verdict": self.verdict, "message": self.message, "fix": self.fix}


# ---- planning ------------------------------------------------------------------------------------------------------
def plan_from_params(recipe: Recipe, params: Mapping[str, int], *, llm: LLMShape | None = None,
                     activations: Mapping[str, tuple[int, int]] | None = None, policy: str | None = None,
                     llm_quant: str | None = None, model: str = "this MoVA",
                     scores: Mapping[str, tuple[int, str]] | None = None) -> MemoryPlan:
    """Plan from parameter counts (component -> params; `llm` included) x bytes per the recipe's precision.
    `model` names the checkpoint in the verdict ("the full-size MoVA-8B"). `activations` and `scores` default to
    the full-size figures (full_activations, full_attention_scores)."""
    missing = [c for c in (*graph_components(), "llm") if c not in params]
    if missing:
        raise RecipeError(f"memory plan for {recipe.name}: no parameter count for {', '.join(missing)}; pass every "
                          "component (see memory.full_params())")
    weights = {c: (int(params[c]) * BYTES_PER_PRECISION[recipe.precision_of(c)],
                   f"{params[c] / 1e6:,.1f} M params x {recipe.precision_of(c)}") for c in graph_components()}

    def llm_bytes(quant: str) -> tuple[int, str]:
        bpw = BITS_PER_WEIGHT[quant]
        return int(params["llm"] * bpw / 8), f"{params['llm'] / 1e9:.2f} B params x {quant} ({bpw} bits/weight)"

    if scores is None:
        scores = full_attention_scores() if activations is None else {}    # the tiny model's are kilobytes
    return _plan(recipe, weights, llm_bytes, llm or full_llm(), activations or full_activations(), "params",
                 policy, llm_quant, model=model, scores=scores)


def plan_from_config(recipe: Recipe, cfg: "MoVAConfig", **kw: Any) -> MemoryPlan:
    """Plan from `describe_config(cfg)` parameter counts (no weights needed) and the config's LLM shape."""
    from ..source.checkpoint import describe_config

    described = describe_config(cfg)["components"]
    params = {name: info["params"] for name, info in described.items()}
    activations = _activations_from_config(cfg) if cfg.scale != "full" else None    # None: the full-size figures
    kw.setdefault("model", "the full-size MoVA-8B" if cfg.scale == "full" else f"the {cfg.scale} MoVA")
    return plan_from_params(recipe, params, llm=LLMShape.from_fields(cfg.llm), activations=activations, **kw)


def _activations_from_config(cfg: "MoVAConfig") -> dict[str, tuple[int, int]]:
    """(tokens, width) per graph from the registered specs' output shapes (the tiny-scale estimate)."""

    out: dict[str, tuple[int, int]] = {}
    for name in graph_components():
        shapes = [t.shape for t in get_spec(name).outputs(cfg)]
        out[name] = max(((math.prod(s[:-1]) or 1, s[-1]) for s in shapes if s), key=lambda tw: tw[0] * tw[1])
    return out


def plan_from_manifest(recipe: Recipe, manifest: "Manifest", *, policy: str | None = None,
                       llm_quant: str | None = None, params: Mapping[str, int] | None = None,
                       files: Mapping[str, Mapping[str, Any]] | None = None) -> MemoryPlan:
    """Plan from a bundle's manifest: each component's graphs (engines when compiled, else the shipped variant), by
    real file size; a variant not built yet is scaled from the fp32 graph; a component the bundle does not hold (a
    --components build) from its parameter count in `params` x the recipe's precision. The GGUF's real size when
    the bundle holds one of the quant, else the LLM's parameter count from the config x bits per weight. `files`:
    the file table when the manifest's is not written yet (a build in progress)."""
    files = manifest.files if files is None else files

    def size(rels: Sequence[str]) -> int:
        return sum(int(files[r]["bytes"]) for r in rels if r in files)

    weights: dict[str, tuple[int, str]] = {}
    for comp in graph_components():
        graphs = [g for g in manifest.graphs.values() if g.component == comp]
        if not graphs and params and comp in params:
            want = recipe.precision_of(comp)
            weights[comp] = (params[comp] * BYTES_PER_PRECISION[want],
                             f"not in this bundle: {params[comp] / 1e6:,.1f} M params x {want}")
            continue
        if not graphs:
            raise BundleError(f"bundle manifest has no {comp} graph; the memory plan needs every component: "
                              "rebuild the bundle with all components")
        total, where = 0, []
        for g in graphs:
            engine = manifest.engines.get(g.name, {}).get("engine")
            want = manifest.runtime.precision.get(g.name, recipe.precision_of(comp))
            if engine in files:
                nbytes, what = size([engine]), f"engine {engine}"
            elif want in g.variants:
                nbytes, what = size(g.variants[want].files), f"graph {g.variants[want].graph}"
            elif "fp32" in g.variants:
                nbytes = size(g.variants["fp32"].files) * BYTES_PER_PRECISION[want] // 4
                what = f"{g.variants['fp32'].graph} scaled to {want} (not built yet)"
            else:
                continue
            if g.role == FALLBACK_ROLE:   # loaded for one request, then dropped (runtime/vision.py)
                where.append(f"not resident: {what} ({nbytes / MIB:,.0f} MiB, only while > K experts are routed)")
                continue
            total += nbytes
            where.append(what)
        weights[comp] = (total, ", ".join(where))
    config = manifest.config
    if "hidden_size" not in config:
        raise BundleError("bundle manifest has no LLM config (config.hidden_size); rebuild the bundle")
    shape = LLMShape.from_fields(config)
    ggufs = {rel: meta for rel, meta in files.items() if rel.endswith(".gguf")}

    def llm_bytes(quant: str) -> tuple[int, str]:
        for rel, meta in ggufs.items():
            if rel.lower().endswith(f".{quant}.gguf"):
                return int(meta["bytes"]), f"gguf {rel}"
        bpw = BITS_PER_WEIGHT[quant]
        return int(shape.params * bpw / 8), f"{shape.params / 1e6:,.1f} M params x {quant} (no gguf yet)"

    acts: dict[str, tuple[int, int]] = {}
    for g in manifest.graphs.values():
        outs = [tuple(t.shape) for t in g.outputs if t.shape]
        widest = max(((math.prod(s[:-1]) or 1, s[-1]) for s in outs), key=lambda tw: tw[0] * tw[1])
        if g.component not in acts or widest[0] * widest[1] > acts[g.component][0] * acts[g.component][1]:
            acts[g.component] = widest
    model = "the full-size MoVA-8B" if manifest.scale == "full" else f"this {manifest.scale} MoVA"
    return _plan(recipe, weights, llm_bytes, shape, acts, "bundle", policy, llm_quant, model=model,
                 scores=full_attention_scores() if manifest.scale == "full" else {})


def plan_bundle(recipe: Recipe, bundle_path: Any, **kw: Any) -> MemoryPlan:
    """Plan for a bundle folder (its manifest's file sizes; files not re-hashed)."""

    return plan_from_manifest(recipe, load_bundle(bundle_path, verify=False).manifest, **kw)


def _plan(recipe: Recipe, weights: Mapping[str, tuple[int, str]], llm_bytes: Any, shape: LLMShape,  # noqa: PLR0913 (plan inputs)
          activations: Mapping[str, tuple[int, int]], source: str, policy: str | None, llm_quant: str | None,
          *, with_fix: bool = True, model: str = "this MoVA",
          scores: Mapping[str, tuple[int, str]] | None = None) -> MemoryPlan:
    policy = policy or recipe.experts.policy
    quant = llm_quant or recipe.llm.quant
    if policy not in ("resident", "lazy"):
        raise RecipeError(f"unknown expert policy {policy!r}; use resident or lazy")
    if quant not in BITS_PER_WEIGHT:
        raise RecipeError(f"unknown LLM quant {quant!r}; use one of {', '.join(llm_quants())}")
    experts = expert_components()
    loaded = list(experts)
    if policy == "lazy":
        k = min(recipe.experts.max_loaded, MAX_ROUTED)
        loaded = sorted(experts, key=lambda e: weights[e][0], reverse=True)[:k]
    skipped = tuple(e for e in experts if e not in loaded)
    items = [MemoryItem(c, "weights", weights[c][0], weights[c][1])
             for c in graph_components() if c not in experts or c in loaded]
    lb, ldetail = llm_bytes(quant)
    ctx = recipe.llm.context
    gpu_share = 1.0
    if not recipe.device.unified_memory and recipe.llm.gpu_layers >= 0:
        gpu_share = min(recipe.llm.gpu_layers, shape.layers) / shape.layers
    if gpu_share < 1.0:
        ldetail += f"; {min(recipe.llm.gpu_layers, shape.layers)}/{shape.layers} layers on the GPU"
    items.append(MemoryItem("llm", "weights", int(lb * gpu_share), ldetail))
    items.append(MemoryItem("kv cache", "kv", shape.kv_bytes(ctx),
                            f"2 x {shape.layers} layers x {shape.kv_heads} kv heads x {shape.head_dim} x {ctx} "
                            f"ctx x {KV_BYTES} B"))
    items.append(MemoryItem("llm compute", "compute", shape.compute_bytes(ctx),
                            f"KQ {shape.heads} heads x {min(LLAMA_UBATCH, ctx)} x {ctx} + logits, fp32"))
    items += _transient_items(recipe, weights, activations, [c for c in graph_components() if c not in skipped],
                              skipped, scores or {})
    items.append(MemoryItem("runtime", "runtime", recipe.memory.runtime_overhead_mib * MIB,
                            "memory.runtime_overhead_mib"))
    peak = sum(i.bytes for i in items)
    budget = recipe.memory.budget_mib * MIB
    verdict = "fits" if peak <= WARN_FRACTION * budget else "warn" if peak <= budget else "refuse"
    what = (f"{recipe.name}: peak {_gib(peak)} of a {_gib(budget)} budget of {memory_kind(recipe)} ({policy} "
            f"experts, LLM {quant}, context {ctx})")
    message = {"fits": f"{what}: fits",
               "warn": f"{what}: fits with under 10 % headroom",
               "refuse": f"{what}: does not fit; it cannot hold {model} with {policy} experts"}[verdict]
    fix = ""
    if verdict != "fits" and with_fix:
        fix = _fix(recipe, weights, llm_bytes, shape, activations, source, policy, quant, verdict, scores or {})
    return MemoryPlan(recipe.name, policy, quant, source, tuple(items), skipped, budget, peak, verdict, message, fix,
                      memory_kind(recipe))


def memory_kind(recipe: Recipe) -> str:
    """What the budget is a budget of: "unified memory" where CPU and GPU share one pool (Jetson, DGX Spark: the
    LLM, the engines, the process and the OS all count), "GPU memory" on a discrete card (host RAM is apart), "RAM"
    on the cpu target."""
    if recipe.device.kind == "cpu":
        return "RAM"
    return "unified memory" if recipe.device.unified_memory else "GPU memory"


def _transient_items(recipe: Recipe, weights: Mapping[str, tuple[int, str]],  # noqa: PLR0913 (plan inputs)
                     activations: Mapping[str, tuple[int, int]], running: Sequence[str],
                     skipped: Sequence[str], scores: Mapping[str, tuple[int, str]]) -> list[MemoryItem]:
    """Memory that is live only while a stage runs: the largest graph's activations (graphs run one at a time) and,
    on unified memory with lazy experts, the file of the expert being loaded, which the runner reads into memory
    before it deserialises the engine (on a discrete card that copy is in host RAM, outside the budget)."""
    items = []
    running = [c for c in running if c in activations]
    if recipe.runtime != "onnxruntime-cpu":   # TensorRT's fused attention keeps no score tensors (unmeasured)
        scores = {}

    def live(c: str) -> int:
        return activations[c][0] * activations[c][1] * ACTIVATION_FACTOR * 4 + scores.get(c, (0, ""))[0]

    if running:
        big = max(running, key=live)
        t, w = activations[big]
        counted = f" + {scores[big][1]}" if big in scores else ""
        items.append(MemoryItem("activations", "activations", live(big),
                                f"{big}: {t} tokens x {w} x {ACTIVATION_FACTOR} x 4 B{counted}"))
    if skipped and recipe.device.unified_memory:
        big = max(skipped, key=lambda e: weights[e][0])
        items.append(MemoryItem("expert load", "transient", weights[big][0],
                                f"{big}'s file read while its graph loads (unified memory: the same pool)"))
    return items


def _fix(recipe: Recipe, weights: Any, llm_bytes: Any, shape: LLMShape, activations: Any, source: str,  # noqa: PLR0913 (plan inputs)
         policy: str, quant: str, verdict: str, scores: Mapping[str, tuple[int, str]]) -> str:
    """Re-plan with lazy experts and each smaller LLM quant; name the options and whether they fit."""
    smaller = [q for q in llm_quants() if BITS_PER_WEIGHT[q] < BITS_PER_WEIGHT[quant]]
    options: list[tuple[str, MemoryPlan]] = []
    lazy_recipe = recipe if recipe.experts.max_loaded <= MAX_ROUTED else replace(
        recipe, experts=ExpertPolicy("lazy", MAX_ROUTED))
    if policy == "resident":
        options.append(("set `experts.policy: lazy` (load only the routed experts)",
                        _plan(lazy_recipe, weights, llm_bytes, shape, activations, source, "lazy", quant,
                              with_fix=False, scores=scores)))
    for q in smaller:
        options.append((f"set `llm.quant: {q}`", _plan(recipe, weights, llm_bytes, shape, activations, source,
                                                        policy, q, with_fix=False, scores=scores)))
    if policy == "resident" and smaller:
        options.append((f"set `experts.policy: lazy` and `llm.quant: {smaller[-1]}`",
                        _plan(lazy_recipe, weights, llm_bytes, shape, activations, source, "lazy", smaller[-1],
                              with_fix=False, scores=scores)))
    budget = recipe.memory.budget_mib * MIB
    good = [f"{label} -> {_gib(p.peak_bytes)}" for label, p in options if p.peak_bytes <= WARN_FRACTION * budget]
    if good:
        return "fix: " + "; or ".join(good[:3])
    tried = [f"{label} -> {_gib(p.peak_bytes)}" for label, p in options]
    if not smaller:
        tried.append(f"{quant} is already the smallest LLM quant")
    if policy == "lazy":
        tried.append("experts are already lazy")
    head = "fix: " if verdict == "refuse" else "to gain headroom: "
    return (head + "neither lazy expert loading nor a smaller LLM quant is enough (" + "; ".join(tried) +
            f"; budget {_gib(budget)}): use a device with more memory or a smaller checkpoint")


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


# ---- rendering -----------------------------------------------------------------------------------------------------
def render_plan(plan: MemoryPlan) -> "Table":
    """A rich Table: one row per item, the peak against the budget, and the verdict (and fix) in the caption."""
    from rich.table import Table

    colour = {"fits": "green", "warn": "yellow", "refuse": "red"}[plan.verdict]
    table = Table(title=f"memory plan: {plan.recipe} ({plan.policy} experts, LLM {plan.llm_quant}, from "
                        f"{plan.source})", caption=f"[{colour}]{plan.verdict}[/{colour}]: {plan.message}" +
                  (f"\n{plan.fix}" if plan.fix else ""))
    table.add_column("item")
    table.add_column("kind")
    table.add_column("MiB", justify="right")
    table.add_column("from")
    for item in plan.items:
        table.add_row(item.name, item.kind, f"{item.bytes / MIB:,.0f}", item.detail)
    if plan.skipped:
        table.add_row(", ".join(plan.skipped), "on disk", "0", "lazy policy: loaded when routed")
    table.add_section()
    table.add_row("peak", "", f"[{colour}]{plan.peak_bytes / MIB:,.0f}[/{colour}]", "")
    table.add_row("budget", "", f"{plan.budget_bytes / MIB:,.0f}", "memory.budget_mib")
    return table


__all__ = ["LLMShape", "MemoryItem", "MemoryPlan", "full_activations", "full_params", "memory_kind", "plan_bundle",
           "plan_from_config", "plan_from_manifest", "plan_from_params", "render_plan"]
