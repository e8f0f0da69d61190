"""A single-node server does not load the pipeline's gRPC and TLS stack.

``molink serve`` without ``--molink-enabled`` runs every layer in its process; gRPC,
protobuf's services and cryptography's bindings cost it ~25 MiB resident
(bench/quant_memory_phases.py) and serve it nothing. Checked in a fresh interpreter, since
this one has imported everything the other tests use.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from molink.dashboard.providers import StageSwarmProvider, provider_for

_SERVE_PATH = """
import json, sys
from types import SimpleNamespace
import molink.cli.serve, molink.cli.engine_builder, molink.api.app
from molink.dashboard.providers import provider_for
provider_for(SimpleNamespace(model_name="m"))  # the dashboard asks about the engine it serves
heavy = ("grpc", "cryptography", "molink.pipeline", "transformers", "hivemind")
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in heavy
                        or m.startswith("molink.pipeline"))))
"""


def test_the_single_node_serve_path_imports_no_grpc_tls_or_transformers() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _SERVE_PATH],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    ).stdout
    assert json.loads(out.splitlines()[-1]) == []


def test_a_stage_client_still_gets_the_stage_provider() -> None:
    from molink.pipeline.stage_client import StageOnlyClient

    client = object.__new__(StageOnlyClient)
    client.node = SimpleNamespace(current_view=lambda: None)
    client._info = SimpleNamespace(node_id="n1", model=SimpleNamespace(num_layers=30))
    provider = provider_for(client)
    assert isinstance(provider, StageSwarmProvider)
    assert provider.snapshot().num_layers == 30
