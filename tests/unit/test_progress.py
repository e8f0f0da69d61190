"""Terminal progress: drawn on a terminal, silent when stdout is a file or a pipe."""

from __future__ import annotations

import io
import sys
import threading
from pathlib import Path

import pytest

from molink.config import LayerRange
from molink.progress import progress_enabled
from molink.progress.waiting import Coverage, PipelineWaitStatus
from molink.weights import resolve_model_source
from molink.weights.gguf_convert import convert_gguf_to_hf_dir
from tests.helpers.tiny_gguf import write_tiny_gguf


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def tiny_gguf(tiny_model_dir, tmp_path: Path) -> Path:
    return write_tiny_gguf(tiny_model_dir("llama"), tmp_path / "tiny-llama.gguf")


def _convert(gguf: Path, out: Path, monkeypatch, stdout: io.StringIO) -> str:
    monkeypatch.setattr(sys, "stdout", stdout)
    out.mkdir()
    convert_gguf_to_hf_dir(gguf, out)
    return stdout.getvalue()


def test_conversion_shows_progress_on_a_terminal(tiny_gguf, tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("MOLINK_NO_PROGRESS", raising=False)
    shown = _convert(tiny_gguf, tmp_path / "out", monkeypatch, FakeTerminal())
    assert "converting tiny-llama.gguf" in shown
    assert "tensor" in shown and "100%" in shown


def test_conversion_is_silent_without_a_terminal(tiny_gguf, tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("MOLINK_NO_PROGRESS", raising=False)
    assert _convert(tiny_gguf, tmp_path / "out", monkeypatch, io.StringIO()) == ""


def test_progress_can_be_turned_off_on_a_terminal(tiny_gguf, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MOLINK_NO_PROGRESS", "1")
    assert not progress_enabled(FakeTerminal())
    assert _convert(tiny_gguf, tmp_path / "out", monkeypatch, FakeTerminal()) == ""


def test_weight_loading_shows_layers_on_a_terminal(tiny_model_dir, monkeypatch) -> None:
    monkeypatch.delenv("MOLINK_NO_PROGRESS", raising=False)
    source = resolve_model_source(str(tiny_model_dir("llama")))
    for stream, expected in ((FakeTerminal(), True), (io.StringIO(), False)):
        monkeypatch.setattr(sys, "stdout", stream)
        source.load_slice(LayerRange(0, source.model_config.num_layers))
        assert ("loading layers" in stream.getvalue()) is expected


class _Pipeline:
    """Coverage that completes once the test says a stage joined."""

    def __init__(self) -> None:
        self.joined = threading.Event()
        self.polled_after_join = threading.Event()

    def __call__(self) -> Coverage:
        if self.joined.is_set():
            self.polled_after_join.set()
            return Coverage(30, 30, None)
        return Coverage(15, 30, "layers [15, 30) are not served by any node")


def test_waiting_for_the_pipeline_names_the_missing_layers(monkeypatch) -> None:
    monkeypatch.delenv("MOLINK_NO_PROGRESS", raising=False)
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    pipeline = _Pipeline()
    status = PipelineWaitStatus(pipeline, interval_s=0.01).start()
    try:
        for _ in range(500):  # bounded: until the line was drawn once
            if "layers [15, 30)" in terminal.getvalue():
                break
            threading.Event().wait(0.01)
        pipeline.joined.set()
        assert pipeline.polled_after_join.wait(10)
    finally:
        status.stop()
    shown = terminal.getvalue()
    assert "waiting for the pipeline" in shown and "15/30" in shown
    assert "layers [15, 30) are not served by any node" in shown


def test_waiting_is_silent_without_a_terminal(monkeypatch) -> None:
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stdout", stream)
    pipeline = _Pipeline()
    status = PipelineWaitStatus(pipeline, interval_s=0.01).start()
    status.stop()
    assert stream.getvalue() == ""
