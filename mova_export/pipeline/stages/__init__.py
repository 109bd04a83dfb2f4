"""The build's stages, one module each, every one a `unit.Stage` run by `unit.run_unit` (compile keys its engines
with compile.engine_key): features -> export -> quantize, gguf, compile."""
from .compile import compile_stage
from .export import Exported, run_exports
from .features import features
from .gguf import gguf
from .quantize import quantize

__all__ = ["Exported", "compile_stage", "features", "gguf", "quantize", "run_exports"]
