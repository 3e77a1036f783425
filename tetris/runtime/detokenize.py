"""Output text as tokens arrive: incremental detokenization with stop strings.

A token's text can depend on its neighbours (leading spaces, multi-byte characters split over
tokens), so each step decodes a short window: the tokens since the last settled point
(`prefix`), and the new text is what the window decodes to beyond what its settled part did.
Text ending in an incomplete character (U+FFFD) waits for the next token. The last
`max(len(stop)) - 1` characters wait while they could still begin a stop string; a stop string
ends the output just before it (it is not returned), as in OpenAI's API. Each step costs the
window, not the whole output.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


@dataclass
class Detokenizer:
    decode: Callable[[Sequence[int]], str]
    stop: Sequence[str] = ()
    token_ids: list[int] = field(default_factory=list)
    text: str = ""  # every settled character so far
    released: int = 0  # characters of `text` already handed out
    stopped: bool = False
    prefix: int = 0  # token_ids[prefix:read] decode to text already in `text`
    read: int = 0

    def add(self, token_ids: Sequence[int], final: bool = False) -> str:
        """Append tokens; return the newly released text. After a stop string is met (then
        `stopped` is True) the text up to it is released and nothing more."""
        self.token_ids.extend(token_ids)
        settled = self.decode(self.token_ids[self.prefix:self.read])
        window = self.decode(self.token_ids[self.prefix:])
        if len(window) > len(settled) and (final or not window.endswith("\ufffd")):
            self.text += window[len(settled):]
            self.prefix, self.read = self.read, len(self.token_ids)
        end = len(self.text)
        longest = max((len(s) for s in self.stop), default=0)
        start = max(0, self.released - longest + 1)
        hits = [i for i in (self.text.find(s, start) for s in self.stop if s) if i >= 0]
        if hits:
            end = min(hits)
            self.stopped = True
        elif not final:
            end -= max(longest - 1, 0)
        if end <= self.released:
            return ""
        new = self.text[self.released:end]
        self.released = end
        return new
