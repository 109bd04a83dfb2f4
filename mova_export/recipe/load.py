"""Recipe YAML -> a validated, frozen `Recipe`: an unknown key, a wrong type or an impossible value is a RecipeError
naming the field path (`precision.expert_A`) and the file. Hardware rules checked here, not at build time:
  * FP8 needs compute capability >= 8.9 (Ada, Hopper and newer); Orin (8.7) and Ampere (8.6) never have it.
  * DLA exists only on Jetson AGX Orin and Orin NX (2 cores); the Orin Nano has none; DLA runs int8/fp16 only.
  * the `cpu` runtime (ONNX Runtime CPU) has no TensorRT section, no fp8 and no GPU layers.
  * a Jetson names its JetPack (`device.jetpack`, default 6.2): the JetPack must support the module (7.0 / 7.1 are
    Thor only), `tensorrt.version` follows from it, and JetPack 7.x's TensorRT has no DLA (core/jetpack.py).

`--target NAME@jetpackX.Y` loads a Jetson recipe for another JetPack (`jetson-orin@jetpack7.2`): one Orin recipe per
module, not one per JetPack. The recipe keeps its precisions; its TensorRT version (so its flavor) follows the
JetPack, and DLA components run on the GPU where that JetPack's TensorRT has no DLA.

Where the YAML files live: the top-level `recipes/` folder is the source of truth. `recipe_dirs()` finds it next to
the package (a source checkout or an editable install), then a packaged copy under `mova_export/data/recipes/` (the
`data/**/*` package-data glob covers it, for a wheel whose build copies the folder there).
"""
from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping

from ..core.errors import RecipeError
from ..core.jetpack import JETPACKS, jetpack_line, jetpacks_for
from ..core.spec import PRECISIONS
from ..core.tolerance import Tolerance
from .hardware import ALIASES, FP8_MIN_CC, KNOWN_GPUS
from .schema import (
    CALIBRATION_METHODS,
    DEVICE_KINDS,
    EXPERT_POLICIES,
    FALLBACKS,
    GROUP_KEYS,
    QUANT_BACKENDS,
    RUNTIMES,
    BuilderOptions,
    Calibration,
    Device,
    DLAOptions,
    ExpertPolicy,
    LLMOptions,
    MemoryOptions,
    Recipe,
    TensorRTOptions,
    expert_components,
    graph_components,
    llm_quants,
)
from .targets import DEFAULT_JETPACK, split_target, with_jetpack


def recipe_dirs() -> list[Path]:
    """Folders searched for `<name>.yaml`: the repo's top-level recipes/, then the packaged copy."""
    dirs = [Path(__file__).resolve().parents[2] / "recipes"]
    try:
        from importlib.resources import files

        packaged = Path(str(files("mova_export") / "data" / "recipes"))
        dirs.append(packaged)
    except (ModuleNotFoundError, TypeError):  # pragma: no cover - zip imports
        pass
    return [d for d in dirs if d.is_dir()]


def list_recipes() -> list[str]:
    """Names of the shipped recipes (first folder wins on a duplicate name), sorted."""
    names: set[str] = set()
    for d in recipe_dirs():
        names.update(p.stem for p in d.glob("*.yaml"))
    return sorted(names)


def resolve_target(name_or_path: str | Path) -> Path:
    """A recipe name, an alias (`jetson-orin`) or a path to a YAML file -> the YAML file (a `@jetpackX.Y` choice is
    ignored here: load_recipe applies it)."""
    text = split_target(name_or_path)[0]
    path = Path(text)
    if path.suffix in (".yaml", ".yml") or "/" in text or path.is_file():
        if not path.is_file():
            raise RecipeError(f"recipe file {path} does not exist; pass a YAML file or a target name "
                              f"({', '.join(list_recipes())})")
        return path
    name = ALIASES.get(text, text)
    for d in recipe_dirs():
        if (d / f"{name}.yaml").is_file():
            return d / f"{name}.yaml"
    raise RecipeError(f"unknown target {text!r}; choose one of {', '.join(list_recipes())} (aliases: "
                      f"{', '.join(sorted(ALIASES))}) or pass a path to a recipe YAML")


