"""Check that the link emulator holds its figures: bulk rate and small-message round trip.

For each reference link it starts ``python -m molink.netem`` and the far-end probe server
each in its own process, so that sender, emulator and receiver never wait on one another's
interpreter lock; it pushes a bulk transfer each way, times 50 pings, then writes
``bench/results/netem_check.json``.

    python bench/netem_check.py [--bulk-mb 20] [--pings 50] [--out PATH]

Exits 1 if any figure is outside its bounds.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from anywhere, without installing
    sys.path.insert(0, str(REPO_ROOT))

from molink.netem.probe import BulkResult, bulk_down, bulk_up, measure_rtt  # noqa: E402

logger = logging.getLogger("netem_check")

HOST = "127.0.0.1"
# The steady rate must reach this share of the configured rate. Above it, a share of noise
# is allowed: after the emulator (or the receiver) loses the CPU for a few ms on a busy host,
# the bytes that fell due meanwhile arrive together, which tilts a fit over a short transfer.
# The total rate (first byte sent to last received) carries the strict bound: never above.
MIN_RATE_SHARE = 0.95
MAX_RATE_SHARE = 1.01
# The median round trip may exceed twice the one-way delay by this much (timer granularity
# and scheduling on a busy host), and never fall below it.
RTT_SLACK_MS = 5.0


@dataclass(frozen=True)
class Profile:
    name: str
    rate_mbit: float
    one_way_delay_ms: float


PROFILES = (
    Profile("100mbit_20ms", 100.0, 20.0),
    Profile("20mbit_25ms", 20.0, 25.0),
    Profile("1gbit_2.5ms", 1000.0, 2.5),
)


class ChildServer:
    """``python -m MODULE ... --port-file F`` as a child process, stopped with SIGTERM."""

    def __init__(self, module: str, args: list[str], port_file: Path) -> None:
        self._cmd = [sys.executable, "-m", module, *args, "--port-file", str(port_file)]
        self._port_file = port_file
        self._proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def __enter__(self) -> ChildServer:
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        self._proc = subprocess.Popen(self._cmd, cwd=REPO_ROOT, env=env)
        deadline = time.monotonic() + 30.0
        while not self._port_file.exists():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self._stop()
                raise RuntimeError(f"did not start: {' '.join(self._cmd)}")
            time.sleep(0.05)
        self.port = int(self._port_file.read_text())
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop()

    def _stop(self) -> None:
        if self._proc is None or self._proc.poll() is not None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout=10.0)
        except subprocess.TimeoutExpired:
            logger.warning("%s ignored SIGTERM; killing it", self._cmd[2])
            self._proc.kill()
            self._proc.wait(timeout=5.0)


def emulator(profile: Profile, target_port: int, workdir: Path) -> ChildServer:
    args = ["--listen", f"{HOST}:0", "--target", f"{HOST}:{target_port}"]
    args += ["--rate-mbit", str(profile.rate_mbit), "--delay-ms", str(profile.one_way_delay_ms)]
    args += ["--log-level", "WARNING"]
    return ChildServer("molink.netem", args, workdir / f"{profile.name}.port")


def _p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[98]


def _rate_ok(result: BulkResult, rate_mbit: float) -> bool:
    return MIN_RATE_SHARE * rate_mbit <= result.steady_mbit <= MAX_RATE_SHARE * rate_mbit


def check_profile(profile: Profile, server_port: int, min_bytes: int, pings: int) -> dict:
    # At least a second of transfer: at 1 Gbit/s, 20 MB lasts 160 ms, short enough that one
    # scheduling hiccup on a shared host moves the figure.
    bulk_bytes = max(min_bytes, int(profile.rate_mbit * 1e6 / 8))
    with tempfile.TemporaryDirectory() as tmp, emulator(profile, server_port, Path(tmp)) as emu:
        # Pings first, on an idle link, so no queue from the bulk runs is left over.
        rtts = measure_rtt(HOST, emu.port, count=pings)
        up = bulk_up(HOST, emu.port, bulk_bytes)
        down = bulk_down(HOST, emu.port, bulk_bytes)
    floor_ms = 2 * profile.one_way_delay_ms
    rtt = {
        "count": len(rtts),
        "median": statistics.median(rtts),
        "p99": _p99(rtts),
        "min": min(rtts),
        "max": max(rtts),
    }
    checks = {
        "up_rate": _rate_ok(up, profile.rate_mbit),
        "down_rate": _rate_ok(down, profile.rate_mbit),
        "never_above_cap": max(up.total_mbit, down.total_mbit) <= profile.rate_mbit,
        "rtt_never_early": rtt["min"] >= floor_ms,
        "rtt_median": floor_ms <= rtt["median"] <= floor_ms + RTT_SLACK_MS,
    }
    return {
        **asdict(profile),
        "bulk_bytes": bulk_bytes,
        "up": asdict(up),
        "down": asdict(down),
        "rtt_ms": rtt,
        "rtt_expected_ms": [floor_ms, floor_ms + RTT_SLACK_MS],
        "rate_expected_mbit": [MIN_RATE_SHARE * profile.rate_mbit, profile.rate_mbit],
        "checks": checks,
        "pass": all(checks.values()),
    }


def _summary(row: dict) -> str:
    return (
        f"{row['name']:>13}: up {row['up']['steady_mbit']:7.2f} Mbit/s, "
        f"down {row['down']['steady_mbit']:7.2f} Mbit/s (of {row['rate_mbit']:g}); "
        f"rtt median {row['rtt_ms']['median']:6.2f} ms, p99 {row['rtt_ms']['p99']:6.2f} ms "
        f"(floor {2 * row['one_way_delay_ms']:g}) -> {'PASS' if row['pass'] else 'FAIL'}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--bulk-mb", type=float, default=20.0, help="bulk transfer size (MB; at least 1 s)"
    )
    parser.add_argument("--pings", type=int, default=50)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench/results/netem_check.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    bulk_bytes = int(args.bulk_mb * 1e6)
    rows = []
    with (
        tempfile.TemporaryDirectory() as tmp,
        ChildServer("molink.netem.probe", ["--host", HOST], Path(tmp) / "probe.port") as server,
    ):
        for profile in PROFILES:
            logger.info("measuring %s", profile.name)
            rows.append(check_profile(profile, server.port, bulk_bytes, args.pings))
            logger.info("%s", _summary(rows[-1]))

    report = {
        "benchmark": "netem_check",
        "created_unix": round(time.time()),
        "host": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "loadavg_1m": os.getloadavg()[0],
        },
        "method": (
            "emulator and probe server in separate processes; steady rate = least-squares "
            "slope of bytes received against time at the receiver; total rate = bytes / "
            "time from first byte sent to last byte received; rtt = 64-byte echo on an idle link"
        ),
        "profiles": rows,
        "all_pass": all(r["pass"] for r in rows),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    logger.info("wrote %s; all pass: %s", args.out, report["all_pass"])
    return 0 if report["all_pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
