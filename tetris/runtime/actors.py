"""The Ray actors of a serving cluster: one `InstanceWorker` per instance, prefill then decode.

World rank r < P is prefill instance r (the planners' instance index); rank P + j is decode
instance j. Elastic roles (`elastic`): one actor per GPU, world rank g, is both prefill
instance g and decode instance g (the engine's rank P + g), on one KV cache. Actors ask for
one GPU each when `device` is CUDA; on CPU they take no CPU slot (`num_cpus=0`, one torch
thread each), so a 2-core machine can hold several.

Each actor runs its calls on one thread, in submission order, except those sent to its "kv"
concurrency group (`KV_GROUP`: streamed KV transfers), which run in their own submission order
on a second thread, so a transfer never waits for a chunk and a chunk never waits for one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tetris.runtime.ports import free_port
from tetris.runtime.worker import InstanceWorker, WorkerConfig

SETUP_TIMEOUT_S = 600.0
KV_GROUP = "kv"


def _rendezvous() -> tuple[str, int]:
    """This node's address and a free port on it, for the world's TCP store (rank 0 hosts it)."""
    port = free_port()
    import ray

    address = (str(ray.util.get_node_ip_address())  # type: ignore[no-untyped-call]
               if ray.is_initialized() else "127.0.0.1")
    return address, port


class _Actor(InstanceWorker):
    """The actor class: the worker plus the rendezvous query rank 0 answers."""

    def rendezvous(self, local: bool) -> tuple[str, int]:
        address, port = _rendezvous()
        return ("127.0.0.1" if local else address), port

    def node_id(self) -> str:
        """The Ray node this actor runs on."""
        import ray

        return str(ray.get_runtime_context().get_node_id())


def _round_robin(ray: Any, gpus: float) -> Any:
    """rank -> a scheduling strategy putting it on the alive nodes in turn (those with the
    GPUs it needs). Ray's own SPREAD is best effort: measured, it put all three actors of a
    two-node test cluster on one node. Soft affinity is best effort too (measured: under load
    it fell back to the head for every rank), so the affinity is strict; the nodes were alive
    a moment ago, and a node lost meanwhile fails the setup's timeout with a clear error."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = sorted(n["NodeID"] for n in ray.nodes()
                   if n["Alive"] and n.get("Resources", {}).get("GPU", 0.0) >= gpus)
    if not nodes:
        raise ValueError(f"no alive Ray node has {gpus:g} GPU(s) for an instance")
    return lambda rank: NodeAffinitySchedulingStrategy(nodes[rank % len(nodes)], soft=False)


