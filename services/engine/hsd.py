"""Hierarchical speculative decoding over a chain of levels M_0 < M_1 < ... < M_K (the target).

Level 0 drafts T_0 tokens autoregressively. A middle level i asks level i-1
for drafts continuing (context + tokens it holds), verifies each draft in one
forward pass, keeps what survives plus one recovered/bonus token, and repeats
until it holds at least T_i tokens; it hands them up with its own warped
probabilities, which are the draft distribution q for the level above. The
target verifies one batch per round and commits what it accepts.

Why this is lossless: a middle level's output is, by the correctness of
speculative sampling, distributed exactly as autoregressive sampling from M_i,
token by token, so M_i's probabilities are the right q for the level above.
How many tokens a level holds is decided only from tokens already produced (a
stopping time), which leaves each token's conditional distribution unchanged.
With one level (K = 0) the loop is plain autoregressive decoding through the
same runner, so `ar` and speculative runs are compared fairly.

Below level 0 may sit a model-free proposer (the database drafter of
drafter_db): level 0 then verifies its token trees instead of drafting
autoregressively, keeping the accepted path and its own probabilities, and
hands the result up like any other level (or commits it, when level 0 is the
target: method `hd`).

KV caches need no explicit rollback: every level call carries the full token
sequence and the runner reuses only the longest cached prefix (after a tree
forward, the tree nodes that the sequence went on with).

Level calls are awaited (`services.engine.levels`), so a router can interleave the
rounds of many requests over remote levels; `Generation` is also a plain
iterator for callers in one process.
"""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch

from services.engine.batching import as_level
from services.engine.budget import DraftBudget
from services.engine.levels import Level, Scores
from services.engine.runner import LevelRunner
from services.engine.sampling import SamplingParams, TokenLogprob, logprobs_of
from services.engine.tree import TokenTree
from services.engine.verify import RejectionSampler


@dataclass
class LevelStats:
    """Counts for one level. `drafted`/`accepted` count this level's tokens proposed to and
    accepted by the level above; `verifications` counts the drafts this level verified;
    `confidence_stops` counts its batches that ended early after a token it was unsure of,
    `stop_token_drafts` its batches that hold a stop token (EOS inside a draft), `budget_limited` its
    batches for the target that the request's remaining tokens made shorter than T_i."""

    name: str
    drafted: int = 0
    accepted: int = 0
    verifications: int = 0
    forwards: int = 0
    forward_seconds: float = 0.0
    confidence_stops: int = 0
    stop_token_drafts: int = 0
    budget_limited: int = 0

    def as_dict(self) -> dict:
        rate = self.accepted / self.drafted if self.drafted else None
        return {
            "name": self.name,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "acceptance_rate": rate,
            "verifications": self.verifications,
            "forwards": self.forwards,
            "forward_seconds": round(self.forward_seconds, 4),
            "confidence_stops": self.confidence_stops,
            "stop_token_drafts": self.stop_token_drafts,
            "budget_limited": self.budget_limited,
        }


@dataclass
class SourceStats:
    """Tree-draft tokens of one database: proposed, and accepted by the level verifying them."""

    drafted: int = 0
    accepted: int = 0


