"""Properties of the analytical cost model T(c, p, s) and friends (tetris.solver.cost_model)."""

from __future__ import annotations

import sys

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tetris.solver.cluster import ClusterSpec
from tetris.solver.cost_model import CostCoefficients, CostModel
from tetris.solver.hardware import HARDWARE_PRESETS
from tetris.solver.model_spec import MODEL_PRESETS

EPS = sys.float_info.epsilon
CLUSTER = ClusterSpec(prefill_instances=16, decode_instances=2, gpus_per_node=8)
MODELS = {
    (m, h): CostModel(MODEL_PRESETS[m], HARDWARE_PRESETS[h], CLUSTER)
    for m in sorted(MODEL_PRESETS)
    for h in ("h100", "a100")
}

cost_models = st.sampled_from(sorted(MODELS)).map(MODELS.__getitem__)
tokens = st.integers(min_value=1, max_value=1 << 20)
prefixes = st.integers(min_value=0, max_value=1 << 20)
sps = st.integers(min_value=1, max_value=CLUSTER.prefill_instances)
links = st.booleans()
SETTINGS = settings(max_examples=200, deadline=None)


def work(cm: CostModel, c: int, p: int) -> float:
    """W = lin·c + attn·(c·p + c(c+1)/2): the compute that SP divides by s."""
    co = cm.coefficients
    return co.lin_s_per_token * c + co.attn_s_per_pair * (c * p + c * (c + 1) / 2)


def test_presets_are_physical() -> None:
    """Every preset has positive coefficients and a slower link across nodes than inside."""
    for cm in MODELS.values():
        co = cm.coefficients
        assert all(v > 0 for v in co.model_dump().values())
        assert co.step_inter_s >= co.step_intra_s
        assert co.comm_inter_s_per_token >= co.comm_intra_s_per_token
        assert cm.kv_capacity_tokens > 0


def test_hand_computed_chunk() -> None:
    """T(100, 50, 2) for hand-made coefficients matches the formula worked by hand, with and
    without ring overlap."""
    co = CostCoefficients(
        fixed_s=1.0, step_intra_s=0.1, step_inter_s=0.5, lin_s_per_token=0.01,
        attn_s_per_pair=1e-4, comm_intra_s_per_token=1e-3, comm_inter_s_per_token=1e-2,
        decode_fixed_s=0.0, decode_kv_s_per_token=0.0,
    )
    cm = CostModel(MODEL_PRESETS["llama3-8b"], HARDWARE_PRESETS["h100"], CLUSTER, co)
    # pairs = c·p + c(c+1)/2 = 100·50 + 100·101/2 = 10050; per rank per step a = 1e-4·10050/4
    # = 0.25125; the dense part 1 + 0.01·100/2 = 1.5.
    # intra: t = 1e-3·150/2 + 0.1 = 0.175 < a (compute-bound): 1.5 + 0.25125 + 0.25125 = 2.0025
    assert cm.chunk_seconds(100, 50, 2) == pytest.approx(2.0025, rel=1e-12)
    # inter: t = 1e-2·150/2 + 0.5 = 1.25 > a (transfer-bound): 1.5 + 0.25125 + 1.25 = 3.00125
    assert cm.chunk_seconds(100, 50, 2, cross_node=True) == pytest.approx(3.00125, rel=1e-12)
    # s = 1 never pays a link, flagged cross-node or not: 1 + 1 + 1.005 = 3.005
    assert cm.chunk_seconds(100, 50, 1, True) == cm.chunk_seconds(100, 50, 1) == pytest.approx(
        3.005, rel=1e-12
    )
    added = CostModel(cm.model, cm.hardware, CLUSTER,
                      co.model_copy(update={"ring_overlap": False}))
    # No overlap: 1.5 + 1e-4·10050/2 + t = 1.5 + 0.5025 + 0.175 = 2.1775 (inter: + 1.25)
    assert added.chunk_seconds(100, 50, 2) == pytest.approx(2.1775, rel=1e-12)
    assert added.chunk_seconds(100, 50, 2, cross_node=True) == pytest.approx(3.2525, rel=1e-12)


