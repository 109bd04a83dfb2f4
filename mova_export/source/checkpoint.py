"""Read a MoVA checkpoint one component at a time, memory-mapped.

Layouts (what `save_pretrained` writes; the released MoVA-8B is the first):
  pytorch_model.bin.index.json + pytorch_model-0000i-of-0000N.bin   torch.load(mmap=True, weights_only=True)
  model.safetensors.index.json + model-0000i-of-0000N.safetensors   safe_open, one tensor at a time
  pytorch_model.bin | model.safetensors                             single file, same readers

`Checkpoint.build(name)` builds the component's module with its parameters on the meta device (buffers are
computed for real), checks the checkpoint keys and shapes against it, then reads only that component's tensors
from only the shards that hold them and assigns them. Nothing else of the checkpoint is read into RAM, so a
component can be exported from the 23 GB checkpoint with about its own size in memory.

`describe(path)` and `describe_config(cfg)` summarise a checkpoint, or an architecture without weights.
"""
from __future__ import annotations

import json
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch
from torch import nn

from ..components import ComponentSpec, all_specs, check_config, get_spec, owner_of
from ..core.errors import CheckpointError, MoVAExportError
from .config import MoVAConfig

INDEX_FILES = {"safetensors": "model.safetensors.index.json", "bin": "pytorch_model.bin.index.json"}
SINGLE_FILES = {"safetensors": "model.safetensors", "bin": "pytorch_model.bin"}
_SHARD_NAME = re.compile(r"^(pytorch_model|model)-\d+-of-\d+\.(bin|safetensors)$")
_ST_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


