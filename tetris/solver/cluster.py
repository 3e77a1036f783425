"""Instance layout: how many prefill and decode instances, and which node each sits on."""

from __future__ import annotations

from collections.abc import Iterable

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator


class ClusterSpec(BaseModel):
    """Prefill instances are numbered 0..P-1, decode instances P..P+D-1. Without `nodes` they
    are packed onto nodes in order, `gpus_per_node` each (decode on nodes of their own after
    the prefill ones); with `nodes`, instance i sits on node `nodes[i]` (a live deployment
    reads it from where its actors run).

    `elastic`: every GPU can serve either role, one at a time — prefill instance i and decode
    instance P+i are the two roles of GPU i (so P == D, and both sit on GPU i's node and use
    its links); which role is active is the executor's state, not the spec's."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    prefill_instances: int = Field(gt=0)
    decode_instances: int = Field(default=1, ge=0)
    gpus_per_node: int = Field(default=8, gt=0)
    nodes: tuple[int, ...] | None = Field(default=None, description="node of each instance, "
                                          "prefill then decode; None: packed in order")
    elastic: bool = Field(default=False, description="prefill instance i and decode instance "
                          "P+i are one GPU's two roles")
    _node: tuple[int, ...] = PrivateAttr()
    _prefill_node: tuple[int, ...] = PrivateAttr()
    _widest: int = PrivateAttr()

    @model_validator(mode="after")
    def _node_map(self) -> ClusterSpec:
        if self.elastic and self.decode_instances != self.prefill_instances:
            raise ValueError(f"an elastic cluster has one prefill and one decode instance per "
                             f"GPU; got {self.prefill_instances} prefill and "
                             f"{self.decode_instances} decode")
        if self.nodes is None and self.elastic:
            half = tuple(g // self.gpus_per_node for g in range(self.prefill_instances))
            self._node = half + half
        elif self.nodes is None:
            per = self.gpus_per_node
            p = self.prefill_instances
            decode_base = -(-p // per)  # decode starts on a node of its own
            self._node = (*(g // per for g in range(p)),
                          *(decode_base + j // per for j in range(self.decode_instances)))
        else:
            if len(self.nodes) != self.num_instances:
                raise ValueError(f"nodes names {len(self.nodes)} instances; the cluster has "
                                 f"{self.num_instances} ({self.prefill_instances} prefill + "
                                 f"{self.decode_instances} decode)")
            if min(self.nodes) < 0:
                raise ValueError("node numbers must be >= 0")
            p = self.prefill_instances
            if self.elastic and self.nodes[:p] != self.nodes[p:]:
                raise ValueError("an elastic cluster's decode instance P+i is GPU i: its node "
                                 "must be prefill instance i's")
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

    def gpu_of(self, instance: int) -> int:
        """The GPU instance `instance` runs on (itself, but for an elastic cluster's decode
        instances: P+i is GPU i)."""
        return instance % self.prefill_instances if self.elastic else instance

    def local_rank(self, instance: int) -> int:
        """The position of the instance's GPU among the GPUs of its node (prefill then
        decode), in order: which of the node's GPUs (and so which NIC) it is."""
        gpu = self.gpu_of(instance)
        node = self._node[gpu]
        return sum(1 for n in self._node[:gpu] if n == node)

    def spans_nodes(self, instances: Iterable[int]) -> bool:
        node = self._node
        return len({node[i] for i in instances}) > 1

    @property
    def num_instances(self) -> int:
        return self.prefill_instances + self.decode_instances

    @property
    def total_gpus(self) -> int:
        return self.prefill_instances if self.elastic else self.num_instances
