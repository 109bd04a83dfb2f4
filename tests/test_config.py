"""config.json parsing: upstream fields, visible inferred defaults, one-line errors."""
import json

import pytest

from mova_export.core.errors import ConfigError
from mova_export.source.config import FULL_LLM, INFERRED_DEFAULTS, MoVAConfig

UPSTREAM_LIKE = {**FULL_LLM, "model_type": "mova_llama", "mm_projector_type": "mov_adapter", "mm_hidden_size": 1024,
                 "expert_channels": [1536, 512, 256, 1536, 768, 768, 256], "image_feat_size": 48, "topk": 3}


def test_inferred_fields_are_defaulted_and_listed():
    cfg = MoVAConfig.from_dict(UPSTREAM_LIKE)
    assert cfg.mm_vision_select_layer == -2 and cfg.pix2struct_max_patches == 2025
    assert "mm_vision_select_layer" in cfg.defaulted and "pix2struct_max_patches" in cfg.defaulted
    assert "topk_experts" not in cfg.defaulted  # read from the legacy `topk` field
    assert cfg.topk_experts == 3 and cfg.llm_hidden_size == 4096 and cfg.grid_tokens == 2304
    assert cfg.routing_grid == 12 and cfg.adapter_grid == 24


def test_overrides_are_visible_and_checked():
    cfg = MoVAConfig.from_dict(UPSTREAM_LIKE).with_overrides(mm_vision_select_layer=-1)
    assert cfg.mm_vision_select_layer == -1 and "mm_vision_select_layer" not in cfg.defaulted
    with pytest.raises(ConfigError, match="unknown config override"):
        MoVAConfig.from_dict(UPSTREAM_LIKE).with_overrides(select_layer=-1)


def test_round_trip_through_json(tmp_path):
    cfg = MoVAConfig.from_dict({**UPSTREAM_LIKE, "pix2struct_max_patches": 2025})
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    again = MoVAConfig.from_checkpoint(tmp_path)
    assert again.to_dict() == cfg.to_dict()
    assert set(INFERRED_DEFAULTS) <= set(cfg.to_dict())


@pytest.mark.parametrize("patch, message", [
    ({"mm_projector_type": "mlp2x_gelu"}, "mm_projector_type='mlp2x_gelu'"),
    ({"num_routing_tokens": 150}, "num_routing_tokens=150 is not a square"),
    ({"topk_experts": 9}, "topk_experts=9"),
])
def test_bad_values_name_the_field(patch, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        MoVAConfig.from_dict({**UPSTREAM_LIKE, **patch})


def test_expert_count_is_checked_against_the_registry():
    """config.py knows nothing of the registry (no import cycle); the registry checks a config against itself."""
    from mova_export.components import check_config

    check_config(MoVAConfig.from_dict(UPSTREAM_LIKE))
    with pytest.raises(ConfigError, match=r"expert_channels has 2 entries, the registry has 7 experts"):
        check_config(MoVAConfig.from_dict({**UPSTREAM_LIKE, "expert_channels": [1, 2], "topk_experts": 2}))


def test_missing_folder_and_bad_json(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        MoVAConfig.from_checkpoint(tmp_path / "nope")
    with pytest.raises(ConfigError, match="config.json not found"):
        MoVAConfig.from_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        MoVAConfig.from_checkpoint(tmp_path)
