"""A config.json naming no rope base or context length takes its family's transformers
defaults (Mixtral 1e6, GPT-OSS 150000 with YaRN, Qwen2 32768 positions, ...), while a base
written inside rope_parameters or rope_scaling still wins over the family's value."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import transformers

from molink.config import ModelConfig
from tests.helpers.tiny_models import tiny_config_kwargs
from tests.unit.test_models_config_defaults import _TINY_OF

_ROPE_KEYS = ("rope_theta", "rope_scaling", "rope_parameters", "max_position_embeddings")


def _bare(architecture: str) -> tuple[type, dict[str, Any]]:
    cls_name, kwargs = tiny_config_kwargs(_TINY_OF[architecture])
    fields = {k: v for k, v in kwargs.items() if k not in _ROPE_KEYS}
    return getattr(transformers, cls_name), {**fields, "architectures": [architecture]}


def _class_rope(cls: type, fields: dict[str, Any]) -> dict[str, Any]:
    """The rope settings transformers' class reads from ``fields`` (which it edits in place,
    hence the copy)."""
    return _global_params(cls.from_dict(copy.deepcopy(fields)))


def _global_params(config: Any) -> dict[str, Any]:
    params = dict(config.rope_parameters)
    return dict(params.get("full_attention", params))  # Gemma 3 keeps one set per layer type


@pytest.mark.parametrize("architecture", sorted(_TINY_OF))
def test_a_config_without_rope_values_has_the_class_defaults(architecture: str) -> None:
    cls, fields = _bare(architecture)
    expected = cls.from_dict(copy.deepcopy(fields))
    config = ModelConfig.from_hf_dict(fields)
    params = _global_params(expected)
    assert config.rope_theta == params["rope_theta"]
    assert config.max_position_embeddings == expected.max_position_embeddings
    scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if scaling.get("rope_type", "default") == "default":
        assert config.rope_scaling is None
    else:
        assert config.rope_scaling == scaling


# Gemma 3's rope_parameters hold one set per layer type, with no single base to compare.
_PLACES = [
    (arch, where)
    for arch in sorted(_TINY_OF)
    for where in ("rope_parameters", "rope_scaling")
    if (arch, where) != ("Gemma3ForCausalLM", "rope_parameters")
]


@pytest.mark.parametrize(("architecture", "where"), _PLACES)
def test_a_base_inside_the_rope_settings_wins_over_the_default(
    architecture: str, where: str
) -> None:
    cls, fields = _bare(architecture)
    rope = {"rope_type": "default", "rope_theta": 12345.0}
    fields = {**fields, where: rope}
    expected = _class_rope(cls, fields)
    config = ModelConfig.from_hf_dict(fields)
    assert config.rope_theta == expected["rope_theta"] == 12345.0


def test_a_base_inside_rope_parameters_wins_over_a_top_level_one() -> None:
    cls, fields = _bare("MixtralForCausalLM")
    fields = {**fields, "rope_theta": 3.0, "rope_parameters": {"rope_theta": 7.0}}
    expected = _class_rope(cls, fields)
    assert ModelConfig.from_hf_dict(fields).rope_theta == expected["rope_theta"] == 7.0


def test_a_top_level_base_with_scaling_that_names_none_is_kept() -> None:
    cls, fields = _bare("GptOssForCausalLM")
    fields = {
        **fields,
        "rope_theta": 5000.0,
        "rope_scaling": {"rope_type": "linear", "factor": 2.0},
    }
    expected = _class_rope(cls, fields)
    config = ModelConfig.from_hf_dict(fields)
    assert config.rope_theta == expected["rope_theta"] == 5000.0
    assert config.rope_scaling == {"rope_type": "linear", "factor": 2.0}