def load_recipe(name_or_path: str | Path) -> Recipe:
    """Load and validate a recipe by name, alias or path. Raises RecipeError naming the field and the file."""
    import yaml

    path = resolve_target(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise RecipeError(f"{path} is not valid YAML{where}; fix the syntax") from None
    jetpack = split_target(name_or_path)[1]
    chosen = raw if jetpack is None else with_jetpack(raw, jetpack, str(name_or_path), str(path))
    same = chosen == raw   # no JetPack named, or the recipe's own: the recipe as it is
    return parse_recipe(chosen, source=str(path) if same else f"{path} as --target {name_or_path}")


class _Reader:
    """Reads one mapping of the YAML, remembering its field path; `done()` refuses keys nobody read."""

    def __init__(self, raw: Any, path: str, source: str):
        self.path, self.source = path, source
        if not isinstance(raw, Mapping):
            self.fail(path or "recipe", f"must be a mapping, got {type(raw).__name__}")
        self.raw = dict(raw)
        self.seen: set[str] = set()

    def field(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def fail(self, field: str, problem: str) -> None:
        field = repr(field)[1:-1][:120]     # a key from the YAML: printable, on one line
        raise RecipeError(f"{self.source}: {field} {problem}")

    def has(self, key: str) -> bool:
        return self.raw.get(key) is not None

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ..., *, choices: tuple = (),
            lo: float | None = None, hi: float | None = None) -> Any:
        self.seen.add(key)
        if key not in self.raw or self.raw[key] is None:
            if default is ...:
                self.fail(self.field(key), "is missing; add it" + (f" (one of {', '.join(map(str, choices))})"
                                                                   if choices else ""))
            return default
        value = self.raw[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            if float in kinds and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            else:
                self.fail(self.field(key), f"must be {' or '.join(k.__name__ for k in kinds)}, got {value!r}")
        if choices and value not in choices:
            self.fail(self.field(key), f"is {value!r}; use one of {', '.join(map(str, choices))}")
        if lo is not None and value < lo or hi is not None and value > hi:
            self.fail(self.field(key), f"is {value!r}; it must be within {lo}..{hi}")
        return value

    def sub(self, key: str, required: bool = True) -> "_Reader | None":
        self.seen.add(key)
        if not self.has(key):
            if required:
                self.fail(self.field(key), "is missing; add the section")
            return None
        return _Reader(self.raw[key], self.field(key), self.source)

    def done(self) -> None:
        unknown = sorted(set(self.raw) - self.seen, key=str)
        if unknown:
            self.fail(self.field(str(unknown[0])), f"is not a known recipe key (known here: "
                      f"{', '.join(sorted(self.seen))}); remove or rename it")


def _compute_capability(r: _Reader, key: str) -> tuple[int, int]:
    value = r.get(key, (str, float, int))
    parts = str(value).split(".")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        r.fail(r.field(key), f"is {value!r}; write it as major.minor in quotes, e.g. \"8.7\"")
    return int(parts[0]), int(parts[1])


def parse_recipe(raw: Any, source: str = "recipe") -> Recipe:
    """Validate a parsed YAML mapping into a Recipe (RecipeError naming the field path and `source`)."""
    top = _Reader(raw, "", source)
    name = top.get("name", str)
    description = top.get("description", str, "")
    runtime = top.get("runtime", str, choices=RUNTIMES)

    device = _device(top)
    known = KNOWN_GPUS.get(device.name)

    trt = _tensorrt(top, runtime, device, known)
    precision = _precision(top, runtime, trt, source)
    c = top.sub("calibration", required=False)
    calibration = Calibration() if c is None else Calibration(
        c.get("method", str, Calibration.method, choices=CALIBRATION_METHODS),
        c.get("samples", int, Calibration.samples, lo=1, hi=100000),
        c.get("held_out", int, Calibration.held_out, lo=1, hi=100000),
        c.get("fallback", str, Calibration.fallback, choices=FALLBACKS),
        c.get("backend", str, Calibration.backend, choices=QUANT_BACKENDS))
    if "fp8" in precision.values() and calibration.method == "entropy":
        if c is None:  # the default method cannot calibrate FP8: its scales are amax / 448
            calibration = replace(calibration, method="minmax")
        else:
            c.fail(c.field("method"), "is entropy, which cannot calibrate the fp8 components (FP8 scales are "
                   "amax/448); use minmax or percentile")
    if c is not None:
        if calibration.fallback == "fp16" and trt is not None and not trt.fp16:
            c.fail(c.field("fallback"), "is fp16 but tensorrt.fp16 is false; use fp32 or none")
        c.done()
    accuracy = _accuracy(top, precision, calibration.fallback)

    lr = top.sub("llm")
    llm = LLMOptions(lr.get("quant", str, choices=llm_quants()), lr.get("gpu_layers", int, lo=-1, hi=1000),
                     lr.get("context", int, lo=128, hi=131072), lr.get("threads", int, lo=1, hi=512))
    if runtime == "onnxruntime-cpu" and llm.gpu_layers != 0:
        lr.fail(lr.field("gpu_layers"), f"is {llm.gpu_layers} on the cpu runtime; set it to 0")
    lr.done()

    e = top.sub("experts", required=False)
    experts = ExpertPolicy() if e is None else ExpertPolicy(
        e.get("policy", str, ExpertPolicy.policy, choices=EXPERT_POLICIES),
        e.get("max_loaded", int, ExpertPolicy.max_loaded, lo=1, hi=len(expert_components())))
    if e is not None:
        e.done()

    m = top.sub("memory")
    memory = MemoryOptions(m.get("budget_mib", int, lo=256), m.get("runtime_overhead_mib", int, MemoryOptions.runtime_overhead_mib, lo=0))
    if memory.budget_mib > device.memory_mib:
        m.fail(m.field("budget_mib"), f"is {memory.budget_mib} MiB, more than the device's {device.memory_mib} "
               "MiB (device.memory_mib); lower it")
    m.done()
    top.done()
    return Recipe(name, description, runtime, device, trt, precision, accuracy, calibration, llm, experts, memory,
                  source)


def _device(top: _Reader) -> Device:
    d = top.sub("device")
    kind = d.get("kind", str, choices=DEVICE_KINDS)
    gpu_name = d.get("name", str)
    cc = _compute_capability(d, "compute_capability") if kind != "cpu" else None
    if kind == "cpu" and d.has("compute_capability"):
        d.get("compute_capability", (str, float, int))
        d.fail(d.field("compute_capability"), "is set on a cpu device; remove it")
    jetpack = None
    if kind == "jetson":
        jetpack = jetpack_line(str(d.get("jetpack", (str, float), DEFAULT_JETPACK)))
        cc_str = "%d.%d" % cc if cc else ""
        if jetpack not in JETPACKS:
            d.fail(d.field("jetpack"), f"is {jetpack!r}; use one of {', '.join(JETPACKS)}")
        elif cc_str not in JETPACKS[jetpack].compute_capabilities:
            d.fail(d.field("jetpack"), f"is {jetpack} but JetPack {jetpack} does not support {gpu_name} (compute "
                   f"capability {cc_str}); use {' or '.join(jetpacks_for(cc_str)) or 'a JetPack that does'}")
    elif d.has("jetpack"):
        d.get("jetpack", (str, float))
        d.fail(d.field("jetpack"), f"is set on a {kind} device; JetPack is a Jetson's: remove it")
    device = Device(kind, gpu_name, cc, d.get("memory_mib", int, lo=256),
                    d.get("unified_memory", bool, kind in ("jetson", "igpu")), jetpack)
    d.done()
    known = KNOWN_GPUS.get(gpu_name)
    if known is not None and cc != known["cc"]:
        d.fail(d.field("compute_capability"), f"is {device.cc_str} but a {gpu_name} has "
               f"{'%d.%d' % known['cc']}; fix the value")
    return device


def _tensorrt_version(t: _Reader, device: Device) -> str:
    """tensorrt.version: 10.x or 11.x; on a Jetson it follows from device.jetpack (stating it is allowed only when it
    agrees)."""
    jetpack = JETPACKS.get(device.jetpack or "")
    if jetpack is not None and not t.has("version"):
        t.get("version", (str, float), None)
        return jetpack.tensorrt
    version = str(t.get("version", (str, float)))
    if not version.split(".")[0].isdigit() or int(version.split(".")[0]) not in (10, 11):
        t.fail(t.field("version"), f"is {version!r}; mova-export builds with TensorRT 10.x or 11.x (e.g. \"10.3\")")
    if jetpack is not None and version != jetpack.tensorrt:
        t.fail(t.field("version"), f"is {version} but JetPack {jetpack.version} ships TensorRT {jetpack.tensorrt}; "
               "remove tensorrt.version (it follows from device.jetpack)")
    return version


def _tensorrt(top: _Reader, runtime: str, device: Device, known: Mapping[str, Any] | None) -> TensorRTOptions | None:
    t = top.sub("tensorrt", required=runtime == "tensorrt")
    if runtime != "tensorrt":
        if t is not None:
            t.fail("tensorrt", f"is set but runtime is {runtime}; remove the section or use runtime: tensorrt")
        return None
    if device.kind == "cpu":
        top.fail("runtime", "is tensorrt on a cpu device; use runtime: onnxruntime-cpu")
    version = _tensorrt_version(t, device)
    fp8 = t.get("fp8", bool)
    if fp8 and (device.compute_capability or (0, 0)) < FP8_MIN_CC:
        t.fail(t.field("fp8"), f"is true but {device.name} (compute capability {device.cc_str}) has no FP8; FP8 "
               "needs 8.9+ (Ada, Hopper): set it to false and use int8 or fp16")
    dla_cores = t.get("dla_cores", int, 0, lo=0, hi=2)
    if dla_cores and device.kind != "jetson":
        t.fail(t.field("dla_cores"), f"is {dla_cores} but {device.name} is not a Jetson; only Orin AGX/NX have "
               "DLA: set it to 0")
    if known is not None and dla_cores > known["dla_cores"]:
        t.fail(t.field("dla_cores"), f"is {dla_cores} but {device.name} has {known['dla_cores'] or 'no'} DLA "
               f"core(s); set it to {known['dla_cores']}")
    b = t.sub("builder", required=False)
    builder = BuilderOptions() if b is None else BuilderOptions(
        b.get("optimization_level", int, BuilderOptions.optimization_level, lo=0, hi=5),
        b.get("workspace_mib", int, BuilderOptions.workspace_mib, lo=16),
        b.get("timing_cache", bool, BuilderOptions.timing_cache))
    if b is not None:
        b.done()
    dr = t.sub("dla", required=False)
    dla = DLAOptions()
    if dr is not None:
        comps = dr.get("components", list, [])
        for i, comp in enumerate(comps):
            if comp not in graph_components():
                dr.fail(f"{dr.field('components')}[{i}]", f"is {comp!r}; use component names "
                        f"({', '.join(graph_components())})")
        if comps and not dla_cores:
            dr.fail(dr.field("components"), f"lists {', '.join(comps)} but {device.name} has no DLA "
                    "(tensorrt.dla_cores is 0); empty the list")
        jetpack = JETPACKS.get(device.jetpack or "")
        if comps and jetpack is not None and not jetpack.dla:
            dr.fail(dr.field("components"), f"lists {', '.join(comps)} but JetPack {jetpack.version}'s TensorRT "
                    f"{jetpack.tensorrt} has no DLA (TensorRT 10.7 was the last 10.x with it); empty the list")
        core = dr.get("core", int, DLAOptions.core, lo=0, hi=1)
        if comps and core >= dla_cores:
            dr.fail(dr.field("core"), f"is {core} but the device has {dla_cores} DLA core(s); use 0..{dla_cores - 1}")
        dla = DLAOptions(tuple(comps), core, dr.get("gpu_fallback", bool, DLAOptions.gpu_fallback))
        dr.done()
    opts = TensorRTOptions(version, t.get("fp16", bool), t.get("int8", bool), fp8, dla_cores, builder, dla)
    t.done()
    return opts


def _precision(top: _Reader, runtime: str, trt: TensorRTOptions | None, source: str) -> dict[str, str]:
    """Precision per graph component: its own key, else `experts:` (for an expert), else `default:`."""
    p = top.sub("precision")
    experts = set(expert_components())
    out: dict[str, str] = {}
    groups = {key: p.get(key, str, None, choices=PRECISIONS) for key in GROUP_KEYS}
    for comp in graph_components():
        if p.has(comp):
            value, field = p.get(comp, str, choices=PRECISIONS), p.field(comp)
        elif comp in experts and groups["experts"] is not None:
            value, field = groups["experts"], p.field("experts")
        elif groups["default"] is not None:
            value, field = groups["default"], p.field("default")
        else:
            p.fail(p.field(comp), "is missing; add it, or an `experts:` / `default:` entry that covers it")
        if value == "fp8":
            if trt is None:
                p.fail(field, f"is fp8 but the {runtime} runtime has no FP8; use int8, fp16 or fp32")
            elif not trt.fp8:
                p.fail(field, "is fp8 but the target has no FP8 (tensorrt.fp8 is false: FP8 needs compute "
                       "capability 8.9+, never Orin); use int8 or fp16")
        if trt is not None and value == "int8" and not trt.int8:
            p.fail(field, "is int8 but tensorrt.int8 is false; use fp16")
        if trt is not None and value == "fp16" and not trt.fp16:
            p.fail(field, "is fp16 but tensorrt.fp16 is false; use fp32")
        if trt is not None and comp in trt.dla.components and value not in ("int8", "fp16"):
            p.fail(field, f"is {value} but {comp} runs on DLA (tensorrt.dla.components), which computes int8 or "
                   "fp16 only; use int8/fp16 or take it off the DLA list")
        out[comp] = value
    p.done()
    return out


def _accuracy(top: _Reader, precision: Mapping[str, str], fallback: str) -> dict[str, Tolerance]:
    a = top.sub("accuracy")
    out: dict[str, Tolerance] = {}
    needed = set(precision.values()) | ({fallback} - {"none"})
    for prec in PRECISIONS:
        r = a.sub(prec, required=prec in needed)
        if r is None:
            continue
        bound = r.get("max_rel_l2", float, None, lo=0.0)
        out[prec] = Tolerance(r.get("min_cosine", float, lo=0.0, hi=1.0), math.inf if bound is None else bound)
        r.done()
    a.done()
    return out