def test_long_prompt_over_two_nodes_beats_one_node() -> None:
    """LWM-7B on H100: a 256k-token prompt prefills faster on 16 GPUs over 2 nodes than on 8 of
    one node, by the overlap rule's arithmetic."""
    cm = MODELS[("lwm-7b-1m", "h100")]
    co = cm.coefficients
    c = 262144
    pairs = c * (c + 1) / 2  # 3.436e10 causal pairs
    dense = co.fixed_s + co.lin_s_per_token * c  # on one GPU
    # 8 GPUs, NVLink: per step a = attn·pairs/64 ≈ 1.06e-9·3.44e10/64 ≈ 0.57 s, t = 32768 tokens
    # · 0.5 MiB / 450 GB/s ≈ 0.038 s: compute-bound, R = 8·a = attn·pairs/8 ≈ 4.55 s.
    a8 = co.attn_s_per_pair * pairs / 64
    t8 = co.comm_intra_s_per_token * c / 8 + co.step_intra_s
    assert t8 < a8
    one_node = co.fixed_s + (dense - co.fixed_s) / 8 + 8 * a8
    # 16 GPUs over 2 nodes: a ≈ 0.142 s, t = 16384 tokens · 0.5 MiB / 50 GB/s ≈ 0.172 s:
    # transfer-bound, R = a + 15·t ≈ 2.72 s.
    a16 = co.attn_s_per_pair * pairs / 256
    t16 = co.comm_inter_s_per_token * c / 16 + co.step_inter_s
    assert t16 > a16
    two_nodes = co.fixed_s + (dense - co.fixed_s) / 16 + a16 + 15 * t16
    assert cm.chunk_seconds(c, 0, 8) == pytest.approx(one_node, rel=1e-12)
    assert cm.chunk_seconds(c, 0, 16, True) == pytest.approx(two_nodes, rel=1e-12)
    assert 2.5 < two_nodes < 3.5 < 4.5 < one_node < 6.0


@SETTINGS
@given(cost_models, tokens, st.integers(min_value=1, max_value=4096), prefixes, sps, links)
def test_monotone_in_chunk_tokens(
    cm: CostModel, c: int, extra: int, p: int, s: int, x: bool
) -> None:
    """More tokens in the chunk never take less time."""
    assert cm.chunk_seconds(c + extra, p, s, x) >= cm.chunk_seconds(c, p, s, x)


@SETTINGS
@given(cost_models, tokens, prefixes, st.integers(min_value=1, max_value=4096), sps, links)
def test_monotone_in_prefix(cm: CostModel, c: int, p: int, extra: int, s: int, x: bool) -> None:
    """A longer prefix never makes the same chunk faster."""
    assert cm.chunk_seconds(c, p + extra, s, x) >= cm.chunk_seconds(c, p, s, x)


@SETTINGS
@given(cost_models, tokens, prefixes, sps, links)
def test_sp_speedup_at_most_s(cm: CostModel, c: int, p: int, s: int, x: bool) -> None:
    """SP speedup T(c,p,1)/T(c,p,s) never exceeds s (fixed cost and links do not shrink)."""
    t1, ts = cm.chunk_seconds(c, p, 1), cm.chunk_seconds(c, p, s, x)
    assert t1 / ts <= s * (1 + 4 * EPS)
    if s > 1:
        assert t1 / ts < s  # strictly: fixed_s > 0 for every preset


@SETTINGS
@given(cost_models, tokens, prefixes, st.integers(min_value=2, max_value=16), links)
def test_ring_is_the_larger_of_compute_and_transfer(
    cm: CostModel, c: int, p: int, s: int, x: bool
) -> None:
    """T(c,p,s) = max(T_compute, T_transfer): the whole ring hidden behind attention, or one
    step of attention plus s−1 transfers of a rank's KV share."""
    co = cm.coefficients
    step = co.step_inter_s if x else co.step_intra_s
    comm = co.comm_inter_s_per_token if x else co.comm_intra_s_per_token
    pairs = c * p + c * (c + 1) / 2
    dense = co.fixed_s + co.lin_s_per_token * c / s
    compute = dense + co.attn_s_per_pair * pairs / s
    transfer = dense + co.attn_s_per_pair * pairs / s**2 + (s - 1) * (comm * (p + c) / s + step)
    assert cm.chunk_seconds(c, p, s, x) == pytest.approx(max(compute, transfer), rel=1e-12)


