"""The disaggregated baselines' prefill policies (one chunk per request, first come first served).

- `StaticSpPolicy`: every request is one chunk on exactly `settings.static_sp` instances.
- `DistServePolicy`: prefill instances statically partitioned into groups of
  `settings.distserve_group` (DistServe's fixed intra-op parallelism per prefill instance); one
  request per group.

Their one-chunk plans go through the independent validator like any planner's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tetris.solver.cost_model import CostModel
from tetris.solver.plan import ChunkPlan, ChunkSpec, RequestPlan
from tetris.solver.policy.settings import PolicySettings
from tetris.solver.policy.view import Decision, Launch, PrefillView, startable
from tetris.solver.problem import PendingRequest
from tetris.solver.validator import ensure_valid

Pick = tuple[PendingRequest, tuple[int, ...]]


def validated_single_chunks(view: PrefillView, cost_model: CostModel, settings: PolicySettings,
                            picks: list[Pick]) -> list[Launch]:
    """One-chunk plans starting now, checked by the validator like any planner's."""
    if not picks:
        return []
    plans = [
        RequestPlan(r.request_id, (ChunkPlan(0, r.prompt_tokens, group, view.now_s,
                                             view.now_s + cost_model.chunk_seconds_on(
                                                 r.prompt_tokens, 0, group)),))
        for r, group in picks
    ]
    problem = settings.problem(cost_model, view.availability_s, [r for r, _ in picks],
                               view.now_s)
    ensure_valid(problem, plans)
    return [Launch(r.request_id, ChunkSpec(0, r.prompt_tokens, group)) for r, group in picks]


@dataclass
class StaticSpPolicy:
    """The head of the queue waits for `sp` idle instances (the ones that share a node where
    possible) and nobody overtakes it."""

    name: str
    cost_model: CostModel
    settings: PolicySettings = field(default_factory=PolicySettings)

    def decide(self, view: PrefillView) -> Decision:
        if not startable(view):
            return Decision()
        sp = self.settings.static_sp
        cluster = self.cost_model.cluster
        idle = [g for g, free in enumerate(view.idle) if free]
        picks: list[Pick] = []
        for r in view.pending:
            if len(idle) < sp:
                break
            # Fill from the node with the most idle instances, so groups stay inside a node.
            by_node: dict[int, list[int]] = {}
            for g in idle:
                by_node.setdefault(cluster.node_of(g), []).append(g)
            ordered = sorted(by_node.values(), key=lambda gs: (-len(gs), gs[0]))
            group = tuple(sorted([g for gs in ordered for g in gs][:sp]))
            picks.append((r, group))
            idle = [g for g in idle if g not in group]
        launches = validated_single_chunks(view, self.cost_model, self.settings, picks)
        return Decision(launches, plans_validated=len(launches))


@dataclass
class DistServePolicy:
    """Prefill instances in fixed groups (the rest, if the group size does not divide them,
    stay unused); a request takes the first idle group."""

    name: str
    cost_model: CostModel
    settings: PolicySettings = field(default_factory=PolicySettings)

    def decide(self, view: PrefillView) -> Decision:
        if not startable(view):
            return Decision()
        size = self.settings.distserve_group
        n = len(view.idle)
        groups = [tuple(range(k, k + size)) for k in range(0, n - size + 1, size)]
        free_groups = [g for g in groups if all(view.idle[i] for i in g)]
        picks = list(zip(view.pending, free_groups, strict=False))
        launches = validated_single_chunks(view, self.cost_model, self.settings, picks)
        return Decision(launches, plans_validated=len(launches))
