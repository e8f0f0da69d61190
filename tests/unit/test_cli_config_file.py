"""`molink serve --config FILE`: a YAML file of flags, as `vllm serve --config` reads it;
flags on the command line win."""

from __future__ import annotations

from pathlib import Path

import pytest

import molink.cli.serve as serve_module
from molink.cli.args import EngineArgs
from molink.cli.main import main

CONFIG = """
model: /models/qwen
port: 8123
tensor-parallel-size: 1
enable_prefix_caching: false
enforce-eager: true
trust-remote-code: false
served-model-name: [first, second]
max-model-len: 4k
allowed-origins: ["https://ui.example"]
override-generation-config: {temperature: 0.5}
"""


@pytest.fixture
def captured_runs(monkeypatch: pytest.MonkeyPatch) -> list[EngineArgs]:
    runs: list[EngineArgs] = []

    def fake_run_server(args: EngineArgs) -> int:
        runs.append(args)
        return 0

    monkeypatch.setattr(serve_module, "run_server", fake_run_server)
    return runs


def test_a_config_file_gives_the_flags(tmp_path: Path, captured_runs: list[EngineArgs]) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG)
    assert main(["serve", "--config", str(path)]) == 0
    assert main(["serve", "/models/qwen", "--config", str(path), "--port", "9000"]) == 0
    assert main(["stage", f"--config={path}", "--enable-prefix-caching"]) == 0
    first, second, third = captured_runs
    assert (first.model, first.port, first.max_model_len) == ("/models/qwen", 8123, 4000)
    assert not first.enable_prefix_caching and first.enforce_eager
    assert (first.served_model_name, first.served_model_aliases) == ("first", ("second",))
    assert first.allowed_origins == ("https://ui.example",)
    assert first.override_generation_config == '{"temperature": 0.5}'
    assert second.port == 9000  # the command line wins
    assert third.enable_prefix_caching and third.molink_enabled


@pytest.mark.parametrize(
    ("text", "word"),
    [("- a\n- b\n", "mapping"), ("no-such-flag: 1\n", "--no-such-flag"), ("port: [1\n", "YAML")],
)
def test_a_bad_config_file_exits_2_naming_it(
    tmp_path: Path, text: str, word: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--config", str(path)])
    assert exit_info.value.code == 2
    assert word in capsys.readouterr().err


def test_a_missing_config_file_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--config", "/nonexistent.yaml"])
    assert exit_info.value.code == 2 and "/nonexistent.yaml" in capsys.readouterr().err
