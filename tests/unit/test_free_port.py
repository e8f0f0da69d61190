"""Test processes' ports: never the same one twice, even when the kernel offers it again."""

from __future__ import annotations

import itertools

import pytest

from tests.helpers import server_process


class _Socket:
    offers = itertools.chain([41000, 41000, 41000], itertools.count(41001))

    def __init__(self, *args: object) -> None:
        self.port = 0

    def __enter__(self) -> _Socket:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def bind(self, address: tuple[str, int]) -> None:
        self.port = next(self.offers)

    def getsockname(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)


def test_a_port_offered_again_is_not_handed_out_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server_process.socket, "socket", _Socket)
    monkeypatch.setattr(server_process, "_HANDED_OUT", set())
    assert [server_process.free_port() for _ in range(2)] == [41000, 41001]