@dataclass
class WorkerPool:
    prefill: list[Any]
    decode: list[Any]
    prefill_kv_tokens: int
    decode_kv_tokens: int
    groups: set[tuple[int, ...]] = field(default_factory=set)
    # What it takes to make an actor again (`replace`): its class and each rank's config.
    remote: Any = None
    configs: list[WorkerConfig] = field(default_factory=list)
    local: bool = True
    # False from an instance's loss until every rank joined a new world (`reform`): groups
    # that exist still work, new ones cannot be made (the lost rank cannot take part).
    world_intact: bool = True
    # Node of each rank (0, 1, ... in order of first appearance), read from Ray at start.
    nodes: tuple[int, ...] = ()
    elastic: bool = False  # `decode` is `prefill`: each actor serves both roles

    @property
    def num_prefill(self) -> int:
        return len(self.prefill)

    def actor(self, rank: int) -> Any:
        """The actor of world rank `rank` (elastic: of either role's rank)."""
        p = self.num_prefill
        if self.elastic:
            return self.prefill[rank % p]
        return self.prefill[rank] if rank < p else self.decode[rank - p]

    @property
    def all(self) -> list[Any]:
        """Every actor once, in world rank order."""
        return list(self.prefill) if self.elastic else [*self.prefill, *self.decode]

    @classmethod
    def start(cls, ray: Any, model_dir: Path, prefill_instances: int, decode_instances: int,
              *, prefill_kv_tokens: int, decode_kv_tokens: int, device: str = "cpu",
              dtype: str = "float32", threads: int = 1, local: bool = True,
              gpus_per_instance: float = 1.0,
              collective_timeout_s: float = 600.0, spread: bool = False,
              elastic: bool = False) -> WorkerPool:
        """Create and set up every actor (model loaded, world joined); `local`: the cluster is
        this machine, so the data plane stays on loopback. `gpus_per_instance` < 1 packs
        several instances on one GPU (tests, small models). `spread`: rank r on the r-th alive
        Ray node in turn, instead of Ray's default packing. `elastic`: one actor per GPU for
        both roles (as many prefill as decode instances, one KV cache size)."""
        if prefill_instances < 1 or decode_instances < 1:
            raise ValueError("a serving cluster needs at least one prefill and one decode "
                             "instance")
        if elastic and (prefill_instances != decode_instances or
                        prefill_kv_tokens != decode_kv_tokens):
            raise ValueError("elastic roles need as many prefill as decode instances and one "
                             f"KV cache size, got {prefill_instances} + {decode_instances} "
                             f"instances, {prefill_kv_tokens} and {decode_kv_tokens} tokens")
        gpu = device.startswith("cuda")
        # One thread for the kv group: streamed transfers keep the engine's order among
        # themselves, which is what keeps their blocking sends and receives deadlock-free.
        options: dict[str, Any] = {"num_cpus": 0, "concurrency_groups": {KV_GROUP: 1}}
        if gpu:
            options["num_gpus"] = gpus_per_instance
        remote = ray.remote(**options)(_Actor)
        world = prefill_instances if elastic else prefill_instances + decode_instances
        # Rank 0's address and port are only known once it is placed.
        configs = [WorkerConfig(rank=r, world_size=world, model_dir=model_dir,
                                kv_tokens=prefill_kv_tokens if r < prefill_instances
                                else decode_kv_tokens,
                                threads=threads, device="cuda" if gpu else device,
                                dtype=dtype, collective_timeout_s=collective_timeout_s)
                   for r in range(world)]
        place = _round_robin(ray, gpus_per_instance if gpu else 0.0) if spread else None

        def create(config: WorkerConfig) -> Any:
            if place is None:
                return remote.remote(config)
            return remote.options(scheduling_strategy=place(config.rank)).remote(config)

        first = create(configs[0])
        address, port = ray.get(first.rendezvous.remote(local), timeout=SETUP_TIMEOUT_S)
        actors = [first] + [create(c) for c in configs[1:]]
        prefill = actors[:prefill_instances]
        pool = cls(prefill, prefill if elastic else actors[prefill_instances:],
                   prefill_kv_tokens, decode_kv_tokens, remote=remote, configs=configs,
                   local=local, elastic=elastic)
        try:
            # Every model loaded first: joining waits at most the collective timeout for the
            # slowest rank, and loads on a busy host take longer than that.
            ray.get([a.load.remote() for a in actors], timeout=SETUP_TIMEOUT_S)
            ray.get(pool.reform(address, port), timeout=SETUP_TIMEOUT_S)
            ids = ray.get([a.node_id.remote() for a in actors], timeout=SETUP_TIMEOUT_S)
        except BaseException:
            pool.shutdown(ray)
            raise
        order = {node: k for k, node in enumerate(dict.fromkeys(ids))}
        pool.nodes = tuple(order[node] for node in ids)
        return pool

    def can_group(self, ranks: tuple[int, ...]) -> bool:
        """Whether work on `ranks` together may be sent now."""
        return len(ranks) == 1 or self.world_intact or ranks in self.groups

    def lost(self) -> None:
        self.world_intact = False

    def replace(self, ray: Any, rank: int) -> Any:
        """A new actor for `rank` (the old one is dead); returns the ref of its model load
        (it joins the world at the next `reform`)."""
        ray.kill(self.actor(rank), no_restart=True)
        if self.elastic:
            rank %= self.num_prefill
        actor = self.remote.remote(self.configs[rank])
        if rank < self.num_prefill:
            self.prefill[rank] = actor  # elastic: `decode` is this very list
        else:
            self.decode[rank - self.num_prefill] = actor
        return actor.load.remote()

    def reform(self, address: str, port: int) -> list[Any]:
        """Every rank joins a new world at rank 0's `address:port` (refs to await; only while
        no call is in flight on any rank); process groups are made anew on use."""
        self.groups.clear()
        return [a.join_world.remote(address, port) for a in self.all]

    def ensure_group(self, ranks: tuple[int, ...]) -> None:
        """Make the process group of `ranks` exist before any call that uses it is sent."""
        if len(ranks) > 1 and ranks not in self.groups:
            self.groups.add(ranks)
            for actor in self.all:
                actor.create_group.remote(ranks)

    def shutdown(self, ray: Any) -> None:
        for actor in self.all:
            ray.kill(actor, no_restart=True)
