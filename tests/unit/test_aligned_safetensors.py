"""Packed-cache files put their tensors on 64-byte boundaries, so mapped weights are aligned."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save

from molink.weights import aligned_safetensors as aligned_st


def tensor_offsets(data: bytes) -> dict[str, int]:
    """Each tensor's byte offset from the start of serialized safetensors ``data``."""
    start = 8 + int.from_bytes(data[:8], "little")
    header = json.loads(data[8:start])
    return {
        name: start + int(entry["data_offsets"][0])
        for name, entry in header.items()
        if name != "__metadata__"
    }


def _tensors(extra_name_length: int) -> dict[str, torch.Tensor]:
    # Sizes that are multiples of 64 bytes, in several dtypes (the library orders them by
    # dtype, then name); the name's length moves where an unpadded header would end.
    return {
        "n" * extra_name_length + ".norm": torch.arange(16, dtype=torch.float32),
        "layer.scale_zero": torch.ones(4, 32, 2, dtype=torch.bfloat16),
        "layer.planes": torch.arange(64 * 8, dtype=torch.uint8).view(64, 8),
    }


@pytest.mark.parametrize("name_length", range(1, 17))
def test_every_tensor_starts_on_a_64_byte_boundary(name_length: int) -> None:
    tensors = _tensors(name_length)
    data = aligned_st.serialize(tensors, {"info": "x" * name_length})
    offsets = tensor_offsets(data)
    assert set(offsets) == set(tensors)
    assert all(offset % aligned_st.ALIGN == 0 for offset in offsets.values()), offsets


def test_the_plain_library_would_not_align_them() -> None:
    """The case the module exists for: some header lengths leave the data off a line."""
    starts = {
        tensor_offsets(save(_tensors(n), {"info": "x" * n}))["layer.planes"] % aligned_st.ALIGN
        for n in range(1, 17)
    }
    assert starts != {0}


def test_the_file_reads_back_with_its_metadata(tmp_path: Path) -> None:
    tensors = _tensors(5)
    path = tmp_path / "part.safetensors"
    aligned_st.write(path, tensors, {"molink.quant": '{"a": 1}'})
    with safe_open(str(path), framework="pt") as handle:
        assert set(handle.keys()) == set(tensors)
        assert (handle.metadata() or {})["molink.quant"] == '{"a": 1}'
        for name, tensor in tensors.items():
            read = handle.get_tensor(name)
            assert torch.equal(read, tensor)
            assert read.data_ptr() % aligned_st.ALIGN == 0  # the mapping is page-aligned


def test_aligned_copies_only_a_tensor_off_a_boundary() -> None:
    base = torch.zeros(256, dtype=torch.uint8)
    assert base.data_ptr() % aligned_st.ALIGN == 0
    assert aligned_st.aligned(base) is base
    off = base[8:72]
    copy = aligned_st.aligned(off)
    assert copy is not off and copy.data_ptr() % aligned_st.ALIGN == 0 and torch.equal(copy, off)
    empty = base[8:8]  # nothing to read: kept wherever it points
    assert aligned_st.aligned(empty) is empty
