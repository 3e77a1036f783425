"""The simulated executor: a discrete-event replay of a cluster on the cost model's clock.

- `disaggregated`: prefill and decode pools (Tetris, DistServe, static SP) driven by the policies
  of `tetris.solver.policy`, through the same ledger the Ray runtime uses.
- `decode_pool`: the simulated decode instances (dispatch, KV hand-off, continuous batching).
- `failures`: instance failure schedules (fixed or MTBF/MTTR) and how a disaggregated run lives
  through them (aborted work, requests redone through the ledger, instances rejoining).
- `loongserve`: LoongServe's unified elastic-SP instances (its own scheduler, re-implemented).
- `events`, `noise`, `records`: the event queue, duration noise, and what every run records.
"""
