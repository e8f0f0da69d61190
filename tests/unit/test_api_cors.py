"""vLLM's CORS flags (--allowed-origins and friends): a browser page on an allowed origin
may call the API; none is allowed unless the flags say so."""

from __future__ import annotations

import argparse
import shlex

import pytest
from fastapi.testclient import TestClient

from molink.api import ApiConfig, create_app
from molink.api.cors import CorsPolicy
from molink.cli.args import EngineArgs, add_engine_args
from molink.cli.main import main, parse_engine_args
from molink.cli.serve import cors_policy
from tests.helpers.fake_engine import FakeEngine

UI = "https://ui.example"
PREFLIGHT = {
    "Origin": UI,
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization, content-type",
}


def parse(command: str) -> EngineArgs:
    parser = add_engine_args(argparse.ArgumentParser(prog="test"))
    return parse_engine_args(parser, parser.parse_args(shlex.split(command)))


def test_the_flags_parse_as_vllms() -> None:
    """A vLLM command with them failed: "unrecognized arguments"."""
    args = parse(
        f"--allowed-origins '[\"{UI}\"]' --allow-credentials "
        '--allowed-methods \'["GET", "POST"]\' --allowed-headers \'["authorization"]\''
    )
    assert cors_policy(args) == CorsPolicy((UI,), True, ("GET", "POST"), ("authorization",))
    assert cors_policy(parse("")) is None


@pytest.mark.parametrize("value", ["*", "[1]", '{"a": 1}'])
def test_a_value_that_is_no_json_list_of_strings_is_a_usage_error(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--allowed-origins", value])
    assert exit_info.value.code == 2
    assert "--allowed-origins" in capsys.readouterr().err


def test_an_allowed_origin_may_call_even_where_a_key_is_needed() -> None:
    config = ApiConfig(api_key="k", cors=CorsPolicy(origins=(UI,)))
    with TestClient(create_app(FakeEngine(), config)) as client:
        preflight = client.options("/v1/chat/completions", headers=PREFLIGHT)
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == UI
        models = client.get("/v1/models", headers={"Origin": UI, "Authorization": "Bearer k"})
        assert models.status_code == 200
        assert models.headers["access-control-allow-origin"] == UI
        other = client.get(
            "/v1/models", headers={"Origin": "https://elsewhere", "Authorization": "Bearer k"}
        )
        assert "access-control-allow-origin" not in other.headers


def test_without_the_flags_no_origin_is_allowed() -> None:
    with TestClient(create_app(FakeEngine(), ApiConfig())) as client:
        preflight = client.options("/v1/chat/completions", headers=PREFLIGHT)
        assert "access-control-allow-origin" not in preflight.headers
        models = client.get("/v1/models", headers={"Origin": UI})
        assert "access-control-allow-origin" not in models.headers