@dataclass
class GenerationStats:
    levels: list[LevelStats]
    tokens: int = 0
    seconds: float = 0.0
    sources: dict[str, SourceStats] = field(default_factory=dict)
    draft_seconds: list[float] = field(default_factory=list)  # one entry per proposer call
    lookahead_used: int = 0  # target rounds whose draft was ready (drafted during the previous verification)
    plans_used: dict[str, int] = field(default_factory=dict)  # switching decoders: target rounds per plan

    def __post_init__(self):
        self._by_name = {level.name: level for level in self.levels}

    def of(self, name: str) -> LevelStats:
        return self._by_name[name]

    @property
    def mean_accepted(self) -> float:
        """Tokens committed per target verification: 1 + accepted / verifications (1.0 for `ar`)."""
        target = self.levels[-1]
        return self.tokens / target.verifications if target.verifications else 0.0

    def as_dict(self) -> dict:
        return {
            "tokens": self.tokens,
            "seconds": round(self.seconds, 4),
            "tokens_per_s": round(self.tokens / self.seconds, 3) if self.seconds else 0.0,
            "mean_accepted": round(self.mean_accepted, 4),
            "levels": [level.as_dict() for level in self.levels],
            "accepted_by_source": {name: src.accepted for name, src in self.sources.items()},
            "drafted_by_source": {name: src.drafted for name, src in self.sources.items()},
            "lookahead_used": self.lookahead_used,
            **({"plans_used": self.plans_used} if self.plans_used else {}),
            "drafter_us_per_draft": round(1e6 * sum(self.draft_seconds) / len(self.draft_seconds), 1)
            if self.draft_seconds else None,
        }


@dataclass
class Load:
    """How many requests a decoder runs at once (their generations are streaming)."""

    active: int = 0


class TreeProposer(Protocol):
    """A model-free drafter below level 0 (the database drafter): proposes token trees of
    point-mass candidates. It hears each request's lifecycle to keep its per-request state."""

    def start(self, request_id: str, prompt_ids: list[int]) -> None: ...

    def propose(self, request_id: str, context: list[int], max_depth: int,
                max_nodes: int | None = None) -> TokenTree: ...

    def observe(self, request_id: str, tree: TokenTree, accepted_path: list[int]) -> None: ...

    def commit(self, request_id: str, token_ids: list[int]) -> None: ...

    def finish(self, request_id: str, completed: bool) -> None: ...


@dataclass(frozen=True)
class DraftPolicy:
    """How a non-target level drafts: it hands up batches aiming at `max_tokens` (T_i).

    Level 0 also stops a batch early once it drafted a token it gave less than
    `min_confidence` probability (with the database drafter below it: one of its
    own one-token steps, where no tree was proposed): a rule on the drafter's own
    output only, so it cannot change what is generated, only how much drafting
    and verification is wasted.
    """

    max_tokens: int
    min_confidence: float = 0.0

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ValueError("draft lengths must be >= 1")
        if not 0.0 <= self.min_confidence < 1.0:
            raise ValueError("min_confidence must be in [0, 1)")


@dataclass
class Draft:
    """Tokens a level proposes; `probs` ([len(tokens), vocab]) is None when levels pick. `unsure`: the
    level gave its last token less than its policy's `min_confidence` (its batch should end there)."""

    tokens: list[int] = field(default_factory=list)
    probs: torch.Tensor | None = None
    unsure: bool = False
    logprobs: list[TokenLogprob] | None = None  # the target's, of a round's output tokens, when the request asks


