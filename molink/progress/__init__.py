"""Progress on long work in the terminal: converting a GGUF file, loading weights, waiting
for a pipeline to become complete (``waiting``), work with no count such as profiling the
KV cache's memory (``status.status_line``).

tqdm is already a dependency (transformers and huggingface_hub draw their bars with it), so
MoLink's bars look like the rest of the ecosystem's. Bars are drawn on stdout and only when
stdout is a terminal: a server whose output goes to a log file or a pipe prints none.
``MOLINK_NO_PROGRESS=1`` turns them off on a terminal too.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterable, Iterator
from typing import TextIO, TypeVar

from tqdm import tqdm

T = TypeVar("T")
DISABLE_ENV = "MOLINK_NO_PROGRESS"


def progress_enabled(stream: TextIO | None = None) -> bool:
    """True when ``stream`` (stdout by default) is a terminal and progress is not disabled."""
    stream = stream if stream is not None else sys.stdout
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


def progress_bar(
    total: int | None,
    desc: str,
    unit: str = "it",
    leave: bool = True,
    bar_format: str | None = None,
) -> tqdm:
    """A bar on stdout, disabled (every call a no-op) when stdout is not a terminal;
    ``leave``: keep the finished bar on screen; ``bar_format``: tqdm's, e.g. a status line."""
    # A terminal that reports a size of 0 x 0 (a bare pty, some CI consoles) would make tqdm
    # draw an empty bar, or none at all: use 80 x 24 there.
    size = shutil.get_terminal_size(fallback=(80, 24))
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        file=sys.stdout,
        disable=not progress_enabled(sys.stdout),
        ncols=size.columns or 80,
        nrows=size.lines or 24,
        leave=leave,
        bar_format=bar_format,
    )


def track(items: Iterable[T], desc: str, unit: str = "it", total: int | None = None) -> Iterator[T]:
    """Iterate ``items`` with a bar (see ``progress_bar``)."""
    if total is None:
        try:
            total = len(items)  # type: ignore[arg-type]
        except TypeError:
            total = None
    with progress_bar(total, desc, unit) as bar:
        for item in items:
            yield item
            bar.update(1)
