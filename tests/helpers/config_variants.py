"""Compare a checkpoint variant's logits with transformers': one prompt, then greedy decode.

Real checkpoints' config.json files differ from what today's transformers writes (older
files leave fields out and rely on each config class's defaults); ``edited_copy`` writes
such a variant of a tiny checkpoint, ``max_logit_diff`` runs it through our paged decoder
and through transformers' model of the same directory.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from molink.weights import resolve_model_source
from tests.helpers.paged_runner import PagedRunner, Seq, load_pipeline
from tests.helpers.tiny_models import load_reference_model

BLOCK_SIZE = 4


def edited_copy(source: Path, dest: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    """A copy of checkpoint ``source`` whose config.json ``edit`` changed in place."""
    shutil.copytree(source, dest)
    config_path = dest / "config.json"
    config = json.loads(config_path.read_text())
    edit(config)
    config_path.write_text(json.dumps(config))
    return dest


def without(*keys: str) -> Callable[[dict[str, Any]], None]:
    """An edit that drops ``keys`` from a config (as files written before they existed)."""

    def drop(config: dict[str, Any]) -> None:
        for key in keys:
            config.pop(key, None)

    return drop


def max_logit_diff(path: Path, prompt_len: int, new_tokens: int, num_stages: int = 1) -> float:
    """Largest |ours - transformers'| over the logits of a prompt prefilled in one chunk
    and ``new_tokens`` greedy decode steps (transformers: one forward over the result)."""
    source = resolve_model_source(str(path))
    vocab = source.model_config.vocab_size
    g = torch.Generator().manual_seed(7)
    prompt = torch.randint(3, vocab, (prompt_len,), generator=g).tolist()
    num_blocks = -(-(prompt_len + new_tokens) // BLOCK_SIZE)
    seq = Seq(prompt, list(range(num_blocks)))
    runner = PagedRunner(load_pipeline(source, num_stages), num_blocks, BLOCK_SIZE)
    runner.step([(seq, prompt_len)])
    runner.decode([seq], new_tokens + 1)
    ours = torch.stack(seq.logits)
    reference = load_reference_model(path)
    with torch.no_grad():
        theirs = reference(torch.tensor([seq.tokens[:-1]])).logits[0, prompt_len - 1 :]
    return (ours - theirs).abs().max().item()
