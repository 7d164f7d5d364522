"""Context DB: the n-grams of the current request (prompt, earlier turns, accepted output).

Highest temporal locality: what a request already said is what it is most
likely to say again (code identifiers, quoted passages, repeated structure).
The index maps each n-gram (n = 1..max_key) to the positions right after its
most recent occurrences, so a lookup is a few dict probes and a slice of the
token list; appending tokens costs O(max_key) per token.
"""

from __future__ import annotations

from drafter_db.keys import ngram_key


class ContextIndex:
    """Positional n-gram index over one growing token sequence.

    Invariant: for every key k of length n, `self._ends[k]` lists (oldest
    first, at most `max_positions`) indices e such that tokens[e-n:e] is that
    n-gram, for every e <= len(tokens); the current end is excluded from
    lookups because it has no continuation yet.
    """

    def __init__(self, max_key: int = 4, max_positions: int = 8):
        self.max_key = max_key
        self.max_positions = max_positions
        self.tokens: list[int] = []
        self._ends: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return len(self.tokens)

    def extend(self, new_tokens: list[int]) -> None:
        tokens = self.tokens
        for token in new_tokens:
            tokens.append(token)
            end = len(tokens)
            for n in range(1, min(self.max_key, end) + 1):
                key = ngram_key(tokens[end - n : end])
                ends = self._ends.get(key)
                if ends is None:
                    self._ends[key] = [end]
                else:
                    ends.append(end)
                    if len(ends) > self.max_positions:
                        del ends[0]

    def continuations(self, key: int, length: int, limit: int) -> list[list[int]]:
        """Up to `limit` distinct continuations (each at most `length` tokens, most recent occurrence
        first) of the n-gram with `ngram_key` `key` in the indexed tokens."""
        ends = self._ends.get(key)
        if not ends:
            return []
        tokens = self.tokens
        end = len(tokens)
        out: list[list[int]] = []
        for e in reversed(ends):
            if e >= end:
                continue
            cont = tokens[e : min(e + length, end)]
            if cont and cont not in out:
                out.append(cont)
                if len(out) == limit:
                    break
        return out
