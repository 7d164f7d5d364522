"""A model the fast decoder lacks runs as a level through transformers' modeling (`services.engine.fallback`), and
every method keeps its promises on it: the same greedy text as plain decoding, the same seeded text, each request
of a batch the same as alone (token trees verified through 4D masks, rolled back by cropping). Parity of its logits
with transformers: test_architectures."""

from __future__ import annotations

import pytest
import torch
from test_batching import GREEDY, VOCAB, hierarchies, prompts, run_together
from tiny_models import tiny_hf_model, tiny_runner

from services.engine.batching import BatchingLevel
from services.engine.fallback import TransformersDecoder, load_decoder
from services.engine.sampling import SamplingParams


@pytest.fixture(scope="module")
def phi3_levels():
    levels = {"draft": BatchingLevel(tiny_runner(5, "phi3", vocab=VOCAB)),
              "target": BatchingLevel(tiny_runner(3, "phi3", vocab=VOCAB))}
    assert all(isinstance(level.runner.decoder, TransformersDecoder) for level in levels.values())
    return levels


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "coupled"])
def test_every_method_equals_plain_decoding_alone_and_batched(phi3_levels, sampled):
    requests = prompts(6)
    sampling = [SamplingParams(temperature=0.9, seed=i) if sampled else GREEDY for i in range(6)]
    decoders = hierarchies(phi3_levels)
    plain = [run_together(decoders["ar"], [p], [s])[0] for p, s in zip(requests, sampling)]
    accepted = 0
    for name, decoder in decoders.items():
        assert run_together(decoder, requests, sampling) == plain, name
        accepted += sum(decoder.generate(p, s, 24).stats.as_dict()["mean_accepted"] > 0
                        for p, s in zip(requests[:2], sampling[:2]))
    assert accepted, "no draft token was ever accepted: the test would not see a wrong verification"


def test_the_fallback_computes_in_float32_whatever_the_config_asks():
    """In bfloat16 transformers' kernels round a position differently with the forward's row count, and speculative
    text differed from plain decoding (services/engine/fallback.py): the fallback keeps float32."""
    decoder = load_decoder(tiny_hf_model(3, "phi3", vocab=16), torch.bfloat16, torch.device("cpu"))
    assert isinstance(decoder, TransformersDecoder) and decoder.dtype == torch.float32
    assert next(decoder.model.parameters()).dtype == torch.float32
