"""Generate the Python code for molink.proto.

The generated modules are committed under ``molink/transport/generated`` so that a plain
install needs no protoc; a unit test regenerates them and checks that they are current.
Regenerate after editing the schema with::

    python -m molink.transport.protogen
"""

from __future__ import annotations

import logging
import re
import sys
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

PROTO_DIR = Path(__file__).resolve().parent
PROTO_FILE = PROTO_DIR / "molink.proto"
GENERATED_DIR = PROTO_DIR / "generated"
GENERATED_PACKAGE = "molink.transport.generated"
GENERATED_FILES = ("molink_pb2.py", "molink_pb2.pyi", "molink_pb2_grpc.py")

# protoc writes a top-level import; the package needs an absolute one.
_GRPC_IMPORT = re.compile(r"^import molink_pb2 as molink__pb2$", re.MULTILINE)


def generate(out_dir: Path) -> list[Path]:
    """Run protoc on molink.proto into ``out_dir`` and fix the generated imports."""
    from grpc_tools import protoc  # only needed at development time

    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(PROTO_FILE),
    ]
    status = protoc.main(args)
    if status != 0:
        raise RuntimeError(f"protoc failed with status {status} on {PROTO_FILE}")
    grpc_file = out_dir / "molink_pb2_grpc.py"
    text = grpc_file.read_text()
    grpc_file.write_text(
        _GRPC_IMPORT.sub(f"from {GENERATED_PACKAGE} import molink_pb2 as molink__pb2", text)
    )
    return [out_dir / name for name in GENERATED_FILES]


def stale_files() -> list[str]:
    """Names of committed generated files that differ from a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        return [
            path.name
            for path in fresh
            if not (GENERATED_DIR / path.name).exists()
            or (GENERATED_DIR / path.name).read_bytes() != path.read_bytes()
        ]


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for path in generate(GENERATED_DIR):
        logger.info("wrote %s", path)
    init = GENERATED_DIR / "__init__.py"
    if not init.exists():
        init.write_text('"""Code generated from molink/transport/molink.proto. Do not edit."""\n')
    return 0


if __name__ == "__main__":
    sys.exit(main())
