"""Weight loading from Hugging Face directories and the hub: only a stage's tensors, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from molink.config import LayerRange
from molink.errors import InvalidParameterError, UnsupportedArchitectureError, WeightLoadError
from molink.models import checkpoint_tensor_names
from molink.weights import resolve_model_source, resolve_torch_dtype
from molink.weights.hf_dir import INDEX_FILE, read_weight_map, shards_for
from molink.weights.hub import hub_source, looks_like_hub_id


def _layer_names(names: list[str], layers: set[int]) -> bool:
    found = {int(n.split(".")[2]) for n in names if n.startswith("model.layers.")}
    return found == layers


@pytest.fixture(scope="module")
def sharded_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny llama re-saved in several shards with an index."""
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("sharded")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"))
    model.save_pretrained(out, max_shard_size="60KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir("llama") / name, out / name)
    assert (out / INDEX_FILE).is_file()
    return out


@pytest.mark.parametrize(
    ("start", "end", "first", "last"),
    [(0, 2, True, False), (1, 3, False, False), (2, 4, False, True), (0, 4, True, True)],
)
def test_a_slice_reads_only_its_tensors(tiny_model_dir, start, end, first, last) -> None:
    source = resolve_model_source(str(tiny_model_dir("llama")))
    model = source.load_slice(LayerRange(start, end), "float32")
    read = source.last_store.read_names
    assert sorted(read) == sorted(
        checkpoint_tensor_names(source.model_config, LayerRange(start, end))
    )
    assert _layer_names(read, set(range(start, end)))
    assert ("model.embed_tokens.weight" in read) == first
    assert ("model.norm.weight" in read) == last
    assert ("lm_head.weight" in read) == last
    assert model.is_first == first and model.is_last == last


def test_tied_last_slice_reads_the_embedding_as_its_head(tiny_model_dir) -> None:
    path = tiny_model_dir("llama_tied")
    source = resolve_model_source(str(path))
    model = source.load_slice(LayerRange(3, 4), "float32")
    assert "model.embed_tokens.weight" in source.last_store.read_names
    assert "lm_head.weight" not in source.last_store.read_names
    embed = load_file(str(path / "model.safetensors"))["model.embed_tokens.weight"]
    assert torch.equal(model.lm_head, embed)
    assert model.embed is None


def test_sharded_checkpoint_opens_only_the_shards_it_needs(sharded_dir: Path) -> None:
    weight_map = read_weight_map(sharded_dir / INDEX_FILE)
    assert len(set(weight_map.values())) >= 3
    source = resolve_model_source(str(sharded_dir))
    rng = LayerRange(1, 2)
    source.load_slice(rng, "float32")
    expected = shards_for(weight_map, checkpoint_tensor_names(source.model_config, rng))
    assert source.last_store.fetched_files == expected
    assert len(expected) < len(set(weight_map.values()))


def test_sharded_and_single_file_load_the_same_weights(sharded_dir, tiny_model_dir) -> None:
    rng = LayerRange(0, 4)
    sharded = resolve_model_source(str(sharded_dir)).load_slice(rng, "float32")
    single = resolve_model_source(str(tiny_model_dir("llama"))).load_slice(rng, "float32")
    for (name, a), (_, b) in zip(
        sharded.state_dict().items(), single.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_shards_for_keeps_first_use_order_and_skips_unknown_names() -> None:
    weight_map = {"a": "s2", "b": "s1", "c": "s2", "d": "s3"}
    assert shards_for(weight_map, ["c", "x", "b", "a"]) == ["s2", "s1"]


def _fake_hub(repo_dir: Path, calls: list[str]):
    def download(repo_id: str, filename: str, revision: str | None) -> Path:
        from molink.weights.hub import _NotOnHub

        assert repo_id == "acme/tiny"
        calls.append(filename)
        path = repo_dir / filename
        if not path.is_file():
            raise _NotOnHub(filename)
        return path

    return download


def test_hub_source_fetches_metadata_then_only_the_needed_shards(sharded_dir: Path) -> None:
    calls: list[str] = []
    source = hub_source("acme/tiny", download=_fake_hub(sharded_dir, calls))
    assert not any(c.endswith(".safetensors") for c in calls)
    assert {"config.json", "tokenizer.json", INDEX_FILE} <= set(calls)
    assert source.name == "acme/tiny"
    assert source.tokenizer_dir == sharded_dir
    rng = LayerRange(2, 3)
    calls.clear()
    source.load_slice(rng, "float32")
    weight_map = read_weight_map(sharded_dir / INDEX_FILE)
    assert calls == shards_for(weight_map, checkpoint_tensor_names(source.model_config, rng))


def test_hub_source_without_index_reads_the_single_file(tiny_model_dir) -> None:
    calls: list[str] = []
    source = hub_source("acme/tiny", download=_fake_hub(tiny_model_dir("qwen2"), calls))
    source.load_slice(LayerRange(0, 1), "float32")
    assert calls.count("model.safetensors") == 1


def test_hub_id_detection() -> None:
    assert looks_like_hub_id("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert not looks_like_hub_id("/abs/path")
    assert not looks_like_hub_id("a/b/c")
    assert not looks_like_hub_id("../x")


def test_generation_config_stop_ids_are_merged(tiny_model_dir, tmp_path: Path) -> None:
    shutil.copytree(tiny_model_dir("llama"), tmp_path / "m")
    (tmp_path / "m" / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert resolve_model_source(str(tmp_path / "m")).model_config.eos_token_ids == (2, 7)


def test_dtype_choices(tiny_model_dir) -> None:
    source = resolve_model_source(str(tiny_model_dir("qwen3")))
    model = source.load_slice(LayerRange(0, 1), "bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert source.load_slice(LayerRange(0, 1), "auto").dtype == torch.float32
    assert resolve_torch_dtype("auto", "bfloat16") == torch.bfloat16
    assert resolve_torch_dtype("auto", "float16") == torch.float32  # slow on CPU
    assert resolve_torch_dtype("auto", None) == torch.float32
    assert resolve_torch_dtype("fp16", "float32") == torch.float16
    with pytest.raises(InvalidParameterError) as info:
        source.load_slice(LayerRange(0, 1), "int8")
    assert info.value.field == "dtype"


def test_missing_weight_file_is_named(sharded_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "m"
    shutil.copytree(sharded_dir, copy)
    weight_map = read_weight_map(copy / INDEX_FILE)
    victim = weight_map["model.layers.3.mlp.down_proj.weight"]
    (copy / victim).unlink()
    source = resolve_model_source(str(copy))
    with pytest.raises(WeightLoadError, match=victim):
        source.load_slice(LayerRange(3, 4), "float32")


def test_truncated_weight_file_is_named(tiny_model_dir, tmp_path: Path) -> None:
    copy = tmp_path / "m"
    shutil.copytree(tiny_model_dir("llama"), copy)
    data = (copy / "model.safetensors").read_bytes()
    (copy / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightLoadError, match="model.safetensors"):
        resolve_model_source(str(copy)).load_slice(LayerRange(0, 1), "float32")


def test_missing_tensor_is_named(tiny_model_dir, tmp_path: Path) -> None:
    copy = tmp_path / "m"
    shutil.copytree(tiny_model_dir("llama"), copy)
    tensors = load_file(str(copy / "model.safetensors"))
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, str(copy / "model.safetensors"))
    source = resolve_model_source(str(copy))
    source.load_slice(LayerRange(2, 4), "float32")  # other layers still load
    with pytest.raises(WeightLoadError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight"):
        source.load_slice(LayerRange(0, 2), "float32")


def test_unknown_architecture(tiny_model_dir, tmp_path: Path) -> None:
    copy = tmp_path / "m"
    shutil.copytree(tiny_model_dir("llama"), copy)
    config = json.loads((copy / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitectureError, match="GPT2LMHeadModel"):
        resolve_model_source(str(copy))


def test_pickled_weights_are_refused(tmp_path: Path, tiny_model_dir) -> None:
    copy = tmp_path / "m"
    copy.mkdir()
    shutil.copy(tiny_model_dir("llama") / "config.json", copy / "config.json")
    (copy / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(WeightLoadError, match="pickled"):
        resolve_model_source(str(copy))


def test_unresolvable_model_names(tmp_path: Path) -> None:
    with pytest.raises(WeightLoadError, match="neither"):
        resolve_model_source(str(tmp_path / "nope"))
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(WeightLoadError, match="gguf"):
        resolve_model_source(str(tmp_path / "weights.txt"))


def test_layer_range_is_validated(tiny_model_dir) -> None:
    source = resolve_model_source(str(tiny_model_dir("llama")))
    with pytest.raises(InvalidParameterError):
        source.load_slice(LayerRange(2, 9), "float32")
