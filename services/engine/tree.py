"""A token tree: several draft continuations merged so shared prefixes are verified once.

The root is implicit: the last committed token. Node i holds `tokens[i]`, its
parent `parents[i]` (-1: a child of the root) and the database it came from
(`sources[i]`, for per-source statistics).

Invariants: parents[i] < i (nodes are in topological order, so a forward over
them in index order only looks back), depth[i] = depth[parents[i]] + 1 (root
children have depth 0), and siblings carry distinct tokens.
"""

from __future__ import annotations


class TokenTree:
    # slots and a plain __init__: the drafter builds one per round, right after a forward has evicted
    # the CPU caches, so every object and bytecode it touches costs a memory access
    __slots__ = ("tokens", "parents", "depths", "sources", "_children")

    def __init__(self):
        self.tokens: list[int] = []
        self.parents: list[int] = []
        self.depths: list[int] = []
        self.sources: list[str] = []
        self._children: dict[int, dict[int, int]] = {}  # parent -> {token: node}

    def __len__(self) -> int:
        return len(self.tokens)

    def children(self, node: int) -> dict[int, int]:
        """{token: child node} of `node` (-1 is the root), in insertion (rank) order."""
        return self._children.get(node, {})

    def add_path(self, path: list[int], source: str, budget: int) -> int:
        """Insert a continuation from the root, sharing existing prefixes; stop at `budget` nodes.
        Returns how many new nodes were added."""
        node, added = -1, 0
        for token in path:
            child = self._children.get(node, {}).get(token)
            if child is None:
                if len(self.tokens) >= budget:
                    break
                child = len(self.tokens)
                self.tokens.append(token)
                self.parents.append(node)
                self.depths.append(0 if node < 0 else self.depths[node] + 1)
                self.sources.append(source)
                self._children.setdefault(node, {})[token] = child
                added += 1
            node = child
        return added

    def path_to(self, node: int) -> list[int]:
        """Node indices from the root's child down to `node`."""
        path = []
        while node >= 0:
            path.append(node)
            node = self.parents[node]
        return path[::-1]
