"""Swarm keys, the derived authority, node identities, and where an open node binds."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from molink.errors import InvalidParameterError
from molink.security.authority import SwarmAuthority
from molink.security.credentials import SwarmCredentials
from molink.security.identity import NodeIdentity, node_id_of_certificate, verify_signature
from molink.security.node_setup import grpc_bind_host
from molink.security.swarm_key import SWARM_KEY_ENV, SwarmKey, generate_swarm_key, load_swarm_key


def test_key_text_round_trips_and_is_never_printed() -> None:
    key = generate_swarm_key()
    assert SwarmKey.parse(key.text()) == key
    assert SwarmKey.parse(f"  {key.text()}\n") == key
    assert key.text() not in repr(key) and key.text() not in str(key)
    assert generate_swarm_key() != key


@pytest.mark.parametrize(
    "text, message",
    [
        ("hunter2", "is not a swarm key"),
        ("molink-swarm-v1:", "must encode 32 bytes, got 0"),
        ("molink-swarm-v1:AAAA", "must encode 32 bytes, got 3"),
        ("molink-swarm-v1:***", "base64url"),
    ],
)
def test_malformed_keys_name_the_field(text: str, message: str) -> None:
    with pytest.raises(InvalidParameterError, match=message) as caught:
        SwarmKey.parse(text)
    assert caught.value.field == "molink_swarm_key"


def test_key_sources_flag_file_environment(tmp_path: Path) -> None:
    flag, from_file, from_env = (generate_swarm_key() for _ in range(3))
    path = tmp_path / "swarm.key"
    path.write_text(from_file.text() + "\n")
    env = {SWARM_KEY_ENV: from_env.text()}
    assert load_swarm_key(flag.text(), None, env) == flag
    assert load_swarm_key(None, str(path), env) == from_file
    assert load_swarm_key(None, None, env) == from_env
    assert load_swarm_key(None, None, {}) is None
    with pytest.raises(InvalidParameterError) as both:
        load_swarm_key(flag.text(), str(path), {})
    assert both.value.field == "molink_swarm_key_file"
    with pytest.raises(InvalidParameterError, match="cannot read") as missing:
        load_swarm_key(None, str(tmp_path / "absent"), {})
    assert missing.value.field == "molink_swarm_key_file"
    with pytest.raises(InvalidParameterError) as bad_env:
        load_swarm_key(None, None, {SWARM_KEY_ENV: "nope"})
    assert bad_env.value.field == SWARM_KEY_ENV


def test_every_member_derives_the_same_authority_and_other_keys_another() -> None:
    key = generate_swarm_key()
    first, second = SwarmAuthority.from_key(key), SwarmAuthority.from_key(SwarmKey(key.secret))
    assert first.certificate_pem() == second.certificate_pem()
    assert first.certificate.extensions.get_extension_for_class  # a real X.509 certificate
    other = SwarmAuthority.from_key(generate_swarm_key())
    assert other.certificate_pem() != first.certificate_pem()


def test_identity_is_the_key_and_membership_is_the_authority() -> None:
    authority = SwarmAuthority.from_key(generate_swarm_key())
    member = NodeIdentity.generate(authority)
    assert member.certificate is not None
    assert node_id_of_certificate(member.certificate) == member.node_id
    assert authority.is_member(member.certificate)
    outsider = NodeIdentity.generate(SwarmAuthority.from_key(generate_swarm_key()))
    assert outsider.certificate is not None and not authority.is_member(outsider.certificate)
    # A certificate naming another node's id still carries its own key, hence its own id.
    forged = authority.issue(outsider.private_key.public_key(), member.node_id)
    assert node_id_of_certificate(forged) == outsider.node_id != member.node_id
    signature = member.sign(b"record")
    assert verify_signature(member.certificate, b"record", signature)
    assert not verify_signature(member.certificate, b"other", signature)
    assert not verify_signature(forged, b"record", signature)


def test_credentials_refuse_a_certificate_of_another_swarm() -> None:
    key = generate_swarm_key()
    stranger = NodeIdentity.generate(SwarmAuthority.from_key(generate_swarm_key()))
    with pytest.raises(ValueError, match="no certificate of"):
        SwarmCredentials(SwarmAuthority.from_key(key), stranger)
    with pytest.raises(ValueError, match="no certificate of"):
        SwarmCredentials(SwarmAuthority.from_key(key), NodeIdentity.generate())


@pytest.mark.parametrize(
    "requested, advertised, secure, expected, warns",
    [
        ("0.0.0.0", "127.0.0.1", False, "127.0.0.1", False),
        ("0.0.0.0", "localhost", False, "127.0.0.1", False),
        ("0.0.0.0", "127.0.1.1", False, "127.0.1.1", False),
        ("::", "::1", False, "[::1]", False),
        ("0.0.0.0", "10.130.151.15", False, "0.0.0.0", True),
        ("0.0.0.0", "10.130.151.15", True, "0.0.0.0", False),
        ("0.0.0.0", "127.0.0.1", True, "0.0.0.0", False),
        ("127.0.0.1", "127.0.0.1", False, "127.0.0.1", False),
    ],
)
def test_open_nodes_bind_loopback_unless_advertised_elsewhere(
    requested: str,
    advertised: str,
    secure: bool,
    expected: str,
    warns: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level("WARNING"):
        assert grpc_bind_host(requested, advertised, secure) == expected
    warned = [r.getMessage() for r in caplog.records if "without a swarm key" in r.getMessage()]
    assert bool(warned) == warns
    if warns:
        assert "read the activations" in warned[0] and "molink keygen" in warned[0]


def _molink(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    return subprocess.run(
        [sys.executable, "-m", "molink.cli.main", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def test_keygen_prints_a_fresh_key_and_writes_a_private_file(tmp_path: Path) -> None:
    first, second = _molink("keygen"), _molink("keygen")
    assert first.returncode == 0 and second.returncode == 0
    assert SwarmKey.parse(first.stdout) != SwarmKey.parse(second.stdout)
    path = tmp_path / "swarm.key"
    written = _molink("keygen", "--output", str(path))
    assert written.returncode == 0 and written.stdout == ""
    SwarmKey.parse(path.read_text())
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = _molink("keygen", "--output", str(path))
    assert again.returncode == 1 and "cannot create" in again.stderr