class Generation:
    """One request in flight: iterate it for the tokens each target round commits.

    `finish_reason` ("stop" | "length") and `stats` are final once iteration ends.
    Closing the iterator early (a client that went away) releases every level's cache.
    """

    def __init__(self, decoder: HierarchicalDecoder, prompt_ids: list[int], params: SamplingParams,
                 max_tokens: int, stop_ids: frozenset[int], request_id: str | None = None):
        self.id = request_id or uuid.uuid4().hex
        if params.coupled and params.seed is None:  # coupled sampling needs a seed: a fresh one
            params = params.model_copy(update={"seed": secrets.randbits(63)})
        self.params = params
        self.stop_ids = stop_ids
        self.generator = params.generator()
        self.draft_params = params.without_logprobs()  # what levels below the target pick by
        # the target's log-probability of each token of `token_ids` (and its top alternatives), when asked for
        self.logprobs: list[TokenLogprob] | None = None if params.logprobs is None else []
        self.stats = GenerationStats([LevelStats(level.name) for level in decoder.levels])
        self.finish_reason: str | None = None
        self.token_ids: list[int] = []
        self._decoder = decoder
        self._prompt_ids = list(prompt_ids)
        self._max_tokens = max_tokens
        self.lookahead: tuple[int, Draft] | None = None  # (sequence length it continues, draft)
        self.acceptance: float | None = None  # what the draft budget has seen this request accept (budget.py)

    @property
    def max_tokens(self) -> int:
        return self._max_tokens

    @property
    def load(self) -> int:
        """Requests its decoder runs now, this one included."""
        return self._decoder.load.active

    def __iter__(self) -> Iterator[list[int]]:
        loop = asyncio.new_event_loop()
        rounds = self.stream()
        try:
            while True:
                try:
                    yield loop.run_until_complete(anext(rounds))
                except StopAsyncIteration:
                    return
        finally:
            loop.run_until_complete(rounds.aclose())
            loop.close()

    async def stream(self) -> AsyncIterator[list[int]]:
        """The tokens each target round commits (stop tokens excluded)."""
        decoder = self._decoder
        proposer = decoder.proposer
        seq = list(self._prompt_ids)
        started = time.perf_counter()
        if proposer is not None:
            proposer.start(self.id, seq)
        decoder.load.active += 1
        try:
            while len(self.token_ids) < self._max_tokens:
                budget = self._max_tokens - len(self.token_ids)
                out = await decoder._target_round(self, seq, budget)
                committed = []
                for token in out.tokens:
                    if token in self.stop_ids:
                        self.finish_reason = "stop"
                        break
                    committed.append(token)
                seq.extend(committed)
                self.token_ids.extend(committed)
                if self.logprobs is not None:
                    self.logprobs.extend(out.logprobs[: len(committed)])
                if proposer is not None:
                    proposer.commit(self.id, committed)
                self.stats.tokens = len(self.token_ids)
                self.stats.seconds = time.perf_counter() - started
                if committed:
                    yield committed
                if self.finish_reason:
                    return
            self.finish_reason = "length"
        finally:
            decoder.load.active -= 1
            self.stats.seconds = time.perf_counter() - started
            if proposer is not None:
                proposer.finish(self.id, completed=self.finish_reason is not None)
            # shielded: a generation cancelled while it releases (a client gone as it finishes) still releases
            await asyncio.shield(asyncio.gather(*(level.release(self.id) for level in decoder.levels),
                                                return_exceptions=True))


def _logprobs(req: Generation, scores: Scores, rows: list[int], tokens: list[int]) -> list[TokenLogprob] | None:
    """The target's log-probabilities of a round's output `tokens`, which it computed at `rows` of its scores."""
    if req.logprobs is None:
        return None
    if req.params.picks:  # the target's pick at each of these rows is the token committed there
        return [scores.logprobs[row] for row in rows]
    return logprobs_of(scores[rows], tokens, req.params.logprobs)


def _picks(req: Generation, target: bool) -> SamplingParams | None:
    """What a level call asks for: picks under the request's params (greedy, coupled), with the target's
    log-probabilities when the request wants them, else logits."""
    if not req.params.picks:
        return None
    return req.params if target else req.draft_params


