"""Which layers slide, as transformers decides it for each family, with and without the
config's ``layer_types`` (files written before transformers 4.53 have none)."""

from __future__ import annotations

import pytest

from molink.config import LayerRange
from molink.errors import InvalidParameterError
from molink.weights import resolve_model_source
from tests.helpers.config_variants import edited_copy, max_logit_diff, without
from tests.helpers.tiny_models import WINDOW

PROMPT = 3 * WINDOW  # past the window
TOLERANCE = 1e-4
MIXED = ["full_attention", "sliding_attention"] * 2


@pytest.mark.parametrize(
    ("arch", "overrides"),
    [
        ("gemma2", {}),  # alternate, sliding first
        ("gemma3", {}),  # sliding_window_pattern 6: all four layers slide, locally rotated
        ("gpt_oss", {}),
        ("qwen2", {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 2}),
        ("qwen3", {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1}),
        (
            "qwen2_moe",
            {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 3},
        ),
    ],
)
def test_a_config_without_layer_types_slides_where_transformers_does(
    tiny_model_dir, tmp_path, arch: str, overrides: dict
) -> None:
    path = edited_copy(tiny_model_dir(arch, **overrides), tmp_path / "m", without("layer_types"))
    assert max_logit_diff(path, PROMPT, 3) <= TOLERANCE


def test_gemma3_reads_its_old_sliding_window_pattern(tiny_model_dir, tmp_path) -> None:
    def old(config: dict) -> None:
        del config["layer_types"]
        config["sliding_window_pattern"] = 2

    path = edited_copy(tiny_model_dir("gemma3"), tmp_path / "m", old)
    assert max_logit_diff(path, PROMPT, 3, num_stages=2) <= TOLERANCE


@pytest.mark.parametrize(
    ("arch", "edit"),
    [
        ("llama", {"sliding_window": WINDOW}),  # Llama's attention has no window
        ("qwen3_moe", {"use_sliding_window": True, "sliding_window": WINDOW}),
        ("qwen3_moe", {"use_sliding_window": True, "sliding_window": WINDOW, "layer_types": MIXED}),
        ("mixtral", {"layer_types": MIXED}),
        ("phi3", {"layer_types": MIXED}),
        ("starcoder2", {"layer_types": MIXED}),
        # transformers loads a Mistral config with layer_types as Ministral, which reads them
        ("mistral", {"sliding_window": WINDOW, "layer_types": MIXED}),
    ],
)
def test_layer_types_and_windows_count_only_where_transformers_reads_them(
    tiny_model_dir, tmp_path, arch: str, edit: dict
) -> None:
    path = edited_copy(tiny_model_dir(arch), tmp_path / "m", lambda config: config.update(edit))
    assert max_logit_diff(path, PROMPT, 3) <= TOLERANCE


def test_a_layer_type_we_cannot_run_is_refused_by_name(tiny_model_dir, tmp_path) -> None:
    def chunked(config: dict) -> None:
        config["layer_types"][1] = "chunked_attention"

    path = edited_copy(tiny_model_dir("gemma2"), tmp_path / "m", chunked)
    with pytest.raises(InvalidParameterError, match="chunked_attention") as info:
        resolve_model_source(str(path)).load_slice(LayerRange(0, 4), "float32")
    assert info.value.field == "layer_types"
