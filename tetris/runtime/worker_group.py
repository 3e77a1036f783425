"""The driver's handle on a world of `InstanceWorker`s, whoever hosts them.

`generate.py` drives one request through this protocol; `local_group.LocalSPGroup` (spawned
processes) and `RayWorkerGroup` (the daemon's `actors.WorkerPool`) satisfy it, so `tetris
generate` and the serving runtime exercise the same worker calls. Ranks below `num_prefill`
are prefill instances, the rest decode instances, as in the daemon.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from tetris.runtime.actors import WorkerPool

CALL_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Call:
    """`InstanceWorker.<method>(*args, **kwargs)` on `rank`."""

    rank: int
    method: str
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)


class WorkerGroup(Protocol):
    @property
    def num_prefill(self) -> int: ...

    @property
    def world_size(self) -> int: ...

    def ensure_group(self, ranks: tuple[int, ...]) -> None:
        """Make the process group of `ranks` exist on every rank before it is used
        (`create_group` on all ranks, in one order)."""

    def run(self, calls: Sequence[Call]) -> list[Any]:
        """Issue every call at once (a send on one rank while its peer receives; several
        calls on one rank run in the given order) and wait for all; results in call order."""


@dataclass
class RayWorkerGroup:
    """The daemon's actors as a `WorkerGroup`; `ray` is the initialised ray module."""

    ray: Any
    pool: WorkerPool
    timeout_s: float = CALL_TIMEOUT_S

    @property
    def num_prefill(self) -> int:
        return self.pool.num_prefill

    @property
    def world_size(self) -> int:
        return len(self.pool.all)

    def ensure_group(self, ranks: tuple[int, ...]) -> None:
        self.pool.ensure_group(ranks)

    def run(self, calls: Sequence[Call]) -> list[Any]:
        refs = [getattr(self.pool.actor(c.rank), c.method).remote(*c.args, **c.kwargs)
                for c in calls]
        return list(self.ray.get(refs, timeout=self.timeout_s))
