"""`tetris whatif --best-split`: the fixed prefill : decode split that sustains the most, found
from the fluid bound and confirmed by simulation.

The bound's best split is the first guess; its neighbours are simulated too, and the search
walks (one GPU at a time) towards whichever neighbour sustains more until neither side of the
best split so far does better — a hill climb that assumes the max rate is unimodal in the split
(each pool's own limit is monotone in its size, and the rate is set by the tighter one).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tetris.evaluation.bound import FluidBound
from tetris.evaluation.sim_config import SimConfig
from tetris.evaluation.whatif import SearchOutcome, SearchUnit, with_split

RunUnits = Callable[[list[SearchUnit]], list[SearchOutcome]]


@dataclass
class _Climb:
    """One policy's tried splits (prefill GPUs -> max rate) and the plans they validated."""

    rates: dict[int, float] = field(default_factory=dict)
    validated: int = 0

    def best(self) -> int:
        # Ties: fewer prefill GPUs (the decode pool's KV memory is what most often binds).
        return max(sorted(self.rates), key=lambda p: self.rates[p])

    def next_splits(self, gpus: int) -> list[int]:
        best = self.best()
        return [p for p in (best - 1, best + 1) if 1 <= p < gpus and p not in self.rates]


def best_split(policies: Sequence[str], config: SimConfig, bound: FluidBound,
               unit: Callable[[str, SimConfig], SearchUnit], run: RunUnits,
               max_rounds: int = 32) -> dict[str, Any]:
    """Per policy, the split with the highest simulated max rate near the bound's best, with
    every split tried; `unit` makes a search for (policy, resized config), `run` runs a batch
    of them (in parallel where it can)."""
    gpus = config.total_gpus
    first = bound.best.prefill
    climbs = {p: _Climb() for p in policies}
    todo = {p: [s for s in (first - 1, first, first + 1) if 1 <= s < gpus] for p in policies}
    for _ in range(max_rounds):
        batch = [(p, s) for p, splits in todo.items() for s in splits]
        if not batch:
            break
        units = [unit(p, with_split(config, s, gpus - s)) for p, s in batch]
        for (policy, split), outcome in zip(batch, run(units), strict=True):
            rate = outcome.capacity["max_rate_rps"] if outcome.capacity else 0.0
            climbs[policy].rates[split] = float(rate or 0.0)
            climbs[policy].validated += outcome.plans_validated
        todo = {p: c.next_splits(gpus) for p, c in climbs.items()}
    tried = {s for c in climbs.values() for s in c.rates}
    bounds = {s: bound.split(s).rps for s in tried}
    out: dict[str, Any] = {"from_bound": [first, gpus - first], "policies": {}}
    for policy, climb in climbs.items():
        best = climb.best()
        out["policies"][policy] = {
            "split": [best, gpus - best],
            "max_sustainable_rate_rps": climb.rates[best],
            "share_of_split_bound": climb.rates[best] / bounds[best],
            "plans_validated": climb.validated,
            "tried": [{"split": [s, gpus - s], "max_sustainable_rate_rps": climb.rates[s],
                       "bound_rps": bounds[s]} for s in sorted(climb.rates)],
        }
    return out

