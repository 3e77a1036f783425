"""Elastic roles in the serving engine on a fake pool (no Ray, no model): a role swap drains a
decode GPU by moving its request's KV, the drained GPU prefills next, roles are refused on a
pool that cannot change them, and the role book applies a two-way swap."""

from __future__ import annotations

import math

import pytest

from tests.fake_pool import FakePool
from tests.test_engine import SETTINGS, drain, expected, make_engine, run, settled, submit
from tetris.runtime.engine import Engine
from tetris.solver.policy.ledger import Ledger
from tetris.solver.policy.role_book import RoleBook
from tetris.solver.policy.roles import (
    DECODE,
    PREFILL,
    TO_PREFILL,
    RoleDecision,
    RoleState,
    prefill_target,
)

ELASTIC = SETTINGS.model_copy(update={"roles": "threshold", "role_interval_s": 0.02})


class SwapRoles:
    """Once GPU 2 decodes and GPU 1 is free: GPU 1 to decode, GPU 2 to prefill."""

    name = "swap"

    def __init__(self) -> None:
        self.swapped = False

    def decide(self, state: RoleState) -> RoleDecision:
        if not self.swapped and state.decode_kv[2] and state.prefill_free[1]:
            self.swapped = True
            return RoleDecision(to_decode=(1,), to_prefill=(2,))
        return RoleDecision()


def test_a_swap_moves_the_decoding_request_and_the_drained_gpu_prefills_next() -> None:
    """Three GPUs start [prefill, prefill, decode]; 'a' (200 tokens, 80 to generate) decodes
    on GPU 2 when the swap comes: its KV moves from decode rank 5 to 4 between steps, its
    tokens go on unchanged, GPU 2 turns to prefill once empty; 'b' then prefills on GPUs 0
    and 2 only and decodes on GPU 1; nothing is left held."""
    async def test(engine: Engine, pool: FakePool) -> None:
        assert engine.roles is not None
        assert engine.roles.book.roles == [PREFILL, PREFILL, DECODE]
        planner = SwapRoles()
        engine.roles.planner = planner
        a = await submit(engine, "a", 200, max_tokens=80)
        assert [t for e in await drain(a) for t in e.token_ids] == expected(200, 80)
        assert planner.swapped and "migrate a 5->4" in pool.calls
        assert a.summary.decode_instances == (1,)
        assert engine.roles.book.roles == [PREFILL, DECODE, PREFILL]
        b = await submit(engine, "b", 600, max_tokens=4)
        assert [t for e in await drain(b) for t in e.token_ids] == expected(600, 4)
        assert {g for c in b.summary.chunks for g in c.instances} <= {0, 2}
        assert b.summary.decode_instances == (1,)
        await settled(engine, pool)
        assert engine.ledger.parked == [False, True, False]
    run(test, FakePool(num_prefill=3, num_decode=3, elastic=True), settings=ELASTIC)


def test_roles_need_an_elastic_pool_and_an_elastic_pool_needs_roles() -> None:
    """Either mismatch is refused before anything serves, naming the roles setting."""
    with pytest.raises(ValueError, match="elastic roles need an elastic pool"):
        make_engine(FakePool(), settings=ELASTIC)
    with pytest.raises(ValueError, match="roles 'fixed'"):
        make_engine(FakePool(num_prefill=2, num_decode=2, elastic=True))


def test_the_role_book_applies_a_swap_that_keeps_one_gpu_decoding() -> None:
    """[prefill, prefill, decode], decode floor 1: GPU 1 to decode and GPU 2 to prefill in one
    decision is applied whole (GPU 1 decodes before GPU 2 stops taking requests); GPU 2 then
    drains and settles to prefill once empty."""
    ledger = Ledger(3, 3, SETTINGS, elastic=True)
    book = RoleBook(ledger, 2, (), 10.0)

    def state() -> RoleState:
        return book.state(1.0, chunk_seconds=lambda n, p: 0.0, kv_capacity=1000,
                          waiting_kv=0, decode_kv_of=lambda rid: 0)
    applied = book.apply(RoleDecision((1,), (2,)), state(), 1.0)
    assert applied.to_decode == (1,) and applied.to_prefill == (2,)
    assert book.roles == [PREFILL, DECODE, TO_PREFILL]
    assert ledger.parked[1] and not ledger.decode_off[1] and ledger.decode_off[2]
    assert book.settle(2.0) == [2]
    assert book.roles == [PREFILL, DECODE, PREFILL] and not ledger.parked[2]
    assert [t for t, *_ in book.timeline] == [0.0, 1.0, 1.0, 2.0]


def test_prefill_target_follows_the_ttft_slack() -> None:
    """ρ / (1 - ρ) = 2(S - 1) / ln 10: S = 5 gives 0.7765, S = 2 gives 0.4648; no slack (S ≤ 1)
    gives the 0.05 floor, a huge S tends to 1."""
    assert prefill_target(5.0) == pytest.approx(8 / (8 + math.log(10)))
    assert prefill_target(5.0) == pytest.approx(0.7765, abs=1e-4)
    assert prefill_target(2.0) == pytest.approx(0.4648, abs=1e-4)
    assert prefill_target(1.0) == 0.05 and prefill_target(0.5) == 0.05
    assert 0.999 < prefill_target(1e4) <= 1.0


def test_arrivals_set_the_prefill_width_nine_in_ten_need() -> None:
    """Prefill alone takes tokens/1000/k s on k GPUs and every SLO is 2 s: a 1,000-token
    prompt needs 1 GPU, 3,000 need 2, 5,000 need 3; after 9 short prompts and 1 of 5,000
    the 90th percentile (the 10th of 10) is 3; the SLO scale 2 s / 0.5 s = 4 sets the target."""
    book = RoleBook(Ledger(4, 4, SETTINGS, elastic=True), 2, (), 10.0)

    def seconds(n: int, k: int) -> float:
        return n / 1000 / k
    for _ in range(9):
        book.arrived(1000, 1100, 2.0, seconds, 0.5)
    assert book.prefill_width == 1
    book.arrived(5000, 5100, 2.0, seconds, 0.5)
    assert book.prefill_width == 3
    assert book.prefill_target == prefill_target(4.0)
    assert book.signals.arrived_work == pytest.approx(9 * 1.0 + 5.0)
