"""A load generator for OpenAI-compatible servers: workloads, arrivals, timing, summaries.

specs = mixed_workload(64, seed=0)
run = asyncio.run(run_load(specs, LoadConfig("http://127.0.0.1:8000", rate=4.0)))
run.summary.to_dict()
"""

from molink.loadgen.arrivals import arrival_offsets, parse_rate
from molink.loadgen.client import RequestResult
from molink.loadgen.runner import LoadConfig, RunResult, run_load
from molink.loadgen.stats import Summary, format_summary, percentile, summarize
from molink.loadgen.workload import (
    RequestSpec,
    WorkloadError,
    as_text_prompts,
    fixed_workload,
    mixed_workload,
    text_workload,
)

__all__ = [
    "LoadConfig",
    "RequestResult",
    "RequestSpec",
    "RunResult",
    "Summary",
    "WorkloadError",
    "arrival_offsets",
    "as_text_prompts",
    "fixed_workload",
    "format_summary",
    "mixed_workload",
    "parse_rate",
    "percentile",
    "run_load",
    "summarize",
    "text_workload",
]
