"""LoongServe-style elastic SP on unified instances (see docs/baselines-loongserve.md)."""

from tetris.simulator.loongserve.options import LoongServeOptions
from tetris.simulator.loongserve.sim import simulate_loongserve

__all__ = ["LoongServeOptions", "simulate_loongserve"]
