"""One scheduling decision's input: instance availability, pending requests, the cost model."""

from __future__ import annotations

from dataclasses import dataclass, field

from tetris.solver.cost_model import CostModel

DEFAULT_BLOCK_TOKENS = 512
DEFAULT_MISS_PENALTY = 10.0


@dataclass(frozen=True, slots=True)
class PendingRequest:
    """A request with prompt left to prefill.

    `prefilled_tokens` > 0 means earlier chunks ran; their KV sits on `kv_instances` (the last
    chunk's group), which every later group must contain. `ready_s` is the earliest time its
    next chunk may start (its arrival, or the end of a chunk still running)."""

    request_id: str
    arrival_s: float
    prompt_tokens: int
    ttft_slo_s: float
    prefilled_tokens: int = 0
    kv_instances: tuple[int, ...] = ()
    ready_s: float | None = None
    weight: float = 1.0

    def __post_init__(self) -> None:
        where = f"request {self.request_id!r}"
        if self.prompt_tokens <= 0:
            raise ValueError(f"{where}: prompt_tokens must be > 0, got {self.prompt_tokens}")
        if not 0 <= self.prefilled_tokens < self.prompt_tokens:
            raise ValueError(
                f"{where}: prefilled_tokens must be in [0, {self.prompt_tokens}), "
                f"got {self.prefilled_tokens}"
            )
        if self.ttft_slo_s <= 0:
            raise ValueError(f"{where}: ttft_slo_s must be > 0, got {self.ttft_slo_s}")
        if self.weight <= 0:
            raise ValueError(f"{where}: weight must be > 0, got {self.weight}")
        if (self.prefilled_tokens > 0) != bool(self.kv_instances):
            raise ValueError(f"{where}: kv_instances must be given exactly when prefilled > 0")
        if len(set(self.kv_instances)) != len(self.kv_instances):
            raise ValueError(f"{where}: kv_instances has duplicates {self.kv_instances}")

    @property
    def earliest_start_s(self) -> float:
        return self.arrival_s if self.ready_s is None else max(self.arrival_s, self.ready_s)

    @property
    def deadline_s(self) -> float:
        return self.arrival_s + self.ttft_slo_s


#: An instance shown free this far after now is out of reach (the ledger shows a lost one at
#: now + 1e6 s): it does not count among the instances a request's KV may spread over.
UNREACHABLE_S = 1e5


@dataclass(frozen=True)
class Problem:
    """Everything a planner may use. Times are absolute seconds on the executor's clock.

    `gpu_cost_weight` is λ in the objective (see `objective.py`): it rises with load so that one
    request cannot grab GPUs that others need; `max_sp` caps any chunk's SP size outright."""

    cost_model: CostModel
    availability_s: tuple[float, ...]
    requests: tuple[PendingRequest, ...]
    now_s: float = 0.0
    block_tokens: int = DEFAULT_BLOCK_TOKENS
    max_chunks: int | None = None
    max_sp: int | None = None
    gpu_cost_weight: float = 0.0
    miss_penalty: float = DEFAULT_MISS_PENALTY
    index_of: dict[str, int] = field(init=False, repr=False, compare=False)
    # The cluster's node of each prefill instance, copied here because planners read it in hot
    # loops and the (pydantic) cluster spec's private attributes are slow to reach.
    node_of: tuple[int, ...] = field(init=False, repr=False, compare=False)
    # Instances not free within UNREACHABLE_S of now (a lost instance is shown that far off):
    # no plan can rely on them to hold KV.
    unreachable: frozenset[int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        n = self.cost_model.cluster.prefill_instances
        if len(self.availability_s) != n:
            raise ValueError(
                f"availability has {len(self.availability_s)} entries but the cluster has "
                f"{n} prefill instances"
            )
        if self.block_tokens <= 0:
            raise ValueError(f"block_tokens must be > 0, got {self.block_tokens}")
        if self.max_chunks is not None and self.max_chunks <= 0:
            raise ValueError(f"max_chunks must be > 0, got {self.max_chunks}")
        if self.max_sp is not None and not 1 <= self.max_sp <= n:
            raise ValueError(f"max_sp must be in [1, {n}], got {self.max_sp}")
        if self.gpu_cost_weight < 0 or self.miss_penalty < 0:
            raise ValueError("gpu_cost_weight and miss_penalty must be >= 0")
        index: dict[str, int] = {}
        for i, r in enumerate(self.requests):
            if r.request_id in index:
                raise ValueError(f"duplicate request id {r.request_id!r}")
            index[r.request_id] = i
            bad = [g for g in r.kv_instances if not 0 <= g < n]
            if bad:
                raise ValueError(f"request {r.request_id!r}: kv_instances {bad} out of [0, {n})")
        object.__setattr__(self, "index_of", index)
        object.__setattr__(self, "node_of", self.cost_model.cluster.prefill_node_of)
        horizon = self.now_s + UNREACHABLE_S
        object.__setattr__(self, "unreachable", frozenset(
            g for g, t in enumerate(self.availability_s) if t >= horizon))

    @property
    def num_instances(self) -> int:
        return len(self.availability_s)

    def free_at(self, instance: int) -> float:
        """When the instance can take new work (never before now)."""
        return max(self.now_s, self.availability_s[instance])

    @property
    def sp_limit(self) -> int:
        return self.max_sp or self.num_instances
