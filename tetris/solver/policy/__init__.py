"""What both executors run: the policies, refinement, decode dispatch and the ledger.

Pure Python like the rest of `tetris.solver`. The simulator and the Ray runtime build their
policy with `registry.make_policy(name, settings, cost_model)` from one `settings.PolicySettings`,
report executor events to a `ledger.Ledger`, and ask it for the planner's view:

- `view`: `PrefillView` (what a policy sees), `Launch`, `Decision`, `SolverClock`, `LoadTracker`.
- `cdsp`: Tetris's `CdspPolicy` (planners of `tetris.solver`, receding horizon, time slicing).
- `baselines`: the disaggregated baselines' prefill policies (static SP, DistServe).
- `refinement`, `refinement_runs`: CP-SAT refinement in the background, inline (simulator) or
  on a thread (runtime).
- `dispatch`: the decode dispatcher (`choose_decode_instances`) and its FIFO `DecodeQueue`.
- `ledger`: instance state, KV held per request and instance, the planner's view.
- `settings`, `registry`.
"""
