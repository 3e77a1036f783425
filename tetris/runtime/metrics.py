"""Prometheus metrics of one serving engine, on their own registry (never the global one).

The engine reports; `GET /metrics` renders. Names follow vLLM's (`vllm:` becomes `tetris:`), so
existing dashboards carry over.
"""

from __future__ import annotations

import math

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

# One set of bounds for every latency: 1-2.5-5 steps from 0.1 ms to 1000 s, so a GPU's
# millisecond inter-token gaps and a CPU's minutes-long 128k-token prefills both resolve.
LATENCY_BUCKETS_S: tuple[float, ...] = (
    *(round(m * 10.0**e, 6) for e in range(-4, 3) for m in (1.0, 2.5, 5.0)), 1000.0
)


class ServingMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)

        def histogram(name: str, doc: str) -> Histogram:
            return Histogram(name, doc, buckets=LATENCY_BUCKETS_S, registry=self.registry)

        self._ttft = histogram("tetris:time_to_first_token_seconds",
                               "Time from arrival to the first generated token.")
        self._itl = histogram("tetris:inter_token_latency_seconds",
                              "Time between consecutive generated tokens of a request.")
        self._e2e = histogram("tetris:e2e_request_latency_seconds",
                              "Time from arrival to the last token.")
        self._queue = histogram("tetris:request_queue_time_seconds",
                                "Time from arrival until the request's prefill starts.")
        self._solver = histogram("tetris:solver_latency_seconds",
                                 "Wall time of one planner (solver) run.")
        self._handoff = histogram("tetris:kv_handoff_seconds",
                                  "Time from a request's last prefill chunk's end until all of "
                                  "its KV is on its decode instances (streamed or moved).")
        self._running = Gauge("tetris:num_requests_running", "Requests in prefill or decode.",
                              registry=self.registry)
        self._waiting = Gauge("tetris:num_requests_waiting", "Requests waiting to be planned.",
                              registry=self.registry)
        self._busy = Gauge("tetris:instance_busy_fraction",
                           "Fraction of recent time an instance spent executing work.",
                           ["instance", "role"], registry=self.registry)
        self._chunks = Counter("tetris:prefill_chunks_total",
                               "Prefill chunks executed, by sequence-parallel size.",
                               ["sp"], registry=self.registry)
        self._prompt = Counter("tetris:prompt_tokens_total", "Prompt tokens prefilled.",
                               registry=self.registry)
        self._generated = Counter("tetris:generation_tokens_total", "Tokens generated.",
                                  registry=self.registry)
        self._finished = Counter("tetris:request_success_total",
                                 "Requests finished, by finish reason.",
                                 ["finished_reason"], registry=self.registry)
        self._lost = Counter("tetris:instance_failures_total",
                             "Instances lost (actor died, call failed, collective timed out).",
                             ["role"], registry=self.registry)
        self._recovered = Counter("tetris:requests_recovered_total",
                                  "Requests that lost KV to an instance failure and were "
                                  "redone on the survivors.", registry=self.registry)
        self._role_changes = Counter("tetris:role_changes_total",
                                     "GPUs that changed role (elastic roles), by new role.",
                                     ["role"], registry=self.registry)
        self._migrations = Counter("tetris:kv_migrations_total",
                                   "Decoding requests whose KV moved off a decode instance "
                                   "turning to prefill.", registry=self.registry)
        self._roles = Gauge("tetris:gpus_by_role", "GPUs serving each role (elastic roles; "
                            "to_prefill: draining its decode requests).", ["role"],
                            registry=self.registry)
        self._live = Gauge("tetris:instances_live", "Instances serving, by role.", ["role"],
                           registry=self.registry)
        # The HTTP layer's own view: what clients were answered, and why they were refused.
        self._responses = Counter("tetris:http_responses_total",
                                  "HTTP responses sent, by status code.", ["code"],
                                  registry=self.registry)
        self._rejected = Counter("tetris:request_rejected_total",
                                 "Requests refused with a 4xx or 5xx error, by reason (the "
                                 "error's code, else its type).", ["reason"],
                                 registry=self.registry)

    def instance_lost(self, role: str) -> None:
        self._lost.labels(role=role).inc()

    def request_recovered(self) -> None:
        self._recovered.inc()

    def role_changed(self, role: str) -> None:
        self._role_changes.labels(role=role).inc()

    def count_kv_migration(self) -> None:
        self._migrations.inc()

    def set_roles(self, prefill: int, decode: int, to_prefill: int) -> None:
        for role, n in (("prefill", prefill), ("decode", decode), ("to_prefill", to_prefill)):
            self._roles.labels(role=role).set(n)

    def set_instances_live(self, role: str, live: int) -> None:
        self._live.labels(role=role).set(live)

    def http_response(self, status: int) -> None:
        self._responses.labels(code=str(status)).inc()

    def request_rejected(self, reason: str) -> None:
        self._rejected.labels(reason=reason).inc()

    def observe_ttft(self, seconds: float) -> None:
        self._ttft.observe(_duration(seconds))

    def observe_inter_token(self, seconds: float) -> None:
        self._itl.observe(_duration(seconds))

    def observe_e2e(self, seconds: float) -> None:
        self._e2e.observe(_duration(seconds))

    def observe_queue_time(self, seconds: float) -> None:
        self._queue.observe(_duration(seconds))

    def observe_solver(self, seconds: float) -> None:
        self._solver.observe(_duration(seconds))

    def observe_kv_handoff(self, seconds: float) -> None:
        self._handoff.observe(_duration(seconds))

    def set_requests(self, running: int, waiting: int) -> None:
        if running < 0 or waiting < 0:
            raise ValueError(f"request counts must be >= 0, got {running=} {waiting=}")
        self._running.set(running)
        self._waiting.set(waiting)

    def set_instance_busy(self, instance: str, role: str, fraction: float) -> None:
        if math.isnan(fraction):
            raise ValueError(f"busy fraction of {role} instance {instance} is NaN")
        # Measured over a window, so rounding may step just outside [0, 1].
        self._busy.labels(instance=instance, role=role).set(min(max(fraction, 0.0), 1.0))

    def count_chunk(self, sp: int) -> None:
        if sp < 1:
            raise ValueError(f"a chunk runs on >= 1 instance, got sp={sp}")
        self._chunks.labels(sp=str(sp)).inc()

    def count_tokens(self, prompt: int, generation: int) -> None:
        if prompt < 0 or generation < 0:
            raise ValueError(f"token counts must be >= 0, got {prompt=} {generation=}")
        self._prompt.inc(prompt)
        self._generated.inc(generation)

    def request_finished(self, finish_reason: str) -> None:
        self._finished.labels(finished_reason=finish_reason).inc()

    def render(self) -> tuple[bytes, str]:
        """Body and content type in text format 0.0.4, which every scraper reads."""
        return generate_latest(self.registry), CONTENT_TYPE_PLAIN_0_0_4


def _duration(seconds: float) -> float:
    # A negative or NaN duration is an engine clock bug; a histogram would hide it in a bucket.
    if not seconds >= 0:
        raise ValueError(f"a duration must be >= 0 seconds, got {seconds}")
    return seconds
