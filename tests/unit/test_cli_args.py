"""Flag parsing and validation of every serving flag, and the subcommands' wiring."""

from __future__ import annotations

import argparse
import dataclasses
import shlex

import pytest

import molink.cli.serve as serve_module
from molink.cli import args as args_module
from molink.cli.args import EngineArgs, add_engine_args, parse_size
from molink.cli.main import build_parser, main, parse_engine_args
from molink.errors import InvalidParameterError, PipelineError
from molinkv1.entrypoints import api_server
from molinkv1.entrypoints.openai import api_server as openai_api_server
from tests.helpers.fake_engine import FakeEngine

README_COMMANDS = [
    "--model Qwen/Qwen3-14B --molink-enabled --molink-grpc-port 50061 --molink-start-layer 0 "
    "--molink-end-layer 20 --port 8080 --max-model-len 4096",
    "--model Qwen/Qwen3-14B --molink-enabled --molink-grpc-port 50062 --molink-start-layer 20 "
    "--molink-end-layer -1 --port 9095 --max-model-len 4096 --molink-initial-peer 10.130.151.15:50061",
    "--model meta-llama/Llama-2-70b-chat-hf --port 8080 --dtype half --max-model-len 4096",
    "--model meta-llama/Llama-2-70b-chat-hf --molink-enabled --tensor-parallel-size 2 "
    "--molink-start-layer 0 --molink-end-layer 20",
    "--model Qwen/Qwen3-14B --molink-enabled --molink-grpc-port 50061 --molink-start-layer 0 "
    "--molink-end-layer -1",
]

ALL_FLAGS = (
    "--model /models/qwen --served-model-name qwen --host 127.0.0.1 --port 9000 --dtype bfloat16 "
    "--max-model-len 2048 --tensor-parallel-size 1 --api-key secret --max-num-seqs 8 "
    "--max-num-batched-tokens 512 --block-size 32 --kv-cache-memory 512MiB --num-threads 2 "
    "--seed 42 --log-level debug --molink-enabled --molink-grpc-port 50070 "
    "--molink-start-layer 4 --molink-end-layer 12 --molink-initial-peer 127.0.0.1:50061 "
    "--molink-advertise-host 10.0.0.5 --molink-micro-batches 3 --molink-wire-dtype int8"
)


def parse(command: str) -> EngineArgs:
    parser = add_engine_args(argparse.ArgumentParser(prog="test"))
    return parse_engine_args(parser, parser.parse_args(shlex.split(command)))


@pytest.mark.parametrize("command", README_COMMANDS)
def test_readme_commands_parse(command: str) -> None:
    assert parse(command).model


def test_readme_second_server() -> None:
    args = parse(README_COMMANDS[1])
    assert (args.molink_start_layer, args.molink_end_layer) == (20, -1)
    assert args.molink_initial_peer == "10.130.151.15:50061"
    assert (args.port, args.molink_grpc_port, args.max_model_len) == (9095, 50062, 4096)


def test_every_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(args_module.API_KEY_ENV, raising=False)
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    args = parse(ALL_FLAGS)
    assert args == EngineArgs(
        model="/models/qwen",
        served_model_name="qwen",
        host="127.0.0.1",
        port=9000,
        dtype="bfloat16",
        max_model_len=2048,
        tensor_parallel_size=1,
        api_key="secret",
        max_num_seqs=8,
        max_num_batched_tokens=512,
        block_size=32,
        kv_cache_memory=512 * 1024**2,
        num_threads=2,
        seed=42,
        log_level="debug",
        molink_enabled=True,
        molink_grpc_port=50070,
        molink_start_layer=4,
        molink_end_layer=12,
        molink_initial_peer="127.0.0.1:50061",
        molink_advertise_host="10.0.0.5",
        molink_micro_batches=3,
        molink_wire_dtype="int8",
    )
    assert args.model_name == "qwen"


