"""One sampling policy, applied identically at every level.

Speculative sampling is exact only if the draft distribution q and the target
distribution p are the *warped* distributions (after temperature, top-k,
top-p) that plain decoding would sample from. Every level therefore turns its
logits into probabilities through `SamplingParams.probs`.

Temperature 0 means greedy: no probabilities are needed, levels compare argmax.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field


class SamplingParams(BaseModel):
    """How a request samples; the same object drives every level of the hierarchy."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float = Field(0.0, ge=0.0, le=10.0, description="0 is greedy decoding")
    top_k: int = Field(0, ge=0, description="keep the k most likely tokens; 0 keeps all")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus mass to keep; 1 keeps all")
    seed: int | None = Field(None, description="seed of the request's random generator")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def generator(self) -> torch.Generator:
        gen = torch.Generator()
        if self.seed is None:
            gen.seed()
        else:
            gen.manual_seed(self.seed)
        return gen

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Warped distributions, [n, vocab] float32 logits -> [n, vocab] float32 probabilities."""
        logits = logits / self.temperature
        if self.top_k and self.top_k < logits.shape[-1]:
            kth = torch.topk(logits, self.top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
            sorted_probs = sorted_logits.softmax(-1)
            # drop a token when the mass strictly before it already reaches top_p (the first always stays)
            drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) >= self.top_p
            drop = drop_sorted.scatter(-1, order, drop_sorted)
            logits = logits.masked_fill(drop, float("-inf"))
        return logits.softmax(-1)


def sample(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One token id from a [vocab] distribution."""
    return int(torch.multinomial(probs, 1, generator=generator))
