"""The package's shape, enforced: imports go one way through its layers, the device runtime reaches only the
torch-free core, runners and bundle, siblings are imported at the top of a module (a function-level import of our own
code is only for a module that pulls heavy libraries in, or for the CLI, which must start fast and work without
torch), and modules and functions stay small (listed exceptions, each with its reason)."""
from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mova_export"

# (module prefix, rank): a module may import only modules of its rank or below. Longest prefix wins.
LAYERS = {
    "core": 0,
    "runners": 1, "bundle": 1,
    "runtime": 2,
    "robot": 2, "serve": 2, "ros2": 2,
    "source": 3, "source.config": 3, "source.llama3": 3, "source.photos": 3,
    "components": 4,
    "source.checkpoint": 5,
    "recipe": 6,
    "reference": 7,
    "export": 8,
    "quantize": 9, "gguf": 9, "compile": 9,
    "pipeline": 10,
    "bench": 11, "synth": 11,
    "cli": 12,
}
RUNTIME_MAY_IMPORT = ("core", "runners", "bundle", "runtime")
# the device side beyond the runtime: the robot loop and bag replay, the HTTP server, the ROS 2 node
DEVICE_SIDE = ("robot", "serve", "ros2")
BUILD_SIDE_ONLY = {"torch", "transformers", "onnx", "onnxscript", "onnxslim", "onnx_ir", "safetensors", "gguf",
                   "modelopt", "skimage"}
# third-party packages slow or absent on the device: an import of our own module that pulls one in at its top may
# stay inside the function that needs it
HEAVY = {"torch", "transformers", "onnx", "onnxscript", "onnxslim", "onnx_ir", "tensorrt", "tensorrt_rtx",
         "tensorrt_rtx_bindings", "llama_cpp", "skimage", "matplotlib", "gguf", "safetensors", "cuda", "modelopt",
         "ml_dtypes", "sklearn", "scipy", "fastapi", "uvicorn", "rosbags", "model_signing", "rclpy", "sensor_msgs",
         "std_msgs", "launch", "prometheus_client", "starlette"}
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 60
LONG_MODULES = {
    "gguf/convert.py": "the GGUF writer and its Llama-3 vocabulary metadata, one format read in one place",
    "source/checkpoint.py": "shard index, lazy tensors of two formats and the ownership check: one reader",
}
LONG_FUNCTIONS = {
    "quantize/fp8_sim.py:simulate_fp8": "one graph rewrite whose node recipe reads top to bottom",
    "quantize/fp8.py:fp8_qdq": "one graph rewrite whose node recipe reads top to bottom",
    "gguf/convert.py:write_gguf": "the GGUF file's sections in the order the format lays them out",
    "cli/inspect.py:render_description": "one table per section of the description",
    "recipe/load.py:parse_recipe": "one reader per recipe section, in the YAML's order",
    "runtime/two_pass.py:two_passes": "MoVA's two passes in the order upstream runs them",
    "bench/latency.py:latency_benchmark": "the benchmark's stages in the order they run",
    "bench/parity.py:parity_benchmark": "the benchmark's stages in the order they run",
    "synth/trained.py:train_tiny_router": "the training loop of the tiny LLM, run by hand",
    "pipeline/plan.py:plan_from_manifest": "each component's weights from the file it ships",
    "compile/build.py:engine_from_onnx": "TensorRT's builder calls in the order its API takes them",
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(p for p in parts if p != "__init__")


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _rank(module: str) -> int | None:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len, default=None)
    return None if best is None else LAYERS[best]


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    """The modules of ours an import names (relative imports resolved; `from . import x` may name submodules)."""
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
        target = ".".join([*base, *(node.module.split(".") if node.module else [])]).strip(".")
    elif node.module and (node.module == "mova_export" or node.module.startswith("mova_export.")):
        target = node.module[len("mova_export."):] if node.module != "mova_export" else ""
    else:
        return []
    mods = _modules()
    subs = [f"{target}.{a.name}".strip(".") for a in node.names if f"{target}.{a.name}".strip(".") in mods]
    return subs or ([target] if target else [])


