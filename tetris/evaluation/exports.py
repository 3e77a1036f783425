"""Views of a simulation for people: a Chrome trace (chrome://tracing, Perfetto) and the
prefill Gantt chart of a time window (the same chart `tetris plan` draws)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tetris.simulator.records import RequestRecord
from tetris.solver.plan_json import ChunkOut, PlanReport, RequestPlanOut, SolverInfo

US = 1e6  # Chrome trace times are microseconds


def chrome_trace(records: Sequence[RequestRecord], num_prefill: int, path: str | Path) -> None:
    """Prefill chunks on their instances (process "prefill"), each request's decode span on
    its lead decode instance (process "decode"), and each request's TTFT on its own row."""
    events: list[dict[str, Any]] = [
        {"name": "process_name", "ph": "M", "pid": 1, "args": {"name": "prefill"}},
        {"name": "process_name", "ph": "M", "pid": 2, "args": {"name": "decode"}},
    ]
    events += [{"name": "thread_name", "ph": "M", "pid": 1, "tid": g,
                "args": {"name": f"prefill {g}"}} for g in range(num_prefill)]
    for rec in records:
        r = rec.request
        for k, c in enumerate(rec.chunks):
            for g in c.instances:
                events.append({
                    "name": r.request_id, "cat": "prefill", "ph": "X", "pid": 1, "tid": g,
                    "ts": c.start_s * US, "dur": (c.end_s - c.start_s) * US,
                    "args": {"chunk": k, "tokens": [c.start_token, c.end_token],
                             "sp": len(c.instances)},
                })
        if rec.decode_instances and len(rec.token_times) > 1:
            start = rec.token_times[0] + rec.kv_transfer_s
            events.append({
                "name": r.request_id, "cat": "decode", "ph": "X", "pid": 2,
                "tid": rec.decode_instances[0], "ts": start * US,
                "dur": (rec.token_times[-1] - start) * US,
                "args": {"tokens": len(rec.token_times), "instances": rec.decode_instances},
            })
    Path(path).write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}))


def window_report(records: Sequence[RequestRecord], num_prefill: int, start_s: float,
                  end_s: float, policy: str) -> PlanReport:
    """The prefill chunks of requests with any chunk in [start_s, end_s), times relative to
    start_s, as a PlanReport for `gantt.draw_gantt`."""
    if end_s <= start_s:
        raise ValueError(f"Gantt window must have end > start, got {start_s}:{end_s}")
    plans = []
    for rec in records:
        if not any(c.end_s > start_s and c.start_s < end_s for c in rec.chunks):
            continue
        r = rec.request
        prefill_end = rec.chunks[-1].end_s
        plans.append(RequestPlanOut(
            request_id=r.request_id, arrival_s=r.arrival_s - start_s,
            prompt_tokens=r.prompt_tokens, prefill_end_s=prefill_end - start_s,
            ttft_s=prefill_end - r.arrival_s, ttft_slo_s=r.ttft_slo_s,
            slo_slack_s=r.ttft_slo_s - (prefill_end - r.arrival_s),
            chunks=[ChunkOut(start_token=c.start_token, end_token=c.end_token,
                             instances=list(c.instances), start_s=c.start_s - start_s,
                             end_s=c.end_s - start_s) for c in rec.chunks],
        ))
    if not plans:
        raise ValueError(f"no prefill chunk runs in the window {start_s}:{end_s} s")
    solver = SolverInfo(name=policy, status="feasible", wall_ms=0.0, objective=None, bound=None)
    return PlanReport(solver=solver, availability_s=[0.0] * num_prefill, plans=plans)
