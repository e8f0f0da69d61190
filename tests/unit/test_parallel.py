"""Tensor-parallel pieces that need no second process: shard rules, reading a rank's share
of a checkpoint, the command schema rank 0 broadcasts, and the checks made at start."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from molink.config import LayerRange
from molink.errors import InvalidParameterError, ProtocolError
from molink.models.attention_metadata import AttentionMetadata, SeqChunk
from molink.models.parallel.check import check_tensor_parallel, rank_kv_config
from molink.models.parallel.group import ParallelGroup, rank_device, rank_devices
from molink.models.parallel.reading import read_shards
from molink.models.parallel.shard import Segment, local_units, segment_rule, vocab_rule
from molink.parallel.commands import (
    HEADER_LEN,
    SCHEMA_VERSION,
    Header,
    Kind,
    decode_chunks,
    encode_chunks,
)
from molink.parallel.follower import parse_args as parse_follower_args
from molink.parallel.follower import rank_kv_cache
from molink.parallel.launch import FollowerSettings
from molink.weights.hf_dir import hf_dir_source


def test_heads_split_evenly_and_few_kv_heads_are_replicated() -> None:
    qkv = (Segment(4, 16), Segment(2, 16), Segment(2, 16))
    rule = segment_rule(0, qkv, size=2, rank=1)
    assert rule.ranges == ((32, 64), (80, 96), (112, 128))
    assert rule.total == 128 and rule.local_size == 64
    # One KV head, two ranks: both read it.
    assert local_units(1, 2, 0, "key/value heads") == local_units(1, 2, 1, "x") == (0, 1)
    assert local_units(2, 4, 3, "key/value heads") == (1, 2)


def test_a_size_that_does_not_split_names_both_numbers() -> None:
    with pytest.raises(InvalidParameterError, match="3 does not divide the model's 2 key"):
        local_units(2, 3, 0, "key/value heads")


def test_vocabulary_bands_cover_every_row_once() -> None:
    bands = [vocab_rule(385, 2, rank).ranges for rank in range(2)]
    assert bands == [((0, 193),), ((193, 385),)]
    assert vocab_rule(3, 4, 3).ranges == ((3, 3),)  # more ranks than rows: an empty band


def test_stacked_expert_parts_are_each_cut_like_the_fused_matrix() -> None:
    parts = {
        f"e{e}.{w}": torch.arange(12.0).reshape(4, 3) + 100 * e for e in range(2) for w in "gu"
    }
    rule = segment_rule(0, (Segment(4), Segment(4)), size=2, rank=1)
    got = read_shards(parts, ["e0.g", "e0.u", "e1.g", "e1.u"], rule)
    assert [tuple(t.shape) for t in got] == [(2, 3)] * 4
    assert torch.equal(got[2], parts["e1.g"][2:])
    columns = read_shards(
        {"d": torch.arange(8.0).reshape(2, 4)}, ["d"], segment_rule(1, (Segment(4),), 2, 0)
    )
    assert torch.equal(columns[0], torch.tensor([[0.0, 1.0], [4.0, 5.0]]))


def test_a_rank_reads_only_its_rows_and_columns(tiny_model_dir) -> None:
    directory = tiny_model_dir("llama")
    source = hf_dir_source(directory)
    model = source.load_slice(LayerRange(0, 4), "float32", group=ParallelGroup(1, 2))
    log = {name: (dim, ranges) for name, dim, ranges in source.last_store.read_ranges_log}
    prefix = "model.layers.0."
    assert log[prefix + "self_attn.q_proj.weight"] == (0, ((32, 64),))
    assert log[prefix + "self_attn.k_proj.weight"] == (0, ((16, 32),))
    assert log[prefix + "self_attn.o_proj.weight"] == (1, ((32, 64),))
    assert log[prefix + "mlp.up_proj.weight"] == (0, ((64, 128),))
    assert log[prefix + "mlp.down_proj.weight"] == (1, ((64, 128),))
    assert log["model.embed_tokens.weight"] == (0, ((192, 384),))
    attn = model.layers[0].attn
    assert (attn.spec.num_heads, attn.spec.num_kv_heads) == (2, 1)
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        q = f.get_tensor(prefix + "self_attn.q_proj.weight")
        o = f.get_tensor(prefix + "self_attn.o_proj.weight")
    assert torch.equal(attn.qkv.weight[:32], q[32:])
    assert torch.equal(attn.o.weight, o[:, 32:])


def test_command_header_round_trips_and_refuses_another_version() -> None:
    header = Header(Kind.FORWARD, rows=5, chunks=2, block_ids=3, block_size=16, window=6)
    encoded = header.encode()
    assert encoded.shape == (HEADER_LEN,) and int(encoded[0]) == SCHEMA_VERSION
    assert Header.decode(encoded) == header
    other = encoded.clone()
    other[0] = SCHEMA_VERSION + 1
    with pytest.raises(ProtocolError, match="schema"):
        Header.decode(other)
    huge = encoded.clone()
    huge[2] = 1 << 40
    with pytest.raises(ProtocolError, match="out of bounds"):
        Header.decode(huge)


def test_chunks_round_trip_into_the_same_attention_metadata() -> None:
    chunks = [SeqChunk(0, 3, [4]), SeqChunk(17, 1, [1, 2])]
    table, block_ids = encode_chunks(chunks)
    decoded = decode_chunks(table, block_ids)
    assert decoded == chunks
    a, b = AttentionMetadata.build(chunks, 16), AttentionMetadata.build(decoded, 16)
    assert torch.equal(a.slot_mapping, b.slot_mapping) and torch.equal(a.positions, b.positions)
    with pytest.raises(ProtocolError):
        decode_chunks(table, block_ids[:1])


def test_start_checks_name_what_cannot_split(tiny_model_dir) -> None:
    config = hf_dir_source(tiny_model_dir("llama")).model_config
    check_tensor_parallel(config, 1)
    check_tensor_parallel(config, 2)
    with pytest.raises(InvalidParameterError, match="3 does not divide the model's 4 attention"):
        check_tensor_parallel(config, 3)
    with pytest.raises(InvalidParameterError, match="gptq weights are not split"):
        check_tensor_parallel(config, 2, "gptq")
    assert rank_kv_config(config, 2).num_kv_heads == 1
    assert rank_kv_config(config, 4).num_kv_heads == 1
    olmo2 = hf_dir_source(tiny_model_dir("olmo2")).model_config
    check_tensor_parallel(olmo2, 2)  # q/k norms over all heads add up across ranks
    deepseek = hf_dir_source(tiny_model_dir("deepseek_v2")).model_config
    with pytest.raises(InvalidParameterError, match="latent attention"):
        check_tensor_parallel(deepseek, 2)


def test_follower_command_line_carries_every_setting() -> None:
    settings = FollowerSettings(
        model="/models/m",
        start_layer=2,
        end_layer=6,
        dtype="bfloat16",
        kv_cache_dtype="auto",
        num_blocks=77,
        block_size=16,
        device="cuda:1",
        num_threads=3,
    )
    argv = settings.argv(rank=1, size=2, port=4321)
    assert argv[1:3] == ["-m", "molink.parallel.follower"]
    args = parse_follower_args(argv[3:])
    assert (args.rank, args.tensor_parallel_size, args.port) == (1, 2, 4321)
    assert (args.model, args.start_layer, args.end_layer) == ("/models/m", 2, 6)
    assert (args.dtype, args.num_blocks, args.device, args.num_threads) == (
        "bfloat16",
        77,
        "cuda:1",
        3,
    )


def test_a_follower_builds_rank_0s_cache_on_its_own_device(tiny_model_dir) -> None:
    """An fp8 cache is refused on a CPU only: a rank on a GPU (here the meta device, which
    is not a CPU either) builds it as rank 0 does. The follower judged it against the CPU
    and exited, so an fp8 tensor-parallel stage on GPUs never started."""
    config = hf_dir_source(tiny_model_dir("llama")).model_config
    settings = FollowerSettings("/m", 1, 3, "bfloat16", "fp8", 5, 16, device="cuda:0")
    args = parse_follower_args(settings.argv(rank=1, size=2, port=1)[3:])
    cache = rank_kv_cache(args, config, torch.bfloat16, torch.device("meta"))
    assert cache.dtype == torch.float8_e4m3fn and cache.num_blocks == 5
    assert (
        cache.num_layers == 2 and cache.keys[0].shape[2] == rank_kv_config(config, 2).num_kv_heads
    )
    with pytest.raises(InvalidParameterError, match="kv_cache_dtype"):
        rank_kv_cache(args, config, torch.bfloat16, torch.device("cpu"))


def test_ranks_past_the_last_cuda_device_are_refused_before_any_starts(
    tiny_model_dir, monkeypatch
) -> None:
    """Two ranks from cuda:0 on a machine with one GPU: refused at start naming the
    devices, instead of rank 1 failing as it loads (torch's "invalid device ordinal")."""
    from molink.parallel import stage

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    started: list[object] = []
    monkeypatch.setattr(stage, "Followers", lambda *args: started.append(args))
    source = hf_dir_source(tiny_model_dir("llama"))
    settings = FollowerSettings(None, 0, 4, "float32", "auto", 8, 16)
    cuda = torch.device("cuda", 0)
    with pytest.raises(InvalidParameterError, match=r"cuda:0 to cuda:1; this machine has 1"):
        stage.load_stage_slice(source, LayerRange(0, 4), "float32", "none", 2, settings, cuda)
    assert not started
    assert rank_devices(torch.device("cuda", 1), 1) == [torch.device("cuda", 1)]
    assert rank_devices(torch.device("cpu"), 3) == [torch.device("cpu")] * 3


def test_cuda_ranks_take_the_devices_after_the_stage_device() -> None:
    assert rank_device(torch.device("cuda", 1), 2) == torch.device("cuda", 3)
    assert rank_device(torch.device("cpu"), 1) == torch.device("cpu")
