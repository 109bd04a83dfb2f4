"""The registry owns every fact of a component: an eighth expert is one component spec plus its registration, and
synth, export, the recipes, the memory planner, the bundle and the runtime pick it up with no other edit. Also: the
package has no import circles, and the device side imports neither torch nor transformers."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import mova_export
from mova_export.components import (
    ComponentSpec,
    ExpertInfo,
    MemoryFigures,
    TensorSpec,
    arch,
    expert_letters,
    register,
    unregister,
)
from mova_export.components.layers import CLIP672, CLIP_MEAN, CLIP_STD, image_side, smooth_image_sample

PACKAGE = Path(mova_export.__file__).parent
ROUTER_TEXT = "This model can tell toy squares from toy circles."


class ToyTower(nn.Module):
    """A 14x14 patch projection on the CLIP input: [1, 3, 672, 672] -> [1, 48 * 48, width], already on the grid."""

    def __init__(self, width: int):
        super().__init__()
        self.proj = nn.Conv2d(3, width, 14, stride=14)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.proj(pixel_values.float()).flatten(2).transpose(1, 2)


def _toy_spec() -> ComponentSpec:
    return ComponentSpec(
        name="expert_H", kind="tower", prefix="model.vision_tower.vision_tower_8.",
        presets={"full": {"width": 64}, "tiny": {"width": 8}},
        build=lambda cfg: ToyTower(int(arch(cfg, "expert_H")["width"])).eval(),
        inputs=lambda cfg: (TensorSpec("pixel_values", (1, 3, image_side(cfg), image_side(cfg))),),
        outputs=lambda cfg: (TensorSpec("features", (1, cfg.grid_tokens, int(arch(cfg, "expert_H")["width"]))),),
        sample_inputs=lambda cfg, seed: {"pixel_values": smooth_image_sample(seed, image_side(cfg), CLIP_MEAN,
                                                                             CLIP_STD)},
        memory=MemoryFigures(params=1_000_000, activation=(2304, 64)), image_inputs=(CLIP672,),
        expert=ExpertInfo("H", ROUTER_TEXT), out_channels=lambda arch: int(arch["width"]),
        description="a toy eighth expert")


@pytest.fixture()
def eighth_expert():
    register(_toy_spec())
    try:
        yield
    finally:
        unregister("expert_H")


def test_an_eighth_expert_is_one_spec_and_runs_from_export_to_runtime(eighth_expert, tmp_path):
    from mova_export.components import facts_from_config
    from mova_export.core.progress import NULL
    from mova_export.pipeline import BuildRequest, attach_llm, export_bundle
    from mova_export.pipeline.plan import full_params, plan_from_params
    from mova_export.recipe import load_recipe
    from mova_export.reference import ReferencePipeline
    from mova_export.runtime import MoVARuntime
    from mova_export.source.photos import sample_images
    from mova_export.synth import synthetic_config, write_synthetic_checkpoint

    assert expert_letters() == tuple("ABCDEFGH")
    cfg = synthetic_config("tiny")
    assert len(cfg.expert_channels) == 8 and cfg.expert_channels[7] == 8
    facts = facts_from_config(cfg)
    assert facts.letters[-1] == "H" and f"\nH. {ROUTER_TEXT}\n\nQuestion:\n" in facts.routing_prompt
    # the recipes' `experts:` group and the planner's figures cover it with no recipe or planner edit
    assert load_recipe("cpu").precision["expert_H"] == "int8" and load_recipe("h100").precision["expert_H"] == "fp8"
    plan = plan_from_params(load_recipe("jetson-orin"), full_params())
    assert any(item.name == "expert_H" for item in plan.items)

    ckpt = write_synthetic_checkpoint(tmp_path / "ckpt", scale="tiny", console=NULL)
    calib = tmp_path / "calib"
    calib.mkdir()
    from PIL import Image

    pictures = sample_images(["coffee", "chelsea"])
    for name, rgb in pictures.items():
        Image.fromarray(rgb).save(calib / f"{name}.png")
    bundle = tmp_path / "bundle"
    manifest = export_bundle(BuildRequest(checkpoint=ckpt, out=bundle,
                                          components=["base", "expert_H", "text_encoder", "adapter"], calib=calib,
                                          work_dir=tmp_path / "work", quiet=True, full_sweep=False))
    adapter = manifest.graph_of_role("adapter_answer")
    assert len(manifest.model.experts) == 8 and manifest.model.experts[-1].component == "expert_H"
    assert "expert_H" in manifest.graphs and manifest.graphs["expert_H"].proven["fp32"] >= 0.99999
    assert adapter.proven["fp32"] >= 0.99999
    attach_llm(bundle, ckpt, "f32", work_dir=tmp_path / "work")

    question = "What is in the cup?"
    reference = ReferencePipeline(ckpt).run(pictures["coffee"], question, max_new_tokens=8, force_experts=["H"],
                                            keep_tensors=True)
    with MoVARuntime.from_bundle(bundle, llm={"f32_kv": True}) as rt:
        got = rt.ask(pictures["coffee"], question, max_new_tokens=8, experts=["H"], keep_tensors=True)
    assert got.experts == reference.experts == ["H"] and got.routing_mask == [0] * 7 + [1]
    assert got.routing_ids == reference.routing_ids and got.token_ids == reference.token_ids
    for key in ("expert_H", "image_tokens"):
        a, b = got.tensors[key], reference.tensors[key]
        cosine = float(np.dot(a.ravel(), b.ravel()) / np.linalg.norm(a) / np.linalg.norm(b))
        assert cosine >= 0.99999, key
    # the expert really changes the answer-pass image tokens (an unrouted H would leave the routing pass's)
    assert np.abs(got.tensors["image_tokens"] - rt_free_tokens(bundle, pictures["coffee"], question)).max() > 1e-6


def rt_free_tokens(bundle: Path, image: np.ndarray, question: str) -> np.ndarray:
    from mova_export.runtime import MoVARuntime

    with MoVARuntime.from_bundle(bundle, llm={"f32_kv": True}) as rt:
        return rt.ask(image, question, max_new_tokens=1, experts=[], keep_tensors=True).tensors["image_tokens"]


# ---- imports ---------------------------------------------------------------------------------------------------
def _runtime_nodes(tree: ast.AST):
    """Every node except those under `if TYPE_CHECKING:` (annotations only, never imported at run time)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            continue
        yield node
        yield from _runtime_nodes(node)


