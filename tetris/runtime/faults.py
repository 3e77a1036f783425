"""Fault injection on one instance, for the recovery tests and for operators rehearsing them.

A fault is armed on a worker (`InstanceWorker.arm_fault`) and fires inside the next prefill
chunk or decode step, at a given layer's attention: the process exits at once (as a kill or an
out-of-memory kill would end it) or the call raises while its peers are inside the same
collectives. Firing mid-chunk, not before it, is the point: it leaves peers waiting in a
collective and KV half-written, the states recovery must handle.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import torch

from tetris.models.llama import Attend

FaultAction = Literal["exit", "raise"]
FaultPoint = Literal["prefill", "decode"]


class InjectedFault(RuntimeError):
    """Raised by an armed "raise" fault."""


@dataclass(frozen=True)
class Fault:
    point: FaultPoint
    action: FaultAction
    layer: int = 0

    def __post_init__(self) -> None:
        if self.point not in ("prefill", "decode") or self.action not in ("exit", "raise"):
            raise ValueError(f"unknown fault {self.point}/{self.action}")
        if self.layer < 0:
            raise ValueError(f"fault layer must be >= 0, got {self.layer}")


@dataclass
class FaultyAttend:
    """`inner`, except that `fault` fires when its layer is reached."""

    inner: Attend
    fault: Fault

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 positions: torch.Tensor) -> torch.Tensor:
        if layer == self.fault.layer:
            if self.fault.action == "exit":
                os._exit(137)  # no cleanup: a killed process closes nothing gracefully
            raise InjectedFault(f"injected fault at layer {layer}")
        return self.inner(layer, q, k, v, positions)
