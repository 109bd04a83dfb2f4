"""Tables the commands print (rich)."""
from __future__ import annotations

from typing import Any, Sequence


def print_build(result: Any, console: Any) -> None:
    from rich import box
    from rich.table import Table

    table = Table(title=f"{result.report['target']}: per-graph parity", title_justify="left", box=box.SIMPLE_HEAD,
                  caption="fp32 cos: the fp32 graph vs PyTorch (lowest over the parity inputs); shipped cos: the "
                          "shipped precision vs the reference", caption_justify="left")
    for col in ("graph", "requested", "shipped", "fp32 cos", "shipped cos", "MiB"):
        table.add_column(col, justify="right" if "cos" in col or col == "MiB" else "left", no_wrap=True)
    for r in result.report["components"]:
        fp32, shipped = r["fp32_vs_torch_min_cosine"], r["shipped_vs_reference_cosine"]
        table.add_row(r["graph"], r["requested"], r["decision"], "-" if fp32 is None else f"{fp32:.6f}",
                      "-" if shipped is None else f"{shipped:.5f}", f"{(r['bytes'] or 0) / 2**20:.2f}")
    console.print(table)
    reused = [f"{r.stage} {r.name}" for r in result.records if r.status == "reused"]
    computed = [f"{r.stage} {r.name} {r.seconds:.1f}s" for r in result.records if r.status == "computed"]
    console.print(f"units computed: {', '.join(computed) or 'none'}")
    earlier = sum(r.detail.get("computed_s", 0.0) for r in result.records if r.status == "reused")
    console.print(f"units reused from the work folder: {len(reused)}"
                  + (f" (producing them took {earlier / 60:.1f} min)" if earlier else ""))
    if result.compile.get("on_device"):
        console.print(f"TensorRT engines: on the device run [bold]{result.compile['on_device']}[/bold]")
    console.print(f"bundle: {result.bundle}  report: {result.bundle / 'report.md'}")


def _build_with(recipe: Any) -> str:
    """How a target's graphs are built, on two short lines: the TensorRT flavor and where / for what."""
    if recipe.tensorrt is None:
        return f"{recipe.runtime}\n"
    from ..compile import default_flavor

    flavor = default_flavor(recipe)
    if recipe.device.jetpack:
        return f"{flavor} {recipe.tensorrt.version}\nJetPack {recipe.device.jetpack}"
    if flavor == "tensorrt-rtx":
        return f"{flavor}\nSM{recipe.device.cc_str.replace('.', '')} ahead of time"
    return f"{flavor} {recipe.tensorrt.version}\non the device"


def recipes_table(recipes: Sequence[Any]) -> Any:
    """One row per target, readable in 80 columns: device on a dim second line, the TensorRT flavor and what it
    builds for, graph precisions, LLM quant and expert policy, the memory budget and the full-size MoVA-8B plan's
    verdict (`mova-export plan --target T` has the figures)."""
    from rich import box
    from rich.table import Table

    from ..pipeline.plan import full_params, plan_from_params

    table = Table(title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    width = max((len(r.name) for r in recipes), default=6)
    for col in ("target / device", "cc", "built with", "graphs", "LLM", "GiB", "8B"):
        table.add_column(col, no_wrap=col != "target / device", overflow="fold",
                         min_width=width if col == "target / device" else None)
    params = full_params()
    for r in recipes:
        counts: dict[str, int] = {}
        for p in r.precision.values():
            counts[p] = counts.get(p, 0) + 1
        verdict = plan_from_params(r, params).verdict
        table.add_row(f"{r.name}\n[dim]{r.device.name.removeprefix('NVIDIA ')}[/dim]", r.device.cc_str or "-",
                      _build_with(r), "\n".join(f"{n} {p}" for p, n in sorted(counts.items(), key=lambda kv: -kv[1])),
                      f"{r.llm.quant}\n{r.experts.policy}", f"{r.memory.budget_mib / 1024:.1f}",
                      {"fits": "[green]fits[/green]", "warn": "[yellow]warn[/yellow]"}.get(verdict, "[red]no[/red]"))
    table.caption = ("graphs: how many at each precision; LLM: GGUF quant, expert policy; GiB: memory budget; 8B: "
                     "does the full-size MoVA-8B fit (mova-export plan --target T)")
    return table
