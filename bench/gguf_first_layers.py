"""Write a GGUF file holding only the first N decoder layers of another (metadata, tokenizer,
embedding, final norm and LM head kept; tensors copied byte for byte, still quantized).

A real quantized model small enough to travel where a whole one cannot (the device check
takes SmolLM2 Q4_1's first 8 of 30 layers: 48 MB instead of 98 MB). gguf's own reader and
writer do the work, as its ``gguf_new_metadata`` script does, so every field type is kept.

    python bench/gguf_first_layers.py IN.gguf OUT.gguf --layers 8
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

import gguf

logger = logging.getLogger("gguf_first_layers")
_BLOCK = re.compile(r"^blk\.(\d+)\.")


def _keeps(name: str, layers: int) -> bool:
    found = _BLOCK.match(name)
    return found is None or int(found.group(1)) < layers


def write_first_layers(source: Path, target: Path, layers: int) -> Path:
    reader = gguf.GGUFReader(source)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    count_key = gguf.Keys.LLM.BLOCK_COUNT.format(arch=arch)
    total = int(reader.fields[count_key].contents())
    if not 1 <= layers <= total:
        raise ValueError(f"layers: {layers} must be in [1, {total}] (the file's block count)")
    writer = gguf.GGUFWriter(target, arch=arch, endianess=reader.endianess)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue  # written by GGUFWriter itself
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        value = layers if field.name == count_key else field.contents()
        writer.add_key_value(field.name, value, value_type, sub_type=sub_type)
    tensors = [t for t in reader.tensors if _keeps(t.name, layers)]
    for tensor in tensors:
        writer.add_tensor_info(
            tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes,
            tensor.tensor_type,
        )  # fmt: skip
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in tensors:
        writer.write_tensor_data(tensor.data, tensor_endianess=reader.endianess)
    writer.close()
    logger.info("%s: %d of %d layers, %d tensors", target, layers, total, len(tensors))
    return target


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("target", type=Path)
    parser.add_argument("--layers", type=int, required=True)
    args = parser.parse_args(argv)
    write_first_layers(args.source, args.target, args.layers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
