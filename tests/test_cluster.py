"""ClusterSpec's node map: packed by default (prefill nodes, then decode nodes of their own),
or given per instance as a live deployment reads it from Ray; the planners' cross-node choice
follows the map."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from tests.helpers import linear_cost_model
from tetris.solver.cluster import ClusterSpec
from tetris.solver.cost_model import CostModel


def test_packed_layout_puts_decode_on_nodes_of_its_own() -> None:
    """10 prefill + 3 decode at 4 a node: prefill on nodes 0, 0, 0, 0, 1, ..., 2, 2; decode on
    node 3; the widest one-node prefill group is 4."""
    c = ClusterSpec(prefill_instances=10, decode_instances=3, gpus_per_node=4)
    assert [c.node_of(i) for i in range(13)] == [0] * 4 + [1] * 4 + [2] * 2 + [3] * 3
    assert c.spans_nodes([3, 4]) and not c.spans_nodes([4, 7])
    assert c.max_prefill_per_node == 4 and c.prefill_node_of == (0,) * 4 + (1,) * 4 + (2,) * 2


def test_an_explicit_map_overrides_the_packing() -> None:
    """Prefill 0 and 2 on node 0, prefill 1 on node 1: {0, 2} stays inside a node, {0, 1}
    does not; a map of the wrong length or with a negative node is refused, naming why."""
    c = ClusterSpec(prefill_instances=3, decode_instances=1, nodes=(0, 1, 0, 1))
    assert not c.spans_nodes([0, 2]) and c.spans_nodes([0, 1])
    assert c.max_prefill_per_node == 2
    with pytest.raises(ValidationError, match="names 3 instances; the cluster has 4"):
        ClusterSpec(prefill_instances=3, decode_instances=1, nodes=(0, 1, 0))
    with pytest.raises(ValidationError, match=">= 0"):
        ClusterSpec(prefill_instances=1, decode_instances=1, nodes=(0, -1))


def test_chunk_time_on_a_group_follows_the_map() -> None:
    """With 1 s of latency per extra rank across nodes and none inside one, T(c, 0, 2) on the
    pair (0, 1) is 1 s longer when the map puts them on two nodes: lin·c/2 + 1 vs lin·c/2."""
    base = linear_cost_model(2)
    co = base.coefficients.model_copy(update={"step_inter_s": 1.0})

    def on(nodes: tuple[int, ...]) -> float:
        cm = CostModel(base.model, base.hardware,
                       ClusterSpec(prefill_instances=2, nodes=nodes), co)
        return cm.chunk_seconds_on(4096, 0, (0, 1))

    assert on((0, 0, 0)) == pytest.approx(1e-3 * 4096 / 2)
    assert on((0, 1, 0)) == pytest.approx(1e-3 * 4096 / 2 + 1.0)
