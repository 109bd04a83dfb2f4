"""What a build is asked to do, in one frozen object: the CLI (and every other entry point) fills one and hands it
to pipeline.build / export_bundle instead of a dozen keyword arguments."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import BuildError
from ..core.qtypes import QTYPES
from ..core.spec import PRECISIONS


@dataclass(frozen=True)
class BuildRequest:
    checkpoint: Path
    out: Path
    target: str | Path | None = None            # a recipe name, alias or YAML path; None: export only (no recipe)
    calib: Path | None = None                   # calibration folder (None: the built-in photos)
    components: tuple[str, ...] | None = None   # graph components to build (None: all)
    work_dir: Path | None = None                # None: ~/.cache/mova-export/work
    reuse: bool = True                          # take finished units from the work folder
    compile: bool = True                        # build TensorRT engines where this machine can
    allow_over_budget: bool = False             # write a bundle the memory plan refuses
    also_precisions: tuple[str, ...] = ()       # ship these graph precisions too (parity benchmarks)
    also_llm: tuple[str, ...] = ()              # ship the LLM as these GGUF types too
    export_precisions: tuple[str, ...] = ("fp32",)   # export only: the precisions to ship
    overwrite: bool = False                     # export only: replace a non-empty --out
    full_sweep: bool | None = None              # the adapter's parity over every mask (None: at tiny scale)
    quiet: bool = False
    sign_key: Path | None = None                # sign the finished bundle with this EC private key (PEM)
    sign_password: bytes | None = field(default=None, repr=False)   # the key's password, if it is encrypted

    def __post_init__(self) -> None:
        object.__setattr__(self, "checkpoint", Path(self.checkpoint))
        object.__setattr__(self, "out", Path(self.out))
        for name in ("also_precisions", "also_llm", "export_precisions"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.components is not None:
            object.__setattr__(self, "components", tuple(self.components))
        unknown = sorted(set(self.also_precisions) - set(PRECISIONS))
        if unknown:
            raise BuildError(f"unknown precision(s) {unknown} in --also-precision; use {', '.join(PRECISIONS)}")
        bad = sorted(set(self.also_llm) - set(QTYPES))
        if bad:
            raise BuildError(f"unknown LLM quant type(s) {bad} in --also-llm; use {', '.join(QTYPES)}")
        wrong = sorted(set(self.export_precisions) - {"fp32", "fp16"})
        if wrong or not self.export_precisions:
            raise BuildError(f"unknown export precision(s) {wrong or list(self.export_precisions)}; use fp32 and/or "
                             "fp16 (int8/fp8 come from `mova-export build` with a recipe)")
