"""One sampling policy, applied identically at every level, in one of three modes.

Speculative sampling is exact only if every level works with the *warped*
distribution (after temperature, top-k, top-p) that plain decoding samples
from. Every level therefore warps its logits through `SamplingParams.warped`.

- greedy (temperature 0): each level picks the argmax of its logits.
- coupled (a sampled request with a `seed`): each level picks
  argmax(warped logits / T + G), where G is Gumbel noise determined by the
  seed, the position and the token id alone. That is a sample from the level's
  own distribution (the Gumbel-max trick), and since every level perturbs with
  the same noise, a draft level proposes the token the target will pick
  whenever their distributions agree closely. The target accepts a drafted
  token when it equals its own pick, so the text is exactly the target's own
  sample for that seed, whatever drafted it: the same text under `ar`, `hd`,
  `hsd`, `hd+hsd` and `auto`, for linear drafts and token trees alike
  (drafter-invariant speculative sampling, Daliri, Musco and Suresh 2024).
- rejection (a sampled request without a seed): the classic speculative
  sampler (`services.engine.verify`), exact in distribution but not
  reproducible across methods; its acceptance is the higher of the two.

Greedy and coupled requests need only each row's pick from a level
(`Picks`), a few numbers instead of [rows, vocab] logits.

Log-probabilities (`SamplingParams.logprobs`, OpenAI's `logprobs`) are the
target's own: log-softmax of its raw logits (before temperature, top-k and
top-p, as vLLM reports them by default) at each committed token, computed with
row-wise operations whose result does not depend on the other rows (`logprobs_of`).
The target's logits of a position are the same bits whichever forward computes
them (the row-invariant numerics), so every method reports the same numbers as
plain decoding, at no extra forward: verification computed those logits anyway.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts, and OpenAI's int64 besides
MAX_TOP_LOGPROBS = 20  # OpenAI's bound on top_logprobs

# A generated token's log-probability and its most likely alternatives [(token id, log-probability)], most likely
# first (ties: the lower token id first).
TokenLogprob = tuple[float, list[tuple[int, float]]]


FLOAT32_MIN = 2.0**-149  # the smallest positive float32 (subnormal); a smaller positive float64 rounds to 0


class SamplingParams(BaseModel):
    """How a request samples; the same object drives every level of the hierarchy."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float = Field(0.0, ge=0.0, le=10.0, description="0 is greedy decoding")
    top_k: int = Field(0, ge=0, description="keep the k most likely tokens; 0 keeps all")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus mass to keep; 1 keeps all")
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1], description="the request's random numbers")
    sampler: Literal["coupled", "rejection"] | None = Field(
        None, description="how a sampled request verifies drafts; default: coupled with a seed, rejection without")
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS,
                                 description="report the target's log-probability of each generated token and of "
                                             "its `logprobs` most likely alternatives; None: none")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def coupled(self) -> bool:
        return not self.greedy and (self.sampler == "coupled" or (self.sampler is None and self.seed is not None))

    @property
    def picks(self) -> bool:
        """Levels pick one token per position by a rule they share (greedy, coupled); else they hand
        their distributions to the rejection sampler."""
        return self.greedy or self.coupled

    def generator(self) -> torch.Generator:
        """The rejection sampler's random numbers (CPU: the sampler works on CPU tensors)."""
        gen = torch.Generator()
        if self.seed is None:
            gen.seed()
        else:
            gen.manual_seed(self.seed)
        return gen

    def warped(self, logits: torch.Tensor) -> torch.Tensor:
        """[n, vocab] float32 logits -> (logits - row max) / temperature, -inf outside top-k / top-p.
        Subtracting the maximum first keeps any temperature > 0 finite (1e-45 included). A temperature or top_p
        below the smallest positive float32 would round to 0 in float32 arithmetic (a division by zero, every
        token dropped): it counts as that smallest float32, which picks the same tokens."""
        scaled = (logits - logits.amax(-1, keepdim=True)) / max(self.temperature, FLOAT32_MIN)
        if self.top_k and self.top_k < scaled.shape[-1]:
            kth = torch.topk(scaled, self.top_k, dim=-1).values[..., -1:]
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        if self.top_p < 1.0:
            sorted_scaled, order = torch.sort(scaled, dim=-1, descending=True, stable=True)
            sorted_probs = _softmax(sorted_scaled)
            # drop a token when the mass strictly before it already reaches top_p (the first always stays)
            drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) >= max(self.top_p, FLOAT32_MIN)
            drop = drop_sorted.scatter(-1, order, drop_sorted)
            scaled = scaled.masked_fill(drop, float("-inf"))
        return scaled

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Warped distributions, [n, vocab] float32 logits -> [n, vocab] float32 probabilities."""
        return _softmax(self.warped(logits))

    def without_logprobs(self) -> SamplingParams:
        """The same rule for levels below the target, whose log-probabilities nobody reports."""
        return self if self.logprobs is None else self.model_copy(update={"logprobs": None})


def logprobs_of(logits: torch.Tensor, tokens: list[int], top: int) -> list[TokenLogprob]:
    """Row i's log-softmax at tokens[i], and its `top` most likely tokens: [n, vocab] float32 raw logits. Row-wise
    operations only (the normaliser a sequential sum, as in `_softmax`; a stable sort), so a row's numbers do not
    depend on the rows computed with it."""
    logits = logits.float()
    shifted = logits - logits.amax(-1, keepdim=True)
    logprobs = shifted - torch.log(torch.exp(shifted).cumsum(-1)[..., -1:])
    chosen = logprobs.gather(-1, torch.tensor(tokens, device=logits.device)[:, None])[:, 0].tolist()
    if not top:
        return [(value, []) for value in chosen]
    # every token at least as likely as the top-th, ordered by value then id: exact ties are ranked by id,
    # whichever ones topk happened to return
    kth = torch.topk(logprobs, min(top, logprobs.shape[-1]), dim=-1).values[:, -1:]
    rows, ids = (logprobs >= kth).nonzero(as_tuple=True)
    ranked: list[list[tuple[int, float]]] = [[] for _ in chosen]
    for row, token, value in zip(rows.tolist(), ids.tolist(), logprobs[rows, ids].tolist()):
        ranked[row].append((token, value))
    return [(value, sorted(row, key=lambda entry: (-entry[1], entry[0]))[:top]) for value, row in zip(chosen, ranked)]


def _softmax(scaled: torch.Tensor) -> torch.Tensor:
    """Row-wise softmax whose result for a row does not depend on the other rows: the denominator is a
    sequential sum (a cumulative sum's last element). torch's `sum` of a lone row this long is split across
    threads, of several rows is not, so a top-p cut could fall elsewhere for one row than for the same row
    in a verification."""
    e = torch.exp(scaled - scaled.amax(-1, keepdim=True))
    return e / e.cumsum(-1)[..., -1:]


def sample(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One token id from a [vocab] distribution."""
    return int(torch.multinomial(probs, 1, generator=generator))


# --- coupled sampling: Gumbel noise from (seed, position, token id) ---------------------------------

_MASK32 = 0xFFFFFFFF
UNIFORM_BITS = 23  # u = (k + 0.5) / 2^23 for a 23-bit k: exact in float32, within [2^-24, 1 - 2^-24]
_U_LOW, _U_HIGH = 2.0 ** -(UNIFORM_BITS + 1), 1 - 2.0 ** -(UNIFORM_BITS + 1)
# the noise -log(-log u) lies within these bounds, so a token whose warped logit is more than GUMBEL_SPAN below the
# row's maximum can never win and its noise need not be drawn
GUMBEL_SPAN = -math.log(-math.log(_U_HIGH)) + math.log(-math.log(_U_LOW)) + 1.0


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """(x * constant) mod 2^32 for x < 2^32 held in int64, without overflowing int64."""
    low, high = x & 0xFFFF, x >> 16
    return (low * constant + (((high * constant) & 0xFFFF) << 16)) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (lowbias32's constants), elementwise on int64 tensors, the same on any device."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _key32(seed: int, position: int) -> tuple[int, int]:
    """Two 32-bit keys of (seed, position), mixed in Python (exact integers)."""
    value = (seed % 2**64) * 0x9E3779B97F4A7C15 + position * 0xD1B54A32D192ED03 + 0x632BE59BD9B4E019
    value &= 2**64 - 1
    value ^= value >> 29
    value = (value * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    value ^= value >> 32
    return value & _MASK32, value >> 32


def gumbel(seed: int, positions: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) noise, float32, for each (position, token id) pair of two equal-length tensors: a function of
    (seed, position, token id) only, so every level and every call shape draws the same (the integer hash is
    exact everywhere; the two logarithms are elementwise)."""
    # positions come in runs (a row's candidates together): one key per run, not a sort of every element
    distinct, inverse = torch.unique_consecutive(positions, return_inverse=True)
    keys = positions.new_tensor([_key32(seed, p) for p in distinct.tolist()], dtype=torch.long)  # [runs, 2]
    x = _mix32(_mix32(token_ids.long() ^ keys[inverse, 0]) ^ keys[inverse, 1])
    return -torch.log(-torch.log(uniform(x)))


def uniform(hashed: torch.Tensor) -> torch.Tensor:
    """32-bit hash values -> float32 uniforms on a 2^23-point grid in [2^-24, 1 - 2^-24] (never 0 or 1)."""
    return ((hashed >> (32 - UNIFORM_BITS)).float() + 0.5) * 2.0**-UNIFORM_BITS


@dataclass(frozen=True)
class Picks:
    """A level's pick at each row (greedy: the argmax; coupled: the Gumbel-argmax) and, when asked
    for (a drafter's confidence stop), the probability its warped distribution gave that token."""

    tokens: list[int]
    probs: list[float]  # empty unless asked for
    logprobs: list[TokenLogprob] | None = None  # of each row's pick, when the params ask for them

    @classmethod
    def of(cls, logits: torch.Tensor, params: SamplingParams, positions: list[int],
           confidence: bool = False) -> Picks:
        """`positions[i]`: the sequence position of the token row i predicts (the noise's key)."""
        if params.greedy:
            tokens = logits.argmax(-1)  # on the logits: rounded probabilities could tie where logits do not
            probs = _softmax(logits).gather(-1, tokens[:, None])[:, 0].tolist() if confidence else []
            return cls.reporting(logits, params, tokens.tolist(), probs)
        if params.seed is None:
            raise ValueError("coupled sampling needs a seed (a Generation draws one for a request without)")
        scaled = params.warped(logits)
        rows, tokens = (scaled >= -GUMBEL_SPAN).nonzero(as_tuple=True)  # the row maximum is 0 after warping
        where = torch.tensor(positions, device=scaled.device)[rows]
        perturbed = scaled[rows, tokens] + gumbel(params.seed, where, tokens)
        best = torch.full((len(scaled),), float("-inf"), device=scaled.device).scatter_reduce(
            0, rows, perturbed, "amax")
        winners = perturbed == best[rows]
        picks = torch.full((len(scaled),), scaled.shape[-1], device=scaled.device).scatter_reduce(
            0, rows[winners], tokens[winners], "amin").tolist()  # ties: the lowest token id
        probs = _softmax(scaled)[torch.arange(len(picks)), picks].tolist() if confidence else []
        return cls.reporting(logits, params, picks, probs)

    @classmethod
    def reporting(cls, logits: torch.Tensor, params: SamplingParams, tokens: list[int], probs: list[float]) -> Picks:
        """With the log-probabilities of the picks when asked for: at the target, a pick at a row is the token
        committed there whenever that row is committed (an accepted draft token equals the pick)."""
        logprobs = None if params.logprobs is None else logprobs_of(logits, tokens, params.logprobs)
        return cls(tokens, probs, logprobs)
