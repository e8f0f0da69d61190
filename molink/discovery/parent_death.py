"""Tie a forked helper process's life to its parent's.

hivemind runs each DHT in a forked process (and that process starts the libp2p daemon).
When a node exits normally it shuts the DHT down, but a node killed outright (SIGKILL, the
OOM killer, a crashed machine's supervisor) cannot: its DHT process would live on as an
orphan, holding a port and memory forever. Linux's parent-death signal lets the kernel end
it with its parent; elsewhere the helper still checks once that its parent is alive.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def die_with_parent(parent_pid: int) -> None:
    """Called first thing in the forked child: SIGKILL it when its parent dies."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
                logger.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
        except OSError as exc:
            logger.warning("cannot ask to die with the parent process: %s", exc)
    # The parent may have died before the signal was armed: then no signal will come.
    if os.getppid() != parent_pid:
        os._exit(0)
