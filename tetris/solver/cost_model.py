"""Analytical cost model: chunk prefill time, decode step time, KV transfer time.

Chunk of c tokens after a prefix of p tokens on an SP group of s instances over link x (NVLink
inside a node, the network once the group spans nodes):

    T(c, p, s) = fixed + lin·c/s + R

    ring overlap (`ring_overlap`, ring attention as published: each step's KV transfer runs
    while that step's attention computes):
        R = a + (s−1)·max(a, t),    a = attn·pairs/s²,    t = comm[x]·(p + c)/s + step[x]
    no overlap (gather, then attend: what the CPU runtime does):
        R = attn·pairs/s + (s−1)·t

- pairs = c·p + c(c+1)/2 causal (query, key) pairs: the chunk's queries see the whole prefix and
  a causal triangle of the chunk; load-balanced splitting gives each rank pairs/s of them, done
  in s ring steps of a = pairs/s² each (the first on its own KV, with no transfer before it).
- t: one ring step moves one rank's share of the request's KV, (p + c)/s tokens of
  kv_bytes_per_token, over the group's slowest hop (comm[x] = kv_bytes_per_token / bandwidth[x]),
  plus one link latency per layer (step[x] = layers × latency[x]). The model assumes the KV is
  spread evenly over the group. Per layer the ring is a/L + (s−1)·max(a/L, t/L): summed over
  the L layers that is the formula above.
- R = max(s·a, a + (s−1)·t): a long chunk is compute-bound (its transfer hides), a short one
  or one crossing the slow network is transfer-bound. So T is the larger of two quadratics in c,
  which `max_tokens_within` inverts exactly.
- fixed = launch overhead + one read of the weights from HBM. Because it does not shrink with
  the tokens per GPU, the effective efficiency lin·n / (fixed + lin·n) falls for small n = c/s:
  small chunks and wide groups are memory-bound (the roofline's flat part).
- lin = 2·linear_params / (peak·η_gemm): the dense layers, split evenly over the group.
- attn = 4·layers·heads·head_dim / (peak·η_attn) per causal pair: QKᵀ and PV.

Decode step for a batch of b sequences holding K KV tokens in total (memory-bound):
    D(b, K) = fixed_decode + kv_read·K + lin·b
KV transfer of n tokens over one link: n·kv_bytes_per_token / bandwidth[x] + latency[x].

The efficiency factors below are typical figures for bf16 prefill on Hopper/Ampere (large-GEMM
MFU ≈ 0.6, FlashAttention-2/3 forward ≈ 0.5 of peak, ≈ 0.8 of HBM bandwidth reached by decode);
they are defaults to be replaced by `calibration.fit_coefficients` on measured rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field

from tetris.solver.cluster import ClusterSpec
from tetris.solver.hardware import HardwareSpec
from tetris.solver.model_spec import ModelSpec

DEFAULT_OVERHEAD_S = 2e-3
DEFAULT_ETA_GEMM = 0.6
DEFAULT_ETA_ATTN = 0.5
DEFAULT_ETA_MEM = 0.8
DEFAULT_MEM_UTIL = 0.9
UNBOUNDED_TOKENS = 1 << 40


class CostCoefficients(BaseModel):
    """The linear coefficients of T(c, p, s); all in seconds per unit of their feature."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    fixed_s: float = Field(ge=0)
    step_intra_s: float = Field(ge=0)
    step_inter_s: float = Field(ge=0)
    lin_s_per_token: float = Field(ge=0)
    attn_s_per_pair: float = Field(ge=0)
    comm_intra_s_per_token: float = Field(ge=0)
    comm_inter_s_per_token: float = Field(ge=0)
    decode_fixed_s: float = Field(ge=0)
    decode_kv_s_per_token: float = Field(ge=0)
    ring_overlap: bool = Field(default=True, description="each ring step's KV transfer "
                               "overlaps its attention (ring attention); False: added to it")

    @classmethod
    def from_specs(
        cls,
        model: ModelSpec,
        hardware: HardwareSpec,
        *,
        overhead_s: float = DEFAULT_OVERHEAD_S,
        eta_gemm: float = DEFAULT_ETA_GEMM,
        eta_attn: float = DEFAULT_ETA_ATTN,
        eta_mem: float = DEFAULT_ETA_MEM,
        ring_overlap: bool = True,
    ) -> CostCoefficients:
        kv = model.kv_bytes_per_token
        layers = model.num_layers
        return cls(
            fixed_s=overhead_s + model.weight_bytes / hardware.hbm_bandwidth,
            step_intra_s=layers * hardware.intra_node_latency_s,
            step_inter_s=layers * hardware.inter_node_latency_s,
            lin_s_per_token=2 * model.linear_params / (hardware.peak_flops * eta_gemm),
            attn_s_per_pair=4 * layers * model.num_heads * model.head_dim
            / (hardware.peak_flops * eta_attn),
            comm_intra_s_per_token=kv / hardware.intra_node_bandwidth,
            comm_inter_s_per_token=kv / hardware.inter_node_bandwidth,
            decode_fixed_s=overhead_s + model.weight_bytes / (hardware.hbm_bandwidth * eta_mem),
            decode_kv_s_per_token=kv / (hardware.hbm_bandwidth * eta_mem),
            ring_overlap=ring_overlap,
        )


