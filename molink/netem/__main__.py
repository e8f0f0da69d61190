"""``python -m molink.netem``: run a link emulator until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from molink.errors import InvalidParameterError
from molink.netem.loop import new_event_loop
from molink.netem.proxy import LinkProxy
from molink.netem.spec import LinkSpec, parse_hostport

logger = logging.getLogger("molink.netem")

_STATS_INTERVAL_S = 10.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m molink.netem",
        description="TCP proxy that adds a one-way delay and a rate cap in each direction.",
    )
    p.add_argument("--listen", required=True, help="HOST:PORT to listen on (port 0: any)")
    p.add_argument("--target", required=True, help="HOST:PORT to forward to")
    p.add_argument("--rate-mbit", type=float, default=float("inf"), help="rate cap, both ways")
    delay = p.add_mutually_exclusive_group()
    delay.add_argument("--delay-ms", type=float, help="one-way delay, each direction")
    delay.add_argument("--rtt-ms", type=float, help="round trip; each direction gets half")
    p.add_argument("--up-rate-mbit", type=float, help="override the client-to-target rate")
    p.add_argument("--down-rate-mbit", type=float, help="override the target-to-client rate")
    p.add_argument("--queue-ms", type=float, default=10.0, help="bottleneck queue length")
    p.add_argument("--port-file", type=Path, help="write the bound port here once listening")
    p.add_argument("--log-level", default="INFO")
    return p


def specs_from_args(args: argparse.Namespace) -> tuple[LinkSpec, LinkSpec]:
    """The (up, down) link directions the command line describes."""
    if args.rtt_ms is not None:
        one_way = args.rtt_ms / 2.0
    else:
        one_way = args.delay_ms if args.delay_ms is not None else 0.0
    up_rate = args.up_rate_mbit if args.up_rate_mbit is not None else args.rate_mbit
    down_rate = args.down_rate_mbit if args.down_rate_mbit is not None else args.rate_mbit
    return (
        LinkSpec(up_rate, one_way, queue_ms=args.queue_ms),
        LinkSpec(down_rate, one_way, queue_ms=args.queue_ms),
    )


async def _serve(proxy: LinkProxy, port_file: Path | None) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await proxy.start()
    if port_file is not None:
        # Written whole under another name first so a reader never sees a partial port.
        tmp = port_file.with_name(port_file.name + ".tmp")
        tmp.write_text(f"{proxy.port}\n")
        tmp.replace(port_file)
    try:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), _STATS_INTERVAL_S)
            except asyncio.TimeoutError:
                logger.debug("netem stats: %s", proxy.stats())
    finally:
        await proxy.aclose()
        logger.info("netem stopped: %s", proxy.stats())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        listen = parse_hostport(args.listen)
        target = parse_hostport(args.target)
        up, down = specs_from_args(args)
    except InvalidParameterError as exc:
        logger.error("%s", exc)
        return 2
    proxy = LinkProxy(*listen, *target, up=up, down=down)
    loop = new_event_loop()
    try:
        loop.run_until_complete(_serve(proxy, args.port_file))
    except OSError as exc:  # the listening port is taken or the address is not local
        logger.error("cannot listen on %s: %s", args.listen, exc)
        return 1
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
