"""Random-initialised models for the device check, built from transformers' config classes
(nothing is downloaded): the tiny models of every architecture the tests use, and
full-size shapes of Qwen3-0.6B and Llama-3.2-1B."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tests.helpers.tiny_models import make_tiny_tokenizer

SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen3-0.6b": (
        "Qwen3Config",
        dict(
            hidden_size=1024,
            intermediate_size=3072,
            num_hidden_layers=28,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
            vocab_size=151936,
            tie_word_embeddings=True,
            rope_theta=1000000.0,
            max_position_embeddings=40960,
            rms_norm_eps=1e-6,
        ),
    ),
    "llama-3.2-1b": (
        "LlamaConfig",
        dict(
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=64,
            vocab_size=128256,
            tie_word_embeddings=True,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 32.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
            max_position_embeddings=131072,
            rms_norm_eps=1e-5,
        ),
    ),
}
# The same families at a size a CPU runs in seconds (--smoke).
SMOKE_SIZES = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=512,
)


def build_shaped(
    name: str, path: Path, device: torch.device, dtype: torch.dtype, smoke: bool
) -> torch.nn.Module:
    """A random model of ``name``'s shape, saved to ``path`` (safetensors + a tokenizer);
    returns the transformers model, on ``device`` in ``dtype``, as the reference."""
    import transformers

    cls_name, kwargs = SHAPES[name]
    kwargs = {**kwargs, **(SMOKE_SIZES if smoke else {})}
    config = getattr(transformers, cls_name)(**kwargs)
    torch.manual_seed(0)
    with device:
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    # Random norms and a larger init spread the logits, so that top-1 is not a near-tie.
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if pname.endswith("norm.weight"):
                param.copy_(1 + 0.2 * torch.randn_like(param))
            elif param.dim() == 2:
                param.normal_(0.0, 0.05)
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    model.save_pretrained(path, safe_serialization=True)
    make_tiny_tokenizer(path)
    return model


def weight_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for param in model.parameters():
        if param.data_ptr() not in seen:  # tied embedding and head count once
            seen.add(param.data_ptr())
            total += param.numel() * param.element_size()
    return total


def memory_bandwidth(device: torch.device, num_bytes: int) -> float:
    """Bytes per second of a device-to-device copy (read + write counted)."""
    import time

    src = torch.empty(num_bytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync(device)
    started = time.perf_counter()
    repeats = 5
    for _ in range(repeats):
        dst.copy_(src)
    _sync(device)
    return 2 * num_bytes * repeats / (time.perf_counter() - started)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def greedy_tokens(
    reference: torch.nn.Module, prompts: list[list[int]], new: int, device: torch.device
) -> list[list[int]]:
    """transformers ``generate``'s greedy continuations, exactly ``new`` tokens each."""
    out = []
    for prompt in prompts:
        ids = torch.tensor([prompt], device=device)
        with torch.no_grad():
            generated = reference.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=0,
            )
        out.append(generated[0, len(prompt) :].tolist())
    return out
