"""Instance layout: how many prefill and decode instances, and which node each sits on."""

from __future__ import annotations

from collections.abc import Iterable

from pydantic import BaseModel, ConfigDict, Field


class ClusterSpec(BaseModel):
    """Prefill instances are numbered 0..P-1 and packed onto nodes in order; decode instances
    sit on nodes of their own after them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    prefill_instances: int = Field(gt=0)
    decode_instances: int = Field(default=1, ge=0)
    gpus_per_node: int = Field(default=8, gt=0)

    def node_of(self, instance: int) -> int:
        return instance // self.gpus_per_node

    def spans_nodes(self, instances: Iterable[int]) -> bool:
        nodes = {i // self.gpus_per_node for i in instances}
        return len(nodes) > 1

    @property
    def total_gpus(self) -> int:
        return self.prefill_instances + self.decode_instances
