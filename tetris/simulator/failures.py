"""Instance failures in the disaggregated simulator: the schedule, and how a run lives through it.

A schedule is fixed outages — `ROLE:INDEX@DOWN[-UP]`, ROLE `prefill`, `decode` or `node` (every
prefill and decode instance of that node; nodes are numbered as `ClusterSpec` packs them:
prefill nodes first, then decode nodes) — and/or random ones: every instance (or node) fails
after exponential times of mean `mtbf_s` and is back after exponential repairs of mean `mttr_s`,
seeded, starting before the last arrival. Times are on the simulation clock (the arrivals' one,
after any time-scaling).

A failure goes through the same ledger events as in the runtime (`Ledger.instance_lost`,
`decode_instance_lost`, `redo`, `instance_back`): the chunks running on the lost instance and
the KV transfers from or to it are aborted (their pending events cancelled), and every request
whose KV was there starts its prefill over from token 0 — a request that had produced k tokens
re-prefills its prompt plus those k, then goes on decoding where it was (the tokens it had keep
their times). So no request is ever dropped: each one finishes, with `RequestRecord.redone`
saying how often it started over. A recovered instance rejoins empty.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tetris.simulator.events import CHUNK_END, PRIORITY_FAILURE, Event
from tetris.simulator.records import Outage, SimRequest
from tetris.solver.cluster import ClusterSpec

if TYPE_CHECKING:  # the simulator imports this module
    from tetris.simulator.disaggregated import DisaggregatedSimulator

FAILURE = "failure"
ROLES = ("prefill", "decode")
_EVENT = re.compile(r"(prefill|decode|node):(\d+)@([0-9.eE+]+)(?:-([0-9.eE+]+))?")
FIXED_SYNTAX = "ROLE:INDEX@DOWN[-UP] with ROLE prefill, decode or node, times in seconds"


@dataclass(frozen=True, slots=True)
class FailureEvent:
    """One fixed outage as written: `target` "prefill", "decode" or "node"."""

    target: str
    index: int
    down_s: float
    up_s: float | None


def parse_failure(text: str) -> FailureEvent:
    """`prefill:3@120` (down at 120 s for good), `decode:0@50-80`, `node:1@120-300`."""
    m = _EVENT.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"expected {FIXED_SYNTAX}, e.g. prefill:3@120-180; got {text!r}")
    try:
        down = float(m[3])
        up = None if m[4] is None else float(m[4])
    except ValueError:
        raise ValueError(f"{text!r}: times must be numbers of seconds") from None
    if not math.isfinite(down) or (up is not None and not math.isfinite(up)):
        raise ValueError(f"{text!r}: times must be finite")
    if up is not None and up <= down:
        raise ValueError(f"{text!r}: the instance must come back after it fails ({up} <= {down})")
    return FailureEvent(m[1], int(m[2]), down, up)


def node_instances(cluster: ClusterSpec, node: int) -> list[tuple[str, int]]:
    """The (role, index) of every instance on `node`."""
    per = cluster.gpus_per_node
    prefill_nodes = -(-cluster.prefill_instances // per)
    total = prefill_nodes + -(-cluster.decode_instances // per)
    if not 0 <= node < total:
        raise ValueError(f"node {node} does not exist: the cluster has {total} nodes (prefill "
                         f"0..{prefill_nodes - 1}, decode {prefill_nodes}..{total - 1})")
    if node < prefill_nodes:
        return [("prefill", g) for g in
                range(node * per, min(cluster.prefill_instances, (node + 1) * per))]
    k = node - prefill_nodes
    return [("decode", j) for j in range(k * per, min(cluster.decode_instances, (k + 1) * per))]


def _instances(cluster: ClusterSpec, target: str, index: int) -> list[tuple[str, int]]:
    if target == "node":
        return node_instances(cluster, index)
    count = cluster.prefill_instances if target == "prefill" else cluster.decode_instances
    if not 0 <= index < count:
        raise ValueError(f"{target} instance {index} does not exist: the cluster has {count} "
                         f"{target} instances (0..{count - 1})")
    return [(target, index)]


class FailureSpec(BaseModel):
    """A failure schedule as the user gives it (CLI, JSON output); `outages` resolves it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    events: tuple[str, ...] = Field(default=(), description=f"fixed outages, {FIXED_SYNTAX}")
    mtbf_s: float | None = Field(default=None, gt=0, description="mean time between failures "
                                 "of each instance (or node), exponential")
    mttr_s: float | None = Field(default=None, gt=0, description="mean time to repair")
    unit: Literal["instance", "node"] = "instance"
    seed: int = 0

    @field_validator("events")
    @classmethod
    def _parse(cls, events: tuple[str, ...]) -> tuple[str, ...]:
        for text in events:
            parse_failure(text)
        return events

    @model_validator(mode="after")
    def _pair(self) -> FailureSpec:
        if (self.mtbf_s is None) != (self.mttr_s is None):
            raise ValueError("random failures need both mtbf_s and mttr_s")
        return self

    @property
    def active(self) -> bool:
        return bool(self.events) or self.mtbf_s is not None

    def outages(self, cluster: ClusterSpec, horizon_s: float) -> tuple[Outage, ...]:
        """Every instance outage, overlapping ones of an instance merged, in time order;
        random failures start in [0, horizon_s)."""
        spans: list[Outage] = []
        for text in self.events:
            e = parse_failure(text)
            spans += [Outage(role, i, e.down_s, e.up_s)
                      for role, i in _instances(cluster, e.target, e.index)]
        if self.mtbf_s is not None and self.mttr_s is not None:
            spans += random_outages(cluster, self.mtbf_s, self.mttr_s, horizon_s,
                                    unit=self.unit, seed=self.seed)
        return merge_outages(spans)


