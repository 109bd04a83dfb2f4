"""ModelFacts: what running MoVA needs to know besides the weights, in one serialisable object (pure Python).

The two-pass orchestration (runtime/two_pass.py) reads only these facts, on both sides: the build side computes
them from config.json and the component registry (`components.facts_from_config`), a bundle carries them in its manifest
(`ModelFacts.from_json`), so the device runtime needs neither the registry nor torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from .bert_inputs import TEXT_BUCKETS
from .errors import RuntimeInputError
from .image_inputs import ImageInput
from .prompts import MAX_ROUTING_TOKENS, parse_routing, routed_letters


@dataclass(frozen=True)
class TowerFacts:
    """A vision graph's inputs: its component, its routing letter (None for the base) and the preprocessed image
    inputs it reads, in the order of the graph's inputs."""
    component: str
    letter: str | None
    image_inputs: tuple[str, ...]       # ImageInput kinds

    def to_json(self) -> dict[str, Any]:
        return {"component": self.component, "letter": self.letter, "image_inputs": list(self.image_inputs)}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> "TowerFacts":
        return cls(str(raw["component"]), raw.get("letter"), tuple(raw["image_inputs"]))


@dataclass(frozen=True)
class ModelFacts:
    base: TowerFacts
    experts: tuple[TowerFacts, ...]            # routing order: index i = routing_weights[i]
    image_inputs: Mapping[str, ImageInput]     # kind -> preprocessing row
    image_feat_size: int
    image_aspect_ratio: str
    pix2struct_max_patches: int
    topk_experts: int
    num_routing_tokens: int
    mm_use_im_start_end: bool
    routing_prompt: str
    text_buckets: tuple[int, ...] = TEXT_BUCKETS
    max_routing_tokens: int = MAX_ROUTING_TOKENS

    @property
    def letters(self) -> tuple[str, ...]:
        return tuple(str(e.letter) for e in self.experts)

    def parse_routing(self, response: str) -> list[int]:
        return parse_routing(response, self.letters)

    def routed(self, mask: Sequence[int]) -> list[str]:
        return routed_letters(mask, self.letters)

    def mask_of(self, letters: Sequence[str]) -> list[int]:
        """The routing mask of expert letters ("a" and " A " accepted); RuntimeInputError for an unknown letter."""
        wanted = [str(e).strip().upper() for e in letters]
        bad = [e for e in wanted if e not in self.letters]
        if bad:
            raise RuntimeInputError(f"unknown expert letter(s) {bad}; use {', '.join(self.letters)}")
        return [1 if letter in wanted else 0 for letter in self.letters]

    def expert(self, letter: str) -> TowerFacts:
        return self.experts[self.letters.index(letter)]

    def to_json(self) -> dict[str, Any]:
        return {"base": self.base.to_json(), "experts": [e.to_json() for e in self.experts],
                "image_inputs": {k: row.to_json() for k, row in self.image_inputs.items()},
                "image_feat_size": self.image_feat_size, "image_aspect_ratio": self.image_aspect_ratio,
                "pix2struct_max_patches": self.pix2struct_max_patches, "topk_experts": self.topk_experts,
                "num_routing_tokens": self.num_routing_tokens, "mm_use_im_start_end": self.mm_use_im_start_end,
                "routing_prompt": self.routing_prompt, "text_buckets": list(self.text_buckets),
                "max_routing_tokens": self.max_routing_tokens}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> "ModelFacts":
        return cls(TowerFacts.from_json(raw["base"]), tuple(TowerFacts.from_json(e) for e in raw["experts"]),
                   {k: ImageInput.from_json(v) for k, v in raw["image_inputs"].items()}, int(raw["image_feat_size"]),
                   str(raw["image_aspect_ratio"]), int(raw["pix2struct_max_patches"]), int(raw["topk_experts"]),
                   int(raw["num_routing_tokens"]), bool(raw["mm_use_im_start_end"]), str(raw["routing_prompt"]),
                   tuple(int(b) for b in raw["text_buckets"]), int(raw.get("max_routing_tokens", MAX_ROUTING_TOKENS)))
