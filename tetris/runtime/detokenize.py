"""Output text as tokens arrive: incremental detokenization with stop strings.

The text of all generated tokens is decoded afresh each time (a token's text can depend on its
neighbours, and a multi-byte character can span tokens), and only the new, settled part is
released: text ending in an incomplete character (U+FFFD) waits for the next token, and the
last `max(len(stop)) - 1` characters wait while they could still begin a stop string. A stop
string ends the output just before it (it is not returned), as in OpenAI's API.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


@dataclass
class Detokenizer:
    decode: Callable[[Sequence[int]], str]
    stop: Sequence[str] = ()
    token_ids: list[int] = field(default_factory=list)
    released: int = 0  # characters of the text already handed out
    stopped: bool = False

    def add(self, token_ids: Sequence[int], final: bool = False) -> str:
        """Append tokens; return the newly settled text. After a stop string is met (then
        `stopped` is True) the text up to it is released and nothing more."""
        self.token_ids.extend(token_ids)
        text = self.decode(self.token_ids)
        end = len(text)
        hits = [i for i in (text.find(s, max(0, self.released - len(s) + 1))
                            for s in self.stop if s) if i >= 0]
        if hits:
            end = min(hits)
            self.stopped = True
        elif not final:
            if text.endswith("\ufffd"):
                end = len(text.rstrip("\ufffd"))
            hold = max((len(s) for s in self.stop), default=1) - 1
            end = min(end, len(text) - hold)
        if end <= self.released:
            return ""
        new = text[self.released:end]
        self.released = end
        return new
