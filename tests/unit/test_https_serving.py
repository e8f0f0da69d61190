"""The API over HTTPS (--ssl-keyfile/--ssl-certfile, fake engine in a subprocess), with
health open and metrics behind --api-key."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import sys
import time
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from molink.cli.args import EngineArgs
from molink.errors import InvalidParameterError
from tests.helpers.server_process import LOOPBACK, free_port, start_process, stop_process

API_KEY = "https-test-key"
STARTUP_SECONDS = 60.0


def _self_signed(folder: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(LOOPBACK))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    key_path, cert_path = folder / "key.pem", folder / "cert.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def _wait_https(url: str, context: ssl.SSLContext, process) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        assert process.poll() is None, "the server exited"
        try:
            if httpx.get(f"{url}/health", verify=context, timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError("the HTTPS server did not become healthy")


def test_api_over_https_with_keyed_metrics(tmp_path: Path) -> None:
    key_path, cert_path = _self_signed(tmp_path)
    port = free_port()
    command = [
        sys.executable, "-m", "tests.helpers.fake_engine", "--host", LOOPBACK,
        "--port", str(port), "--api-key", API_KEY,
        "--ssl-keyfile", str(key_path), "--ssl-certfile", str(cert_path),
    ]  # fmt: skip
    server = start_process(command, port)
    context = ssl.create_default_context(cafile=str(cert_path))
    url = f"https://{LOOPBACK}:{port}"
    try:
        _wait_https(url, context, server.process)
        auth = {"Authorization": f"Bearer {API_KEY}"}
        with httpx.Client(verify=context, timeout=10.0) as client:
            assert client.get(f"{url}/health").status_code == 200
            assert client.get(f"{url}/metrics").status_code == 401
            metrics = client.get(f"{url}/metrics", headers=auth)
            assert metrics.status_code == 200 and "molink:num_requests_running" in metrics.text
            body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
            chat = client.post(f"{url}/v1/chat/completions", json=body, headers=auth)
            assert chat.status_code == 200
            assert chat.json()["usage"]["completion_tokens"] == 3
        with pytest.raises(httpx.HTTPError):  # plain HTTP gets no answer from a TLS port
            httpx.get(f"http://{LOOPBACK}:{port}/health", timeout=5.0)
        with pytest.raises(httpx.ConnectError):  # a client that does not trust the cert
            httpx.get(f"{url}/health", timeout=5.0)
    finally:
        stop_process(server.process)
    assert "https://" in server.log_tail()


def test_https_flags_are_checked(tmp_path: Path) -> None:
    key_path, cert_path = _self_signed(tmp_path)
    EngineArgs(ssl_keyfile=str(key_path), ssl_certfile=str(cert_path))
    with pytest.raises(InvalidParameterError) as one:
        EngineArgs(ssl_keyfile=str(key_path))
    assert one.value.field == "ssl_certfile"
    with pytest.raises(InvalidParameterError, match="not a readable file") as missing:
        EngineArgs(ssl_keyfile=str(key_path), ssl_certfile=str(tmp_path / "absent.pem"))
    assert missing.value.field == "ssl_certfile"


def test_swarm_key_flags_need_a_pipeline_and_a_valid_key(tmp_path: Path) -> None:
    with pytest.raises(InvalidParameterError) as alone:
        EngineArgs(molink_swarm_key="molink-swarm-v1:x")
    assert alone.value.field == "molink_swarm_key"
    with pytest.raises(InvalidParameterError, match="is not a swarm key"):
        EngineArgs(molink_enabled=True, molink_grpc_port=50070, molink_swarm_key="secret")
    assert "molink-swarm-v1" not in repr(
        EngineArgs(molink_enabled=True, molink_swarm_key="molink-swarm-v1:" + "A" * 43)
    )


def test_client_certificate_flags_reach_uvicorn(tmp_path: Path) -> None:
    """vLLM's --ssl-ca-certs/--ssl-cert-reqs (mutual TLS): they were 'unrecognized
    arguments'; dropped, a server meant to require client certificates would not."""
    from molink.api import create_app
    from molink.api.server import make_server
    from molink.cli.serve import https_files
    from tests.helpers.fake_engine import FakeEngine

    files = [tmp_path / name for name in ("key.pem", "cert.pem", "ca.pem")]
    for path in files:
        path.write_text("x")
    key, cert, ca = map(str, files)
    args = EngineArgs(ssl_keyfile=key, ssl_certfile=cert, ssl_ca_certs=ca, ssl_cert_reqs=2)
    server = make_server(create_app(FakeEngine()), "127.0.0.1", 0, tls=https_files(args))
    assert (server.config.ssl_ca_certs, server.config.ssl_cert_reqs) == (ca, ssl.CERT_REQUIRED)
    for bad, field in (
        ({"ssl_cert_reqs": 3}, "ssl_cert_reqs"),
        ({"ssl_ca_certs": None}, "ssl_cert_reqs"),
        ({"ssl_keyfile": None, "ssl_certfile": None}, "ssl_ca_certs"),
        ({"ssl_ca_certs": str(tmp_path / "absent.pem")}, "ssl_ca_certs"),
    ):
        values = {"ssl_keyfile": key, "ssl_certfile": cert, "ssl_ca_certs": ca}
        with pytest.raises(InvalidParameterError) as info:
            EngineArgs(**{**values, "ssl_cert_reqs": 2, **bad})
        assert info.value.field == field