class CostModel:
    """T(c, p, s) and friends for one (model, hardware, cluster). Plain floats: hot loops."""

    __slots__ = (
        "_attn", "_comm", "_fixed", "_lin", "_overlap", "_step", "cluster", "coefficients",
        "hardware", "kv_capacity_tokens", "model",
    )

    def __init__(
        self,
        model: ModelSpec,
        hardware: HardwareSpec,
        cluster: ClusterSpec,
        coefficients: CostCoefficients | None = None,
        mem_util: float = DEFAULT_MEM_UTIL,
    ) -> None:
        self.model = model
        self.hardware = hardware
        self.cluster = cluster
        if coefficients is None:
            coefficients = CostCoefficients.from_specs(model, hardware)
        self.coefficients = coefficients
        co = self.coefficients
        self._fixed = co.fixed_s
        self._step = (co.step_intra_s, co.step_inter_s)
        self._lin = co.lin_s_per_token
        self._attn = co.attn_s_per_pair
        self._comm = (co.comm_intra_s_per_token, co.comm_inter_s_per_token)
        self._overlap = co.ring_overlap
        free = hardware.hbm_bytes * mem_util - model.weight_bytes
        if free < model.kv_bytes_per_token:
            raise ValueError(
                f"the weights of {model.name} ({model.weight_bytes / 1e9:.1f} GB) leave no room "
                f"for KV in {mem_util:.0%} of one {hardware.name} "
                f"({hardware.hbm_bytes / 1e9:.1f} GB)"
            )
        # Per instance, for one request's KV (planners keep each request within it).
        self.kv_capacity_tokens = int(free // model.kv_bytes_per_token)

    # -- prefill -----------------------------------------------------------------------------
    def chunk_seconds(self, tokens: int, prefix: int, sp: int, cross_node: bool = False) -> float:
        """T(c, p, s): seconds to prefill `tokens` after `prefix` on `sp` instances."""
        pairs = tokens * prefix + tokens * (tokens + 1) / 2
        return self.batch_seconds(tokens, pairs, prefix + tokens, sp, cross_node)

    def batch_seconds(self, tokens: int, pairs: float, kv_tokens: int, sp: int,
                      cross_node: bool = False) -> float:
        """T of a prefill iteration of `tokens` query tokens with `pairs` causal (query, key)
        pairs over `kv_tokens` KV tokens on `sp` instances (one chunk, or a batch of them)."""
        attn = self._attn * pairs / sp
        if sp == 1:
            return self._fixed + self._lin * tokens + attn
        x = 1 if cross_node else 0
        t = self._comm[x] * kv_tokens / sp + self._step[x]
        if self._overlap:
            a = attn / sp
            ring = a + (sp - 1) * (a if a > t else t)
        else:
            ring = attn + (sp - 1) * t
        return self._fixed + self._lin * tokens / sp + ring

    def chunk_seconds_on(self, tokens: int, prefix: int, instances: Sequence[int]) -> float:
        """T for a concrete instance group (the link follows from whether it spans nodes)."""
        return self.chunk_seconds(
            tokens, prefix, len(instances), self.cluster.spans_nodes(instances)
        )

    def max_tokens_within(
        self, budget_s: float, prefix: int, sp: int, cross_node: bool = False
    ) -> int:
        """Largest c with T(c, prefix, sp) ≤ budget_s (0 if even one token does not fit).

        T is a quadratic a·c² + b·c + k in c with a, b ≥ 0 — or, with ring overlap, the larger
        of two such quadratics (compute-bound, transfer-bound), so c is the smaller root."""
        rest = budget_s - self._fixed
        if rest <= 0:
            return 0
        if not math.isfinite(rest):
            return UNBOUNDED_TOKENS
        attn, lin = self._attn, self._lin
        quadratics: list[tuple[float, float, float]]  # (a, b, k) of a·c² + b·c + k ≤ rest
        if sp == 1:
            quadratics = [(attn / 2, lin + attn * (prefix + 0.5), 0.0)]
        else:
            x = 1 if cross_node else 0
            comm, steps = self._comm[x], sp - 1
            k_ring = steps * (comm * prefix / sp + self._step[x])
            b_ring = steps * comm / sp
            compute = (attn / (2 * sp), (lin + attn * (prefix + 0.5)) / sp, 0.0)
            transfer = (attn / (2 * sp * sp), lin / sp + attn * (prefix + 0.5) / (sp * sp)
                        + b_ring, k_ring)
            additive = (compute[0], compute[1] + b_ring, k_ring)
            quadratics = [compute, transfer] if self._overlap else [additive]
        c = min(_root(a, b, rest - k) for a, b, k in quadratics)
        if c >= UNBOUNDED_TOKENS:
            return UNBOUNDED_TOKENS
        n = max(0, int(c))
        # The float root can be off by one either way; T is exact at integers, so settle there.
        if n > 0 and self.chunk_seconds(n, prefix, sp, cross_node) > budget_s:
            n -= 1
            while n > 0 and self.chunk_seconds(n, prefix, sp, cross_node) > budget_s:
                n -= 1
            return n
        while self.chunk_seconds(n + 1, prefix, sp, cross_node) <= budget_s:
            n += 1
        return n

    def best_isolated_ttft(self, prompt_tokens: int) -> float:
        """Best single-chunk prefill time with the whole prefill cluster free (SLO reference).

        SP sizes whose KV share would not fit in an instance's memory are skipped; if none fits,
        memory is ignored rather than returning inf (the planners then report infeasible)."""
        per_node = self.cluster.max_prefill_per_node
        times = [
            (-(-prompt_tokens // sp) > self.kv_capacity_tokens,
             self.chunk_seconds(prompt_tokens, 0, sp, sp > per_node))
            for sp in range(1, self.cluster.prefill_instances + 1)
        ]
        fitting = [t for too_big, t in times if not too_big]
        return min(fitting) if fitting else min(t for _, t in times)

    # -- decode and transfer -----------------------------------------------------------------
    def decode_step_seconds(self, batch_size: int, kv_tokens: int) -> float:
        co = self.coefficients
        if batch_size <= 0:
            return 0.0
        return co.decode_fixed_s + co.decode_kv_s_per_token * kv_tokens + self._lin * batch_size

    def kv_transfer_seconds(self, tokens: int, cross_node: bool = True) -> float:
        hw = self.hardware
        bw = hw.inter_node_bandwidth if cross_node else hw.intra_node_bandwidth
        latency = hw.inter_node_latency_s if cross_node else hw.intra_node_latency_s
        return latency + tokens * self.model.kv_bytes_per_token / bw


def _root(a: float, b: float, rest: float) -> float:
    """Largest c ≥ 0 with a·c² + b·c ≤ rest (a, b ≥ 0): inf when nothing grows with c."""
    if rest <= 0:
        return 0.0
    if a == 0 and b == 0:
        return math.inf
    return rest / b if a == 0 else (-b + math.sqrt(b * b + 4 * a * rest)) / (2 * a)