class HierarchicalDecoder:
    """Runs a chain of levels; `levels[-1]` is the target, `policies[i]` says how levels[i] drafts
    (an int is shorthand for a policy with that T_i)."""

    def __init__(self, levels: list[Level | LevelRunner], policies: list[DraftPolicy | int],
                 sampler: RejectionSampler | None = None, proposer: TreeProposer | None = None,
                 on_forward: Callable[[str, float], None] | None = None,
                 lookahead: bool | Callable[[], bool] = False):
        levels = [as_level(level) for level in levels]
        if len(policies) != len(levels) - 1:
            raise ValueError("need one draft policy per non-target level")
        vocab = levels[-1].vocab_size
        for level in levels[:-1]:
            if level.vocab_size != vocab:
                raise ValueError(
                    f"level {level.name!r} has vocabulary size {level.vocab_size}, the target {vocab}: "
                    "every level must share the target's tokenizer"
                )
        self.levels = levels
        self.policies = [p if isinstance(p, DraftPolicy) else DraftPolicy(p) for p in policies]
        # below level 0: with a proposer, level 0 verifies its trees (holding T_0 tokens when it drafts)
        self.proposer = proposer
        self.sampler = sampler or RejectionSampler()
        self.on_forward = on_forward  # (level name, seconds) after every forward: serving metrics
        # see _target_round: pays off only when levels run in other processes and do not share cores
        self.lookahead = lookahead if callable(lookahead) else (lambda: lookahead)
        self.load = Load()  # requests this decoder runs now (a switching decoder shares its own with its members)
        self._budget: DraftBudget | None = None

    @property
    def target(self) -> Level:
        return self.levels[-1]

    def start(self, prompt_ids: list[int], params: SamplingParams, max_tokens: int,
              stop_ids: set[int] | frozenset[int] = frozenset(), request_id: str | None = None) -> Generation:
        """A lazy generation; nothing runs until it is iterated. Stop tokens are not returned.
        `request_id` (default: a fresh one) keys the request's KV caches at every level."""
        return Generation(self, prompt_ids, params, max_tokens, frozenset(stop_ids), request_id)

    def generate(self, prompt_ids: list[int], params: SamplingParams, max_tokens: int,
                 stop_ids: set[int] | frozenset[int] = frozenset()) -> Generation:
        """Run a generation to the end and return it."""
        generation = self.start(prompt_ids, params, max_tokens, stop_ids)
        for _ in generation:
            pass
        return generation

    async def verify_at(self, req: Generation, level_index: int, seq: list[int], limit: int) -> Draft:
        """Level `level_index` verifies one draft from the level below (at level 0, as in `ar`,
        it decodes one token, or verifies the proposer's tree). Returns at most `limit` output tokens
        with, when sampling, the level's probabilities for them (the q its output carries to the
        level above)."""
        room = self._target_room(limit, req) if level_index == len(self.levels) - 1 else limit - 1
        guess = None
        if level_index == 0 and self.proposer is not None and room > 0:
            tree = self._propose(req, seq, room)
            if len(tree):
                return await self._verify_tree(req, seq, tree)
        elif level_index == 0 and self.proposer is not None and limit > 1 and self._budget is not None:
            # the budget allowed no draft: the drafter's one-token guess, never verified, still measures whether
            # a draft would have paid (see services.engine.budget; a lookup, not counted as drafting time)
            guess = self.proposer.propose(req.id, seq, 1, 1)
        draft = await self._draft(req, level_index - 1, seq, room) if level_index > 0 else Draft()
        drafting = level_index < len(self.levels) - 1
        min_confidence = self.policies[level_index].min_confidence if drafting and not draft.tokens else 0.0
        out = await self._verify_draft(req, level_index, seq, draft, min_confidence)
        if guess is not None and len(guess):
            req.acceptance = self._budget.guessed(guess.tokens[0] == out.tokens[0], req.acceptance)
        return out

    async def _target_round(self, req: Generation, seq: list[int], limit: int) -> Draft:
        """One round of the target. With `lookahead` (levels that pick, remote), the level below drafts
        the next batch from the optimistic end of this one (all accepted) while the target verifies;
        the next round uses it when the target did accept everything and its bonus token is the
        draft's first token. A draft is only a proposal, so this cannot change the output."""
        top = len(self.levels) - 1
        if top == 0 or not req.params.picks or not self.lookahead():
            return await self.verify_at(req, top, seq, limit)
        ready, req.lookahead = req.lookahead, None
        if ready is not None and ready[0] == len(seq) and ready[1].tokens:
            draft = ready[1]
            req.stats.lookahead_used += 1
        else:
            draft = await self._draft(req, top - 1, seq, self._target_room(limit, req))
        room = min(limit - 1 - len(draft.tokens), self._target_room(limit, req))
        # the draft ahead starts first: in a Serve app on CPU its call is then in flight when the verification's
        # asks whether the target computes alone (it does not: the cores are shared, see RemoteLevel.alone)
        ahead = asyncio.ensure_future(self._draft(req, top - 1, seq + draft.tokens, room)) \
            if draft.tokens and room > 1 else None
        verifying = asyncio.ensure_future(self._verify_draft(req, top, seq, draft))
        try:
            out = await verifying
        except BaseException:
            if ahead is not None:
                ahead.cancel()
            raise
        if ahead is not None:
            if len(out.tokens) == len(draft.tokens) + 1:
                following = await ahead
                if following.tokens[:1] == out.tokens[-1:]:
                    req.lookahead = (len(seq) + len(out.tokens), Draft(following.tokens[1:]))
            else:
                ahead.cancel()
        return out

    def _target_room(self, limit: int, req: Generation) -> int:
        """Draft tokens (tree nodes) the target verifies in a round: what `limit` leaves, and under load no more
        than the draft budget (services.engine.budget) finds best for the batch, given what `req` accepts."""
        room = limit - 1
        if self.load.active <= 1 or room <= 0:
            return room
        if self._budget is None:
            below = self.levels[-2] if len(self.levels) > 1 else None
            target_costs, draft_costs = getattr(self.target, "costs", None), getattr(below, "costs", None)
            if target_costs is None:
                return room
            self._budget = DraftBudget(target_costs, draft_costs)
        most = self.policies[-1].max_tokens if len(self.levels) > 1 else room
        own = req.acceptance if len(self.levels) == 1 else None  # a request's own only under the drafter alone
        return min(room, self._budget.tokens(self.load.active, most, own))

    async def _verify_draft(self, req: Generation, level_index: int, seq: list[int], draft: Draft,
                            min_confidence: float = 0.0) -> Draft:
        scores = await self._forward(req, level_index, seq + draft.tokens, len(draft.tokens) + 1,
                                     confidence=min_confidence > 0.0)
        req.stats.of(self.levels[level_index].name).verifications += 1
        if req.params.picks:
            verdict = self.sampler.picked(draft.tokens, scores.tokens)
            rows = None
            confidence = scores.probs[verdict.num_accepted] if min_confidence > 0.0 else 1.0
        else:
            probs = req.params.probs(scores)
            verdict = self.sampler.sampled(draft.tokens, draft.probs, probs, req.generator)
            rows = probs[: verdict.num_accepted + 1]
            confidence = float(rows[-1, verdict.next_token]) if min_confidence > 0.0 else 1.0
        if level_index > 0:
            below = req.stats.of(self.levels[level_index - 1].name)
            below.drafted += len(draft.tokens)
            below.accepted += verdict.num_accepted
        top = level_index == len(self.levels) - 1
        if top and self._budget is not None:
            self._budget.observe(len(draft.tokens), verdict.num_accepted)
        out = draft.tokens[: verdict.num_accepted] + [verdict.next_token]
        logprobs = _logprobs(req, scores, list(range(len(out))), out) if top else None
        return Draft(out, rows, confidence < min_confidence, logprobs)

    async def _draft(self, req: Generation, level_index: int, seq: list[int], limit: int) -> Draft:
        """At most `limit` tokens from level `level_index` for the level above: T_i when it can (under load, for the
        target, what the draft budget allows, checked again as the draft grows).

        A level verifying drafts from below runs verifications until it holds T_i tokens and hands
        up exactly the first T_i (what the last one yields beyond is dropped), so the cost of a batch
        depends only on T_i and the levels below, which is what the planner's latency model prices.
        Level 0 with nothing below it verifies an empty draft each time: one autoregressive step."""
        if limit <= 0:
            return Draft()
        want = min(self.policies[level_index].max_tokens, limit)
        for_target = level_index == len(self.levels) - 2
        held: list[int] = []
        rows: list[torch.Tensor] = []
        while len(held) < want:
            out = await self.verify_at(req, level_index, seq + held, limit - len(held))
            held.extend(out.tokens)
            if out.probs is not None:
                rows.append(out.probs)
            if req.stop_ids.intersection(out.tokens):
                break
            if out.unsure:
                if len(held) < want:
                    req.stats.of(self.levels[level_index].name).confidence_stops += 1
                break
            if for_target and self.load.active > 1 and len(held) < want:
                # requests that arrived while this draft grew share the target's next forward: it ends where the
                # budget at the new load says (a request that started alone would otherwise draft the whole T_i,
                # one forward of the level below at a time, while the others wait for the target)
                want = min(want, max(len(held), self._target_room(limit + 1, req)))
        if for_target and want < self.policies[level_index].max_tokens:
            req.stats.of(self.levels[level_index].name).budget_limited += 1
        if req.stop_ids.intersection(held[:want]):
            req.stats.of(self.levels[level_index].name).stop_token_drafts += 1
        return Draft(held[:want], torch.cat(rows)[:want] if rows else None)

    def _propose(self, req: Generation, seq: list[int], room: int) -> TokenTree:
        """A tree of at most `room` levels, and under load at most `room` nodes (the draft budget's rows)."""
        start = time.perf_counter()
        tree = self.proposer.propose(req.id, seq, room, room if self.load.active > 1 else None)
        req.stats.draft_seconds.append(time.perf_counter() - start)
        return tree

    async def _verify_tree(self, req: Generation, seq: list[int], tree: TokenTree) -> Draft:
        """Level 0 verifies the proposer's tree in one forward and keeps the accepted path."""
        level = self.levels[0]
        target = len(self.levels) == 1
        scores = await self._counted(req, 0, level.tree_logits(req.id, seq, tree, _picks(req, target)))
        req.stats.of(level.name).verifications += 1
        if req.params.picks:
            verdict = self.sampler.picked_tree(tree, scores.tokens)
            rows = None
        else:
            probs = req.params.probs(scores)
            verdict = self.sampler.sampled_tree(tree, probs, req.generator)
            rows = probs[[0] + [node + 1 for node in verdict.path]]
        out = [tree.tokens[node] for node in verdict.path] + [verdict.next_token]
        logprobs = _logprobs(req, scores, [0] + [node + 1 for node in verdict.path], out) if target else None
        if len(self.levels) == 1 and self._budget is not None:
            req.acceptance = self._budget.observe(len(tree), len(verdict.path), req.acceptance)
        for source in tree.sources:
            req.stats.sources.setdefault(source, SourceStats()).drafted += 1
        for node in verdict.path:
            req.stats.sources[tree.sources[node]].accepted += 1
        self.proposer.observe(req.id, tree, verdict.path)
        return Draft(out, rows, logprobs=logprobs)

    async def _forward(self, req: Generation, level_index: int, token_ids: list[int], num_logits: int,
                       confidence: bool = False) -> Scores:
        """Picks (with their probabilities if `confidence`) when the levels pick, else logits."""
        level = self.levels[level_index]
        forward = level.logits(req.id, token_ids, num_logits, _picks(req, level_index == len(self.levels) - 1),
                               confidence)
        return await self._counted(req, level_index, forward)

    async def _counted(self, req: Generation, level_index: int, forward) -> Scores:
        """Await one forward of a level and charge its latency (compute, plus transport for a
        remote level) to the request's per-level stats."""
        start = time.perf_counter()
        scores = await forward
        seconds = time.perf_counter() - start
        stats = req.stats.of(self.levels[level_index].name)
        stats.forwards += 1
        stats.forward_seconds += seconds
        if self.on_forward is not None:
            self.on_forward(stats.name, seconds)
        return scores
