"""The device check: one script for a machine with one CUDA GPU, torch >= 2.11, Triton and
transformers installed, and nothing to download (every model is random-initialised from
transformers' config classes here). It runs in about 8 minutes and writes one file:

* ``fidelity_fp32``: greedy tokens of every architecture's tiny model through MoLink on
  the device vs transformers ``generate`` on the same device, float32;
* ``bf16_agreement``: Qwen3-0.6B- and Llama-3.2-1B-shaped models in bfloat16,
  teacher-forced top-1 agreement and logits cosine vs transformers;
* ``gpu_tests``: the kernel and device tests run on CUDA (pass/fail);
* ``throughput``: Llama-3.2-1B-shaped, bfloat16, 1/16/64/256 concurrent requests of
  128 in / 128 out, tokens/s, MoLink with CUDA graphs on and off vs transformers
  ``generate`` with a static cache; batch-1 decode ms/token and the weight-read bound
  (weight bytes / measured copy bandwidth).

Sections that fail record their error and the others still run; a section that would
pass the time budget is skipped and says so.

    python bench/gpu_check.py                      # on the GPU machine
    python bench/gpu_check.py --smoke --device cpu --out /tmp/gpu_check.json

``--smoke`` shrinks every size so that the whole script runs on a CPU in a minute.
Writes ``bench/results/gpu_check.json`` unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from anywhere, without installing
    sys.path.insert(0, str(REPO_ROOT))

from bench.common import machine_info, write_results  # noqa: E402
from bench.gpu_models import SHAPES, build_shaped, greedy_tokens  # noqa: E402
from bench.gpu_throughput import throughput_section  # noqa: E402
from molink.engine.offline import LLM  # noqa: E402
from molink.sampling_params import SamplingParams  # noqa: E402
from tests.helpers.tiny_models import TINY_ARCHS, load_reference_model, make_tiny_model  # noqa: E402

logger = logging.getLogger("gpu_check")

GPU_TESTS = ["tests/unit/test_kernels_paged_decode.py", "tests/unit/test_cuda_graphs.py"]
SECTIONS = ("gpu_tests", "fidelity_fp32", "bf16_agreement", "throughput")


class Budget:
    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


def run_section(
    results: dict[str, Any],
    name: str,
    budget: Budget,
    needs_s: float,
    fn: Callable[[], Any],
    wanted: set[str] | None = None,
) -> None:
    """Run one section into ``results[name]``; ``wanted``: the sections asked for (None: all)."""
    if wanted is not None and name not in wanted:
        return
    if budget.left() < needs_s:
        results[name] = {"skipped": f"time budget: {budget.left():.0f} s left, needs ~{needs_s}"}
        return
    started = time.monotonic()
    try:
        results[name] = fn()
    except Exception as exc:  # one section's failure must not lose the others' figures
        logger.exception("section %s failed", name)
        results[name] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
    if isinstance(results[name], dict):
        results[name]["seconds"] = round(time.monotonic() - started, 1)
    logger.info("%s: %s", name, results[name])


def fidelity_fp32(device: torch.device, archs: tuple[str, ...], work: Path, new: int) -> dict:
    """Greedy equality vs transformers per architecture (tiny models, float32)."""
    rows = {}
    prompts = [[5, 17, 42, 9, 101, 7, 33, 250], [3, 14, 15, 92, 65, 35]]
    for arch in archs:
        path = make_tiny_model(arch, work / f"tiny-{arch}")
        llm = LLM(
            model=str(path), device=str(device), dtype="float32", max_model_len=128, max_num_seqs=8
        )
        params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
        ours = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params)]
        # transformers' eager attention: on CUDA its SDPA path drops Gemma 2's soft-capping
        # (seen on an H200, transformers 5.17: eager matched our tokens, SDPA did not).
        reference = load_reference_model(path, attn_implementation="eager").to(device)
        theirs = greedy_tokens(reference, prompts, new, device)
        equal = sum(a == b for a, b in zip(ours, theirs, strict=True))
        rows[arch] = {
            "equal_sequences": equal,
            "of": len(prompts),
            "differences": [
                first_difference(reference, prompt, a, b, device)
                for prompt, a, b in zip(prompts, ours, theirs, strict=True)
                if a != b
            ],
        }
        del llm, reference
    passed = all(r["equal_sequences"] == r["of"] for r in rows.values())
    return {"all_equal": passed, "per_arch": rows}


def first_difference(
    reference: torch.nn.Module, prompt: list[int], ours: list[int], theirs: list[int], device
) -> dict[str, Any]:
    """Where greedy tokens first differ, and the reference's own logits there: how far our
    token is below its top one, against the logits' spread (a near-tie flips on rounding;
    a wide gap is a defect)."""
    at = next(i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b)
    ids = torch.tensor([prompt + theirs[:at]], device=device)
    with torch.no_grad():
        logits = reference(ids).logits[0, -1].float()
    gap = float(logits[theirs[at]] - logits[ours[at]])
    return {"position": at, "gap": round(gap, 6), "logits_std": round(float(logits.std()), 4)}


def bf16_agreement(device: torch.device, work: Path, smoke: bool) -> dict:
    """Teacher-forced top-1 agreement and logits cosine of whole sequences, in bfloat16 and
    again in float32 (where our kernels and transformers' should agree to rounding: a low
    bfloat16 figure beside a float32 one near 1 is bfloat16's own rounding on random
    weights, not a defect)."""
    rows = {}
    for name in SHAPES:
        for dtype in ("bfloat16", "float32"):
            rows[f"{name}/{dtype}"] = _agreement(name, dtype, device, work, smoke)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def _agreement(name: str, dtype: str, device: torch.device, work: Path, smoke: bool) -> dict:
    from molink.config import LayerRange
    from molink.models.attention_metadata import AttentionMetadata, SeqChunk
    from molink.models.kv_cache import KVCache
    from molink.weights import resolve_model_source

    length = 16 if smoke else 128
    torch_dtype = getattr(torch, dtype)
    path = work / f"shape-{name}-{dtype}"
    reference = build_shaped(name, path, device, torch_dtype, smoke)
    source = resolve_model_source(str(path))
    config = source.model_config
    model = source.load_slice(LayerRange(0, config.num_layers), dtype, device=device)
    generator = torch.Generator().manual_seed(7)
    agree, cosines = [], []
    for _ in range(4):
        ids = torch.randint(3, config.vocab_size, (length,), generator=generator).to(device)
        blocks = -(-length // 16)
        cache = KVCache.allocate(config, config.num_layers, blocks, 16, torch_dtype, device)
        meta = AttentionMetadata.build(
            [SeqChunk(0, length, list(range(blocks)))], 16, device=device
        )
        with torch.no_grad():
            ours = model.compute_logits(model(ids, meta, cache)).float()
            theirs = reference(ids[None]).logits[0].float()
        agree.append((ours.argmax(-1) == theirs.argmax(-1)).float().mean().item())
        cosines.append(torch.nn.functional.cosine_similarity(ours, theirs, dim=-1).mean().item())
    del reference, model
    return {
        "top1_agreement": round(sum(agree) / len(agree), 4),
        "logits_cosine": round(sum(cosines) / len(cosines), 6),
        "positions": 4 * length,
    }


def gpu_tests(device: torch.device, smoke: bool) -> dict:
    """The kernel and CUDA-graph tests with their tensors on ``device``."""
    # The repository first, then whatever the caller's path held (packages carried in).
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "MOLINK_TEST_DEVICE": device.type, "PYTHONPATH": path}
    if device.type == "cuda":
        env.pop("TRITON_INTERPRET", None)
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *GPU_TESTS]
    if smoke:
        command += ["-k", "bucket"]  # the interpreter runs kernels slowly on a CPU
    command += ["-rf", "--tb=line"]  # one line per failure: which test, which assertion
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    return {
        "passed": done.returncode == 0,
        "summary": (lines[-1:] or [""])[0],
        "failures": [line for line in lines if line.startswith(("FAILED", "ERROR", "E ", "/"))],
        "command": " ".join(command[2:]),
    }


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: a CPU run in a minute")
    parser.add_argument("--budget-s", type=float, default=450.0)
    parser.add_argument("--out", default=None, help="results file (default: bench/results/)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated")
    args = parser.parse_args(argv)
    wanted = set(args.sections.split(","))
    device = torch.device(args.device)
    budget = Budget(args.budget_s)
    results: dict[str, Any] = {
        "benchmark": "gpu_check",
        "machine": machine_info(),
        "smoke": args.smoke,
        "versions": _versions(device),
    }
    archs = ("llama", "qwen3") if args.smoke else TINY_ARCHS
    with tempfile.TemporaryDirectory(prefix="molink-gpu-check-") as tmp:
        work = Path(tmp)
        run_section(results, "gpu_tests", budget, 30, lambda: gpu_tests(device, args.smoke), wanted)
        run_section(
            results, "fidelity_fp32", budget, 60,
            lambda: fidelity_fp32(device, archs, work, 8 if args.smoke else 24), wanted,
        )  # fmt: skip
        run_section(
            results, "bf16_agreement", budget, 60,
            lambda: bf16_agreement(device, work, args.smoke), wanted,
        )  # fmt: skip
        run_section(
            results, "throughput", budget, 120,
            lambda: throughput_section(device, work, args.smoke, budget.left), wanted,
        )  # fmt: skip
    results["command"] = " ".join(["python", *sys.argv])
    if args.out:
        import json

        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    else:
        write_results("gpu_check", results)
    return 0


def _versions(device: torch.device) -> dict[str, Any]:
    import transformers

    info: dict[str, Any] = {"torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


if __name__ == "__main__":
    sys.exit(main())