# ---- building a component without allocating its parameters ----------------------------------------------------
@contextmanager
def params_on_meta() -> Iterator[None]:
    """Every nn.Parameter registered inside goes to the meta device; buffers stay real (RoPE tables, ids).

    Parameters are only shapes until a state dict is assigned, so building the 8B LLM costs nothing, while
    buffers that a checkpoint may carry (or that it does not, e.g. non-persistent ones) keep their values.
    """
    original = nn.Module.register_parameter

    def register_parameter(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_parameter  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def build_on_meta(spec: ComponentSpec, cfg: MoVAConfig) -> nn.Module:
    """The component's module with meta parameters and real buffers (shapes, names, buffer values)."""
    with params_on_meta():
        return spec.build(cfg)


# ---- shard readers -----------------------------------------------------------------------------------------------
class _BinShard:
    """A torch pickle shard, memory-mapped: unpickling reads the small data.pkl, tensors stay on disk."""

    def __init__(self, path: Path):
        self.state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        if not isinstance(self.state, Mapping):
            raise ValueError(f"holds a {type(self.state).__name__}, not a state dict")

    def keys(self) -> Iterable[str]:
        return self.state.keys()

    def info(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        t = self.state[key]
        return tuple(t.shape), t.dtype

    def tensor(self, key: str) -> torch.Tensor:
        return self.state[key]


class _SafetensorsShard:
    def __init__(self, path: Path):
        from safetensors import safe_open

        self.file = safe_open(str(path), framework="pt", device="cpu")

    def keys(self) -> Iterable[str]:
        return self.file.keys()

    def info(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        s = self.file.get_slice(key)
        return tuple(s.get_shape()), _ST_DTYPES[s.get_dtype()]

    def tensor(self, key: str) -> torch.Tensor:
        return self.file.get_tensor(key)


def _open_shard(path: Path) -> _BinShard | _SafetensorsShard:
    """Open one shard lazily (the one place a shard file is opened; tests count the calls)."""
    return _SafetensorsShard(path) if path.suffix == ".safetensors" else _BinShard(path)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _owner_name(key: str) -> str:
    spec = owner_of(key)
    return spec.name if spec else "no component"


# ---- the checkpoint ------------------------------------------------------------------------------------------------
@dataclass
class Checkpoint:
    path: Path
    config: MoVAConfig
    format: str                    # "bin" or "safetensors"
    weights_file: str              # the index json, or the single weights file
    weight_map: dict[str, str]     # full key -> shard file name (relative to path)

    @classmethod
    def open(cls, path: str | Path, *, check_owners: bool = True) -> "Checkpoint":
        """Read config.json and the shard index (no tensor bytes); check every shard exists.

        With check_owners (default), a key no registered component owns is an error: every weight is accounted for.
        """
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"checkpoint directory {path} does not exist; pass the folder holding config.json "
                                  "and the weight shards")
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path / 'config.json'} not found; a MoVA checkpoint folder holds config.json "
                                  "next to its shards (re-download it from the model repo)")
        config = MoVAConfig.from_checkpoint(path)
        check_config(config, str(path / "config.json"))
        fmt, weights_file, weight_map = _read_weight_map(path)
        ckpt = cls(path=path, config=config, format=fmt, weights_file=weights_file, weight_map=weight_map)
        ckpt._check_shards_exist()
        if check_owners:
            ckpt.check_owners()
        return ckpt

    # ---- keys ------------------------------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self.weight_map)

    @property
    def shards(self) -> list[str]:
        return sorted(set(self.weight_map.values()))

    def shard_of(self, key: str) -> str:
        try:
            return self.weight_map[key]
        except KeyError:
            raise CheckpointError(f"key {key} ({_owner_name(key)}) is not in {self.path / self.weights_file}; "
                                  "check the key spelling or re-download the index") from None

    def component_keys(self, name: str) -> list[str]:
        """Full keys owned by a component (including its spec.unused_keys), in checkpoint order."""
        spec = get_spec(name)
        return [k for k in self.weight_map if spec.owns(k)]

    def unowned_keys(self) -> list[str]:
        specs = all_specs()
        return [k for k in self.weight_map if not any(s.owns(k) for s in specs)]

    def check_owners(self) -> None:
        """Every key has exactly one owning component (owner_of raises on a double claim)."""
        for key in self.weight_map:
            owner_of(key)
        unowned = self.unowned_keys()
        if unowned:
            raise CheckpointError(
                f"{len(unowned)} checkpoint key(s) belong to no component, e.g. {unowned[0]} in "
                f"{self.weight_map[unowned[0]]} ({self.path}); register a component whose prefix owns them, or list "
                "them in an owning spec's unused_keys if MoVA never uses them")

    @property
    def text_tokenizer_dir(self) -> Path:
        """Folder holding the BERT vocab: config.json's mm_projector_text_encoder, relative to the checkpoint."""
        name = self.config.text_encoder_path
        candidates = [] if not name else [self.path / name, Path(name)]
        for candidate in candidates:
            if candidate.is_dir():
                return candidate
        raise CheckpointError(
            f"BERT vocab folder for component text_encoder not found: config.json mm_projector_text_encoder={name!r} "
            f"is neither a folder under {self.path} nor an existing path; put bert-large-uncased's vocab.txt in "
            f"{self.path / 'text_encoder'} and set mm_projector_text_encoder to 'text_encoder'")

    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())

    # ---- tensors ---------------------------------------------------------------------------------------------------
    def tensor_info(self, keys: Iterable[str]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Shape and dtype per key, opening only the shards that hold them and reading no tensor bytes."""
        out: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for shard_name, shard_keys in self._by_shard(keys).items():
            shard = self._open(shard_name, shard_keys[0])
            for key in shard_keys:
                out[key] = self._info(shard, shard_name, key)
        return out

    def tensors(self, keys: Iterable[str], dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (key, tensor) one at a time, shard by shard (each shard opened once, memory-mapped).

        Each tensor is a private copy (floating tensors cast to `dtype` when given), so nothing keeps a shard open.
        """
        yield from self._read(keys, lambda key, info: (dtype if dtype is not None and info[1].is_floating_point
                                                       else info[1]))

    def load_state_dict(self, name: str, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """The component's tensors under their module names (prefix removed), checked against its architecture."""
        spec = get_spec(name)
        return self._component_state(spec, build_on_meta(spec, self.config).state_dict(), dtype)

    def build(self, name: str, dtype: torch.dtype = torch.float32) -> nn.Module:
        """Build a component from config.json and load its weights strictly; eval mode, floating tensors in dtype."""
        spec = get_spec(name)
        module = build_on_meta(spec, self.config)
        state = self._component_state(spec, module.state_dict(), dtype)
        module.load_state_dict(state, strict=True, assign=True)
        return module.to(dtype=dtype).eval()

    # ---- internals -------------------------------------------------------------------------------------------------
    def _component_state(self, spec: ComponentSpec, expected: Mapping[str, torch.Tensor],
                         dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Read one component's tensors after checking its key set; shapes are checked before any bytes are read."""
        rel_to_key = {}
        for key in self.component_keys(spec.name):
            rel = key[len(spec.prefix):]
            if rel not in expected and not spec.is_unused(rel):
                raise CheckpointError(
                    f"component {spec.name}: unexpected key {key} in {self.weight_map[key]} ({self.path}), the module "
                    f"built from config.json has no {rel!r}; check mova_export.scale/arch in config.json, or add the "
                    f"pattern to the {spec.name} spec's unused_keys if MoVA never uses it")
            if rel in expected:
                rel_to_key[rel] = key
        missing = [rel for rel in expected if rel not in rel_to_key]
        if missing:
            raise CheckpointError(
                f"component {spec.name}: key {spec.prefix}{missing[0]} is missing from {self.path / self.weights_file}"
                f" ({len(missing)} of {len(expected)} missing); the checkpoint is incomplete or was saved for another "
                "architecture: re-download it, or fix mova_export.scale/arch in config.json")
        key_to_rel = {key: rel for rel, key in rel_to_key.items()}

        def target(key: str, info: tuple[tuple[int, ...], torch.dtype]) -> torch.dtype:
            want = expected[key_to_rel[key]]
            if info[0] != tuple(want.shape):
                raise CheckpointError(
                    f"component {spec.name}: key {key} in {self.weight_map[key]} ({self.path}) has shape "
                    f"{list(info[0])}, the module built from config.json expects {list(want.shape)}; the checkpoint "
                    "does not match the architecture: fix mova_export.scale/arch or the config fields it derives from")
            return dtype if want.is_floating_point() else want.dtype

        return {key_to_rel[key]: t for key, t in self._read(key_to_rel, target)}

    def _read(self, keys: Iterable[str], target) -> Iterator[tuple[str, torch.Tensor]]:
        for shard_name, shard_keys in self._by_shard(keys).items():
            shard = self._open(shard_name, shard_keys[0])
            for key in shard_keys:
                want = target(key, self._info(shard, shard_name, key))
                try:
                    tensor = shard.tensor(key).to(dtype=want, copy=True)
                except Exception as exc:  # noqa: BLE001 - a short read of a mapped file surfaces as anything
                    raise self._corrupt(shard_name, key, exc) from None
                yield key, tensor
            del shard

    def _by_shard(self, keys: Iterable[str]) -> dict[str, list[str]]:
        grouped: dict[str, list[str]] = {}
        for key in keys:
            grouped.setdefault(self.shard_of(key), []).append(key)
        order = {name: i for i, name in enumerate(self.shards)}
        return dict(sorted(grouped.items(), key=lambda item: order[item[0]]))

    def _open(self, shard_name: str, first_key: str):
        try:
            return _open_shard(self.path / shard_name)
        except Exception as exc:  # noqa: BLE001 - torch/safetensors raise RuntimeError, OSError, pickle errors
            raise self._corrupt(shard_name, first_key, exc) from None

    def _info(self, shard, shard_name: str, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        try:
            return shard.info(key)
        except Exception as exc:  # noqa: BLE001 - KeyError for an absent key, anything for a corrupt header
            if key not in set(shard.keys()):
                raise CheckpointError(
                    f"key {key} ({_owner_name(key)}) is listed in {self.weights_file} under {shard_name}, but "
                    f"{self.path / shard_name} does not hold it; re-download that shard and the index") from None
            raise self._corrupt(shard_name, key, exc) from None

    def _corrupt(self, shard_name: str, key: str, exc: BaseException) -> CheckpointError:
        return CheckpointError(
            f"cannot read {self.path / shard_name} (needed for key {key} of component {_owner_name(key)}): "
            f"{_first_line(exc)}; the shard is truncated or corrupt, re-download it")

    def _check_shards_exist(self) -> None:
        for shard_name in self.shards:
            if not (self.path / shard_name).is_file():
                keys = [k for k, v in self.weight_map.items() if v == shard_name]
                raise CheckpointError(
                    f"{self.weights_file} maps {len(keys)} key(s) (e.g. {keys[0]} of component "
                    f"{_owner_name(keys[0])}) to {shard_name}, which is missing from {self.path}; download it")


def _read_weight_map(path: Path) -> tuple[str, str, dict[str, str]]:
    """(format, index or weights file name, key -> shard file) for the first layout found."""
    for fmt, index_name in INDEX_FILES.items():
        index = path / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError, IndexError, UnicodeDecodeError, RecursionError) as exc:
                raise CheckpointError(f"{index} is not a shard index ({_first_line(exc)}); re-download it (it maps "
                                      "each key to its shard under 'weight_map')") from None
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index} has an empty 'weight_map'; re-download the index")
            weight_map = {str(k): str(v) for k, v in weight_map.items()}
            _check_names(index, weight_map)
            return fmt, index_name, weight_map
    for fmt, file_name in SINGLE_FILES.items():
        if (path / file_name).is_file():
            try:
                keys = list(_open_shard(path / file_name).keys())
            except Exception as exc:  # noqa: BLE001
                raise CheckpointError(f"cannot read {path / file_name}: {_first_line(exc)}; the file is truncated "
                                      "or corrupt, re-download it") from None
            return fmt, file_name, {k: file_name for k in keys}
    shards = sorted(p.name for p in path.iterdir() if _SHARD_NAME.match(p.name))
    if shards:
        kind = "safetensors" if shards[0].endswith(".safetensors") else "bin"
        raise CheckpointError(f"{path} holds shards ({shards[0]}, ...) but no {INDEX_FILES[kind]}; download the "
                              "index json that maps keys to shards")
    raise CheckpointError(f"no weights in {path}: expected {INDEX_FILES['bin']} (+ shards), "
                          f"{INDEX_FILES['safetensors']} (+ shards), {SINGLE_FILES['bin']} or {SINGLE_FILES['safetensors']}")


def _check_names(index: Path, weight_map: dict[str, str]) -> None:
    """Keys and shard names are printable, and each shard is a file name in the checkpoint folder itself (an index
    is outside input: `../x` or `/etc/x` would make the loader open a file elsewhere)."""
    for key, shard in weight_map.items():
        bad = next((text for text in (key, shard) if any(ord(c) < 0x20 or c == "\x7f" for c in text)), None)
        if bad is not None:
            raise CheckpointError(f"{index} holds a name with control characters ({bad[:80]!r}); re-download the "
                                  "index")
        if shard in ("", ".", "..") or "/" in shard or "\\" in shard or len(shard.encode("utf-8", "replace")) > 255:
            raise CheckpointError(f"{index} maps key {key[:120]!r} to {shard[:120]!r}, which is not a file name in the "
                                  "checkpoint folder; re-download the index")


# ---- describe --------------------------------------------------------------------------------------------------------
def _summary(infos: Iterable[tuple[tuple[int, ...], torch.dtype]]) -> dict[str, Any]:
    params = tensors = nbytes = 0
    dtypes: dict[str, int] = {}
    for shape, dtype in infos:
        n = math.prod(shape)
        params += n
        tensors += 1
        nbytes += n * dtype.itemsize
        name = str(dtype).removeprefix("torch.")
        dtypes[name] = dtypes.get(name, 0) + 1
    return {"params": params, "tensors": tensors, "bytes": nbytes, "dtypes": dtypes}


def _totals(components: Mapping[str, Mapping[str, Any]]) -> dict[str, int]:
    return {field: sum(c[field] for c in components.values()) for field in ("params", "tensors", "bytes")}


def _config_fields(cfg: MoVAConfig) -> dict[str, Any]:
    return {"scale": cfg.scale, "fields": cfg.to_dict(), "defaulted": list(cfg.defaulted)}


def describe(path: str | Path) -> dict[str, Any]:
    """A checkpoint's figures from its index and tensor headers (no tensor bytes read).

    Per component: params (elements of its checkpoint tensors, buffers included), tensors, bytes, dtypes, shards
    and how many keys match its unused_keys. Also totals, unowned keys, disk size and the config with the fields
    that fell back to inferred defaults.
    """
    ckpt = Checkpoint.open(path, check_owners=False)
    info = ckpt.tensor_info(ckpt.keys())
    components: dict[str, dict[str, Any]] = {}
    for spec in all_specs():
        keys = ckpt.component_keys(spec.name)
        if not keys:
            continue
        components[spec.name] = {
            **_summary(info[k] for k in keys),
            "shards": sorted({ckpt.weight_map[k] for k in keys}),
            "unused_keys": sum(spec.is_unused(k[len(spec.prefix):]) for k in keys),
        }
    unowned = ckpt.unowned_keys()
    return {
        "path": str(ckpt.path), "format": ckpt.format, "weights_file": ckpt.weights_file, "shards": ckpt.shards,
        "disk_bytes": ckpt.disk_bytes(), "config": _config_fields(ckpt.config), "components": components,
        "missing_components": [s.name for s in all_specs() if s.name not in components],
        "unowned_keys": unowned, "unowned": _summary(info[k] for k in unowned),
        "totals": _totals(components),
    }


def describe_config(cfg: MoVAConfig, dtype: torch.dtype = torch.bfloat16) -> dict[str, Any]:
    """The same per-component figures for an architecture with no weights (meta-device builds), bytes at `dtype`.

    `buffer_params` is the part of `params` held in persistent buffers (RoPE tables, position ids).
    """
    components: dict[str, dict[str, Any]] = {}
    for spec in all_specs():
        try:
            module = build_on_meta(spec, cfg)
        except MoVAExportError:
            raise
        except Exception as exc:  # noqa: BLE001 - a component that cannot build is reported by name
            raise CheckpointError(f"component {spec.name} cannot be built from the {cfg.scale} config: "
                                  f"{_first_line(exc)}; fix its arch preset or the config") from None
        state = module.state_dict()
        param_names = {n for n, _ in module.named_parameters(remove_duplicate=False)}
        components[spec.name] = {
            **_summary((tuple(t.shape), dtype if t.is_floating_point() else t.dtype) for t in state.values()),
            "buffer_params": sum(t.numel() for n, t in state.items() if n not in param_names),
        }
    return {"config": _config_fields(cfg), "components": components, "totals": _totals(components)}
