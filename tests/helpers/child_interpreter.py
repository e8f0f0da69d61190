"""Running a test's script in a fresh Python interpreter.

A test that kills or stops a DHT process must not do it inside the pytest process:
hivemind's futures write to their origin through one lock shared by every process forked
from that origin, and a DHT process killed while holding it leaves it held. Every DHT
started later in the same pytest process would then wait on it forever (its "ready" is
such a write). In a child interpreter the lock, and whatever the test did to it, dies with
the child.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence

from tests.helpers.server_process import REPO_ROOT


def run_script(script: str, timeout_s: float, args: Sequence[str] = ()) -> str:
    """Runs ``script`` (``args`` in its ``sys.argv[1:]``) with this repository importable;
    returns what it printed.

    Fails the test, with the child's output, when the script exits non-zero or is still
    running after ``timeout_s`` (it is killed then, and its DHT processes die with it)."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    try:
        done = subprocess.run(
            [sys.executable, "-c", script, *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(
            f"the script was still running after {timeout_s:.0f}s; it printed:\n"
            f"{_text(exc.stdout)}\n{_text(exc.stderr)}"
        ) from None
    assert done.returncode == 0, (
        f"the script exited with {done.returncode}:\n{done.stdout}\n{done.stderr}"
    )
    return done.stdout


def _text(output: str | bytes | None) -> str:
    if isinstance(output, bytes):
        return output.decode(errors="replace")
    return output or ""
