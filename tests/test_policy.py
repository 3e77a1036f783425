"""The policy package's glue: one settings object that every rebuilt problem keeps, the policy
registry both executors call, and refinement on a thread of its own."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.helpers import linear_cost_model, problem, request
from tetris.solver.policy.baselines import DistServePolicy, StaticSpPolicy
from tetris.solver.policy.cdsp import CdspPolicy
from tetris.solver.policy.refinement_runs import InlineRun, ThreadRun
from tetris.solver.policy.registry import POLICIES, make_policy, policy_for_solver
from tetris.solver.policy.settings import PolicySettings
from tetris.solver.policy.view import PrefillView


def test_problem_carries_every_setting() -> None:
    """Block, chunk and SP caps, miss penalty from the settings; λ = ρ/(1−ρ) from the load."""
    s = PolicySettings(block_tokens=128, max_chunks=3, max_sp=2, miss_penalty=4.0)
    p = s.problem(linear_cost_model(4), (0.0,) * 4, (request("a", 512),), 1.0, load=0.5)
    assert (p.block_tokens, p.max_chunks, p.max_sp, p.miss_penalty, p.now_s) == \
        (128, 3, 2, 4.0, 1.0)
    assert p.gpu_cost_weight == pytest.approx(1.0)


def test_a_time_slice_keeps_the_caps_of_its_plan() -> None:
    """max_sp 1 and max_chunks 1, quantum 0.1 s at 1 ms/token: the one-chunk plan of 1,000
    tokens on one instance is cut to its first 512-token block on that same instance (the
    cut adds one chunk to the validated plan, never a wider group)."""
    cm = linear_cost_model(2)
    settings = PolicySettings(max_sp=1, max_chunks=1, quantum_s=0.1)
    view = PrefillView(0.0, (0.0, 0.0), (True, True), (request("a", 1000),), 0.0)
    decision = CdspPolicy("g", cm, settings).decide(view)
    (launch,) = decision.launches
    assert (launch.chunk.start_token, launch.chunk.end_token, launch.chunk.sp) == (0, 512, 1)
    assert decision.stats["chunks_sliced"] == 1


def test_registry_builds_every_policy_from_one_settings_object() -> None:
    """Each name builds its policy over the given cost model and settings; `tetris` alone
    refines, inline unless given an executor; bad names and sizes are refused by name."""
    cm, settings = linear_cost_model(4), PolicySettings(static_sp=2)
    built = {name: make_policy(name, settings, cm) for name in POLICIES}
    assert isinstance(built["static-sp"], StaticSpPolicy)
    assert isinstance(built["distserve"], DistServePolicy)
    for name in ("tetris", "tetris-greedy", "tetris-milp"):
        policy = built[name]
        assert isinstance(policy, CdspPolicy) and policy.settings is settings
        assert (policy.refiner is not None) == (name == "tetris")
    assert isinstance(built["tetris"].refiner.run, InlineRun)  # type: ignore[attr-defined]
    with ThreadPoolExecutor(1) as pool:
        threaded = make_policy("tetris", settings, cm, refine_on=pool)
        assert isinstance(threaded.refiner.run, ThreadRun)  # type: ignore[attr-defined]
    assert policy_for_solver("cp") == "tetris"
    with pytest.raises(ValueError, match="unknown policy 'fifo'"):
        make_policy("fifo", settings, cm)
    with pytest.raises(ValueError, match=r"static_sp \(8\) exceeds the 4 prefill"):
        make_policy("static-sp", PolicySettings(static_sp=8), cm)
    make_policy("tetris", PolicySettings(static_sp=8), cm)  # not a setting of this policy


def test_thread_run_is_busy_until_done_and_its_result_is_used_once() -> None:
    """CP-SAT on the refiner's own thread: busy while it runs, then its result once."""
    cm = linear_cost_model(2)
    p = problem(cm, (0.0, 0.0), request("a", 2048, slo=1.0), request("b", 512, slo=0.3))
    with ThreadPoolExecutor(1) as pool:
        run = ThreadRun(pool, time_limit_ms=200.0)
        assert run.start(p) and run.busy(0.0) and run.take(0.0) is None
        deadline = time.monotonic() + 30
        while run.busy(0.0):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        done = run.take(0.0)
        assert done is not None and done[0] is p and done[1].status.has_plans
        assert run.take(0.0) is None and run.last_wall_s > 0
