"""What a simulation takes in (requests with their SLOs) and gives out (per-request records).

Every executor — the disaggregated simulator and the LoongServe-style unified one — fills the
same `RequestRecord`, so metrics, plots and exports never depend on the policy.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field

from tetris.solver.plan import ChunkPlan


@dataclass(frozen=True, slots=True)
class SimRequest:
    """One request to serve: its trace fields plus the SLOs it is judged by (same for every
    policy, fixed before any policy runs)."""

    request_id: str
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    ttft_slo_s: float
    tbt_slo_s: float


@dataclass(frozen=True, slots=True)
class Outage:
    """Instance `index` of pool `role` ("prefill" or "decode") is down from `down_s` until
    `up_s` (None: for good), on the simulation clock."""

    role: str
    index: int
    down_s: float
    up_s: float | None = None


# A chunk as executed has exactly the fields of a planned one: tokens [start_token, end_token)
# prefilled on `instances` during [start_s, end_s) (the executed times, noise included).
ChunkRecord = ChunkPlan


@dataclass(slots=True)
class RequestRecord:
    """What happened to one request. `token_times[i]` is when output token i+1 came out;
    token 1 is the first token (its time is `first_token_s`).

    `redone` counts the times an instance failure lost its KV and its prefill started over
    (of its prompt plus the tokens it had produced); `chunks` are the chunks of its last
    prefill, `lost_chunks` those of the prefills lost (an aborted one ends at the failure)."""

    request: SimRequest
    chunks: list[ChunkRecord] = field(default_factory=list)
    token_times: array[float] = field(default_factory=lambda: array("d"))
    decode_instances: tuple[int, ...] = ()
    kv_transfer_s: float = 0.0
    redone: int = 0
    lost_chunks: list[ChunkRecord] = field(default_factory=list)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def first_token_s(self) -> float | None:
        return self.token_times[0] if self.token_times else None

    @property
    def ttft_s(self) -> float | None:
        first = self.first_token_s
        return None if first is None else first - self.request.arrival_s

    @property
    def finished(self) -> bool:
        return len(self.token_times) >= self.request.output_tokens

    @property
    def finish_s(self) -> float | None:
        return self.token_times[-1] if self.finished else None


@dataclass
class SimOutcome:
    """One simulation run: a record per request (input order), run statistics (`events`,
    `decisions`, `plans_validated`, `wall_s`, ... — numbers or short strings) and the instance
    outages it was run under (none: a healthy cluster). `roles`: on an elastic cluster, (time,
    GPUs prefilling, decoding, draining to prefill) at the start and after every role change."""

    policy: str
    records: list[RequestRecord]
    stats: dict[str, float | int | str] = field(default_factory=dict)
    outages: tuple[Outage, ...] = ()
    roles: list[tuple[float, int, int, int]] = field(default_factory=list)
