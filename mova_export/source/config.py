"""MoVA configuration: what config.json says, plus the visible defaults for what the reference marks inferred.

A real MoVA checkpoint's config.json is a LlamaConfig with the LLaVA/MoVA multimodal fields on top. It does not
describe the vision towers (upstream builds them from hub paths), so each component module carries its
architecture presets ("full" = the real MoVA-8B towers, "tiny" = the same structure at toy widths).
Synthetic checkpoints record their scale and arch overrides under the `mova_export` key of config.json.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

from ..core.errors import ConfigError

# Values the reference marks [inferred]: used when config.json lacks the field, always overridable,
# and listed by `mova-export inspect` so nobody mistakes them for values read from the checkpoint.
INFERRED_DEFAULTS: dict[str, Any] = {
    "mm_vision_select_layer": -2,       # LLaVA convention (penultimate layer)
    "pix2struct_max_patches": 2025,     # 45x45, the only count whose sqrt-reshape works
    "image_aspect_ratio": "pad",        # LLaVA default: expand2square before resizing
    "topk_experts": 3,                  # the adapter reads topk_experts; older configs may say `topk`
    "tokenizer_adds_bos": True,         # HF Llama-3 tokenizer adds BOS, so tokenizer_image_token keeps two
}

# Llama fields read from the top level of config.json (MovaConfig subclasses LlamaConfig).
LLM_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "rope_theta", "rms_norm_eps", "max_position_embeddings", "bos_token_id",
    "eos_token_id", "tie_word_embeddings", "rope_scaling", "head_dim", "hidden_act",
)

# config.json is outside input: the type of every field read from it (sizes are positive integers)
_POSITIVE = ("mm_hidden_size", "image_feat_size", "num_projector_layers", "num_routing_tokens", "pix2struct_max_patches",
             "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "max_position_embeddings", "head_dim")
_TYPES: dict[str, tuple[type, ...]] = {
    "mm_vision_select_layer": (int,), "topk_experts": (int,), "topk": (int,), "mm_vision_select_feature": (str,),
    "image_aspect_ratio": (str,), "mm_projector_type": (str,), "hidden_act": (str,), "mm_use_im_start_end": (bool,),
    "tokenizer_adds_bos": (bool,), "tie_word_embeddings": (bool,), "rope_theta": (int, float),
    "rms_norm_eps": (int, float), "rope_scaling": (dict, type(None)), "mm_projector_text_encoder": (str, type(None)),
    "bos_token_id": (int, type(None)), "eos_token_id": (int, list, type(None)), "mova_export": (dict,),
    "expert_channels": (list,)}


def _check_types(raw: Mapping[str, Any], source: str) -> None:
    """ConfigError naming the first field of config.json whose value has the wrong type (or is not a positive size)."""
    for name, value in raw.items():
        kinds = (int,) if name in _POSITIVE else _TYPES.get(name)
        if kinds is None:
            continue
        wrong = not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)
        if not wrong and name in _POSITIVE:
            wrong = value < 1
        if not wrong and name == "expert_channels":
            wrong = not value or not all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in value)
        if wrong:
            want = ("a positive integer" if name in _POSITIVE else "a list of positive channel counts"
                    if name == "expert_channels" else " or ".join(k.__name__ for k in kinds))
            raise ConfigError(f"{source}: {name}={repr(value)[:60]} must be {want}; fix config.json or re-download it")
    ours = raw.get("mova_export", {})
    if not isinstance(ours.get("scale", "full"), str) or not isinstance(ours.get("arch", {}), dict) or not all(
            isinstance(v, dict) for v in ours.get("arch", {}).values()):
        raise ConfigError(f"{source}: mova_export must be {{scale: str, arch: {{component: {{field: value}}}}}}; "
                          "rewrite the checkpoint with `mova-export synth`")


FULL_LLM: dict[str, Any] = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, rms_norm_eps=1e-5,
    max_position_embeddings=8192, bos_token_id=128000, eos_token_id=128001, tie_word_embeddings=False,
    hidden_act="silu",
)


@dataclass(frozen=True)
class MoVAConfig:
    llm: Mapping[str, Any]                 # LlamaConfig kwargs
    mm_hidden_size: int = 1024             # base encoder (CLIP) width
    image_feat_size: int = 48              # the common expert grid is image_feat_size^2 tokens
    expert_channels: tuple[int, ...] = (1536, 512, 256, 1536, 768, 768, 256)
    num_projector_layers: int = 3
    num_routing_tokens: int = 144
    mm_vision_select_feature: str = "patch"
    mm_use_im_start_end: bool = False
    mm_projector_type: str = "mov_adapter"
    text_encoder_path: str | None = None   # mm_projector_text_encoder (BERT vocab lives there)
    mm_vision_select_layer: int = INFERRED_DEFAULTS["mm_vision_select_layer"]
    pix2struct_max_patches: int = INFERRED_DEFAULTS["pix2struct_max_patches"]
    image_aspect_ratio: str = INFERRED_DEFAULTS["image_aspect_ratio"]
    topk_experts: int = INFERRED_DEFAULTS["topk_experts"]
    tokenizer_adds_bos: bool = INFERRED_DEFAULTS["tokenizer_adds_bos"]
    scale: str = "full"                    # which arch presets apply: "full" (real MoVA-8B) or "tiny"
    arch_overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    defaulted: tuple[str, ...] = ()        # inferred fields that config.json did not set

    # ---- derived -------------------------------------------------------------------------------------------
    @property
    def llm_hidden_size(self) -> int:
        return int(self.llm["hidden_size"])

    @property
    def grid_tokens(self) -> int:
        return self.image_feat_size * self.image_feat_size

    @property
    def routing_grid(self) -> int:
        side = int(round(self.num_routing_tokens ** 0.5))
        if side * side != self.num_routing_tokens:
            raise ConfigError(f"num_routing_tokens={self.num_routing_tokens} is not a square; set it to e.g. 144")
        return side

    @property
    def adapter_grid(self) -> int:
        """Side of the adapter output grid (the RegStage avg-pool halves the 48x48 grid to 24x24)."""
        return self.image_feat_size // 2

    def with_overrides(self, **values: Any) -> "MoVAConfig":
        known = {f.name for f in fields(self)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown config override(s) {unknown}; known fields: {sorted(known)}")
        defaulted = tuple(name for name in self.defaulted if name not in values)
        return replace(self, defaulted=defaulted, **values)

    # ---- (de)serialisation ---------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str = "config.json") -> "MoVAConfig":
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{source} holds a JSON {type(raw).__name__}, not an object; re-download config.json")
        _check_types(raw, source)
        if raw.get("mm_projector_type", "mov_adapter") != "mov_adapter":
            raise ConfigError(f"{source}: mm_projector_type={raw['mm_projector_type']!r}; mova-export only "
                              "handles MoVA checkpoints (mm_projector_type 'mov_adapter')")
        if "hidden_size" not in raw:
            raise ConfigError(f"{source}: missing 'hidden_size'; is this a MoVA (mova_llama) config.json?")
        llm = {k: raw[k] for k in LLM_FIELDS if k in raw}
        llm = {**{k: v for k, v in FULL_LLM.items() if k not in llm}, **llm}
        values: dict[str, Any] = {}
        defaulted = []
        for name, default in INFERRED_DEFAULTS.items():
            if name in raw:
                values[name] = raw[name]
            elif name == "topk_experts" and "topk" in raw:  # initialize_vision_modules writes `topk`
                values[name] = raw["topk"]
            else:
                values[name] = default
                defaulted.append(name)
        for name in ("mm_hidden_size", "image_feat_size", "num_projector_layers", "num_routing_tokens",
                     "mm_vision_select_feature", "mm_use_im_start_end", "mm_projector_type"):
            if name in raw:
                values[name] = raw[name]
        if "expert_channels" in raw:
            values["expert_channels"] = tuple(int(c) for c in raw["expert_channels"])
        if "mm_projector_text_encoder" in raw:
            values["text_encoder_path"] = raw["mm_projector_text_encoder"]
        ours = raw.get("mova_export", {})
        cfg = cls(llm=llm, scale=ours.get("scale", "full"), arch_overrides=ours.get("arch", {}),
                  defaulted=tuple(defaulted), **values)
        cfg.validate(source)
        return cfg

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | Path) -> "MoVAConfig":
        path = Path(checkpoint_dir) / "config.json"
        if not Path(checkpoint_dir).is_dir():
            raise ConfigError(f"checkpoint directory {checkpoint_dir} does not exist; pass the folder holding "
                              "config.json and the shards")
        if not path.is_file():
            raise ConfigError(f"{path} not found; a MoVA checkpoint folder holds config.json next to its shards")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}); re-download it") from None
        except (UnicodeDecodeError, RecursionError) as exc:
            raise ConfigError(f"{path} is not valid JSON ({type(exc).__name__}); re-download it") from None
        return cls.from_dict(raw, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """config.json content in the upstream layout (Llama fields at top level) plus our `mova_export` key."""
        out: dict[str, Any] = {"model_type": "mova_llama", "architectures": ["MovaLlamaForCausalLM"], **self.llm}
        out.update(
            mm_hidden_size=self.mm_hidden_size, image_feat_size=self.image_feat_size,
            expert_channels=list(self.expert_channels), num_projector_layers=self.num_projector_layers,
            num_routing_tokens=self.num_routing_tokens, mm_vision_select_feature=self.mm_vision_select_feature,
            mm_use_im_start_end=self.mm_use_im_start_end, mm_use_im_patch_token=False,
            mm_projector_type=self.mm_projector_type, mm_projector_text_encoder=self.text_encoder_path,
        )
        for name in INFERRED_DEFAULTS:
            out[name] = getattr(self, name)
        out["mova_export"] = {"scale": self.scale, "arch": {k: dict(v) for k, v in self.arch_overrides.items()}}
        return out

    def validate(self, source: str = "config") -> None:
        """What the config alone must satisfy; components.check_config adds what it must agree on with the registry
        (one expert_channels entry per registered expert)."""
        experts = len(self.expert_channels)
        if not 0 <= self.topk_experts <= experts:
            raise ConfigError(f"{source}: topk_experts={self.topk_experts} must be within 0..{experts}")
        if self.image_feat_size % 2:
            raise ConfigError(f"{source}: image_feat_size={self.image_feat_size} must be even (pooled to half)")
        if self.mm_vision_select_feature != "patch":
            raise ConfigError(f"{source}: mm_vision_select_feature={self.mm_vision_select_feature!r}; only "
                              "'patch' (drop CLS) is supported, as MoVA uses")
        if self.scale not in ("full", "tiny"):
            raise ConfigError(f"{source}: mova_export.scale={self.scale!r}; use 'full' or 'tiny'")
        _ = self.routing_grid  # raises on a non-square count