ADDITIVE = {
    key: CostModel(cm.model, cm.hardware, CLUSTER,
                   cm.coefficients.model_copy(update={"ring_overlap": False}))
    for key, cm in MODELS.items()
}


@SETTINGS
@given(st.sampled_from(sorted(ADDITIVE)).map(ADDITIVE.__getitem__), tokens, prefixes,
       st.integers(min_value=2, max_value=16), links)
def test_sp_speedup_at_least_one_iff_work_covers_links(
    cm: CostModel, c: int, p: int, s: int, x: bool
) -> None:
    """Without overlap T(c,p,1) − T(c,p,s) = (s−1)/s·(W − s·step[x] − comm[x]·(p+c)),
    W = lin·c + attn·pairs, so SP helps (speedup ≥ 1) exactly when W ≥ s·step[x] +
    comm[x]·(p+c)."""
    co = cm.coefficients
    step = co.step_inter_s if x else co.step_intra_s
    comm = co.comm_inter_s_per_token if x else co.comm_intra_s_per_token
    w = work(cm, c, p)
    link = s * step + comm * (p + c)
    t1, ts = cm.chunk_seconds(c, p, 1), cm.chunk_seconds(c, p, s, x)
    tol = 8 * EPS * (t1 + ts)
    assert t1 - ts == pytest.approx((s - 1) / s * (w - link), abs=tol)
    margin = (s - 1) / s * (w - link)
    if margin > tol:
        assert t1 / ts > 1
    elif margin < -tol:
        assert t1 / ts < 1


@SETTINGS
@given(cost_models, st.integers(min_value=32768, max_value=1 << 20), prefixes, sps, links)
def test_sp_never_hurts_large_chunks(cm: CostModel, c: int, p: int, s: int, x: bool) -> None:
    """For every preset, a chunk of ≥ 32k tokens runs no slower on s ≤ 16 instances than on 1."""
    assert cm.chunk_seconds(c, p, s, x) <= cm.chunk_seconds(c, p, 1)


@SETTINGS
@given(cost_models, tokens, prefixes, sps, links)
def test_attention_second_difference_constant(
    cm: CostModel, c: int, p: int, s: int, x: bool
) -> None:
    """Δ²_c T(c,p,s) = attn_s_per_pair/s when compute-bound, /s² when transfer-bound: the only
    term quadratic in c is causal attention (three points in one regime)."""
    t0, t1, t2 = (cm.chunk_seconds(c + i, p, s, x) for i in range(3))
    co = cm.coefficients
    step = co.step_inter_s if x else co.step_intra_s
    comm = co.comm_inter_s_per_token if x else co.comm_intra_s_per_token

    def compute_bound(n: int) -> bool:
        a = co.attn_s_per_pair * (n * p + n * (n + 1) / 2) / s**2
        return a >= comm * (p + n) / s + step

    regimes = {compute_bound(c + i) for i in range(3)}
    assume(len(regimes) == 1 or s == 1)
    want = co.attn_s_per_pair / (s if s == 1 or regimes == {True} else s * s)
    # Each T carries a rounding error of a few ulp of itself; the difference cancels the rest.
    assert t2 - 2 * t1 + t0 == pytest.approx(want, rel=1e-6, abs=16 * EPS * t2)


@settings(max_examples=50, deadline=None)
@given(cost_models, st.integers(min_value=0, max_value=1 << 14))
def test_attention_second_difference_from_zero_prefix(cm: CostModel, c: int) -> None:
    """On one instance with no prefix, Δ²_c T(c,0,1) equals attn_s_per_pair."""
    t = [cm.chunk_seconds(c + i, 0, 1) for i in range(3)]
    assert t[2] - 2 * t[1] + t[0] == pytest.approx(
        cm.coefficients.attn_s_per_pair, rel=1e-6, abs=16 * EPS * t[2]
    )


@SETTINGS
@given(cost_models, tokens, prefixes, sps)
def test_cross_node_never_faster(cm: CostModel, c: int, p: int, s: int) -> None:
    """The same chunk over the inter-node link never beats the intra-node one (equal at s=1)."""
    inter, intra = cm.chunk_seconds(c, p, s, True), cm.chunk_seconds(c, p, s, False)
    assert inter >= intra
    if s == 1:
        assert inter == intra