def _visit(node: ast.AST, module: str, is_package: bool, in_function: bool,
           found: list[tuple[str, bool, int]]) -> None:
    for child in ast.iter_child_nodes(node):
        inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        if isinstance(child, ast.ImportFrom):
            found.extend((t, in_function, child.lineno) for t in _resolve(module, is_package, child))
        elif isinstance(child, ast.Import):
            found.extend((a.name[len("mova_export."):], in_function, child.lineno) for a in child.names
                         if a.name.startswith("mova_export."))
        if not (isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test)):
            _visit(child, module, is_package, inner, found)


@lru_cache(maxsize=None)
def _imports() -> dict[str, list[tuple[str, bool, int]]]:
    """module -> [(imported module of ours, inside a function?, line)] (TYPE_CHECKING blocks left out)."""
    out: dict[str, list[tuple[str, bool, int]]] = {}
    for name, path in _modules().items():
        found: list[tuple[str, bool, int]] = []
        _visit(ast.parse(path.read_text()), name, path.name == "__init__.py", False, found)
        out[name] = found
    return out


def _third_party_at_top(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
    return names


@lru_cache(maxsize=None)
def _heavy(module: str) -> bool:
    """A module that imports a heavy third-party package at its top, itself or through a module of ours."""
    mods = _modules()
    if module not in mods:
        return False
    if _third_party_at_top(mods[module]) & HEAVY:
        return True
    return any(_heavy(t) for t, in_function, _ in _imports()[module] if not in_function and t != module)


def test_every_module_has_a_layer():
    assert not [m for m in _modules() if m and _rank(m) is None]


def test_imports_go_one_way():
    wrong = [f"{m}:{line} imports {t} (layer {_rank(t)} above {_rank(m)})" for m, imps in _imports().items()
             for t, _, line in imps if m and _rank(t) is not None and _rank(t) > _rank(m)]
    assert not wrong, "\n".join(wrong)


def test_the_device_runtime_reaches_only_the_torch_free_core():
    wrong = [f"{m}:{line} imports {t}" for m, imps in _imports().items() if m.startswith("runtime")
             for t, _, line in imps if not t.startswith(RUNTIME_MAY_IMPORT)]
    assert not wrong, "\n".join(wrong)
    heavy = [m for m in _modules() if m.startswith(RUNTIME_MAY_IMPORT) and _heavy(m)]
    assert not heavy, heavy


def test_the_device_side_stays_off_the_build_side():
    """robot/, serve/ and ros2/ run on the device next to the runtime: they reach only the runtime's layers and
    each other, and never pull torch, transformers or the exporters in (directly or through a module of ours)."""
    allowed = (*RUNTIME_MAY_IMPORT, *DEVICE_SIDE)
    wrong = [f"{m}:{line} imports {t}" for m, imps in _imports().items() if m.startswith(DEVICE_SIDE)
             for t, _, line in imps if not t.startswith(allowed)]
    assert not wrong, "\n".join(wrong)
    build = [f"{m} imports {sorted(_third_party_at_top(p) & BUILD_SIDE_ONLY)}" for m, p in _modules().items()
             if m.startswith(DEVICE_SIDE) and _third_party_at_top(p) & BUILD_SIDE_ONLY]
    assert not build, build


def test_siblings_are_imported_at_the_top():
    """Our own modules are imported inside a function only when they pull a heavy library in (torch, onnx, ...)
    or from the CLI (start-up time, and a device install without torch)."""
    wrong = [f"{m}:{line} imports {t} inside a function" for m, imps in _imports().items()
             if not m.startswith("cli") for t, in_function, line in imps if in_function and not _heavy(t)]
    assert not wrong, "\n".join(wrong)


def test_modules_and_functions_stay_small():
    long_modules, long_functions = [], []
    for path in _modules().values():
        rel = path.relative_to(PACKAGE).as_posix()
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES and rel not in LONG_MODULES:
            long_modules.append(f"{rel}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES and f"{rel}:{node.name}" not in LONG_FUNCTIONS:
                    long_functions.append(f"{rel}:{node.name}: {length} lines")
    assert not long_modules and not long_functions, (long_modules, long_functions)
    stale = [k for k in [*LONG_MODULES, *(k.split(":")[0] for k in LONG_FUNCTIONS)] if not (PACKAGE / k).is_file()]
    assert not stale, f"exceptions for files that no longer exist: {stale}"