def test_parser_defaults_match_the_dataclass(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(args_module.API_KEY_ENV, raising=False)
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    parsed = parse("")
    # Derived from the command line: no layer flag given, so the node may place itself.
    assert parsed.molink_auto_place and not parse("--molink-start-layer 0").molink_auto_place
    assert dataclasses.replace(parsed, molink_auto_place=False) == EngineArgs()


def test_defaults() -> None:
    args = EngineArgs()
    assert (args.host, args.port, args.dtype) == ("0.0.0.0", 8000, "auto")
    assert (args.molink_grpc_port, args.molink_start_layer, args.molink_end_layer) == (50061, 0, -1)
    assert (args.molink_micro_batches, args.molink_wire_dtype) == (0, "auto")
    assert args.model is None and args.model_name == "SmolLM2-135M-Instruct"
    assert parse("--dtype half").dtype == "float16"


def test_help_lists_every_flag_with_its_default() -> None:
    text = add_engine_args(argparse.ArgumentParser(prog="x")).format_help()
    # Set from which flags were given, or from a flag of another name (the names after the
    # first of --served-model-name), not flags themselves.
    derived = {"molink_auto_place", "served_model_aliases", "compat_flags"}
    fields = [f for f in dataclasses.fields(EngineArgs) if f.name not in derived]
    for field in fields:
        flag = "--" + field.name.replace("_", "-")
        assert flag in text, flag
    assert text.count("(default:") >= len(fields) - 1
    for default in ("0.0.0.0", "8000", "50061", "SmolLM2-135M-Instruct", "float16", "-1"):
        assert default in text


def test_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--help"], ["serve", "--help"], ["stage", "--help"], ["status", "--help"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 0
    assert "--molink-wire-dtype" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("command", "flag"),
    [
        ("--molink-enabled --molink-start-layer -1", "--molink-start-layer"),
        ("--molink-enabled --molink-start-layer 5 --molink-end-layer 5", "--molink-end-layer"),
        ("--molink-enabled --molink-end-layer -2", "--molink-end-layer"),
        ("--molink-start-layer 4", "--molink-start-layer"),
        ("--molink-end-layer 4", "--molink-end-layer"),
        ("--molink-initial-peer 10.0.0.1:50061", "--molink-initial-peer"),
        ("--molink-enabled --molink-initial-peer nohost", "--molink-initial-peer"),
        ("--molink-enabled --molink-initial-peer host:99999", "--molink-initial-peer"),
        ("--molink-enabled --molink-grpc-port 8000", "--molink-grpc-port"),
        ("--molink-enabled --molink-micro-batches -1", "--molink-micro-batches"),
        ("--port 70000", "--port"),
        ("--max-model-len 0", "--max-model-len"),
        ("--tensor-parallel-size 0", "--tensor-parallel-size"),
        ("--max-num-seqs 0", "--max-num-seqs"),
        ("--max-num-seqs 64 --max-num-batched-tokens 32", "--max-num-batched-tokens"),
        ("--block-size 0", "--block-size"),
        ("--num-threads 0", "--num-threads"),
        ("--kv-cache-memory 12parsecs", "--kv-cache-memory"),
        ("--dtype float8", "--dtype"),
        ("--molink-wire-dtype int4", "--molink-wire-dtype"),
        ("--quantized-batch-kernel int2", "--quantized-batch-kernel"),
        ("--molink-layer-step-ms 0", "--molink-layer-step-ms"),
    ],
)
def test_invalid_flags_exit_2_naming_the_flag(
    command: str, flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", *shlex.split(command)])
    assert exit_info.value.code == 2
    assert flag in capsys.readouterr().err


@pytest.mark.parametrize(
    "command",
    [
        "serve --max-num-seqs 64 --max-num-batched-tokens 32",
        "stage --max-num-batched-tokens 32 --max-num-seqs 64",
        "serve --max-num-batched-tokens 32 --max-num-seqs 64 --molink-enabled",
    ],
)
def test_a_token_budget_below_max_num_seqs_names_both_flags_and_values(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """As vLLM refuses it at startup; the message named one flag and one value."""
    with pytest.raises(SystemExit) as exit_info:
        main(shlex.split(command))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--max-num-batched-tokens 32" in err and "--max-num-seqs 64" in err, err


@pytest.mark.parametrize(
    ("text", "tokens"),
    [("4096", 4096), ("4k", 4000), ("32K", 32768), ("25.6k", 25600), ("1m", 1_000_000),
     ("2M", 2 * 2**20)],
)  # fmt: skip
def test_token_counts_take_vllms_suffixes(text: str, tokens: int) -> None:
    """vLLM reads --max-model-len and --max-num-batched-tokens as human-readable integers
    (k, m, g decimal; K, M, G binary); "32k" copied from a vLLM command was a usage error."""
    args = parse(f"--max-model-len {text} --max-num-batched-tokens {text} --max-num-seqs 1")
    assert (args.max_model_len, args.max_num_batched_tokens) == (tokens, tokens)


@pytest.mark.parametrize("text", ["1.5K", "4x", "k", "4 k", "-"])
def test_a_token_count_that_is_not_one_is_a_usage_error(
    text: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--max-model-len", text])
    assert exit_info.value.code == 2
    assert "--max-model-len" in capsys.readouterr().err


def test_served_model_name_takes_several_names_as_in_vllm() -> None:
    """vLLM's --served-model-name takes one or more names (responses carry the first); a
    second name was an unrecognized argument."""
    args = parse("--model /m --served-model-name first second first")
    assert args.model_name == "first"
    assert serve_module.served_names(args, "/m") == ("first", "second", "/m")
    assert serve_module.served_names(parse("--model /m"), "/m") == ("/m",)


@pytest.mark.parametrize(("flag", "dtype"), [("half", "float16"), ("float", "float32")])
def test_vllms_dtype_aliases(flag: str, dtype: str) -> None:
    """vLLM's --dtype choices include half and float; float was an invalid choice."""
    assert parse(f"--dtype {flag}").dtype == dtype


def test_engine_args_validate_in_code() -> None:
    with pytest.raises(InvalidParameterError) as error:
        EngineArgs(molink_enabled=True, molink_start_layer=3, molink_end_layer=2)
    assert error.value.field == "molink_end_layer"


@pytest.mark.parametrize(
    ("text", "size"),
    [("512MiB", 512 * 1024**2), ("2GiB", 2 * 1024**3), ("1.5GB", 1_500_000_000), ("4096", 4096),
     ("64k", 64_000), ("1 gib", 1024**3)],
)  # fmt: skip
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_api_key_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(args_module.API_KEY_ENV, "from-env")
    assert parse("").api_key == "from-env"
    assert parse("--api-key flag").api_key == "flag"


def test_vllms_api_key_variable_is_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM takes its key from $VLLM_API_KEY when --api-key is not given; a server started
    that way here served everyone, without a key."""
    monkeypatch.delenv(args_module.API_KEY_ENV, raising=False)
    monkeypatch.setenv("VLLM_API_KEY", "from-vllm-env")
    assert parse("").api_key == "from-vllm-env"
    assert parse("--api-key flag").api_key == "flag"
    monkeypatch.setenv(args_module.API_KEY_ENV, "from-env")
    assert parse("").api_key == "from-env"


def test_embedded_default_model(monkeypatch: pytest.MonkeyPatch) -> None:
    assert EngineArgs(model="/m").resolved_model() == "/m"
    monkeypatch.setattr(args_module, "embedded_model_path", lambda: None)
    with pytest.raises(InvalidParameterError) as error:
        EngineArgs().resolved_model()
    assert error.value.field == "model"
    monkeypatch.setattr(args_module, "embedded_model_path", lambda: "/pkg/SmolLM2.gguf")
    assert EngineArgs().resolved_model() == "/pkg/SmolLM2.gguf"


@pytest.fixture
def captured_runs(monkeypatch: pytest.MonkeyPatch) -> list[EngineArgs]:
    runs: list[EngineArgs] = []

    def fake_run_server(args: EngineArgs) -> int:
        runs.append(args)
        return 0

    monkeypatch.setattr(serve_module, "run_server", fake_run_server)
    return runs


def test_serve_takes_the_model_as_vllm_serve_does(
    captured_runs: list[EngineArgs], capsys: pytest.CaptureFixture[str]
) -> None:
    """`vllm serve MODEL ...`: the same command with molink was "unrecognized arguments"."""
    assert main(["serve", "/models/qwen", "--port", "8123"]) == 0
    assert main(["stage", "/models/qwen", "--molink-start-layer", "3"]) == 0
    assert main(["serve", "/models/qwen", "--model", "/models/qwen"]) == 0
    assert [a.model for a in captured_runs] == ["/models/qwen"] * 3
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "/models/a", "--model", "/models/b"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "/models/a" in err and "/models/b" in err


def test_serve_and_stage_build_engine_args(captured_runs: list[EngineArgs]) -> None:
    assert main(["serve", "--port", "8123"]) == 0
    assert main(["stage", "--molink-start-layer", "3"]) == 0
    serve_args, stage_args = captured_runs
    assert serve_args.port == 8123 and not serve_args.molink_enabled
    assert stage_args.molink_enabled and stage_args.molink_start_layer == 3


@pytest.mark.parametrize("entry", [api_server.main, openai_api_server.main])
def test_module_entry_points_take_the_same_flags(
    entry: object, captured_runs: list[EngineArgs]
) -> None:
    assert entry(shlex.split(README_COMMANDS[1])) == 0  # type: ignore[operator]
    assert captured_runs[0].molink_initial_peer == "10.130.151.15:50061"


def test_status_prints_the_pipeline(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import molink.discovery.status as status

    def report(address: str) -> str:
        return f"pipeline at {address}\n  node a [0, 12)"

    monkeypatch.setattr(status, "swarm_status", report)
    assert main(["status", "--peer", "127.0.0.1:50061"]) == 0
    assert capsys.readouterr().out == "pipeline at 127.0.0.1:50061\n  node a [0, 12)\n"


def test_status_reports_an_unreachable_peer(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import molink.discovery.status as status

    def unreachable(address: str) -> str:
        raise PipelineError(f"{address} did not answer")

    monkeypatch.setattr(status, "swarm_status", unreachable)
    assert main(["status", "--peer", "127.0.0.1:1"]) == 1
    assert "did not answer" in capsys.readouterr().err


def test_status_needs_a_peer() -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["status"])
    assert exit_info.value.code == 2


def test_tensor_parallel_size_has_vllm_short_flag() -> None:
    parser = add_engine_args(argparse.ArgumentParser())
    assert parse_engine_args(parser, parser.parse_args(["-tp", "2"])).tensor_parallel_size == 2


def test_tensor_parallel_size_that_does_not_divide_the_heads_fails_at_start(
    tiny_model_dir, caplog: pytest.LogCaptureFixture
) -> None:
    """Refused before any other rank starts: the message names both numbers."""
    args = EngineArgs(model=str(tiny_model_dir("llama")), tensor_parallel_size=3, port=0)
    assert serve_module.run_server(args) == 1
    assert "tensor_parallel_size: 3 does not divide the model's 4 attention heads" in caplog.text
    assert "started tensor-parallel ranks" not in caplog.text


def test_engine_build_failure_exits_1(caplog: pytest.LogCaptureFixture) -> None:
    def broken(_: EngineArgs) -> FakeEngine:
        raise PipelineError("no stage answered at 127.0.0.1:1")

    assert serve_module.run_server(EngineArgs(port=0), engine_factory=broken) == 1
    assert "no stage answered" in caplog.text