def _imports() -> dict[str, set[str]]:
    """module -> the package modules it imports at run time (module level and inside functions), from the source."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        module = ".".join(parts)
        package = parts if rel.name == "__init__" else parts[:-1]
        deps = set()
        for node in _runtime_nodes(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package[:len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                deps.add(target)
                deps.update(f"{target}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("mova_export"))
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mova_export"):
                deps.add(node.module)
        graph[module] = deps
    return {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}


def test_no_import_circles_between_stage_packages():
    """Packages import one way: no two top-level parts of mova_export import each other (directly or around a
    longer circle). The package __init__ files re-export their own modules and are not counted as users."""
    graph = _imports()

    def top(module: str) -> str:
        return module.split(".")[1] if module.count(".") else module

    edges: dict[str, set[str]] = {}
    for module, deps in graph.items():
        for dep in deps:
            if top(dep) != top(module) and not dep.count(".") == 0:
                edges.setdefault(top(module), set()).add(top(dep))
    # circles among the top-level parts
    circles = []

    def visit(node: str, path: list[str]) -> None:
        for nxt in sorted(edges.get(node, ())):
            if nxt == path[0]:
                circles.append(path + [nxt])
            elif nxt not in path and len(path) < 6:
                visit(nxt, path + [nxt])

    for start in sorted(edges):
        visit(start, [start])
    assert not circles, circles[:5]


def test_the_device_side_imports_neither_torch_nor_transformers():
    """runtime/, bundle/, preprocess, text, prompts, facts and the CLI's run command, in an interpreter where torch
    and transformers cannot be imported."""
    code = """
import sys
sys.modules["torch"] = None
sys.modules["transformers"] = None
import mova_export.runtime, mova_export.bundle, mova_export.core
import mova_export.cli
from click.testing import CliRunner
result = CliRunner().invoke(mova_export.cli.main, ["run", "--help"])
assert result.exit_code == 0, result.output
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=PACKAGE.parent)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
    # and no module of the runtime package imports them, even lazily
    for path in (PACKAGE / "runtime").glob("*.py"):
        tree = ast.parse(path.read_text())
        names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not names & {"torch", "transformers"}, path.name
