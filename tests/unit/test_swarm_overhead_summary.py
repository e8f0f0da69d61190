"""The swarm overhead bench's summary: medians with their spread, and per-round ratios."""

from __future__ import annotations

from bench.swarm_overhead_bench import summarize


def _run(round_index: int, phase: str, tokens_per_s: float, cpu_s: float) -> dict:
    return {
        "round": round_index,
        "phase": phase,
        "startup_s": 10.0,
        "summary": {"output_throughput": tokens_per_s},
        "generated_tokens": 100,
        "cpu_seconds_per_server": [cpu_s / 2, cpu_s / 2],
    }


def test_rounds_are_compared_within_themselves() -> None:
    # Round 1 ran on a machine twice as loaded: both phases halve, the ratio holds.
    runs = [
        _run(0, "now", 30.0, 5.0),
        _run(0, "before", 31.0, 5.0),
        _run(0, "before", 29.0, 5.0),
        _run(0, "now", 28.0, 5.0),
        _run(1, "before", 15.0, 5.0),
        _run(1, "now", 14.5, 5.1),
        _run(1, "now", 14.5, 5.1),
        _run(1, "before", 15.0, 5.0),
    ]
    summary = summarize(runs)
    now = summary["phases"]["now"]["output_tokens_per_s"]
    assert now == {"n": 4, "median": 21.25, "min": 14.5, "max": 30.0}
    assert summary["round_ratios_vs_before"]["now"]["per_round"] == [0.9667, 0.9667]
    cpu = summary["phases"]["now"]["server_cpu_s_per_output_token"]
    assert cpu["min"] == 0.05 and cpu["max"] == 0.051
    assert summary["phases"]["before"]["startup_s"]["median"] == 10.0
    assert summary["cpu_per_token_round_ratios_vs_before"]["now"]["per_round"] == [1.0, 1.02]
    assert summary["load_average_1m"] is None  # these runs recorded none
