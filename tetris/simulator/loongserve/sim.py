"""LoongServe (SOSP'24, elastic sequence parallelism) as a policy of our discrete-event simulator.

A faithful re-implementation of the global manager of github.com/LoongServe/LoongServe
(`loongserve/longserve_server/router/manager.py` `RouterManager`, `router/req_queue.py`
`ReqQueue`, `longserve_c_scheduler/src/main.cpp`), written from their code and paper — see
docs/baselines-loongserve.md for the mapping, the simplifications and the default knobs.

N unified instances each prefill and decode. The manager loop (`router.py`, their `_step`):
- Every `max_wait_tokens` decode iterations (or when idle) it admits waiting requests
  (`admission.py`, their `generate_new_req_list`: FCFS with bounded out-of-order admission, a
  KV reservation test, and two cost/benefit rules deciding whether a prefill may take instances
  that hold decode batches). Admitted requests start a *macro-iteration* (`macro.py`, their
  `_schedule_new_req_list_with_decoding`): optionally compact decode KV onto fewer instances
  (`compaction.py`, paid migration), pick the decode batches whose instances the prefill takes
  (those batches stall for the whole macro-iteration), batch the prompts and size each batch's
  ESP group by their DP (`prefill.py`, `prefill_plan.py`), and run the prefill batches while the
  untouched decode batches keep decoding. Instances that free up meanwhile take more prefill
  greedily if it fits in the macro-iteration's predicted length.
- Otherwise all decode batches run one iteration in lock-step (`decode.py`, their
  `_schedule_decode_batch_list`): batches short of KV slots merge with batches that have spare
  slots or scale up onto idle instances; a batch spread over several instances decodes with
  several masters (multi-master decoding); new KV goes to the fullest instance with room.

The run's state lives in one `LoongServeState` (`state.py`); each component gets it, and the
components it calls, in its constructor — `simulate_loongserve` wires them.
"""

from __future__ import annotations

from collections.abc import Sequence

from tetris.simulator.loongserve.admission import Admission
from tetris.simulator.loongserve.compaction import Compaction
from tetris.simulator.loongserve.decode import DecodePlanner
from tetris.simulator.loongserve.kv_ledger import KvLedger
from tetris.simulator.loongserve.macro import MacroIteration
from tetris.simulator.loongserve.options import LoongServeOptions
from tetris.simulator.loongserve.prefill import PrefillRunner
from tetris.simulator.loongserve.router import Router
from tetris.simulator.loongserve.state import LoongServeState
from tetris.simulator.records import SimOutcome, SimRequest
from tetris.solver.cost_model import CostModel


def simulate_loongserve(requests: Sequence[SimRequest], cost_model: CostModel, *, seed: int = 0,
                        noise_cv: float = 0.0,
                        options: LoongServeOptions | None = None) -> SimOutcome:
    """Replay `requests` under LoongServe's scheduling on the unified instances of
    `cost_model.cluster` (its prefill_instances; decode_instances is ignored)."""
    if not requests:
        return SimOutcome("loongserve", [], {"events": 0, "wall_s": 0.0})
    state = LoongServeState(requests, cost_model, seed, noise_cv, options or LoongServeOptions())
    ledger = KvLedger(state)
    decode = DecodePlanner(state, ledger)
    admission = Admission(state)
    macro = MacroIteration(state, ledger, decode, admission, Compaction(state, ledger),
                           PrefillRunner(state, ledger))
    return Router(state, ledger, decode, admission, macro).run()
