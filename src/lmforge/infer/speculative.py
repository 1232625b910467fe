"""Drafts for n-gram speculative decoding ("prompt lookup"): guess a request's next tokens from its own text.

When a single request decodes, each step reads every weight of the model to produce one token, so the step costs
about the same for one token as for a few. The engine (`BatchEngine(draft=K)`) then guesses the next K tokens by
finding the latest earlier place where the sequence's last n tokens (n = 3, 2, 1) occurred and copying what
followed it, runs the request's next token and the guesses through the model in one forward, and keeps the guesses
up to the first one the model would not have chosen greedily, plus the model's own token after them. A greedy
request's output is therefore exactly what it would be without drafts; text that repeats itself (code, quoted
documents, lists, and small models' loops) gains most, text that never repeats gains nothing and loses the few
drafted positions' compute.
"""

from __future__ import annotations

__all__ = ["NgramIndex", "accepted"]


class NgramIndex:
    """A sequence's n-grams (n = 1..max_n), each mapped to where it last ended before the sequence's end.

    `extend` adds tokens in O(max_n) each; `draft` looks the sequence's last n tokens up, longest n first."""

    def __init__(self, tokens: list[int], max_n: int = 3) -> None:
        self.max_n = max_n
        self.tokens: list[int] = []
        self._last: dict[tuple[int, ...], int] = {}
        self.extend(tokens)

    def extend(self, tokens: list[int]) -> None:
        for t in tokens:
            # The n-grams ending at the current last token become "earlier" ones once another token follows.
            end = len(self.tokens) - 1
            for n in range(1, min(self.max_n, end + 1) + 1):
                self._last[tuple(self.tokens[end - n + 1 : end + 1])] = end
            self.tokens.append(t)

    def draft(self, k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the longest suffix seen before."""
        if k < 1:
            return []
        seq = self.tokens
        for n in range(min(self.max_n, len(seq)), 0, -1):
            end = self._last.get(tuple(seq[len(seq) - n :]))
            if end is not None:
                return seq[end + 1 : end + 1 + k]
        return []


def accepted(draft: list[int], greedy: list[int]) -> int:
    """How many drafted tokens the model agrees with: greedy[j] is its choice after the fed token j (the request's
    next token is fed first, then the draft), so draft[j] stands when it equals greedy[j] and all before it stood."""
    n = 0
    while n < len(draft) and draft[n] == greedy[n]:
        n += 1
    return n
