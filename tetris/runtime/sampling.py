"""Next-token choice from logits: greedy, or temperature + top-p with a seeded generator."""

from __future__ import annotations

from dataclasses import dataclass

import torch

GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    seed: int | None = None
    max_tokens: int = 16
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be > 0, got {self.max_tokens}")


class Sampler:
    """One per request, so a seed makes that request's samples reproducible."""

    def __init__(self, params: SamplingParams, state: torch.Tensor | None = None) -> None:
        """`state`: a generator state from `state()` (a request's sampling moving from its
        prefill instance to its decode instance continues the same random stream)."""
        self.params = params
        self.generator = torch.Generator()
        if state is not None:
            self.generator.set_state(state)
        elif params.seed is not None:
            self.generator.manual_seed(params.seed)

    def state(self) -> torch.Tensor:
        return self.generator.get_state()

    def __call__(self, logits: torch.Tensor) -> int:
        """logits: [vocab] (any float dtype)."""
        # Below GREEDY_BELOW the softmax underflows to NaN: the limit is greedy anyway.
        if self.params.temperature < GREEDY_BELOW:
            return int(torch.argmax(logits).item())
        probs = torch.softmax(logits.double() / self.params.temperature, dim=-1)
        if self.params.top_p < 1:
            sorted_probs, order = torch.sort(probs, descending=True)
            # Keep the smallest prefix whose mass reaches top_p (always at least one token).
            keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < self.params.top_p
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        choice = torch.multinomial(probs, 1, generator=self.generator)
        return int(choice.item())
