"""Load-aware speculation: how many tokens a request drafts for the target while others share its forwards.

Alone, a request's draft length is the plan's (T_i, the drafter's tree): a draft
row costs little next to reading the weights. With B requests batched at the
target, every draft row is one more row of a forward all B wait for, so the
draft that maximises one request's speed over-drafts for the batch. Per round,
with per-token acceptance alpha (each drafted token accepted with probability
alpha, independently: the HSD paper's model), n drafted tokens commit
E(alpha, n) = (1 - alpha^(n+1)) / (1 - alpha) tokens, and a round of the batch
costs about c_target(B (n + 1)) + n c_draft(B): the target verifying every
request's n + 1 rows, and the level below taking n steps of B rows. The budget
is the n <= T that maximises B E(alpha, n) / cost; it shrinks as B grows, down
to 0 (plain decoding) where speculation no longer pays.

Under a database drafter alone (`hd`), alpha is each request's own:
acceptance differs more between requests than between rounds of one (a
summary copies its source, a chat answer copies little), so one batch-wide
alpha gives the copying request too short a draft and the chatting one too
long. A request starts from the batch's moving average and follows its own
rounds; where its budget is 0, the drafter's one-token guess (a lookup, no
forward, never verified) compared with the token the target commits still
tells whether drafting would have paid, so a request that starts copying gets
drafts again. A draft model's tokens cannot be guessed without its forward, so
a request that stopped drafting would keep a stale acceptance: hierarchies of
models size drafts by the batch's, which every drafting request keeps current.

A budget only sizes drafts: every draft is verified by the target, so greedy
and coupled output is unchanged (lossless), only the speed. The rejection
sampler's output keeps the target's distribution, but with an explicit seed
its text can change with the load (the draft length decides how many random
numbers it draws): coupled sampling, the default with a seed, has no such gap.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass


@dataclass(frozen=True)
class CostModel:
    """Milliseconds of one forward of a level over `rows` new rows in total (all requests), measured at a few
    row counts and interpolated linearly (extrapolated from the last two points)."""

    rows: tuple[int, ...]
    ms: tuple[float, ...]

    def __call__(self, rows: float) -> float:
        i = min(max(bisect.bisect_left(self.rows, rows), 1), len(self.rows) - 1)
        (r0, r1), (m0, m1) = self.rows[i - 1 : i + 1], self.ms[i - 1 : i + 1]
        return max(m0 + (m1 - m0) * (rows - r0) / (r1 - r0), 0.0)


def expected_tokens(alpha: float, drafted: int) -> float:
    """Tokens a round commits with `drafted` tokens, each accepted with probability alpha (plus the bonus)."""
    return drafted + 1.0 if alpha >= 1.0 else (1.0 - alpha ** (drafted + 1)) / (1.0 - alpha)


class DraftBudget:
    """Draft tokens per round under load, from the target's (and the draft level's) cost model and the
    acceptance shown recently (moving averages over rounds: the batch's, and under the database drafter alone
    each request's own, which starts from the batch's)."""

    REQUEST_SMOOTHING = 0.25  # a request's own average follows its last few rounds

    def __init__(self, target: CostModel, draft: CostModel | None, alpha: float = 0.6, smoothing: float = 0.05):
        self.target, self.draft = target, draft
        self.alpha, self.smoothing = alpha, smoothing

    def observe(self, drafted: int, accepted: int, own: float | None = None) -> float | None:
        """Fold a round's drafted and accepted tokens into the batch's acceptance and into `own`, the request's
        (None: none yet, so it starts from the batch's); returns the request's new acceptance."""
        if not drafted:
            return own
        self.alpha += self.smoothing * (accepted / drafted - self.alpha)
        return self._follow(own, accepted / drafted)

    def guessed(self, hit: bool, own: float | None) -> float:
        """A request's acceptance after a one-token guess it did not draft (see above): its own only, the
        batch's being the verified rounds'."""
        return self._follow(own, float(hit))

    def _follow(self, own: float | None, rate: float) -> float:
        start = self.alpha if own is None else own
        return start + self.REQUEST_SMOOTHING * (rate - start)

    def tokens(self, load: int, most: int, alpha: float | None = None) -> int:
        """The draft length (0 to `most`) maximising committed tokens per second across `load` requests, for a
        request with acceptance `alpha` (default: the batch's)."""
        if load <= 1:
            return most
        alpha = self.alpha if alpha is None else alpha

        def throughput(n: int) -> float:
            cost = self.target(load * (n + 1)) + (n * self.draft(load) if self.draft is not None and n else 0.0)
            return load * expected_tokens(alpha, n) / cost
        return max(range(most + 1), key=throughput)
