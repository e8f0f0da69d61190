"""Terminal progress: drawn on a terminal, silent when stdout is a file or a pipe."""

from __future__ import annotations

import io
import os
import pty
import select
import subprocess
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


_CONVERT = (
    "import sys; from pathlib import Path; "
    "from molink.weights.gguf_convert import convert_gguf_to_hf_dir; "
    "convert_gguf_to_hf_dir(Path(sys.argv[1]), Path(sys.argv[2]))"
)
REPO_ROOT = Path(__file__).resolve().parents[2]


def _run_on_a_pty(argv: list[str]) -> str:
    """Runs ``argv`` with a pseudo-terminal as stdout and stderr; returns what it wrote."""
    leader, follower = pty.openpty()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("MOLINK_NO_PROGRESS", None)
    process = subprocess.Popen(argv, stdout=follower, stderr=follower, env=env)
    os.close(follower)
    output = b""
    try:
        while select.select([leader], [], [], 120)[0]:  # bounded: 120 s of silence ends it
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the process closed the terminal
                break
            if not chunk:
                break
            output += chunk
    finally:
        os.close(leader)
        process.wait(timeout=60)
    assert process.returncode == 0, output.decode(errors="replace")
    return output.decode(errors="replace")


def test_conversion_in_a_real_terminal_and_in_a_pipe(tiny_gguf, tmp_path) -> None:
    """A bare pty reports a 0 x 0 size, which must not hide the bar."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    argv = [sys.executable, "-c", _CONVERT, str(tiny_gguf)]
    shown = _run_on_a_pty([*argv, str(tmp_path / "a")])
    assert "converting tiny-llama.gguf" in shown and "100%" in shown
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    piped = subprocess.run(
        [*argv, str(tmp_path / "b")], capture_output=True, text=True, env=env, timeout=120
    )
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout == "" and "converting tiny-llama.gguf:" not in piped.stderr


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
        return Coverage(15, 30, "[15, 30)")


def test_waiting_for_the_pipeline_names_the_missing_layers(monkeypatch) -> None:
    monkeypatch.delenv("MOLINK_NO_PROGRESS", raising=False)
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    pipeline = _Pipeline()
    status = PipelineWaitStatus(pipeline, interval_s=0.01).start()
    try:
        for _ in range(500):  # bounded: until the line was drawn once
            if "missing [15, 30)" in terminal.getvalue():
                break
            threading.Event().wait(0.01)
        pipeline.joined.set()
        assert pipeline.polled_after_join.wait(10)
    finally:
        status.stop()
    shown = terminal.getvalue()
    assert "waiting for the pipeline: 15/30 layers served, missing [15, 30)" in shown


def test_waiting_is_silent_without_a_terminal(monkeypatch) -> None:
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stdout", stream)
    pipeline = _Pipeline()
    status = PipelineWaitStatus(pipeline, interval_s=0.01).start()
    status.stop()
    assert stream.getvalue() == ""


def test_pipeline_coverage_counts_layers_and_names_the_gaps() -> None:
    from molink.cli.pipeline_builder import pipeline_coverage
    from molink.pipeline.identity import ModelIdentity, NodeInfo
    from molink.pipeline.registry import PipelineView

    model = ModelIdentity("m", "f", 30, 64, 100)
    stages = [NodeInfo("h", model, LayerRange(0, 10)), NodeInfo("s", model, LayerRange(20, 25))]

    class Head:
        def pipeline(self) -> PipelineView:
            return PipelineView("h", "h:1", 1, 30, tuple(stages))

    assert pipeline_coverage(Head()) == Coverage(15, 30, "[10, 20), [25, 30)")  # type: ignore[arg-type]
    stages.append(NodeInfo("t", model, LayerRange(10, 20)))
    stages.append(NodeInfo("u", model, LayerRange(25, 30)))
    assert pipeline_coverage(Head()) == Coverage(30, 30, None)  # type: ignore[arg-type]


def test_a_status_line_shows_what_long_work_does_now(monkeypatch) -> None:
    from molink.progress.status import status_line

    monkeypatch.delenv("MOLINK_NO_PROGRESS", raising=False)
    for stream, shown in ((FakeTerminal(), True), (io.StringIO(), False)):
        monkeypatch.setattr(sys, "stdout", stream)
        with status_line("profiling KV cache memory") as status:
            status.update("a forward pass over 8192 tokens")
            status.update("5120 blocks fit")
        text = stream.getvalue()
        assert ("profiling KV cache memory: a forward pass over 8192 tokens" in text) is shown
        assert ("profiling KV cache memory: 5120 blocks fit" in text) is shown
        assert shown or text == ""


@pytest.mark.parametrize("terminal", [True, False])
def test_a_stage_waiting_for_its_head_says_what_it_waits_for(monkeypatch, terminal) -> None:
    from molink.errors import PipelineError
    from molink.pipeline.identity import NodeInfo
    from molink.pipeline.node import StageNode
    from molink.pipeline.toy import ToyStageExecutor, toy_identity
    from molink.transport.config import TransportConfig

    monkeypatch.delenv("MOLINK_NO_PROGRESS", raising=False)
    stream = FakeTerminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stdout", stream)
    model = toy_identity(4)
    info = NodeInfo("s1", model, LayerRange(2, 4), "127.0.0.1:0")
    node = StageNode(
        ToyStageExecutor(LayerRange(2, 4), model),
        info,
        TransportConfig(join_timeout_s=1.0, rpc_timeout_s=0.5),
        initial_peer="127.0.0.1:9",  # nothing listens on the discard port
    )
    with pytest.raises(PipelineError, match="could not reach 127.0.0.1:9 to join"):
        node.start()
    node.stop()
    shown = stream.getvalue()
    assert ("waiting for 127.0.0.1:9 to join its pipeline: " in shown) is terminal
    assert terminal or shown == ""
