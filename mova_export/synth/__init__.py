"""Write a random MoVA checkpoint in the official layout: config.json, generation_config.json, sharded weights
with their index json, the Llama-3 tokenizer at the root and the BERT vocab in `text_encoder/`.

Every registered component is built with its parameters on the meta device (`params_on_meta`), which gives the
key names, shapes and the real values of its buffers. Parameters are then drawn one tensor at a time from a
generator seeded by (seed, key), straight into the checkpoint dtype, and written shard by shard. So the same
seed gives the same bytes, a key's values do not depend on which other components exist, and the full-scale
checkpoint (~23 GB) is written holding one shard plus one tensor in RAM.

Values are random but sane: N(0, 0.02) for weights and biases (nothing left at zero, so tests see every path),
1 + N(0, 0.02) for the weights of normalisation layers; buffers (RoPE tables, position ids) keep their values.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import torch

from ..bundle.staging import staged_dir
from ..components import arch, check_config, component_names, expert_specs, get_spec
from ..core.errors import CheckpointError, ComponentError
from ..core.progress import Console
from ..source.checkpoint import INDEX_FILES, SINGLE_FILES, build_on_meta
from ..source.config import FULL_LLM, MoVAConfig
from .tokenizers import write_bert_vocab, write_llama3_tokenizer
from .trained import trained_llm_tensors

DEFAULT_SHARD_SIZE = {"tiny": 8 * 2**20, "full": 5 * 10**9}  # bytes; full matches save_pretrained's "5GB"
# scale -> (model scale, trained): tiny-trained is the tiny MoVA with the LLM of synth/trained.py (routes by kind)
SCALES = {"tiny": ("tiny", False), "tiny-trained": ("tiny", True), "full": ("full", False)}
DEMO_SCALE = "tiny-trained"   # what `mova-export demo` writes
TEXT_ENCODER_DIR = "text_encoder"                            # mm_projector_text_encoder, relative to the checkpoint
WEIGHT_STD = 0.02


def synthetic_config(scale: str = "tiny") -> MoVAConfig:
    """The MoVAConfig a synthetic checkpoint of this scale records.

    LLM fields come from the llm module (`TINY_LLM`) or config.FULL_LLM; mm_hidden_size and expert_channels from the
    registered towers' out_channels(arch), so the adapter is built for the experts the registry holds.
    """
    if scale not in SCALES:
        raise CheckpointError(f"unknown synthetic scale {scale!r}; use one of {', '.join(SCALES)}")
    scale = SCALES[scale][0]
    cfg = MoVAConfig(llm=dict(_llm_fields(scale)), scale=scale, text_encoder_path=TEXT_ENCODER_DIR)
    channels = [int(spec.out_channels(arch(cfg, spec.name))) for spec in expert_specs()]  # routing order
    hidden = cfg.mm_hidden_size
    if "base" in component_names() and get_spec("base").out_channels is not None:
        hidden = int(get_spec("base").out_channels(arch(cfg, "base")))
    cfg = replace(cfg, expert_channels=tuple(channels), mm_hidden_size=hidden)
    cfg.validate("synthetic config")
    check_config(cfg, "synthetic config")
    return cfg


def _llm_fields(scale: str) -> dict[str, Any]:
    if scale == "full":
        return dict(FULL_LLM)
    try:
        from ..components.llm import TINY_LLM
    except ImportError:
        raise ComponentError("the llm component (mova_export/components/llm.py, TINY_LLM) is not available; a tiny "
                             "synthetic checkpoint needs it for its LLM fields") from None
    return dict(TINY_LLM)


# ---- plan: every tensor's key, shape, dtype and how to make it -------------------------------------------------------
@dataclass(frozen=True)
class _Entry:
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    norm_weight: bool = False             # parameter: 1 + N(0, std) instead of N(0, std)
    buffer: torch.Tensor | None = None    # buffer: its real value

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * self.dtype.itemsize


def plan_tensors(cfg: MoVAConfig, components: Sequence[str] | None = None,
                 dtype: torch.dtype = torch.bfloat16) -> list[_Entry]:
    """Every checkpoint tensor in write order (component by component, module order), built on the meta device."""
    names = component_names() if components is None else list(components)
    entries: list[_Entry] = []
    for name in names:
        spec = get_spec(name)
        module = build_on_meta(spec, cfg)
        params = {n for n, _ in module.named_parameters(remove_duplicate=False)}
        norm_weights = {f"{m}.weight" if m else "weight" for m, sub in module.named_modules(remove_duplicate=False)
                        if "norm" in type(sub).__name__.lower()}
        for rel, t in module.state_dict(keep_vars=True).items():
            key = spec.prefix + rel
            want = dtype if t.is_floating_point() else t.dtype
            if rel in params:
                entries.append(_Entry(key, tuple(t.shape), want, norm_weight=rel in norm_weights))
            elif t.device.type == "meta":
                raise ComponentError(f"component {name}: buffer {rel} is built on the meta device, so its value is "
                                     "unknown; build buffers on the CPU (only parameters may be meta)")
            else:
                entries.append(_Entry(key, tuple(t.shape), want, buffer=t.detach().to(want, copy=True)))
        del module
    return entries


def _seed_of(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little") & (2**63 - 1)


def make_tensor(entry: _Entry, seed: int, trained: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """The tensor for one plan entry: deterministic in (seed, key), independent of every other tensor; a trained
    tensor (tiny-trained's LLM) when one is given for its key."""
    if entry.buffer is not None:
        return entry.buffer
    if trained and entry.key in trained:
        return trained[entry.key].to(entry.dtype)
    gen = torch.Generator().manual_seed(_seed_of(seed, entry.key))
    t = torch.empty(entry.shape, dtype=entry.dtype).normal_(0.0, WEIGHT_STD, generator=gen)
    return t.add_(1.0) if entry.norm_weight else t


def _shard_plan(entries: list[_Entry], shard_size: int) -> list[list[_Entry]]:
    """Greedy split in order, as save_pretrained does: a new shard when the next tensor would overflow this one."""
    shards: list[list[_Entry]] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + entry.nbytes > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.nbytes
    return shards


def _shard_names(fmt: str, count: int) -> list[str]:
    if count == 1:
        return [SINGLE_FILES[fmt]]
    stem, ext = ("pytorch_model", "bin") if fmt == "bin" else ("model", "safetensors")
    return [f"{stem}-{i:05d}-of-{count:05d}.{ext}" for i in range(1, count + 1)]


def _save_shard(tensors: dict[str, torch.Tensor], path: Path, fmt: str) -> None:
    if fmt == "bin":
        torch.save(tensors, path)
    else:
        from safetensors.torch import save_file

        save_file(tensors, str(path), metadata={"format": "pt"})


# ---- the writer ---------------------------------------------------------------------------------------------------
def write_synthetic_checkpoint(out_dir: str | Path, scale: str = "tiny", seed: int = 0, fmt: str = "bin",  # noqa: PLR0913 (an option each)
                               dtype: torch.dtype = torch.bfloat16, shard_size: int | None = None,
                               console: Console | None = None, overwrite: bool = False,
                               components: Sequence[str] | None = None, config: MoVAConfig | None = None) -> Path:
    """Write a random MoVA checkpoint to out_dir and return its path.

    scale: "tiny" (real structure, toy widths, tens of MB), "tiny-trained" (tiny, with the LLM synth/trained.py
    trained to route and answer by question kind) or "full" (MoVA-8B shapes, ~23 GB at bf16).
    fmt: "bin" (sharded torch pickles, as released) or "safetensors" (note: safetensors serialises a shard in
    memory, so peak RAM is about twice shard_size). shard_size defaults to 8 MiB (tiny) or 5 GB (full); a
    checkpoint that fits one shard is a single pytorch_model.bin / model.safetensors. components: a subset of the
    registered components (default: all). config: write this config instead of synthetic_config(scale) (its
    mm_projector_text_encoder becomes "text_encoder", where the BERT vocab is written). The checkpoint is written to a temporary folder beside out_dir and
    renamed into place at the end, so out_dir never holds a half-written checkpoint.
    """
    out_dir = Path(out_dir)
    if fmt not in INDEX_FILES:
        raise CheckpointError(f"unknown checkpoint format {fmt!r}; use 'bin' or 'safetensors'")
    _check_target(out_dir, overwrite)
    cfg = synthetic_config(scale) if config is None else replace(config, text_encoder_path=TEXT_ENCODER_DIR)
    entries = plan_tensors(cfg, components, dtype)
    trained = _trained_tensors(entries) if config is None and SCALES[scale][1] else None
    shards = _shard_plan(entries, shard_size or DEFAULT_SHARD_SIZE[cfg.scale])
    names = _shard_names(fmt, len(shards))
    total = sum(e.nbytes for e in entries)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _check_disk(out_dir.parent, total)

    console = console or Console()
    with staged_dir(out_dir, overwrite=True) as tmp:
        _write_metadata(tmp, cfg, dtype)
        label = scale if config is None else cfg.scale
        title = f"synth {label} checkpoint ({total / 2**20:,.1f} MiB in {len(names)} shard(s))"
        with console.task(title, total=2 * len(names)) as steps:
            for name, shard in zip(names, shards):
                tensors = {entry.key: make_tensor(entry, seed, trained) for entry in shard}
                steps.advance(f"generated {name}")
                _save_shard(tensors, tmp / name, fmt)
                steps.advance(f"wrote {name}")
                del tensors
        if len(names) > 1:
            index = {"metadata": {"total_size": total},
                     "weight_map": {e.key: n for n, shard in zip(names, shards) for e in shard}}
            (tmp / INDEX_FILES[fmt]).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return out_dir


def _trained_tensors(entries: list[_Entry]) -> dict[str, torch.Tensor]:
    """The shipped trained LLM, checked against the plan: every LLM parameter key there, same shapes (else the tiny
    LLM's config moved away from the one it was trained for)."""

    trained = trained_llm_tensors()
    llm = get_spec("llm")
    shapes = {e.key: e.shape for e in entries if e.buffer is None}
    wrong = [k for k, t in trained.items() if k in shapes and shapes[k] != tuple(t.shape)]
    wrong += [k for k in shapes if llm.owns(k) and k not in trained]
    if wrong:
        raise CheckpointError(f"the tiny trained LLM weights do not fit the tiny MoVA config ({wrong[0]} and "
                              f"{len(wrong) - 1} more); regenerate them with `python -m mova_export.synth.trained`")
    return trained


def _write_metadata(root: Path, cfg: MoVAConfig, dtype: torch.dtype) -> None:
    config = {**cfg.to_dict(), "torch_dtype": str(dtype).removeprefix("torch.")}
    (root / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"bos_token_id": cfg.llm["bos_token_id"], "eos_token_id": cfg.llm["eos_token_id"]}
    (root / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")

    write_llama3_tokenizer(root, vocab_size=int(cfg.llm["vocab_size"]))
    write_bert_vocab(root / TEXT_ENCODER_DIR, **_bert_vocab_args(cfg))


def _bert_vocab_args(cfg: MoVAConfig) -> dict[str, Any]:
    if "text_encoder" in component_names():
        hp = arch(cfg, "text_encoder")
        if "vocab_size" in hp:
            return {"vocab_size": int(hp["vocab_size"])}
    return {}


def _check_target(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"{out_dir} exists and is not a folder; choose another output path")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise CheckpointError(f"{out_dir} exists and is not empty; choose another output folder or pass "
                              "overwrite=True (CLI: --overwrite) to replace it")


def _check_disk(parent: Path, total: int) -> None:
    free = shutil.disk_usage(parent).free
    need = int(total * 1.01) + 64 * 2**20
    if free < need:
        raise CheckpointError(f"not enough disk space in {parent}: the checkpoint needs {need / 1e9:.1f} GB, "
                              f"{free / 1e9:.1f} GB are free; free some space or write elsewhere")
