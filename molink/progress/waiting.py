"""A status line while the head waits for its pipeline to cover every layer.

The bar counts covered layers out of L and names the ranges still missing; it closes when
the pipeline is complete and opens again when a stage is lost. It is drawn only on a
terminal (see ``molink.progress``), on its own daemon thread so the head never waits on it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from molink.progress import progress_bar, progress_enabled


@dataclass(frozen=True)
class Coverage:
    covered_layers: int
    num_layers: int
    missing: str | None  # None: every layer is served; else the missing ranges, "[15, 30)"


class PipelineWaitStatus:
    """Polls ``coverage`` every ``interval_s`` and shows it until the pipeline is complete."""

    def __init__(self, coverage: Callable[[], Coverage], interval_s: float = 0.5) -> None:
        self._coverage = coverage
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pipeline-wait", daemon=True)

    def start(self) -> PipelineWaitStatus:
        if progress_enabled():
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(self._interval_s + 1.0)

    def _run(self) -> None:
        while not self._stop.is_set():
            state = self._coverage()
            if state.missing is None:
                self._stop.wait(self._interval_s)
            else:
                self._show_until_complete(state)

    def _show_until_complete(self, state: Coverage) -> None:
        with progress_bar(
            state.num_layers, _describe(state), leave=False, bar_format="{desc} [{elapsed}]"
        ) as line:
            while state.missing is not None and not self._stop.is_set():
                line.set_description_str(_describe(state), refresh=False)
                line.refresh()
                self._stop.wait(self._interval_s)
                state = self._coverage()
            line.set_description_str(_describe(state))


def _describe(state: Coverage) -> str:
    text = f"waiting for the pipeline: {state.covered_layers}/{state.num_layers} layers served"
    return f"{text}, missing {state.missing}" if state.missing else text
