"""gguf: the LLM as GGUF of one quant type (written tensor by tensor, quantized by llama.cpp)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ...gguf.convert import convert_checkpoint_to_gguf, estimate_gguf_bytes
from ..unit import BuildContext, library_versions, run_unit


class GGUFStage:
    name = "gguf"
    version = 3             # 3: q8_0 written directly (gguf-py), not quantized by llama.cpp from a bf16 file

    def unit_name(self, qtype: str) -> str:
        return qtype

    def settings(self, ctx: BuildContext, qtype: str) -> dict[str, Any]:
        return {"qtype": qtype, "checkpoint": ctx.fingerprint, "tools": library_versions("gguf", "llama-cpp-python")}

    def upstream(self, ctx: BuildContext, qtype: str) -> dict[str, str]:
        return {}

    def bytes_needed(self, ctx: BuildContext, qtype: str) -> int:
        return estimate_gguf_bytes(ctx.checkpoint, qtype)

    def produce(self, ctx: BuildContext, qtype: str, tmp: Path) -> dict[str, Any]:
        start = time.perf_counter()
        name = f"model.{qtype}.gguf"
        convert_checkpoint_to_gguf(ctx.checkpoint.path, tmp / name, qtype, console=ctx.console)
        llm = ctx.checkpoint.config.llm
        return {"gguf": name, "qtype": qtype, "n_embd": int(llm["hidden_size"]), "n_vocab": int(llm["vocab_size"]),
                "convert_s": round(time.perf_counter() - start, 2)}


def gguf(ctx: BuildContext, qtype: str) -> tuple[Path, dict[str, Any]]:
    """(the GGUF file in its unit, {qtype, n_embd, n_vocab, convert_s})."""
    unit = run_unit(ctx, GGUFStage(), qtype)
    return unit.path / unit.data["gguf"], unit.data
