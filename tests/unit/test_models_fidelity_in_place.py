"""Every architecture through the decode path that reads the cache in place (thresholds
lowered so that the tiny schedule's decodes take it) still equals transformers' logits."""

from __future__ import annotations

import pytest
import torch

from molink.models import decode_plan
from tests.helpers.tiny_models import TINY_ARCHS, load_reference_model
from tests.unit.test_models_fidelity import TOLERANCE, _reference_logits, _run


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_in_place_decode_matches_transformers(tiny_model_dir, arch, monkeypatch) -> None:
    monkeypatch.setattr(decode_plan, "IN_PLACE_MIN_TOKENS", 2)
    monkeypatch.setattr(decode_plan, "MIN_VIEW_TOKENS", 4)  # one block: views and gathers
    path = tiny_model_dir(arch)
    reference = load_reference_model(path)
    for seq in _run(path, 2):
        diff = (torch.stack(seq.logits) - _reference_logits(reference, seq)).abs().max().item()
        assert diff <= TOLERANCE, f"{arch}: max |diff| {diff}"
