"""The pre-training context of llama3, yarn and longrope scaling, settled as transformers
settles it: a config's own original_max_position_embeddings wins over the rope
parameters', and max_position_embeddings stands in when neither has one."""

from __future__ import annotations

from typing import Any

import pytest

from tests.helpers.config_variants import edited_copy, max_logit_diff

TOLERANCE = 1e-4
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8,
}


def _rope(config: dict[str, Any]) -> dict[str, Any]:
    return config.get("rope_parameters") or config["rope_scaling"]


def _no_original(config: dict[str, Any]) -> None:
    _rope(config).pop("original_max_position_embeddings")


def _own_original(config: dict[str, Any]) -> None:
    config["original_max_position_embeddings"] = 16


@pytest.mark.parametrize("edit", [_no_original, _own_original])
def test_llama3_scaling_pretraining_context(tiny_model_dir, tmp_path, edit) -> None:
    source = tiny_model_dir("llama", rope_scaling=LLAMA3, max_position_embeddings=32)
    path = edited_copy(source, tmp_path / "m", edit)
    assert max_logit_diff(path, 20, 3) <= TOLERANCE


def test_phi3_own_original_context_picks_the_long_factors(tiny_model_dir, tmp_path) -> None:
    """The rope parameters say 64, the config 32: a 40-token prompt is past the context."""

    def edit(config: dict[str, Any]) -> None:
        config["original_max_position_embeddings"] = 32

    path = edited_copy(tiny_model_dir("phi3"), tmp_path / "m", edit)
    assert max_logit_diff(path, 40, 3) <= TOLERANCE


YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}


def test_yarn_serves_its_original_context_times_its_factor(tiny_model_dir) -> None:
    """Qwen's long-context recipe: YaRN (factor 4 over a 16-token pre-training context) added
    to a model whose max_position_embeddings stays 32; prompts up to 64 tokens are rotated
    as transformers rotates them."""
    from molink.engine.factory import resolve_max_model_len
    from molink.weights import resolve_model_source

    path = tiny_model_dir("qwen2", rope_scaling=YARN, max_position_embeddings=32)
    config = resolve_model_source(str(path)).model_config
    assert resolve_max_model_len(config, None) == 64
    assert max_logit_diff(path, 56, 7, num_stages=2) <= TOLERANCE
