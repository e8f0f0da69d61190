"""A device probe behind two findings of the H200 run (bench/results/gpu_check_h200_*.json):

* ``kernel``: the Triton paged-decode kernel against the reference computed on the CPU, for
  the kernel tests' grouped-query shapes, with 2, 4, 8 or all of a group's query heads per
  program (``heads_per_program``; the kernel now never takes more than 8 on its reduction
  path, so the "all" column measures today's kernel, not the one that failed);
* ``fidelity``: greedy tokens of tiny gemma2, glm4, phi3 and llama models through MoLink on
  the GPU and on the CPU, against transformers' eager and SDPA attention on both.

    python bench/decode_kernel_probe.py          # on a machine with a CUDA GPU

Writes ``bench/results/decode_kernel_probe.json``.
"""

from __future__ import annotations

import os
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

os.environ["MOLINK_TEST_DEVICE"] = "cuda"  # the kernel tests' cases, compiled for CUDA
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from bench.common import write_results  # noqa: E402
from bench.gpu_models import greedy_tokens  # noqa: E402
from molink.engine.offline import LLM  # noqa: E402
from molink.kernels.paged_reference import DecodeParams, paged_decode_reference  # noqa: E402
from molink.kernels.triton_decode import paged_decode  # noqa: E402
from molink.sampling_params import SamplingParams  # noqa: E402
from tests.helpers.tiny_models import load_reference_model, make_tiny_model  # noqa: E402
from tests.unit.test_kernels_paged_decode import _case  # noqa: E402

RAGGED = [1, 4, 5, 8, 13, 31]
CASES = {
    "g16_bs4": (_case(RAGGED, 16, 1), DecodeParams(scale=0.25, head_dim_v=16)),
    "g16_kv2_bs4": (_case(RAGGED, 32, 2), DecodeParams(scale=0.25, head_dim_v=16)),
    "g8_bs4": (_case(RAGGED, 8, 1), DecodeParams(scale=0.25, head_dim_v=16)),
    "latent_g16": (
        _case([3, 9, 20], 16, 1, head_dim=40, head_dim_v=32),
        DecodeParams(scale=0.1, head_dim_v=32),
    ),
    "g16_bs16_dot": (
        _case([3, 17, 40], 16, 1, block_size=16),
        DecodeParams(scale=0.25, head_dim_v=16),
    ),
    "g32_bs16_dot": (
        _case([3, 17, 40], 32, 1, head_dim=64, block_size=16),
        DecodeParams(scale=0.125, head_dim_v=64),
    ),
}
PROMPTS = [[5, 17, 42, 9, 101, 7, 33, 250], [3, 14, 15, 92, 65, 35]]
NEW = 24


def kernel_rows() -> dict[str, Any]:
    rows: dict[str, Any] = {}
    for name, (case, params) in CASES.items():
        cpu = paged_decode_reference(*case, params).float()
        on_gpu = tuple(t.cuda() for t in case)
        row = {
            "gpu_reference": float(
                (paged_decode_reference(*on_gpu, params).cpu() - cpu).abs().max()
            )
        }
        for heads in (None, 8, 4, 2):
            got = paged_decode(*on_gpu, params, heads_per_program=heads).cpu()
            row[f"kernel_heads_{heads or 'all'}"] = float((got - cpu).abs().max())
        rows[name] = row
    return rows


def _ours(path: Path, device: str) -> list[list[int]]:
    llm = LLM(model=str(path), device=device, dtype="float32", max_model_len=128,
              max_num_seqs=8, kv_cache_memory_bytes=1 << 28)  # fmt: skip
    params = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)
    return [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, params)]


def fidelity_row(path: Path) -> dict[str, Any]:
    gpu, cpu = _ours(path, "cuda"), _ours(path, "cpu")
    row: dict[str, Any] = {"ours_gpu_equals_ours_cpu": gpu == cpu}
    for attention in ("eager", "sdpa"):
        for device in ("cuda", "cpu"):
            try:  # newer transformers refuse SDPA for Gemma 2 (5.17 took it, uncapped)
                reference = load_reference_model(path, attn_implementation=attention)
            except ValueError as exc:
                row[f"hf_{attention}"] = str(exc)[:200]
                continue
            theirs = greedy_tokens(reference.to(device), PROMPTS, NEW, torch.device(device))
            row[f"hf_{attention}_{device}_equals_ours_gpu"] = theirs == gpu
            row[f"hf_{attention}_{device}_equals_ours_cpu"] = theirs == cpu
    return row


def main() -> int:
    results: dict[str, Any] = {"kernel": kernel_rows(), "fidelity": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for arch in ("gemma2", "glm4", "phi3", "llama"):
            try:
                results["fidelity"][arch] = fidelity_row(make_tiny_model(arch, Path(tmp) / arch))
            except Exception:  # one architecture's failure keeps the others' rows
                results["fidelity"][arch] = traceback.format_exc()[-1500:]
    write_results("decode_kernel_probe", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