def random_outages(cluster: ClusterSpec, mtbf_s: float, mttr_s: float, horizon_s: float, *,
                   unit: str = "instance", seed: int = 0) -> list[Outage]:
    """Alternating exponential up times (mean `mtbf_s`) and repairs (mean `mttr_s`) per
    instance or node, from 0. Each unit draws from its own stream, so a longer horizon only
    appends failures: runs at different rates share their first ones."""
    if unit == "node":
        per = cluster.gpus_per_node
        nodes = -(-cluster.prefill_instances // per) + -(-cluster.decode_instances // per)
        units = [node_instances(cluster, n) for n in range(nodes)]
    else:
        units = [[("prefill", g)] for g in range(cluster.prefill_instances)] + \
            [[("decode", j)] for j in range(cluster.decode_instances)]
    out = []
    for k, members in enumerate(units):
        rng = random.Random(f"{seed}:{k}")  # a str seed hashes the same in every process
        t = rng.expovariate(1 / mtbf_s)
        while t < horizon_s:
            repair = rng.expovariate(1 / mttr_s)
            out += [Outage(role, i, t, t + repair) for role, i in members]
            t += repair + rng.expovariate(1 / mtbf_s)
    return out


def merge_outages(spans: Sequence[Outage]) -> tuple[Outage, ...]:
    """Overlapping or touching outages of one instance as one (an instance down twice at
    once is down once), sorted by time."""
    merged: list[Outage] = []
    for o in sorted(spans, key=lambda o: (o.role, o.index, o.down_s)):
        last = merged[-1] if merged else None
        if last is not None and (last.role, last.index) == (o.role, o.index) and \
                (last.up_s is None or o.down_s <= last.up_s):
            up = None if last.up_s is None or o.up_s is None else max(last.up_s, o.up_s)
            merged[-1] = replace(last, up_s=up)
        else:
            merged.append(o)
    return tuple(sorted(merged, key=lambda o: (o.down_s, ROLES.index(o.role), o.index)))


def down_intervals(outages: Sequence[Outage]) -> list[tuple[float, float | None]]:
    """When at least one instance is down: the union of the outages, in time order (an end
    of None: down for good)."""
    spans: list[list[float]] = []
    for o in sorted(outages, key=lambda o: o.down_s):
        up = math.inf if o.up_s is None else o.up_s
        if spans and o.down_s <= spans[-1][1]:
            spans[-1][1] = max(spans[-1][1], up)
        else:
            spans.append([o.down_s, up])
    return [(down, None if math.isinf(up) else up) for down, up in spans]


def check_outages(outages: Sequence[Outage], cluster: ClusterSpec) -> tuple[int, int]:
    """ValueError unless every outage names an instance of `cluster` and some prefill and
    some decode instance survive for good; returns how many of each do."""
    gone: dict[str, set[int]] = {"prefill": set(), "decode": set()}
    for o in outages:
        if o.role not in ROLES:
            raise ValueError(f"outage of {o.role!r}: the role must be one of {ROLES}")
        _instances(cluster, o.role, o.index)
        if o.down_s < 0 or (o.up_s is not None and o.up_s <= o.down_s):
            raise ValueError(f"outage of {o.role} {o.index}: times {o.down_s}..{o.up_s}")
        if o.up_s is None:
            gone[o.role].add(o.index)
    alive = (cluster.prefill_instances - len(gone["prefill"]),
             cluster.decode_instances - len(gone["decode"]))
    for role, n in zip(ROLES, alive, strict=True):
        if n == 0:
            raise ValueError(f"every {role} instance is lost for good: no request could finish")
    return alive


def check_survivors_fit(requests: Sequence[SimRequest], capacity_tokens: int,
                        prefill_sp: int, decode_span: int) -> None:
    """ValueError for a request the instances that survive for good could never serve."""
    for r in requests:
        if -(-r.prompt_tokens // prefill_sp) > capacity_tokens or \
                r.prompt_tokens + r.output_tokens > capacity_tokens * decode_span:
            raise ValueError(f"request {r.request_id!r} does not fit on the {prefill_sp} "
                             f"prefill / {decode_span} decode instance(s) left after the "
                             "failures for good")


class FailureInjector:
    """Drives one simulator through its outages (its `FAILURE` events)."""

    def __init__(self, sim: DisaggregatedSimulator, requests: Sequence[SimRequest],
                 outages: Sequence[Outage]) -> None:
        """ValueError, before anything runs, for a schedule the run could not live through."""
        settings = sim.policy.settings
        alive_prefill, alive_decode = check_outages(outages, sim.cost_model.cluster)
        try:  # a fixed-size baseline needs that many survivors; max_sp is only a cap
            settings.model_copy(update={"max_sp": None}).check_cluster(alive_prefill,
                                                                       sim.policy.name)
        except ValueError as err:
            raise ValueError(f"after the failures for good: {err}") from None
        check_survivors_fit(requests, sim.cost_model.kv_capacity_tokens,
                            min(settings.max_sp or alive_prefill, alive_prefill),
                            min(sim.decode.max_sp, alive_decode))
        self.sim = sim
        self.outages = tuple(outages)
        for key in ("failures", "recoveries", "redos"):
            sim.stats[key] = 0

    def schedule(self) -> None:
        push = self.sim.events.push
        for o in self.outages:
            push(o.down_s, PRIORITY_FAILURE, FAILURE, (o, True))
            if o.up_s is not None:
                push(o.up_s, PRIORITY_FAILURE, FAILURE, (o, False))

    def handle(self, payload: tuple[Outage, bool], now: float) -> None:
        outage, down = payload
        sim, ledger = self.sim, self.sim.ledger
        key = "failures" if down else "recoveries"
        sim.stats[key] = int(sim.stats[key]) + 1
        if outage.role == "prefill":
            if down:
                self.redo(ledger.instance_lost(outage.index), now)
            else:
                ledger.instance_back(outage.index)
        elif down:
            sim.decode.lose_instance(outage.index)
            self.redo(ledger.decode_instance_lost(outage.index), now)
        else:
            ledger.decode_instance_back(outage.index)
        sim.decode.dispatch(now)  # room was freed, or an instance is back
        sim.want_decision(now)

    def redo(self, request_ids: Sequence[str], now: float) -> None:
        """End the in-flight work of these requests as failed, then start them over."""
        if not request_ids:
            return
        sim, ledger = self.sim, self.sim.ledger
        ids = set(request_ids)

        def running(e: Event) -> bool:
            return e[3] == CHUNK_END and e[4][1].request_id in ids

        for event in sim.events.cancel(running):
            chunk, record, _ = event[4]
            ledger.chunk_ended(record.request_id, max(0.0, now - chunk.start_s))
            assert record.chunks[-1] is chunk  # a request runs one chunk at a time
            record.chunks[-1] = replace(chunk, end_s=max(chunk.start_s, now))
        sim.decode.abort(ids, now)
        for rid in request_ids:
            record = sim.by_id[rid]
            # Its next prefill feeds the prompt and every token it produced, so that its
            # last chunk samples the token after them and decode goes on from there.
            ledger.redo(rid, record.request.prompt_tokens + len(record.token_times))
            record.redone += 1
            record.lost_chunks += record.chunks
            record.chunks = []
        sim.stats["redos"] = int(sim.stats["redos"]) + len(request_ids)
