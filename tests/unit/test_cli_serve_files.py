"""Files named by serving flags (--chat-template, --generation-config) are read before the
model loads, and a failure after the engine is built still shuts the engine down."""

from __future__ import annotations

from pathlib import Path

import pytest

from molink.cli.args import EngineArgs
from molink.cli.serve import run_server
from tests.helpers.fake_engine import FakeEngine


class _Factory:
    def __init__(self, tokenizer_dir: Path | None = None) -> None:
        self.engines: list[FakeEngine] = []
        self._tokenizer_dir = tokenizer_dir

    def __call__(self, _: EngineArgs) -> FakeEngine:
        engine = FakeEngine()
        if self._tokenizer_dir is not None:
            engine.tokenizer.name_or_path = str(self._tokenizer_dir)
        self.engines.append(engine)
        return engine


@pytest.mark.parametrize(
    "flags",
    [
        {"generation_config": "/nonexistent/folder"},
        {"chat_template": "/nonexistent/template.jinja"},
    ],
)
def test_a_missing_file_fails_before_the_model_loads(
    flags: dict, caplog: pytest.LogCaptureFixture
) -> None:
    """They were read once the engine was built: with a large model, minutes later."""
    factory = _Factory()
    assert run_server(EngineArgs(port=0, **flags), engine_factory=factory) == 1
    assert factory.engines == []
    assert "/nonexistent/" in caplog.text


@pytest.mark.parametrize("content", ["{not json", "[1]"])
def test_an_unreadable_model_generation_config_shuts_the_engine_down(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: str
) -> None:
    """The engine was left running (its stages, threads and sockets) when this failed."""
    (tmp_path / "generation_config.json").write_text(content, encoding="utf-8")
    factory = _Factory(tokenizer_dir=tmp_path)
    assert run_server(EngineArgs(port=0), engine_factory=factory) == 1
    (engine,) = factory.engines
    assert engine.shut_down
    assert "generation_config.json" in caplog.text
