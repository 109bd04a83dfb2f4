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
    console.print(f"units reused from the work folder: {len(reused)}")
    if result.compile.get("on_device"):
        console.print(f"TensorRT engines: on the device run [bold]{result.compile['on_device']}[/bold]")
    console.print(f"bundle: {result.bundle}  report: {result.bundle / 'report.md'}")


def recipes_table(recipes: Sequence[Any]) -> Any:
    from rich import box
    from rich.table import Table

    table = Table(title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    # the target's device on a dim second line: narrow terminals (80 columns) keep every column readable
    width = max((len(r.name) for r in recipes), default=6)
    for col in ("target / device", "cc", "runtime", "graphs", "LLM", "experts", "GiB"):
        table.add_column(col, no_wrap=col in ("cc", "LLM", "GiB"), overflow="fold",
                         min_width=width if col == "target / device" else None)
    for r in recipes:
        counts: dict[str, int] = {}
        for p in r.precision.values():
            counts[p] = counts.get(p, 0) + 1
        table.add_row(f"{r.name}\n[dim]{r.device.name}[/dim]", r.device.cc_str or "-", r.runtime,
                      "\n".join(f"{n} {p}" for p, n in sorted(counts.items(), key=lambda kv: -kv[1])),
                      r.llm.quant, r.experts.policy,
                      f"{r.memory.budget_mib / 1024:.1f}")
    table.caption = "graphs: how many graphs at each precision; GiB: the recipe's memory budget"
    return table
