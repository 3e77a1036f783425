"""Instance layout: how many prefill and decode instances, and which node each sits on."""

from __future__ import annotations

from collections.abc import Iterable

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator


class ClusterSpec(BaseModel):
    """Prefill instances are numbered 0..P-1, decode instances P..P+D-1. Without `nodes` they
    are packed onto nodes in order, `gpus_per_node` each (decode on nodes of their own after
    the prefill ones); with `nodes`, instance i sits on node `nodes[i]` (a live deployment
    reads it from where its actors run)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    prefill_instances: int = Field(gt=0)
    decode_instances: int = Field(default=1, ge=0)
    gpus_per_node: int = Field(default=8, gt=0)
    nodes: tuple[int, ...] | None = Field(default=None, description="node of each instance, "
                                          "prefill then decode; None: packed in order")
    _node: tuple[int, ...] = PrivateAttr()
    _prefill_node: tuple[int, ...] = PrivateAttr()
    _widest: int = PrivateAttr()

    @model_validator(mode="after")
    def _node_map(self) -> ClusterSpec:
        if self.nodes is None:
            per = self.gpus_per_node
            p = self.prefill_instances
            decode_base = -(-p // per)  # decode starts on a node of its own
            self._node = (*(g // per for g in range(p)),
                          *(decode_base + j // per for j in range(self.decode_instances)))
        else:
            if len(self.nodes) != self.total_gpus:
                raise ValueError(f"nodes names {len(self.nodes)} instances; the cluster has "
                                 f"{self.total_gpus} ({self.prefill_instances} prefill + "
                                 f"{self.decode_instances} decode)")
            if min(self.nodes) < 0:
                raise ValueError("node numbers must be >= 0")
            self._node = self.nodes
        self._prefill_node = self._node[:self.prefill_instances]
        counts: dict[int, int] = {}
        for n in self._prefill_node:
            counts[n] = counts.get(n, 0) + 1
        self._widest = max(counts.values())
        return self

    def node_of(self, instance: int) -> int:
        """The node of prefill instance `instance` (or of decode instance
        `instance - prefill_instances`)."""
        return self._node[instance]

    @property
    def prefill_node_of(self) -> tuple[int, ...]:
        """Node of each prefill instance, for hot loops."""
        return self._prefill_node

    @property
    def max_prefill_per_node(self) -> int:
        """The widest group of prefill instances that stays inside one node."""
        return self._widest

    def local_rank(self, instance: int) -> int:
        """The instance's position among the instances of its node (prefill then decode), in
        instance order: which of the node's GPUs (and so which NIC) it is."""
        node = self._node[instance]
        return sum(1 for n in self._node[:instance] if n == node)

    def spans_nodes(self, instances: Iterable[int]) -> bool:
        node = self._node
        return len({node[i] for i in instances}) > 1

    @property
    def total_gpus(self) -> int:
        return self.prefill_instances + self.decode_instances
