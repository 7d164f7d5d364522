"""Lossless verification of a draft by the level above it (the rejection sampler).

Glossary (as in vLLM's rejection sampler):
- draft tokens: the n tokens a lower level proposes, x_1..x_n.
- accepted tokens: the longest prefix of the draft that survives verification.
- recovered token: on the first rejection, a token sampled from the residual
  distribution normalise(max(0, p - q)) at that position.
- bonus token: when the whole draft is accepted, one token sampled from p at
  the position after the draft (the verifier's forward computed it for free).
- output tokens: accepted tokens plus one recovered or bonus token, so every
  verification yields at least one token.

A database drafter proposes a token tree of point-mass candidates instead of
one draft. Greedy walks the tree along the verifier's argmax. Sampling uses
multi-candidate recursive rejection (as SpecInfer): at a node with target
distribution p, each child x is accepted with probability p(x); on rejection
p(x) is zeroed and p renormalised before the next child; when no child
survives the token is sampled from what is left of p. This is exactly a
sample from p, so it is lossless.

Greedy and coupled sampling (`services.engine.sampling`: every level picks by a
rule it shares with the others) accept while the draft equals the verifier's
picks and then emit the verifier's pick, which is exactly what plain decoding
would emit. The rejection sampler accepts x with probability min(1, p(x) / q(x));
a draft without probabilities (a database drafter) is a point mass, q(x) = 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.engine.sampling import sample
from services.engine.tree import TokenTree


@dataclass(frozen=True)
class TreeVerdict:
    """Output tokens are [tree.tokens[i] for i in path] + [next_token]."""

    path: list[int]
    next_token: int


@dataclass(frozen=True)
class Verdict:
    """The outcome of verifying one draft: output tokens are draft[:num_accepted] + [next_token]."""

    num_accepted: int
    next_token: int


class RejectionSampler:
    """Stateless; one instance serves every level. Subclassed only by tests that break it on purpose."""

    def uniform(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """n uniform draws in [0, 1), the acceptance tests' random numbers."""
        return torch.rand(n, generator=generator)

    def picked(self, draft: list[int], choice: list[int]) -> Verdict:
        # choice: the verifier's pick (greedy or coupled) at each of the len(draft) + 1 positions
        accepted = 0
        while accepted < len(draft) and draft[accepted] == choice[accepted]:
            accepted += 1
        return Verdict(accepted, choice[accepted])

    def sampled(
        self,
        draft: list[int],
        draft_probs: torch.Tensor | None,
        target_probs: torch.Tensor,
        generator: torch.Generator,
    ) -> Verdict:
        # draft_probs: [len(draft), vocab] or None for a point-mass draft
        # target_probs: [len(draft) + 1, vocab]
        n = len(draft)
        if n:
            index = torch.tensor(draft)
            p = target_probs[torch.arange(n), index]
            q = torch.ones(n) if draft_probs is None else draft_probs[torch.arange(n), index]
            u = self.uniform(n, generator)
            rejected = (u * q >= p).nonzero()
            if len(rejected):
                i = int(rejected[0])
                return Verdict(i, self.recover(draft[i], None if draft_probs is None else draft_probs[i],
                                               target_probs[i], generator))
        return Verdict(n, sample(target_probs[n], generator))

    def recover(
        self, rejected_token: int, draft_row: torch.Tensor | None, target_row: torch.Tensor, generator: torch.Generator
    ) -> int:
        """Sample from normalise(max(0, p - q)), the part of p the draft did not cover."""
        if draft_row is None:
            residual = target_row.clone()
            residual[rejected_token] = 0.0
        else:
            residual = (target_row - draft_row).clamp_(min=0.0)
        if float(residual.sum()) <= 0.0:  # p == q up to rounding: a rejection had probability ~0
            residual = target_row
        return sample(residual, generator)

    def picked_tree(self, tree: TokenTree, choice: list[int]) -> TreeVerdict:
        # choice: the verifier's pick after the root (0) and after each node i (1 + i)
        path: list[int] = []
        node = -1
        while (child := tree.children(node).get(choice[node + 1])) is not None:
            path.append(child)
            node = child
        return TreeVerdict(path, choice[node + 1])

    def sampled_tree(self, tree: TokenTree, target_probs: torch.Tensor, generator: torch.Generator) -> TreeVerdict:
        # target_probs: [1 + len(tree), vocab], rows as in picked_tree
        path: list[int] = []
        node = -1
        while True:
            residual = target_probs[node + 1].clone()
            accepted = None
            for token, child in tree.children(node).items():
                mass = float(residual[token])
                if float(self.uniform(1, generator)) < mass:
                    accepted = child
                    break
                residual[token] = 0.0
                residual /= max(1.0 - mass, 1e-30)
            if accepted is None:
                if float(residual.sum()) <= 0.0:  # the children held all of p's mass, a renormalised one rounded
                    residual = target_probs[node + 1]  # below 1 and was rejected: probability ~0 (as in `recover`)
                return TreeVerdict(path, sample(residual, generator))
            path.append(accepted)
            node = accepted
