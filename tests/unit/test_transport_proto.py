"""The committed generated code matches molink.proto."""

from __future__ import annotations

import pytest

from molink.transport import PROTOCOL_VERSION, protogen


def test_generated_code_is_current() -> None:
    pytest.importorskip("grpc_tools")
    stale = protogen.stale_files()
    assert not stale, f"regenerate with `python -m molink.transport.protogen`: {stale}"


def test_generated_code_imports_as_a_package() -> None:
    from molink.transport.generated import molink_pb2, molink_pb2_grpc

    assert molink_pb2.DESCRIPTOR.package == "molink.v1"
    assert hasattr(molink_pb2_grpc, "MolinkNodeStub")
    assert PROTOCOL_VERSION >= 1
