"""Every tensor a stage allocates follows ``--device``.

Stages are built on the ``meta`` device: it allocates nothing, and any tensor created
elsewhere (a ``torch.tensor`` without ``device=``, a stray ``.cpu()``) is recorded by
OffDeviceRecorder or fails with a device mismatch. A CUDA device this machine lacks is
refused at start, naming it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from molink.cli.args import EngineArgs
from molink.config import LayerRange
from molink.device import resolve_device
from molink.engine.factory import EngineOptions, build_local_engine
from molink.errors import InvalidParameterError
from molink.models.attention_metadata import AttentionMetadata, SeqChunk
from molink.sampling_params import SamplingParams
from molink.stage.worker import StageWorker
from molink.step import NewSequenceData, ScheduledSequence, StepPlan
from molink.weights import resolve_model_source
from tests.helpers.device_guard import OffDeviceRecorder, tensors_off_device
from tests.helpers.tiny_models import TINY_ARCHS

# Mixture-of-experts layers count tokens per expert on the host, and longrope (phi3) asks
# whether any token is past the pre-training context: data-dependent reads that meta
# tensors cannot answer. Their placement is checked at build time.
DATA_DEPENDENT = (
    "mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss", "deepseek_v2", "deepseek_v3", "phi3",
)  # fmt: skip
DENSE = tuple(a for a in TINY_ARCHS if a not in DATA_DEPENDENT)
BLOCK_SIZE = 4
GREEDY = SamplingParams(temperature=0.0, max_tokens=4)


def _model_dir(tiny_model_dir: Callable[..., Path], arch: str) -> Path:
    if arch == "deepseek_dense":  # latent attention with dense MLPs only
        return tiny_model_dir("deepseek_v2", first_k_dense_replace=4)
    return tiny_model_dir(arch)


def _plan(step_id: int, prompt: list[int], start: int = 0) -> StepPlan:
    """Sequence 0: a prompt chunk from ``start`` (new at 0), blocks 5, 3, 8, 1, ..."""
    blocks = (5, 3, 8, 1, 9, 2)[: -(-(start + len(prompt)) // BLOCK_SIZE)]
    new = (NewSequenceData(0, tuple(prompt), len(prompt), GREEDY),) if start == 0 else ()
    scheduled = (ScheduledSequence(0, start, len(prompt), blocks if start == 0 else (), True),)
    return StepPlan(step_id, scheduled, tuple(prompt), new)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_weights_kv_and_tables_are_built_on_the_stage_device(tiny_model_dir, arch) -> None:
    source = resolve_model_source(str(tiny_model_dir(arch)))
    config = source.model_config
    model = source.load_slice(LayerRange(0, config.num_layers), "float32", device="meta")
    assert tensors_off_device(model, "meta") == []
    for tables in model.rotaries.values():
        assert tables.cos.is_meta and tables.sin_signed.is_meta
    worker = StageWorker(model, config, LayerRange(0, config.num_layers), 8, 4, torch.float32)
    assert worker.device.type == "meta" and worker.kv_cache.device.type == "meta"


@pytest.mark.parametrize("arch", [*DENSE, "deepseek_dense"])
def test_a_step_allocates_only_on_the_stage_device(tiny_model_dir, arch) -> None:
    source = resolve_model_source(str(_model_dir(tiny_model_dir, arch)))
    config = source.model_config
    first, rest = LayerRange(0, 2), LayerRange(2, config.num_layers)
    head = StageWorker(
        source.load_slice(first, "float32", device="meta"),
        config,
        first,
        16,
        BLOCK_SIZE,
        torch.float32,
    )
    tail = source.load_slice(rest, "float32", device="meta")
    tail_worker = StageWorker(tail, config, rest, 16, BLOCK_SIZE, torch.float32)
    # Hidden states arrive from the wire as host tensors: they move to the stage device.
    arrived = torch.zeros(7, config.hidden_size)
    recorder = OffDeviceRecorder("meta")
    with recorder:
        hidden = head.execute(_plan(1, [5, 9, 13, 2, 7, 1, 4]), None)  # prefill over 2 blocks
        decoded = head.execute(_plan(2, [3], start=7), None)  # decode into block 2
        meta = AttentionMetadata.build([SeqChunk(0, 7, [5, 3])], BLOCK_SIZE, device="meta")
        out = tail(tail_worker._inputs(_plan(1, [0] * 7), arrived), meta, tail_worker.kv_cache)
        logits = tail.compute_logits(out)
    assert recorder.strays == []
    assert hidden.is_meta and decoded.is_meta and logits.is_meta


def test_cuda_without_cuda_fails_at_start_naming_the_device(tiny_model_dir) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    for text in ("cuda", "cuda:1"):
        with pytest.raises(InvalidParameterError) as info:
            build_local_engine(EngineOptions(model=str(tiny_model_dir("llama")), device=text))
        assert info.value.field == "device" and text in info.value.message
    assert resolve_device("auto") == torch.device("cpu")


def test_device_flag_syntax_is_checked_when_parsed() -> None:
    assert EngineArgs(device="cuda:3").device == "cuda:3"
    for bad in ("gpu", "cuda:x", "cpu:1", ""):
        with pytest.raises(InvalidParameterError) as info:
            EngineArgs(device=bad)
        assert info.value.field == "device"


def test_serve_stage_and_the_seed_entry_points_take_the_flag() -> None:
    from molink.cli.main import build_parser
    from molinkv1.entrypoints import api_server

    parser = build_parser()
    for command in ("serve", "stage"):
        namespace = parser.parse_args([command, "--device", "cuda:0"])
        assert EngineArgs.from_namespace(namespace).device == "cuda:0"
    assert "--device" in api_server.build_parser("api_server").format_help()
