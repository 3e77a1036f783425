"""Plan-shaped prefill descriptions and how a chunk's tokens are split over its SP group.

A chunk [start, end) on ranks G is split so that attention work is balanced: causal attention
makes later tokens dearer, so the chunk is cut into 2·|G| equal pieces and rank i takes piece i
and piece 2|G|−1−i (the "zigzag" split of ring attention). Positions are explicit everywhere, so
a rank's tokens need not be contiguous; a chunk smaller than its group leaves some ranks empty.
"""

from __future__ import annotations

import re

import torch

from tetris.solver.plan import ChunkSpec

_ITEM = re.compile(r"^\s*(rest|\d+)\s*:\s*(\d+)\s*$")


def parse_chunks(text: str, prompt_tokens: int) -> list[ChunkSpec]:
    """`512:1,1024:2,rest:4` → chunks of 512 tokens on rank 0, 1024 on ranks 0-1, the rest on
    ranks 0-3 (nested groups). `rest` may only be last; sizes must add up to the prompt (a
    trailing `rest` takes what is left). Raises ValueError naming the bad item."""
    if prompt_tokens <= 0:
        raise ValueError("the prompt has no tokens")
    items = [item for item in text.split(",") if item.strip()]
    if not items:
        raise ValueError("no chunks given: expected TOKENS:SP items, e.g. 512:1,rest:2")
    chunks: list[ChunkSpec] = []
    start = 0
    for i, item in enumerate(items):
        match = _ITEM.match(item)
        if match is None:
            raise ValueError(f"chunk {i} {item.strip()!r}: expected TOKENS:SP or rest:SP")
        size_text, sp_text = match.groups()
        sp = int(sp_text)
        if sp <= 0:
            raise ValueError(f"chunk {i} {item.strip()!r}: SP must be >= 1")
        if size_text == "rest":
            if i != len(items) - 1:
                raise ValueError(f"chunk {i}: 'rest' must be the last chunk")
            end = prompt_tokens
        else:
            end = start + int(size_text)
        if end <= start:
            raise ValueError(f"chunk {i} {item.strip()!r}: a chunk needs at least one token "
                             f"(the prompt has {prompt_tokens} tokens, {start} already used)")
        if end > prompt_tokens:
            raise ValueError(f"chunk {i} {item.strip()!r}: chunks reach token {end} but the "
                             f"prompt has {prompt_tokens} tokens")
        if chunks and sp < chunks[-1].sp:
            raise ValueError(
                f"chunk {i} {item.strip()!r}: SP may only grow (groups are nested: earlier "
                f"chunks' KV stays on their ranks), got {chunks[-1].sp} → {sp}")
        chunks.append(ChunkSpec(start, end, tuple(range(sp))))
        start = end
    if start != prompt_tokens:
        raise ValueError(f"chunks cover {start} of {prompt_tokens} prompt tokens: "
                         "end with rest:SP or make the sizes add up")
    return chunks


def zigzag_positions(chunk: ChunkSpec, rank: int) -> torch.Tensor:
    """Token positions of `chunk` that `rank` computes (int64, ascending; maybe empty): the
    split of `ChunkSpec.piece_bounds`."""
    return torch.cat([torch.arange(a, b, dtype=torch.int64)
                      for a, b in chunk.piece_bounds(chunk.instances.index(rank))])
