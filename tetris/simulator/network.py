"""The cluster's links as the simulator sees them: KV transfers that share bandwidth.

Every GPU has four one-way links: NVLink out and in (`intra_node_bandwidth` each way), and its
NIC's out and in (`inter_node_bandwidth`; GPUs share a NIC when the node has fewer NICs than
GPUs, `HardwareSpec.nics_per_node`). A transfer from instance i to instance j uses (NVLink out of
i, NVLink in of j) inside a node; across nodes (NIC out of i, NIC in of j), or with
`multirail_receive` (NIC out of i, the way in of j's node — all its NICs together — and NVLink
in of j). So the ranks of a prefill group send over their own links in parallel, and transfers
into one node or one GPU share its way in.

Concurrent transfers share each link equally and a transfer runs at its smallest share along its
path; shares are recomputed for the transfers of a link whenever one starts or ends there (with
two links per path and equal shares this is what max-min fair sharing gives whenever a link's
transfers are all limited by it — the common case of many ranks sending into one decode GPU). A
transfer is done `latency` after its last byte leaves (it still counts on its links during that
latency: microseconds). Its completion event carries a version, so a transfer rescheduled by a
rate change ignores its stale completion.

Instances are numbered as in `ClusterSpec`: prefill 0..P−1, then decode P..P+D−1; the links are
their GPUs' (an elastic cluster's instances i and P+i share GPU i's).
"""

from __future__ import annotations

from dataclasses import dataclass

from tetris.simulator.events import PRIORITY_COMPLETE, EventQueue
from tetris.solver.cluster import ClusterSpec
from tetris.solver.hardware import HardwareSpec

KV_SENT = "kv_sent"


@dataclass(slots=True, eq=False)  # identity: each transfer is its own entry on its links
class Transfer:
    links: tuple[int, ...]
    remaining: float  # bytes not yet sent at `updated_s`
    rate: float  # bytes/s since `updated_s`
    updated_s: float
    latency_s: float
    payload: object
    version: int = 0
    done: bool = False


class Network:
    """The links of one cluster. Completion events (`KV_SENT`, payload (transfer, version))
    go on the simulator's queue; `handle` turns a current one into the transfer's payload."""

    def __init__(self, cluster: ClusterSpec, hardware: HardwareSpec, events: EventQueue) -> None:
        self.events = events
        n = cluster.total_gpus
        per_node = cluster.gpus_per_node
        nics = hardware.nics_per_node or per_node
        instances = cluster.num_instances
        self._gpu = [cluster.gpu_of(i) for i in range(instances)]
        self._node = [cluster.node_of(i) for i in range(instances)]
        # Links: 0..n−1 NVLink out, n..2n−1 NVLink in, then NIC out / in per (node, nic), then
        # each node's way in over all its NICs.
        nic_index: dict[tuple[int, int], int] = {}
        self._nic = []
        for i in range(instances):
            key = (self._node[i], min(nics - 1, cluster.local_rank(i) * nics // per_node))
            self._nic.append(nic_index.setdefault(key, len(nic_index)))
        num_nics = len(nic_index)
        num_nodes = max(self._node) + 1
        self._nic_out = 2 * n
        self._nic_in = 2 * n + num_nics
        self._node_in = 2 * n + 2 * num_nics
        self._multirail = hardware.multirail_receive
        node_nics = [0] * num_nodes
        for node, _ in nic_index:
            node_nics[node] += 1
        self.bandwidth = [hardware.intra_node_bandwidth] * (2 * n) + \
            [hardware.inter_node_bandwidth] * (2 * num_nics) + \
            [hardware.inter_node_bandwidth * k for k in node_nics]
        self._latency = (hardware.intra_node_latency_s, hardware.inter_node_latency_s)
        self._on_link: list[set[Transfer]] = [set() for _ in self.bandwidth]
        self._n = n
        self.transfers = 0
        self.bytes = 0.0

    def path(self, src: int, dst: int) -> tuple[tuple[int, ...], bool]:
        """The links from instance `src` to `dst`, and whether it crosses nodes."""
        if self._node[src] == self._node[dst]:
            return (self._gpu[src], self._n + self._gpu[dst]), False
        if self._multirail:
            return (self._nic_out + self._nic[src], self._node_in + self._node[dst],
                    self._n + self._gpu[dst]), True
        return (self._nic_out + self._nic[src], self._nic_in + self._nic[dst]), True

    def seconds_alone(self, src: int, dst: int, nbytes: float) -> float:
        """How long the transfer takes with nothing else on its links."""
        links, cross = self.path(src, dst)
        return self._latency[cross] + nbytes / min(self.bandwidth[k] for k in links)

    def start(self, src: int, dst: int, nbytes: float, now: float,
              payload: object) -> Transfer:
        if self._gpu[src] == self._gpu[dst]:
            # An elastic GPU's own prefill KV, kept where it is for its decode role.
            t = Transfer((), 0.0, 0.0, now, 0.0, payload)
            self.events.push(now, PRIORITY_COMPLETE, KV_SENT, (t, t.version))
            return t
        links, cross = self.path(src, dst)
        t = Transfer(links, float(nbytes), 0.0, now, self._latency[cross], payload)
        self.transfers += 1
        self.bytes += nbytes
        for k in links:
            self._on_link[k].add(t)
        self._reshare(links, now)
        return t

    def cancel(self, transfer: Transfer, now: float) -> None:
        """Stop a transfer (its completion never fires); the others on its links speed up."""
        if transfer.done:
            return
        self._finish(transfer, now)

    def handle(self, payload: tuple[Transfer, int], now: float) -> object | None:
        """A completion event: the transfer's payload if it is current, else None."""
        transfer, version = payload
        if transfer.done or version != transfer.version:
            return None
        self._finish(transfer, now)
        return transfer.payload

    def active(self) -> int:
        return len({t for link in self._on_link for t in link})

    def _finish(self, transfer: Transfer, now: float) -> None:
        transfer.done = True
        transfer.version += 1
        for k in transfer.links:
            self._on_link[k].discard(transfer)
        self._reshare(transfer.links, now)

    def _reshare(self, links: tuple[int, ...], now: float) -> None:
        """New shares for every transfer on `links`, and their completions rescheduled."""
        touched = set().union(*(self._on_link[k] for k in links))
        bandwidth, on_link = self.bandwidth, self._on_link
        push = self.events.push
        for t in touched:
            rate = min(bandwidth[k] / len(on_link[k]) for k in t.links)
            if rate == t.rate:
                continue
            left = t.remaining - t.rate * (now - t.updated_s)
            if t.rate > 0 and left <= 1e-9 * t.remaining:
                continue  # its last byte is out: only the latency is left, already scheduled
            t.remaining = max(0.0, left)
            t.updated_s = now
            t.rate = rate
            t.version += 1
            push(now + t.remaining / rate + t.latency_s, PRIORITY_COMPLETE, KV_SENT,
                 (t, t.version))
