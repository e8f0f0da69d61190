"""A GGUF file's tokenizer converted in a child process.

The conversion goes through transformers (molink.weights.gguf_source.export_gguf_tokenizer),
whose modules, once imported, stay resident for the life of the process that imported
them: measured converting SmolLM2 Q4_1's tokenizer after ``import torch``, +92 MiB held
after ``malloc_trim`` (bench/quant_memory_phases.py shows it on a server's first start).
A child imports them, writes the files, and exits; the server never imports transformers.
It costs the child's start (~2 s) once per file: the result is cached.

    python -m molink.weights.tokenizer_child FILE.gguf OUT_DIR
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from molink.errors import WeightLoadError

logger = logging.getLogger(__name__)


def export_in_child(gguf_path: Path, out_dir: Path) -> None:
    """Writes ``out_dir`` as export_gguf_tokenizer does; its error, if any, as a
    WeightLoadError with the child's message."""
    # The child finds molink where this process did (a source checkout included).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    command = [sys.executable, "-m", __name__, str(gguf_path), str(out_dir)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines()
        status = f"converting the tokenizer of {gguf_path} failed (status {result.returncode})"
        raise WeightLoadError(lines[-1] if lines else status)


def main(argv: list[str]) -> int:
    from molink.weights.gguf_source import export_gguf_tokenizer

    try:
        export_gguf_tokenizer(Path(argv[0]), Path(argv[1]))
    except WeightLoadError as exc:
        print(exc, file=sys.stderr)  # the parent raises it with this message
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
