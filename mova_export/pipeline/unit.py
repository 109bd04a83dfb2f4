"""The unit protocol every stage shares: a stage declares the settings it consumes and the units it reads; the unit's
key is a hash of exactly those (plus the stage's name and version), so a key cannot drift from behaviour. `run_unit`
finds a finished unit by that key or produces it (lock, disk check, atomic write, record): once, here, for every
stage.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Mapping, Protocol, TypeVar

import numpy as np

from ..bundle.files import tool_versions
from ..components import get_spec
from ..core.bert_inputs import BertTextTokenizer
from ..core.memory import release_freed_memory
from ..core.progress import Console
from ..core.spec import BYTES_PER_PRECISION
from .work import Unit, WorkFolder, digest, write_unit

if TYPE_CHECKING:  # pragma: no cover
    from ..core.facts import ModelFacts
    from ..export import CalibrationSet
    from ..source.checkpoint import Checkpoint

Item = TypeVar("Item", contravariant=True)


class Stage(Protocol[Item]):
    """One kind of unit. `settings` is everything the unit's output depends on besides the units it reads
    (`upstream`): a JSON-able value; the key is digest(name, version, settings, upstream)."""
    name: str
    version: int

    def unit_name(self, item: Item) -> str: ...

    def settings(self, ctx: "BuildContext", item: Item) -> Any: ...

    def upstream(self, ctx: "BuildContext", item: Item) -> Mapping[str, str]: ...

    def bytes_needed(self, ctx: "BuildContext", item: Item) -> int: ...

    def produce(self, ctx: "BuildContext", item: Item, tmp: Path) -> dict[str, Any]: ...


@dataclass
class StageRecord:
    stage: str
    name: str
    key: str
    status: str                  # computed | reused (found finished in the work folder)
    seconds: float = 0.0
    detail: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"stage": self.stage, "name": self.name, "key": self.key, "status": self.status,
                "seconds": round(self.seconds, 2), **self.detail}


@dataclass(frozen=True)
class UnitOutput(Generic[Item]):
    """A finished unit: its folder, its unit.json and its key."""
    path: Path
    data: dict[str, Any]
    key: str
    reused: bool


@dataclass
class BuildContext:
    checkpoint: "Checkpoint"
    source: dict[str, Any]       # bundle.checkpoint_fingerprint of the checkpoint (hashed once per build)
    calibration: "CalibrationSet"
    facts: "ModelFacts"
    work: WorkFolder
    console: Console
    reuse: bool = True
    full_sweep: bool = True
    random_samples: int = 1
    records: list[StageRecord] = field(default_factory=list)
    _text_tokenizer: Any = None

    @property
    def fingerprint(self) -> str:
        return self.source["digest"]

    @property
    def text_tokenizer(self) -> Any:
        if self._text_tokenizer is None:

            self._text_tokenizer = BertTextTokenizer.from_folder(self.checkpoint.text_tokenizer_dir)
        return self._text_tokenizer

    def find(self, stage: str, name: str, key: str) -> tuple[Unit, bool]:
        """The unit and whether it is finished and may be reused."""
        unit = self.work.unit(stage, name, key)
        if not (self.reuse and unit.done):
            return unit, False
        changed = unit.changed_files()
        if changed:
            self.console.line(f"{stage} {name}: the work folder's unit was modified since it finished "
                              f"({', '.join(changed[:3])}{' ...' if len(changed) > 3 else ''}); producing it again")
            return unit, False
        return unit, True

    def record(self, stage: str, name: str, key: str, reused: bool, start: float, **detail: Any) -> StageRecord:
        rec = StageRecord(stage, name, key, "reused" if reused else "computed", time.perf_counter() - start, detail)
        self.records.append(rec)
        if reused:
            self.console.line(f"{stage} {name}: reused from the work folder ({key})")
        return rec

    def component_bytes(self, name: str, precision: str = "fp32") -> int:

        params = get_spec(name).memory.params if self.checkpoint.config.scale == "full" else 0
        if not params:  # tiny checkpoints: the tensors' own size
            info = self.checkpoint.tensor_info(self.checkpoint.component_keys(name))
            params = sum(int(np.prod(shape)) for shape, _ in info.values())
        return params * BYTES_PER_PRECISION[precision]


def library_versions(*distributions: str) -> dict[str, str]:
    """The versions of the libraries a unit's output depends on: part of its settings, so a new version of one makes
    a new unit."""
    versions = tool_versions()
    return {d: versions.get(d, "absent") for d in distributions}


def unit_key(stage: Stage, ctx: BuildContext, item: Any) -> str:
    """digest(stage name, version, settings, upstream keys): exactly what the unit's output depends on."""
    return digest(stage.name, stage.version, stage.settings(ctx, item), dict(stage.upstream(ctx, item)))


def run_unit(ctx: BuildContext, stage: Stage, item: Any, **detail: Any) -> UnitOutput:
    """Find the unit of `item` by its key, or produce it (after the free-disk check), and record which."""
    start = time.perf_counter()
    name = stage.unit_name(item)
    key = unit_key(stage, ctx, item)
    unit, reused = ctx.find(stage.name, name, key)
    if not reused:
        with unit.lock(ctx.console.line):       # one producer per unit across builds on this work folder
            reused = ctx.reuse and unit.done and not unit.changed_files()   # another build finished it meanwhile
            if not reused:
                ctx.work.require_free(stage.bytes_needed(ctx, item), f"{stage.name} {name}")
                with unit.produce() as tmp:
                    data = stage.produce(ctx, item, tmp)
                    write_unit(tmp, data, seconds=time.perf_counter() - start)
                release_freed_memory()              # the next unit starts from what is live, not the last peak
    if reused:
        data = unit.read()
    produced = unit.produced()
    if "seconds" in produced:                       # what producing it cost, in this build or an earlier one
        detail = {**detail, "computed_s": produced["seconds"], "computed_utc": produced.get("finished_utc")}
    ctx.record(stage.name, name, key, reused, start, **detail)
    return UnitOutput(unit.path, data, key, reused)
