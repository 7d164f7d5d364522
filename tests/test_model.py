"""The decoder's KV cache: rollback is exact, capacity grows (parity with transformers: test_architectures)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_hf_model

from services.engine.model import Decoder

TOKENS = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7])


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_truncated_then_extended_cache_equals_fresh_forward(arch, dtype):
    decoder = Decoder.from_hf(tiny_hf_model(8, arch, vocab=16, init_range=0.1), dtype, torch.device("cpu"))
    fresh = decoder(TOKENS, decoder.new_cache(), len(TOKENS))

    cache = decoder.new_cache()
    decoder(TOKENS[:6], cache, 1)
    decoder(torch.tensor([0, 0, 0, 0]), cache, 4)  # a rejected draft fills slots 6..9
    cache.length = 6  # roll back to the verified prefix
    extended = decoder(TOKENS[6:], cache, len(TOKENS) - 6)
    torch.testing.assert_close(extended, fresh[6:], atol=1e-5, rtol=1e-5)


def test_cache_grows_past_its_initial_capacity():
    decoder = Decoder.from_hf(tiny_hf_model(9, vocab=16, init_range=0.1), torch.float32, torch.device("cpu"))
    tokens = torch.randint(0, 16, (200,), generator=torch.Generator().manual_seed(0))
    fresh = decoder(tokens, decoder.new_cache(), 1)
    cache = decoder.new_cache()
    cache.buffer = cache.buffer[:, :, :, :8].clone()  # start tiny so it must grow several times
    for i in range(0, 200, 25):
        out = decoder(tokens[i : i + 25], cache, 1)
    assert cache.capacity >= 200
    torch.testing.assert_close(out, fresh, atol=1e-4, rtol=1e-4)
