"""transformers' greedy continuations of a GGUF model, cached on disk between runs.

Loading a GGUF through transformers dequantizes every tensor in Python (a minute for a
few hundred million parameters); the cache key covers the file's version, transformers'
version, the prompts and the length, so a cached answer is what transformers would
compute again.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch


def greedy_reference(gguf: Path, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    import transformers

    from molink.weights.cache import default_cache_dir, file_key

    ident = json.dumps([file_key(gguf), transformers.__version__, prompts, new_tokens])
    digest = hashlib.sha256(ident.encode()).hexdigest()[:16]
    cached = default_cache_dir() / "test-references" / f"{gguf.stem}-greedy-{digest}.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    outputs = _generate(gguf, prompts, new_tokens)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(outputs))
    tmp.replace(cached)
    return outputs


def _generate(gguf: Path, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    outputs = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
        outputs.append(out[0, len(prompt) :].tolist())
    return outputs
