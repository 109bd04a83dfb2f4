"""compile: TensorRT engines where a flavor here can build them for the target (TensorRT-RTX ahead of time for RTX
cards, full TensorRT on the device itself); else the command to run on the device. Each engine is a unit of the work
folder under compile.engine_key (the key `mova-export compile` checks too), so a rebuild recompiles only what
changed."""
from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...bundle import FileTable, link_or_copy
from ...compile import can_compile_here, compile_engines
from ...compile.engines import plan_engine
from ...compile.metadata import metadata_path
from ..unit import BuildContext
from ..work import write_unit

if TYPE_CHECKING:  # pragma: no cover
    from ...bundle import Manifest
    from ...recipe import Recipe


def compile_stage(ctx: BuildContext, root: Path, recipe: "Recipe", manifest: "Manifest", files: FileTable,
                  allowed: bool, out_dir: Path) -> dict[str, Any]:
    if recipe.runtime != "tensorrt":
        return {"status": "skipped", "reason": f"the {recipe.name} target runs ONNX Runtime: no engines"}
    check = can_compile_here(recipe, out_dir)
    if not (check.ok and allowed) or check.flavor is None:
        reason = check.reason if not check.ok else "--no-compile"
        ctx.console.line(f"compile: skipped: {reason}")
        return {"status": "skipped", "reason": reason, "on_device": check.command}
    choice = check.flavor
    units = {}
    for name in manifest.graphs:
        plan = plan_engine(root, manifest, recipe, name, files, choice)
        unit, reused = ctx.find("compile", name, plan.key)
        if reused:       # the engine of an earlier build: compile_engines finds it up to date and keeps it
            for f in (plan.engine, metadata_path(plan.engine).as_posix()):
                link_or_copy(unit.path / Path(f).name, root / f)
        units[name] = (unit, reused, plan.engine)
    start = time.perf_counter()
    title = f"compile {len(units)} engines ({choice.flavor} {choice.version})"
    with ctx.console.task(title, total=len(units)) as steps:
        def log(message: str) -> None:
            ctx.console.line(message)
            if " MiB in " in message or "engine up to date" in message:
                steps.advance(message.split(":")[0])

        metas = compile_engines(root, manifest, recipe, device=check.device, files=files, log=log)
    for name, (unit, reused, rel) in units.items():
        if not reused:
            with unit.lock(ctx.console.line), unit.produce() as tmp:   # one writer per unit across builds
                for f in (rel, metadata_path(rel).as_posix()):
                    link_or_copy(root / f, tmp / Path(f).name)
                write_unit(tmp, manifest.engines[name])
        ctx.record("compile", name, unit.key, reused, start)
    verified = sum(m.parity.get("status") == "verified" for m in metas)
    return {"status": "compiled", "flavor": choice.flavor, "version": choice.version, "engines": len(metas),
            "verified": verified}
