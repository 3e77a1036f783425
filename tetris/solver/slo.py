"""SLOs as users give them (absolute, or relative to a request's isolated best TTFT)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class SloSpec(BaseModel):
    """TTFT is either absolute (`ttft_s`) or `ttft_scale` × the request's isolated best-case
    TTFT (the whole prefill cluster free, best single-chunk SP size); TBT is absolute."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ttft_s: float | None = Field(default=None, gt=0)
    ttft_scale: float | None = Field(default=None, gt=0)
    tbt_s: float = Field(default=0.1, gt=0)

    @model_validator(mode="after")
    def _one_ttft_form(self) -> SloSpec:
        if (self.ttft_s is None) == (self.ttft_scale is None):
            raise ValueError("give exactly one of ttft_s (absolute) or ttft_scale (relative)")
        return self

    def ttft_for(self, isolated_best_ttft_s: float) -> float:
        if self.ttft_s is not None:
            return self.ttft_s
        assert self.ttft_scale is not None
        return self.ttft_scale * isolated_best_ttft_s
