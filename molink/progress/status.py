"""A status line for long work that has no count to show (profiling memory, warming up):
what it does now, and for how long, redrawn in place on a terminal and silent elsewhere.

    with status_line("profiling KV cache memory") as status:
        status.update("a forward pass over 8192 tokens")
        ...
        status.update("8192 tokens take 1.2 GiB; 5120 blocks fit")

The last text stays on screen when the block ends (on a terminal only; see
``molink.progress``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from tqdm import tqdm

from molink.progress import progress_bar


class StatusLine:
    def __init__(self, title: str) -> None:
        self._title = title
        self._line: tqdm = progress_bar(None, title, leave=True, bar_format="{desc} [{elapsed}]")

    def update(self, text: str) -> None:
        """Shows ``title: text`` in place of the previous text."""
        self._line.set_description_str(f"{self._title}: {text}" if text else self._title)

    def close(self) -> None:
        self._line.close()


@contextlib.contextmanager
def status_line(title: str) -> Iterator[StatusLine]:
    line = StatusLine(title)
    try:
        yield line
    finally:
        line.close()
