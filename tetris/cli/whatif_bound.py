"""The physical limit beside `tetris whatif`'s results, and `--best-split`
(tetris/evaluation/bound.py, best_split.py)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from tetris.cli.errors import UsageError, for_option
from tetris.cli.output import number
from tetris.evaluation.best_split import best_split
from tetris.evaluation.bound import FluidBound, bound_of
from tetris.evaluation.policies import POLICIES
from tetris.evaluation.sim_config import SimConfig
from tetris.evaluation.whatif import SearchOutcome, SearchUnit
from tetris.evaluation.workload import Workload


def bound(workload: Workload, config: SimConfig, where: str) -> FluidBound:
    return for_option(where, bound_of, workload.requests, config)


def add_shares(policies: dict[str, Any], limit: FluidBound) -> None:
    """Each policy's max rate as a share of the bound, in its JSON entry."""
    for name, entry in policies.items():
        entry.update(limit.share(entry["max_sustainable_rate_rps"],
                                 POLICIES[name].architecture))


def split_policies(args: argparse.Namespace, policies: list[str]) -> list[str]:
    """The policies `--best-split` searches: the fixed-role ones."""
    if args.sweep:
        raise UsageError("--best-split searches the base cluster's split: drop --sweep")
    if args.no_search:
        raise UsageError("--best-split is a max-rate search: drop --no-search")
    fixed = [p for p in policies if POLICIES[p].architecture == "disaggregated"]
    if not fixed:
        raise UsageError("--best-split: none of the policies has fixed prefill / decode roles "
                         f"({', '.join(policies)})")
    return fixed


def run_best_split(args: argparse.Namespace, policies: list[str], config: SimConfig,
                   limit: FluidBound,
                   run: Callable[[list[SearchUnit]], list[SearchOutcome]]) -> dict[str, Any]:
    def unit(policy: str, resized: SimConfig) -> SearchUnit:
        for_option(f"--best-split {resized.prefill_instances}+{resized.decode_instances}",
                   resized.check_policy, policy, POLICIES[policy].architecture)
        return SearchUnit(policy, resized, target=args.target, rel_tol=args.rel_tol,
                          max_evals=args.max_evals,
                          start_rps=args.start_rate or 0.8 * limit.split(
                              resized.prefill_instances).rps)

    return best_split(policies, config, limit, unit, run)


def print_bound(console: Any, out: dict[str, Any]) -> None:
    b = out.get("bound")
    if b:
        c = b["configured_split"]
        console.print(
            f"fluid bound: elastic roles {number(b['elastic_rps'])} req/s; best fixed split "
            f"{b['best_split'][0]}+{b['best_split'][1]} {number(b['fixed_split_rps'])} req/s "
            f"({b['binding']}); this split {c['prefill']}+{c['decode']} {number(c['rps'])} "
            f"req/s ({c['binding']})")
    for name, res in (out.get("best_split") or {}).get("policies", {}).items():
        tried = ", ".join(f"{t['split'][0]}+{t['split'][1]}: "
                          f"{number(t['max_sustainable_rate_rps'])}" for t in res["tried"])
        console.print(f"{name}: best split {res['split'][0]}+{res['split'][1]} sustains "
                      f"{number(res['max_sustainable_rate_rps'])} req/s (tried {tried})")