@SETTINGS
@given(
    cost_models, tokens, prefixes, sps, links,
    st.floats(min_value=0.0, max_value=3.0, allow_nan=False),
)
def test_max_tokens_within_is_largest_fit(
    cm: CostModel, c0: int, p: int, s: int, x: bool, scale: float
) -> None:
    """max_tokens_within returns c with T(c) ≤ budget < T(c+1) (0 when one token overruns)."""
    budget = scale * cm.chunk_seconds(c0, p, s, x)
    n = cm.max_tokens_within(budget, p, s, x)
    assert n >= 0
    if n > 0:
        assert cm.chunk_seconds(n, p, s, x) <= budget
    assert cm.chunk_seconds(n + 1, p, s, x) > budget
    if scale >= 1.0:
        assert n >= c0


@SETTINGS
@given(cost_models, prefixes, sps, links)
def test_max_tokens_within_exact_budget(cm: CostModel, p: int, s: int, x: bool) -> None:
    """A budget of exactly T(c) admits c tokens and no more, for a few c."""
    for c in (1, 7, 1000, 123_457):
        assert cm.max_tokens_within(cm.chunk_seconds(c, p, s, x), p, s, x) == c


@settings(max_examples=100, deadline=None)
@given(cost_models, st.integers(min_value=1, max_value=1 << 20))
def test_best_isolated_ttft_not_worse_than_one_instance(cm: CostModel, length: int) -> None:
    """best_isolated_ttft(L) ≤ T(L,0,1) and is the minimum over feasible SP sizes."""
    assume(length <= cm.kv_capacity_tokens)
    best = cm.best_isolated_ttft(length)
    assert best <= cm.chunk_seconds(length, 0, 1)
    per_node = CLUSTER.gpus_per_node
    options = [cm.chunk_seconds(length, 0, s, s > per_node)
               for s in range(1, CLUSTER.prefill_instances + 1)]
    assert best == min(options)


@SETTINGS
@given(
    cost_models,
    st.integers(min_value=1, max_value=512),
    st.integers(min_value=1, max_value=64),
    st.integers(min_value=0, max_value=1 << 24),
    st.integers(min_value=1, max_value=1 << 16),
)
def test_decode_step_increasing(cm: CostModel, b: int, db: int, k: int, dk: int) -> None:
    """A decode step takes longer with a bigger batch or more KV tokens; an empty batch is 0."""
    d = cm.decode_step_seconds
    assert d(b + db, k) > d(b, k)
    assert d(b, k + dk) > d(b, k)
    assert d(b, k) > 0
    assert d(0, k) == 0.0


@SETTINGS
@given(cost_models, st.integers(0, 1 << 22), st.integers(0, 1 << 22), links)
def test_kv_transfer_linear_in_tokens(cm: CostModel, a: int, b: int, x: bool) -> None:
    """KV transfer time is latency + tokens·bytes/bandwidth: f(a+b) + f(0) = f(a) + f(b)."""
    f = cm.kv_transfer_seconds
    hw = cm.hardware
    assert f(0, x) == (hw.inter_node_latency_s if x else hw.intra_node_latency_s)
    assert f(a + b, x) + f(0, x) == pytest.approx(f(a, x) + f(b, x), rel=1e-12)
    assert f(a, True) >= f(a, False)
    if a < b:
        assert f(a, x) < f(b, x)


@SETTINGS
@given(cost_models, tokens, prefixes, sps, links)
def test_chunk_is_a_batch_of_one(cm: CostModel, c: int, p: int, s: int, x: bool) -> None:
    """chunk_seconds(c, p, s) equals batch_seconds of one chunk: c tokens, its causal pairs,
    p + c KV tokens (the inlined copy and the general form agree)."""
    pairs = c * p + c * (c + 1) / 2
    assert cm.chunk_seconds(c, p, s, x) == cm.batch_seconds(c, pairs, p + c, s, x)
    additive = CostModel(cm.model, cm.hardware, CLUSTER,
                         cm.coefficients.model_copy(update={"ring_overlap": False}))
    assert additive.chunk_seconds(c, p, s, x) == additive.batch_seconds(c, pairs, p + c, s, x)
